"""Tests for twistvpn.node.fastpath: GSO batches out, GRO batches in."""

from __future__ import annotations

import errno
import socket
import sys
from collections import Counter
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest

from twistvpn.node import fastpath
from twistvpn.node.awake import DEFAULT_STAY_AWAKE
from twistvpn.node.fastpath import (
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
    AnswerWait,
    BatchWindow,
    DatagramBatcher,
    GROPort,
    gro_segment_size,
    segments,
)
from twistvpn.node.forwarder import Forwarder

A = ("203.0.113.2", 51820)
B = ("203.0.113.3", 51820)


class FakeSocket:
    """Records sends; a GSO send is split here as the kernel would."""

    def __init__(self, gso_error: int | None = None, send_error: int | None = None) -> None:
        self.gso_error = gso_error
        self.send_error = send_error
        self.calls: list[tuple[str, int, Any]] = []  # (kind, datagrams, addr)
        self.wire: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> int:
        if self.send_error is not None:
            raise OSError(self.send_error, "refused")
        self.calls.append(("sendto", 1, addr))
        self.wire.append((data, addr))
        return len(data)

    def sendmsg(self, buffers: list[bytes], ancillary: Any, flags: int, addr: Any) -> int:
        if self.gso_error is not None:
            raise OSError(self.gso_error, "no GSO")
        [(level, kind, value)] = ancillary
        assert (level, kind) == (SOL_UDP, UDP_SEGMENT)
        size = int.from_bytes(value, sys.byteorder)
        data = b"".join(buffers)
        parts = list(segments(data, size))
        self.calls.append(("gso", len(parts), addr))
        self.wire.extend((p, addr) for p in parts)
        return len(data)


class BatcherTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sock = FakeSocket()
        self.counters: Counter[str] = Counter()
        self.batcher = DatagramBatcher(self.sock, self.clock, self.counters)

    def send(self, *datagrams: tuple[bytes, Any]) -> None:
        for data, addr in datagrams:
            self.batcher.send(data, addr)

    def test_sent_at_end_of_iteration(self) -> None:
        """Nothing leaves until the reactor iteration ends; then one GSO send."""
        packets = [bytes([i]) * 100 for i in range(10)]
        self.send(*((p, A) for p in packets))
        self.assertEqual(self.sock.wire, [])
        self.clock.advance(0)
        self.assertEqual(self.sock.calls, [("gso", 10, A)])
        self.assertEqual(self.sock.wire, [(p, A) for p in packets])
        self.assertEqual(self.counters["gso_datagrams"], 10)

    def test_single_datagram_is_plain_send(self) -> None:
        self.send((b"x" * 32, A))
        self.clock.advance(0)
        self.assertEqual(self.sock.calls, [("sendto", 1, A)])

    def test_runs_split_by_address_size_and_short_segment(self) -> None:
        """Order on the wire is kept; a shorter datagram ends its run."""
        sequence = [
            (b"a" * 100, A),
            (b"b" * 100, A),
            (b"c" * 40, A),  # short: last of its run
            (b"d" * 100, A),
            (b"e" * 100, B),  # another address
            (b"f" * 150, B),  # longer: cannot join
            (b"g" * 150, B),
        ]
        self.send(*sequence)
        self.clock.advance(0)
        self.assertEqual(self.sock.wire, sequence)
        self.assertEqual(
            self.sock.calls,
            [("gso", 3, A), ("sendto", 1, A), ("sendto", 1, B), ("gso", 2, B)],
        )

    def test_limits(self) -> None:
        batcher = DatagramBatcher(self.sock, self.clock, self.counters, max_segments=4)
        for i in range(10):
            batcher.send(bytes([i]) * 10, A)
        self.clock.advance(0)
        self.assertEqual([c[1] for c in self.sock.calls], [4, 4, 2])
        self.sock.calls.clear()
        batcher = DatagramBatcher(self.sock, self.clock, self.counters, max_bytes=250)
        for i in range(5):
            batcher.send(bytes([i]) * 100, A)
        self.clock.advance(0)
        self.assertEqual([c[1] for c in self.sock.calls], [2, 2, 1])

    def test_gso_refused(self) -> None:
        """
        The run goes out one datagram at a time; a socket that cannot do GSO
        at all sends at once from then on, a refusal of one run changes nothing.
        """
        for error, counter, for_good in (
            (errno.EIO, "gso_disabled", True),
            (errno.EINVAL, "gso_fallback", False),
        ):
            sock = FakeSocket(gso_error=error)
            batcher = DatagramBatcher(sock, self.clock, self.counters)
            packets = [(bytes([i]) * 50, A) for i in range(3)]
            for data, addr in packets:
                batcher.send(data, addr)
            self.clock.advance(0)
            self.assertEqual(sock.wire, packets)
            self.assertEqual(self.counters[counter], 1)
            self.assertEqual(batcher.gso, not for_good)
            batcher.send(b"now", A)
            self.assertEqual(sock.wire[-1] == (b"now", A), for_good)

    def test_send_errors_counted(self) -> None:
        self.sock.send_error = errno.ENETUNREACH
        self.sock.gso_error = errno.ENETUNREACH
        self.send((b"x" * 10, A), (b"y" * 10, A), (b"z", B))
        self.clock.advance(0)
        self.assertEqual(self.counters["drop_send_error"], 3)

    def test_held_window_flushes_on_release_only(self) -> None:
        """A reader holding the window sends when its batch ends, scheduling nothing."""
        self.batcher.window.hold()
        self.batcher.window.hold()  # nested holds: the outermost release flushes
        self.send((b"x" * 10, A), (b"y" * 10, A))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.batcher.window.release()
        self.assertEqual(self.sock.wire, [])
        self.batcher.window.release()
        self.assertEqual(self.sock.calls, [("gso", 2, A)])

    def test_lone_window_sends_at_once(self) -> None:
        """
        While a reader delivers a lone item the datagram leaves at once,
        after anything gathered before it; a hold still gathers.
        """
        window = self.batcher.window
        self.send((b"x" * 10, A))  # gathered (a timer's send, say)
        window.lone += 1
        self.send((b"y" * 10, A))
        self.assertEqual(self.sock.wire, [(b"x" * 10, A), (b"y" * 10, A)])
        self.assertEqual(self.sock.calls, [("sendto", 1, A), ("sendto", 1, A)])
        window.hold()  # a batch read inside the lone delivery gathers
        self.send((b"z" * 10, A), (b"w" * 10, A))
        self.assertEqual(len(self.sock.wire), 2)
        window.release()
        self.assertEqual(self.sock.calls[-1], ("gso", 2, A))
        window.lone -= 1
        self.send((b"v" * 10, A))
        self.assertEqual(len(self.sock.wire), 4)
        self.clock.advance(0)
        self.assertEqual(len(self.sock.wire), 5)

    def test_close_flushes(self) -> None:
        self.send((b"x" * 10, A), (b"y" * 10, A))
        self.batcher.close()
        self.assertEqual(len(self.sock.wire), 2)
        self.clock.advance(0)
        self.assertEqual(len(self.sock.wire), 2)


class ForwarderBatchTests(unittest.TestCase):
    def test_dual_stack_mapping_and_routes(self) -> None:
        """IPv4 endpoints are mapped for an IPv6 socket; route endpoints bypass the batcher."""
        clock = Clock()
        sock = FakeSocket()
        forwarder = Forwarder()
        forwarder.use_batcher(DatagramBatcher(sock, clock, forwarder.counters), True)
        routed: list[Any] = []
        forwarder.register_route(list, lambda data, addr: routed.append(data))
        forwarder.send_datagram(b"v4", ("203.0.113.2", 1))
        forwarder.send_datagram(b"v4", ("203.0.113.2", 1))
        forwarder.send_datagram(b"v6", ("2001:db8::2", 1))
        forwarder.send_datagram(b"relay", [])  # type: ignore[arg-type]
        clock.advance(0)
        self.assertEqual(
            sock.wire,
            [
                (b"v4", ("::ffff:203.0.113.2", 1)),
                (b"v4", ("::ffff:203.0.113.2", 1)),
                (b"v6", ("2001:db8::2", 1)),
            ],
        )
        self.assertEqual(routed, [b"relay"])

    def test_unmapping_cached_and_bounded(self) -> None:
        received: list[Any] = []

        class Handler:
            def datagram_received(self, data: bytes, addr: Any) -> None:
                received.append(addr)

        forwarder = Forwarder()
        forwarder.set_wireguard(Handler())  # type: ignore[arg-type]
        for port in range(5000):
            forwarder.datagramReceived(b"\x04", ("::ffff:203.0.113.9", port))
        self.assertEqual(received[-1], ("203.0.113.9", 4999))
        self.assertEqual(len(received), 5000)
        self.assertLessEqual(len(forwarder._unmapped), 4096)


