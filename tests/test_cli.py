"""Tests for the twistvpn command's key commands and its extension point."""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys

from twisted.trial import unittest

from twistvpn import cli
from twistvpn.testing import lab, netns
from twistvpn.wireguard.keys import decode_key, encode_key, public_key

WG = shutil.which("wg")


class CLITests(unittest.TestCase):
    def run_cli(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdin", io.StringIO(stdin))
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        try:
            status = cli.main(list(argv))
        except SystemExit as e:
            status = int(e.code or 0)
        return status, out.getvalue(), err.getvalue()

    def test_genkey(self) -> None:
        status, out, _ = self.run_cli("genkey")
        self.assertEqual(status, 0)
        self.assertTrue(out.endswith("\n"))
        key = decode_key(out)
        # Clamped as wg genkey's are.
        self.assertEqual(key[0] & 7, 0)
        self.assertEqual(key[31] & 0xC0, 0x40)
        self.assertNotEqual(self.run_cli("genkey")[1], out)

    def test_genpsk(self) -> None:
        status, out, _ = self.run_cli("genpsk")
        self.assertEqual(status, 0)
        self.assertEqual(len(decode_key(out)), 32)

    def test_pubkey(self) -> None:
        private = bytes(range(32))
        status, out, _ = self.run_cli("pubkey", stdin=encode_key(private) + "\n")
        self.assertEqual(status, 0)
        self.assertEqual(out, encode_key(public_key(private)) + "\n")

    def test_pubkey_bad_input(self) -> None:
        for text in ("", "garbage\n", encode_key(bytes(32))[:-2] + "\n"):
            status, out, err = self.run_cli("pubkey", stdin=text)
            self.assertEqual((status, out), (1, ""))
            self.assertIn("unable to read private key", err)

    def test_genkey_warns_about_world_readable_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            os.chmod(path, 0o644)
            err = io.StringIO()
            cli._warn_if_world_accessible(f, err)
            self.assertIn("world accessible", err.getvalue())
            os.chmod(path, 0o600)
            err = io.StringIO()
            cli._warn_if_world_accessible(f, err)
            self.assertEqual(err.getvalue(), "")

    def test_no_command(self) -> None:
        status, _, err = self.run_cli()
        self.assertEqual(status, 2)
        self.assertIn("genkey", err)

    def test_lab_registered(self) -> None:
        parser = cli.build_parser()
        args = parser.parse_args(["lab", "--seconds", "2"])
        self.assertEqual(args.seconds, 2.0)
        self.assertRaises(SystemExit, parser.parse_args, ["lab", "--seconds", "0"])

    def test_modules_extend_the_command(self) -> None:
        """A module exposing register(subparsers) adds commands."""
        module = type(sys)("twistvpn_test_extension")

        def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
            subparsers.add_parser("hello").set_defaults(func=lambda args: 7)

        module.register = register  # type: ignore[attr-defined]
        self.patch(sys, "modules", {**sys.modules, module.__name__: module})
        self.patch(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, module.__name__])
        self.assertEqual(self.run_cli("hello")[0], 7)


