"""
Stock WireGuard devices through the relay: a phone or a laptop with the
official WireGuard app, configured with the relay as the endpoint of every
node, talks plain WireGuard (message types 1 to 4) to the relay's UDP port.
The relay routes those datagrams to the right node over the node's relay
session, and the node's answers back, without ever holding a key that
decrypts them: it knows public keys only.

How a datagram finds its node:

  - A handshake initiation names its responder only through mac1, a MAC
    keyed by HASH("mac1----" || responder's public key).  The router holds
    that key for every node that devices may reach (the nodes of networks
    with devices, registered here) and tries them in turn: the node whose
    key makes mac1 valid is the responder.  No node: dropped, counted.
  - Every other message names its receiver by a session index the
    receiver chose.  The router learns the node's indices from what the
    node sends the device (a response's or an initiation's sender index),
    and routes the device's responses, cookie replies and transport data by
    them.  Unknown index: dropped, counted.

The node sees the device as a relay endpoint that stands for the device:
a 32-byte handle in the RECV frame's source field, keyed by the relay's
secret over the node and the device's address.  The node's answers are
SEND frames to that handle; a handle answers only the node it was made
for.  A device that moves (NAT rebinding) is followed by its latest
transport datagram whose index the router knows.

Tables are bounded (oldest evicted first) and entries expire after
WireGuard's REJECT_AFTER_TIME without traffic.  Who may talk to whom is the
node's WireGuard device's business: it answers only initiations from
authorized members of a network it shares (the device's key is in its
map); the router only keeps strangers' datagrams away from nodes that no
device can reach.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twistvpn.wireguard.messages import (
    COOKIE_REPLY_SIZE,
    INITIATION_MAC1,
    INITIATION_SIZE,
    LABEL_MAC1,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    REJECT_AFTER_TIME,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)
from twistvpn.wireguard.noise import blake2s_hash

HANDLE_LENGTH = 32
MAC_LENGTH = 16

# A datagram's first word: its type, three zero bytes, then (for every type
# but the initiation) the receiver's index; the sender's index follows the
# type in initiations and responses.
_WORD = struct.Struct("<I")
_TYPE_AND_INDEX = struct.Struct("<II")
_RESPONSE_INDICES = struct.Struct("<III")


@dataclass
class DeviceLimits:
    """Bounds of the router's tables."""

    max_flows: int = 65536  # node-side session indices
    max_handles: int = 16384  # (node, device address) pairs
    lifetime: float = REJECT_AFTER_TIME  # without traffic, then forgotten


class _Handle:
    """A device as one node sees it: where it is now, until when it is known."""

    __slots__ = ("node", "addr", "expires")

    def __init__(self, node: bytes, addr: Any, expires: float) -> None:
        self.node = node
        self.addr = addr
        self.expires = expires


