"""
One map reader for the thousands of simulated nodes in one benchmark
process (bench/rendezvous.py's workers, bench/failover.py's).

The rendezvous serializes a push once and sends the same bytes to every
member of the network, and maps are immutable: so one process hosting
thousands of nodes parses each map and applies each delta once, and its
nodes share the results.  Without this, 10,000 simulated nodes in one
network would hold 10,000 private copies of a 10,000-member map (10⁸
members, far beyond this machine's memory) and spend the clients' CPU
parsing them, which a real node does once for itself.  Each simulated
node still receives, decrypts and checks every push on its own
connection; only the parsing is shared.
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

from zope.interface import implementer

from twistvpn.interfaces import IMapReader
from twistvpn.rendezvous.netmap import MapReader, NetworkMap

K = TypeVar("K")
V = TypeVar("V")


class _Recent(Generic[K, V]):
    """The C{size} entries used last."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: collections.OrderedDict[K, V] = collections.OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


@implementer(IMapReader)
class SharedMapReader:
    """
    Remembers the last C{size} maps and deltas read (by their bytes): the
    same bytes give the same map, the same delta applied to the same map
    gives the same result.  And a map equal to one already made (the full
    map this push's joiners get, and the one the others' delta made) is
    that one: otherwise every push would start another line of maps that
    the next delta is applied to separately.  Malformed input raises as
    L{MapReader}'s does and is not remembered.
    """

    def __init__(self, size: int = 64) -> None:
        self._reader = MapReader()
        self._maps: _Recent[bytes, NetworkMap] = _Recent(size)
        # (id of the base, delta bytes) -> (the base, kept so that its id is
        # not reused while remembered; the map it became)
        self._applied: _Recent[tuple[int, bytes], tuple[NetworkMap, NetworkMap]] = _Recent(size)
        # (network ID, revision) -> the map made last with that revision
        self._revisions: _Recent[tuple[str, int], NetworkMap] = _Recent(size)
        self.parsed = 0  # maps and deltas actually parsed

    def read_map(self, data: bytes) -> NetworkMap:
        netmap = self._maps.get(data)
        if netmap is None:
            netmap = self._same(self._reader.read_map(data))
            self.parsed += 1
            self._maps.put(data, netmap)
        return netmap

    def apply_delta(self, base: NetworkMap, data: bytes) -> NetworkMap:
        key = (id(base), data)
        known = self._applied.get(key)
        if known is not None and known[0] is base:
            return known[1]
        netmap = self._same(self._reader.apply_delta(base, data))
        self.parsed += 1
        self._applied.put(key, (base, netmap))
        return netmap

    def _same(self, netmap: NetworkMap) -> NetworkMap:
        """The map made before that equals C{netmap}, else C{netmap}."""
        key = (netmap.network_id, netmap.revision)
        known = self._revisions.get(key)
        if known is not None and known == netmap:
            return known
        self._revisions.put(key, netmap)
        return netmap
