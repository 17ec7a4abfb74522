"""
What one side knows about how it (or a peer) can be reached.

The rendezvous hands these in: the public endpoint it observed over UDP, the
addresses the node found on its own interfaces, and hints about its NAT
derived from discovery (L{hints_from_observations}).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Address = tuple[str, int]

# Zope interfaces in annotations: mypy cannot check them, so they are Any
# under names that say which interface is meant.
ReactorTime = Any  # IReactorTime
ReactorUDP = Any  # IReactorUDP (and IReactorTime)
Strategy = Any  # ITraversalStrategy
Context = Any  # ITraversalContext
RelayProvider = Any  # IRelayProvider

# The largest step between consecutive mappings we still call "sequential".
MAX_SEQUENTIAL_DELTA = 8


@dataclass(frozen=True)
class NatHints:
    """
    What discovery learnt about a NAT.  Hints, not facts: strategies use
    them to decide what is worth trying.
    """

    public: bool = False  # no NAT at all: the observed address is local
    mapping_varies: bool | None = False  # endpoint-dependent ("hard"); None: unknown
    port_delta: int | None = None  # step between consecutive new mappings
    last_port: int | None = None  # the newest mapping discovery saw
    udp_blocked: bool = False  # no discovery answer came back
    mapping_timeout: float | None = None  # seconds, when known

    @property
    def sequential(self) -> bool:
        """Endpoint-dependent mapping, but with predictable port steps."""
        return self.mapping_varies is True and self.port_delta is not None

    @property
    def hard_random(self) -> bool:
        """Endpoint-dependent mapping with unpredictable ports."""
        return self.mapping_varies is True and self.port_delta is None

    @property
    def easy(self) -> bool:
        """Known endpoint-independent mapping behind a NAT."""
        return self.mapping_varies is False and not self.public and not self.udp_blocked


@dataclass(frozen=True)
class Candidates:
    """One side's addresses: observed public endpoints, LAN addresses, hints."""

    public: tuple[Address, ...] = ()
    local: tuple[Address, ...] = ()
    hints: NatHints = field(default_factory=NatHints)

    def lan_only(self) -> tuple[Address, ...]:
        """Local addresses that are not also public ones."""
        return tuple(a for a in self.local if a not in self.public)


def preserved_mapping(local: Address, observed: Sequence[Address | None]) -> Address | None:
    """
    The observed mapping that kept C{local}'s port when another did not,
    all at one public address; None otherwise.  That is a NAT that maps
    endpoint-independently and keeps ports, where another host behind it
    already holds our port towards the other destination: Linux's NAT keeps
    a port unique per destination, not per host, so two nodes behind one
    router, both on 41641, each lose it towards whichever server the other
    asked first.  A NAT whose mapping truly depends on the destination
    keeps the local port only by chance (1 in 64,512 for random ports).
    """
    seen = [o for o in observed if o is not None]
    if len(set(seen)) < 2 or len({o[0] for o in seen}) != 1:
        return None
    return next((o for o in seen if o[1] == local[1]), None)


def hints_from_observations(local: Address, observed: Sequence[Address | None],
                            mapping_timeout: float | None = None) -> NatHints:
    """
    Classify a NAT from the endpoints that successive discovery servers (at
    different addresses, asked in order from one socket) saw for us; None
    for a server that did not answer.
    """
    seen = [o for o in observed if o is not None]
    if not seen:
        return NatHints(udp_blocked=True, mapping_timeout=mapping_timeout)
    last = seen[-1][1]
    if all(o == local for o in seen):
        return NatHints(public=True, last_port=last, mapping_timeout=mapping_timeout)
    ports = [o[1] for o in seen]
    if len(seen) < 2:
        # One answer cannot tell whether the mapping depends on the destination.
        return NatHints(mapping_varies=None, last_port=last, mapping_timeout=mapping_timeout)
    if len(set(seen)) == 1:
        return NatHints(last_port=last, mapping_timeout=mapping_timeout)
    if preserved_mapping(local, seen) is not None:
        # Endpoint-independent, the port taken elsewhere by a neighbour.
        return NatHints(last_port=local[1], mapping_timeout=mapping_timeout)
    deltas = {b - a for a, b in zip(ports, ports[1:], strict=False)}
    delta: int | None = None
    if len(deltas) == 1:
        (d,) = deltas
        if 0 < d <= MAX_SEQUENTIAL_DELTA:
            delta = d
    return NatHints(mapping_varies=True, port_delta=delta, last_port=last,
                    mapping_timeout=mapping_timeout)


def describe(endpoint: Any) -> str:
    """An endpoint as the status CLI prints it."""
    if type(endpoint) is tuple and len(endpoint) == 2:
        host, port = endpoint
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(endpoint)
