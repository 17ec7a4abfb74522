"""
The two builds (twistvpn.build): which one runs, the switch to the
pure-Python one in a compiled install, and the stale-module guard of a
checkout built in place.
"""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from twistvpn import build

EXPECT = "TWISTVPN_EXPECT_BUILD"


def _run(code: str, **environ: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != build.PURE_ENV}
    env.update(environ)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True,
        timeout=60,
    ).stdout.strip()


class BuildTests(SynchronousTestCase):
    def test_expected_build(self) -> None:
        """
        tox says which build each environment installed: a compiled one
        that fell back to pure Python (no compiler, a mypyc error) fails here.
        """
        expected = os.environ.get(EXPECT)
        if expected is None:
            raise SkipTest(f"{EXPECT} is not set (tox sets it)")
        running = build.compiled_modules()
        if expected == "compiled":
            self.assertEqual(running, list(build.COMPILED), build.describe())
            self.assertTrue(build.describe().startswith("compiled build"))
        else:
            self.assertEqual(expected, "pure")
            self.assertEqual(running, [])
            self.assertTrue(build.describe().startswith("pure-Python build"))

    def test_pure_switch(self) -> None:
        """TWISTVPN_PURE_PYTHON=1 imports every compiled module from its .py file."""
        code = (
            "from twistvpn import build; "
            "import twistvpn.wireguard.device as d; "
            "print(build.compiled_modules(), d.__file__.endswith('.py'), build.describe())"
        )
        self.assertEqual(
            _run(code, **{build.PURE_ENV: "1"}),
            f"[] True pure-Python build ({build.PURE_ENV} is set)",
        )

    def test_pure_switch_keeps_behaviour(self) -> None:
        """The switched modules are whole: a handshake and a packet, in plain Python."""
        code = (
            "from twisted.internet.task import Clock\n"
            "from twistvpn.wireguard.device import WireGuardDevice\n"
            "from twistvpn.wireguard.keys import generate_private_key\n"
            "got, wire, clock = [], [], Clock()\n"
            "a = WireGuardDevice(generate_private_key(), clock,"
            " lambda d, e: wire.append((b, d, 'a')), got.append)\n"
            "b = WireGuardDevice(generate_private_key(), clock,"
            " lambda d, e: wire.append((a, d, 'b')), got.append)\n"
            "a.add_peer(b.public_key, endpoint='b', allowed_ips=['100.64.0.2/32'])\n"
            "b.add_peer(a.public_key, endpoint='a', allowed_ips=['100.64.0.1/32'])\n"
            "packet = bytes([0x45, 0, 0, 20]) + bytes(8) + bytes([100, 64, 0, 1, 100, 64, 0, 2])\n"
            "a.send_packet(packet)\n"
            "for _ in range(10):\n"
            "    if wire:\n"
            "        device, data, source = wire.pop(0)\n"
            "        device.datagram_received(data, source)\n"
            "print(got == [packet], type(a).__module__)\n"
        )
        self.assertEqual(
            _run(code, **{build.PURE_ENV: "1"}), "True twistvpn.wireguard.device"
        )

    def test_pure_requested(self) -> None:
        self.assertFalse(build.pure_requested({}))
        self.assertFalse(build.pure_requested({build.PURE_ENV: ""}))
        self.assertFalse(build.pure_requested({build.PURE_ENV: "0"}))
        self.assertTrue(build.pure_requested({build.PURE_ENV: "1"}))

    def test_version_names_the_build(self) -> None:
        out = subprocess.run(
            [sys.executable, "-m", "twistvpn", "--version"], capture_output=True, text=True,
            check=True, timeout=60,
        ).stdout
        self.assertIn(build.describe(), out)


class StaleTests(SynchronousTestCase):
    """A checkout compiled in place whose source changed since."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.package = self.root / "src" / "twistvpn"
        (self.package / "wireguard").mkdir(parents=True)
        (self.root / "pyproject.toml").write_text("")
        self.source = self.package / "wireguard" / "replay.py"
        self.source.write_text("")
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        self.extension = self.package / "wireguard" / f"replay{suffix}"
        self.extension.write_text("")

    def _times(self, source: float, extension: float) -> None:
        os.utime(self.source, (source, source))
        os.utime(self.extension, (extension, extension))

    def test_newer_source(self) -> None:
        self._times(2000, 1000)
        self.assertEqual(build.stale_modules(str(self.package)), ["twistvpn.wireguard.replay"])

    def test_newer_extension(self) -> None:
        self._times(1000, 2000)
        self.assertEqual(build.stale_modules(str(self.package)), [])

    def test_installed_package_not_checked(self) -> None:
        """Outside a checkout the files are the ones the build made together."""
        self._times(2000, 1000)
        (self.root / "pyproject.toml").unlink()
        self.assertEqual(build.stale_modules(str(self.package)), [])
