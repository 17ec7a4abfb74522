"""
TUN offload: the virtio-net header (IFF_VNET_HDR) and TCP receive
coalescing, so that the kernel's TCP stack sees one large segment where
the tunnel delivered many.

Each TCP segment written into a TUN device costs the kernel a trip
through IP and TCP and, every other segment, an ACK that the tunnel must
carry back.  Like the kernel's own GRO (and wireguard-go's TUN offload),
L{coalesce} joins consecutive in-order segments of one TCP flow (over IPv4
or IPv6) that differ only in sequence number, IP ID and checksums into one packet with
a virtio-net header describing it as a TCP GSO packet (C{gso_size} the
segments' payload size, the checksum left to the kernel): the stack takes
it in one pass and acknowledges it with one ACK.  Everything else is
written as it came, behind an empty header.

The coalesced segments' own TCP checksums are not verified again: they
arrived authenticated by the WireGuard AEAD from the peer whose AllowedIPs
hold their source, as the kernel's WireGuard module trusts them
(CHECKSUM_UNNECESSARY).  The IPv4 header checksum of the joined packet is
computed afresh (IPv6 has none), and its TCP checksum field holds the pseudo-header sum
the kernel completes should it forward the packet.

The other way, with TSO (L{TUN_OFFLOADS}, asked for by the TUN device in
the compiled build), the kernel hands over TCP packets of up to 64 KiB
and leaves checksums to us: L{segment} cuts such a packet into the
segments the kernel would have cut, each with its checksums, and
L{complete_checksum} completes the checksum of a packet that is not cut.
One read and one pass through the sending TCP stack then carry some 45
segments instead of one.  The checksum loop is what makes this pay only
when compiled: about 0.45 µs for 1,368 bytes, against 55 µs interpreted
(and 2 µs for the quickest plain-Python form, C{int.from_bytes} and a
modulo).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from typing import Final

from mypy_extensions import i64

# struct virtio_net_hdr (linux/virtio_net.h), native byte order for TUN.
VNET_HEADER: Final = struct.Struct("=BBHHHH")
VNET_HEADER_SIZE: Final = VNET_HEADER.size  # 10
VNET_F_NEEDS_CSUM: Final = 1
VNET_F_DATA_VALID: Final = 2
VNET_GSO_NONE: Final = 0
VNET_GSO_TCPV4 = 1
VNET_GSO_TCPV6 = 4
# linux/if_tun.h: TUNSETOFFLOAD and the offloads asked for with TSO.
TUNSETOFFLOAD: Final = 0x400454D0
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
TUN_OFFLOADS: Final = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
PLAIN: Final = bytes(VNET_HEADER_SIZE)
_U16: Final = struct.Struct("!H")

# TCP flags a segment may carry and still be joined (ACK, and PSH which
# ends the joined packet).
_ACK: Final = 0x10
_PSH: Final = 0x08
_FIN: Final = 0x01
_CWR: Final = 0x80
# The kernel's limit on segments in one GSO packet is far higher; GRO
# stops at 64 too, and 64 x 1380 bytes is about the 64 KiB an IP packet
# can hold anyway.
MAX_COALESCED = 64
MAX_IP_PACKET: Final = 65535


def _fold(value: int) -> int:
    """The 16-bit one's complement sum of C{value}'s 16-bit words (0 as 0xFFFF)."""
    return value % 0xFFFF or 0xFFFF


def ipv4_header_checksum(header: bytes | bytearray) -> int:
    """RFC 791's checksum of a 20-byte IPv4 header whose checksum field is zero."""
    return 0xFFFF - _fold(int.from_bytes(header[:20], "big"))


def tcp_pseudo_header_sum(addresses: bytes | bytearray, tcp_length: int) -> int:
    """
    The folded (not complemented) sum of the pseudo-header (IPv4's 8 bytes
    of addresses or IPv6's 32; the protocol and the TCP length): what a
    CHECKSUM_PARTIAL packet carries in its checksum field.
    """
    return _fold(int.from_bytes(addresses, "big") + 6 + tcp_length)


