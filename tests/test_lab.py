"""
The lab's pieces that need no root: its options, the path matrix, reading
paths from a node's log, and the harness refusing what it must not build.
"""

from __future__ import annotations

import contextlib
import io

from twisted.trial.unittest import SynchronousTestCase

from twistvpn import cli
from twistvpn.testing import lab, netns

LOG = """\
2026-11-24T22:26:30+0000 [twistvpn.node.joined.JoinedNode#info] node f6fd9ea330 is waiting \
for authorization in network 73053f710cd73650
2026-11-24T22:26:31+0000 [twistvpn.node.joined.JoinedNode#info] peer a2 path relay \
RelayEndpoint(relay_id='embedded', peer_key=b'g')
2026-11-24T22:26:31+0000 [twistvpn.node.joined.JoinedNode#info] peer a2 path lan \
192.168.1.3:41641 rtt 4.8 ms
2026-11-24T22:26:31+0000 [twistvpn.node.joined.JoinedNode#info] peer b1 path relay -
2026-11-24T22:26:31+0000 [twistvpn.node.joined.JoinedNode#info] peer b1 added: 100.64.0.3
"""


class Options(SynchronousTestCase):
    def parse(self, *argv: str):
        return cli.build_parser().parse_args(["lab", *argv])

    def test_defaults(self) -> None:
        args = self.parse()
        self.assertEqual((args.nat_a, args.nat_b, args.static), ("easy", "easy", False))
        self.assertEqual(args.timeout, 30.0)

    def test_modes(self) -> None:
        for mode in ("easy", "easyaf", "hard", "udpblock", "open"):
            self.assertEqual(self.parse("--nat-a", mode, "--nat-b", mode).nat_b, mode)

    def test_bad(self) -> None:
        for argv in (["--nat-a", "cone"], ["--timeout", "0"], ["--timeout", "x"],
                     ["--pings", "0"]):
            with contextlib.redirect_stderr(io.StringIO()) as err:
                self.assertRaises(SystemExit, self.parse, *argv)
            self.assertIn("error:", err.getvalue())


class Paths(SynchronousTestCase):
    def test_last_path_per_peer(self) -> None:
        self.assertEqual(netns.peer_paths(LOG), {"a2": "lan", "b1": "relay"})

    def test_waiting_line(self) -> None:
        match = netns.WAITING.search(LOG)
        assert match is not None
        self.assertEqual(match.groups(), ("f6fd9ea330", "73053f710cd73650"))

    def test_matrix(self) -> None:
        results = [
            lab.PathResult("a1", "b1", 0.034, "direct", "relay", 0.0, 0.61),
            lab.PathResult("b1", "a1", None),
        ]
        text = lab.format_matrix(results)
        lines = text.splitlines()
        self.assertEqual(lines[0].split(), ["pair", "path", "first", "path", "first", "ping",
                                            "loss", "RTT"])
        self.assertEqual(lines[2].split(), ["a1", "->", "b1", "direct", "relay", "0.03", "s",
                                            "0", "%", "0.61", "ms"])
        self.assertEqual(lines[3].split(), ["b1", "->", "a1", "-", "-", "no", "answer", "-",
                                            "-"])


class Refusals(SynchronousTestCase):
    """Checked before anything is built (no root needed to see them)."""

    def test_addresses(self) -> None:
        for bad in ("10.0.0.1/24", "8.8.8.8/32", "172.16.0.1/12"):
            self.assertRaises(ValueError, netns.check_address, bad)
        netns.check_address("203.0.113.10/24")

    def test_site_mode(self) -> None:
        network = netns.Network(prefix="tvu")
        self.addCleanup(network.close)
        e = self.assertRaises(ValueError, netns.add_site, network, "a", None, "203.0.113.21",
                              "192.168.1", mode="fullcone")
        self.assertIn("unknown site mode 'fullcone'", str(e))
        self.assertEqual(network.namespaces, [])

    def test_masquerade_mode(self) -> None:
        network = netns.Network(prefix="tvu")
        self.addCleanup(network.close)
        self.assertRaises(ValueError, network.masquerade, "nowhere", "eth0", mode="cone")
