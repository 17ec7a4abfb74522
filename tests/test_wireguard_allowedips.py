"""
Cryptokey routing: longest-prefix match for IPv4 and IPv6, checked by
example and against a brute-force model built on C{ipaddress}.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twistvpn.wireguard.allowedips import AllowedIPs


def packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


class AllowedIPsTests(SynchronousTestCase):
    def test_longest_prefix(self) -> None:
        table = AllowedIPs()
        table.insert("0.0.0.0/0", "default")
        table.insert("10.0.0.0/8", "ten")
        table.insert("10.1.0.0/16", "ten-one")
        table.insert("10.1.2.3/32", "host")
        self.assertEqual(table.lookup(packed("10.1.2.3")), "host")
        self.assertEqual(table.lookup(packed("10.1.2.4")), "ten-one")
        self.assertEqual(table.lookup(packed("10.2.0.1")), "ten")
        self.assertEqual(table.lookup(packed("192.0.2.1")), "default")

    def test_ipv6(self) -> None:
        table = AllowedIPs()
        table.insert("fd00::/8", "ula")
        table.insert("fd00:1::/32", "site")
        table.insert("10.0.0.0/8", "v4")
        self.assertEqual(table.lookup(packed("fd00:1::5")), "site")
        self.assertEqual(table.lookup(packed("fd77::5")), "ula")
        self.assertIsNone(table.lookup(packed("2001:db8::1")))
        # the families do not mix
        self.assertIsNone(table.lookup(packed("::a00:1")))

    def test_insert_moves_and_reports_previous_owner(self) -> None:
        table = AllowedIPs()
        self.assertEqual(table.insert("10.0.0.1/24", "a"), ("10.0.0.0/24", None))
        self.assertEqual(table.lookup(packed("10.0.0.9")), "a")
        self.assertEqual(table.insert("10.0.0.0/24", "b"), ("10.0.0.0/24", "a"))
        self.assertEqual(table.lookup(packed("10.0.0.9")), "b")

    def test_remove(self) -> None:
        table = AllowedIPs()
        table.insert("10.0.0.0/8", "a")
        table.insert("10.0.0.0/24", "b")
        self.assertEqual(table.lookup(packed("10.0.0.1")), "b")
        table.remove("10.0.0.0/24", "a")  # not a's: kept
        self.assertEqual(table.lookup(packed("10.0.0.1")), "b")
        table.remove("10.0.0.0/24")
        self.assertEqual(table.lookup(packed("10.0.0.1")), "a")
        table.remove("10.0.0.0/8", "a")
        self.assertIsNone(table.lookup(packed("10.0.0.1")))
        table.remove("10.0.0.0/8")  # absent: ignored

    def test_invalid(self) -> None:
        table = AllowedIPs()
        for bad in ("10.0.0.0/33", "nonsense", "fd00::/129", ""):
            self.assertRaises(ValueError, table.insert, bad, "x")

    def test_bare_address_is_a_host_route(self) -> None:
        table = AllowedIPs()
        self.assertEqual(table.insert("192.0.2.7", "h")[0], "192.0.2.7/32")

    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(
            st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32), st.sampled_from("abc")),
            max_size=12,
        ),
        st.lists(st.integers(0, 2**32 - 1), max_size=20),
    )
    def test_matches_brute_force(self, routes: list, probes: list[int]) -> None:
        table = AllowedIPs()
        model: dict[ipaddress.IPv4Network, str] = {}
        for address, length, owner in routes:
            net = ipaddress.IPv4Network((address, length), strict=False)
            table.insert(str(net), owner)
            model[net] = owner
        # probe inside every prefix too, not only at random
        probes = probes + [int(net.network_address) for net in model]
        for probe in probes:
            address = ipaddress.IPv4Address(probe)
            matches = [net for net in model if address in net]
            expected = model[max(matches, key=lambda n: n.prefixlen)] if matches else None
            self.assertEqual(table.lookup(address.packed), expected)
