"""
The node's side of the relay.

A L{RelayClient} sits beside WireGuard on the node's L{Forwarder}: it is the
route for L{RelayEndpoint}s (so a peer whose C{endpoint} is one is reached
through the relay) and the handler of relay frames (0xF5) arriving on the
node's one UDP socket.  Datagrams relayed to us are handed to
C{forwarder.dispatch(data, RelayEndpoint(relay_id, src))}, so WireGuard's
roaming follows the relay path like any other.

Each relay is reached over UDP first; when UDP gets no answer the client
falls back to a TLS connection on TCP by itself, keeps probing UDP while on
TCP, and moves back when UDP answers again.  It measures the round-trip
time to every relay it knows and calls the nearest its home.
"""

from __future__ import annotations

import collections
import enum
import ipaddress
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from twistvpn.common import auth
from twistvpn.interfaces import IDatagramHandler, IDatagramSender, IRelayProvider
from twistvpn.relay import protocol as p
from twistvpn.wire import RELAY
from twistvpn.wireguard.keys import decode_key, encode_key
from twistvpn.wireguard.keys import public_key as derive_public_key


@dataclass(frozen=True)
class RelayEndpoint:
    """Where a peer is reached through a relay: the relay and the peer's key."""

    relay_id: str
    peer_key: bytes

    def __str__(self) -> str:
        """As status and logs show the path: the relay, not the peer's key bytes."""
        return f"relay:{self.relay_id}"


@dataclass(frozen=True)
class RelayInfo:
    """A relay as the network map advertises it."""

    relay_id: str
    host: str  # an IP address: UDP replies are matched on it
    udp_port: int
    tcp_port: int
    public_key: bytes
    tls_fingerprint: str | None = None  # sha256 of the certificate, hex

    def to_map(self) -> dict[str, Any]:
        """The relay's entry in a network map's C{relays} list."""
        return {
            "id": self.relay_id,
            "host": self.host,
            "port": self.udp_port,
            "tcp_port": self.tcp_port,
            "public_key": encode_key(self.public_key),
            "fingerprint": self.tls_fingerprint,
        }

    @classmethod
    def from_map(cls, d: Any) -> RelayInfo:
        """Parse a network map's relay entry; raises ValueError when malformed."""
        try:
            host = str(ipaddress.ip_address(d["host"]))
            udp_port, tcp_port = int(d["port"]), int(d["tcp_port"])
            fingerprint = d.get("fingerprint")
            if fingerprint is not None:
                fingerprint = str(fingerprint).replace(":", "").lower()
                bytes.fromhex(fingerprint)
            info = cls(str(d["id"])[:64], host, udp_port, tcp_port,
                       decode_key(str(d["public_key"])), fingerprint)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"malformed relay entry: {e}") from None
        if not (0 < udp_port < 65536 and 0 < tcp_port < 65536):
            raise ValueError("malformed relay entry: port out of range")
        return info


@dataclass
class RelayClientTimings:
    """How patient the client is; tests shrink nothing, they advance a Clock."""

    hello_retry: float = 1.0  # resend HELLO/AUTH this often
    udp_attempts: int = 3  # HELLOs unanswered before falling back to TCP
    keepalive: float = 20.0  # ping the relay this often while registered
    dead_after: float = 65.0  # nothing heard for this long: register again
    udp_retry: float = 30.0  # on TCP, probe UDP this often
    reconnect: float = 5.0  # after a failure or a refusal, retry after this,
    reconnect_max: float = 60.0  # doubling with each failure in a row, up to this
    rtt_interval: float = 60.0  # measure every relay's RTT this often
    queue_frames: int = 64  # datagrams held while registering


class StreamLink(Protocol):
    """What the client needs of a TCP (TLS) connection to a relay."""

    def write_frame(self, frame: bytes) -> None: ...

    def close(self) -> None: ...


class StreamReceiver(Protocol):
    """What a TCP connection reports back to the client."""

    def frame_received(self, frame: bytes) -> None: ...

    def link_lost(self) -> None: ...


# connect_stream(info, receiver) -> Deferred firing with a StreamLink once the
# connection (and its TLS handshake) is up.
ConnectStream = Callable[[RelayInfo, StreamReceiver], "Deferred[StreamLink]"]


