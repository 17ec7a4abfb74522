"""
The node's side of the control channel.

L{RendezvousClient} keeps one TLS connection to the rendezvous (reconnecting
with exponential backoff), registers with proof of possession of the node's
static key, joins the node's networks after every (re)connection, and hands
what the rendezvous pushes to an L{IRendezvousListener}::

    client = RendezvousClient.from_address(
        reactor, "twistvpn://rdv.example.org:8443#sha256=...",
        private_key, "laptop", listener, networks=["8f3a5c0d9e1b2a47"])
    client.setServiceParent(node_service)

The latest map of each network stays available in C{client.maps}.
"""

from __future__ import annotations

import collections
import functools
import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from twistvpn import __version__
from twistvpn.common import auth
from twistvpn.common.amp import Ping
from twistvpn.common.endpoints import FailoverEndpoint
from twistvpn.common.services import quiet
from twistvpn.common.tls import RendezvousAddress, client_creator, parse_address
from twistvpn.interfaces import IChannelBinding, IMapReader, IRendezvousListener
from twistvpn.rendezvous.channel import ChannelClientEndpoint
from twistvpn.rendezvous.errors import NotFoundError
from twistvpn.rendezvous.netmap import ZLIB, MapError, MapReader, NetworkMap, Punch
from twistvpn.rendezvous.protocol import (
    FAILOVER_SPREAD,
    FAILOVER_SPREAD_MAX,
    PROTOCOL_VERSION,
    Challenge,
    Join,
    Leave,
    MapDeltaPush,
    NetworkMapPush,
    PunchPush,
    Register,
    RequestMap,
    RequestPunch,
    RevokedPush,
    SetLocalEndpoints,
    SetMappedEndpoints,
    SetName,
)
from twistvpn.wireguard.keys import public_key

CONNECT_TIMEOUT = 15


# A join's status when the rendezvous does not know the network.
NOT_FOUND = "not found"


class NotConnectedError(Exception):
    """The control connection is down; the request was not sent."""


class ServerKeyMismatchError(auth.AuthError):
    """The rendezvous presented a server key other than the expected one."""


class ControlClientProtocol(amp.AMP):
    """Thin adapter: pushes from the rendezvous go to the client object."""

    def __init__(self, client: RendezvousClient) -> None:
        super().__init__()
        self._client = client
        self.lost = False
        self.heard = float("-inf")  # clock time the rendezvous last sent anything

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.heard = self._client._clock.seconds()
        super().dataReceived(data)

    @NetworkMapPush.responder
    def map_pushed(self, network_id: str, netmap: bytes) -> dict[str, Any]:
        self._client._map_pushed(self, network_id, netmap)
        return {}

    @MapDeltaPush.responder
    def delta_pushed(self, network_id: str, delta: bytes) -> dict[str, Any]:
        self._client._delta_pushed(self, network_id, delta)
        return {}

    @PunchPush.responder
    def punch_pushed(
        self, network_id: str, peer_key: bytes, candidates: list[str], delay: float, punch_id: str
    ) -> dict[str, Any]:
        self._client._punch_pushed(
            self, network_id, Punch(peer_key, tuple(candidates), delay, punch_id)
        )
        return {}

    @RevokedPush.responder
    def revoked_pushed(self, network_id: str, reason: str) -> dict[str, Any]:
        self._client._revoked_pushed(self, network_id, reason)
        return {}

    @Ping.responder
    def ping(self) -> dict[str, Any]:
        return {}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        super().connectionLost(reason)
        self._client._connection_lost(self, reason)


# Reconnection: back within 10 s of the rendezvous returning (the longest
# wait plus the jitter), nodes spread over the jitter so that a rendezvous
# that restarts is not met by all of them in the same instant.
RECONNECT_MAX = 8.0
RECONNECT_JITTER = 1.5
# With several instances, the node pings its own every LIVENESS_INTERVAL
# seconds and leaves one silent for LIVENESS_TIMEOUT (a machine that died
# without closing its connections): the next instance within about 10 s.
LIVENESS_INTERVAL = 4.0
LIVENESS_TIMEOUT = 4.0


