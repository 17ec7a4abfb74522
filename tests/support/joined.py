"""
The whole system in memory for the joined-node tests: a real rendezvous
(controller, AMP server, both UDP discovery ports), the real relay, and
joined nodes (real forwarder, WireGuard, probes, path managers, relay
client, rendezvous client) on the simulated NAT network, with fake TUN
devices.  All on one Clock.  (No tests here.)
"""

from __future__ import annotations

import random
from typing import Any

from twisted.test import iosim

from tests.support.rendezvous import MemoryEndpoint, World
from twistvpn.node.forwarder import Forwarder
from twistvpn.node.joined import JoinedNode
from twistvpn.relay.client import RelayClient, RelayInfo
from twistvpn.relay.policy import ControllerMembership
from twistvpn.relay.server import RelayServer
from twistvpn.relay.transport import (
    RelayClientStreamProtocol,
    RelayDatagramProtocol,
    relay_stream_factory,
)
from twistvpn.rendezvous.client import RendezvousClient
from twistvpn.rendezvous.discovery import DiscoveryClient, DiscoveryProtocol, DiscoveryState
from twistvpn.testing.faketun import FakeTunDevice
from twistvpn.testing.natsim import Host, Internet
from twistvpn.testing.pathsim import ipv4_packet
from twistvpn.traversal.probe import ProbeService
from twistvpn.wireguard.device import WireGuardDevice
from twistvpn.wireguard.keys import clamp, public_key

NODE_PORT = 41641
DISCOVERY_PORTS = (3478, 3479)
RELAY_PORT = 3480


class SimJoinedNode:
    """One joined node on a simulated host, built as the service builds it."""

    def __init__(self, mesh: Mesh, host: Host, name: str, networks: list[str],
                 seed: int, **node_options: Any) -> None:
        rng = random.Random(seed)
        self.mesh = mesh
        self.host = host
        self.name = name
        self.private_key = clamp(rng.randbytes(32))
        self.public_key = public_key(self.private_key)
        reactor = host.reactor
        self.forwarder = Forwarder()
        self.port = reactor.listenUDP(NODE_PORT, self.forwarder)
        self.tun = FakeTunDevice()
        self.device = WireGuardDevice(self.private_key, reactor, self.forwarder.send_datagram,
                                      self.tun.write, random=rng.randbytes,
                                      wall_clock=reactor.seconds)
        self.forwarder.set_wireguard(self.device)
        self.probes = ProbeService(self.forwarder, reactor, self.private_key, self.public_key,
                                   random_bytes=rng.randbytes)
        self.relay = RelayClient(reactor, self.forwarder, self.private_key,
                                 mesh.connect_stream)
        self.node = JoinedNode(
            reactor, self.public_key, forwarder=self.forwarder,
            device=self.device, tun=self.tun, probes=self.probes, relay=self.relay,
            listen_port=lambda: NODE_PORT, local_addresses=lambda: [host.ip],
            make_discovery=self._discovery, discovery_host=mesh.rendezvous_host.ip,
            rng=random.Random(seed + 1), **node_options)
        self.endpoint = MemoryEndpoint(mesh.world)
        self.client = RendezvousClient(
            self.endpoint, self.private_key, name, self.node, clock=mesh.clock,
            networks=networks, local_endpoints=self.node.local_endpoints(),
            retry_policy=lambda failures: min(1.0 * 2 ** failures, 8.0))
        self.node.attach(self.client)
        self.node.start()
        self.client.startService()

    def _discovery(self, server_key: bytes, servers: list[tuple[str, int]],
                   epoch: bytes) -> DiscoveryClient:
        return DiscoveryClient(self.forwarder, self.host.reactor, self.private_key,
                               server_key, servers, epoch=epoch)

    @property
    def ip(self) -> str:
        """This node's managed IP (its first)."""
        return self.node.addresses[0].split("/")[0]

    def peer(self, other: SimJoinedNode) -> Any:
        return self.node.peers[other.public_key]

    def send_to(self, other: SimJoinedNode, payload: bytes) -> bytes:
        """Write a packet for C{other} into our TUN device, as the kernel would."""
        packet = ipv4_packet(self.ip, other.ip, payload)
        self.tun.inject(packet)
        return packet

    def stop(self) -> None:
        self.client.stopService()
        self.node.stop()


