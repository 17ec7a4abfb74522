"""
The real relay as the path manager's last resort, on the simulated NAT
network (L{twistvpn.testing.pathsim}): two nodes that no strategy can
connect end on the relay, and WireGuard traffic passes through it; a node
whose network blocks UDP reaches the relay over TCP.
"""

from __future__ import annotations

from typing import Any

from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from twistvpn.relay.client import RelayClient, RelayEndpoint, RelayInfo
from twistvpn.relay.policy import MembershipPolicy
from twistvpn.relay.server import RelayServer
from twistvpn.relay.transport import (
    RelayClientStreamProtocol,
    RelayDatagramProtocol,
    relay_stream_factory,
)
from twistvpn.testing.pathsim import OVERLAY, Pair, ipv4_packet
from twistvpn.traversal.manager import PathConfig
from twistvpn.wireguard.keys import generate_private_key, public_key

RELAY_PORT = 3478


class SimRelay:
    """The real relay on a public host of the simulated internet."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        host = pair.internet.add_public_host()
        private = generate_private_key()
        self.policy = MembershipPolicy()
        self.policy.set_members("net", [n.public_key for n in pair.nodes])
        self.server = RelayServer(host.reactor, private, public_key(private), self.policy,
                                  relay_id="sim")
        host.reactor.listenUDP(RELAY_PORT, RelayDatagramProtocol(self.server))
        self.server.start()
        self.info = RelayInfo("sim", host.ip, RELAY_PORT, 443, public_key(private))
        self.pumps: list[iosim.IOPump] = []
        self.clients: dict[bytes, RelayClient] = {}

    def connect_stream(self, info: Any, receiver: Any) -> Any:
        """TCP to the relay (the simulation only does UDP): fake transports."""
        server = relay_stream_factory(self.server).buildProtocol(None)
        client = RelayClientStreamProtocol(receiver, tls=False)
        self.pumps.append(iosim.connect(server, iosim.makeFakeServer(server), client,
                                        iosim.makeFakeClient(client), greet=False,
                                        clock=self.pair.clock))
        return client.ready

    def provider(self, key: bytes, forwarder: Any) -> RelayClient:
        """What Pair.start asks its relay for: each node's IRelayProvider."""
        node = self.pair.a if key == self.pair.a.public_key else self.pair.b
        client = RelayClient(node.reactor, forwarder, node.private_key, self.connect_stream)
        client.set_relays([self.info])
        client.start()
        self.clients[key] = client
        return client

    def run(self, seconds: float, until: Any = None) -> bool:
        def step() -> bool:
            for pump in self.pumps:
                pump.flush(advanceClock=False)
            return bool(until and until())

        return self.pair.internet.run(seconds, until=step)


class LastResortTests(SynchronousTestCase):
    def relayed_pair(self, a: str, b: str) -> tuple[Pair, SimRelay]:
        pair = Pair(a, b, seed=7, relay=False, wireguard=True,
                    config=PathConfig(relay_while_trying=False))
        relay = SimRelay(pair)
        pair.relay = relay  # type: ignore[assignment]
        pair.start()
        relay.run(60, until=lambda: all(m.kind == "relay" for m in pair.managers()))
        return pair, relay

    def check_traffic(self, pair: Pair) -> None:
        for i, node in enumerate(pair.nodes):
            self.assertIsInstance(node.peer.endpoint, RelayEndpoint)
            packet = ipv4_packet(OVERLAY[i], OVERLAY[1 - i], b"relayed %d" % i)
            node.device.send_packet(packet)
            self.run_pair(pair, 3)
            self.assertEqual(pair.nodes[1 - i].delivered[-1:], [packet])

    def run_pair(self, pair: Pair, seconds: float) -> None:
        pair.relay.run(seconds)  # type: ignore[union-attr]

    def test_symmetric_nats_end_on_the_relay(self) -> None:
        pair, relay = self.relayed_pair("hard", "hard")
        self.assertEqual([m.kind for m in pair.managers()], ["relay", "relay"])
        self.check_traffic(pair)
        self.assertEqual({c.path("sim") for c in relay.clients.values()}, {"udp"})
        # a handshake (two messages) and a packet each way
        self.assertGreaterEqual(relay.server.traffic.relayed_packets, 4)

    def test_udp_blocked_network_uses_tcp(self) -> None:
        pair, relay = self.relayed_pair("udpblock", "easy")
        self.assertEqual(pair.managers()[0].kind, "relay")
        self.check_traffic(pair)
        self.assertEqual(relay.clients[pair.a.public_key].path("sim"), "tcp")
        self.assertEqual(relay.clients[pair.b.public_key].path("sim"), "udp")