class SegmentTests(unittest.TestCase):
    def test_segments(self) -> None:
        data = bytes(range(250))
        self.assertEqual(list(segments(data, 100)), [data[:100], data[100:200], data[200:]])
        self.assertEqual(list(segments(data[:200], 100)), [data[:100], data[100:200]])
        self.assertEqual(list(segments(b"", 100)), [])

    def test_gro_segment_size(self) -> None:
        value = (1452).to_bytes(4, sys.byteorder)
        self.assertEqual(gro_segment_size([(SOL_UDP, UDP_GRO, value)]), 1452)
        self.assertEqual(gro_segment_size([(SOL_UDP, 1, value)]), 0)
        self.assertEqual(gro_segment_size([(SOL_UDP, UDP_GRO, b"\x01")]), 0)
        self.assertEqual(gro_segment_size([]), 0)


class Recorder:
    def __init__(self) -> None:
        self.received: list[tuple[bytes, Any]] = []

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.received.append((data, addr))


class LoopbackTests(unittest.TestCase):
    """The kernel's GSO and GRO, over loopback (no reactor runs: doRead is called)."""

    def setUp(self) -> None:
        self.recorder = Recorder()
        self.port = GROPort(0, self.recorder, "127.0.0.1", fastpath.GRO_BUFFER, MemoryReactor())
        self.port.startListening()
        self.addCleanup(self.port.socket.close)
        # A lambda: in the compiled build the bound method has no __name__,
        # which trial's cleanup log asks for.
        self.addCleanup(lambda: self.port.connectionLost())
        self.address = ("127.0.0.1", self.port.getHost().port)
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.sender.close)
        self.sender.bind(("127.0.0.1", 0))
        self.source = self.sender.getsockname()

    def window_states(self, window: BatchWindow) -> list[tuple[int, int]]:
        """(held, lone) of C{window} as each datagram is delivered, from now on."""
        seen: list[tuple[int, int]] = []
        receive = self.recorder.datagramReceived

        def record(data: bytes, addr: Any) -> None:
            seen.append((window.held, window.lone))
            receive(data, addr)

        self.patch(self.recorder, "datagramReceived", record)
        return seen

    def test_gso_burst_arrives_as_datagrams(self) -> None:
        clock = Clock()
        counters: Counter[str] = Counter()
        batcher = DatagramBatcher(self.sender, clock, counters)
        sent = [bytes([i]) * 1452 for i in range(20)] + [b"\x04short"]
        for datagram in sent:
            batcher.send(datagram, self.address)
        clock.advance(0)
        if counters["gso_disabled"]:
            raise unittest.SkipTest("this kernel refuses UDP GSO")
        self.assertEqual(counters["gso_sends"], 1)
        self.port.doRead()
        self.assertEqual(self.recorder.received, [(d, self.source) for d in sent])
        self.assertTrue(self.port.gro)

    def test_read_batch_holds_window(self) -> None:
        """
        The first datagram goes on at once (the window marked lone, not
        held); finding more behind it, the port holds the window for the
        rest and releases it once, when the batch ends.
        """
        flushed: list[int] = []
        window = BatchWindow(Clock(), lambda: flushed.append(len(self.recorder.received)))
        self.port.read_batch_window = window
        seen = self.window_states(window)
        for data in (b"one", b"two", b"three"):
            self.sender.sendto(data, self.address)
        self.port.doRead()
        self.assertEqual(seen, [(0, 1), (1, 0), (1, 0)])
        self.assertEqual(flushed, [3])
        self.assertEqual((window.held, window.lone), (0, 0))

    def test_gro_burst_holds_window_from_the_start(self) -> None:
        """A coalesced burst is bulk traffic: held from its first datagram."""
        clock = Clock()
        batcher = DatagramBatcher(self.sender, clock, Counter())
        for i in range(4):
            batcher.send(bytes([i]) * 1000, self.address)
        clock.advance(0)
        if batcher.counters["gso_disabled"]:
            raise unittest.SkipTest("this kernel refuses UDP GSO")
        window = BatchWindow(Clock(), lambda: None)
        self.port.read_batch_window = window
        seen = self.window_states(window)
        self.port.doRead()
        if not self.port.gro:
            raise unittest.SkipTest("this kernel refuses UDP GRO")
        self.assertEqual(seen, [(1, 0)] * 4)

    def test_lone_datagram_delivered_at_once(self) -> None:
        """
        A datagram with nothing queued behind it is delivered with the
        window marked lone (what it sets off is written at once), not held.
        """
        flushed: list[int] = []
        window = BatchWindow(Clock(), lambda: flushed.append(1))
        self.port.read_batch_window = window
        seen = self.window_states(window)
        self.sender.sendto(b"one", self.address)
        self.port.doRead()
        self.assertEqual((seen, flushed), ([(0, 1)], []))
        self.assertEqual(window.lone, 0)

    def test_plain_datagrams(self) -> None:
        for data in (b"one", b"two", b"three"):
            self.sender.sendto(data, self.address)
        self.port.doRead()
        self.assertEqual(
            self.recorder.received, [(d, self.source) for d in (b"one", b"two", b"three")]
        )
        self.port.doRead()  # nothing left: returns without blocking
        self.assertEqual(len(self.recorder.received), 3)

    def test_lone_datagram_read_once(self) -> None:
        """
        With nothing more queued the port does not read again (a read that
        finds the queue empty raises, which is slow with cold caches).
        """
        real = self.port.socket
        calls: list[int] = []

        class Counting:
            def recvmsg(self, *args: Any) -> Any:
                calls.append(1)
                return real.recvmsg(*args)

        self.patch(self.port, "socket", Counting())
        self.sender.sendto(b"one", self.address)
        self.port.doRead()
        self.assertEqual((len(self.recorder.received), len(calls)), (1, 1))
        self.sender.sendto(b"two", self.address)
        self.sender.sendto(b"three", self.address)
        self.port.doRead()
        self.assertEqual((len(self.recorder.received), len(calls)), (3, 3))


