"""
The relay: forwards WireGuard datagrams between nodes that have no direct
path, addressed by node public key.

L{RelayServer} is a plain object.  Time comes from an injected clock, UDP
leaves through an injected C{write(data, addr)}, and a TCP (TLS) connection
is a L{StreamConnection} its thin Twisted adapter
(L{twistvpn.relay.transport}) feeds with frames.  The relay never holds a
key that decrypts what it carries: it authenticates a node by proof of
possession of its public key and asks an L{IRelayPolicy} whether two nodes
share an authorized network.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twistvpn.common.auth import SharedKeyCache
from twistvpn.common.metrics import Family
from twistvpn.common.ratelimit import TokenBucket, TokenBuckets
from twistvpn.interfaces import IRelayPolicy
from twistvpn.relay import protocol as p
from twistvpn.relay.devices import DeviceRouter
from twistvpn.wire import WIREGUARD_TYPES
from twistvpn.wireguard.keys import encode_key

_COOKIE_TIME = struct.Struct(">Q")
_RECV_HEADER = p.header(p.RECV)
_UNKNOWN_SESSION = p.refused(p.REFUSED_UNKNOWN_SESSION)
COOKIE_LIFETIME = 30.0
# At most one REBIND a second to a session's unbound sender: no amplification.
REBIND_HINT_INTERVAL = 1.0


@dataclass
class RelayLimits:
    """The bounds that keep a relay's memory and bandwidth in check."""

    node_rate: float = 12_500_000.0  # bytes/s a node may send (100 Mbit/s)
    node_burst: float = 1_000_000.0
    global_rate: float = 125_000_000.0  # bytes/s for the whole relay (1 Gbit/s)
    global_burst: float = 4_000_000.0
    queue_frames: int = 512  # frames waiting for one node's TCP connection
    queue_bytes: int = 1 << 20
    pending_frames: int = 16  # frames of one node waiting for an authorization answer
    max_sessions: int = 100_000
    idle_timeout: float = 90.0  # a session with no frame for this long is closed
    auth_timeout: float = 10.0  # a TCP connection must register within this
    allow_ttl: float = 60.0  # re-ask the policy about an allowed pair this often
    deny_ttl: float = 5.0  # and about a refused pair this often
    sweep_interval: float = 2.0
    auth_rate: float = 1000.0  # registrations checked per second, for the whole relay
    # ...and per source address, so that one source cannot spend them all.
    auth_rate_per_source: float = 10.0
    # Handshake initiations a device's address may send per second: each
    # costs a mac1 try per reachable node (WireGuard itself sends one per
    # 5 s; a flood with valid mac1 then meets the node's cookies).
    device_initiation_rate: float = 10.0


class Traffic:
    """The per-datagram counters, as slots: cheaper than a Counter's items."""

    __slots__ = ("bytes_in", "packets_in", "bytes_out", "packets_out",
                 "relayed_packets", "relayed_bytes")
    bytes_in: int
    packets_in: int
    bytes_out: int
    packets_out: int
    relayed_packets: int
    relayed_bytes: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Session:
    """One registered node: its key, its token and how to reach it."""

    kind = ""

    def __init__(self, key: bytes, token: bytes, bucket: TokenBucket, now: float) -> None:
        self.key = key
        self.token = token
        self.bucket = bucket
        self.last_seen = now
        # dst key -> clock time until which relaying to it is allowed
        self.allowed: dict[bytes, float] = {}
        self.denied: dict[bytes, float] = {}
        self.asking: set[bytes] = set()
        self.pending: list[bytes] = []
        # The key this session's rebinding PINGs are tagged with (protocol.session_key).
        self.session_key = b""
        self.rebind_hinted = float("-inf")

    def deliver(self, frame: bytes) -> bool:
        """Send C{frame} to the node; False when it was dropped."""
        raise NotImplementedError

    def close(self) -> None:
        """End the session's transport, if it has its own."""