class DeviceRouter:
    """
    The relay's routing of plain WireGuard datagrams between devices and
    nodes: a plain object, time from the caller, no I/O.
    """

    def __init__(self, limits: DeviceLimits | None = None, secret: bytes | None = None) -> None:
        self.limits = limits or DeviceLimits()
        self._secret = secret if secret is not None else os.urandom(32)
        # node key -> its mac1 key, for every node devices may reach
        self._mac1_keys: dict[bytes, bytes] = {}
        # node-side session index -> the handle of the device that session is with
        self._flows: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._handles: collections.OrderedDict[bytes, _Handle] = collections.OrderedDict()
        self.counters: collections.Counter[str] = collections.Counter()

    # -- who may be reached -------------------------------------------------------

    def set_reachable(self, node_keys: Iterable[bytes]) -> None:
        """The nodes devices may reach: their mac1 keys are computed once, here."""
        keys = set(node_keys)
        known = self._mac1_keys
        self._mac1_keys = {key: known.get(key) or blake2s_hash(LABEL_MAC1, key)
                           for key in keys}
        for handle, entry in list(self._handles.items()):
            if entry.node not in keys:
                del self._handles[handle]

    def is_handle(self, key: bytes) -> bool:
        """Is C{key} (a SEND frame's destination) one of our device handles?"""
        return key in self._handles

    def __len__(self) -> int:
        return len(self._flows)

    # -- device to node -----------------------------------------------------------

    def from_device(self, datagram: bytes, addr: Any, now: float) -> tuple[bytes, bytes] | None:
        """
        Where a datagram that came from a device at C{addr} goes: (the node's
        key, the handle the node knows the device by), or None (dropped and
        counted).
        """
        size = len(datagram)
        if size < 4:
            self.counters["device_drop_malformed"] += 1
            return None
        (word,) = _WORD.unpack_from(datagram)
        if word == MESSAGE_TRANSPORT:
            if size < TRANSPORT_MIN_SIZE:
                self.counters["device_drop_malformed"] += 1
                return None
            return self._by_index(datagram, addr, now, follow=True)
        if word == MESSAGE_INITIATION:
            if size != INITIATION_SIZE:
                self.counters["device_drop_malformed"] += 1
                return None
            return self._initiation(datagram, addr, now)
        if word == MESSAGE_RESPONSE:
            if size != RESPONSE_SIZE:
                self.counters["device_drop_malformed"] += 1
                return None
            (_, _, receiver) = _RESPONSE_INDICES.unpack_from(datagram)
            return self._route(receiver, addr, now, follow=False)
        if word == MESSAGE_COOKIE_REPLY:
            if size != COOKIE_REPLY_SIZE:
                self.counters["device_drop_malformed"] += 1
                return None
            return self._by_index(datagram, addr, now, follow=False)
        self.counters["device_drop_malformed"] += 1
        return None

    def _initiation(self, datagram: bytes, addr: Any, now: float) -> tuple[bytes, bytes] | None:
        body = datagram[:INITIATION_MAC1]
        mac1 = datagram[INITIATION_MAC1 : INITIATION_MAC1 + MAC_LENGTH]
        self.counters["device_initiations"] += 1
        for node, key in self._mac1_keys.items():
            if hmac.compare_digest(hashlib.blake2s(body, digest_size=MAC_LENGTH,
                                                   key=key).digest(), mac1):
                return node, self._handle(node, addr, now)
        self.counters["device_drop_no_node"] += 1
        return None

    def _by_index(self, datagram: bytes, addr: Any, now: float,
                  follow: bool) -> tuple[bytes, bytes] | None:
        (_, receiver) = _TYPE_AND_INDEX.unpack_from(datagram)
        return self._route(receiver, addr, now, follow)

    def _route(self, index: int, addr: Any, now: float,
               follow: bool) -> tuple[bytes, bytes] | None:
        handle = self._flows.get(index)
        entry = self._handles.get(handle) if handle is not None else None
        if entry is None or entry.expires <= now:
            self.counters["device_drop_unknown_index"] += 1
            return None
        if entry.addr != addr:
            if not follow:
                # Only transport data moves a device: it is what a stock
                # client sends from its new address (and what WireGuard
                # authenticates); a stray handshake message does not.
                self.counters["device_drop_wrong_address"] += 1
                return None
            entry.addr = addr
            self.counters["device_rebound"] += 1
        entry.expires = now + self.limits.lifetime
        self._flows.move_to_end(index)
        return entry.node, handle  # type: ignore[return-value]

    def _handle(self, node: bytes, addr: Any, now: float) -> bytes:
        handle = hmac.new(self._secret, node + repr(addr).encode(), hashlib.blake2s).digest()
        entry = self._handles.get(handle)
        if entry is None:
            if len(self._handles) >= self.limits.max_handles:
                self._handles.popitem(last=False)
                self.counters["device_handle_evicted"] += 1
            entry = self._handles[handle] = _Handle(node, addr, now)
        entry.expires = now + self.limits.lifetime
        self._handles.move_to_end(handle)
        return handle

    # -- node to device -----------------------------------------------------------

    def from_node(self, node: bytes, handle: bytes, datagram: bytes, now: float) -> Any:
        """
        Where a node's datagram to the device it knows as C{handle} goes: the
        device's address, or None (dropped and counted).  The node's session
        indices are learned here.
        """
        entry = self._handles.get(handle)
        if entry is None or entry.expires <= now:
            self.counters["device_drop_unknown_handle"] += 1
            return None
        if entry.node != node:
            self.counters["device_drop_not_yours"] += 1
            return None
        size = len(datagram)
        if size < 4:
            self.counters["device_drop_malformed"] += 1
            return None
        (word,) = _WORD.unpack_from(datagram)
        if word in (MESSAGE_INITIATION, MESSAGE_RESPONSE):
            if size != (INITIATION_SIZE if word == MESSAGE_INITIATION else RESPONSE_SIZE):
                self.counters["device_drop_malformed"] += 1
                return None
            (_, sender) = _TYPE_AND_INDEX.unpack_from(datagram)
            self._learn(sender, handle)
        elif word == MESSAGE_TRANSPORT:
            if size < TRANSPORT_MIN_SIZE:
                self.counters["device_drop_malformed"] += 1
                return None
        elif word != MESSAGE_COOKIE_REPLY or size != COOKIE_REPLY_SIZE:
            self.counters["device_drop_malformed"] += 1
            return None
        entry.expires = now + self.limits.lifetime
        return entry.addr

    def _learn(self, index: int, handle: bytes) -> None:
        flows = self._flows
        if index in flows:
            flows.move_to_end(index)
        elif len(flows) >= self.limits.max_flows:
            flows.popitem(last=False)
            self.counters["device_index_evicted"] += 1
        flows[index] = handle

    # -- housekeeping -------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Forget handles past their lifetime, and the indices that led to them."""
        expired = {h for h, entry in self._handles.items() if entry.expires <= now}
        for handle in expired:
            del self._handles[handle]
        if expired:
            for index in [i for i, h in self._flows.items() if h in expired]:
                del self._flows[index]
            self.counters["device_expired"] += len(expired)

    def forget_node(self, node: bytes) -> None:
        """The node's session ended: its devices' handles and indices go."""
        gone = {h for h, entry in self._handles.items() if entry.node == node}
        for handle in gone:
            del self._handles[handle]
        if gone:
            for index in [i for i, h in self._flows.items() if h in gone]:
                del self._flows[index]
