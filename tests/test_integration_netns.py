"""The namespace harness itself: NAT routers, clean-up, address guard (root only)."""

from __future__ import annotations

import os
import sys
import textwrap

from twisted.trial import unittest

from twistvpn.testing import netns

# Prints the source address of the first UDP datagram that arrives.
UDP_OBSERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], 9999))
    print("ready", flush=True)
    s.settimeout(4)
    data, addr = s.recvfrom(100)
    print("from", addr[0], addr[1], flush=True)
    """
)
UDP_SENDER = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 40000))
    for _ in range(5):
        s.sendto(b"hi", (sys.argv[1], 9999))
        time.sleep(0.1)
    """
)


class HarnessTests(unittest.TestCase):
    skip = netns.missing_requirements("iptables", "ping")
    timeout = 60

    def setUp(self) -> None:
        self.network = netns.Network()
        self.addCleanup(self.network.close)

    def nat(self, mode: str) -> tuple[str, str]:
        internet = self.network.add_switch("net")
        server = self.network.add_namespace("srv")
        internet.attach(server, "203.0.113.10/24")
        site = netns.add_site(self.network, "h", internet, "203.0.113.1", "192.168.7", mode=mode)
        return site.hosts[0].namespace, server

    def udp_source(self, host: str, server: str) -> str | None:
        """The address:port the server sees for the host's UDP, or None."""
        observer = self.network.spawn(server, [sys.executable, "-c", UDP_OBSERVER, "203.0.113.10"])
        netns.wait_for(lambda: "ready" in observer.log(), 10, "the UDP observer")
        self.network.run(host, [sys.executable, "-c", UDP_SENDER, "203.0.113.10"])
        observer.popen.wait(20)
        seen = [line.split() for line in observer.log().splitlines() if line.startswith("from")]
        return f"{seen[0][1]}:{seen[0][2]}" if seen else None

    def test_easy_nat(self) -> None:
        host, server = self.nat("easy")
        self.assertEqual(netns.ping(self.network, host, "203.0.113.10", count=2).returncode, 0)
        # MASQUERADE keeps the port when it is free.
        self.assertEqual(self.udp_source(host, server), "203.0.113.1:40000")

    def test_hard_nat(self) -> None:
        host, server = self.nat("hard")
        seen = self.udp_source(host, server)
        assert seen is not None
        self.assertTrue(seen.startswith("203.0.113.1:"), seen)

    def test_udp_blocked(self) -> None:
        host, server = self.nat("udpblock")
        self.assertEqual(netns.ping(self.network, host, "203.0.113.10", count=2).returncode, 0)
        self.assertIsNone(self.udp_source(host, server))

    def test_close_removes_everything(self) -> None:
        network = netns.Network()
        try:
            a = network.add_namespace("x")
            process = network.spawn(a, ["sleep", "60"])
            tmp = network.tmpdir
        finally:
            network.close()
        self.assertFalse(os.path.exists(f"/run/netns/{a}"))
        self.assertFalse(process.running())
        self.assertFalse(tmp.exists())

    def test_addresses_guarded(self) -> None:
        a = self.network.add_namespace("g1")
        b = self.network.add_namespace("g2")
        self.assertRaises(ValueError, self.network.veth, a, b, "10.0.0.1/24", "10.0.0.2/24")
        self.assertRaises(ValueError, netns.check_address, "8.8.8.8")
        netns.check_address("100.127.0.1/10")
