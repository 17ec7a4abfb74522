"""
Joined mode end to end, in memory: a real rendezvous and relay, joined
nodes on the simulated NAT network (see L{tests.test_joined_support}).
"""

from __future__ import annotations

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.test_joined_support import Mesh
from twistvpn.interfaces import IPathManager, IRendezvousListener


class LogCatcher:
    """Collects formatted log lines while a test runs."""

    def __init__(self, case: SynchronousTestCase) -> None:
        from twisted.logger import formatEvent

        self.lines: list[str] = []
        observer = lambda event: self.lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        case.addCleanup(globalLogPublisher.removeObserver, observer)

    def grep(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


class JoinAndAuthorize(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = LogCatcher(self)
        self.mesh = Mesh(seed=1)
        net = self.mesh.internet
        self.a = self.mesh.add("alpha", net.add("easy"))
        self.b = self.mesh.add("beta", net.add("easy"))

    def test_listener_interface(self) -> None:
        self.assertTrue(verifyObject(IRendezvousListener, self.a.node))

    def test_pending_until_authorized(self) -> None:
        a, b = self.a, self.b
        self.assertEqual(a.node.join_answers, {self.mesh.network: "pending"})
        self.assertEqual(a.node.peers, {})
        self.assertEqual(a.tun.addresses, ())
        waiting = self.log.grep(
            f"node {a.client.node_id} is waiting for authorization in network "
            f"{self.mesh.network}")
        self.assertEqual(len(waiting), 1)
        self.mesh.authorize(a)
        # Alone in the network: an address and a route, no peers.
        self.assertEqual(len(a.tun.addresses), 1)
        self.assertTrue(a.tun.addresses[0].startswith("100.64."))
        self.assertEqual(a.tun.routes, [self.mesh.controller.get_network(self.mesh.network)
                                        ["subnet"]])
        self.assertEqual(a.node.peers, {})
        self.mesh.authorize(b)
        self.assertEqual(set(a.node.peers), {b.public_key})
        self.assertEqual(set(b.node.peers), {a.public_key})
        self.assertEqual(a.peer(b).wg.allowed_ips, (f"{b.ip}/32",))
        self.assertTrue(verifyObject(IPathManager, a.peer(b).manager))

    def test_packet_crosses(self) -> None:
        a, b = self.a, self.b
        self.mesh.authorize(a, b)
        self.assertTrue(self.mesh.delivered(a, b, b"hello beta"))
        self.assertTrue(self.mesh.delivered(b, a, b"hello alpha"))
        self.assertTrue(self.mesh.run(10, until=lambda: a.peer(b).manager.kind == "direct"))
        self.assertTrue(self.log.grep("peer beta path direct"))