def reconnect_policy(rng: random.Random | None = None) -> Callable[[int], float]:
    """Seconds to wait before attempt n+1 after n failures: 1 s, growing 1.5x, capped, jittered."""
    source = rng or random.Random()
    return backoffPolicy(initialDelay=1.0, factor=1.5, maxDelay=RECONNECT_MAX,
                         jitter=lambda: source.uniform(0, RECONNECT_JITTER))


class RendezvousClient(Service):
    """A node's registration with a rendezvous and its membership of networks."""

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint | Sequence[IStreamClientEndpoint],
        private_key: bytes,
        name: str,
        listener: IRendezvousListener,
        *,
        clock: IReactorTime,
        networks: Iterable[str] = (),
        local_endpoints: Iterable[str] = (),
        server_key: bytes | None = None,
        retry_policy: Callable[[int], float] | None = None,
        auth_keys: dict[str, str] | None = None,
        rng: random.Random | None = None,
        reader: IMapReader | None = None,
    ) -> None:
        self.private_key = private_key
        self.public_key = public_key(private_key)
        self.node_name = name  # not Service.name: a parent files its services by that
        self.listener = listener
        self.networks: list[str] = list(dict.fromkeys(networks))
        self.local_endpoints: list[str] = list(local_endpoints)
        self.mapped_endpoints: list[str] = []
        self.expected_server_key = server_key
        self.server_key: bytes | None = None
        self.node_id: str | None = None
        self.udp_ports: list[int] = []
        self.discovery_epoch = b""  # echoed in discovery requests (this rendezvous process's)
        self.discovery6: str | None = None  # the IPv6 address discovery answers on, if any
        # network ID -> pre-auth key to present until the network authorizes us
        # (never logged; dropped once authorized)
        self.auth_keys: dict[str, str] = dict(auth_keys or {})
        self.maps: dict[str, NetworkMap] = {}
        self._reader: IMapReader = reader if reader is not None else MapReader()
        self.status: dict[str, str] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        # Seconds over which a move to another instance is spread
        # (protocol.FAILOVER_SPREAD; the instance's liveness answers set it).
        self.failover_spread = FAILOVER_SPREAD
        self._protocol: ControlClientProtocol | None = None
        self._clock = clock
        # One endpoint per rendezvous instance (all sharing one database and
        # one identity), tried in turn.
        self._endpoint = FailoverEndpoint(
            [endpoint] if IStreamClientEndpoint.providedBy(endpoint)
            else list(endpoint))  # type: ignore[arg-type]
        self._rng = rng or random.Random()
        self._factory = quiet(Factory.forProtocol(functools.partial(ControlClientProtocol, self)))
        self._retry_policy = retry_policy or reconnect_policy()
        # host:port of each instance, for the log
        self.wheres = ["the rendezvous"] * self._instances
        self._failures = 0
        self._last_failure: str | None = None
        self._attempt: defer.Deferred[Any] | None = None
        self._attempt_protocol: ControlClientProtocol | None = None
        self._retry: IDelayedCall | None = None
        self._liveness: IDelayedCall | None = None
        self._waiters: list[tuple[defer.Deferred[Any], int | None]] = []
        self._stopped: defer.Deferred[None] | None = None
        self._stopping: ControlClientProtocol | None = None

    @property
    def current(self) -> int:
        """The instance connected, or tried last (an index of the addresses)."""
        return self._endpoint.current

    @property
    def _instances(self) -> int:
        return len(self._endpoint.endpoints)

    @property
    def where(self) -> str:
        """The instance connected, or tried last (host:port)."""
        return self.wheres[self.current]

    @classmethod
    def from_address(
        cls,
        reactor: Any,
        address: str | RendezvousAddress | Sequence[str | RendezvousAddress],
        private_key: bytes,
        name: str,
        listener: IRendezvousListener,
        *,
        ca_pem: bytes | None = None,
        source: str | None = None,
        **kwargs: Any,
    ) -> RendezvousClient:
        """
        A client for C{twistvpn://HOST:PORT#sha256=FP} (or several, the
        instances of one rendezvous): TLS pinned to the fingerprint, or
        checked against CAs (C{ca_pem}, else the system's) when the address
        has none.  C{source}: the local address to connect from (the
        kernel's choice when None).
        """
        given = [address] if isinstance(address, str | RendezvousAddress) else list(address)
        addresses = [parse_address(a) if isinstance(a, str) else a for a in given]
        endpoints = [
            ChannelClientEndpoint(
                client_creator(a, ca_pem),
                HostnameEndpoint(reactor, a.host, a.port, timeout=CONNECT_TIMEOUT,
                                 bindAddress=None if source is None else (source, 0)),
            )
            for a in addresses
        ]
        kwargs.setdefault("clock", reactor)
        client = cls(endpoints, private_key, name, listener, **kwargs)
        client.wheres = [f"{a.host}:{a.port}" for a in addresses]
        return client

    # -- service ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopped = None
        self._connect()

    def stopService(self) -> defer.Deferred[None]:
        """Stop reconnecting; fires once the connection (if any) is closed."""
        super().stopService()
        protocol = self._protocol or self._attempt_protocol
        for call in (self._retry, self._liveness):
            if call is not None and call.active():
                call.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        self._fail_waiters(defer.CancelledError("the client stopped"), force=True)
        if protocol is None or protocol.lost or protocol.transport is None:
            return defer.succeed(None)
        self._stopped = defer.Deferred()
        self._stopping = protocol
        protocol.transport.loseConnection()
        return self._stopped

    @property
    def connected(self) -> bool:
        """Whether the client is registered on a live connection."""
        return self._protocol is not None

    def when_connected(self, fail_after_failures: int | None = None) -> defer.Deferred[Any]:
        """
        Fires with the protocol once registered (now, or after reconnecting);
        fails after C{fail_after_failures} failed attempts in a row, if given.
        """
        if self._protocol is not None:
            return defer.succeed(self._protocol)
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiters.append((d, fail_after_failures))
        return d

    # -- connecting, with exponential backoff ---------------------------------
    #
    # Not ClientService: its prepareConnection cannot survive the connection
    # dropping during preparation (a TLS handshake refused because the
    # fingerprint does not match), and a refused handshake must count as a
    # failed attempt so that backoff grows.

    def _connect(self) -> None:
        self._retry = None
        if not self.running:
            return
        self.counters["attempts"] += 1
        attempt = self._endpoint.connect(self._factory)
        self._attempt = attempt

        def connected(protocol: Any) -> Any:
            self._attempt_protocol = protocol
            return self._prepare(protocol)

        attempt.addCallback(connected)
        attempt.addCallbacks(self._registered, self._attempt_failed)

    def _registered(self, protocol: ControlClientProtocol) -> None:
        self._attempt = self._attempt_protocol = None
        if self._failures:
            self.log.info("rendezvous {where} reached again after {n} failed attempt(s)",
                          where=self.where, n=self._failures)
        self._failures = 0
        self._last_failure = None
        if self._instances > 1:
            self._schedule_liveness(protocol)
        waiters, self._waiters = self._waiters, []
        for d, _ in waiters:
            d.callback(protocol)

    def _schedule_liveness(self, protocol: ControlClientProtocol) -> None:
        self._liveness = self._clock.callLater(LIVENESS_INTERVAL, self._ping, protocol)

    def _ping(self, protocol: ControlClientProtocol) -> None:
        """Is our instance still there?  Another one takes over if not."""
        if protocol is not self._protocol:
            return

        since = self._clock.seconds()

        def silent() -> None:
            nonlocal since
            if protocol.heard > since:
                # It spoke meanwhile, only not the answer yet: a busy
                # instance (a survivor taking a dead one's nodes), not a dead
                # one.  Wait on; leaving would only add to its load.
                self.counters["liveness_slow"] += 1
                since = self._clock.seconds()
                self._liveness = self._clock.callLater(LIVENESS_TIMEOUT, silent)
                return
            self.counters["liveness_timeouts"] += 1
            self.log.info("rendezvous {where} silent for {t} s; trying the next instance",
                          where=self.where, t=LIVENESS_TIMEOUT)
            # The channel's transport (TLS over TCP) can be aborted: no goodbye
            # waits on a peer that no longer answers.
            transport: Any = protocol.transport
            if transport is not None:
                transport.abortConnection()

        def pending() -> bool:
            """Whether this ping's timeout still runs (else it fired, or a stop ended it)."""
            call = self._liveness
            if protocol is self._protocol and call is not None and call.active():
                call.cancel()
                return True
            return False

        def answered(answer: dict[str, Any]) -> None:
            spread = answer.get("failover_spread")
            if spread is not None and math.isfinite(spread):
                self.failover_spread = min(FAILOVER_SPREAD_MAX, max(0.1, spread))
            if pending():
                self._schedule_liveness(protocol)

        def failed(_: Failure) -> None:
            pending()

        self._liveness = self._clock.callLater(LIVENESS_TIMEOUT, silent)
        self._call(protocol, Ping).addCallbacks(answered, failed)

    def _attempt_failed(self, failure: Failure) -> None:
        self._attempt = None
        protocol, self._attempt_protocol = self._attempt_protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.loseConnection()
        if failure.check(defer.CancelledError) and not self.running:
            return
        self._failures += 1
        self.counters["failed_attempts"] += 1
        count = self._instances
        if count == 1:
            delay = self._retry_policy(self._failures)
        else:
            # The next attempt goes to the next instance; backoff grows once
            # per round of them all.
            delay = self._retry_policy((self._failures - 1) // count)
        why = failure.getErrorMessage()
        if self._failures == 1 or why != self._last_failure:
            # Once per outage (and when the reason changes), not every attempt.
            self.log.info(
                "cannot reach the rendezvous {where}: {why}; retrying with backoff "
                "(next attempt in {delay} s), quietly until it answers or the reason changes",
                where=self.where, why=why, delay=f"{delay:.1f}",
            )
        self._last_failure = why
        self._fail_waiters(failure)
        self._schedule(delay)

    def _fail_waiters(self, failure: Any, force: bool = False) -> None:
        waiters, self._waiters = self._waiters, []
        for d, limit in waiters:
            if force or (limit is not None and self._failures >= limit):
                d.errback(failure)
            else:
                self._waiters.append((d, limit))

    def _schedule(self, delay: float) -> None:
        if self.running and self._retry is None:
            self._retry = self._clock.callLater(delay, self._connect)

    # -- requests -------------------------------------------------------------

    def join(self, network_id: str, auth_key: str | None = None) -> defer.Deferred[str | None]:
        """
        Join C{network_id}, now and after every reconnection, presenting
        C{auth_key} (a pre-auth key) until authorized.  Fires with
        "authorized" or "pending", or None when offline (the join is sent
        once connected).
        """
        network_id = network_id.lower()
        if network_id not in self.networks:
            self.networks.append(network_id)
        if auth_key is not None:
            self.auth_keys[network_id] = auth_key
        if self._protocol is None:
            return defer.succeed(None)
        return self._join(self._protocol, network_id)

    def leave(self, network_id: str) -> defer.Deferred[None]:
        """Stop being sent C{network_id}'s map (membership stays)."""
        network_id = network_id.lower()
        if network_id in self.networks:
            self.networks.remove(network_id)
        self.maps.pop(network_id, None)
        self.status.pop(network_id, None)
        if self._protocol is None:
            return defer.succeed(None)
        return self._protocol.callRemote(Leave, network_id=network_id).addCallback(lambda _: None)

    def set_local_endpoints(self, endpoints: Iterable[str]) -> defer.Deferred[None]:
        """Tell the rendezvous this node's LAN addresses ("host:port")."""
        self.local_endpoints = list(endpoints)
        return self._send_endpoints(SetLocalEndpoints, self.local_endpoints)

    def set_mapped_endpoints(self, endpoints: Iterable[str]) -> defer.Deferred[None]:
        """Tell the rendezvous the public addresses our gateway forwards to us."""
        self.mapped_endpoints = list(endpoints)
        return self._send_endpoints(SetMappedEndpoints, self.mapped_endpoints)

    def _send_endpoints(self, command: type, endpoints: list[str]) -> defer.Deferred[None]:
        """Now if registered; otherwise kept for Register (or sent after it, by _prepare)."""
        if self._protocol is None:
            return defer.succeed(None)
        return self._call(self._protocol, command, endpoints=endpoints).addCallback(
            lambda _: None)

    def request_punch(self, network_id: str, peer_key: bytes) -> defer.Deferred[None]:
        """
        Ask the rendezvous to make both this node and C{peer_key} start
        traversal at once; both then get L{IRendezvousListener.punch_requested}.
        """
        if self._protocol is None:
            return defer.fail(NotConnectedError("not connected to the rendezvous"))
        return self._call(
            self._protocol, RequestPunch, network_id=network_id, peer_key=peer_key
        ).addCallback(lambda _: None)

    # -- connection setup -----------------------------------------------------

    @defer.inlineCallbacks
    def _prepare(self, protocol: ControlClientProtocol) -> Any:
        """Register and join on a fresh connection; a failure makes it retry."""
        hello = yield protocol.callRemote(Challenge)
        if hello["protocol"] != PROTOCOL_VERSION:
            raise auth.AuthError(f"rendezvous speaks protocol {hello['protocol']}")
        server_key = hello["server_key"]
        if self.expected_server_key is not None and server_key != self.expected_server_key:
            self.counters["server_key_mismatch"] += 1
            raise ServerKeyMismatchError("the rendezvous's server key is not the expected one")
        channel = IChannelBinding(protocol.transport, None)
        binding = b"" if channel is None else channel.channel_binding
        if not binding:
            raise auth.AuthError("the control channel is not keyed")
        proof = auth.registration_proof(
            self.private_key, self.public_key, server_key, hello["challenge"], binding
        )
        sent = (list(self.local_endpoints), list(self.mapped_endpoints))
        registered = yield protocol.callRemote(
            Register,
            public_key=self.public_key,
            proof=proof,
            name=self.node_name,
            local_endpoints=sent[0],
            version=__version__,
            mapped_endpoints=sent[1],
            accepts=[ZLIB],
        )
        self.server_key = server_key
        self.node_id = registered["node_id"]
        self.udp_ports = list(registered["udp_ports"])
        self.discovery_epoch = registered["discovery_epoch"]
        self.discovery6 = registered.get("discovery6")
        self._protocol = protocol
        self._revisions: dict[str, int] = {}
        self.counters["registrations"] += 1
        self.listener.connected(self.node_id)
        # Endpoints that changed while Register was answered (a port mapping
        # made as we connected) were kept, not sent: send them now.
        if self.local_endpoints != sent[0]:
            yield self._send_endpoints(SetLocalEndpoints, self.local_endpoints)
        if self.mapped_endpoints != sent[1]:
            yield self._send_endpoints(SetMappedEndpoints, self.mapped_endpoints)
        for network_id in list(self.networks):
            yield self._join(protocol, network_id)
        return protocol

    def _join(
        self, protocol: ControlClientProtocol, network_id: str
    ) -> defer.Deferred[str | None]:
        def joined(answer: dict[str, str]) -> str:
            status = answer["status"]
            self.status[network_id] = status
            if status == "authorized":
                self.auth_keys.pop(network_id, None)  # spent, or not needed again
            refused = answer.get("key_refused")
            if refused is not None:
                self.counters["auth_key_refused"] += 1
                self.log.warn("network {network}: {why}; waiting for an admin to authorize",
                              network=network_id, why=refused)
            self.listener.join_status(network_id, status)
            return status

        def unknown(failure: Failure) -> str:
            # That network alone: the others (and the connection) carry on.
            failure.trap(NotFoundError)
            self.counters["join_not_found"] += 1
            if self.status.get(network_id) != NOT_FOUND:
                self.log.warn("network {network}: the rendezvous does not know it (deleted, "
                              "or a mistyped ID); the other networks carry on",
                              network=network_id)
            self.status[network_id] = NOT_FOUND
            self.listener.join_status(network_id, NOT_FOUND)
            return NOT_FOUND

        arguments: dict[str, Any] = {"network_id": network_id}
        key = self.auth_keys.get(network_id)
        if key is not None:
            arguments["auth_key"] = key
        return self._call(protocol, Join, **arguments).addCallbacks(joined, unknown)

    def set_name(self, name: str) -> defer.Deferred[None]:
        """Be called C{name} from now on (and in every later registration)."""
        self.node_name = name
        if self._protocol is None:
            return defer.succeed(None)
        return self._call(self._protocol, SetName, name=name).addCallback(lambda _: None)

    @staticmethod
    def _call(protocol: ControlClientProtocol, command: type, **kwargs: Any) -> defer.Deferred:
        """
        C{callRemote}, with the answer handed to a fresh Deferred: AMP drops
        the connection when an error reaches the end of the callRemote
        chain, and our callers may attach their errbacks late.
        """
        result: defer.Deferred[Any] = defer.Deferred()
        protocol.callRemote(command, **kwargs).chainDeferred(result)
        return result

    def _connection_lost(self, protocol: ControlClientProtocol, reason: Failure) -> None:
        if self._stopped is not None and protocol is self._stopping:
            stopped, self._stopped, self._stopping = self._stopped, None, None
            self._clock.callLater(0, stopped.callback, None)
        if protocol is not self._protocol:
            return  # an attempt that failed: _attempt_failed retries
        self._protocol = None
        if self._liveness is not None and self._liveness.active():
            self._liveness.cancel()
        self.counters["disconnections"] += 1
        self.listener.disconnected(reason.getErrorMessage())
        # A connection that worked is retried at once (after a little
        # jitter); backoff grows only with attempts that fail.  With several
        # instances, the next one, spread over failover_spread seconds.
        if self._instances == 1:
            self._schedule(self._retry_policy(0))
        else:
            self.counters["failovers"] += 1
            self._schedule(self._rng.uniform(0.1, self.failover_spread))

    # -- pushes ---------------------------------------------------------------

    def _current(self, protocol: ControlClientProtocol, network_id: str) -> bool:
        """Only pushes for our networks on the registered connection count."""
        if protocol is not self._protocol or network_id not in self.networks:
            self.counters["drop_unexpected_push"] += 1
            return False
        return True

    def _map_pushed(self, protocol: ControlClientProtocol, network_id: str, data: bytes) -> None:
        if not self._current(protocol, network_id):
            return
        try:
            netmap = self._reader.read_map(data)
        except MapError:
            self.counters["drop_bad_map"] += 1
            self.log.failure("malformed network map for {network}", network=network_id)
            return
        if netmap.network_id != network_id or netmap.revision < self._revisions.get(network_id, -1):
            self.counters["drop_stale_map"] += 1
            return
        self._revisions[network_id] = netmap.revision
        self.maps[network_id] = netmap
        self.status[network_id] = "authorized"
        self.counters["maps"] += 1
        self.listener.map_received(network_id, netmap)

    def _delta_pushed(self, protocol: ControlClientProtocol, network_id: str, data: bytes) -> None:
        if not self._current(protocol, network_id):
            return
        base = self.maps.get(network_id)
        try:
            if base is None:
                raise MapError("a delta without a map to apply it to")
            netmap = self._reader.apply_delta(base, data)
        except MapError as e:
            # Our copy is behind (or broken): ask for the whole map.
            self.counters["delta_gap"] += 1
            self.log.info(
                "map delta for {network} not applied ({why}); asking for the map",
                network=network_id,
                why=str(e),
            )
            self._call(protocol, RequestMap, network_id=network_id).addErrback(
                lambda f: self.log.failure("asking for the map of {n}", f, n=network_id)
            )
            return
        self._revisions[network_id] = netmap.revision
        self.maps[network_id] = netmap
        self.counters["deltas"] += 1
        self.listener.map_received(network_id, netmap)

    def _punch_pushed(self, protocol: ControlClientProtocol, network_id: str, punch: Punch) -> None:
        if self._current(protocol, network_id):
            self.counters["punches"] += 1
            self.listener.punch_requested(network_id, punch)

    def _revoked_pushed(
        self, protocol: ControlClientProtocol, network_id: str, reason: str
    ) -> None:
        if not self._current(protocol, network_id):
            return
        self.maps.pop(network_id, None)
        self.status[network_id] = reason
        if reason != "deauthorized":
            # Deleted: a join would make it a new pending member; the
            # admin decides that, not a reconnecting node.
            self.networks.remove(network_id)
        self.counters["revoked"] += 1
        self.listener.revoked(network_id, reason)
