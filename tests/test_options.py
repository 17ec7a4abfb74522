"""Tests for twistvpn.options: the plugins' shared option checks."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.python import usage
from twisted.trial import unittest

from twistvpn.options import integer, port


class PortOptions(usage.Options):
    optParameters = [["udp-port", None, 3478, "A port.", port("udp-port")]]


class OptionsTests(unittest.TestCase):
    def test_integer(self) -> None:
        self.assertEqual(integer("port", "41641", 0, 65535), 41641)
        for value, message in (
            ("x", "--port: 'x' is not a number"),
            (None, "--port: None is not a number"),
            ("70000", "--port: 70000 is out of range (0 to 65535)"),
            ("-1", "--port: -1 is out of range (0 to 65535)"),
        ):
            with self.assertRaises(usage.UsageError) as e:
                integer("port", value, 0, 65535)
            self.assertEqual(str(e.exception), message)

    def test_port_coercer(self) -> None:
        """Through usage.Options: the error is one line naming the option."""
        options = PortOptions()
        options.parseOptions(["--udp-port", "0"])
        self.assertEqual(options["udp-port"], 0)
        options = PortOptions()
        options.parseOptions([])
        self.assertEqual(options["udp-port"], 3478)
        for value in ("65536", "port"):
            with self.assertRaises(usage.UsageError) as e:
                PortOptions().parseOptions(["--udp-port", value])
            self.assertTrue(str(e.exception).startswith("--udp-port: "), str(e.exception))
        self.assertIn("0 to 65535", str(PortOptions()))


class OneLineErrorTests(unittest.TestCase):
    """Under twistd a bad option is one line on stderr, not the usage on stdout."""

    def twistd(self, *argv: str) -> subprocess.CompletedProcess[str]:
        script = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
        return subprocess.run([sys.executable, "-c", script, "-n", *argv], capture_output=True,
                              text=True, timeout=60, cwd=self.mktemp_dir())

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path

    def test_each_plugin(self) -> None:
        for argv, message in [
            (("twistvpn-node", "--join", "x"),
             "twistd twistvpn-node: --join: 'x' is not a network ID (16 hex digits)"),
            (("twistvpn-rendezvous", "--udp-port", "x"),
             "twistd twistvpn-rendezvous: --udp-port: 'x' is not a number"),
            (("twistvpn-relay", "--no-such-option"),
             "twistd twistvpn-relay: option --no-such-option not recognized"),
        ]:
            done = self.twistd(*argv)
            self.assertEqual(done.returncode, 1, done)
            self.assertEqual(done.stdout, "")
            self.assertEqual(done.stderr.splitlines(), [message])

    def test_help_still_shows_usage(self) -> None:
        done = self.twistd("twistvpn-node", "--help")
        self.assertEqual(done.returncode, 0)
        self.assertIn("--data-dir", done.stdout)

    def test_on_their_own_options_raise_usage_error(self) -> None:
        from twistvpn.node import node_tap

        self.assertRaises(usage.UsageError, node_tap.Options().parseOptions, ["--join", "x"])
