"""
The path manager moving a real WireGuard peer (L{IWireGuardPeer}) between
paths on the simulated network: the data plane follows the birthday path's
extra socket, then the relay when the direct path dies.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twistvpn.interfaces import IWireGuardPeer
from twistvpn.testing.fakerelay import RelayEndpoint
from twistvpn.testing.pathsim import OVERLAY, Pair, ipv4_packet
from twistvpn.traversal.probe import BoundEndpoint


class WireGuardOverPathsTests(SynchronousTestCase):
    def send(self, pair: Pair, payload: bytes) -> bool:
        """An IP packet from B's TUN side comes out of A's; True if it did."""
        before = len(pair.a.delivered)
        pair.b.device.send_packet(ipv4_packet(OVERLAY[1], OVERLAY[0], payload))
        pair.internet.run(2.0)
        return [p[20:] for p in pair.a.delivered[before:]] == [payload]

    def test_birthday_path_then_relay(self) -> None:
        pair = Pair("easy", "hard", seed=4, wireguard=True)
        pair.start()
        result = pair.run(15.0)
        self.assertEqual(result.kinds, ("direct", "direct"))
        pair.internet.run(1.0)
        hard = pair.b
        verifyObject(IWireGuardPeer, hard.peer)
        self.assertIsInstance(hard.peer.endpoint, BoundEndpoint)
        self.assertTrue(self.send(pair, b"over the birthday path"))
        self.assertEqual(hard.device.counters["handshake_initiation_sent"], 1)
        relayed = pair.relay.counters["carried"]
        # The hard side's NAT stops passing UDP: both fall back to the relay
        # and the same WireGuard session carries on through it.
        nat = pair.nats[1]
        nat.behavior = replace(nat.behavior, udp_blocked=True)
        pair.internet.run(35.0)
        self.assertIsInstance(hard.peer.endpoint, RelayEndpoint)
        self.assertIsInstance(pair.a.peer.endpoint, RelayEndpoint)
        self.assertTrue(self.send(pair, b"through the relay"))
        self.assertGreater(pair.relay.counters["carried"], relayed)
