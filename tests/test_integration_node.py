"""
Integration tests on real kernels: twistvpn nodes and stock wireguard-go in
network namespaces joined by veth pairs.  Root only; they skip with the
reason otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from pyroute2 import NetNS
from twisted.trial import unittest

from twistvpn import build
from twistvpn.testing import netns
from twistvpn.testing.netns import TWISTVPN, WIREGUARD_GO

MISSING = netns.missing_requirements("wireguard-go", "wg", "ping")
TRANSFER_BYTES = 4 * 1024 * 1024


class NamespaceTestCase(unittest.TestCase):
    skip = MISSING
    timeout = 120

    def setUp(self) -> None:
        self.network = netns.Network()
        self.addCleanup(self.network.close)

    def assertPingClean(self, source: netns.VpnNode, destination: netns.VpnNode) -> None:
        netns.wait_for_ping(self.network, source.namespace, destination.overlay_ip)
        result = netns.ping(
            self.network, source.namespace, destination.overlay_ip, count=20, interval=0.02
        )
        loss, rtt = netns.ping_stats(result.stdout.decode())
        self.assertEqual(loss, 0.0, result.stdout.decode())
        self.assertIsNotNone(rtt)

    def assertTransfer(self, transfer: netns.Transfer, size: int, timeout: float = 60) -> None:
        sent, done = transfer.wait(timeout)
        _, sent_bytes, sent_hash = sent.split()
        _, got_bytes, got_hash = done.split()
        self.assertEqual((int(sent_bytes), sent_hash), (size, got_hash))
        self.assertEqual(int(got_bytes), size)

    def check_pair(self, kinds: list[str]) -> list[netns.VpnNode]:
        a, b = netns.build_mesh(self.network, kinds)
        self.assertPingClean(a, b)
        self.assertPingClean(b, a)
        for source, destination, port in ((a, b, 7001), (b, a, 7002)):
            transfer = netns.start_transfer(
                self.network,
                destination.namespace,
                source.namespace,
                destination.overlay_ip,
                TRANSFER_BYTES,
                port=port,
            )
            self.assertTransfer(transfer, TRANSFER_BYTES)
        return [a, b]

    def assertStopsCleanly(self, node: netns.VpnNode) -> None:
        """
        SIGTERM: an orderly shutdown (twistd then dies of the signal, as
        Twisted now does), and the TUN device (with its routes) is gone.
        """
        assert node.process is not None
        status = self.network.stop(node.process)
        self.assertIn(status, (0, -signal.SIGTERM), node.process.log()[-2000:])
        self.assertIn("Server Shut Down", node.process.log())
        with NetNS(node.namespace) as ns:
            self.assertEqual(ns.link_lookup(ifname=node.ifname), [])
        self.assertIn("twistvpn node down", node.process.log())


class InteropTests(NamespaceTestCase):
    def test_twistvpn_and_wireguard_go(self) -> None:
        a, b = self.check_pair([TWISTVPN, WIREGUARD_GO])
        self.assertShownByWg(a, b)
        self.assertStopsCleanly(a)
        self.assertFalse(
            (netns.WIREGUARD_SOCKET_DIR / f"{a.ifname}.sock").exists(),
            "the control socket outlived the node",
        )

    def assertShownByWg(self, node: netns.VpnNode, peer: netns.VpnNode) -> None:
        """`wg show` reads a twistvpn node's control socket as wireguard-go's."""
        dump = self.network.run(node.namespace, ["wg", "show", node.ifname, "dump"])
        interface, *peers = [line.split("\t") for line in dump.stdout.decode().splitlines()]
        self.assertEqual(interface[:3], [node.private_key, node.public_key, str(netns.WG_PORT)])
        [fields] = peers
        key, _psk, endpoint, allowed, handshake, rx, tx, _keepalive = fields
        self.assertEqual(
            (key, endpoint, allowed),
            (peer.public_key, f"{peer.underlay_ip}:{netns.WG_PORT}", f"{peer.overlay_ip}/32"),
        )
        self.assertGreater(int(handshake), 0)
        self.assertGreater(int(rx), TRANSFER_BYTES)
        self.assertGreater(int(tx), TRANSFER_BYTES)
        refused = self.network.run(
            node.namespace, ["wg", "set", node.ifname, "listen-port", "1"], check=False
        )
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn(b"Operation not permitted", refused.stderr)

    def test_twistvpn_and_twistvpn(self) -> None:
        a, b = self.check_pair([TWISTVPN, TWISTVPN])
        self.assertUsedTSO(a)
        self.assertStopsCleanly(a)
        self.assertStopsCleanly(b)

    def assertUsedTSO(self, node: netns.VpnNode) -> None:
        """
        The compiled build asks for TSO (the plain-Python build does not): the
        kernel handed the sender's transfer over in packets of many segments,
        and the receiver got every byte (the transfers above, hashes equal).
        """
        if not build.compiled_modules(["twistvpn.node.offload"]):
            return
        segments = TRANSFER_BYTES // 1368
        path = f"/sys/class/net/{node.ifname}/statistics/tx_packets"
        handed = int(self.network.run(node.namespace, ["cat", path]).stdout)
        # Its own transfer's packets, plus ACKs and pings for the other way.
        self.assertLess(handed, segments // 2, "the kernel handed over plain segments")

    def test_preshared_keys_and_keepalive(self) -> None:
        """PresharedKey and PersistentKeepalive interoperate both ways."""
        # Keepalive on twistvpn's end only: with it on both, WireGuard lets one
        # end's keepalives stand for both, and which end is down to timing.
        a, b = netns.build_mesh(
            self.network, [TWISTVPN, WIREGUARD_GO], preshared_keys=True, keepalive=1,
            keepalive_from=["a"],
        )
        self.assertIsNotNone(a.peers[0].preshared_key)
        self.assertEqual((a.peers[0].persistent_keepalive, b.peers[0].persistent_keepalive),
                         (1, 0))
        self.assertPingClean(a, b)
        self.assertPingClean(b, a)

        # With no traffic, keepalives keep arriving from twistvpn every second.
        def received() -> int:
            out = self.network.run(b.namespace, ["wg", "show", b.ifname, "transfer"]).stdout
            return int(out.decode().split()[1])

        before = received()
        netns.wait_for(lambda: received() >= before + 32 * 2, 10, "twistvpn's keepalives")

    def test_wireguard_go_restarted_mid_transfer(self) -> None:
        """
        wireguard-go forgets its sessions when restarted; the transfer (TCP
        over the tunnel) resumes once a new handshake is made, intact.
        """
        a, b = netns.build_mesh(self.network, [TWISTVPN, WIREGUARD_GO])
        self.assertPingClean(b, a)
        size = 6 * 1024 * 1024
        transfer = netns.start_transfer(
            self.network, a.namespace, b.namespace, a.overlay_ip, size, rate=1.5e6
        )
        netns.wait_for(lambda: transfer.received() >= 1024 * 1024, 30, "the first megabyte")
        assert b.process is not None
        old_pid = b.process.pid
        netns.stop_vpn(self.network, b)
        netns.start_vpn(self.network, b)
        assert b.process is not None
        self.assertNotEqual(b.process.pid, old_pid)
        self.assertTransfer(transfer, size, timeout=90)
        handshakes = self.network.run(b.namespace, ["wg", "show", b.ifname, "latest-handshakes"])
        [(peer, when)] = [line.split() for line in handshakes.stdout.decode().splitlines()]
        self.assertEqual(peer, a.public_key)
        self.assertNotEqual(when, "0", "the restarted wireguard-go never completed a handshake")
        self.assertPingClean(a, b)


TUN_SCRIPT = textwrap.dedent(
    """
    import socket, sys
    from twisted.internet import reactor
    from pyroute2 import IPRoute
    from twistvpn.node.tun import TunDevice

    name = sys.argv[1]
    tun = TunDevice(reactor, name, 1400)
    tun.set_addresses(["100.64.0.1/24"])
    tun.add_route("100.64.9.0/24")
    got = []

    def receive(packet):
        # An IPv4 UDP datagram to 100.64.9.9:9 from us, routed into the device.
        if packet[0] >> 4 == 4 and packet[9] == 17 and packet[16:20] == bytes([100, 64, 9, 9]):
            got.append(packet)
            reactor.stop()

    tun.start_reading(receive)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    reactor.callLater(0.1, s.sendto, b"hello", ("100.64.9.9", 9))
    reactor.callLater(10, reactor.stop)
    reactor.run()
    assert got and got[0].endswith(b"hello"), got
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        routes = [r.get_attr("RTA_DST") for r in ipr.get_routes(family=socket.AF_INET, oif=index)]
        assert "100.64.9.0" in routes, routes
        tun.close()
        assert ipr.link_lookup(ifname=name) == [], "device left behind"
    print("ok")
    """
)


class TunDeviceTests(NamespaceTestCase):
    def test_real_device(self) -> None:
        """The pytun device reads what the kernel routes into it and removes itself."""
        namespace = self.network.add_namespace("tun")
        ifname = self.network.interface_name("t")
        result = self.network.run(
            namespace, [sys.executable, "-c", TUN_SCRIPT, ifname], check=False, timeout=30
        )
        self.assertEqual(
            (result.returncode, result.stdout.strip()),
            (0, b"ok"),
            result.stderr.decode(),
        )


class TwistdErrorTests(unittest.TestCase):
    """What `twistd twistvpn-node` says about bad input (no root needed)."""

    def twistd(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*netns.TWISTD, "-n", "--pidfile=", "twistvpn-node", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def write(self, text: str, mode: int) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def test_malformed_config(self) -> None:
        path = self.write("[Interface]\nPrivateKey = x\n", 0o600)
        result = self.twistd("--config", path)
        self.assertNotEqual(result.returncode, 0)
        last = (result.stdout + result.stderr).strip().splitlines()[-1]
        self.assertIn(f"{path}:2: PrivateKey: ", last)

    def test_insecure_config(self) -> None:
        key = "YHpFmzsMDhSUOzGGhG8dNGVHCMVMxyKYYK3HnsQt7Uo="
        path = self.write(f"[Interface]\nPrivateKey = {key}\n", 0o644)
        result = self.twistd("--config", path)
        self.assertNotEqual(result.returncode, 0)
        last = (result.stdout + result.stderr).strip().splitlines()[-1]
        self.assertIn("too open", last)
