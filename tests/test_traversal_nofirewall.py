"""
Routers without a firewall on themselves (issue 17): the conntrack clash
on the simulated network, with joined nodes and the real rendezvous.  An
easy NAT without it meets a hard one: the birthday strategy's fresh last
round finds the easy side's open entries (the easy side answers where the
probe came from), so the pair goes direct, not to the relay.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.support.joined import Mesh
from twistvpn.traversal.manager import DIRECT


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
