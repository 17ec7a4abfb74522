"""
`twistvpn lab` (joined mode) as users run it: the default NATs, its path
matrix, and nothing left behind (root only).
"""

from __future__ import annotations

import io
import os

from twisted.trial import unittest

from tests.support.requirements import joined_mode_missing
from twistvpn import cli
from twistvpn.testing import lab, netns


class JoinedLabCommand(unittest.SynchronousTestCase):
    skip = joined_mode_missing()

    def namespaces(self) -> set[str]:
        """Named namespaces of labs made by this process (not by a parallel test run)."""
        prefix = netns.process_prefix("tvl")
        try:
            return {n for n in os.listdir("/run/netns") if n.startswith(prefix)}
        except FileNotFoundError:
            return set()

    def test_default(self) -> None:
        before = self.namespaces()
        out = io.StringIO()
        args = cli.build_parser().parse_args(["lab", "--pings", "3"])
        status = lab.run(args, out)
        text = out.getvalue()
        rows = [line.split() for line in text.splitlines() if " -> " in line]
        # a1, a2 (site A) and b1 (site B): every ordered pair
        self.assertEqual(sorted(r[0] + r[2] for r in rows),
                         ["a1a2", "a1b1", "a2a1", "a2b1", "b1a1", "b1a2"], text)
        for row in rows:
            self.assertIn(row[3], lab.PATH_KINDS, text)
            self.assertEqual(row[7:9], ["0", "%"], text)  # no loss once up
        paths = {r[0] + r[2]: r[3] for r in rows}
        self.assertEqual((paths["a1a2"], paths["a2a1"]), ("lan", "lan"), text)
        self.assertEqual(status, 0, text)
        self.assertEqual(self.namespaces(), before, "the lab left namespaces behind")

    def test_bad_option(self) -> None:
        parser = cli.build_parser()
        err = io.StringIO()
        import contextlib

        with contextlib.redirect_stderr(err):
            self.assertRaises(SystemExit, parser.parse_args, ["lab", "--nat-a", "fancy"])
        self.assertIn("invalid choice: 'fancy'", err.getvalue())
