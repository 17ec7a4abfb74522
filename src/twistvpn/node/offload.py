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
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

# struct virtio_net_hdr (linux/virtio_net.h), native byte order for TUN.
VNET_HEADER: Final = struct.Struct("=BBHHHH")
VNET_HEADER_SIZE: Final = VNET_HEADER.size  # 10
VNET_F_NEEDS_CSUM: Final = 1
VNET_F_DATA_VALID: Final = 2
VNET_GSO_NONE: Final = 0
VNET_GSO_TCPV4 = 1
VNET_GSO_TCPV6 = 4
PLAIN: Final = bytes(VNET_HEADER_SIZE)

# TCP flags a segment may carry and still be joined (ACK, and PSH which
# ends the joined packet).
_ACK: Final = 0x10
_PSH: Final = 0x08
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
