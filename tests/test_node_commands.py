"""
`twistvpn join`, `leave`, `networks` and `set` on a stopped node: they
edit the settings file in its data directory, which the next start reads.
(On a running node they go through the local API: tests/test_joined_service.)
"""

from __future__ import annotations

import io
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from twistvpn import cli
from twistvpn.node import settings

NETWORK = "8f3a5c0d9e1b2a47"
OTHER = "0123456789abcdef"
URL = "twistvpn://203.0.113.10:8443#sha256=" + "ab" * 32


class StoppedNodeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data_dir = self.mktemp()

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        args = cli.build_parser().parse_args([*argv, "--data-dir", self.data_dir])
        out, err = io.StringIO(), io.StringIO()
        code = args.func(args, out, err)
        return code, out.getvalue(), err.getvalue()

    def test_first_join_needs_the_rendezvous(self) -> None:
        code, _, err = self.run_cli("join", NETWORK)
        self.assertEqual(code, 1)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("the first join needs --rendezvous", err)

    def test_join_leave_networks_set(self) -> None:
        code, out, _ = self.run_cli("join", NETWORK.upper(), "--rendezvous", URL)
        self.assertEqual(code, 0)
        self.assertIn(f"{NETWORK}: joined\nthe node is not running", out)
        self.assertEqual(self.run_cli("join", OTHER)[0], 0)  # the rendezvous is remembered
        self.assertEqual(settings.load(self.data_dir),
                         {"rendezvous": URL, "networks": [NETWORK, OTHER]})
        path = settings.settings_path(self.data_dir)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        code, out, _ = self.run_cli("networks")
        self.assertEqual(out.splitlines()[2:], [f"{NETWORK}  -     stopped  -   -",
                                                f"{OTHER}  -     stopped  -   -"])
        self.assertEqual(self.run_cli("leave", NETWORK)[0], 0)
        self.assertEqual(settings.load(self.data_dir)["networks"], [OTHER])
        code, _, err = self.run_cli("leave", NETWORK)
        self.assertEqual((code, err), (1, f"twistvpn: {NETWORK}: not a network of this node\n"))
        self.assertEqual(self.run_cli("set", "name", "gpu-server")[0], 0)
        self.assertEqual(self.run_cli("set", "port", "51000")[0], 0)
        self.assertEqual(settings.load(self.data_dir),
                         {"rendezvous": URL, "networks": [OTHER], "name": "gpu-server",
                          "port": 51000})

    def test_bad_values_change_nothing(self) -> None:
        self.run_cli("join", NETWORK, "--rendezvous", URL)
        before = open(settings.settings_path(self.data_dir)).read()
        for argv, message in [
            (("join", "xyz"), "twistvpn: 'xyz' is not a network ID (16 hex digits)\n"),
            (("set", "port", "70000"), "twistvpn: port: 70000 is out of range (0 to 65535)\n"),
            (("set", "colour", "blue"), "twistvpn: colour: not a setting (settable: name, "),
            (("set", "name", " x"), "twistvpn: name: ' x' must be 1 to 64 printable"),
            (("join", OTHER, "--rendezvous", "https://x"), "twistvpn: bad rendezvous address"),
        ]:
            code, _, err = self.run_cli(*argv)
            self.assertEqual(code, 1, argv)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertTrue(err.startswith(message) or message in err, (argv, err))
        self.assertEqual(open(settings.settings_path(self.data_dir)).read(), before)

    def test_join_with_a_key_on_a_stopped_node(self) -> None:
        key_file = self.mktemp()
        with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write("tvkey-abc.def\n")
        self.assertEqual(self.run_cli("join", NETWORK, "--rendezvous", URL,
                                      "--auth-key-file", key_file)[0], 0)
        # The secret waits in the data directory (0600), not in the settings.
        self.assertEqual(settings.pending_keys(self.data_dir, [NETWORK]),
                         {NETWORK: "tvkey-abc.def"})
        self.assertNotIn("tvkey", open(settings.settings_path(self.data_dir)).read())
        os.chmod(key_file, 0o644)
        code, _, err = self.run_cli("join", OTHER, "--auth-key-file", key_file)
        self.assertEqual(code, 1)
        self.assertIn("permissions 0644 are too open", err)
