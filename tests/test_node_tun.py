"""Tests for twistvpn.node.tun: the in-memory TUN device and the reader of the real one."""

from __future__ import annotations

import errno
import os

from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from tests.support.tun import FakeIPRoute, patch_pytun
from twistvpn.interfaces import ITunDevice
from twistvpn.node import tun
from twistvpn.node.tun import TunDevice, validate_interface_name
from twistvpn.testing.faketun import FakeTunDevice


class FakeTunTests(unittest.TestCase):
    def test_interface(self) -> None:
        verifyObject(ITunDevice, FakeTunDevice())

    def test_packets_both_ways(self) -> None:
        device = FakeTunDevice("tv0", 1280)
        received: list[bytes] = []
        device.inject(b"before")
        self.assertEqual(device.counters["drop_not_reading"], 1)
        device.start_reading(received.append)
        device.inject(b"packet")
        device.stop_reading()
        device.inject(b"after")
        self.assertEqual(received, [b"packet"])
        device.write(b"to kernel")
        self.assertEqual(device.written, [b"to kernel"])

    def test_addresses_and_routes(self) -> None:
        device = FakeTunDevice()
        device.set_addresses(["100.64.0.1/24", "fd00::1/64"])
        device.set_addresses(["100.64.0.2/24"])
        self.assertEqual(device.addresses, ("100.64.0.2/24",))
        self.assertTrue(device.up)
        device.add_route("100.64.1.7/24")
        device.add_route("100.64.1.0/24")
        self.assertEqual(device.routes, ["100.64.1.0/24"])
        device.remove_route("100.64.1.0/24")
        device.remove_route("100.64.9.0/24")  # absent: not an error
        self.assertEqual(device.routes, [])

    def test_close(self) -> None:
        device = FakeTunDevice()
        device.add_route("100.64.1.0/24")
        device.close()
        self.assertTrue(device.closed)
        self.assertEqual(device.routes, [])
        device.write(b"late")
        self.assertEqual(device.counters["drop_closed"], 1)
        self.assertRaises(RuntimeError, device.inject, b"late")

    def test_validation(self) -> None:
        self.assertRaises(ValueError, FakeTunDevice, "x" * 16)
        self.assertRaises(ValueError, FakeTunDevice, "tv0", 20)
        for bad in ("", "a/b", "a b", "..", "a:b"):
            self.assertRaises(ValueError, validate_interface_name, bad)
        self.assertEqual(validate_interface_name("twvpn0"), "twvpn0")








class FakeFDReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.readers: list[object] = []

    def addReader(self, reader: object) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: object) -> None:
        self.readers.remove(reader)


