"""
The link between a standalone relay and the rendezvous: AMP over TLS.

Authenticated both ways: the relay pins the rendezvous's certificate (the
C{#sha256=} of its C{twistvpn://} address), and proves possession of its own
X25519 key, which the rendezvous must list as an authorized relay, with the
rendezvous's proof-of-possession scheme (L{twistvpn.common.auth}) under
a label of its own.  After login the rendezvous pushes every network's
authorized members, then each change as it happens (within its polling
interval, two seconds by default), so a deauthorization reaches the relay
within seconds.  The relay announces where nodes reach it, so that the
rendezvous can advertise it in network maps.

The rendezvous side is L{RelayLinkResponders} (a mixin for an AMP protocol,
so the rendezvous's control protocol can serve relays on its own port) over
a plain L{RelayLinkService}; L{RelayLinkServerProtocol} is a standalone AMP
protocol with just these commands.  The relay side is L{RelayLinkProtocol},
kept connected by a L{ClientService}.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from twistvpn.common import auth
from twistvpn.common.amp import BigBytes, BoundedAMP, Ping
from twistvpn.common.services import quiet
from twistvpn.relay.client import RelayInfo
from twistvpn.relay.policy import MembershipPolicy

LABEL_RELAY_LINK = b"twistvpn relay link v1"
KEY = 32
# After losing the rendezvous, the relay keeps the last membership table
# this long, then refuses everyone until the link is back (fail closed).
STALE_AFTER = 60.0
PING_INTERVAL = 30.0
LOGIN_TIMEOUT = 30.0  # the rendezvous drops a link connection that has not logged in


class NotAuthorizedError(Exception):
    """The relay's key is not an authorized relay, or its proof is wrong."""


ERRORS: dict[type[Exception], bytes] = {NotAuthorizedError: b"NOT_AUTHORIZED"}


class RelayChallenge(amp.Command):
    """relay -> rendezvous: a single-use challenge, and the server's key."""

    arguments = []
    response = [(b"challenge", amp.String()), (b"server_key", amp.String())]
    errors = ERRORS


class RelayLogin(amp.Command):
    """relay -> rendezvous: my key, proven; where nodes reach me (JSON map entry)."""

    arguments = [
        (b"relay_key", amp.String()),
        (b"proof", amp.String()),
        (b"announcement", amp.String()),
    ]
    response = []
    errors = ERRORS


class RelayMembers(amp.Command):
    """
    rendezvous -> relay: a network's authorized members (32-byte keys,
    joined), and which of them are stock WireGuard devices (docs/devices.md).
    """

    arguments = [(b"network_id", amp.Unicode()), (b"keys", BigBytes(max_length=KEY * 1_000_000)),
                 (b"devices", BigBytes(max_length=KEY * 1_000_000, optional=True))]
    response = []


class RelaySynced(amp.Command):
    """rendezvous -> relay: the networks that exist; forget any other."""

    arguments = [(b"networks", BigBytes(max_length=64 * 1_000_000))]
    response = []


def link_proof(private_key: bytes, peer_public: bytes, relay_key: bytes, server_key: bytes,
               challenge: bytes) -> bytes:
    """The relay's proof of possession over the link's challenge."""
    shared = auth.shared_key(private_key, peer_public)
    return auth.mac(shared, LABEL_RELAY_LINK, challenge, relay_key, server_key)


# -- the rendezvous's side -------------------------------------------------------


class RelayLinkService:
    """
    What the rendezvous knows of its relays: which keys may log in, the
    membership table it pushes, and the relays that announced themselves.
    """

    log = Logger()

    def __init__(self, server_private: bytes, server_public: bytes,
                 membership: MembershipPolicy,
                 relay_authorized: Callable[[bytes], bool],
                 on_relays_changed: Callable[[tuple[dict[str, Any], ...]], None] | None = None,
                 ) -> None:
        self.server_private = server_private
        self.server_public = server_public
        self.membership = membership
        self.relay_authorized = relay_authorized
        self.on_relays_changed = on_relays_changed
        self.connected: dict[bytes, tuple[Any, RelayInfo]] = {}
        membership.add_change_observer(self._changed)

    def relays(self) -> tuple[dict[str, Any], ...]:
        """The map entries of every connected relay."""
        return tuple(info.to_map() for _, info in self.connected.values())

    def logged_in(self, relay_key: bytes, protocol: Any, info: RelayInfo) -> None:
        old = self.connected.get(relay_key)
        self.connected[relay_key] = (protocol, info)
        if old is not None and old[0] is not protocol:
            old[0].transport.loseConnection()
        devices = self.membership.devices()
        for network_id, members in sorted(self.membership.networks().items()):
            protocol.push_members(network_id, members, devices.get(network_id, frozenset()))
        protocol.push_synced(sorted(self.membership.networks()))
        self._relays_changed()

    def gone(self, relay_key: bytes, protocol: Any) -> None:
        if self.connected.get(relay_key, (None,))[0] is protocol:
            del self.connected[relay_key]
            self._relays_changed()

    def _relays_changed(self) -> None:
        if self.on_relays_changed is not None:
            self.on_relays_changed(self.relays())

    def _changed(self, network_id: str, members: frozenset[bytes]) -> None:
        devices = self.membership.devices().get(network_id, frozenset())
        for protocol, _ in list(self.connected.values()):
            protocol.push_members(network_id, members, devices)


