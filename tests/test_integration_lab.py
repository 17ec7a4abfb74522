"""
`twistvpn lab --static`, the static-mode demonstration, run for real, and
both labs interrupted (root only).  The joined-mode lab's scenarios are in
tests.test_integration_nat and its command in tests.test_integration_joined_lab.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

from twisted.trial import unittest

from twistvpn import cli
from twistvpn.testing import lab, netns


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class LabTests(unittest.TestCase):
    skip = netns.missing_requirements("wireguard-go", "wg", "iperf3", "ping")
    timeout = 120

    def namespaces(self, prefix: str | None = None) -> set[str]:
        """
        Named namespaces (ip netns keeps them in /run/netns) of labs made by
        this process, or whose names begin with C{prefix}.
        """
        prefix = netns.process_prefix("tvl") if prefix is None else prefix
        try:
            names = os.listdir("/run/netns")
        except FileNotFoundError:
            return set()
        return {name for name in names if name.startswith(prefix)}

    def test_lab(self) -> None:
        before = self.namespaces()
        out = io.StringIO()
        args = cli.build_parser().parse_args(["lab", "--static", "--seconds", "1", "--pings", "5"])
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

    def ours(self, prefix: str) -> set[str]:
        return self.namespaces(prefix)

    def sockets(self, prefix: str) -> list[str]:
        if not netns.WIREGUARD_SOCKET_DIR.is_dir():  # no wireguard-go has run on this machine
            return []
        return [p for p in os.listdir(netns.WIREGUARD_SOCKET_DIR) if p.startswith(prefix)]

    def interrupt(self, signum: int, when_running: bool, *args: str) -> None:
        process = subprocess.Popen(
            [sys.executable, "-m", "twistvpn", "lab", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # As from a terminal: a test run started in the background
            # (SIGINT ignored, which children inherit) must not hide Ctrl-C.
            preexec_fn=_default_sigint,
        )
        self.addCleanup(process.kill)
        prefix = netns.process_prefix("tvl", process.pid)
        if when_running:
            # Every VPN process up: the last host's control socket exists.
            netns.wait_for(
                lambda: any(p.endswith("wc.sock") for p in self.sockets(prefix)),
                30,
                "the lab's hosts",
            )
        else:
            netns.wait_for(lambda: len(self.ours(prefix)) >= 3, 30, "the lab's namespaces")
        process.send_signal(signum)
        out, _ = process.communicate(timeout=60)
        self.assertEqual(process.returncode, 130, out.decode())
        self.assertIn(b"interrupted; everything it built is removed", out)
        self.assertEqual(self.ours(prefix), set())
        self.assertEqual(self.sockets(prefix), [])

    def test_ctrl_c(self) -> None:
        """Ctrl-C while building the joined lab: everything it built goes."""
        self.interrupt(signal.SIGINT, False)

    def test_sigterm(self) -> None:
        """SIGTERM with every host of the static lab running: the same."""
        self.interrupt(signal.SIGTERM, True, "--static")
