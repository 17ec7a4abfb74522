"""Tests for twistvpn.node.forwarder: one UDP socket, many message kinds."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import error
from twisted.names.test.test_util import MemoryReactor
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twistvpn.interfaces import IDatagramHandler, IDatagramSender
from twistvpn.node.forwarder import Forwarder
from twistvpn.wire import DISCOVERY_RESPONSE, PROBE, WIREGUARD_TYPES


@implementer(IDatagramHandler)
class RecordingHandler:
    def __init__(self, fail: bool = False) -> None:
        self.received: list[tuple[bytes, Any]] = []
        self.fail = fail

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.fail:
            raise ValueError("a buggy handler")
        self.received.append((data, addr))


class RelayPath:
    """An endpoint that is not a (host, port) tuple."""


class FailingTransport:
    def __init__(self, exception: Exception, family: int = socket.AF_INET) -> None:
        self.exception = exception
        self.addressFamily = family

    def write(self, data: bytes, addr: Any) -> None:
        raise self.exception


class ForwarderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        self.forwarder = Forwarder()
        self.port = self.reactor.listenUDP(0, self.forwarder)
        self.wireguard = RecordingHandler()
        self.forwarder.set_wireguard(self.wireguard)

    def test_interface(self) -> None:
        verifyObject(IDatagramSender, self.forwarder)
        verifyObject(IDatagramHandler, self.wireguard)

    def test_wireguard_types(self) -> None:
        for kind in sorted(WIREGUARD_TYPES):
            self.forwarder.datagramReceived(bytes([kind, 0, 0, 0]) + b"x", ("203.0.113.2", 1))
        self.assertEqual([d[0] for d, _ in self.wireguard.received], sorted(WIREGUARD_TYPES))

    def test_registered_handler(self) -> None:
        probe = RecordingHandler()
        self.forwarder.register_handler(PROBE, probe)
        self.forwarder.datagramReceived(bytes([PROBE]) + b"hello", ("203.0.113.2", 7))
        self.assertEqual(probe.received, [(bytes([PROBE]) + b"hello", ("203.0.113.2", 7))])
        self.assertEqual(self.wireguard.received, [])
        self.forwarder.unregister_handler(PROBE)
        self.forwarder.datagramReceived(bytes([PROBE]), ("203.0.113.2", 7))
        self.assertEqual(len(probe.received), 1)
        self.assertEqual(self.forwarder.counters["drop_unknown_type"], 1)

    def test_reserved_types_refused(self) -> None:
        for kind in WIREGUARD_TYPES:
            self.assertRaises(ValueError, self.forwarder.register_handler, kind, RecordingHandler())
        self.assertRaises(ValueError, self.forwarder.register_handler, 256, RecordingHandler())

    def test_empty_and_unknown_counted(self) -> None:
        self.forwarder.datagramReceived(b"", ("203.0.113.2", 1))
        self.forwarder.datagramReceived(b"\x00abc", ("203.0.113.2", 1))
        self.forwarder.datagramReceived(bytes([DISCOVERY_RESPONSE]), ("203.0.113.2", 1))
        self.assertEqual(self.forwarder.counters["drop_empty"], 1)
        self.assertEqual(self.forwarder.counters["drop_unknown_type"], 2)
        self.assertEqual(self.wireguard.received, [])

    def test_no_wireguard_yet(self) -> None:
        forwarder = Forwarder()
        forwarder.datagramReceived(b"\x01\x00\x00\x00", ("203.0.113.2", 1))
        self.assertEqual(forwarder.counters["drop_unknown_type"], 1)

    def test_raising_handler_contained(self) -> None:
        """A handler's bug costs one datagram, never the socket."""
        self.forwarder.register_handler(PROBE, RecordingHandler(fail=True))
        self.forwarder.datagramReceived(bytes([PROBE]), ("203.0.113.2", 1))
        self.assertEqual(self.forwarder.counters["drop_handler_error"], 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.forwarder.datagramReceived(b"\x04\x00\x00\x00", ("203.0.113.2", 1))
        self.assertEqual(len(self.wireguard.received), 1)

    def test_v4_mapped_sender_unmapped(self) -> None:
        self.forwarder.datagramReceived(b"\x01", ("::ffff:203.0.113.9", 5))
        self.forwarder.datagramReceived(b"\x01", ("2001:db8::1", 5))
        self.assertEqual(
            [a for _, a in self.wireguard.received], [("203.0.113.9", 5), ("2001:db8::1", 5)]
        )

    def test_send(self) -> None:
        self.forwarder.send_datagram(b"data", ("203.0.113.2", 51820))
        self.assertEqual(self.port._sentPackets, [(b"data", ("203.0.113.2", 51820))])

    def test_send_v4_through_dual_stack_socket(self) -> None:
        sent: list[Any] = []
        transport = FailingTransport(OSError(), socket.AF_INET6)
        transport.write = lambda data, addr: sent.append(addr)  # type: ignore[method-assign]
        self.forwarder.transport = transport
        self.forwarder.send_datagram(b"x", ("203.0.113.2", 1))
        self.forwarder.send_datagram(b"x", ("2001:db8::2", 1))
        self.assertEqual(sent, [("::ffff:203.0.113.2", 1), ("2001:db8::2", 1)])

    def test_send_errors_counted(self) -> None:
        for exception in (
            OSError(101, "unreachable"),
            error.MessageLengthError(),
            error.InvalidAddressError("x", "y"),
        ):
            self.forwarder.transport = FailingTransport(exception)
            self.forwarder.send_datagram(b"x", ("203.0.113.2", 1))
        self.assertEqual(self.forwarder.counters["drop_send_error"], 3)

    def test_not_listening(self) -> None:
        forwarder = Forwarder()
        forwarder.send_datagram(b"x", ("203.0.113.2", 1))
        self.assertEqual(forwarder.counters["drop_not_listening"], 1)

    def test_routes(self) -> None:
        sent: list[Any] = []
        path = RelayPath()
        self.forwarder.send_datagram(b"x", path)
        self.assertEqual(self.forwarder.counters["drop_no_route"], 1)
        self.forwarder.register_route(RelayPath, lambda data, addr: sent.append((data, addr)))
        self.forwarder.send_datagram(b"y", path)
        self.assertEqual(sent, [(b"y", path)])
        self.assertEqual(self.port._sentPackets, [])
        # Datagrams arriving by that path come back in through dispatch.
        self.forwarder.dispatch(b"\x04\x00\x00\x00", path)
        self.assertEqual(self.wireguard.received[-1][1], path)
