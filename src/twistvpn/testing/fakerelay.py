"""
An in-memory relay for tests: the path of last resort, without a network.

L{FakeRelay} carries datagrams between the forwarders of registered nodes
after a fixed latency; each node gets an L{IRelayProvider} from
L{FakeRelay.provider}.  The real relay speaks C{wire.RELAY} frames over UDP;
the path manager cannot tell the difference, which is the point of the seam.
"""

from __future__ import annotations

import base64
import collections
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import deferLater
from zope.interface import implementer

from twistvpn.interfaces import IRelayProvider
from twistvpn.traversal.candidates import ReactorTime


class RelayUnavailableError(Exception):
    """The relay is down."""


@dataclass(frozen=True)
class RelayEndpoint:
    """A peer as reached through the fake relay; the forwarder routes it."""

    peer: bytes

    def __str__(self) -> str:
        return "relay:" + base64.b64encode(self.peer).decode("ascii")[:8]


class FakeRelay:
    """A relay that every registered node can reach instantly and reliably."""

    def __init__(self, clock: ReactorTime, latency: float = 0.040) -> None:
        self.clock = clock
        self.latency = latency
        self.up = True
        self._nodes: dict[bytes, Any] = {}
        self.counters: collections.Counter[str] = collections.Counter()

    def provider(self, public_key: bytes, forwarder: Any) -> FakeRelayProvider:
        """Register a node's forwarder and return its relay provider."""
        self._nodes[public_key] = forwarder
        provider = FakeRelayProvider(self, public_key)
        forwarder.register_route(RelayEndpoint, provider.send)
        return provider

    def carry(self, source: bytes, data: bytes, destination: bytes) -> None:
        target = self._nodes.get(destination)
        if not self.up or target is None:
            self.counters["dropped"] += 1
            return
        self.counters["carried"] += 1
        self.clock.callLater(self.latency, target.dispatch, data, RelayEndpoint(source))


@implementer(IRelayProvider)
class FakeRelayProvider:
    """One node's handle on the fake relay."""

    def __init__(self, relay: FakeRelay, public_key: bytes) -> None:
        self.relay = relay
        self.public_key = public_key
        self.open: set[bytes] = set()

    def open_relay(self, peer_key: bytes) -> Deferred[RelayEndpoint]:
        if not self.relay.up:
            return fail(RelayUnavailableError("the relay is down"))

        def opened() -> RelayEndpoint:
            self.open.add(peer_key)
            return RelayEndpoint(peer_key)

        return deferLater(self.relay.clock, self.relay.latency, opened)

    def close_relay(self, peer_key: bytes) -> None:
        self.open.discard(peer_key)

    def send(self, data: bytes, endpoint: RelayEndpoint) -> None:
        self.relay.carry(self.public_key, data, endpoint.peer)
