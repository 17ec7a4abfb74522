"""
Punch requests the rendezvous cannot arrange are asked again (reliability
item 10): after a NAT moved and the control connection came back, the pair
was left on the relay because a failed request was only logged.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.fakes import FakeWireGuardDevice
from twistvpn.node.forwarder import Forwarder
from twistvpn.node.joined import PUNCH_RETRIES, JoinedNode, JoinedPeer
from twistvpn.rendezvous.errors import NotFoundError
from twistvpn.rendezvous.netmap import Member
from twistvpn.testing.faketun import FakeTunDevice
from twistvpn.traversal.manager import DIRECT, RELAY

ME = b"\x01" * 32  # the lower key asks
PEER = b"\xfe" * 32
NETWORK = "0123456789abcdef"


class Manager:
    def __init__(self) -> None:
        self.kind = RELAY
        self.punched = 0

    def punch_now(self) -> None:
        self.punched += 1

    def stop(self) -> None:
        pass


class Client:
    """The rendezvous client: the first C{failures} requests cannot be arranged."""

    def __init__(self, clock: Clock, failures: int) -> None:
        self.clock = clock
        self.failures = failures
        self.asked: list[float] = []
        self.current = 0  # the rendezvous instance connected to
        self.where = "203.0.113.1:8443"

    def request_punch(self, network_id: str, peer_key: bytes) -> Deferred[None]:
        self.asked.append(self.clock.seconds())
        if len(self.asked) <= self.failures:
            return fail(NotFoundError("the peer is offline"))
        return succeed(None)


class PunchRetryTests(SynchronousTestCase):
    def node(self, failures: int) -> tuple[JoinedNode, JoinedPeer, Client, Clock]:
        clock = Clock()
        node = JoinedNode(clock, ME, forwarder=Forwarder(),
                          device=FakeWireGuardDevice(bytes(32), clock, None, None),
                          tun=FakeTunDevice(), probes=None, listen_port=lambda: 41641)
        client = Client(clock, failures)
        node.client = client
        node.rendezvous_up = True
        manager: Any = Manager()
        peer = JoinedPeer(PEER, None, manager,
                          {NETWORK: Member("bbbbbbbbbb", PEER, "desk", "100.64.0.2")})
        node.peers[PEER] = peer
        return node, peer, client, clock

    def test_asked_again_with_backoff(self) -> None:
        node, peer, client, clock = self.node(failures=3)
        node.request_punch(peer)
        clock.pump([0.5] * 40)
        self.assertEqual(client.asked, [0.0, 1.0, 3.0, 7.0])
        self.assertEqual(peer.punch_failures, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_not_asked_once_direct(self) -> None:
        node, peer, client, clock = self.node(failures=5)
        node.request_punch(peer)
        peer.manager.kind = DIRECT
        clock.pump([0.5] * 40)
        self.assertEqual(client.asked, [0.0])

    def test_bounded(self) -> None:
        node, peer, client, clock = self.node(failures=1000)
        node.request_punch(peer)
        clock.pump([1.0] * 200)
        self.assertEqual(len(client.asked), PUNCH_RETRIES + 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_reconnection_asks_again(self) -> None:
        """The control connection back: a pair not direct is punched at once."""
        node, peer, client, clock = self.node(failures=0)
        node.rendezvous_up = False
        node.connected("aaaaaaaaaa")
        self.assertEqual(client.asked, [0.0])

    def test_stop_cancels_the_retry(self) -> None:
        node, peer, client, clock = self.node(failures=3)
        node.request_punch(peer)
        node.stop()
        self.assertEqual(clock.getDelayedCalls(), [])


class RetryTogetherTests(SynchronousTestCase):
    """A failed attempt's retry: the lower key has both sides start at once."""

    node = PunchRetryTests.node

    def test_lower_key_asks_the_rendezvous(self) -> None:
        node, peer, client, clock = self.node(failures=0)
        manager: Any = peer.manager
        manager.peer_key = PEER
        self.assertTrue(node._retry_together(manager))
        self.assertEqual(client.asked, [0.0])

    def test_higher_key_or_no_rendezvous_retries_alone(self) -> None:
        node, peer, client, clock = self.node(failures=0)
        manager: Any = peer.manager
        manager.peer_key = PEER
        node.rendezvous_up = False
        self.assertFalse(node._retry_together(manager))
        node.rendezvous_up = True
        node.public_key = b"\xff" * 32  # now the higher key
        self.assertFalse(node._retry_together(manager))
        self.assertEqual(client.asked, [])
