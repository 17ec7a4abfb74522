"""
The traversal grid: every ordered pair of NAT presets, and two hosts behind
one NAT (with and without hairpinning), on the simulated network; the
presets include routers without a firewall on themselves (C{easynf},
C{hardnf}: the conntrack clash), which end as their firewalled kinds do
because the strategies' first rounds are openers.  Per pair:
the path kind both sides end on, the strategy that found it, an upper bound
on simulated time to the first verified path, an upper bound on the probes
sent until then, and (for the birthday pairs) the success rate over 200
seeds.  Each side's link latency is drawn from the seed (5-60 ms one way).

The table of measured values is produced by C{bench/traversal.py}.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from twistvpn.testing.natsim import SAME_NAT
from twistvpn.testing.pathsim import expected, grid_pairs, measure

DEADLINE = 15.0  # simulated seconds per run
BIRTHDAY_SEEDS = range(200)
SEEDS = range(10)

# (max seconds to the first path, max probes until then), by strategy.
BOUNDS = {
    "lan": (0.5, 20),
    "punch": (1.0, 40),
    "sequential": (1.0, 150),
    # 256 + 1,024, and when those missed, two fresh rounds of 256 (at 10.3 and
    # 13.3 s, full probes), plus the triggered checks.
    "birthday": (14.5, 1900),
}
RELAY_OPEN_BOUND = 0.1  # the relay is the bridge from the start
RELAY_PROBE_BOUND = 100  # probes sent in the whole deadline on a relay-only pair


class GridTests(SynchronousTestCase):
    def check(self, a: str, b: str) -> None:
        kind, strategy = expected(a, b)
        seeds = BIRTHDAY_SEEDS if strategy == "birthday" else SEEDS
        stats = measure(a, b, seeds, DEADLINE)
        if strategy == "birthday":
            self.assertGreaterEqual(stats.rate, 0.95, stats.as_dict())
        else:
            self.assertEqual(stats.successes, stats.runs, stats.as_dict())
        if kind == "relay":
            check_relayed(self, stats)
            self.assertEqual(stats.strategies, {})
            return
        self.assertEqual(set(stats.strategies), {strategy}, stats.as_dict())
        time_bound, probe_bound = BOUNDS[strategy]
        self.assertLessEqual(max(stats.times), time_bound, stats.as_dict())
        self.assertLessEqual(max(stats.probes), probe_bound, stats.as_dict())


def check_relayed(case: SynchronousTestCase, stats: Any) -> None:
    """Every run on the relay, open at once, with few probes."""
    summary = stats.as_dict()
    case.assertEqual(stats.kinds, {"relay": stats.runs}, summary)
    case.assertLessEqual(max(stats.times), RELAY_OPEN_BOUND, summary)
    case.assertLessEqual(max(stats.probes), RELAY_PROBE_BOUND, summary)


def add_cells(case: type, ipv6: bool) -> None:
    """A test method per grid cell (dual stack: no same-NAT cells)."""
    for a, b in grid_pairs():
        if ipv6 and a in SAME_NAT:
            continue

        def test(self: Any, a: str = a, b: str = b) -> None:
            self.check(a, b)

        test.__doc__ = f"{a} x {b}{', dual stack' if ipv6 else ''}: {expected(a, b, ipv6)}"
        setattr(case, f"test_{a}__{b}".replace("-", "_"), test)


add_cells(GridTests, ipv6=False)


# Dual stack: every pair that UDP reaches goes direct and ends on IPv6 (the
# path manager prefers it); the first path comes from punch over IPv6 or an
# IPv4 strategy, whichever answers first.
DUAL_STACK_BOUND = (1.0, 150)  # sequential x sequential sends 142


class DualStackGridTests(SynchronousTestCase):
    """
    Issue 17: both sites dual stack (2001:db8::/32), IPv4 behind the preset's
    NAT, IPv6 through a stateful firewall that lets in only answers.
    """

    def check(self, a: str, b: str) -> None:
        kind, strategy = expected(a, b, ipv6=True)
        stats = measure(a, b, SEEDS, DEADLINE, ipv6=True)
        summary = stats.as_dict()
        self.assertEqual(stats.successes, stats.runs, summary)
        if kind == "relay":
            check_relayed(self, stats)
            return
        self.assertEqual(stats.families, {6: stats.runs}, summary)
        if strategy is not None:
            self.assertEqual(set(stats.strategies), {strategy}, summary)
        time_bound, probe_bound = DUAL_STACK_BOUND
        self.assertLessEqual(max(stats.times), time_bound, summary)
        self.assertLessEqual(max(stats.probes), probe_bound, summary)


add_cells(DualStackGridTests, ipv6=True)


class LossyGridTests(SynchronousTestCase):
    """With 2 % loss on every link, the strategies still get through."""

    def test_punch(self) -> None:
        stats = measure("easy", "easyaf", range(20), DEADLINE, loss=0.02)
        self.assertEqual(stats.successes, 20, stats.as_dict())

    def test_sequential(self) -> None:
        stats = measure("hard-sequential", "hard-sequential", range(20), DEADLINE, loss=0.02)
        self.assertEqual(stats.successes, 20, stats.as_dict())

    def test_birthday(self) -> None:
        stats = measure("easy", "hard", range(100), DEADLINE, loss=0.02)
        self.assertGreaterEqual(stats.rate, 0.9, stats.as_dict())
