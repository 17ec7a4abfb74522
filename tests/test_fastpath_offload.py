"""Tests for twistvpn.node.offload and the TUN device's offload mode."""

from __future__ import annotations

import fcntl
import os
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from tests.support.tun import FakeIPRoute, patch_pytun
from twistvpn.node import offload
from twistvpn.node.awake import IDLE_LOOK
from twistvpn.node.fastpath import BatchWindow
from twistvpn.node.offload import (
    PLAIN,
    TUN_OFFLOADS,
    TUNSETOFFLOAD,
    VNET_F_NEEDS_CSUM,
    VNET_GSO_TCPV4,
    VNET_GSO_TCPV6,
    VNET_HEADER,
    VNET_HEADER_SIZE,
    coalesce,
    complete_checksum,
    internet_sum,
    ipv4_header_checksum,
    tcp_pseudo_header_sum,
)
from twistvpn.node.offload import (
    segment as cut,
)
from twistvpn.node.tun import TunDevice

SRC = bytes([100, 64, 0, 1])
DST = bytes([100, 64, 0, 2])
# NOP, NOP, timestamps: what Linux puts on every segment.
TIMESTAMPS = bytes([1, 1, 8, 10]) + struct.pack("!II", 1000, 2000)


def ones_complement_sum(data: bytes) -> int:
    """The textbook 16-bit one's complement sum (RFC 1071), as a reference."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data: bytes) -> int:
    return 0xFFFF - ones_complement_sum(data)


def segment(
    seq: int,
    payload: bytes,
    *,
    flags: int = 0x10,
    ack: int = 7,
    sport: int = 40000,
    dport: int = 5201,
    ident: int = 1,
    options: bytes = TIMESTAMPS,
    window: int = 500,
    src: bytes = SRC,
) -> bytes:
    """A TCP/IPv4 segment with correct checksums."""
    tcp_length = 20 + len(options) + len(payload)
    tcp = struct.pack(
        "!HHIIBBHHH", sport, dport, seq, ack, (20 + len(options)) // 4 << 4, flags, window, 0, 0
    )
    pseudo = src + DST + struct.pack("!BBH", 0, 6, tcp_length)
    tcp_sum = checksum(pseudo + tcp + options + payload)
    tcp = tcp[:16] + struct.pack("!H", tcp_sum) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_length, ident, 0x4000, 64, 6, 0, src, DST)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + tcp + options + payload


def resegment(write: bytes) -> list[bytes]:
    """What the kernel makes of a coalesced write: the segments, checksums aside."""
    flags, gso_type, header_length, size, start, offset = VNET_HEADER.unpack_from(write)
    packet = write[VNET_HEADER_SIZE:]
    if gso_type == 0:
        return [packet]
    header = packet[:header_length]
    data = packet[header_length:]
    ip = start  # csum_start: where TCP begins
    seq = int.from_bytes(header[ip + 4:ip + 8], "big")
    out = []
    for i in range(0, len(data), size):
        piece = data[i : i + size]
        last = i + size >= len(data)
        h = bytearray(header)
        if ip == 20:
            h[2:4] = (header_length + len(piece)).to_bytes(2, "big")
        else:
            h[4:6] = (header_length - 40 + len(piece)).to_bytes(2, "big")
        h[ip + 4:ip + 8] = ((seq + i) & 0xFFFFFFFF).to_bytes(4, "big")
        if not last:
            h[ip + 13] &= ~0x08
        out.append(bytes(h) + piece)
    return out


def without_checksums(packet: bytes) -> bytes:
    """The packet with IP ID, IP checksum and TCP checksum blanked (IPv6: the TCP checksum)."""
    p = bytearray(packet)
    if p[0] >> 4 == 6:
        p[56:58] = b"\0\0"
    else:
        p[4:6] = p[10:12] = p[36:38] = b"\0\0"
    return bytes(p)


SRC6 = bytes.fromhex("fd00000000000000000000000000a001")
DST6 = bytes.fromhex("fd00000000000000000000000000a002")


def segment6(seq: int, payload: bytes, *, flags: int = 0x10, ack: int = 7,
             sport: int = 40000, options: bytes = TIMESTAMPS, hop_limit: int = 64,
             flow_label: int = 0x12345, next_header: int = 6) -> bytes:
    """A TCP/IPv6 segment with a correct checksum."""
    tcp_length = 20 + len(options) + len(payload)
    tcp = struct.pack("!HHIIBBHHH", sport, 5201, seq, ack, (20 + len(options)) // 4 << 4,
                      flags, 500, 0, 0)
    pseudo = SRC6 + DST6 + struct.pack("!IxxxB", tcp_length, 6)
    tcp_sum = checksum(pseudo + tcp + options + payload)
    tcp = tcp[:16] + struct.pack("!H", tcp_sum) + tcp[18:]
    ip = struct.pack("!IHBB16s16s", 0x60000000 | flow_label, tcp_length, next_header,
                     hop_limit, SRC6, DST6)
    return ip + tcp + options + payload


class ChecksumTests(unittest.TestCase):
    @given(st.binary(min_size=20, max_size=20))
    def test_ipv4_header_checksum(self, header: bytes) -> None:
        header = header[:10] + b"\0\0" + header[12:]
        expected = checksum(header)
        got = ipv4_header_checksum(header)
        # 0 and 0xFFFF are the same number in one's complement.
        self.assertEqual(got % 0xFFFF, expected % 0xFFFF)
        filled = header[:10] + got.to_bytes(2, "big") + header[12:]
        self.assertIn(ones_complement_sum(filled), (0xFFFF, 0))

    @given(st.binary(min_size=8, max_size=8), st.integers(0, 65515))
    def test_pseudo_header_sum(self, addresses: bytes, length: int) -> None:
        expected = ones_complement_sum(addresses + struct.pack("!BBH", 0, 6, length))
        self.assertEqual(tcp_pseudo_header_sum(addresses, length) % 0xFFFF, expected % 0xFFFF)

    @given(st.binary(max_size=300), st.data())
    def test_internet_sum(self, data: bytes, draw: st.DataObject) -> None:
        start = draw.draw(st.integers(0, len(data)))
        end = draw.draw(st.integers(start, len(data)))
        self.assertEqual(internet_sum(data, start, end), ones_complement_sum(data[start:end]))

    def test_complete_checksum(self) -> None:
        """A CHECKSUM_PARTIAL packet (the pseudo-header's sum in the field) made whole."""
        packet = segment(1000, os.urandom(777))  # odd: the padded last byte
        partial = bytearray(packet)
        partial[36:38] = tcp_pseudo_header_sum(SRC + DST, len(packet) - 20).to_bytes(2, "big")
        self.assertEqual(complete_checksum(bytes(partial), 20, 16), packet)
        six = segment6(5, os.urandom(100))
        partial = bytearray(six)
        partial[56:58] = tcp_pseudo_header_sum(SRC6 + DST6, len(six) - 40).to_bytes(2, "big")
        self.assertEqual(complete_checksum(bytes(partial), 40, 16), six)

    def test_complete_checksum_zero_is_sent_as_ffff(self) -> None:
        """RFC 768: a UDP checksum that comes out 0 goes as 0xFFFF (TCP takes both)."""
        # Two words summing to 0xFFFF, the field (at 4) holding 0: checksum 0.
        self.assertEqual(complete_checksum(b"\x12\x34\xed\xcb\0\0", 0, 4),
                         b"\x12\x34\xed\xcb\xff\xff")

    def test_complete_checksum_out_of_bounds(self) -> None:
        for start, offset in ((0, 19), (18, 1), (30, 0), (-1, 4), (4, -1)):
            self.assertIsNone(complete_checksum(bytes(20), start, offset))


def tso_packet(payload: bytes, flags: int = 0x18, seq: int = 1000, ident: int = 7) -> bytes:
    """What the kernel hands over with TSO: one TCP/IPv4 packet, its checksum left partial."""
    packet = bytearray(segment(seq, payload, flags=flags, ident=ident))
    packet[36:38] = b"\x12\x34"  # whatever it holds is not used
    return bytes(packet)


class SegmentTests(unittest.TestCase):
    """L{offload.segment} cuts a TSO packet as the kernel's tcp_gso_segment would."""

    def test_ipv4(self) -> None:
        payload = os.urandom(1368 * 45 + 100)
        got = cut(tso_packet(payload, flags=0x18 | 0x80 | 0x01), 20, 1368)
        pieces = [payload[i:i + 1368] for i in range(0, len(payload), 1368)]
        expected = [
            segment(1000 + 1368 * i, piece, ident=7 + i,
                    flags=(0x19 if i == len(pieces) - 1 else 0x10) | (0x80 if i == 0 else 0))
            for i, piece in enumerate(pieces)
        ]
        self.assertEqual(len(got or []), 46)
        self.assertEqual(got, expected)  # checksums, lengths, IDs, flags and all

    def test_ipv6_and_sequence_wrap(self) -> None:
        payload = os.urandom(1000 * 3)
        seq = 0xFFFFFFFF - 1500
        packet = bytearray(segment6(seq, payload, flags=0x18))
        packet[56:58] = b"\xff\xff"
        expected = [segment6((seq + 1000 * i) & 0xFFFFFFFF, payload[1000 * i:1000 * (i + 1)],
                             flags=0x18 if i == 2 else 0x10) for i in range(3)]
        self.assertEqual(cut(bytes(packet), 40, 1000), expected)

    def test_ipv4_options(self) -> None:
        """Each segment's IPv4 header checksum covers its options too."""
        payload = os.urandom(1000 * 3)
        plain = segment(5, payload)
        options = b"\x01\x01\x01\x00"  # NOP, NOP, NOP, end
        header = bytearray(plain[:20] + options)
        header[0] = 0x46
        header[2:4] = (len(plain) + 4).to_bytes(2, "big")
        packet = bytes(header) + plain[20:]
        segments = cut(packet, 24, 1000)
        assert segments is not None
        self.assertEqual(len(segments), 3)
        for piece in segments:
            self.assertEqual(piece[20:24], options)
            self.assertEqual(ones_complement_sum(piece[:24]), 0xFFFF)
            pseudo = SRC + DST + struct.pack("!BBH", 0, 6, len(piece) - 24)
            self.assertEqual(ones_complement_sum(pseudo + piece[24:]), 0xFFFF)
        self.assertEqual(b"".join(p[24 + 32:] for p in segments), payload)

    def test_rejoined(self) -> None:
        """Cut, then joined by the receiving side, it is the same TCP data."""
        payload = os.urandom(1368 * 10)
        segments = cut(tso_packet(payload), 20, 1368)
        assert segments is not None
        [write] = coalesce(segments)
        self.assertEqual(resegment(write)[0][52:], payload[:1368])
        self.assertEqual(b"".join(p[52:] for p in resegment(write)), payload)

    def test_refused(self) -> None:
        good = tso_packet(os.urandom(3000))
        for packet, tcp, size in (
            (good, 20, 0),  # no segment size
            (good, 24, 1368),  # TCP is not where the IPv4 header ends
            (good[:40], 20, 1368),  # headers only
            (good[:30], 20, 1368),
            (b"\x15" + good[1:], 20, 1368),  # IP version 1
            (good[:9] + b"\x11" + good[10:], 20, 1368),  # UDP
            (segment6(1, b"x" * 100), 20, 1368),  # IPv6 with TCP inside its header
        ):
            self.assertIsNone(cut(packet, tcp, size))

    @given(st.binary(max_size=200), st.integers(-5, 100), st.integers(-5, 100))
    def test_garbage(self, packet: bytes, tcp: int, size: int) -> None:
        """Whatever arrives, the answer is segments or None, never an exception."""
        got = cut(packet, tcp, size)
        self.assertTrue(got is None or all(isinstance(p, bytes) for p in got))


class CoalesceTests(unittest.TestCase):
    def flow(self, count: int, size: int = 1368, start: int = 1000) -> list[bytes]:
        return [segment(start + i * size, os.urandom(size), ident=i + 1) for i in range(count)]

    def test_run_joined(self) -> None:
        packets = self.flow(10)
        packets[-1] = segment(1000 + 9 * 1368, packets[-1][52:], flags=0x18, ident=10)
        [write] = coalesce(packets)
        flags, gso_type, header_length, size, start, offset = VNET_HEADER.unpack_from(write)
        self.assertEqual(
            (flags, gso_type, header_length, size, start, offset),
            (VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 52, 1368, 20, 16),
        )
        packet = write[VNET_HEADER_SIZE:]
        self.assertEqual(int.from_bytes(packet[2:4], "big"), len(packet))
        self.assertEqual(ones_complement_sum(packet[:20]), 0xFFFF)  # valid IP checksum
        self.assertEqual(packet[33], 0x18)  # PSH from the last segment
        partial = int.from_bytes(packet[36:38], "big")
        expected = ones_complement_sum(SRC + DST + struct.pack("!BBH", 0, 6, len(packet) - 20))
        self.assertEqual(partial % 0xFFFF, expected % 0xFFFF)
        self.assertEqual(packet[52:], b"".join(p[52:] for p in packets))
        # Segmented again, it is the segments that came in.
        self.assertEqual(
            [without_checksums(p) for p in resegment(write)],
            [without_checksums(p) for p in packets],
        )

    def test_short_segment_ends_the_run(self) -> None:
        packets = (
            self.flow(3)
            + [segment(1000 + 3 * 1368, b"x" * 100)]
            + self.flow(2, start=1000 + 3 * 1368 + 100)
        )
        writes = coalesce(packets)
        self.assertEqual(len(writes), 2)
        self.assertEqual(
            [p for w in writes for p in map(without_checksums, resegment(w))],
            [without_checksums(p) for p in packets],
        )

    def test_not_joined(self) -> None:
        """Anything that is not the next in-order ACK segment of its flow stands alone."""
        base = segment(1000, b"a" * 100)
        cases = {
            "gap": segment(1200, b"b" * 100),
            "other ack": segment(1100, b"b" * 100, ack=8),
            "other window": segment(1100, b"b" * 100, window=501),
            "other options": segment(1100, b"b" * 100, options=TIMESTAMPS[:-1] + b"\x01"),
            "longer": segment(1100, b"b" * 101),
            "fin": segment(1100, b"b" * 100, flags=0x11),
            "syn": segment(1100, b"b" * 100, flags=0x12),
        }
        for name, second in cases.items():
            writes = coalesce([base, second])
            self.assertEqual(writes, [PLAIN + base, PLAIN + second], name)

    def test_after_psh_a_new_run(self) -> None:
        first = segment(1000, b"a" * 100, flags=0x18)
        second = segment(1100, b"b" * 100)
        self.assertEqual(coalesce([first, second]), [PLAIN + first, PLAIN + second])

    def test_other_packets_pass_through(self) -> None:
        udp = bytes([0x45, 0, 0, 28]) + bytes(5) + b"\x11" + bytes(18)
        ipv6 = bytes([0x60]) + bytes(59)
        fragment = bytearray(segment(1000, b"a" * 100))
        fragment[6] |= 0x20  # more fragments
        pure_ack = segment(1000, b"")
        for packet in (udp, ipv6, bytes(fragment), pure_ack, b"\x45"):
            self.assertEqual(coalesce([packet, packet]), [PLAIN + packet] * 2)

    def test_flows_kept_apart_in_order(self) -> None:
        a = self.flow(4)
        b = [segment(5000 + i * 1368, os.urandom(1368), sport=40001) for i in range(4)]
        interleaved = [p for pair in zip(a, b, strict=True) for p in pair]
        writes = coalesce(interleaved)
        self.assertEqual(len(writes), 2)
        self.assertEqual(
            [without_checksums(p) for p in resegment(writes[0])], [without_checksums(p) for p in a]
        )
        self.assertEqual(
            [without_checksums(p) for p in resegment(writes[1])], [without_checksums(p) for p in b]
        )

    def test_limits(self) -> None:
        # 64 KiB of IP packet: 1368-byte segments, at most 47 fit.
        writes = coalesce(self.flow(60))
        self.assertEqual([len(resegment(w)) for w in writes], [47, 13])
        self.patch(offload, "MAX_COALESCED", 4)
        writes = coalesce(self.flow(10, size=100))
        self.assertEqual([len(resegment(w)) for w in writes], [4, 4, 2])

    def test_sequence_wraps(self) -> None:
        start = 0xFFFFFFFF - 500
        packets = [segment((start + i * 400) & 0xFFFFFFFF, b"z" * 400) for i in range(4)]
        [write] = coalesce(packets)
        self.assertEqual(
            [without_checksums(p) for p in resegment(write)],
            [without_checksums(p) for p in packets],
        )


class CoalesceIPv6Tests(unittest.TestCase):
    """TCP over IPv6 (the overlay's ULA addresses) is joined as over IPv4."""

    def flow(self, count: int, size: int = 1348, start: int = 1000) -> list[bytes]:
        return [segment6(start + i * size, os.urandom(size)) for i in range(count)]

    def test_run_joined(self) -> None:
        packets = self.flow(10)
        packets[-1] = segment6(1000 + 9 * 1348, packets[-1][72:], flags=0x18)
        [write] = coalesce(packets)
        flags, gso_type, header_length, size, start, offset = VNET_HEADER.unpack_from(write)
        self.assertEqual((flags, gso_type, header_length, size, start, offset),
                         (VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6, 72, 1348, 40, 16))
        packet = write[VNET_HEADER_SIZE:]
        self.assertEqual(int.from_bytes(packet[4:6], "big"), len(packet) - 40)
        self.assertEqual(packet[53], 0x18)  # PSH from the last segment
        partial = int.from_bytes(packet[56:58], "big")
        expected = ones_complement_sum(SRC6 + DST6 + struct.pack("!IxxxB", len(packet) - 40, 6))
        self.assertEqual(partial % 0xFFFF, expected % 0xFFFF)
        self.assertEqual(packet[72:], b"".join(p[72:] for p in packets))
        self.assertEqual([without_checksums(p) for p in resegment(write)],
                         [without_checksums(p) for p in packets])

    def test_not_joined(self) -> None:
        base = segment6(1000, b"a" * 100)
        cases = {
            "gap": segment6(1200, b"b" * 100),
            "other ack": segment6(1100, b"b" * 100, ack=8),
            "other hop limit": segment6(1100, b"b" * 100, hop_limit=63),
            "other flow label": segment6(1100, b"b" * 100, flow_label=7),
            "fin": segment6(1100, b"b" * 100, flags=0x11),
        }
        for name, second in cases.items():
            self.assertEqual(coalesce([base, second]), [PLAIN + base, PLAIN + second], name)

    def test_extension_headers_and_bad_lengths_pass_through(self) -> None:
        hop_by_hop = segment6(1000, b"a" * 100, next_header=0)
        truncated = segment6(1000, b"a" * 100)[:-1]
        for packet in (hop_by_hop, truncated):
            self.assertEqual(coalesce([packet, packet]), [PLAIN + packet] * 2)

    def test_families_kept_apart(self) -> None:
        v4 = [segment(1000 + i * 1348, b"4" * 1348, ident=i + 1) for i in range(3)]
        v6 = self.flow(3)
        writes = coalesce([p for pair in zip(v4, v6, strict=True) for p in pair])
        self.assertEqual([VNET_HEADER.unpack_from(w)[1] for w in writes],
                         [VNET_GSO_TCPV4, VNET_GSO_TCPV6])


class FDClock(Clock):
    def addReader(self, reader: object) -> None:
        pass

    def removeReader(self, reader: object) -> None:
        pass


class OffloadTunTests(unittest.TestCase):
    def setUp(self) -> None:
        patch_pytun(self, offload=True)
        self.clock = FDClock()
        self.device = TunDevice(self.clock, "tvtest0", 1420, iproute=FakeIPRoute(), tso=False)
        self.addCleanup(self.device.close)
        self.written: list[bytes] = []
        self.patch(os, "write", self._write)

    def _write(self, fd: int, data: bytes) -> int:
        self.written.append(bytes(data))
        return len(data)

    def test_writes_wait_for_the_iteration_and_are_joined(self) -> None:
        packets = [segment(1000 + i * 1368, os.urandom(1368)) for i in range(5)]
        for packet in packets:
            self.device.write(packet)
        self.assertEqual(self.written, [])
        self.clock.advance(0)
        self.assertEqual(self.written, coalesce(packets))
        self.assertEqual(self.device.counters["tx_packets"], 5)

    def test_flush_at_batch_end_and_close(self) -> None:
        self.device.write(b"\x45" + bytes(19))
        self.device.flush()
        self.assertEqual(self.written, [PLAIN + b"\x45" + bytes(19)])
        self.device.write(b"\x60" + bytes(39))
        self.device.close()
        self.assertEqual(len(self.written), 2)
        self.clock.advance(0)
        self.assertEqual(len(self.written), 2)

    def test_read(self) -> None:
        received: list[bytes] = []
        self.device.start_reading(received.append)
        reads = [PLAIN + b"ping", VNET_HEADER.pack(0, VNET_GSO_TCPV4, 52, 1368, 20, 16) + b"big!"]
        self.patch(os, "read", lambda fd, size: reads.pop(0) if reads else _again())
        self.patch(self.device, "_poll", lambda timeout: reads[:1])
        batches: list[int] = []
        self.device.read_batch_window = BatchWindow(
            self.clock, lambda: batches.append(len(received))
        )
        self.device.doRead()
        self.assertEqual(received, [b"ping"])
        self.assertEqual(self.device.counters["drop_offload"], 1)
        self.assertEqual(batches, [1])  # flushed once, when the batch ended

    def test_first_packet_at_once_then_batch(self) -> None:
        """
        The first packet of a wake-up is delivered with the sender's window
        marked lone (sent at once: no look at the queue delays it); finding
        more behind it, the device holds the window for the rest.
        """
        reads = [PLAIN + b"one", PLAIN + b"two", PLAIN + b"three"]
        self.patch(os, "read", lambda fd, size: reads.pop(0) if reads else _again())
        self.patch(self.device, "_poll", lambda timeout: reads[:1])
        flushed: list[int] = []
        window = BatchWindow(self.clock, lambda: flushed.append(len(seen)))
        self.device.read_batch_window = window
        seen: list[tuple[bytes, int, int]] = []
        self.device.start_reading(lambda packet: seen.append((packet, window.held, window.lone)))
        self.device.doRead()
        self.assertEqual(seen, [(b"one", 0, 1), (b"two", 1, 0), (b"three", 1, 0)])
        self.assertEqual(flushed, [3])
        self.assertEqual((window.held, window.lone), (0, 0))

    def test_stays_awake_while_reading(self) -> None:
        """
        While it reads, the device wakes its reactor every stay_awake
        seconds while packets flow (counted both ways); not after it stops.
        """
        patch_pytun(self, offload=True)
        clock = FDClock()
        device = TunDevice(clock, "tvtest1", 1420, iproute=FakeIPRoute(), stay_awake=0.005)
        self.addCleanup(device.close)
        self.assertEqual(clock.getDelayedCalls(), [])  # not reading yet
        device.start_reading(lambda packet: None)
        [call] = clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime() - clock.seconds(), IDLE_LOOK)  # quiet
        device.write(b"\x45" + bytes(19))
        device.flush()  # a packet: awake at once, not at the next look
        clock.advance(0)  # (the write's own end-of-iteration flush)
        [call] = clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime() - clock.seconds(), 0.005)
        clock.advance(0.005)
        [call] = clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime() - clock.seconds(), 0.005)
        self.patch(os, "read", lambda fd, size: _again())
        device.doRead()  # nothing read, awake already: nothing to change
        self.assertEqual(clock.getDelayedCalls(), [call])
        device.stop_reading()
        self.assertEqual(clock.getDelayedCalls(), [])
        quiet = TunDevice(FDClock(), "tvtest2", 1420, iproute=FakeIPRoute(), stay_awake=0)
        self.addCleanup(quiet.close)
        quiet.start_reading(lambda packet: None)
        self.assertEqual(quiet._reactor.getDelayedCalls(), [])

    def test_lone_write_at_once(self) -> None:
        """
        While the window is marked lone (a reader delivers the only datagram
        it found) a packet is written at once; held, it waits for the release.
        """
        window = self.device.window
        window.lone += 1
        self.device.write(b"\x45" + bytes(19))
        self.assertEqual(self.written, [PLAIN + b"\x45" + bytes(19)])
        window.hold()
        self.device.write(b"\x46" + bytes(19))
        self.assertEqual(len(self.written), 1)
        window.release()
        self.assertEqual(len(self.written), 2)
        window.lone -= 1
        self.device.write(b"\x47" + bytes(19))
        self.assertEqual(len(self.written), 2)
        self.clock.advance(0)
        self.assertEqual(len(self.written), 3)
        self.assertEqual(self.device.counters["tx_packets"], 3)

    def test_read_after_write(self) -> None:
        """
        What the kernel answered to the packets written (an echo reply, an
        ACK) is read and its batch flushed as soon as the writes are done.
        """
        received: list[bytes] = []
        answers: list[bytes] = []

        def read(fd: int, size: int) -> bytes:
            return answers.pop(0) if answers else _again()

        def write(fd: int, data: bytes) -> int:
            self._write(fd, data)
            answers.append(PLAIN + b"reply")  # answered within the write
            return len(data)

        self.patch(os, "read", read)
        self.patch(os, "write", write)
        self.patch(self.device, "_poll", lambda timeout: answers[:1])
        flushed: list[int] = []
        window = BatchWindow(self.clock, lambda: flushed.append(len(received)))
        self.device.read_batch_window = window
        lone: list[int] = []

        def receive(packet: bytes) -> None:
            received.append(packet)
            lone.append(window.lone)

        self.device.start_reading(receive)
        self.device.write(b"\x45" + bytes(19))
        self.device.flush()
        self.assertEqual(received, [b"reply"])
        # The lone answer is sent at once: delivered with the window marked
        # lone, nothing gathered to flush.
        self.assertEqual((lone, flushed, window.lone), ([1], [], 0))
        self.assertEqual(self.device.counters["read_after_write"], 1)
        # Nothing answered: no read (that would only find the queue empty).
        self.patch(os, "write", self._write)
        self.device.write(b"\x45" + bytes(19))
        self.device.flush()
        self.assertEqual(self.device.counters["read_after_write"], 1)
        self.patch(os, "write", write)
        # Without a reader (or with the option off) nothing is read.
        self.device.read_after_write = False
        self.device.write(b"\x45" + bytes(19))
        self.device.flush()
        self.assertEqual(received, [b"reply"])
        self.device.read_after_write = True
        self.device.stop_reading()
        self.device.write(b"\x45" + bytes(19))
        self.device.flush()
        self.assertEqual(self.device.counters["read_after_write"], 1)
        self.assertEqual(len(self.written), 4)

    def test_no_read_after_write_inside_a_read(self) -> None:
        """A write flushed while a batch is being read does not read again."""
        reads = [PLAIN + b"one", PLAIN + b"two"]
        self.patch(os, "read", lambda fd, size: reads.pop(0) if reads else _again())
        self.patch(self.device, "_poll", lambda timeout: [(0, 1)])
        received: list[bytes] = []

        def receive(packet: bytes) -> None:
            received.append(packet)
            self.device.write(b"\x45" + bytes(19))
            self.device.flush()

        self.device.start_reading(receive)
        self.device.doRead()
        self.assertEqual(received, [b"one", b"two"])
        self.assertEqual(self.device.counters["read_after_write"], 0)
        self.assertEqual(len(self.written), 2)

    def test_wait_for_an_answer_after_a_lone_packet(self) -> None:
        """
        The device calls after_lone_read when a read (from the reactor, or
        right after a write) delivered exactly one packet; never after a
        batch, which is bulk traffic.
        """
        reads: list[bytes] = []
        self.patch(os, "read", lambda fd, size: reads.pop(0) if reads else _again())
        self.patch(self.device, "_poll", lambda timeout: reads[:1])
        waits: list[int] = []
        self.device.after_lone_read = lambda: waits.append(1)
        self.device.start_reading(lambda packet: None)
        reads.append(PLAIN + b"ping")
        self.device.doRead()
        self.assertEqual(waits, [1])
        reads.extend([PLAIN + b"one", PLAIN + b"two"])
        self.device.doRead()
        self.assertEqual(waits, [1])
        self.device.doRead()  # nothing to read: no wait either
        self.assertEqual(waits, [1])

        def write(fd: int, data: bytes) -> int:
            reads.append(PLAIN + b"reply")
            return len(data)

        self.patch(os, "write", write)
        self.device.write(b"\x45" + bytes(19))
        self.device.flush()
        self.assertEqual(waits, [1, 1])


