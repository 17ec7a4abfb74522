"""
The transport replay window, by example and against a set-based model.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twistvpn.wireguard.messages import REJECT_AFTER_MESSAGES
from twistvpn.wireguard.replay import WINDOW_SIZE, ReplayWindow


class Model:
    """The window's specification: each counter once, none too far behind the newest."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.highest = -1

    def accept(self, counter: int) -> bool:
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        if counter in self.seen or counter <= self.highest - WINDOW_SIZE:
            return False
        self.seen.add(counter)
        self.highest = max(self.highest, counter)
        return True


class ReplayWindowTests(SynchronousTestCase):
    def test_in_order(self) -> None:
        window = ReplayWindow()
        self.assertTrue(all(window.accept(n) for n in range(5000)))

    def test_duplicate(self) -> None:
        window = ReplayWindow()
        self.assertTrue(window.accept(0))
        self.assertFalse(window.accept(0))
        self.assertTrue(window.accept(7))
        self.assertFalse(window.accept(7))

    def test_reordered(self) -> None:
        window = ReplayWindow()
        for n in (5, 3, 4, 1, 0, 2, 9, 6, 8, 7):
            self.assertTrue(window.accept(n), n)
        for n in range(10):
            self.assertFalse(window.accept(n), n)

    def test_too_old(self) -> None:
        window = ReplayWindow()
        self.assertTrue(window.accept(WINDOW_SIZE + 10))
        self.assertTrue(window.accept(11))  # oldest still inside
        self.assertFalse(window.accept(10))  # just outside
        self.assertFalse(window.accept(0))

    def test_big_jump_forgets_everything_behind(self) -> None:
        window = ReplayWindow()
        window.accept(1)
        self.assertTrue(window.accept(10**9))
        self.assertFalse(window.accept(1))
        self.assertTrue(window.accept(10**9 - 1))

    def test_reject_after_messages(self) -> None:
        """Counters from REJECT_AFTER_MESSAGES on are never valid."""
        window = ReplayWindow()
        self.assertTrue(window.accept(REJECT_AFTER_MESSAGES - 1))
        self.assertFalse(window.accept(REJECT_AFTER_MESSAGES))
        self.assertFalse(window.accept(2**64 - 1))
        self.assertTrue(window.accept(REJECT_AFTER_MESSAGES - 2))

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.integers(0, 300),
                st.integers(0, 3 * WINDOW_SIZE),
                st.integers(REJECT_AFTER_MESSAGES - 3000, 2**64 - 1),
            ),
            max_size=200,
        )
    )
    def test_matches_model(self, counters: list[int]) -> None:
        window, model = ReplayWindow(), Model()
        for counter in counters:
            self.assertEqual(window.accept(counter), model.accept(counter), counter)

    @settings(max_examples=100, deadline=None)
    @given(st.integers(0, 2**40), st.lists(st.integers(-3000, 3000), max_size=200))
    def test_matches_model_around_an_offset(self, base: int, deltas: list[int]) -> None:
        window, model = ReplayWindow(), Model()
        for delta in deltas:
            counter = max(0, base + delta)
            self.assertEqual(window.accept(counter), model.accept(counter), counter)