class UDPSession(Session):
    kind = "udp"

    def __init__(self, key: bytes, token: bytes, bucket: TokenBucket, now: float,
                 addr: Any, write: Callable[[bytes, Any], None]) -> None:
        super().__init__(key, token, bucket, now)
        self.addr = addr
        self._write = write

    def deliver(self, frame: bytes) -> bool:
        self._write(frame, self.addr)
        return True


class StreamSession(Session):
    kind = "tcp"

    def __init__(self, key: bytes, token: bytes, bucket: TokenBucket, now: float,
                 connection: StreamConnection) -> None:
        super().__init__(key, token, bucket, now)
        self.connection = connection

    def deliver(self, frame: bytes) -> bool:
        return self.connection.write_frame(frame)

    def close(self) -> None:
        self.connection.close()


class StreamConnection:
    """
    One TCP (TLS) connection as the relay sees it: frames in, frames out,
    and a bounded queue for while the transport asks us to pause.
    """

    def __init__(self, server: RelayServer, write: Callable[[bytes], None],
                 lose: Callable[[], None], now: float, peer: str | None = None) -> None:
        self.server = server
        self.peer = peer  # the source address, for per-source budgets
        self._write = write
        self._lose = lose
        self.opened = now
        self.challenge: bytes | None = None
        self.session: StreamSession | None = None
        self.closed = False
        self.paused = False
        self.queue: collections.deque[bytes] = collections.deque()
        self.queued_bytes = 0

    def write_frame(self, frame: bytes) -> bool:
        if self.closed:
            return False
        if not self.paused:
            self._write(p.frame_for_stream(frame))
            return True
        limits = self.server.limits
        if len(self.queue) >= limits.queue_frames or (
            self.queued_bytes + len(frame) > limits.queue_bytes
        ):
            self.server.drop("queue_full")
            return False
        self.queue.append(frame)
        self.queued_bytes += len(frame)
        return True

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        while self.queue and not self.paused and not self.closed:
            frame = self.queue.popleft()
            self.queued_bytes -= len(frame)
            self._write(p.frame_for_stream(frame))

    def frame_received(self, frame: bytes) -> None:
        """One frame from the stream; malformed frames end this connection."""
        self.server.stream_frame_received(self, frame)

    def stream_malformed(self) -> None:
        """The stream's framing itself was broken."""
        self.server.count_malformed("tcp")
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.clear()
            self.queued_bytes = 0
            self._lose()

    def connection_lost(self) -> None:
        self.closed = True
        self.queue.clear()
        self.server.stream_closed(self)


