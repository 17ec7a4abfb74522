"""
Datagrams with a short time to live (twistvpn.common.hoplimit): on real
loopback sockets, whose receiver reads the TTL the kernel delivered.
"""

from __future__ import annotations

import collections
import socket
import sys
from typing import Any

from twisted.internet import udp
from twisted.internet.task import Clock
from twisted.names.test.test_util import MemoryReactor
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from twistvpn.common.hoplimit import SocketHopLimiter, hop_limit_control, send_hop_limited
from twistvpn.interfaces import IHopLimitedWriter
from twistvpn.node.fastpath import DatagramBatcher
from twistvpn.node.forwarder import Forwarder
from twistvpn.testing.natsim import Internet, SimPort

IP_RECVTTL = 12  # linux/in.h; Python's socket module does not export it


def receiver(family: int) -> socket.socket:
    """A loopback socket that reports each datagram's TTL or hop limit."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.bind(("::1", 0))
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
        else:
            sock.bind(("127.0.0.1", 0))
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
    except OSError as e:
        sock.close()
        raise unittest.SkipTest(f"no loopback socket of family {family}: {e}") from e
    sock.settimeout(2.0)
    return sock


def received_hops(sock: socket.socket) -> tuple[bytes, int]:
    data, ancillary, _flags, _addr = sock.recvmsg(2048, socket.CMSG_SPACE(4))
    (_level, _kind, value), = ancillary
    return data, int.from_bytes(value[:4], sys.byteorder)


class SendTests(unittest.TestCase):
    def sockets(self, receiving: int, sending: int) -> tuple[socket.socket, socket.socket]:
        rx = receiver(receiving)
        self.addCleanup(rx.close)
        tx = socket.socket(sending, socket.SOCK_DGRAM)
        self.addCleanup(tx.close)
        if sending == socket.AF_INET6:
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        return rx, tx

    def test_ipv4(self) -> None:
        rx, tx = self.sockets(socket.AF_INET, socket.AF_INET)
        send_hop_limited(tx, b"opener", rx.getsockname(), 2)
        tx.sendto(b"plain", rx.getsockname())
        self.assertEqual(received_hops(rx), (b"opener", 2))
        data, ttl = received_hops(rx)
        self.assertEqual(data, b"plain")
        self.assertGreater(ttl, 2)  # the socket's default is untouched

    def test_ipv4_through_a_dual_stack_socket(self) -> None:
        rx, tx = self.sockets(socket.AF_INET, socket.AF_INET6)
        host, port = rx.getsockname()
        send_hop_limited(tx, b"a", (host, port), 3)
        send_hop_limited(tx, b"b", (f"::ffff:{host}", port), 4)
        self.assertEqual([received_hops(rx) for _ in range(2)], [(b"a", 3), (b"b", 4)])

    def test_ipv6(self) -> None:
        rx, tx = self.sockets(socket.AF_INET6, socket.AF_INET6)
        send_hop_limited(tx, b"six", rx.getsockname()[:2], 5)
        self.assertEqual(received_hops(rx), (b"six", 5))

    def test_bad_limits_refused(self) -> None:
        for hops in (0, 256, -1):
            with self.assertRaises(ValueError):
                hop_limit_control(socket.AF_INET, "203.0.113.1", hops)

    def test_twisted_port_adapts(self) -> None:
        rx = receiver(socket.AF_INET)
        self.addCleanup(rx.close)
        port = udp.Port(0, None, "127.0.0.1", reactor=MemoryReactor())
        port.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(port.socket.close)
        writer = IHopLimitedWriter(port)
        self.assertIsInstance(writer, SocketHopLimiter)
        verifyObject(IHopLimitedWriter, writer)
        writer.write_hop_limited(b"x", rx.getsockname(), 2)
        self.assertEqual(received_hops(rx), (b"x", 2))

    def test_simulated_port_provides_it(self) -> None:
        net = Internet()
        host = net.add_public_host()
        port = host.reactor.listenUDP(1, Forwarder())
        self.assertIsInstance(port, SimPort)
        verifyObject(IHopLimitedWriter, port)


class ForwarderHopLimitTests(unittest.TestCase):
    def test_through_the_batcher(self) -> None:
        rx = receiver(socket.AF_INET)
        self.addCleanup(rx.close)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(tx.close)
        counters: collections.Counter[str] = collections.Counter()
        batcher = DatagramBatcher(tx, Clock(), counters)
        forwarder = Forwarder()
        forwarder.use_batcher(batcher, dual_stack=False)
        forwarder.send_hop_limited(b"opener", rx.getsockname(), 2)
        self.assertEqual(received_hops(rx), (b"opener", 2))
        self.assertEqual(forwarder.counters["hop_limited_sent"], 1)

    def test_transport_without_hop_limits(self) -> None:
        """A transport that cannot limit hops sends as usual, and it is counted."""
        reactor = MemoryReactor()
        forwarder = Forwarder()
        port: Any = reactor.listenUDP(0, forwarder)
        forwarder.send_hop_limited(b"x", ("203.0.113.2", 1), 2)
        self.assertEqual(port._sentPackets, [(b"x", ("203.0.113.2", 1))])
        self.assertEqual(forwarder.counters["hop_limit_unsupported"], 1)

    def test_relay_endpoint_sent_plainly(self) -> None:
        class Relayed:
            pass

        sent: list[Any] = []
        forwarder = Forwarder()
        forwarder.register_route(Relayed, lambda data, addr: sent.append(data))
        forwarder.send_hop_limited(b"x", Relayed(), 2)  # type: ignore[arg-type]
        self.assertEqual(sent, [b"x"])
        self.assertEqual(forwarder.counters["hop_limit_unsupported"], 1)

    def test_send_errors_counted(self) -> None:
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(tx.close)
        counters: collections.Counter[str] = collections.Counter()
        forwarder = Forwarder()
        forwarder.use_batcher(DatagramBatcher(tx, Clock(), counters), dual_stack=False)
        # An IPv6 destination on an IPv4 socket: the kernel refuses it.
        forwarder.send_hop_limited(b"x", ("2001:db8::1", 1), 2)
        self.assertEqual(counters["drop_send_error"], 1)
