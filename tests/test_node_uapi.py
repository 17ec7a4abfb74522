"""Tests for the read-only WireGuard control socket (what `wg show` reads)."""

from __future__ import annotations

import os
import socket
import tempfile

from twisted.internet.testing import StringTransport
from twisted.names.test.test_util import MemoryReactor
from twisted.trial import unittest

from tests.support.node import CONFIG, PEER1, PEER2, PRIVATE, PSK, FakeNode
from twistvpn.node.config import parse_config
from twistvpn.node.uapi import (
    MAX_REQUEST,
    PeerStatus,
    UAPIFactory,
    claim_socket_path,
    format_get,
)


class FormatTests(unittest.TestCase):
    def test_format(self) -> None:
        peers = [
            PeerStatus(
                PEER1,
                PSK,
                ("203.0.113.2", 51820),
                ("100.64.0.2/32", "100.64.8.0/24"),
                1700000000.25,
                10,
                20,
                25,
            ),
            PeerStatus(PEER2, None, None, (), None, 0, 0, 0),
            PeerStatus(PEER2, None, ("2001:db8::1", 7), (), None, 0, 0, 0),
        ]
        self.assertEqual(
            format_get(PRIVATE, 51820, peers).splitlines(),
            [
                f"private_key={PRIVATE.hex()}",
                "listen_port=51820",
                f"public_key={PEER1.hex()}",
                f"preshared_key={PSK.hex()}",
                "protocol_version=1",
                "endpoint=203.0.113.2:51820",
                "last_handshake_time_sec=1700000000",
                "last_handshake_time_nsec=250000000",
                "tx_bytes=20",
                "rx_bytes=10",
                "persistent_keepalive_interval=25",
                "allowed_ip=100.64.0.2/32",
                "allowed_ip=100.64.8.0/24",
                f"public_key={PEER2.hex()}",
                "protocol_version=1",
                "last_handshake_time_sec=0",
                "last_handshake_time_nsec=0",
                "tx_bytes=0",
                "rx_bytes=0",
                "persistent_keepalive_interval=0",
                f"public_key={PEER2.hex()}",
                "protocol_version=1",
                "endpoint=[2001:db8::1]:7",
                "last_handshake_time_sec=0",
                "last_handshake_time_nsec=0",
                "tx_bytes=0",
                "rx_bytes=0",
                "persistent_keepalive_interval=0",
                "errno=0",
                "",
            ],
        )
        self.assertTrue(format_get(PRIVATE, None, []).endswith("errno=0\n\n"))


class ProtocolTests(unittest.TestCase):
    def exchange(self, *chunks: bytes) -> tuple[bytes, bool]:
        protocol = UAPIFactory(lambda: "private_key=00\nerrno=0\n\n").buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        for chunk in chunks:
            protocol.dataReceived(chunk)
        return transport.value(), transport.disconnecting

    def test_get_in_pieces(self) -> None:
        self.assertEqual(self.exchange(b"get=", b"1\n"), (b"", False))
        self.assertEqual(
            self.exchange(b"get=", b"1\n", b"\n"), (b"private_key=00\nerrno=0\n\n", True)
        )

    def test_set_refused(self) -> None:
        self.assertEqual(self.exchange(b"set=1\nlisten_port=1\n\n"), (b"errno=-1\n\n", True))

    def test_nonsense(self) -> None:
        self.assertEqual(self.exchange(b"what\n\n"), (b"errno=-22\n\n", True))

    def test_oversized_request_dropped(self) -> None:
        self.assertEqual(self.exchange(b"x" * (MAX_REQUEST + 1)), (b"", True))


class ClaimTests(unittest.TestCase):
    def setUp(self) -> None:
        # AF_UNIX paths are short: not under _trial_temp's long path.
        self.dir = tempfile.mkdtemp(prefix="tvuapi")
        self.addCleanup(os.rmdir, self.dir)
        self.path = os.path.join(self.dir, "tv0.sock")

    def test_absent(self) -> None:
        claim_socket_path(self.path)
        self.assertFalse(os.path.exists(self.path))

    def test_stale_removed(self) -> None:
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(self.path)
        dead.close()  # the file stays, nobody listens
        claim_socket_path(self.path)
        self.assertFalse(os.path.exists(self.path))

    def test_live_refused(self) -> None:
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        live.bind(self.path)
        live.listen(1)
        self.addCleanup(os.unlink, self.path)
        self.addCleanup(live.close)
        error = self.assertRaises(OSError, claim_socket_path, self.path)
        self.assertIn("in use", str(error))


class DescribeTests(unittest.TestCase):
    """The node service reports its peers for `wg show`."""

    def test_describe(self) -> None:
        reactor = MemoryReactor()
        reactor.advance(1000)
        node = FakeNode(
            reactor, parse_config(CONFIG, "wg0.conf"), wall_clock=lambda: 1_700_000_000.0
        )
        self.assertEqual(node.service.describe(), "errno=-19\n\n")
        node.service.startService()
        [device] = node.devices
        peer = device.get_peer(PEER1)
        peer.last_handshake = 990.5  # 9.5 s ago on the node's clock
        peer.rx_bytes, peer.tx_bytes = 3, 4
        lines = node.service.describe().splitlines()
        self.assertIn("listen_port=51820", lines)
        self.assertIn(f"preshared_key={PSK.hex()}", lines)
        self.assertIn("last_handshake_time_sec=1699999990", lines)
        self.assertIn("last_handshake_time_nsec=500000000", lines)
        self.assertIn("persistent_keepalive_interval=25", lines)
        self.assertIn("rx_bytes=3", lines)
        self.assertEqual(lines.count("last_handshake_time_sec=0"), 1)  # PEER2: never
