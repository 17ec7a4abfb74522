"""
The shipped systemd units, checked by systemd itself (C{systemd-analyze
verify}), and C{twistvpn service install|uninstall}.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from collections.abc import Sequence

from twisted.trial.unittest import SynchronousTestCase

from twistvpn import cli
from twistvpn.units import install

ANALYZE = shutil.which("systemd-analyze")


def verify(path: str) -> subprocess.CompletedProcess:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, "verify", path], capture_output=True, text=True,
                          timeout=60)


class UnitTests(SynchronousTestCase):
    def write(self, service: str, text: str) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, install.unit_name(service))
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_systemd_analyze_verify(self) -> None:
        if ANALYZE is None:
            raise self.skipTest("needs systemd-analyze (Debian package systemd)")
        twistd = install.twistd_path()
        for service in install.SERVICES:
            path = self.write(service, install.render(service, twistd, ["--port", "41641"]
                                                      if service == "node" else []))
            done = verify(path)
            self.assertEqual((done.returncode, done.stderr), (0, ""), service)
        # The check can fail: a unit systemd would refuse is refused here.
        broken = install.render("node", twistd).replace("Restart=on-failure",
                                                        "Restart=sometimes")
        done = verify(self.write("node", broken))
        self.assertNotEqual((done.returncode, done.stderr), (0, ""))

    def test_hardening(self) -> None:
        """Each unit restarts on failure, keeps state, and has only the capabilities it needs."""
        for service, capabilities in [("node", "CAP_NET_ADMIN CAP_NET_BIND_SERVICE"),
                                      ("rendezvous", "CAP_NET_BIND_SERVICE"),
                                      ("relay", "CAP_NET_BIND_SERVICE")]:
            lines = install.shipped_unit(service).splitlines()
            state = "twistvpn" if service == "node" else f"twistvpn-{service}"
            for wanted in ["Restart=on-failure", f"StateDirectory={state}",
                           "ProtectSystem=strict", "ProtectHome=yes", "NoNewPrivileges=yes",
                           f"CapabilityBoundingSet={capabilities}",
                           "WantedBy=multi-user.target"]:
                self.assertIn(wanted, lines, service)
            self.assertTrue(any(line.startswith("RuntimeDirectory=") for line in lines))

    def test_render(self) -> None:
        text = install.render("rendezvous", "/opt/tv/bin/twistd",
                              ["--hostname", "vpn.example.org", "--tls-cert", "/etc/a b.pem"])
        [exec_start] = [line for line in text.splitlines() if line.startswith("ExecStart=")]
        self.assertEqual(exec_start,
                         "ExecStart=/opt/tv/bin/twistd --nodaemon --pidfile= "
                         "twistvpn-rendezvous --data-dir /var/lib/twistvpn-rendezvous "
                         "--hostname vpn.example.org --tls-cert '/etc/a b.pem'")


class InstallTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.unit_dir = self.mktemp()
        os.makedirs(self.unit_dir)
        self.calls: list[list[str]] = []
        self.fail_on: str | None = None

    def systemctl(self, argv: Sequence[str]) -> subprocess.CompletedProcess:
        self.calls.append(list(argv))
        failed = self.fail_on is not None and self.fail_on in argv
        return subprocess.CompletedProcess(
            ["systemctl", *argv], 1 if failed else 0, "",
            "Failed to enable unit: Access denied\n" if failed else "")

    def cli(self, *argv: str) -> tuple[int, str, str]:
        self.patch(install, "_run_systemctl", self.systemctl)
        args = cli.build_parser().parse_args(["service", *argv[:2], "--unit-dir",
                                              self.unit_dir, *argv[2:]])
        out, err = io.StringIO(), io.StringIO()
        return args.func(args, out, err), out.getvalue(), err.getvalue()

    def test_install_enables_and_starts(self) -> None:
        code, out, _ = self.cli("install", "node", "--now")
        self.assertEqual(code, 0)
        path = os.path.join(self.unit_dir, "twistvpn-node.service")
        self.assertEqual(out, f"{path}: installed and enabled, started\n")
        self.assertEqual(self.calls, [["daemon-reload"],
                                      ["enable", "--now", "twistvpn-node.service"]])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o644)
        with open(path) as f:
            self.assertIn(f"ExecStart={install.twistd_path()} --reactor twistvpn", f.read())

    def test_options_after_the_separator(self) -> None:
        code, _, _ = self.cli("install", "rendezvous", "--args", "--hostname vpn.example.org")
        self.assertEqual(code, 0)
        self.assertEqual(self.calls[-1], ["enable", "twistvpn-rendezvous.service"])
        with open(os.path.join(self.unit_dir, "twistvpn-rendezvous.service")) as f:
            self.assertIn("--data-dir /var/lib/twistvpn-rendezvous --hostname vpn.example.org\n",
                          f.read())

    def test_systemctl_failure_is_one_line(self) -> None:
        self.fail_on = "enable"
        code, _, err = self.cli("install", "relay")
        self.assertEqual((code, err), (1, "twistvpn: systemctl enable twistvpn-relay.service "
                                          "failed: Failed to enable unit: Access denied\n"))

    def test_uninstall(self) -> None:
        self.cli("install", "node")
        code, out, _ = self.cli("uninstall", "node")
        self.assertEqual(code, 0)
        self.assertEqual(self.calls[-2:], [["disable", "--now", "twistvpn-node.service"],
                                           ["daemon-reload"]])
        self.assertEqual(os.listdir(self.unit_dir), [])
        code, _, err = self.cli("uninstall", "node")
        self.assertEqual(code, 1)
        self.assertIn("not installed", err)