class _Stream:
    """Receives one TCP connection's frames on behalf of a link."""

    def __init__(self, link: RelayRegistration) -> None:
        self.link = link
        self.connection: StreamLink | None = None
        self.dead = False

    def frame_received(self, frame: bytes) -> None:
        if not self.dead:
            self.link.frame_received(frame, self)

    def link_lost(self) -> None:
        if not self.dead:
            self.dead = True
            self.link.stream_lost(self)

    def close(self) -> None:
        self.dead = True
        if self.connection is not None:
            self.connection.close()


class RegistrationState(enum.Enum):
    """
    Where a node stands with one relay, as (path registered on, path being
    registered): the only combinations that exist.  On TCP a node keeps
    trying to get back to UDP, so it can be up on one path while
    registering on the other.
    """

    IDLE = (None, None)  # not registered; maybe backing off before a retry
    REGISTERING_UDP = (None, "udp")
    REGISTERING_TCP = (None, "tcp")
    UP_UDP = ("udp", None)
    UP_TCP = ("tcp", None)
    UP_TCP_REGISTERING_UDP = ("tcp", "udp")
    # Told the session is gone (a REFUSED or a PONG anyone could forge):
    # register again, keeping the session until a new one is welcomed.
    UP_UDP_REGISTERING_UDP = ("udp", "udp")

    @property
    def via(self) -> str | None:
        return self.value[0]  # type: ignore[no-any-return]

    @property
    def registering(self) -> str | None:
        return self.value[1]  # type: ignore[no-any-return]


_S = RegistrationState
# Every move the registration makes; anything else is a bug (counted, logged).
TRANSITIONS: dict[RegistrationState, frozenset[RegistrationState]] = {
    _S.IDLE: frozenset({_S.REGISTERING_UDP, _S.REGISTERING_TCP}),
    _S.REGISTERING_UDP: frozenset({_S.IDLE, _S.UP_UDP, _S.REGISTERING_TCP}),
    _S.REGISTERING_TCP: frozenset({_S.IDLE, _S.UP_TCP}),
    _S.UP_UDP: frozenset({_S.IDLE, _S.UP_UDP_REGISTERING_UDP}),
    _S.UP_UDP_REGISTERING_UDP: frozenset({_S.IDLE, _S.UP_UDP}),
    _S.UP_TCP: frozenset({_S.IDLE, _S.UP_TCP_REGISTERING_UDP}),
    _S.UP_TCP_REGISTERING_UDP: frozenset({_S.IDLE, _S.UP_TCP, _S.UP_UDP, _S.REGISTERING_UDP}),
}


