"""
UDP endpoint discovery: "which address and port do you see me at?"

A node sends an authenticated request from its one data socket (so the
answer names the NAT mapping WireGuard's packets use); the rendezvous
answers with the address it observed, XOR-ed as STUN's XOR-MAPPED-ADDRESS
is so that NATs rewriting addresses inside payloads leave it alone, and
records it as the node's endpoint.  A second port answers the same way: a
NAT whose mapping differs between the two (endpoint-dependent mapping,
RFC 4787) needs a different traversal strategy.

Request (68 bytes)::

    0xF1 0 0 0 | node public key (32) | timestamp ms (8) | nonce (8) | MAC (16)

Response (35 bytes for IPv4, 47 for IPv6; never larger than a request, so
the port cannot be used to amplify floods)::

    0xF2 port-index 0 0 | nonce (8) | family 4|6 | port ^ 0x2112 (2)
        | address ^ (cookie + nonce + cookie) (4|16) | MAC (16)

Both MACs are keyed from X25519(node key, server key) (L{auth}).  The
timestamp must increase for each node, and be within C{MAX_SKEW} of the
server's clock while the server does not know the last one (after a
restart), so a captured request cannot be replayed to move a node's
endpoint.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistvpn.common import auth
from twistvpn.common.ratelimit import TokenBuckets
from twistvpn.interfaces import IDatagramHandler, IDatagramSender, INetworkController
from twistvpn.wire import DISCOVERY_REQUEST, DISCOVERY_RESPONSE
from twistvpn.wireguard.keys import public_key

# type, node key, timestamp (ms), nonce, the rendezvous's epoch
_REQUEST = struct.Struct("!B3x32sQ8s8s")
EPOCH_LENGTH = 8
REQUEST_LENGTH = _REQUEST.size + auth.MAC_LENGTH
_RESPONSE_HEAD = struct.Struct("!BB2x8sBH")
MAGIC_COOKIE = bytes.fromhex("2112a442")
MAX_SKEW = 120.0


class DiscoveryError(Exception):
    """No valid answer came back in time."""


def _unmapped(host: str) -> str:
    """A dual-stack socket's ::ffff:a.b.c.d is the IPv4 address a.b.c.d."""
    if host.startswith("::ffff:"):
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
        if mapped is not None:
            return str(mapped)
    return host


def _xor(data: bytes, pad: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, pad[: len(data)], strict=True))


def encode_request(
    node_private: bytes, server_public: bytes, timestamp_ms: int, nonce: bytes, epoch: bytes
) -> bytes:
    """
    A signed discovery request for the rendezvous process whose C{epoch} the
    node was told at registration: a request captured before a restart is
    refused after it, when the timestamps seen are forgotten.
    """
    head = _REQUEST.pack(DISCOVERY_REQUEST, public_key(node_private), timestamp_ms, nonce, epoch)
    key = auth.shared_key(node_private, server_public)
    return head + auth.mac(key, auth.LABEL_DISCOVERY_REQUEST, head)


def encode_response(key: bytes, which: int, nonce: bytes, addr: tuple[str, int]) -> bytes:
    """The rendezvous's answer naming C{addr}, MAC'd with the shared C{key}."""
    ip = ipaddress.ip_address(addr[0])
    pad = MAGIC_COOKIE + nonce + MAGIC_COOKIE
    head = _RESPONSE_HEAD.pack(DISCOVERY_RESPONSE, which, nonce, ip.version, addr[1] ^ 0x2112)
    head += _xor(ip.packed, pad)
    return head + auth.mac(key, auth.LABEL_DISCOVERY_RESPONSE, head)


def decode_response(key: bytes, data: bytes) -> tuple[int, bytes, tuple[str, int]]:
    """(port index, nonce, observed address) of a response; ValueError if bad."""
    if len(data) not in (_RESPONSE_HEAD.size + 4 + 16, _RESPONSE_HEAD.size + 16 + 16):
        raise ValueError("bad length")
    head, tag = data[: -auth.MAC_LENGTH], data[-auth.MAC_LENGTH :]
    if not auth.check(auth.mac(key, auth.LABEL_DISCOVERY_RESPONSE, head), tag):
        raise ValueError("bad MAC")
    _, which, nonce, family, xport = _RESPONSE_HEAD.unpack_from(head)
    raw = _xor(head[_RESPONSE_HEAD.size :], MAGIC_COOKIE + nonce + MAGIC_COOKIE)
    if (family, len(raw)) not in ((4, 4), (6, 16)):
        raise ValueError("bad family")
    return which, nonce, (str(ipaddress.ip_address(raw)), xport ^ 0x2112)


