"""
Shared fixtures for the rendezvous tests: an in-memory world with a
controller, the AMP server and node clients connected through iosim pumps,
all on one L{Clock}.  (No tests here.)
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.test import iosim
from zope.interface import directlyProvides, implementer

from twistvpn.interfaces import (
    IChannelBinding,
    IControlSession,
    IMembershipObserver,
    IRendezvousListener,
)
from twistvpn.rendezvous.client import RendezvousClient
from twistvpn.rendezvous.controller import Controller
from twistvpn.rendezvous.database import get_db
from twistvpn.rendezvous.server import ControlServerFactory
from twistvpn.rendezvous.store import SQLiteStore
from twistvpn.wireguard.keys import generate_private_key, public_key

PUSH_DELAY = 0.05


@implementer(IRendezvousListener)
class RecordingListener:
    """Remembers every event a client reports, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def connected(self, node_id: str) -> None:
        self.events.append(("connected", node_id))

    def disconnected(self, reason: str) -> None:
        self.events.append(("disconnected", reason))

    def join_status(self, network_id: str, status: str) -> None:
        self.events.append(("join_status", network_id, status))

    def map_received(self, network_id: str, netmap: Any) -> None:
        self.events.append(("map", network_id, netmap))

    def punch_requested(self, network_id: str, punch: Any) -> None:
        self.events.append(("punch", network_id, punch))

    def revoked(self, network_id: str, reason: str) -> None:
        self.events.append(("revoked", network_id, reason))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == kind]

    def maps(self) -> list[Any]:
        return [e[2] for e in self.of("map")]


@implementer(IControlSession)
class FakeSession:
    """An IControlSession that records what the controller pushes."""

    def __init__(self, public_key: bytes, rtt: float | None = None) -> None:
        self.public_key = public_key
        self.rtt = rtt
        self.maps: list[tuple[str, Any]] = []
        self.deltas: list[tuple[str, Any]] = []
        self.punches: list[tuple[str, Any]] = []
        self.revoked: list[tuple[str, str]] = []
        self.closed: list[str] = []

    def send_map(self, network_id: str, netmap: Any) -> None:
        self.maps.append((network_id, netmap))

    def send_map_delta(self, network_id: str, delta: Any) -> None:
        """Kept as the full map it makes, so tests read maps either way."""
        base = next(m for n, m in reversed(self.maps) if n == network_id)
        self.deltas.append((network_id, delta))
        self.maps.append((network_id, base.apply(delta)))

    def send_punch(self, network_id: str, punch: Any) -> None:
        self.punches.append((network_id, punch))

    def send_revoked(self, network_id: str, reason: str) -> None:
        self.revoked.append((network_id, reason))

    def close(self, reason: str) -> None:
        self.closed.append(reason)


def bind_channel(pump: iosim.IOPump, binding: bytes | None = None) -> bytes:
    """
    Give both ends of an in-memory connection the same channel binding, as
    the control channel's TLS exporter gives a real one (IChannelBinding).
    """
    value = os.urandom(64) if binding is None else binding
    for transport in (pump.clientIO, pump.serverIO):
        directlyProvides(transport, IChannelBinding)
        transport.channel_binding = value  # type: ignore[attr-defined]
    return value


@implementer(IMembershipObserver)
class RecordingObserver:
    """An IMembershipObserver that remembers what the controller told it."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def members_changed(self, network_id: str, authorized: frozenset[bytes],
                        devices: frozenset[bytes]) -> None:
        self.events.append(("members", network_id, authorized, devices))

    def member_revoked(self, network_id: str, public_key: bytes, reason: str) -> None:
        self.events.append(("revoked", network_id, public_key, reason))

    def network_deleted(self, network_id: str) -> None:
        self.events.append(("deleted", network_id))


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects each client to a fresh server protocol through an IOPump."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.refuse = False
        self.pumps: list[iosim.IOPump] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.refuse:
            return defer.fail(ConnectionRefusedError("refused by the test"))
        client = factory.buildProtocol(None)
        server = self.world.server_factory.buildProtocol(None)
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
            clock=self.world.clock,
        )
        bind_channel(pump)
        self.pumps.append(pump)
        self.world.pumps.append(pump)
        return defer.succeed(client)

    def drop(self) -> None:
        """Cut the current connection (as a reset would)."""
        self.pumps[-1].serverIO.loseConnection()
        self.world.flush()


class World:
    """A rendezvous (controller + AMP server) and nodes, all in memory."""

    def __init__(self, db_path: str = ":memory:", clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.db = get_db(db_path)
        self.controller = Controller(SQLiteStore(self.db), self.clock, push_delay=PUSH_DELAY)
        self.server_private = generate_private_key()
        self.server_factory = ControlServerFactory(
            self.controller, self.server_private, self.clock, udp_ports=(3478, 3479)
        )
        self.pumps: list[iosim.IOPump] = []

    def flush(self) -> None:
        """Move every byte until the wires are quiet."""
        for _ in range(50):
            if not any([p.flush(advanceClock=False) for p in self.pumps]):
                return

    def settle(self, seconds: float = 1.0) -> None:
        """Deliver everything, including coalesced pushes."""
        self.flush()
        self.clock.advance(seconds)
        self.flush()

    def node(
        self, name: str = "node", networks: tuple[str, ...] = (), flush: bool = True,
        **kwargs: Any
    ) -> tuple[RendezvousClient, RecordingListener, MemoryEndpoint]:
        """A started client; call settle() to let it register (C{flush}: start it talking)."""
        listener = RecordingListener()
        endpoint = MemoryEndpoint(self)
        client = RendezvousClient(
            endpoint,
            kwargs.pop("private_key", None) or generate_private_key(),
            name,
            listener,
            clock=self.clock,
            networks=networks,
            **kwargs,
        )
        client.startService()
        if flush:
            self.flush()
        return client, listener, endpoint

    def authorize(self, network_id: str, client: RendezvousClient) -> dict[str, Any]:
        result = self.controller.authorize(network_id, client.node_id)
        self.settle()
        return result


def new_key() -> tuple[bytes, bytes]:
    """A fresh (private, public) key pair."""
    private = generate_private_key()
    return private, public_key(private)


def fake_member(controller: Any, network_id: str, name: str,
                authorize: bool = True) -> tuple[bytes, FakeSession]:
    """A node registered on C{controller} through a FakeSession, joined (and authorized)."""
    from twistvpn.rendezvous.controller import node_id_of

    _, public = new_key()
    session = FakeSession(public)
    controller.register_node(public, name, session)
    controller.join(public, network_id)
    if authorize:
        controller.authorize(network_id, node_id_of(public))
    return public, session