class TSOTunTests(unittest.TestCase):
    """A TUN device reading with TSO on: segments and completed checksums handed on."""

    def setUp(self) -> None:
        patch_pytun(self, offload=True)
        self.asked: list[tuple[int, int]] = []
        self.patch(fcntl, "ioctl", lambda fd, request, arg: self.asked.append((request, arg)))
        self.clock = FDClock()
        self.device = TunDevice(self.clock, "tvtest0", 1420, iproute=FakeIPRoute(), tso=True)
        self.addCleanup(self.device.close)
        self.received: list[bytes] = []
        self.device.start_reading(self.received.append)
        self.batches: list[int] = []
        self.device.read_batch_window = BatchWindow(
            self.clock, lambda: self.batches.append(len(self.received)))

    def read(self, reads: list[bytes]) -> None:
        self.patch(os, "read", lambda fd, size: reads.pop(0) if reads else _again())
        self.patch(self.device, "_poll", lambda timeout: reads[:1])
        self.device.doRead()

    def test_asked_for(self) -> None:
        self.assertEqual(self.asked, [(TUNSETOFFLOAD, TUN_OFFLOADS)])
        self.assertTrue(self.device.tso)
        self.assertGreaterEqual(self.device._read_size, 65535 + VNET_HEADER_SIZE)

    def test_refused_by_the_kernel(self) -> None:
        """An old kernel without TSO for TUN: plain reads, as before."""
        def refuse(fd: int, request: int, arg: int) -> None:
            raise OSError(22, "Invalid argument")

        self.patch(fcntl, "ioctl", refuse)
        device = TunDevice(self.clock, "tvtest1", 1420, iproute=FakeIPRoute(), tso=True)
        self.addCleanup(device.close)
        self.assertFalse(device.tso)
        self.flushLoggedErrors()

    def test_segments_handed_on_as_one_batch(self) -> None:
        payload = os.urandom(1368 * 3)
        big = VNET_HEADER.pack(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 52, 1368, 20, 16)
        lone = segment(1, b"ack")
        partial = bytearray(lone)
        partial[36:38] = tcp_pseudo_header_sum(SRC + DST, len(lone) - 20).to_bytes(2, "big")
        self.read([big + tso_packet(payload), VNET_HEADER.pack(VNET_F_NEEDS_CSUM, 0, 0, 0, 20, 16)
                   + bytes(partial)])
        self.assertEqual(self.received, [*cut(tso_packet(payload), 20, 1368), lone])  # type: ignore[misc]
        self.assertEqual(self.batches, [4])  # one flush, at the end
        self.assertEqual(self.device.counters["rx_packets"], 4)
        self.assertEqual(self.device.counters["rx_tso"], 1)

    def test_malformed_dropped(self) -> None:
        self.read([
            VNET_HEADER.pack(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 52, 1368, 20, 16) + b"short",
            VNET_HEADER.pack(VNET_F_NEEDS_CSUM, 0, 0, 0, 20, 160) + segment(1, b"x"),
            VNET_HEADER.pack(0, VNET_GSO_TCPV6, 52, 1368, 40, 16) + segment6(1, b"x" * 3000),
            VNET_HEADER.pack(VNET_F_NEEDS_CSUM, 5, 52, 1368, 20, 16) + segment(1, b"x" * 3000),
            PLAIN + b"ping",
        ])
        self.assertEqual(self.received, [b"ping"])
        self.assertEqual(self.device.counters["drop_offload"], 4)

    def test_bounded_per_wakeup(self) -> None:
        """A wake-up stops reading once a read batch's worth was handed on."""
        big = VNET_HEADER.pack(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 52, 1368, 20, 16)
        reads = [big + tso_packet(os.urandom(1368 * 40)) for _ in range(3)]
        self.read(reads)
        self.assertEqual(len(self.received), 80)
        self.assertEqual(len(reads), 1)  # left for the next wake-up


def _again() -> bytes:
    raise BlockingIOError(11, "again")