class RelayLinkResponders(amp.CommandLocator):
    """
    The relay link's commands, for an AMP protocol that sets
    C{self.relay_link} (a L{RelayLinkService}) before relays connect.
    """

    relay_link: RelayLinkService
    callRemote: Any  # from the AMP protocol this is mixed into
    _relay_challenge: bytes | None = None
    _relay_key: bytes | None = None

    @RelayChallenge.responder
    def relay_challenge(self) -> dict[str, Any]:
        self._relay_challenge = auth.new_challenge()
        return {"challenge": self._relay_challenge,
                "server_key": self.relay_link.server_public}

    @RelayLogin.responder
    def relay_login(self, relay_key: bytes, proof: bytes, announcement: bytes) -> dict[str, Any]:
        challenge, self._relay_challenge = self._relay_challenge, None  # single use
        service = self.relay_link
        if challenge is None or len(relay_key) != KEY or not service.relay_authorized(relay_key):
            raise NotAuthorizedError("not an authorized relay")
        try:
            expected = link_proof(service.server_private, relay_key, relay_key,
                                  service.server_public, challenge)
        except auth.AuthError:
            raise NotAuthorizedError("not an authorized relay") from None
        if not auth.check(expected, proof):
            raise NotAuthorizedError("not an authorized relay")
        try:
            info = RelayInfo.from_map(json.loads(announcement))
        except ValueError as e:
            raise NotAuthorizedError(f"bad announcement: {e}") from None
        if info.public_key != relay_key:
            raise NotAuthorizedError("the announcement names another key")
        self._relay_key = relay_key
        service.logged_in(relay_key, self, info)
        return {}

    def push_members(self, network_id: str, members: frozenset[bytes],
                     devices: frozenset[bytes] = frozenset()) -> None:
        self.callRemote(RelayMembers, network_id=network_id, keys=b"".join(sorted(members)),
                        devices=b"".join(sorted(devices))).addErrback(lambda _: None)

    def push_synced(self, networks: list[str]) -> None:
        self.callRemote(RelaySynced, networks=json.dumps(networks).encode()).addErrback(
            lambda _: None
        )

    def relay_link_lost(self) -> None:
        if self._relay_key is not None:
            self.relay_link.gone(self._relay_key, self)


class RelayLinkServerProtocol(RelayLinkResponders, BoundedAMP):
    """
    An AMP protocol that serves only the relay link.  A connection that has
    not logged in within L{LOGIN_TIMEOUT} seconds is dropped.
    """

    def __init__(self, service: RelayLinkService, clock: IReactorTime) -> None:
        super().__init__()
        self.relay_link = service
        self._clock = clock
        self._login_timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._login_timer = self._clock.callLater(LOGIN_TIMEOUT, self._login_timed_out)

    def _login_timed_out(self) -> None:
        self._login_timer = None
        if self._relay_key is None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self.relay_link_lost()
        super().connectionLost(reason)


def relay_link_server_factory(service: RelayLinkService, clock: IReactorTime) -> Factory:
    """The rendezvous's listening factory for standalone relays' links."""
    return quiet(Factory.forProtocol(functools.partial(RelayLinkServerProtocol, service, clock)))


# -- the relay's side ----------------------------------------------------------------