class RelayRegistration:
    """
    The client's state with one relay: its registration (a
    L{RegistrationState}, changed only through L{_enter}), path, queue.
    """

    log = Logger()

    def __init__(self, client: RelayClient, info: RelayInfo) -> None:
        self.client = client
        self.info = info
        self.addr = (info.host, info.udp_port)
        self.state = RegistrationState.IDLE
        self.token = b""
        self.session_key = b""  # tags PINGs that move the session (protocol.session_key)
        self.last_rebind = float("-inf")
        self.attempts = 0
        self.stream: _Stream | None = None
        self.queue: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self.last_heard = client.clock.seconds()
        self.last_used = self.last_heard
        self.last_udp_probe = self.last_heard
        self._timer: IDelayedCall | None = None
        self._tick: IDelayedCall | None = None
        self.closed = False
        self.waiters: list[Deferred[None]] = []
        self.failures = 0  # registrations failed in a row, for the backoff

    # -- timers -------------------------------------------------------------------

    def _later(self, delay: float, f: Callable[[], None]) -> None:
        self._cancel()
        self._timer = self.client.clock.callLater(delay, f)

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- registration ---------------------------------------------------------------

    @property
    def via(self) -> str | None:
        """"udp" or "tcp" once registered."""
        return self.state.via

    @property
    def registering(self) -> str | None:
        """"udp" or "tcp" while registering."""
        return self.state.registering

    @property
    def up(self) -> bool:
        return self.state.via is not None

    def _enter(self, via: str | None, registering: str | None) -> None:
        new = RegistrationState((via, registering))
        if new is not self.state and new not in TRANSITIONS[self.state]:
            self.client.counters["registration_bad_transition"] += 1
            self.log.error("relay {relay}: registration went from {old} to {new}",
                           relay=self.info.relay_id, old=self.state.name, new=new.name)
        self.state = new

    def ensure(self) -> None:
        """Get registered, if not already on the way or backing off."""
        if self.closed or self.up or self.registering is not None:
            return
        if self._timer is not None and self._timer.active():
            return  # a retry is scheduled: keep to the backoff
        self.start_udp()

    def start_udp(self) -> None:
        self._enter(self.via, "udp")
        self.attempts = 0
        self._hello_udp()

    def _hello_udp(self) -> None:
        if self.attempts >= self.client.timings.udp_attempts:
            self._enter(self.via, None)
            self.client.counters["udp_registration_timeouts"] += 1
            if self.via is None:
                # UDP does not get through: fall back to TLS on TCP.
                self.start_tcp()
            return
        self.attempts += 1
        self.client.send_udp(p.hello(self.client.public_key), self.addr)
        self._later(self.client.timings.hello_retry, self._hello_udp)

    def start_tcp(self) -> None:
        self._drop_stream()
        self._enter(self.via, "tcp")
        self.client.counters["tcp_connects"] += 1
        stream = self.stream = _Stream(self)
        d = self.client.connect_stream(self.info, stream)

        def connected(connection: StreamLink) -> None:
            if stream.dead or self.closed:
                connection.close()
                return
            stream.connection = connection
            connection.write_frame(p.hello(self.client.public_key))
            self._later(self.client.timings.reconnect * 2, self._tcp_timeout)

        def failed(reason: Any) -> None:
            self.client.counters["tcp_connect_failures"] += 1
            if self.stream is stream:
                self.stream = None
            stream.dead = True
            self._retry_later()

        d.addCallbacks(connected, failed)

    def _tcp_timeout(self) -> None:
        if self.registering == "tcp":
            self.client.counters["tcp_registration_timeouts"] += 1
            self._drop_stream()
            self._retry_later()

    def _retry_later(self) -> None:
        self._enter(self.via, None)
        self._fail_waiters(RelayUnavailableError(f"relay {self.info.relay_id} is unreachable"))
        if not self.closed and not self.up:
            timings = self.client.timings
            delay = min(timings.reconnect * 2 ** min(self.failures, 16), timings.reconnect_max)
            self.failures += 1
            self._later(delay, self.ensure)

    def _drop_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def frame_received(self, frame: bytes, stream: _Stream | None) -> None:
        """A frame from the relay, over UDP (stream None) or a TCP stream."""
        try:
            kind = p.frame_kind(frame)
        except p.MalformedFrameError:
            self.client.counters["drop_malformed"] += 1
            if stream is not None:
                stream.close()
                self.stream_lost(stream)
            return
        now = self.client.clock.seconds()
        self.last_heard = now
        path = "udp" if stream is None else "tcp"
        if kind == p.RECV:
            if stream is not None and stream is not self.stream:
                return
            self.client.received(self, frame)
        elif kind == p.CHALLENGE:
            if self.registering != path:
                self.client.counters["drop_unexpected_challenge"] += 1
                return
            challenge_value = frame[2:]
            proof = p.proof(self.client.private_key, self.info.public_key, self.info.public_key,
                            self.client.public_key, challenge_value)
            message = p.auth(self.client.public_key, challenge_value, proof)
            if stream is None:
                self.client.send_udp(message, self.addr)
            elif stream.connection is not None:
                stream.connection.write_frame(message)
        elif kind == p.WELCOME:
            if self.registering != path:
                self.client.counters["drop_unexpected_welcome"] += 1
                return
            self.registered(path, frame[2:])
        elif kind == p.REFUSED:
            if frame[2] == p.REFUSED_UNKNOWN_SESSION:
                if path == "udp":
                    # The relay forgot us (restart, idle), or someone says
                    # so: register again, keeping the session meanwhile.
                    self.reregister()
                return
            if self.registering != path:
                self.client.counters["drop_unexpected_refused"] += 1
                return
            self.client.counters["refused"] += 1
            self._enter(self.via, None)
            if path == "tcp":
                self._drop_stream()
            self._retry_later()
        elif kind == p.PONG:
            self.client.pong(self, frame, path)
        elif kind == p.REBIND:
            self.rebind(path)
        else:
            self.client.counters["drop_unexpected"] += 1

    def registered(self, path: str, token: bytes) -> None:
        self._cancel()
        self._enter(path, None)
        self.token = token
        self.session_key = p.session_key(
            auth.shared_key(self.client.private_key, self.info.public_key), token)
        self.failures = 0
        self.client.counters["registered_" + path] += 1
        if path == "udp":
            # Back on UDP: the relay already dropped our TCP session.
            self._drop_stream()
        self.last_udp_probe = self.client.clock.seconds()
        self._schedule_tick()
        self.client.path_changed(self)
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(None)
        while self.queue and self.up:
            dst, data = self.queue.popleft()
            self.send(dst, data)

    def stream_lost(self, stream: _Stream) -> None:
        if stream is not self.stream:
            return
        self.stream = None
        if self.via == "tcp":
            self._enter(None, self.registering)
            self.client.counters["tcp_lost"] += 1
            self.client.path_changed(self)
            self.ensure()
        elif self.registering == "tcp":
            self._retry_later()

    # -- keepalive, dead relay detection, return to UDP ---------------------------

    def _schedule_tick(self) -> None:
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        self._tick = self.client.clock.callLater(self.client.timings.keepalive, self.tick)

    def tick(self) -> None:
        self._tick = None
        if self.closed or not self.up:
            return
        timings = self.client.timings
        now = self.client.clock.seconds()
        if now - self.last_heard > timings.dead_after:
            self.client.counters["relay_silent"] += 1
            self.reset()
            self.ensure()
            return
        self.client.ping(self, with_token=True)
        if (
            self.via == "tcp"
            and self.registering is None
            and now - self.last_udp_probe >= timings.udp_retry
        ):
            self.last_udp_probe = now
            self.client.counters["udp_probes"] += 1
            self.client.ping(self, with_token=False, force_udp=True)
        self._schedule_tick()

    def reregister(self) -> None:
        """
        Told over UDP that our session is gone: get a new one.  Such news is
        unauthenticated, so the session stays in use until the relay
        welcomes us again; a forgery costs one registration, never the path.
        """
        if self.via != "udp" or self.registering is not None:
            return
        self.client.counters["relay_forgot"] += 1
        self._enter("udp", "udp")
        self.attempts = 0
        self._hello_udp()

    def rebind(self, path: str) -> None:
        """A SEND came from an address the relay does not know: prove it (once a second)."""
        now = self.client.clock.seconds()
        if path != "udp" or self.via != "udp" or now - self.last_rebind < 1.0:
            self.client.counters["drop_rebind_hint"] += 1
            return
        self.last_rebind = now
        self.client.counters["rebind_hints"] += 1
        self.client.ping(self, with_token=True)

    def udp_answered(self) -> None:
        """A UDP PONG arrived while we are on TCP: try registering on UDP."""
        if self.via == "tcp" and self.registering is None:
            self.start_udp()

    def reset(self) -> None:
        """Forget the registration (the relay forgot it or went silent)."""
        self._cancel()
        self._enter(None, None)
        self.token = b""
        self._drop_stream()
        self.client.path_changed(self)

    def when_up(self) -> Deferred[None]:
        """Fires once registered; fails if the relay turns out unreachable."""
        d: Deferred[None] = Deferred()
        if self.up:
            d.callback(None)
        else:
            self.waiters.append(d)
            self.ensure()
        return d

    def _fail_waiters(self, error: Exception) -> None:
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.errback(error)

    def close(self) -> None:
        self._fail_waiters(RelayUnavailableError(f"left relay {self.info.relay_id}"))
        if self.up and self.via == "udp":
            self.client.send_udp(p.bye(self.token), self.addr)
        self.closed = True
        self.reset()
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        self.queue.clear()

    # -- data ---------------------------------------------------------------------

    def send(self, dst: bytes, data: bytes) -> None:
        self.last_used = self.client.clock.seconds()
        if self.via == "udp":
            self.client.send_udp(p.send(self.token, dst, data), self.addr)
            return
        if self.via == "tcp" and self.stream is not None and self.stream.connection is not None:
            self.stream.connection.write_frame(p.send(self.token, dst, data))
            return
        if len(self.queue) >= self.client.timings.queue_frames:
            self.client.counters["drop_queue_full"] += 1
        else:
            self.queue.append((dst, data))
        self.ensure()


