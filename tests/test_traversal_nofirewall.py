"""
Routers without a firewall on themselves (issue 17): the conntrack clash
on the simulated network, with joined nodes and the real rendezvous.  An
easy NAT without it meets a hard one: the birthday strategy's fresh last
round finds the easy side's open entries (the easy side answers where the
probe came from), so the pair goes direct, not to the relay.

Openers (the strategies' first, hop-limited round) are what make two such
routers meet when their first probes would not cross in flight: as in the
lab, where the routers are microseconds apart.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.support.joined import Mesh
from twistvpn.testing.pathsim import Pair
from twistvpn.traversal.manager import DIRECT
from twistvpn.traversal.strategies import LanStrategy, PunchStrategy


class NoFirewallTests(SynchronousTestCase):
    def direct_within(self, a_kind: str, b_kind: str, seconds: float, seed: int) -> float | None:
        mesh = Mesh(seed=seed)
        a, b = mesh.members(a_kind, b_kind)
        started = mesh.clock.seconds()

        def direct() -> bool:
            return bool(a.peer(b).manager.kind == DIRECT == b.peer(a).manager.kind)

        if not mesh.run(seconds, until=direct):
            return None
        self.assertTrue(mesh.delivered(a, b, b"direct through the clash"))
        return float(mesh.clock.seconds() - started)

    def test_easy_without_firewall_meets_hard(self) -> None:
        for a_kind, b_kind in (("easynf", "hard"), ("hard", "easynf")):
            times = [self.direct_within(a_kind, b_kind, 15, seed) for seed in (0, 2, 3)]
            self.assertNotIn(None, times, (a_kind, b_kind))

    def test_both_easy_without_firewall(self) -> None:
        """With real latency between them, both sides' first probes cross in flight."""
        self.assertIsNotNone(self.direct_within("easynf", "easynf", 5, 0))


class OpenerTests(SynchronousTestCase):
    """
    Two easy routers without the firewall, 50 microseconds apart (the lab),
    whose nodes start their attempts 1 to 10 ms apart.
    """

    def run_pair(self, open_hops: int | None, seed: int) -> str:
        strategies = [LanStrategy(), PunchStrategy(open_hops=open_hops)]
        pair = Pair("easynf", "easynf", seed, latency=0.00005, strategies=strategies)
        pair.start(skew=0.001 * (1 + seed))
        result = pair.run(timeout=15.0)
        self.assertEqual(result.kinds[0], result.kinds[1])
        return result.kinds[0]

    def test_openers_make_it_direct(self) -> None:
        self.assertEqual({self.run_pair(2, seed) for seed in range(10)}, {DIRECT})

    def test_without_openers_the_clash_keeps_it_relayed(self) -> None:
        """The control: the same pairs, first rounds at full TTL."""
        self.assertEqual({self.run_pair(None, seed) for seed in range(10)}, {"relay"})