class RelayLinkProtocol(BoundedAMP):
    """The relay's connection to the rendezvous."""

    log = Logger()

    def __init__(self, link: RelayLink) -> None:
        super().__init__()
        self.link = link
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = link.clock
        self._ping_outstanding = False

    def connectionMade(self) -> None:
        super().connectionMade()
        d = self.callRemote(RelayChallenge)
        d.addCallback(self._login)
        d.addCallbacks(self._logged_in, self._failed)

    def _login(self, answer: dict[str, Any]) -> Deferred[Any]:
        link = self.link
        proof = link_proof(link.private_key, answer["server_key"], link.public_key,
                           answer["server_key"], answer["challenge"])
        announcement = json.dumps(link.announcement(self)).encode()
        return self.callRemote(RelayLogin, relay_key=link.public_key, proof=proof,
                               announcement=announcement)

    def _logged_in(self, _: Any) -> None:
        self.link.connected(self)
        self._pinger.start(PING_INTERVAL, now=False)

    def _ping(self) -> None:
        """A rendezvous that vanished without a FIN is noticed here."""
        if self._ping_outstanding:
            self.transport.abortConnection()
            return
        self._ping_outstanding = True

        def answered(_: Any) -> None:
            self._ping_outstanding = False

        self.callRemote(Ping).addCallbacks(answered, lambda _: None)

    def _failed(self, failure: Failure) -> None:
        self.link.counters_login_failed += 1
        self.log.error("the rendezvous refused this relay: {why}",
                       why=failure.getErrorMessage())
        self.transport.loseConnection()

    @RelayMembers.responder
    def members(self, network_id: str, keys: bytes, devices: bytes = b"") -> dict[str, Any]:
        if len(keys) % KEY or len(devices) % KEY:
            raise ValueError("keys are not 32 bytes each")
        self.link.policy.set_members(
            network_id, [keys[i : i + KEY] for i in range(0, len(keys), KEY)]
        )
        self.link.policy.set_devices(
            network_id, [devices[i : i + KEY] for i in range(0, len(devices), KEY)])
        return {}

    @RelaySynced.responder
    def synced(self, networks: bytes) -> dict[str, Any]:
        current = {str(n) for n in json.loads(networks)}
        for network_id in list(self.link.policy.networks()):
            if network_id not in current:
                self.link.policy.forget_network(network_id)
        self.link.synced = True
        return {}

    @Ping.responder
    def ping(self) -> dict[str, Any]:
        return {}

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._pinger.running:
            self._pinger.stop()
        self.link.disconnected(self)
        super().connectionLost(reason)


class RelayLink:
    """
    Keeps the relay logged in to the rendezvous and its L{MembershipPolicy}
    current; fails closed when the rendezvous stays away.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, endpoint: IStreamClientEndpoint,
                 private_key: bytes, public_key: bytes, policy: MembershipPolicy,
                 announce: Callable[[Any], RelayInfo],
                 stale_after: float = STALE_AFTER) -> None:
        self.clock = clock
        self.private_key = private_key
        self.public_key = public_key
        self.policy = policy
        self._announce = announce
        self.stale_after = stale_after
        self.protocol: RelayLinkProtocol | None = None
        self.synced = False
        self.counters_login_failed = 0
        self._stale_call: IDelayedCall | None = None
        factory = quiet(Factory.forProtocol(lambda: RelayLinkProtocol(self)))
        self.service = ClientService(endpoint, factory, retryPolicy=backoffPolicy(
            initialDelay=1.0, maxDelay=30.0), clock=clock)

    def announcement(self, protocol: RelayLinkProtocol) -> dict[str, Any]:
        return self._announce(protocol).to_map()

    def start(self) -> None:
        self.service.startService()

    def stop(self) -> Deferred[None]:
        self._cancel_stale()
        return self.service.stopService()

    def connected(self, protocol: RelayLinkProtocol) -> None:
        self.protocol = protocol
        self._cancel_stale()
        self.log.info("logged in to the rendezvous")

    def disconnected(self, protocol: RelayLinkProtocol) -> None:
        if self.protocol is not protocol:
            return
        self.protocol = None
        self.synced = False
        self._cancel_stale()
        self._stale_call = self.clock.callLater(self.stale_after, self._stale)

    def _stale(self) -> None:
        self._stale_call = None
        self.log.warn("no rendezvous for {s}s: refusing every relay flow", s=self.stale_after)
        self.synced = False
        self.policy.replace_all({})

    def _cancel_stale(self) -> None:
        if self._stale_call is not None and self._stale_call.active():
            self._stale_call.cancel()
        self._stale_call = None
