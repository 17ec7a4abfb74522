"""Tests for twistvpn.options: the plugins' shared option checks."""

from __future__ import annotations

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