class Mesh:
    """The rendezvous, a relay, and joined nodes on one simulated internet."""

    def __init__(self, seed: int = 0, **node_options: Any) -> None:
        self.node_options = node_options  # for every JoinedNode (eager_peers, ...)
        self.internet = Internet(seed=seed)
        self.clock = self.internet.clock
        self.world = World(clock=self.clock)
        self.controller = self.world.controller
        self.rendezvous_host = self.internet.add_public_host()
        state = DiscoveryState(self.controller, self.world.server_private, self.clock,
                               epoch=self.world.server_factory.discovery_epoch)
        for which, port in enumerate(DISCOVERY_PORTS):
            self.rendezvous_host.reactor.listenUDP(port, DiscoveryProtocol(state, which))
        relay_host = self.internet.add_public_host()
        relay_private = clamp(random.Random(seed ^ 0x4E1A).randbytes(32))
        self.membership = ControllerMembership(self.controller)
        self.membership.start()
        self.relay_server = RelayServer(relay_host.reactor, relay_private,
                                        public_key(relay_private), self.membership.policy,
                                        relay_id="rdv")
        relay_host.reactor.listenUDP(RELAY_PORT, RelayDatagramProtocol(self.relay_server))
        self.relay_server.start()
        self.relay_info = RelayInfo("rdv", relay_host.ip, RELAY_PORT, 443,
                                    public_key(relay_private))
        self.controller.relays = (self.relay_info.to_map(),)
        self.network = self.controller.create_network("home")["id"]
        self.nodes: list[SimJoinedNode] = []
        self._seed = seed

    def connect_stream(self, info: Any, receiver: Any) -> Any:
        """TCP to the relay (the simulation only does UDP): fake transports."""
        server = relay_stream_factory(self.relay_server).buildProtocol(None)
        client = RelayClientStreamProtocol(receiver, tls=False)
        self.world.pumps.append(iosim.connect(server, iosim.makeFakeServer(server), client,
                                              iosim.makeFakeClient(client), greet=False,
                                              clock=self.clock))
        return client.ready

    def add(self, name: str, host: Host, networks: list[str] | None = None) -> SimJoinedNode:
        node = SimJoinedNode(self, host, name,
                             [self.network] if networks is None else networks,
                             self._seed * 100 + len(self.nodes), **self.node_options)
        self.nodes.append(node)
        self.run(0.5)
        return node

    def members(self, *presets: str, authorize: bool = True) -> list[SimJoinedNode]:
        """Nodes alpha, beta, gamma... behind fresh NATs of C{presets}, authorized."""
        names = ("alpha", "beta", "gamma", "delta")
        nodes = [self.add(name, self.internet.add(preset))
                 for name, preset in zip(names, presets, strict=False)]
        if authorize:
            self.authorize(*nodes)
        return nodes

    def authorize(self, *nodes: SimJoinedNode, network: str | None = None) -> None:
        for node in nodes:
            self.controller.authorize(network or self.network, node.client.node_id)
        self.run(0.5)

    def run(self, seconds: float, until: Any = None, step: float = 0.02) -> bool:
        """Let C{seconds} pass, moving control bytes and datagrams; stop at C{until}."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.world.flush()
            if until is not None and until():
                return True
            self.internet.run(min(step, end - self.clock.seconds()))
        self.world.flush()
        return until is not None and until()

    def delivered(self, sender: SimJoinedNode, receiver: SimJoinedNode,
                  payload: bytes, seconds: float = 3.0) -> bool:
        """Whether a packet from C{sender}'s TUN comes out of C{receiver}'s."""
        packet = sender.send_to(receiver, payload)
        return self.run(seconds, until=lambda: packet in receiver.tun.written)