class RelayServer:
    """
    The relay's state: sessions by node key and by token, the policy's
    cached answers, rate limits and counters.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, private_key: bytes, public_key: bytes,
                 policy: IRelayPolicy, limits: RelayLimits | None = None,
                 relay_id: str = "relay") -> None:
        self.clock = clock
        self.relay_id = relay_id
        self.private_key = private_key
        self.public_key = public_key
        self.policy = policy
        self.limits = limits or RelayLimits()
        self.counters: collections.Counter[str] = collections.Counter()
        self.traffic = Traffic()
        self._secret = os.urandom(32)
        self._by_key: dict[bytes, Session] = {}
        self._by_token: dict[bytes, UDPSession] = {}
        self._streams: set[StreamConnection] = set()
        self._used_cookies: dict[bytes, float] = {}
        self._udp_write: Callable[[bytes, Any], None] | None = None
        now = clock.seconds()
        self._global = TokenBucket(self.limits.global_rate, self.limits.global_burst, now)
        # Registrations cost a Diffie-Hellman each: bound them, and cache
        # the shared keys of nodes seen recently.
        self._auth_bucket = TokenBucket(self.limits.auth_rate, self.limits.auth_rate * 2, now)
        rate = self.limits.auth_rate_per_source
        self._auth_by_source = TokenBuckets(clock, rate, max(1.0, rate * 2))
        self._shared_keys = SharedKeyCache(private_key)
        # Stock WireGuard devices (docs/devices.md): their plain datagrams
        # on our UDP port, routed to nodes by mac1 and session index.
        self.devices = DeviceRouter(secret=self._secret)
        self._device_initiations = TokenBuckets(clock, self.limits.device_initiation_rate,
                                                self.limits.device_initiation_rate * 2)
        # A device's bytes, by its address: the budget a node's session has.
        self._device_bytes = TokenBuckets(clock, self.limits.node_rate, self.limits.node_burst)
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = clock

    # -- life -------------------------------------------------------------------

    def start(self) -> None:
        self.policy.add_revocation_observer(self.revoked)
        self._sweeper.start(self.limits.sweep_interval, now=False)
        self.refresh_devices()

    def stop(self) -> None:
        self.policy.remove_revocation_observer(self.revoked)
        if self._sweeper.running:
            self._sweeper.stop()
        for session in list(self._by_key.values()):
            self._end(session)
        for stream in list(self._streams):
            stream.close()

    def attach_udp(self, write: Callable[[bytes, Any], None]) -> None:
        """Send UDP frames with C{write(frame, addr)} from now on."""
        self._udp_write = write

    # -- counters -----------------------------------------------------------------

    def drop(self, reason: str) -> None:
        self.counters["drop_" + reason] += 1

    def count_malformed(self, transport: str) -> None:
        self.counters["drop_malformed"] += 1
        self.counters["malformed_" + transport] += 1

    def stats(self) -> dict[str, Any]:
        """The counters and gauges, for the admin API (JSON-serialisable)."""
        sessions = collections.Counter(s.kind for s in self._by_key.values())
        return {
            "relay_id": self.relay_id,
            "public_key": encode_key(self.public_key),
            "sessions_udp": sessions["udp"],
            "sessions_tcp": sessions["tcp"],
            "tcp_connections": len(self._streams),
            "device_flows": len(self.devices),
            "counters": dict(sorted({**self.counters, **self.devices.counters,
                                     **self.traffic.as_dict()}.items())),
        }

    def metrics(self) -> list[Family]:
        """Prometheus families: sessions by path, traffic, and every drop by reason."""
        stats = self.stats()
        relay = (self.relay_id,)
        sessions = Family("twistvpn_relay_sessions", "gauge", "Registered nodes, by path.",
                          ("relay", "path"))
        sessions.add(stats["sessions_udp"], *relay, "udp")
        sessions.add(stats["sessions_tcp"], *relay, "tcp")
        drops = Family("twistvpn_relay_drops", "counter", "Frames dropped, by reason.",
                       ("relay", "reason"))
        events = Family("twistvpn_relay_events", "counter",
                        "Registrations, rebinds, traffic and other events.", ("relay", "event"))
        for name, value in stats["counters"].items():
            if name.startswith("drop_"):
                drops.add(value, *relay, name[len("drop_"):])
            else:
                events.add(value, *relay, name)
        connections = Family("twistvpn_relay_tcp_connections", "gauge",
                             "Open TLS connections.", ("relay",)).add(stats["tcp_connections"],
                                                                     *relay)
        return [sessions, connections, drops, events]

    def session(self, key: bytes) -> Session | None:
        return self._by_key.get(key)

    # -- UDP ------------------------------------------------------------------------

    def udp_received(self, frame: bytes, addr: Any) -> None:
        """One datagram from the relay's UDP socket.  Never raises."""
        now = self.clock.seconds()
        traffic = self.traffic
        traffic.bytes_in += len(frame)
        traffic.packets_in += 1
        # The hot path first: a SEND from a registered node.
        if len(frame) >= p.SEND_PAYLOAD + 1 and frame[1] == p.SEND and frame[0] == 0xF5:
            session = self._by_token.get(frame[2 : 2 + p.TOKEN])
            if session is None:
                # The relay restarted or ended the session: say so, so that
                # the node registers again now rather than at its next
                # keepalive.  Three bytes for at least 43: no amplification.
                self.drop("unknown_token")
                self._udp_out(_UNKNOWN_SESSION, addr)
                return
            if session.addr != addr:
                # The token travels in clear: it proves nothing.  A node
                # whose NAT moved proves its session key in a PING first.
                self.drop("udp_unbound_addr")
                if now - session.rebind_hinted >= REBIND_HINT_INTERVAL:
                    session.rebind_hinted = now
                    self._udp_out(p.rebind(), addr)
                return
            session.last_seen = now
            self._relay(session, frame, now)
            return
        if frame and frame[0] in WIREGUARD_TYPES:
            self._from_device(frame, addr, now)
            return
        try:
            kind = p.frame_kind(frame)
        except p.MalformedFrameError:
            self.count_malformed("udp")
            return
        if kind == p.HELLO:
            self._udp_out(p.challenge(self._cookie(frame[2:], addr, now)), addr)
        elif kind == p.AUTH:
            self._udp_auth(frame, addr, now)
        elif kind == p.PING:
            token = frame[2 + p.NONCE : 2 + p.NONCE + p.TOKEN]
            session = self._by_token.get(token) if token else None
            if session is not None and not p.ping_tag_valid(session.session_key, frame):
                self.drop("bad_ping_tag")
                session = None
            if session is not None:
                session.last_seen = now
                if session.addr != addr:
                    # NAT rebinding, proven with the session key.
                    session.addr = addr
                    self.counters["udp_rebind"] += 1
            self._udp_out(p.pong(frame[2 : 2 + p.NONCE], session is not None), addr)
        elif kind == p.BYE:
            session = self._by_token.get(frame[2:])
            if session is None or session.addr != addr:
                self.drop("bye_unknown")  # unknown token, or not from the session's address
            else:
                self._end(session)
        else:
            # A well-formed frame that only the relay sends.
            self.count_malformed("udp")

    # -- stock WireGuard devices ----------------------------------------------------

    def refresh_devices(self) -> None:
        """The nodes devices may reach: the policy's, of those registered here."""
        reachable = self.policy.device_reachable()
        self.devices.set_reachable(k for k in reachable if k in self._by_key)

    def _from_device(self, datagram: bytes, addr: Any, now: float) -> None:
        """A plain WireGuard datagram from a device: to its node, as RECV."""
        if datagram[0] == 1 and not self._device_initiations.allow(addr[0]):
            self.drop("rate_device_source")
            return
        if not self._device_bytes.allow(addr[0], len(datagram)):
            self.drop("rate_device")
            return
        route = self.devices.from_device(datagram, addr, now)
        if route is None:
            return  # counted by the router
        node, handle = route
        target = self._by_key.get(node)
        if target is None:
            self.drop("device_no_session")
            return
        if not self._global.take(len(datagram), now):
            self.drop("rate_global")
            return
        out = b"".join((_RECV_HEADER, handle, datagram))
        if target.deliver(out):
            traffic = self.traffic
            traffic.relayed_packets += 1
            traffic.relayed_bytes += len(datagram)
            traffic.bytes_out += len(out)
            traffic.packets_out += 1

    def _to_device(self, session: Session, handle: bytes, frame: bytes, now: float) -> None:
        """A node's SEND to a device's handle: the plain datagram to the device."""
        datagram = bytes(memoryview(frame)[p.SEND_PAYLOAD :])
        addr = self.devices.from_node(session.key, handle, datagram, now)
        if addr is None:
            return  # counted by the router
        self.traffic.relayed_packets += 1
        self.traffic.relayed_bytes += len(datagram)
        self._udp_out(datagram, addr)

    def _udp_out(self, frame: bytes, addr: Any) -> None:
        if self._udp_write is None:
            self.drop("no_udp")
            return
        self.traffic.bytes_out += len(frame)
        self.traffic.packets_out += 1
        self._udp_write(frame, addr)

    def _cookie(self, node_key: bytes, addr: Any, now: float) -> bytes:
        """A stateless challenge bound to the node key, its address and the time."""
        stamp = _COOKIE_TIME.pack(int(now))
        return stamp + self._cookie_tag(stamp, node_key, addr)

    def _cookie_tag(self, stamp: bytes, node_key: bytes, addr: Any) -> bytes:
        msg = stamp + node_key + repr(addr).encode()
        return hmac.new(self._secret, msg, hashlib.sha256).digest()[: p.CHALLENGE_LENGTH - 8]

    def _cookie_valid(self, cookie: bytes, node_key: bytes, addr: Any, now: float) -> bool:
        stamp = cookie[:8]
        (issued,) = _COOKIE_TIME.unpack(stamp)
        if not 0 <= now - issued <= COOKIE_LIFETIME:
            return False
        if cookie in self._used_cookies:
            return False
        return hmac.compare_digest(cookie[8:], self._cookie_tag(stamp, node_key, addr))

    def _udp_auth(self, frame: bytes, addr: Any, now: float) -> None:
        node_key, cookie, proof = self._split_auth(frame)
        if not self._cookie_valid(cookie, node_key, addr, now):
            self.drop("bad_challenge")
            return
        if not self._may_check_proof(addr[0], now):
            return
        if not p.proof_is_valid(self._shared_keys, self.public_key, node_key, cookie, proof):
            self.drop("bad_proof")
            self._udp_out(p.refused(p.REFUSED_BAD_PROOF), addr)
            return
        self._used_cookies[cookie] = now
        write = self._udp_write
        assert write is not None

        def make(token: bytes, bucket: TokenBucket) -> Session:
            return UDPSession(node_key, token, bucket, self.clock.seconds(), addr, write)

        self._register(node_key, make, lambda frame: self._udp_out(frame, addr))

    def _may_check_proof(self, source: Any, now: float) -> bool:
        """
        Whether to spend a Diffie-Hellman on a proof from C{source}: its own
        budget first, so that one source (with junk proofs on challenges it
        asked for itself) cannot use up everyone's, then the relay's.
        """
        if not self._auth_by_source.allow(source):
            self.drop("rate_auth_source")
            return False
        if not self._auth_bucket.take(1, now):
            self.drop("rate_auth")
            return False
        return True

    @staticmethod
    def _split_auth(frame: bytes) -> tuple[bytes, bytes, bytes]:
        key_end = 2 + p.KEY
        cookie_end = key_end + p.CHALLENGE_LENGTH
        return frame[2:key_end], frame[key_end:cookie_end], frame[cookie_end:]

    # -- TCP ------------------------------------------------------------------------

    def stream_opened(self, write: Callable[[bytes], None], lose: Callable[[], None],
                      peer: str | None = None) -> StreamConnection:
        """A TCP (TLS) connection was accepted from C{peer} (its host)."""
        connection = StreamConnection(self, write, lose, self.clock.seconds(), peer)
        self._streams.add(connection)
        self.counters["connections_tcp"] += 1
        return connection

    def stream_closed(self, connection: StreamConnection) -> None:
        self._streams.discard(connection)
        session = connection.session
        if session is not None and self._by_key.get(session.key) is session:
            self._end(session)

    def stream_frame_received(self, connection: StreamConnection, frame: bytes) -> None:
        now = self.clock.seconds()
        self.traffic.bytes_in += len(frame)
        self.traffic.packets_in += 1
        try:
            kind = p.frame_kind(frame)
        except p.MalformedFrameError:
            connection.stream_malformed()
            return
        session = connection.session
        if kind == p.SEND:
            if session is None or frame[2 : 2 + p.TOKEN] != session.token:
                connection.stream_malformed()
                return
            session.last_seen = now
            self._relay(session, frame, now)
        elif kind == p.HELLO:
            connection.challenge = os.urandom(p.CHALLENGE_LENGTH)
            self._stream_out(connection, p.challenge(connection.challenge))
        elif kind == p.AUTH:
            self._stream_auth(connection, frame)
        elif kind == p.PING:
            if session is not None:
                session.last_seen = now
            self._stream_out(connection, p.pong(frame[2 : 2 + p.NONCE], session is not None))
        elif kind == p.BYE:
            connection.close()
        else:
            connection.stream_malformed()

    def _stream_out(self, connection: StreamConnection, frame: bytes) -> None:
        self.traffic.bytes_out += len(frame)
        self.traffic.packets_out += 1
        connection.write_frame(frame)

    def _stream_auth(self, connection: StreamConnection, frame: bytes) -> None:
        node_key, challenge, proof = self._split_auth(frame)
        expected, connection.challenge = connection.challenge, None  # single use
        if expected is None or not hmac.compare_digest(expected, challenge):
            self.drop("bad_challenge")
            connection.stream_malformed()
            return
        if not self._may_check_proof(connection.peer, self.clock.seconds()):
            connection.close()
            return
        if not p.proof_is_valid(self._shared_keys, self.public_key, node_key, challenge, proof):
            self.drop("bad_proof")
            self._stream_out(connection, p.refused(p.REFUSED_BAD_PROOF))
            connection.close()
            return

        def make(token: bytes, bucket: TokenBucket) -> Session:
            session = StreamSession(node_key, token, bucket, self.clock.seconds(), connection)
            connection.session = session
            return session

        def refuse(frame: bytes) -> None:
            self._stream_out(connection, frame)
            connection.close()

        self._register(node_key, make, refuse)

    # -- registration -----------------------------------------------------------

    def _register(self, node_key: bytes,
                  make: Callable[[bytes, TokenBucket], Session],
                  refuse: Callable[[bytes], None]) -> None:
        """Ask the policy, then replace any older session of C{node_key}."""

        def answered(allowed: object) -> None:
            if not allowed:
                self.drop("register_not_authorized")
                refuse(p.refused(p.REFUSED_NOT_AUTHORIZED))
                return
            old = self._by_key.get(node_key)
            if old is None and len(self._by_key) >= self.limits.max_sessions:
                self.drop("sessions_full")
                refuse(p.refused(p.REFUSED_FULL))
                return
            if old is not None:
                self._end(old)
            now = self.clock.seconds()
            bucket = TokenBucket(self.limits.node_rate, self.limits.node_burst, now)
            session = make(os.urandom(p.TOKEN), bucket)
            session.session_key = p.session_key(self._shared_keys.get(node_key), session.token)
            self._by_key[node_key] = session
            if isinstance(session, UDPSession):
                self._by_token[session.token] = session
                self.counters["connections_udp"] += 1
            self.counters["registrations"] += 1
            self.refresh_devices()
            welcome = p.welcome(session.token)
            session.deliver(welcome)
            self.traffic.packets_out += 1
            self.traffic.bytes_out += len(welcome)

        self._ask(self.policy.may_register, (node_key,), answered)

    def _ask(self, question: Callable[..., Any], args: tuple[bytes, ...],
             answered: Callable[[object], None]) -> None:
        """Call the policy, which may answer now or with a Deferred."""
        try:
            answer = question(*args)
        except Exception:
            self.log.failure("relay policy raised")
            self.drop("policy_error")
            answered(False)
            return
        if isinstance(answer, Deferred):

            def failed(failure: Any) -> None:
                self.log.failure("relay policy failed", failure)
                self.drop("policy_error")
                answered(False)

            answer.addCallbacks(answered, failed)
        else:
            answered(answer)

    def _end(self, session: Session) -> None:
        if self._by_key.get(session.key) is session:
            del self._by_key[session.key]
            self.devices.forget_node(session.key)
            self.refresh_devices()
        if isinstance(session, UDPSession):
            self._by_token.pop(session.token, None)
        session.pending.clear()
        session.close()

    # -- relaying -------------------------------------------------------------------

    def _relay(self, session: Session, frame: bytes, now: float) -> None:
        """The per-datagram path: limits, authorization, forward."""
        size = len(frame)
        if not session.bucket.take(size, now):
            self.drop("rate_node")
            return
        if not self._global.take(size, now):
            self.drop("rate_global")
            return
        dst = frame[p.SEND_DST : p.SEND_PAYLOAD]
        until = session.allowed.get(dst)
        if until is None or until < now:
            if self.devices.is_handle(dst):
                self._to_device(session, dst, frame, now)
                return
            self._authorize(session, dst, frame, now)
            return
        self._forward(session, dst, frame)

    def _forward(self, session: Session, dst: bytes, frame: bytes) -> None:
        target = self._by_key.get(dst)
        if target is None:
            self.drop("no_such_peer")
            return
        out = b"".join((_RECV_HEADER, session.key, memoryview(frame)[p.SEND_PAYLOAD :]))
        if target.deliver(out):
            traffic = self.traffic
            traffic.relayed_packets += 1
            traffic.relayed_bytes += len(out) - p.RECV_PAYLOAD
            traffic.bytes_out += len(out)
            traffic.packets_out += 1

    def _authorize(self, session: Session, dst: bytes, frame: bytes, now: float) -> None:
        session.allowed.pop(dst, None)
        denied_until = session.denied.get(dst)
        if denied_until is not None and denied_until >= now:
            self.drop("not_authorized")
            return
        if len(session.pending) >= self.limits.pending_frames:
            self.drop("pending_full")
            return
        session.pending.append(frame)
        if dst in session.asking:
            return
        session.asking.add(dst)

        def answered(allowed: object) -> None:
            session.asking.discard(dst)
            when = self.clock.seconds()
            if allowed:
                session.allowed[dst] = when + self.limits.allow_ttl
                session.denied.pop(dst, None)
            else:
                session.denied[dst] = when + self.limits.deny_ttl
            waiting = [f for f in session.pending if f[p.SEND_DST : p.SEND_PAYLOAD] == dst]
            session.pending = [f for f in session.pending if f[p.SEND_DST : p.SEND_PAYLOAD] != dst]
            if self._by_key.get(session.key) is not session:
                return
            for waiting_frame in waiting:
                if allowed:
                    self._forward(session, dst, waiting_frame)
                else:
                    self.drop("not_authorized")

        self._ask(self.policy.may_relay, (session.key, dst), answered)

    # -- revocation and housekeeping -----------------------------------------------

    def revoked(self, keys: frozenset[bytes]) -> None:
        """
        Authorizations involving C{keys} may have shrunk: forget every
        cached answer about them, and end the sessions of nodes that may no
        longer register at all.
        """
        self.counters["revocations"] += 1
        for session in list(self._by_key.values()):
            if session.key in keys:
                session.allowed.clear()
            else:
                for key in keys:
                    session.allowed.pop(key, None)
        for key in keys:
            revoked = self._by_key.get(key)
            if revoked is None:
                continue

            def answered(allowed: object, session: Session = revoked) -> None:
                if not allowed and self._by_key.get(session.key) is session:
                    self.counters["sessions_revoked"] += 1
                    self._end(session)

            self._ask(self.policy.may_register, (key,), answered)

    def sweep(self) -> None:
        """Close idle sessions and connections that never registered."""
        now = self.clock.seconds()
        limits = self.limits
        for session in list(self._by_key.values()):
            if now - session.last_seen > limits.idle_timeout:
                self.counters["closed_idle"] += 1
                self._end(session)
        for stream in list(self._streams):
            if stream.session is None and now - stream.opened > limits.auth_timeout:
                self.counters["closed_unauthenticated"] += 1
                stream.close()
        stale = now - COOKIE_LIFETIME - 1
        for cookie, used in list(self._used_cookies.items()):
            if used < stale:
                del self._used_cookies[cookie]
        self.devices.sweep(now)
        # Memberships change without telling the relay's sessions: who
        # devices may reach is looked at again here, every few seconds.
        self.refresh_devices()
