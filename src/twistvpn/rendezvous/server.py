"""
The rendezvous's end of the control channel: a thin AMP adapter between one
node's connection and the L{Controller}.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistvpn.common import auth
from twistvpn.common.amp import BoundedAMP, Ping
from twistvpn.common.ratelimit import TokenBuckets
from twistvpn.interfaces import IChannelBinding, IControlSession, INetworkController
from twistvpn.rendezvous.errors import InvalidArgumentError
from twistvpn.rendezvous.netmap import ZLIB, MapDelta, NetworkMap, Punch, kept
from twistvpn.rendezvous.protocol import (
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
    encoded_push,
)
from twistvpn.wireguard.keys import public_key

# A connection that has not registered by then is dropped.
REGISTER_TIMEOUT = 30.0
# Registered connections are pinged this often; a ping unanswered for
# PING_TIMEOUT drops the connection (the node is then offline).
PING_INTERVAL = 45.0
PING_TIMEOUT = 30.0
MAX_CHALLENGES = 8
# How long stopping waits for connections to close before cutting them.
CLOSE_TIMEOUT = 2.0


def _push_of(obj: NetworkMap | MapDelta, compressed: bool) -> bytes:
    """The push of a map or delta as it goes on the wire, encoded once (netmap.kept)."""

    def encode() -> bytes:
        payload = obj.compressed() if compressed else obj.to_json()
        if isinstance(obj, NetworkMap):
            return encoded_push(NetworkMapPush, network_id=obj.network_id, netmap=payload)
        return encoded_push(MapDeltaPush, network_id=obj.network_id, delta=payload)

    return kept(obj, ("box", compressed), encode)


@implementer(IControlSession)
class ControlServerProtocol(BoundedAMP):
    """One node's control connection."""

    log = Logger()

    def __init__(self, service: ControlServerFactory) -> None:
        super().__init__()
        self._service = service
        self.public_key: bytes | None = None
        self._compressed = False  # whether the node reads compressed maps (ZLIB)
        self.node_id: str | None = None
        self.rtt: float | None = None
        self._challenge: bytes | None = None
        self._challenges_issued = 0
        self._timer: IDelayedCall | None = None
        self._closed = False

    # -- connection lifetime ---------------------------------------------------

    @property
    def _clock(self) -> IReactorTime:
        return self._service.clock

    def connectionMade(self) -> None:
        super().connectionMade()
        self._service.counters["connections"] += 1
        self._service.connections.add(self)
        self._timer = self._clock.callLater(REGISTER_TIMEOUT, self._timed_out, "register")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._cancel_timer()
        if self.public_key is not None:
            self._service.controller.detach(self)
        super().connectionLost(reason)
        self._service._lost(self)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self, what: str) -> None:
        self._timer = None
        self._service.counters[f"timeout_{what}"] += 1
        self.close(f"{what} timeout")

    def box_too_big(self) -> None:
        self._service.counters["drop_box_too_big"] += 1

    def malformed(self, what: str) -> None:
        self._service.counters["bad_request"] += 1
        super().malformed(what)

    def _schedule_ping(self) -> None:
        self._cancel_timer()
        self._timer = self._clock.callLater(PING_INTERVAL, self._ping)

    def _ping(self) -> None:
        """Measure the round trip; no answer in time means a dead peer."""
        sent = self._clock.seconds()
        self._cancel_timer()
        self._timer = self._clock.callLater(PING_TIMEOUT, self._timed_out, "ping")

        def answered(_: Any) -> None:
            self.rtt = self._clock.seconds() - sent
            if not self._closed:
                self._schedule_ping()

        self.callRemote(Ping).addCallbacks(answered, lambda _: None)

    # -- commands -------------------------------------------------------------

    @Challenge.responder
    def challenge(self) -> dict[str, Any]:
        if self.public_key is not None:
            raise InvalidArgumentError("already registered")
        self._challenges_issued += 1
        if self._challenges_issued > MAX_CHALLENGES:
            raise InvalidArgumentError("too many challenges")
        # Each registration costs a Diffie-Hellman and may add a node to
        # the database: a source address gets only so many.
        source = getattr(self.transport.getPeer(), "host", None)
        limits = self._service.registration_limits
        if limits is not None and not limits.allow(source):
            self._service.counters["registration_rate_limited"] += 1
            raise InvalidArgumentError("too many registrations from this address; try later")
        self._challenge = auth.new_challenge()
        return {
            "challenge": self._challenge,
            "server_key": self._service.server_public,
            "protocol": PROTOCOL_VERSION,
        }

    @Register.responder
    def register(
        self, public_key: bytes, proof: bytes, name: str, local_endpoints: list[str],
        version: str | None = None, mapped_endpoints: list[str] | None = None,
        accepts: list[str] | None = None,
    ) -> dict[str, Any]:
        # The challenge is used up by any attempt, right or wrong, so a
        # proof can never be replayed, not even on this connection.
        challenge, self._challenge = self._challenge, None
        if self.public_key is not None:
            raise InvalidArgumentError("already registered")
        if challenge is None:
            self._service.counters["auth_no_challenge"] += 1
            raise auth.AuthError("ask for a challenge first")
        channel = IChannelBinding(self.transport, None)
        binding = b"" if channel is None else channel.channel_binding
        if not binding or not auth.verify_registration(
            self._service.server_private,
            self._service.server_public,
            public_key,
            challenge,
            proof,
            binding,
        ):
            self._service.counters["auth_failed"] += 1
            raise auth.AuthError("the proof of possession does not verify")
        controller = self._service.controller
        node_id = controller.register_node(public_key, name, self)
        controller.set_version(public_key, (version or "")[:32])
        self.public_key, self.node_id = public_key, node_id
        self._compressed = ZLIB in (accepts or ())
        try:
            controller.set_local_endpoints(public_key, local_endpoints)
            controller.set_mapped_endpoints(public_key, mapped_endpoints or [])
        except InvalidArgumentError:
            self._service.counters["bad_local_endpoints"] += 1
        # The first ping measures the round trip punches are timed with.
        self._cancel_timer()
        self._timer = self._clock.callLater(0, self._ping)
        return {"node_id": node_id, "udp_ports": list(self._service.udp_ports),
                "discovery_epoch": self._service.discovery_epoch,
                "discovery6": self._service.discovery6}

    def _registered(self) -> bytes:
        if self.public_key is None:
            raise InvalidArgumentError("register first")
        return self.public_key

    @Join.responder
    def join(self, network_id: str, auth_key: str | None = None) -> dict[str, Any]:
        status, refused = self._service.controller.join_with_key(
            self._registered(), network_id, auth_key)
        answer: dict[str, Any] = {"status": status}
        if refused is not None:
            answer["key_refused"] = refused
        return answer

    @Leave.responder
    def leave(self, network_id: str) -> dict[str, Any]:
        self._service.controller.leave(self._registered(), network_id)
        return {}

    @SetName.responder
    def set_name(self, name: str) -> dict[str, Any]:
        self._service.controller.rename_node(self._registered(), name)
        return {}

    @SetMappedEndpoints.responder
    def set_mapped_endpoints(self, endpoints: list[str]) -> dict[str, Any]:
        self._service.controller.set_mapped_endpoints(self._registered(), endpoints)
        return {}

    @SetLocalEndpoints.responder
    def set_local_endpoints(self, endpoints: list[str]) -> dict[str, Any]:
        self._service.controller.set_local_endpoints(self._registered(), endpoints)
        return {}

    @RequestMap.responder
    def request_map(self, network_id: str) -> dict[str, Any]:
        self._service.controller.resend_map(self._registered(), network_id)
        return {}

    @RequestPunch.responder
    def request_punch(self, network_id: str, peer_key: bytes) -> dict[str, Any]:
        self._service.controller.request_punch(self._registered(), network_id, peer_key)
        return {}

    @Ping.responder
    def ping(self) -> dict[str, Any]:
        return {"failover_spread": self._service.controller.failover_spread()}

    # -- IControlSession --------------------------------------------------------

    def send_map(self, network_id: str, netmap: NetworkMap) -> None:
        if not self._closed and self.transport is not None:
            self.transport.write(_push_of(netmap, self._compressed))

    def send_map_delta(self, network_id: str, delta: MapDelta) -> None:
        if not self._closed and self.transport is not None:
            self.transport.write(_push_of(delta, self._compressed))

    def send_punch(self, network_id: str, punch: Punch) -> None:
        if not self._closed:
            self.callRemote(
                PunchPush,
                network_id=network_id,
                peer_key=punch.peer_key,
                candidates=list(punch.candidates),
                delay=punch.delay,
                punch_id=punch.punch_id,
            )

    def send_revoked(self, network_id: str, reason: str) -> None:
        if not self._closed:
            self.callRemote(RevokedPush, network_id=network_id, reason=reason)

    def close(self, reason: str) -> None:
        self.log.info(
            "closing control connection of {node}: {reason}", node=self.node_id, reason=reason
        )
        if self.transport is not None and not self._closed:
            self.transport.loseConnection()


