"""The map format both sides share: round trips, deltas, malformed input."""

from __future__ import annotations

import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twistvpn.interfaces import IMapReader
from twistvpn.rendezvous import netmap as netmap_module
from twistvpn.rendezvous.netmap import (
    MapDelta,
    MapError,
    MapReader,
    Member,
    NetworkMap,
    check_endpoints,
    format_endpoint,
    parse_endpoint,
)
from twistvpn.testing.sharedmaps import SharedMapReader


def member(i: int, **changes: object) -> Member:
    fields = dict(
        node_id=f"{i:010x}",
        public_key=bytes([i]) * 32,
        name=f"n{i}",
        ip=f"100.64.0.{i + 1}",
        endpoints=(f"198.51.100.{i}:{1000 + i}",),
    )
    fields.update(changes)
    return Member(**fields)  # type: ignore[arg-type]


def netmap(members: tuple[Member, ...], revision: int = 1) -> NetworkMap:
    return NetworkMap("0123456789abcdef", "home", "100.64.0.0/24", revision, members)


class Format(SynchronousTestCase):
    def test_serialized_once(self) -> None:
        """
        A push hands one map or delta to every member of a network: it is
        serialized on the first send only, and equality ignores the kept bytes.
        """
        calls = []
        dump = netmap_module._dump

        def counting(obj: object, fields: dict[str, object]) -> bytes:
            calls.append(obj)
            return dump(obj, fields)  # type: ignore[arg-type]

        self.patch(netmap_module, "_dump", counting)
        old = netmap((member(1), member(2)))
        new = netmap((member(1), member(3)), revision=2)
        delta = new.diff(old)
        for _ in range(3):
            self.assertEqual(NetworkMap.from_json(new.to_json()), new)
            self.assertEqual(old.apply(MapDelta.from_json(delta.to_json())), new)
        self.assertEqual(calls, [new, delta])
        self.assertEqual(new, netmap((member(1), member(3)), revision=2))

    def test_round_trip(self) -> None:
        m = netmap(
            (member(1), member(2, online=True, last_seen=5.0, local_endpoints=("[fd00::1]:7",)))
        )
        m = NetworkMap(
            m.network_id,
            m.name,
            m.subnet,
            3,
            m.members,
            ({"host": "203.0.113.1", "port": 3478, "public_key": "x"},),
        )
        self.assertEqual(NetworkMap.from_json(m.to_json()), m)

    def test_malformed(self) -> None:
        good = netmap((member(1),)).to_json()
        for bad in (
            b"",
            b"[]",
            b"{",
            b'{"network": 1}',
            good.replace(b"100.64.0.2", b"nope"),
            good.replace(b'"revision":1', b'"revision":"x"'),
            good.replace(b"198.51.100.1:1001", b"host:1"),
            b"\xff" * 10,
        ):
            self.assertRaises(MapError, NetworkMap.from_json, bad)
            self.assertRaises(MapError, MapDelta.from_json, bad)

    def test_endpoints(self) -> None:
        self.assertEqual(parse_endpoint("[2001:db8::1]:5"), ("2001:db8::1", 5))
        self.assertEqual(format_endpoint(("2001:db8::1", 5)), "[2001:db8::1]:5")
        for bad in ("1.2.3.4", "1.2.3.4:0", "[1.2.3.4]:5", "2001:db8::1:5", ":5", "a" * 100,
                    "1.2.3.4:\u00b9\u00b2", "[2001:db8::1]:\u0665"):  # superscripts, Arabic-Indic
            self.assertRaises(MapError, parse_endpoint, bad)
        self.assertRaises(MapError, check_endpoints, "1.2.3.4:5")

    def test_delta_must_match_base(self) -> None:
        old, new = netmap((member(1),), 1), netmap((member(2),), 2)
        delta = new.diff(old)
        self.assertRaises(MapError, netmap((member(1),), 7).apply, delta)
        self.assertEqual(MapDelta.from_json(delta.to_json()), delta)

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(st.integers(0, 20), unique=True),
        st.lists(st.integers(0, 20), unique=True),
        st.sets(st.integers(0, 20)),
    )
    def test_diff_then_apply(self, before: list[int], after: list[int], changed: set[int]) -> None:
        """Applying new.diff(old) to old gives new, members in new's order
        whenever new members were added last (as the controller orders them)."""
        old = netmap(tuple(member(i) for i in before), 1)
        kept = [i for i in before if i in after]
        added = [i for i in after if i not in before]
        new = netmap(tuple(member(i, online=i in changed) for i in kept + added), 2)
        delta = MapDelta.from_json(new.diff(old).to_json())
        self.assertEqual(old.apply(delta), new)
        self.assertLessEqual(len(delta.upsert), len(new.members))