class DiscoveryState:
    """What both discovery ports share: keys, replay state, rate limits."""

    def __init__(
        self,
        controller: INetworkController,
        server_private: bytes,
        clock: IReactorTime,
        rate: float = 10.0,
        burst: float = 20.0,
        epoch: bytes | None = None,
    ) -> None:
        self.controller = controller
        # Per process: what nodes are told at registration and must echo.
        self.epoch = os.urandom(EPOCH_LENGTH) if epoch is None else epoch
        self.clock = clock
        self.keys = auth.SharedKeyCache(server_private)
        self.limits = TokenBuckets(clock, rate, burst)
        self.last_timestamp: dict[bytes, int] = {}
        self.counters: collections.Counter[str] = collections.Counter()


@implementer(IDatagramHandler)
class DiscoveryServer:
    """
    One discovery port's logic: verify, record, answer.  C{which} is 0 for
    the first port and 1 for the second.
    """

    def __init__(
        self, state: DiscoveryState, which: int, send: Callable[[bytes, Any], None],
        record: bool = True,
    ) -> None:
        self._state = state
        self._which = which
        self._send = send
        # The IPv6 ports answer without recording: a node's recorded
        # endpoints are its IPv4 ones, which peers punch.
        self._record = record

    def _drop(self, reason: str) -> None:
        self._state.counters[f"drop_{reason}"] += 1

    def datagram_received(self, data: bytes, addr: Any) -> None:
        state = self._state
        if not state.limits.allow(addr[0]):
            return self._drop("rate_limited")
        if len(data) != REQUEST_LENGTH or data[0] != DISCOVERY_REQUEST or any(data[1:4]):
            return self._drop("malformed")
        head, tag = data[: _REQUEST.size], data[_REQUEST.size :]
        _, node_key, timestamp, nonce, epoch = _REQUEST.unpack(head)
        if not state.controller.is_registered(node_key):
            return self._drop("unknown_node")
        try:
            key = state.keys.get(node_key)
        except auth.AuthError:
            return self._drop("bad_key")
        if not auth.check(auth.mac(key, auth.LABEL_DISCOVERY_REQUEST, head), tag):
            return self._drop("bad_mac")
        if not hmac.compare_digest(epoch, state.epoch):
            return self._drop("wrong_epoch")  # made for an earlier process: a replay
        last = state.last_timestamp.get(node_key)
        if last is None:
            if abs(timestamp / 1000 - state.clock.seconds()) > MAX_SKEW:
                return self._drop("stale")
        elif timestamp <= last:
            return self._drop("replay")
        state.last_timestamp[node_key] = timestamp
        host, port = _unmapped(addr[0]), addr[1]
        if self._record:
            state.controller.record_endpoint(node_key, (host, port), self._which)
        state.counters["answered"] += 1
        self._send(encode_response(key, self._which, nonce, (host, port)), addr)


class DiscoveryProtocol(DatagramProtocol):
    """The UDP adapter of a L{DiscoveryServer}."""

    noisy = False  # no "Starting protocol/factory" line per connection or port

    def __init__(self, state: DiscoveryState, which: int, record: bool = True) -> None:
        self.server = DiscoveryServer(state, which, self._write, record)

    def _write(self, data: bytes, addr: Any) -> None:
        if self.transport is None:
            self.server._drop("send_error")
            return
        try:
            self.transport.write(data, addr)
        except OSError:
            self.server._drop("send_error")

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.server.datagram_received(data, addr)


@dataclass(frozen=True)
class NetcheckResult:
    """What the node learned about its NAT from both discovery ports."""

    mapped: tuple[tuple[str, int] | None, ...]  # per port; None if no answer

    @property
    def endpoint(self) -> tuple[str, int] | None:
        """The address peers reach this socket at (from the first answer)."""
        return next((m for m in self.mapped if m is not None), None)

    @property
    def varies_by_destination(self) -> bool | None:
        """True for an endpoint-dependent mapping; None if unknown."""
        if len(self.mapped) < 2 or None in self.mapped:
            return None
        return len(set(self.mapped)) > 1


