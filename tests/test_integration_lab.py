"""`twistvpn lab`, the project's demonstration, run for real (root only)."""

from __future__ import annotations

import io
import os

from twisted.trial import unittest

from twistvpn import cli, lab
from twistvpn.testing import netns


class LabTests(unittest.TestCase):
    skip = netns.missing_requirements("wireguard-go", "wg", "iperf3", "ping")
    timeout = 120

    def namespaces(self) -> set[str]:
        """The lab's named namespaces (ip netns keeps them in /run/netns)."""
        try:
            names = os.listdir("/run/netns")
        except FileNotFoundError:
            return set()
        return {name for name in names if name.startswith("tvl")}

    def test_lab(self) -> None:
        before = self.namespaces()
        out = io.StringIO()
        args = cli.build_parser().parse_args(["lab", "--seconds", "1", "--pings", "5"])
        status = lab.run(args, out)
        text = out.getvalue()
        self.assertEqual(status, 0, text)
        rows = [line for line in text.splitlines() if " -> " in line and "iperf3" not in line]
        self.assertEqual(len(rows), 6, text)
        for row in rows:
            self.assertIn(" 0 %", row)
        throughput = [row for row in rows if row.endswith("Mbit/s")]
        self.assertEqual(len(throughput), 2, text)
        self.assertEqual(self.namespaces(), before, "the lab left namespaces behind")