class RelayUnavailableError(Exception):
    """No relay could be registered with."""


@implementer(IDatagramHandler, IRelayProvider)
class RelayClient:
    """
    The node's relay client: the forwarder's route for L{RelayEndpoint}s and
    its handler for relay frames.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, forwarder: IDatagramSender, private_key: bytes,
                 connect_stream: ConnectStream,
                 timings: RelayClientTimings | None = None,
                 on_path_change: Callable[[str, str | None], None] | None = None) -> None:
        self.clock = clock
        self.forwarder = forwarder
        self.private_key = private_key
        self.public_key = derive_public_key(private_key)
        self.connect_stream = connect_stream
        self.timings = timings or RelayClientTimings()
        self.on_path_change = on_path_change
        self.counters: collections.Counter[str] = collections.Counter()
        self.relays: dict[str, RelayInfo] = {}
        self.rtt: dict[str, float] = {}
        self._order: list[str] = []
        self._links: dict[str, RelayRegistration] = {}
        self._by_addr: dict[tuple[str, int], RelayRegistration] = {}
        # nonce -> (relay id, time sent, path, whether the ping carried our token)
        self._pings: dict[bytes, tuple[str, float, str, bool]] = {}
        self._rtt_call: IDelayedCall | None = None
        self._started = False
        self._opened: dict[bytes, str] = {}  # peer key -> relay, for IRelayProvider

    # -- life -----------------------------------------------------------------------

    def start(self) -> None:
        """Take relay frames and RelayEndpoints from the forwarder; measure RTTs."""
        self.forwarder.register_handler(RELAY, self)
        self.forwarder.register_route(RelayEndpoint, self.send_datagram)
        self._started = True
        self.measure()

    def stop(self) -> None:
        self._started = False
        if self._rtt_call is not None and self._rtt_call.active():
            self._rtt_call.cancel()
        for link in self._links.values():
            link.close()
        self._links.clear()
        self._by_addr.clear()

    def set_relays(self, relays: Iterable[RelayInfo]) -> None:
        """
        The relays the network map advertises, in the rendezvous's order of
        preference: the client registers with each; relays no longer listed
        are left.
        """
        relays = list(relays)
        self.relays = {r.relay_id: r for r in relays}
        self._order = [r.relay_id for r in relays]
        for relay_id in list(self._links):
            link = self._links[relay_id]
            if self.relays.get(relay_id) != link.info:
                self._close_link(relay_id)
        for relay_id in list(self.rtt):
            if relay_id not in self.relays:
                del self.rtt[relay_id]
        if self._started:
            self.measure()

    # -- which relay ------------------------------------------------------------

    @property
    def home_relay(self) -> str | None:
        """The nearest relay by measured RTT (the first listed before any answer)."""
        if self.rtt:
            return min(self.rtt, key=lambda r: (self.rtt[r], self._order.index(r)))
        return self._order[0] if self._order else None

    def relay_endpoint(self, peer_key: bytes, relay_id: str | None = None) -> RelayEndpoint | None:
        """
        The endpoint that reaches C{peer_key} through C{relay_id} (if given
        and known), else through our home relay, the nearest; None when no
        relay is known.
        """
        relay_id = relay_id if relay_id in self.relays else self.home_relay
        if relay_id is None:
            return None
        self._link(relay_id).ensure()
        return RelayEndpoint(relay_id, peer_key)

    # -- IRelayProvider: the path manager's last resort ----------------------------

    def open_relay(self, peer_key: bytes, relay_id: str | None = None) -> Deferred[RelayEndpoint]:
        """
        Fire with a L{RelayEndpoint} for C{peer_key} once the relay (the
        peer's home relay if given and known, else ours) has registered us;
        fail with L{RelayUnavailableError} when it cannot be reached.
        """
        endpoint = self.relay_endpoint(peer_key, relay_id)
        if endpoint is None:
            return fail(RelayUnavailableError("no relay is known"))
        self._opened[peer_key] = endpoint.relay_id
        d: Deferred[Any] = self._link(endpoint.relay_id).when_up()
        d.addCallback(lambda _: endpoint)
        return d

    def close_relay(self, peer_key: bytes) -> None:
        """The path manager found a better path: the relay may go idle."""
        self._opened.pop(peer_key, None)

    def path(self, relay_id: str) -> str | None:
        """How we reach C{relay_id} now: "udp", "tcp", or None."""
        link = self._links.get(relay_id)
        return link.via if link is not None else None

    def _link(self, relay_id: str) -> RelayRegistration:
        link = self._links.get(relay_id)
        if link is None:
            link = self._links[relay_id] = RelayRegistration(self, self.relays[relay_id])
            self._by_addr[link.addr] = link
        return link

    def _close_link(self, relay_id: str) -> None:
        link = self._links.pop(relay_id)
        self._by_addr.pop(link.addr, None)
        link.close()

    # -- the forwarder's route and handler ------------------------------------------

    def send_datagram(self, data: bytes, endpoint: RelayEndpoint) -> None:
        """Send a WireGuard datagram to C{endpoint.peer_key} through its relay."""
        if endpoint.relay_id not in self.relays:
            self.counters["drop_unknown_relay"] += 1
            return
        self._link(endpoint.relay_id).send(endpoint.peer_key, data)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        link = self._by_addr.get(addr)
        if link is None:
            link = self._measuring(addr)
            if link is None:
                self.counters["drop_unknown_relay"] += 1
                return
        link.frame_received(data, None)

    def _measuring(self, addr: Any) -> RelayRegistration | None:
        """A PONG from a relay we measure but hold no link with."""
        for info in self.relays.values():
            if (info.host, info.udp_port) == addr:
                return self._link(info.relay_id)
        return None

    def received(self, link: RelayRegistration, frame: bytes) -> None:
        """A RECV frame: hand the datagram in as if it arrived from the peer."""
        self.counters["rx_packets"] += 1
        self.forwarder.dispatch(
            frame[p.RECV_PAYLOAD :], RelayEndpoint(link.info.relay_id, frame[2 : 2 + p.KEY])
        )

    def send_udp(self, frame: bytes, addr: tuple[str, int]) -> None:
        self.forwarder.send_datagram(frame, addr)

    # -- RTT and pings -------------------------------------------------------------

    def measure(self) -> None:
        """Ping every relay (over UDP, and over TCP where that is the path)."""
        if self._rtt_call is not None and self._rtt_call.active():
            self._rtt_call.cancel()
        now = self.clock.seconds()
        stale = now - self.timings.rtt_interval
        for nonce, (_, sent, _, _) in list(self._pings.items()):
            if sent < stale:
                del self._pings[nonce]
        for relay_id, info in self.relays.items():
            link = self._links.get(relay_id)
            if link is not None and link.via == "tcp":
                self.ping(link, with_token=True)
            else:
                self._ping_udp(relay_id, (info.host, info.udp_port), b"")
        self._register_everywhere()
        if self._started:
            self._rtt_call = self.clock.callLater(self.timings.rtt_interval, self.measure)

    def _register_everywhere(self) -> None:
        """
        Hold a session with every advertised relay (there are few): a peer
        then reaches us through whichever relay is nearest to it, and our
        home relay reaches every peer, without a map of who is where.
        """
        for relay_id in self.relays:
            self._link(relay_id).ensure()

    def _ping_udp(self, relay_id: str, addr: tuple[str, int], token: bytes,
                  key: bytes = b"") -> None:
        nonce = os.urandom(p.NONCE)
        self._pings[nonce] = (relay_id, self.clock.seconds(), "udp", bool(token))
        self.send_udp(p.ping(nonce, token, key), addr)

    def ping(self, link: RelayRegistration, with_token: bool, force_udp: bool = False) -> None:
        token = link.token if with_token else b""
        if link.via == "tcp" and not force_udp:
            connection = link.stream.connection if link.stream is not None else None
            if connection is None:
                return
            nonce = os.urandom(p.NONCE)
            self._pings[nonce] = (link.info.relay_id, self.clock.seconds(), "tcp", bool(token))
            connection.write_frame(p.ping(nonce, token, link.session_key))
            return
        self._ping_udp(link.info.relay_id, link.addr, token, link.session_key)

    def pong(self, link: RelayRegistration, frame: bytes, path: str) -> None:
        nonce = frame[2 : 2 + p.NONCE]
        sent = self._pings.pop(nonce, None)
        if sent is None or sent[0] != link.info.relay_id or sent[2] != path:
            self.counters["drop_unexpected_pong"] += 1
            return
        self.rtt[link.info.relay_id] = self.clock.seconds() - sent[1]
        known = frame[-1] == 1
        if path == "udp" and link.via == "tcp":
            link.udp_answered()
        elif sent[3] and link.up and path == link.via and not known and link.registering is None:
            # The relay forgot us (it restarted, or our session idled out),
            # or a forger says so: on UDP register again, keeping the session.
            if path == "udp":
                link.reregister()
            else:
                self.counters["relay_forgot"] += 1
                link.reset()
                link.ensure()

    def path_changed(self, link: RelayRegistration) -> None:
        if self.on_path_change is not None:
            self.on_path_change(link.info.relay_id, link.via)
