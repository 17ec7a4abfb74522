"""
Lazy peers: in a big network a node makes a member's WireGuard peer and
path only when traffic needs it, and retires it when idle (in memory, on
the simulated NAT network, with real devices and a real rendezvous).
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.support.joined import Mesh
from twistvpn.interfaces import IPeerDemand
from twistvpn.node.joined import EAGER_PEERS

IDLE = 60.0


class LazyPeers(SynchronousTestCase):
    def mesh(self, *presets: str, seed: int = 4) -> tuple[Mesh, list]:
        mesh = Mesh(seed=seed, eager_peers=0, lazy_idle=IDLE)
        nodes = mesh.members(*presets)
        mesh.run(2)
        return mesh, nodes

    def test_no_peer_until_traffic(self) -> None:
        mesh, (a, b, c) = self.mesh("easy", "easy", "easy")
        verifyObject(IPeerDemand, a.node)
        for node in (a, b, c):
            self.assertTrue(node.node.lazy)
            self.assertEqual(node.node.peers, {})
            self.assertEqual(len(node.node.members), 2)
        self.assertTrue(mesh.delivered(a, b, b"first"))
        self.assertTrue(mesh.delivered(b, a, b"answer"))
        self.assertEqual(set(a.node.peers), {b.public_key})
        self.assertEqual(set(b.node.peers), {a.public_key})
        self.assertEqual(c.node.peers, {})  # nobody talked to it
        self.assertTrue(mesh.run(10, until=lambda: a.peer(b).manager.kind == "direct"
                                 and b.peer(a).manager.kind == "direct"))

    def test_the_sender_asks_for_the_punch(self) -> None:
        """
        The other side has no peer for us and cannot know we want one: the
        side with a packet asks the rendezvous to punch, even with the
        higher key (in a small network only the lower key asks), and the
        punch makes the other side's peer.  Behind a NAT that drops
        unsolicited probes, that is how it learns of us.
        """
        mesh, (a, b) = self.mesh("hard", "easy")
        high, low = (a, b) if a.public_key > b.public_key else (b, a)
        asked: list[bytes] = []
        request = high.client.request_punch

        def recording(network_id: str, peer_key: bytes) -> Any:
            asked.append(peer_key)
            return request(network_id, peer_key)

        self.patch(high.client, "request_punch", recording)
        self.assertTrue(mesh.delivered(high, low, b"from the higher key", seconds=5))
        self.assertEqual(asked[:1], [low.public_key])
        self.assertGreaterEqual(low.client.counters["punches"], 1)
        self.assertGreaterEqual(high.client.counters["punches"], 1)
        self.assertIn(high.public_key, low.node.peers)
        self.assertTrue(mesh.delivered(low, high, b"and back"))

    def test_idle_peers_retired_and_made_again(self) -> None:
        mesh, (a, b) = self.mesh("easy", "easy")
        self.assertTrue(mesh.delivered(a, b, b"once"))
        mesh.run(IDLE / 2)
        self.assertIn(b.public_key, a.node.peers)  # not idle long enough
        self.assertTrue(mesh.run(IDLE * 1.5, until=lambda: not a.node.peers
                                 and not b.node.peers))
        self.assertTrue(mesh.delivered(a, b, b"again"))
        self.assertIn(b.public_key, a.node.peers)

    def test_ping_makes_the_peer(self) -> None:
        mesh, (a, b) = self.mesh("easy", "easy")
        peer = a.node.find_peer("beta")
        self.assertIs(peer, a.node.peers[b.public_key])
        self.assertRaises(KeyError, a.node.find_peer, "nobody")

    def test_members_left_stay_unmade(self) -> None:
        mesh, (a, b) = self.mesh("easy", "easy")
        self.assertTrue(mesh.delivered(a, b, b"hi"))
        mesh.controller.deauthorize(mesh.network, b.client.node_id)
        mesh.run(1)
        self.assertEqual(a.node.peers, {})
        self.assertEqual(a.node.members, {})
        self.assertFalse(a.node.peer_for_key(b.public_key))


class Eager(SynchronousTestCase):
    def test_small_networks_make_every_peer(self) -> None:
        mesh = Mesh(seed=5)
        a, b, c = mesh.members("easy", "easy", "easy")
        self.assertLess(2, EAGER_PEERS)
        self.assertFalse(a.node.lazy)
        self.assertEqual(set(a.node.peers), {b.public_key, c.public_key})
        mesh.run(IDLE * 10)
        self.assertEqual(set(a.node.peers), {b.public_key, c.public_key})  # never retired