class Readers(SynchronousTestCase):
    """A node's reader parses every push; the benchmark's shares what is the same."""

    def setUp(self) -> None:
        self.old = netmap((member(1), member(2)))
        self.new = netmap((member(1), member(3)), revision=2)
        self.delta = self.new.diff(self.old).to_json()

    def test_interface(self) -> None:
        verifyObject(IMapReader, MapReader())
        verifyObject(IMapReader, SharedMapReader())

    def test_both_read_alike(self) -> None:
        for reader in (MapReader(), SharedMapReader()):
            base = reader.read_map(self.old.to_json())
            self.assertEqual(base, self.old)
            self.assertEqual(reader.apply_delta(base, self.delta), self.new)
            self.assertRaises(MapError, reader.read_map, b"{")
            self.assertRaises(MapError, reader.apply_delta, base, b'{"base": 1}')
            self.assertRaises(MapError, reader.apply_delta, self.new, self.delta)

    def test_shared_parses_once(self) -> None:
        reader = SharedMapReader(size=2)
        # Each of many nodes received its own copy of the same bytes.
        maps = [reader.read_map(bytes(bytearray(self.old.to_json()))) for _ in range(100)]
        self.assertTrue(all(m is maps[0] for m in maps))
        applied = [reader.apply_delta(m, bytes(bytearray(self.delta))) for m in maps]
        self.assertTrue(all(m is applied[0] for m in applied))
        self.assertEqual(applied[0], self.new)
        self.assertEqual(reader.parsed, 2)
        # An equal map that is another object is applied to on its own.
        other = NetworkMap.from_json(self.old.to_json())
        self.assertEqual(reader.apply_delta(other, self.delta), self.new)
        self.assertEqual(reader.parsed, 3)

    def test_shared_maps_meet(self) -> None:
        """
        Nodes that got the full map of a revision and nodes whose delta
        made it hold one map, so the next delta is applied once.
        """
        reader = SharedMapReader()
        joined_early = reader.apply_delta(reader.read_map(self.old.to_json()), self.delta)
        joined_late = reader.read_map(self.new.to_json())
        self.assertIs(joined_late, joined_early)
        newer = netmap((member(1), member(3), member(4)), revision=3)
        step = newer.diff(self.new).to_json()
        self.assertIs(reader.apply_delta(joined_early, step),
                      reader.apply_delta(joined_late, step))
        self.assertEqual(reader.parsed, 4)
        # The same revision with other members (another rendezvous
        # instance's numbering) is another map.
        other = netmap((member(5),), revision=2)
        self.assertEqual(reader.read_map(other.to_json()), other)

    def test_shared_forgets_the_oldest(self) -> None:
        reader = SharedMapReader(size=2)
        for revision in (1, 2, 3):
            reader.read_map(netmap((member(1),), revision=revision).to_json())
        reader.read_map(netmap((member(1),), revision=3).to_json())
        self.assertEqual(reader.parsed, 3)
        reader.read_map(netmap((member(1),), revision=1).to_json())
        self.assertEqual(reader.parsed, 4)


class Compression(SynchronousTestCase):
    """Big maps and deltas go compressed to nodes that read that; readers take both."""

    def big(self) -> NetworkMap:
        return NetworkMap("0123456789abcdef", "big", "10.9.0.0/16", 7,
                          tuple(member(i % 250, node_id=f"{i:010x}") for i in range(300)))

    def test_big_compressed_small_not(self) -> None:
        big = self.big()
        packed = big.compressed()
        self.assertLess(len(packed), len(big.to_json()) / 4)
        self.assertEqual(NetworkMap.from_json(packed), big)
        self.assertIs(big.compressed(), packed)  # made once
        small = netmap((member(1),))
        self.assertEqual(small.compressed(), small.to_json())
        delta = big.diff(netmap((member(1),)))
        self.assertEqual(MapDelta.from_json(delta.compressed()), delta)
        self.assertEqual(MapReader().read_map(packed), big)

    def test_bad_streams_refused(self) -> None:
        packed = self.big().compressed()
        for bad in (packed[:-10], b"\x78\x01garbage", b"", b"\x00"):
            self.assertRaises(MapError, NetworkMap.from_json, bad)

    def test_bomb_refused(self) -> None:
        """A stream inflating beyond MAX_INFLATED is refused, not inflated."""
        bomb = zlib.compress(b"{" + b" " * (netmap_module.MAX_INFLATED + 10), 9)
        self.assertLess(len(bomb), 100_000)
        e = self.assertRaises(MapError, NetworkMap.from_json, bomb)
        self.assertIn("at most", str(e))
