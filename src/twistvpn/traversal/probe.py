"""
Authenticated path probes (message types C{PROBE} and C{PROBE_REPLY}).

A probe proves that a datagram sent to an endpoint reaches the peer and that
the peer's answer comes back from it: that is what "a verified path" means.
Both messages carry a MAC under a key only the two peers can derive
(X25519 of one's static private key and the other's static public key,
through keyed BLAKE2s with a label), a random transaction id and a
timestamp.  A probe outside the clock-skew window or seen before is a
replay; a reply must answer a probe we sent, to the endpoint it came back
from, on the socket it left from.  Anything else is dropped and counted, so
a third party can neither inject nor redirect a path.

Wire format (network byte order)::

    type(1) 0(3) sender_id(8) txid(8) timestamp(f64) body mac(16)
    PROBE body:       tag_len(1) tag         (the strategy's name)
    PROBE_REPLY body: host_len(1) host port(2) (where the probe came from)
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from nacl.bindings import crypto_scalarmult
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from twistvpn.common.hoplimit import write_hop_limited
from twistvpn.interfaces import IDatagramHandler, IDatagramSender
from twistvpn.traversal.candidates import ReactorUDP
from twistvpn.wire import PROBE, PROBE_REPLY

MAC_LENGTH = 16
ID_LENGTH = 8
_HEADER = struct.Struct("!B3x8s8sd")
_LABEL = b"twistvpn traversal probe v1"
MAX_TAG = 32


class ProbeError(ValueError):
    """A datagram is not a well-formed probe."""


def peer_id(public_key: bytes) -> bytes:
    """The short name of a static key inside probes."""
    return hashlib.blake2s(public_key, digest_size=ID_LENGTH, person=b"twvpn-id").digest()


def probe_key(private_key: bytes, local_public: bytes, peer_public: bytes) -> bytes:
    """
    The MAC key two peers share: keyed BLAKE2s of both public keys (in a
    fixed order) under their X25519 shared secret.
    """
    try:
        shared = crypto_scalarmult(private_key, peer_public)
    except Exception as e:  # libsodium refuses low-order points
        raise ValueError(f"unusable peer public key: {e}") from None
    low, high = sorted((local_public, peer_public))
    return hashlib.blake2s(_LABEL + low + high, key=shared, digest_size=32).digest()


def _mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=MAC_LENGTH).digest()


def _short(value: bytes) -> bytes:
    if len(value) > 255:
        raise ProbeError("field too long")
    return bytes([len(value)]) + value


def encode_probe(key: bytes, sender: bytes, txid: bytes, timestamp: float, tag: str) -> bytes:
    tag_bytes = tag.encode("utf-8")[:MAX_TAG]
    body = _HEADER.pack(PROBE, sender, txid, timestamp) + _short(tag_bytes)
    return body + _mac(key, body)


def encode_reply(key: bytes, sender: bytes, txid: bytes, timestamp: float,
                 observed: tuple[str, int]) -> bytes:
    body = (_HEADER.pack(PROBE_REPLY, sender, txid, timestamp)
            + _short(str(observed[0]).encode("ascii")) + struct.pack("!H", observed[1]))
    return body + _mac(key, body)


@dataclass(frozen=True)
class Message:
    kind: int
    sender: bytes
    txid: bytes
    timestamp: float
    tag: str = ""
    observed: tuple[str, int] | None = None
    signed: bytes = b""
    mac: bytes = b""


def decode(data: bytes) -> Message:
    """Parse a probe or reply without checking its MAC."""
    if len(data) < _HEADER.size + 1 + MAC_LENGTH:
        raise ProbeError("too short")
    kind, sender, txid, timestamp = _HEADER.unpack_from(data)
    if data[1:4] != b"\0\0\0":
        raise ProbeError("reserved bytes are not zero")
    signed, mac = data[:-MAC_LENGTH], data[-MAC_LENGTH:]
    offset = _HEADER.size
    length = signed[offset]
    field = signed[offset + 1:offset + 1 + length]
    if len(field) != length:
        raise ProbeError("truncated field")
    rest = signed[offset + 1 + length:]
    try:
        if kind == PROBE:
            if rest:
                raise ProbeError("trailing bytes")
            return Message(kind, sender, txid, timestamp, tag=field.decode("utf-8"),
                           signed=signed, mac=mac)
        if kind == PROBE_REPLY:
            if len(rest) != 2:
                raise ProbeError("bad observed port")
            (port,) = struct.unpack("!H", rest)
            return Message(kind, sender, txid, timestamp,
                           observed=(field.decode("ascii"), port), signed=signed, mac=mac)
    except UnicodeDecodeError:
        raise ProbeError("bad text field") from None
    raise ProbeError(f"not a probe type: {kind}")


@dataclass(frozen=True)
class BoundEndpoint:
    """
    A peer address reached from one of the extra sockets a strategy opened,
    rather than from the node's main socket.  The forwarder routes it
    through L{SocketPool}.
    """

    socket: int  # the extra socket's local port
    host: str
    port: int

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port} (via local port {self.socket})"


def address_of(endpoint: Any) -> Any:
    """The remote (host, port) of an endpoint, whichever socket reaches it."""
    return endpoint.addr if isinstance(endpoint, BoundEndpoint) else endpoint


class _ExtraSocket(DatagramProtocol):
    """Feeds an extra socket's datagrams to the forwarder, named by socket."""

    noisy = False  # no "Starting protocol/factory" line per connection or port

    def __init__(self, pool: SocketPool) -> None:
        self.pool = pool
        self.local_port = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.pool.forwarder.dispatch(data, BoundEndpoint(self.local_port, addr[0], addr[1]))