class AnswerWaitTests(unittest.TestCase):
    """The bounded wait for an answer, on a fake timer (no real time passes)."""

    def setUp(self) -> None:
        self.now = 0.0
        self.pauses = 0
        self.queued = False
        self.reads = 0
        self.counters: Counter[str] = Counter()

    def _timer(self) -> float:
        return self.now

    def _pause(self) -> None:
        self.pauses += 1
        self.now += 10e-6  # every look gives the CPU away for 10 us
        if self.pauses == self.arrives_after:
            self.queued = True

    def _read(self) -> None:
        self.reads += 1
        self.queued = False

    def _poll(self, timeout: float) -> list[tuple[int, int]]:
        self.assertEqual(timeout, 0)  # a look never blocks
        return [(3, 1)] if self.queued else []

    def wait(self, budget: float = 100e-6, max_looks: int = 1000) -> AnswerWait:
        return AnswerWait(
            budget,
            self._poll,
            self._read,
            self.counters,
            timer=self._timer,
            pause=self._pause,
            max_looks=max_looks,
        )

    def test_answer_read_when_it_comes(self) -> None:
        self.arrives_after = 3
        self.assertTrue(self.wait()())
        self.assertEqual((self.reads, self.pauses), (1, 3))
        self.assertEqual(self.counters["answer_wait_hit"], 1)

    def test_bounded_in_time(self) -> None:
        self.arrives_after = 10**6
        self.assertFalse(self.wait(budget=100e-6)())
        self.assertEqual(self.reads, 0)
        self.assertEqual(self.pauses, 10)  # 100 us of 10 us pauses
        self.assertEqual(self.counters["answer_wait_miss"], 1)

    def test_bounded_in_looks(self) -> None:
        self.arrives_after = 10**6
        self.assertFalse(self.wait(budget=1.0, max_looks=5)())
        self.assertEqual(self.pauses, 5)

    def test_not_reentered(self) -> None:
        """What the answer sets off (another lone packet sent) does not wait again."""
        self.arrives_after = 1
        wait = self.wait()
        nested: list[bool] = []

        def read() -> None:
            self._read()
            nested.append(wait())

        wait._read = read
        self.assertTrue(wait())
        self.assertEqual(nested, [False])
        self.assertEqual(self.counters["answer_wait_hit"], 1)

    def test_port_readiness(self) -> None:
        port = GROPort(0, Recorder(), "127.0.0.1", fastpath.GRO_BUFFER, MemoryReactor())
        self.assertIsNone(port.readiness)  # not listening yet
        port.startListening()
        self.addCleanup(port.socket.close)
        self.addCleanup(lambda: port.connectionLost())
        readiness = port.readiness
        assert readiness is not None
        self.assertEqual(readiness.poll(0), [])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"x", ("127.0.0.1", port.getHost().port))
        self.assertTrue(readiness.poll(0))


