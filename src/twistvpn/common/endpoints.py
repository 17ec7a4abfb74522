"""
Several addresses of one service (the instances of a rendezvous) behind
one client endpoint, so that Twisted's own C{ClientService} fails over:
each connection attempt goes to the current address; one that fails moves
the next attempt to the next address, and the service's backoff spaces
the attempts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """The endpoints in turn: the one that last worked first, the next after a failure."""

    def __init__(self, endpoints: Sequence[IStreamClientEndpoint]) -> None:
        if not endpoints:
            raise ValueError("a failover endpoint needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.current = 0
        self._last_connected: int | None = None

    def connect(self, protocolFactory: Any) -> defer.Deferred[Any]:  # noqa: N803 (Twisted's)
        index = self.current
        if self._last_connected == index and len(self.endpoints) > 1:
            # The one connected last time (its connection is what was lost):
            # the next instance now, not the same one again.
            index = self.current = (index + 1) % len(self.endpoints)
        self._last_connected = None

        def connected(protocol: Any) -> Any:
            self._last_connected = index
            return protocol

        def failed(failure: Failure) -> Failure:
            if self.current == index:
                self.current = (index + 1) % len(self.endpoints)
            return failure

        return self.endpoints[index].connect(protocolFactory).addCallbacks(connected, failed)