class TunDeviceTests(unittest.TestCase):
    """The real device's logic, with pytun and netlink replaced."""

    def setUp(self) -> None:
        self.made = patch_pytun(self, offload=False)
        self.reactor = FakeFDReactor()
        self.ipr = FakeIPRoute()
        self.device = TunDevice(self.reactor, "tvtest0", 1420, iproute=self.ipr, offload=False)
        self.addCleanup(self.device.close)

    def test_interfaces(self) -> None:
        verifyObject(ITunDevice, self.device)
        verifyObject(IReadDescriptor, self.device)

    def test_mtu_set(self) -> None:
        self.assertEqual(self.ipr.calls[0], ("link", "set", {"index": 7, "mtu": 1420}))

    def test_reads_a_batch_per_wakeup(self) -> None:
        """One wake-up reads at most READ_BATCH packets, then yields."""
        received: list[bytes] = []
        self.device.start_reading(received.append)
        self.assertEqual(self.reactor.readers, [self.device])
        # A pipe merges writes; the kernel's TUN does not.  Use one-byte
        # packets and a read size of one so that each read is one packet.
        self.device._read_size = 1
        os.write(self.made[0].kernel_side, b"x" * (tun.READ_BATCH + 3))
        self.device.doRead()
        self.assertEqual(len(received), tun.READ_BATCH)
        self.device.doRead()
        self.assertEqual(len(received), tun.READ_BATCH + 3)
        self.device.doRead()  # nothing left: EAGAIN, no error
        self.assertEqual(self.device.counters["read_error"], 0)
        self.device.stop_reading()
        self.assertEqual(self.reactor.readers, [])

    def test_lone_packet_read_once(self) -> None:
        """
        A packet alone in the queue takes one read: the device asks whether
        more is queued instead of reading until EAGAIN.
        """
        received: list[bytes] = []
        self.device.start_reading(received.append)
        reads: list[int] = []
        real_read = os.read

        def counting(fd: int, size: int) -> bytes:
            reads.append(fd)
            return real_read(fd, size)

        self.patch(os, "read", counting)
        self.device._read_size = 1
        os.write(self.made[0].kernel_side, b"x")
        self.device.doRead()
        self.assertEqual((len(received), len(reads)), (1, 1))
        os.write(self.made[0].kernel_side, b"xyz")
        self.device.doRead()  # more than one: read until the queue is empty
        self.assertEqual((len(received), len(reads)), (4, 5))
        self.assertEqual(self.device.counters["read_error"], 0)

    def test_receiver_error_contained(self) -> None:
        def broken(packet: bytes) -> None:
            raise RuntimeError("bug")

        self.device.start_reading(broken)
        os.write(self.made[0].kernel_side, b"p")
        self.device.doRead()
        self.assertEqual(self.device.counters["drop_receiver_error"], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_write_errors_counted(self) -> None:
        def full(fd: int, data: bytes) -> int:
            raise BlockingIOError(errno.EAGAIN, "full")

        def invalid(fd: int, data: bytes) -> int:
            raise OSError(errno.EINVAL, "bad packet")

        self.patch(os, "write", full)
        self.device.write(b"p")
        self.patch(os, "write", invalid)
        self.device.write(b"p")
        self.assertEqual(self.device.counters["drop_tun_full"], 1)
        self.assertEqual(self.device.counters["drop_write_error"], 1)

    def test_addresses_routes_close(self) -> None:
        self.device.set_addresses(["100.64.0.1/24"])
        self.device.set_addresses(["100.64.0.2/24", "fd00::2/64"])
        self.device.add_route("100.64.1.0/24")
        self.device.add_route("100.64.1.0/24")
        del self.ipr.calls[0]
        self.assertEqual(
            self.ipr.calls,
            [
                ("addr", "add", {"index": 7, "address": "100.64.0.1", "prefixlen": 24}),
                ("link", "set", {"index": 7, "state": "up"}),
                # The new addresses first: the device never has none (the
                # kernel drops every route through a device that loses its
                # last IPv4 address).
                ("addr", "add", {"index": 7, "address": "100.64.0.2", "prefixlen": 24}),
                ("addr", "add", {"index": 7, "address": "fd00::2", "prefixlen": 64,
                                 "flags": 2}),  # IFA_F_NODAD
                ("addr", "del", {"index": 7, "address": "100.64.0.1", "prefixlen": 24}),
                ("link", "set", {"index": 7, "state": "up"}),
                ("route", "replace", {"dst": "100.64.1.0/24", "oif": 7}),
            ],
        )
        # A source address replaces the route; the same one again is no call.
        self.ipr.calls.clear()
        self.device.add_route("100.64.1.0/24", "100.64.0.2")
        self.device.add_route("100.64.1.0/24", "100.64.0.2")
        self.assertEqual(self.ipr.calls, [("route", "replace", {
            "dst": "100.64.1.0/24", "oif": 7, "prefsrc": "100.64.0.2"})])
        self.assertEqual(self.device.routes, ["100.64.1.0/24"])
        self.ipr.calls.clear()
        self.device.start_reading(lambda p: None)
        self.device.close()
        self.assertEqual(
            self.ipr.calls,
            [
                ("route", "del", {"dst": "100.64.1.0/24", "oif": 7}),
                ("link", "del", {"index": 7}),
                ("close", "", {}),
            ],
        )
        self.assertTrue(self.made[0].closed)
        self.assertEqual(self.reactor.readers, [])
        self.assertEqual(self.device.fileno(), -1)
        self.device.write(b"late")
        self.assertEqual(self.device.counters["drop_closed"], 1)


class TunCreationErrorTests(unittest.TestCase):
    def test_explained(self) -> None:
        try:
            import pytun
        except ImportError:
            raise unittest.SkipTest("python-pytun is not installed") from None
        for code, hint in ((errno.EPERM, "needs root"), (errno.EINVAL, "not a TUN device")):

            def refuse(name: str, flags: int, code: int = code) -> None:
                raise OSError(code, os.strerror(code))

            self.patch(pytun, "TunTapDevice", refuse)
            error = self.assertRaises(
                tun.TunError, TunDevice, FakeFDReactor(), "tvx0", iproute=FakeIPRoute()
            )
            self.assertIn("cannot create TUN device tvx0: ", str(error))
            self.assertIn(hint, str(error))