class AnswerWaitOptionTests(unittest.TestCase):
    """
    twistvpn-node's --answer-wait-us and --stay-awake-ms, which set the TUN
    device's answer wait and how often it wakes its reactor while busy.
    """

    def test_default_and_validation(self) -> None:
        from twisted.python import usage

        from twistvpn.node import node_tap

        def parse(*extra: str) -> usage.Options:
            options = node_tap.Options()
            self.patch(node_tap, "load_config", lambda path: object())
            options.parseOptions(["--config", "wg0.conf", *extra])
            return options

        self.assertEqual(parse()["answer-wait-us"], round(fastpath.DEFAULT_ANSWER_WAIT * 1e6))
        self.assertEqual(parse()["stay-awake-ms"], round(DEFAULT_STAY_AWAKE * 1e3))
        self.assertEqual(parse("--answer-wait-us", "0")["answer-wait-us"], 0)
        self.assertEqual(parse("--stay-awake-ms", "0")["stay-awake-ms"], 0)
        self.assertEqual(parse()["tso"], "auto")
        self.assertEqual(parse("--tso", "off")["tso"], "off")
        for option, bad in [
            ("answer-wait-us", "-1"),
            ("answer-wait-us", "10001"),
            ("answer-wait-us", "soon"),
            ("stay-awake-ms", "-1"),
            ("stay-awake-ms", "1001"),
            ("stay-awake-ms", "often"),
            ("tso", "yes"),
        ]:
            e = self.assertRaises(usage.UsageError, parse, f"--{option}", bad)
            self.assertIn(f"--{option}", str(e))

    def test_device_gets_them(self) -> None:
        """makeService opens the TUN device with the options (seconds; TSO None for auto)."""
        from twistvpn.node import node_tap, tun
        from twistvpn.node.config import InterfaceConfig

        made: list[dict[str, Any]] = []
        self.patch(node_tap, "load_config", lambda path: InterfaceConfig(private_key=bytes(32)))
        self.patch(tun, "TunDevice", lambda *args, **kwargs: made.append(kwargs))
        for tso in ("auto", "on", "off"):
            options = node_tap.Options()
            options.parseOptions(["--config", "wg0.conf", "--answer-wait-us", "300",
                                  "--stay-awake-ms", "5", "--tso", tso])
            top = node_tap.makeService(options, reactor=Clock())
            [node] = [s for s in top if isinstance(s, node_tap.StaticNodeService)]
            node.datapath._open_tun("tvtest0", 1420)
        self.assertEqual(made, [{"answer_wait": 300e-6, "stay_awake": 5e-3, "tso": wanted}
                                for wanted in (None, True, False)])