class ControlServerFactory(Factory):
    """Builds a L{ControlServerProtocol} per connection; holds what they share."""

    noisy = False  # no "Starting protocol/factory" line per connection or port

    def __init__(
        self,
        controller: INetworkController,
        server_private: bytes,
        clock: IReactorTime,
        udp_ports: tuple[int, ...] = (),
        registration_rate: float = 20.0,
        discovery_epoch: bytes = b"\x00" * 8,
        discovery6: str | None = None,
    ) -> None:
        self.controller = controller
        self.discovery_epoch = discovery_epoch
        self.discovery6 = discovery6
        self.server_private = server_private
        self.server_public = public_key(server_private)
        self.clock = clock
        self.udp_ports = udp_ports
        self.counters: collections.Counter[str] = collections.Counter()
        self.connections: set[ControlServerProtocol] = set()
        # registrations per second per source address (bursts of 5 s worth)
        self.registration_limits = (
            TokenBuckets(clock, registration_rate, max(1.0, 5 * registration_rate))
            if registration_rate > 0
            else None
        )
        self._drained: list[defer.Deferred[None]] = []

    def close_all(self) -> defer.Deferred[None]:
        """Close every connection; fires when all are gone."""
        if not self.connections:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        for protocol in list(self.connections):
            protocol.close("the rendezvous is stopping")

        def abort() -> None:
            # A peer that does not take the close (a full window) is cut.
            for protocol in list(self.connections):
                if protocol.transport is not None:
                    protocol.transport.abortConnection()

        call = self.clock.callLater(CLOSE_TIMEOUT, abort)
        return d.addBoth(lambda result: call.cancel() if call.active() else None)

    def _lost(self, protocol: ControlServerProtocol) -> None:
        self.connections.discard(protocol)
        if not self.connections:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def buildProtocol(self, addr: Any) -> ControlServerProtocol:
        protocol = ControlServerProtocol(self)
        protocol.factory = self
        return protocol
