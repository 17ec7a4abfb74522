"""
A byte pipe between two endpoints, for tests that must reach a port in
another network namespace without any route between them:

    ip netns exec NS python -m twistvpn.testing.bridge unix:/tmp/x.sock tcp:127.0.0.1:8445

listens on the first (a Twisted server endpoint) and, for each connection,
connects the second (a client endpoint) and splices the two.  A UNIX
socket is a file, and files cross namespaces: two bridges make a path from
one namespace's loopback to another's, and no packet leaves either.
Prints "listening" once it does.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import react
from twisted.python.failure import Failure


class _Outbound(Protocol):
    def __init__(self, inbound: _Inbound) -> None:
        self.inbound = inbound

    def dataReceived(self, data: bytes) -> None:
        self.inbound.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.inbound.transport is not None:
            self.inbound.transport.loseConnection()


class _Inbound(Protocol):
    def __init__(self, reactor: Any, target: str) -> None:
        self.reactor = reactor
        self.target = target
        self.outbound: _Outbound | None = None
        self.pending: list[bytes] = []
        self.closed = False

    def connectionMade(self) -> None:
        endpoint = clientFromString(self.reactor, self.target)
        d = endpoint.connect(Factory.forProtocol(lambda: _Outbound(self)))
        d.addCallbacks(self._connected, lambda _: self.transport.loseConnection())  # type: ignore[union-attr]

    def _connected(self, outbound: _Outbound) -> None:
        if self.closed:
            outbound.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.outbound = outbound
        for data in self.pending:
            outbound.transport.write(data)  # type: ignore[union-attr]
        self.pending = []

    def dataReceived(self, data: bytes) -> None:
        if self.outbound is None:
            self.pending.append(data)
        else:
            self.outbound.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        if self.outbound is not None and self.outbound.transport is not None:
            self.outbound.transport.loseConnection()


def main(reactor: Any, listen: str, target: str) -> Deferred[None]:
    """Listen on C{listen}, splice each connection to C{target}; runs until stopped."""
    d = serverFromString(reactor, listen).listen(
        Factory.forProtocol(lambda: _Inbound(reactor, target)))

    def ready(_: object) -> Deferred[None]:
        sys.stdout.write("listening\n")
        sys.stdout.flush()
        return Deferred()  # until the process is stopped

    return d.addCallback(ready)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m twistvpn.testing.bridge LISTEN CONNECT")
    react(main, sys.argv[1:])
