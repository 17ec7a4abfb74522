"""
An in-memory world for relay tests: a relay server, nodes with relay
clients and WireGuard stand-ins, on the in-memory internet.
"""

from __future__ import annotations

import os
import struct
import tempfile

from twisted.internet.defer import succeed
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock

from tests.support.rendezvous import FakeSession
from twistvpn.node.forwarder import Forwarder
from twistvpn.relay.client import (
    RelayClient,
    RelayInfo,
)
from twistvpn.relay.link import (
    RelayLinkService,
)
from twistvpn.relay.policy import ControllerMembership, MembershipPolicy
from twistvpn.relay.server import RelayLimits, RelayServer
from twistvpn.relay.transport import RelayDatagramProtocol
from twistvpn.rendezvous.controller import Controller
from twistvpn.rendezvous.store import open_store
from twistvpn.testing.memorynet import MemoryInternet, StreamPump
from twistvpn.testing.pathsim import Inbox
from twistvpn.wireguard.keys import encode_key, generate_private_key, public_key

RELAY_ADDR = ("203.0.113.1", 3478)


NET = "8056c2e21c000001"


class Node:
    def __init__(self, world: World, addr: tuple[str, int]) -> None:
        self.addr = addr
        self.private = generate_private_key()
        self.key = public_key(self.private)
        self.forwarder = Forwarder()
        self.wireguard = Inbox()  # stands in for WireGuard: what arrives, and from where
        self.forwarder.set_wireguard(self.wireguard)
        world.net.bind(self.forwarder, addr)
        self.client = RelayClient(world.clock, self.forwarder, self.private,
                                  world.net.stream_connector(world.server))
        self.client.set_relays(world.relays)
        self.client.start()

    def send_to(self, other: Node, data: bytes) -> None:
        endpoint = self.client.relay_endpoint(other.key)
        self.forwarder.send_datagram(data, endpoint)


def data_message(n: int, size: int = 100) -> bytes:
    """Something shaped like a WireGuard transport message (type 4)."""
    return struct.pack("<I", 4) + n.to_bytes(12, "little") + bytes(size)


class World:
    def __init__(self, limits: RelayLimits | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.net = MemoryInternet(self.clock)
        self.policy = MembershipPolicy()
        self.relay_private = generate_private_key()
        self.server = RelayServer(self.clock, self.relay_private,
                                  public_key(self.relay_private), self.policy, limits,
                                  relay_id="r1")
        self.relay_udp = RelayDatagramProtocol(self.server)
        self.net.bind(self.relay_udp, RELAY_ADDR)
        self.server.start()
        self.relays = [RelayInfo("r1", RELAY_ADDR[0], RELAY_ADDR[1], 443,
                                 public_key(self.relay_private))]
        self._next = 1

    def node(self, udp_blocked: bool = False) -> Node:
        addr = (f"198.51.100.{self._next}", 40000 + self._next)
        self._next += 1
        if udp_blocked:
            self.net.udp_blocked.add(addr)
        return Node(self, addr)

    def pair(self, **kw: bool) -> tuple[Node, Node]:
        a, b = self.node(udp_blocked=kw.get("a_blocked", False)), self.node(
            udp_blocked=kw.get("b_blocked", False))
        self.policy.set_members(NET, [a.key, b.key])
        return a, b

    def registered_pair(self, seconds: float = 1, **kw: bool) -> tuple[Node, Node]:
        """Two members, both registered with the relay (as nodes do at start)."""
        a, b = self.pair(**kw)
        a.client.relay_endpoint(b.key)
        b.client.relay_endpoint(a.key)
        self.net.run(seconds)
        return a, b


class MemoryEndpoint:
    """A client endpoint that connects to a fresh server protocol in memory."""

    def __init__(self, clock: Clock, make_server: object) -> None:
        self.clock = clock
        self.make_server = make_server
        self.pumps: list[StreamPump] = []
        self.servers: list[object] = []
        self.refuse = False

    def connect(self, factory: Factory) -> object:
        if self.refuse:
            from twisted.internet.defer import fail
            from twisted.internet.error import ConnectionRefusedError

            return fail(ConnectionRefusedError())
        client = factory.buildProtocol(None)
        server = self.make_server()
        self.servers.append(server)
        self.pumps.append(StreamPump(client, server))
        return succeed(client)

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()


class Rendezvous:
    """A real controller in a temporary database, with the relay link's server."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        path = os.path.join(tempfile.mkdtemp(), "rendezvous.sqlite")
        self.controller = Controller(open_store(path), clock)
        self.membership = ControllerMembership(self.controller)
        self.server_private = generate_private_key()
        self.relay_keys: set[bytes] = set()
        self.advertised: tuple[dict[str, object], ...] = ()
        self.service = RelayLinkService(
            self.server_private, public_key(self.server_private), self.membership.policy,
            self.relay_keys.__contains__, self._relays_changed,
        )
        self.network_id = self.controller.create_network("test")["id"]

    def _relays_changed(self, relays: tuple[dict[str, object], ...]) -> None:
        self.advertised = relays

    def member(self, key: bytes) -> None:
        self.controller.register_node(key, "n", FakeSession(key))
        self.controller.join(key, self.network_id)
        self.controller.authorize(self.network_id, encode_key(key))