def tso_pays() -> bool:
    """
    Whether asking for TSO saves CPU here: with this module compiled (the
    checksums cost less than the kernel's per-segment work they replace),
    not in plain Python (they cost more; docs/performance.md).
    """
    from twistvpn.build import is_compiled

    return is_compiled(sys.modules[__name__])


def internet_sum(data: bytes, start: i64, end: i64) -> i64:
    """
    The one's complement sum of C{data[start:end]} as 16-bit big-endian
    words (an odd last byte padded with zero), folded to 16 bits and not
    complemented: RFC 1071.  Four bytes a turn, for mypyc to compile into a
    plain loop; the checksum of a segment's payload is most of what TSO
    costs us.
    """
    total: i64 = 0
    i: i64 = start
    while i + 3 < end:
        a: i64 = data[i]
        b: i64 = data[i + 1]
        c: i64 = data[i + 2]
        d: i64 = data[i + 3]
        total += (a << 24) | (b << 16) | (c << 8) | d
        i += 4
    if i + 1 < end:
        a = data[i]
        b = data[i + 1]
        total += (a << 8) | b
        i += 2
    if i < end:
        a = data[i]
        total += a << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _checksum(total: i64) -> i64:
    """The checksum field for a sum: its complement, folded; 0 sent as 0xFFFF (RFC 768)."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (0xFFFF - total) or 0xFFFF


def complete_checksum(packet: bytes, start: i64, offset: i64, ip: i64 = 0) -> bytes | None:
    """
    The packet at C{ip} in C{packet} (after the virtio-net header, say) with
    the checksum a CHECKSUM_PARTIAL packet leaves to us filled in: the
    header's C{csum_start} and C{csum_offset}, counted from C{ip}; the field
    already holds the pseudo-header's sum.  None if they do not fit.
    """
    field = ip + start + offset
    if start < 0 or offset < 0 or ip < 0 or field + 2 > len(packet):
        return None
    value = _checksum(internet_sum(packet, ip + start, len(packet)))
    view = memoryview(packet)
    return b"".join([view[ip:field], _U16.pack(value), view[field + 2:]])


def complete_read(data: bytes) -> bytes | None:
    """
    The packet of a TUN read with a partial checksum and no GSO (a
    virtio-net header, then the packet), its checksum completed; None if
    the header's offsets do not fit.
    """
    _, _, _, _, start, offset = VNET_HEADER.unpack_from(data)
    return complete_checksum(data, start, offset, VNET_HEADER_SIZE)


def segment(packet: bytes, tcp: i64, size: i64, ip: i64 = 0) -> list[bytes] | None:
    """
    The segments of C{size} payload bytes a TSO packet stands for (TCP
    over IPv4 or IPv6; the packet at C{ip} in C{packet}, its TCP header
    C{tcp} bytes further), as the kernel's own C{tcp_gso_segment} cuts
    them: each with the headers of the first and its own length, sequence
    number, IPv4 ID (counting up) and checksums; FIN and PSH on the last
    only, CWR on the first only.  None if it is not such a packet.
    """
    length = len(packet) - ip
    if size <= 0 or ip < 0 or tcp + 20 > length:
        return None
    version = packet[ip] >> 4
    if version == 4:
        if tcp != (packet[ip] & 15) * 4 or tcp < 20 or packet[ip + 9] != 6:
            return None
        addresses = packet[ip + 12:ip + 20]
    elif version == 6:
        if tcp < 40:
            return None
        addresses = packet[ip + 8:ip + 40]
    else:
        return None
    header_length = tcp + ((packet[ip + tcp + 12] >> 4) << 2)
    if header_length < tcp + 20 or header_length >= length:
        return None
    # The template: the headers, with what changes per segment zeroed (to
    # be added to its sums per segment): lengths, IPv4 ID, sequence number,
    # flags and checksums.
    template = bytearray(packet[ip:ip + header_length])
    seq = int.from_bytes(template[tcp + 4:tcp + 8], "big")
    ident = int.from_bytes(template[4:6], "big")
    flags: i64 = template[tcp + 13]
    template[tcp + 4:tcp + 8] = bytes(4)
    template[tcp + 13] = template[tcp + 16] = template[tcp + 17] = 0
    if version == 4:
        template[2:6] = bytes(4)  # total length, ID
        template[10:12] = bytes(2)
    else:
        template[4:6] = bytes(2)
    fixed = bytes(template)
    ip_sum: i64 = internet_sum(fixed, 0, tcp) if version == 4 else 0  # options and all
    # The pseudo-header (its length added per segment) and the TCP header.
    tcp_sum: i64 = tcp_pseudo_header_sum(addresses, 0) + internet_sum(fixed, tcp, header_length)
    # Each segment's headers in one pack: the template's constant runs
    # between the fields that change.
    tail = fixed[tcp + 18:]
    tcp_runs = (fixed[tcp + 8:tcp + 13], fixed[tcp + 14:tcp + 16])
    if version == 4:
        packer = struct.Struct(f"!2sHH4sH{tcp - 8}sI5sB2sH{len(tail)}s")
        ip_runs = (fixed[:2], fixed[6:10], fixed[12:tcp + 4])
    else:
        packer = struct.Struct(f"!4sH{tcp - 2}sI5sB2sH{len(tail)}s")
        ip_runs = (fixed[:4], fixed[6:tcp + 4], b"")
    view = memoryview(packet)
    out: list[bytes] = []
    start: i64 = 0  # of each segment's payload, counted from the first's
    data: i64 = ip + header_length  # where the payload begins in packet
    payload: i64 = length - header_length
    while start < payload:
        end = min(start + size, payload)
        total = header_length + end - start
        number = (seq + start) & 0xFFFFFFFF
        bits = flags if end == payload else flags & ~(_FIN | _PSH)
        if start:
            bits &= ~_CWR
        check = _checksum(tcp_sum + (total - tcp) + (number >> 16) + (number & 0xFFFF) + bits
                          + internet_sum(packet, data + start, data + end))
        if version == 4:
            ip_id = (ident + len(out)) & 0xFFFF
            head = packer.pack(ip_runs[0], total, ip_id, ip_runs[1],
                               _checksum(ip_sum + total + ip_id), ip_runs[2], number,
                               tcp_runs[0], bits, tcp_runs[1], check, tail)
        else:
            head = packer.pack(ip_runs[0], total - 40, ip_runs[1], number, tcp_runs[0], bits,
                               tcp_runs[1], check, tail)
        out.append(b"".join([head, view[data + start:data + end]]))
        start = end
    return out


class _Flow:
    """Segments of one TCP flow being joined."""

    __slots__ = ("packets", "ip", "header_length", "size", "next_seq", "total", "closed", "key")

    def __init__(self, packet: bytes, ip: int, header_length: int, payload: int,
                 seq: int, same: tuple[bytes, ...]) -> None:
        self.packets = [packet]
        self.ip = ip  # the IP header's length: 20 (IPv4) or 40 (IPv6), where TCP starts
        self.header_length = header_length
        self.size = payload  # the segment size: every one but the last has it
        self.next_seq = (seq + payload) & 0xFFFFFFFF
        self.total = header_length + payload
        self.closed = False
        self.key = same


def _joinable(
    packet: bytes,
) -> tuple[bytes, int, int, int, int, tuple[bytes, ...]] | None:
    """
    (flow, IP header length, header length, payload length, seq, what must
    be equal to join) of a joinable segment, or None: TCP over IPv4 without
    options or fragments, or over IPv6 without extension headers.  What
    must be equal: IPv4's TOS, flags, TTL and protocol, or IPv6's traffic
    class, flow label, next header and hop limit; TCP's ACK number, data
    offset and window (flags apart), urgent pointer and options.  (Constant
    offsets per family: this runs for every segment.)
    """
    if len(packet) < 40:
        return None
    if packet[0] == 0x45:
        if packet[9] != 6 or (packet[6] & 0x3F) or packet[7]:  # MF or a fragment offset
            return None
        if ((packet[2] << 8) | packet[3]) != len(packet) or packet[33] & ~_PSH != _ACK:
            return None
        header_length = 20 + ((packet[32] >> 4) << 2)
        payload = len(packet) - header_length
        if payload <= 0 or header_length < 40:
            return None
        return (packet[12:24], 20, header_length, payload, int.from_bytes(packet[24:28], "big"),
                (packet[1:2], packet[6:10], packet[28:33], packet[34:36],
                 packet[38:header_length]))
    if packet[0] >> 4 == 6:
        if len(packet) < 60 or packet[6] != 6:  # TCP right after the fixed header
            return None
        if ((packet[4] << 8) | packet[5]) + 40 != len(packet) or packet[53] & ~_PSH != _ACK:
            return None
        header_length = 40 + ((packet[52] >> 4) << 2)
        payload = len(packet) - header_length
        if payload <= 0 or header_length < 60:
            return None
        return (packet[8:44], 40, header_length, payload, int.from_bytes(packet[44:48], "big"),
                (packet[0:4], packet[6:8], packet[48:53], packet[54:56],
                 packet[58:header_length]))
    return None


def coalesce(packets: Sequence[bytes]) -> list[bytes]:
    """
    The writes that deliver C{packets} to a TUN device opened with
    IFF_VNET_HDR: each a virtio-net header and a packet, with runs of
    joinable TCP segments (IPv4 or IPv6) joined.  Segments of a flow keep
    their order; packets of different flows may be written in another order.
    """
    out: list[_Flow | bytes] = []
    flows: dict[bytes, _Flow] = {}
    for packet in packets:
        info = _joinable(packet)
        if info is None:
            out.append(PLAIN + packet)
            continue
        key, ip, header_length, payload, seq, same = info
        flow = flows.get(key)
        if (
            flow is not None
            and not flow.closed
            and seq == flow.next_seq
            and payload <= flow.size
            and header_length == flow.header_length
            and flow.total + payload <= MAX_IP_PACKET
            and len(flow.packets) < MAX_COALESCED
            and flow.key == same
        ):
            flow.packets.append(packet)
            flow.total += payload
            flow.next_seq = (seq + payload) & 0xFFFFFFFF
            # Only the last segment may be short; PSH ends the packet too.
            flow.closed = payload < flow.size or bool(packet[ip + 13] & _PSH)
            continue
        flow = _Flow(packet, ip, header_length, payload, seq, same)
        flow.closed = bool(packet[ip + 13] & _PSH)
        flows[key] = flow
        out.append(flow)
    return [item if type(item) is bytes else _join(item) for item in out]  # type: ignore[arg-type]


def _join(flow: _Flow) -> bytes:
    packets = flow.packets
    first = packets[0]
    if len(packets) == 1:
        return PLAIN + first
    ip, header_length, total = flow.ip, flow.header_length, flow.total
    header = bytearray(first[:header_length])
    if ip == 20:
        header[2:4] = total.to_bytes(2, "big")
        header[10:12] = b"\0\0"
        header[10:12] = ipv4_header_checksum(header).to_bytes(2, "big")
        addresses, gso = header[12:20], VNET_GSO_TCPV4
    else:
        header[4:6] = (total - 40).to_bytes(2, "big")  # IPv6 payload length
        addresses, gso = header[8:40], VNET_GSO_TCPV6
    header[ip + 13] |= packets[-1][ip + 13] & _PSH
    header[ip + 16:ip + 18] = tcp_pseudo_header_sum(addresses, total - ip).to_bytes(2, "big")
    vnet = VNET_HEADER.pack(VNET_F_NEEDS_CSUM, gso, header_length, flow.size, ip, 16)
    return b"".join([vnet, header, *(memoryview(p)[header_length:] for p in packets)])