class LazyImportTests(unittest.TestCase):
    """A command loads the modules it uses, not every command's."""

    HEAVY = ("twistvpn.testing", "twistvpn.rendezvous.server", "twistvpn.rendezvous.service",
             "twistvpn.relay", "twistvpn.node.joined")

    def loaded(self, *argv: str) -> list[str]:
        script = (
            "import sys, io; from twistvpn import cli\n"
            "sys.stdin = io.StringIO(sys.argv[1]); out = sys.stdout; sys.stdout = io.StringIO()\n"
            "try: status = cli.main(sys.argv[2:])\n"
            "except SystemExit as e: status = e.code or 0\n"
            "out.write(' '.join(sorted(m for m in sys.modules if m.startswith('twistvpn'))))\n"
            "sys.exit(status)\n"
        )
        key = encode_key(bytes(32))
        done = subprocess.run([sys.executable, "-c", script, key, *argv],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.split()

    def assert_light(self, *argv: str) -> list[str]:
        modules = self.loaded(*argv)
        heavy = [m for m in modules if m.startswith(self.HEAVY)]
        self.assertEqual(heavy, [], f"twistvpn {' '.join(argv)} imported {heavy}")
        return modules

    def test_key_commands(self) -> None:
        for command in ("genkey", "pubkey", "genpsk"):
            modules = self.assert_light(command)
            self.assertNotIn("twistvpn.rendezvous.admin_cli", modules)

    def test_admin_help_needs_no_server(self) -> None:
        self.assertIn("twistvpn.rendezvous.admin_cli", self.assert_light("admin", "--help"))

    def test_every_command_has_a_module(self) -> None:
        parser = cli.build_parser()
        choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        self.assertEqual(sorted(choices), sorted(cli.COMMANDS))

    def test_modules_for(self) -> None:
        self.assertEqual(cli.modules_for(["genkey"]), ["twistvpn.cli"])
        self.assertEqual(cli.modules_for(["admin", "network", "list"]),
                         ["twistvpn.rendezvous.admin_cli"])
        self.assertEqual(cli.modules_for([]), cli.COMMAND_MODULES)
        self.assertEqual(cli.modules_for(["--help"]), cli.COMMAND_MODULES)
        self.assertEqual(cli.modules_for(["nonsense"]), cli.COMMAND_MODULES)


class WireGuardCompatibilityTests(unittest.TestCase):
    """Byte for byte what the real wg prints and reads."""

    skip = None if WG else "wg (wireguard-tools) is not installed"

    def twistvpn(self, *argv: str, stdin: str = "") -> str:
        return subprocess.run(
            [sys.executable, "-m", "twistvpn", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout

    def wg(self, *argv: str, stdin: str = "") -> str:
        return subprocess.run(
            [WG, *argv], input=stdin, capture_output=True, text=True, check=True, timeout=10
        ).stdout  # type: ignore[list-item]

    def test_our_keys_in_wg(self) -> None:
        private = self.twistvpn("genkey")
        self.assertEqual(self.wg("pubkey", stdin=private), self.twistvpn("pubkey", stdin=private))

    def test_wg_keys_in_ours(self) -> None:
        private = self.wg("genkey")
        self.assertEqual(self.twistvpn("pubkey", stdin=private), self.wg("pubkey", stdin=private))

    def test_unclamped_and_psk(self) -> None:
        """Any 32 bytes are a key to wg pubkey (it clamps); so to ours."""
        for text in (self.wg("genpsk"), self.twistvpn("genpsk"), encode_key(b"\xff" * 32) + "\n"):
            self.assertEqual(self.twistvpn("pubkey", stdin=text), self.wg("pubkey", stdin=text))


class LabTests(unittest.TestCase):
    """The lab's parts that need no root; tests/test_integration_lab.py runs it."""

    def node(self, label: str, kind: str) -> netns.VpnNode:
        return netns.VpnNode(
            label, kind, f"ns-{label}", f"if{label}", "k", "p", "203.0.113.1", "100.64.0.1", 1420
        )

    def test_refuses_without_requirements(self) -> None:
        self.patch(netns, "missing_requirements", lambda *programs: "needs root")
        out = io.StringIO()
        args = cli.build_parser().parse_args(["lab"])
        self.assertEqual(lab.run(args, out), 1)
        self.assertEqual(out.getvalue(), "twistvpn lab: cannot run: needs root\n")

    def test_table(self) -> None:
        a = self.node("a", netns.TWISTVPN)
        c = self.node("c", netns.WIREGUARD_GO)
        text = lab.format_table(
            [
                lab.PairResult(a, c, 0.0, 0.512, 4.2e8),
                lab.PairResult(c, a, 100.0, None, error="timed out"),
            ]
        )
        lines = text.splitlines()
        self.assertEqual(lines[0].split(), ["pair", "ping", "loss", "RTT", "TCP", "throughput"])
        self.assertEqual(
            lines[2].split(),
            [
                "a",
                "(twistvpn)",
                "->",
                "c",
                "(wireguard-go)",
                "0",
                "%",
                "0.51",
                "ms",
                "420.0",
                "Mbit/s",
            ],
        )
        self.assertEqual(lines[3].split()[-4:], ["100", "%", "-", "-"])
        self.assertEqual(lines[4], "c (wireguard-go) -> a (twistvpn): timed out")