class SocketPool:
    """
    Extra UDP sockets beside the node's main one, reference counted: a
    strategy holds them while it runs, a verified path while it is kept.
    """

    def __init__(self, reactor: ReactorUDP, forwarder: IDatagramSender) -> None:
        self.reactor = reactor
        self.forwarder = forwarder
        self._ports: dict[int, Any] = {}
        self._refs: collections.Counter[int] = collections.Counter()
        self.counters: collections.Counter[str] = collections.Counter()
        forwarder.register_route(BoundEndpoint, self.send)

    def open(self) -> int:
        protocol = _ExtraSocket(self)
        port = self.reactor.listenUDP(0, protocol)
        local = port.getHost().port
        protocol.local_port = local
        self._ports[local] = port
        self._refs[local] = 1
        return local

    def retain(self, local: int) -> None:
        if local in self._ports:
            self._refs[local] += 1

    def release(self, local: int) -> None:
        if local not in self._ports:
            return
        self._refs[local] -= 1
        if self._refs[local] <= 0:
            del self._refs[local]
            self._ports.pop(local).stopListening()

    def __len__(self) -> int:
        return len(self._ports)

    def send(self, data: bytes, endpoint: BoundEndpoint, hop_limit: int | None = None) -> None:
        port = self._ports.get(endpoint.socket)
        if port is None:
            self.counters["drop_socket_closed"] += 1
            return
        try:
            if hop_limit is None:
                port.write(data, endpoint.addr)
            elif not write_hop_limited(port, data, endpoint.addr, hop_limit):
                self.counters["hop_limit_unsupported"] += 1
        except OSError:
            self.counters["drop_send_error"] += 1


class ProbeListener(Protocol):
    """What the probe service tells about one peer (the path manager)."""

    def path_verified(self, endpoint: Any, rtt: float, tag: str) -> None: ...
    def probe_received(self, endpoint: Any, tag: str) -> None: ...


@dataclass
class _Peer:
    public_key: bytes
    key: bytes
    listener: ProbeListener


@dataclass
class _Pending:
    peer: _Peer
    endpoint: Any
    sent_at: float
    tag: str
    on_reply: Callable[[Any, float], None] | None


