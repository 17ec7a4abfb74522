"""
The kept fuzz suite: every parser of untrusted input (twistvpn.testing.fuzz)
fed hypothesis-made inputs, each a prefix that reaches deep (a message type)
and random bytes.  Nothing may escape, and nothing may be logged as an
error.  Bounded here (TWISTVPN_FUZZ_EXAMPLES, 150 each by default); the
long run is bench/fuzz.py.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twistvpn.testing.fuzz import TARGETS, Target

EXAMPLES = int(os.environ.get("TWISTVPN_FUZZ_EXAMPLES", "150"))


def fuzz_test(target: Target) -> object:
    @settings(max_examples=EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
    @given(st.sampled_from(target.prefixes), st.binary(max_size=600))
    def test(self: SynchronousTestCase, prefix: bytes, tail: bytes) -> None:
        feed = self.feeds.get(target.name)  # type: ignore[attr-defined]
        if feed is None:
            feed = self.feeds[target.name] = target.build()  # type: ignore[attr-defined]
        feed(prefix + tail)
        self.assertEqual(self.flushLoggedErrors(), [], f"{target.name} logged an error")

    test.__name__ = f"test_{target.name.replace('-', '_')}"
    test.__doc__ = target.build.__doc__
    return test


class FuzzTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.feeds: dict[str, object] = {}

    def test_every_target_is_here(self) -> None:
        names = {name for name in dir(self) if name.startswith("test_")}
        for target in TARGETS:
            self.assertIn(f"test_{target.name.replace('-', '_')}", names)


for _target in TARGETS:
    setattr(FuzzTests, f"test_{_target.name.replace('-', '_')}", fuzz_test(_target))