@implementer(IDatagramHandler)
class DiscoveryClient:
    """
    The node's side: register on the L{Forwarder} for C{DISCOVERY_RESPONSE}
    and send requests through it, from the same socket as WireGuard::

        discovery = DiscoveryClient(forwarder, reactor, private_key, server_key,
                                    [(host, 3478), (host, 3479)], epoch=client.discovery_epoch)
        forwarder.register_handler(wire.DISCOVERY_RESPONSE, discovery)
        result = await discovery.netcheck()
    """

    log = Logger()

    def __init__(
        self,
        sender: IDatagramSender,
        clock: IReactorTime,
        private_key: bytes,
        server_key: bytes,
        servers: list[tuple[str, int]],
        *,
        epoch: bytes,
        timeout: float = 1.0,
        attempts: int = 3,
    ) -> None:
        self.epoch = epoch
        self._sender = sender
        self._clock = clock
        self._private = private_key
        self._server_key = server_key
        self._key = auth.shared_key(private_key, server_key)
        self.servers = list(servers)
        self._timeout = timeout
        self._attempts = attempts
        self._pending: dict[bytes, tuple[defer.Deferred[Any], IDelayedCall | None]] = {}
        self._last_timestamp = 0
        self.counters: collections.Counter[str] = collections.Counter()
        self.last_result: NetcheckResult | None = None
        self._periodic: IDelayedCall | None = None
        self._stopped = False

    def _timestamp_ms(self) -> int:
        # Strictly increasing, even if the clock stands still or steps back.
        ts = max(int(self._clock.seconds() * 1000), self._last_timestamp + 1)
        self._last_timestamp = ts
        return ts

    def query(self, which: int = 0) -> defer.Deferred[tuple[str, int]]:
        """
        The address discovery port C{which} sees this socket at; retries
        C{attempts} times, each after C{timeout} seconds, then fails with
        L{DiscoveryError}.
        """
        result: defer.Deferred[tuple[str, int]] = defer.Deferred()
        self._attempt(result, which, self._attempts)
        return result

    def _attempt(self, result: defer.Deferred[Any], which: int, left: int) -> None:
        if left <= 0:
            self.counters["timeouts"] += 1
            result.errback(DiscoveryError(f"no answer from {self.servers[which]}"))
            return
        nonce = os.urandom(8)
        request = encode_request(self._private, self._server_key, self._timestamp_ms(), nonce,
                                 self.epoch)

        def expired() -> None:
            self._pending.pop(nonce, None)
            self._attempt(result, which, left - 1)

        call = self._clock.callLater(self._timeout, expired)
        self._pending[nonce] = (result, call)
        self.counters["requests"] += 1
        self._sender.send_datagram(request, self.servers[which])

    def netcheck(self) -> defer.Deferred[NetcheckResult]:
        """Ask every discovery port at once; never fails (None for silence)."""

        def silent(failure: Failure) -> None:
            failure.trap(DiscoveryError)
            return None

        queries = [self.query(i).addErrback(silent) for i in range(len(self.servers))]

        def done(mapped: list[tuple[str, int] | None]) -> NetcheckResult:
            self.last_result = NetcheckResult(tuple(mapped))
            return self.last_result

        return defer.gatherResults(queries).addCallback(done)

    def start(self, interval: float, on_result: Callable[[NetcheckResult], object]) -> None:
        """Run L{netcheck} now and every C{interval} seconds (keeps the NAT mapping)."""

        def run() -> None:
            self._periodic = None
            d = self.netcheck()
            d.addCallback(lambda result: None if self._stopped else on_result(result))
            d.addErrback(lambda f: self.log.failure("netcheck result handler", f))
            d.addBoth(lambda _: self._reschedule(interval, run))

        run()

    def _reschedule(self, interval: float, run: Callable[[], None]) -> None:
        if self._periodic is None and not self._stopped:
            self._periodic = self._clock.callLater(interval, run)

    def stop(self) -> None:
        """Stop periodic checks and fail outstanding queries."""
        self._stopped = True
        if self._periodic is not None and self._periodic.active():
            self._periodic.cancel()
        self._periodic = None
        pending, self._pending = self._pending, {}
        for result, call in pending.values():
            if call is not None and call.active():
                call.cancel()
            result.errback(DiscoveryError("stopped"))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if (addr[0], addr[1]) not in self.servers:
            self.counters["drop_unknown_source"] += 1
            return
        try:
            which, nonce, mapped = decode_response(self._key, data)
        except ValueError:
            self.counters["drop_malformed"] += 1
            return
        entry = self._pending.pop(nonce, None)
        if entry is None:
            self.counters["drop_unexpected"] += 1
            return
        result, call = entry
        if call is not None and call.active():
            call.cancel()
        self.counters["responses"] += 1
        result.callback(mapped)