@implementer(IDatagramHandler)
class ProbeService:
    """
    Sends and answers probes for every peer of a node; reports verified
    paths and the peer's probes to each peer's listener.
    """

    def __init__(self, forwarder: IDatagramSender, reactor: ReactorUDP, private_key: bytes,
                 public_key: bytes, *, max_skew: float = 120.0, reply_window: float = 10.0,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 sockets: SocketPool | None = None) -> None:
        self.forwarder = forwarder
        self.clock = reactor
        self.sockets = sockets if sockets is not None else SocketPool(reactor, forwarder)
        self._private = private_key
        self.public_key = public_key
        self._id = peer_id(public_key)
        self._peers: dict[bytes, _Peer] = {}
        # Asked about probes from members with no peer here (IPeerDemand).
        self.demand: Any = None
        self._pending: collections.OrderedDict[bytes, _Pending] = collections.OrderedDict()
        self._seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self.max_skew = max_skew
        self.reply_window = reply_window
        self.random_bytes = random_bytes
        self.counters: collections.Counter[str] = collections.Counter()
        forwarder.register_handler(PROBE, self)
        forwarder.register_handler(PROBE_REPLY, self)

    # -- peers ----------------------------------------------------------------

    def add_peer(self, public_key: bytes, listener: ProbeListener) -> None:
        key = probe_key(self._private, self.public_key, public_key)
        self._peers[peer_id(public_key)] = _Peer(public_key, key, listener)

    def remove_peer(self, public_key: bytes) -> None:
        self._peers.pop(peer_id(public_key), None)

    # -- sending --------------------------------------------------------------

    def send_probe(self, peer_key: bytes, endpoint: Any, tag: str,
                   on_reply: Callable[[Any, float], None] | None = None,
                   hop_limit: int | None = None) -> None:
        """
        Probe C{endpoint}; a valid answer calls the peer's listener's
        C{path_verified} (and C{on_reply(endpoint, rtt)} if given).  With
        C{hop_limit}, an opener: sent with that IP time to live.
        """
        peer = self._peers.get(peer_id(peer_key))
        if peer is None:
            raise KeyError("probe to an unknown peer")
        now = self.clock.seconds()
        self._expire(now)
        txid = self.random_bytes(8)
        self._pending[txid] = _Pending(peer, endpoint, now, tag, on_reply)
        data = encode_probe(peer.key, self._id, txid, now, tag)
        if hop_limit is None:
            self.counters["probe_sent"] += 1
            self.forwarder.send_datagram(data, endpoint)
            return
        self.counters["opener_sent"] += 1
        if isinstance(endpoint, BoundEndpoint):
            self.sockets.send(data, endpoint, hop_limit)
        else:
            self.forwarder.send_hop_limited(data, endpoint, hop_limit)

    def _expire(self, now: float) -> None:
        pending = self._pending
        while pending:
            txid, first = next(iter(pending.items()))
            if now - first.sent_at < self.reply_window:
                break
            del pending[txid]
        seen = self._seen
        while seen:
            txid, when = next(iter(seen.items()))
            if now - when < 2 * self.max_skew:
                break
            del seen[txid]

    # -- receiving ------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            message = decode(data)
        except (ProbeError, struct.error, IndexError):
            self.counters["drop_malformed"] += 1
            return
        peer = self._peers.get(message.sender)
        if peer is None:
            peer = self._demanded(message)  # (counting its drops)
            if peer is None:
                return
        elif not hmac.compare_digest(_mac(peer.key, message.signed), message.mac):
            self.counters["drop_unauthenticated"] += 1
            return
        now = self.clock.seconds()
        if message.kind == PROBE:
            self._probe(peer, message, addr, now)
        else:
            self._reply(peer, message, addr, now)

    def _demanded(self, message: Message) -> _Peer | None:
        """
        A probe from a member we keep no peer for (a big network's lazy
        peers): its MAC checked first, then the node makes the peer.
        """
        demand = self.demand
        public_key = None
        if demand is not None and message.kind == PROBE:
            public_key = demand.key_for_probe_id(message.sender)
        if public_key is None:
            self.counters["drop_unknown_peer"] += 1
            return None
        key = probe_key(self._private, self.public_key, public_key)
        if not hmac.compare_digest(_mac(key, message.signed), message.mac):
            self.counters["drop_unauthenticated"] += 1
            return None
        if not demand.peer_for_key(public_key):
            self.counters["drop_unknown_peer"] += 1
            return None
        self.counters["peer_demanded"] += 1
        return self._peers.get(message.sender)

    def _probe(self, peer: _Peer, message: Message, addr: Any, now: float) -> None:
        if abs(now - message.timestamp) > self.max_skew:
            self.counters["drop_stale"] += 1
            return
        self._expire(now)
        seen_key = message.sender + message.txid
        if seen_key in self._seen:
            self.counters["drop_replay"] += 1
            return
        self._seen[seen_key] = now
        self.counters["probe_received"] += 1
        observed = address_of(addr)
        if type(observed) is not tuple:
            # Through a relay: there is no address to report, only the answer.
            observed = ("", 0)
        reply = encode_reply(peer.key, self._id, message.txid, now, observed)
        self.counters["reply_sent"] += 1
        self.forwarder.send_datagram(reply, addr)
        peer.listener.probe_received(addr, message.tag)

    def _reply(self, peer: _Peer, message: Message, addr: Any, now: float) -> None:
        pending = self._pending.get(message.txid)
        if pending is None:
            self.counters["drop_unexpected_reply"] += 1
            return
        if pending.peer is not peer or pending.endpoint != addr:
            self.counters["drop_redirected"] += 1
            return
        del self._pending[message.txid]
        rtt = max(0.0, now - pending.sent_at)
        self.counters["reply_received"] += 1
        if pending.on_reply is not None:
            pending.on_reply(addr, rtt)
        peer.listener.path_verified(addr, rtt, pending.tag)
