"""The map format both sides share: round trips, deltas, malformed input."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twistvpn.rendezvous import netmap as netmap_module
from twistvpn.rendezvous.netmap import (
    MapDelta,
    MapError,
    Member,
    NetworkMap,
    check_endpoints,
    format_endpoint,
    parse_endpoint,
)


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
