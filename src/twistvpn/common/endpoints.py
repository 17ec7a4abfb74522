"""
Several addresses of one service (the instances of a rendezvous) behind
one client endpoint, so that a reconnecting client fails over: Twisted's
own C{ClientService} (a standalone relay's link) or the node's
L{RendezvousClient}.  The first attempt goes to the first address, every
later one to the next; the client's backoff spaces them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """
    The endpoints in turn.  A client connects again only when its last
    connection failed or was lost, so every attempt after the first goes
    to the next endpoint; C{current} is the one of the latest attempt.
    """

    def __init__(self, endpoints: Sequence[IStreamClientEndpoint]) -> None:
        if not endpoints:
            raise ValueError("a failover endpoint needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.current = 0
        self._tried = False

    def connect(self, protocolFactory: Any) -> defer.Deferred[Any]:  # noqa: N803 (Twisted's)
        if self._tried:
            self.current = (self.current + 1) % len(self.endpoints)
        self._tried = True
        return self.endpoints[self.current].connect(protocolFactory)
