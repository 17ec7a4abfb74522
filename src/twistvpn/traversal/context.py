"""
The context one strategy runs in for one peer (L{ITraversalContext}).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from zope.interface import implementer

from twistvpn.interfaces import ITraversalContext
from twistvpn.traversal.candidates import Candidates, ReactorTime
from twistvpn.traversal.probe import BoundEndpoint, ProbeService


@dataclass(frozen=True)
class VerifiedPath:
    """An endpoint a probe and its answer went through, and how long it took."""

    endpoint: Any
    rtt: float
    strategy: str


class ExtraSocket:
    """An extra socket as a strategy sees it."""

    def __init__(self, local_port: int) -> None:
        self.local_port = local_port

    def endpoint(self, addr: tuple[str, int]) -> BoundEndpoint:
        """C{addr} as reached from this socket."""
        return BoundEndpoint(self.local_port, addr[0], addr[1])


@implementer(ITraversalContext)
class TraversalContext:
    """
    Hands a strategy its peer's candidates and a way to probe them.  The
    path manager makes one per strategy per attempt.
    """

    def __init__(self, service: ProbeService, strategy: str, peer_key: bytes,
                 local: Candidates, peer: Candidates, clock: ReactorTime,
                 rng: random.Random) -> None:
        self._service = service
        self.strategy = strategy
        self.peer_key = peer_key
        self.local = local
        self.peer = peer
        self.clock = clock
        self.random = rng
        self.is_initiator = service.public_key < peer_key
        self.probes_sent = 0
        self.verified: list[VerifiedPath] = []
        self._sockets: list[int] = []
        self.closed = False

    def send_probe(self, endpoint: Any, hop_limit: int | None = None) -> None:
        if self.closed:
            return
        self.probes_sent += 1
        self._service.send_probe(self.peer_key, endpoint, self.strategy, self._on_reply,
                                 hop_limit=hop_limit)

    def _on_reply(self, endpoint: Any, rtt: float) -> None:
        self.verified.append(VerifiedPath(endpoint, rtt, self.strategy))

    def open_socket(self) -> ExtraSocket:
        if self.closed:
            raise RuntimeError("the traversal context is closed")
        local = self._service.sockets.open()
        self._sockets.append(local)
        return ExtraSocket(local)

    def close(self) -> None:
        """Release this context's sockets (those a path retained stay open)."""
        self.closed = True
        sockets, self._sockets = self._sockets, []
        for local in sockets:
            self._service.sockets.release(local)
