"""L{twistvpn.common.endpoints.FailoverEndpoint}: the instances of one service in turn."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twistvpn.common.endpoints import FailoverEndpoint


@implementer(IStreamClientEndpoint)
class Instance:
    """An endpoint that connects, or refuses, as the test says."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.up = True
        self.attempts = 0

    def connect(self, protocolFactory: Any) -> defer.Deferred[Any]:  # noqa: N803
        self.attempts += 1
        if not self.up:
            return defer.fail(ConnectionRefusedError(self.name))
        protocol = protocolFactory.buildProtocol(None)
        protocol.instance = self.name
        return defer.succeed(protocol)


class FailoverEndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.one, self.two = Instance("one"), Instance("two")
        self.endpoint = FailoverEndpoint([self.one, self.two])
        self.factory = Factory.forProtocol(Protocol)

    def connect(self) -> Any:
        return self.successResultOf(self.endpoint.connect(self.factory)).instance

    def test_interface(self) -> None:
        verifyObject(IStreamClientEndpoint, self.endpoint)

    def test_first_while_it_works(self) -> None:
        self.assertEqual(self.connect(), "one")

    def test_next_after_a_failure(self) -> None:
        self.one.up = False
        self.failureResultOf(self.endpoint.connect(self.factory), ConnectionRefusedError)
        self.assertEqual(self.connect(), "two")
        self.assertEqual((self.one.attempts, self.two.attempts), (1, 1))

    def test_next_after_a_lost_connection(self) -> None:
        """Connecting again means the last connection was lost: the next instance."""
        self.assertEqual(self.connect(), "one")
        self.assertEqual(self.connect(), "two")
        self.assertEqual(self.connect(), "one")

    def test_one_endpoint(self) -> None:
        endpoint = FailoverEndpoint([self.one])
        for _ in range(3):
            self.successResultOf(endpoint.connect(self.factory))
        self.assertEqual(self.one.attempts, 3)

    def test_none(self) -> None:
        self.assertRaises(ValueError, FailoverEndpoint, [])
