"""
Cryptokey routing (whitepaper section 2): the table from IP prefixes to
peers, consulted by longest prefix for every packet sent and for the inner
source address of every packet received.

One dict per prefix length, tried from the longest length present; a
bounded cache from exact address to owner in front makes the common
lookup one dict probe.
"""

from __future__ import annotations

import ipaddress
from typing import Any

CACHE_MAX = 4096


def parse_cidr(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """
    Parse C{cidr} ("10.0.0.0/8", "fd00::1/128", a bare address meaning a
    host route), masking host bits as C{wg} does.  ValueError if invalid.
    """
    return ipaddress.ip_network(cidr.strip(), strict=False)


class AllowedIPs:
    """A prefix belongs to at most one owner; inserting it again moves it."""

    def __init__(self) -> None:
        # address length in bytes -> prefix length -> prefix value -> owner
        self._tables: dict[int, dict[int, dict[int, Any]]] = {4: {}, 16: {}}
        self._lengths: dict[int, list[int]] = {4: [], 16: []}
        # Exact address -> owner (or None), filled by L{lookup}.  Per-packet
        # code probes it directly and calls L{lookup} only on a miss: one
        # Python call fewer on a path where, after an idle spell, every
        # call costs microseconds.
        self.cache: dict[bytes, Any] = {}

    def insert(self, cidr: str, owner: Any) -> tuple[str, Any]:
        """
        Route C{cidr} to C{owner}; return its canonical text and the owner
        it was taken from (or None).
        """
        net = parse_cidr(cidr)
        size = 4 if net.version == 4 else 16
        by_length = self._tables[size]
        length = net.prefixlen
        key = int(net.network_address) >> (size * 8 - length)
        table = by_length.get(length)
        if table is None:
            table = by_length[length] = {}
            self._lengths[size] = sorted(by_length, reverse=True)
        previous = table.get(key)
        table[key] = owner
        self.cache.clear()
        return str(net), (previous if previous is not owner else None)

    def remove(self, cidr: str, owner: Any = None) -> None:
        """Forget C{cidr} (only if C{owner} holds it, when given)."""
        net = parse_cidr(cidr)
        size = 4 if net.version == 4 else 16
        by_length = self._tables[size]
        table = by_length.get(net.prefixlen)
        if table is None:
            return
        key = int(net.network_address) >> (size * 8 - net.prefixlen)
        if key in table and (owner is None or table[key] is owner):
            del table[key]
            if not table:
                del by_length[net.prefixlen]
                self._lengths[size] = sorted(by_length, reverse=True)
            self.cache.clear()

    def lookup(self, address: bytes) -> Any:
        """The owner of the longest prefix containing C{address} (4 or 16 bytes)."""
        cache = self.cache
        if address in cache:
            return cache[address]
        size = len(address)
        owner = None
        lengths = self._lengths.get(size)
        if lengths:
            tables = self._tables[size]
            value = int.from_bytes(address, "big")
            bits = size * 8
            for length in lengths:
                owner = tables[length].get(value >> (bits - length))
                if owner is not None:
                    break
        else:
            return None
        if len(cache) >= CACHE_MAX:
            cache.clear()
        cache[address] = owner
        return owner
