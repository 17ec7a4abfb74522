"""
Datagrams with a short time to live (IPv4 TTL, IPv6 hop limit).

Traversal's openers use them (L{twistvpn.traversal.strategies}): a probe
that passes our own NAT router makes it map the path, and dies on the way,
before the peer's router, which would otherwise keep it as an unsolicited
packet when it has no firewall on itself and map its own host's reply to
another port (docs/lab.md: the conntrack clash).

The limit travels as ancillary data of one C{sendmsg}, so the socket's
other datagrams keep their default; on a dual-stack socket an IPv4-mapped
destination takes the IPv4 option.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Any

from twisted.internet import udp
from twisted.python.components import registerAdapter
from zope.interface import implementer

from twistvpn.interfaces import IHopLimitedWriter

MAX_HOPS = 255


def hop_limit_control(family: int, host: str, hops: int) -> tuple[str, tuple[int, int, bytes]]:
    """
    The destination host as the socket of C{family} takes it, and the
    ancillary item that limits one datagram to it to C{hops}.
    """
    if not 1 <= hops <= MAX_HOPS:
        raise ValueError(f"a hop limit must be between 1 and {MAX_HOPS}, not {hops}")
    value = hops.to_bytes(4, sys.byteorder)  # a C int
    if family != socket.AF_INET6:
        return host, (socket.IPPROTO_IP, socket.IP_TTL, value)
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if address.version == 4:
        return f"::ffff:{host}", (socket.IPPROTO_IP, socket.IP_TTL, value)
    if address.ipv4_mapped is not None:  # type: ignore[union-attr]
        return host, (socket.IPPROTO_IP, socket.IP_TTL, value)
    return host, (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT, value)


def send_hop_limited(sock: Any, data: bytes, addr: tuple[str, int], hops: int) -> None:
    """Send one datagram on C{sock} (a socket.socket) with a hop limit."""
    host, control = hop_limit_control(sock.family, addr[0], hops)
    sock.sendmsg([data], [control], 0, (host, addr[1]))


@implementer(IHopLimitedWriter)
class SocketHopLimiter:
    """A Twisted UDP port as an L{IHopLimitedWriter}, through its socket."""

    def __init__(self, port: udp.Port) -> None:
        self._port = port

    def write_hop_limited(self, data: bytes, addr: tuple[str, int], hops: int) -> None:
        send_hop_limited(self._port.getHandle(), data, addr, hops)


registerAdapter(SocketHopLimiter, udp.Port, IHopLimitedWriter)


def write_hop_limited(transport: Any, data: bytes, addr: tuple[str, int], hops: int) -> bool:
    """
    Send C{data} through C{transport} with a hop limit; False when the
    transport cannot limit hops (then it went out with the default).
    """
    writer = IHopLimitedWriter(transport, None)
    if writer is None:
        transport.write(data, addr)
        return False
    writer.write_hop_limited(data, addr, hops)
    return True
