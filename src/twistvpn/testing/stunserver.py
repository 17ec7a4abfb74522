"""
A STUN Binding responder (RFC 5389: the answer carries XOR-MAPPED-ADDRESS)
for the lab's port-mapping routers.

Debian 12's miniupnpd 2.3.1 will not forward ports when its WAN address is
in a reserved range (the lab's internet is the documentation ranges)
unless STUN reports that address as its public one and shows no filtering
(C{ext_perform_stun=yes}).  Each such router runs this on its own WAN
address and points miniupnpd at it, so the real miniupnpd runs unchanged.
It ignores CHANGE-REQUEST: miniupnpd needs only that all four of its
requests are answered, from the address it asked, with its own port.
"""

from __future__ import annotations

import ipaddress
import struct
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import react

STUN_PORT = 3478
MAGIC_COOKIE = 0x2112A442
BINDING_REQUEST, BINDING_SUCCESS = 0x0001, 0x0101
XOR_MAPPED_ADDRESS = 0x0020


def binding_answer(data: bytes, addr: tuple[str, int]) -> bytes | None:
    """The success answer to a Binding request from C{addr} (IPv4), or None for anything else."""
    if len(data) < 20:
        return None
    kind, _length, cookie = struct.unpack(">HHI", data[:8])
    if kind != BINDING_REQUEST or cookie != MAGIC_COOKIE:
        return None
    ip, port = addr[0], addr[1]
    xip = int(ipaddress.IPv4Address(ip)) ^ MAGIC_COOKIE
    attribute = struct.pack(">HHBBHI", XOR_MAPPED_ADDRESS, 8, 0, 1,
                            port ^ (MAGIC_COOKIE >> 16), xip)
    header = struct.pack(">HHI", BINDING_SUCCESS, len(attribute), MAGIC_COOKIE)
    return header + data[8:20] + attribute


class StunProtocol(DatagramProtocol):
    """Thin adapter over L{binding_answer}."""

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        answer = binding_answer(data, addr)
        if answer is not None and self.transport is not None:
            self.transport.write(answer, addr)


def main(reactor: Any, address: str) -> Deferred[None]:
    """C{python -m twistvpn.testing.stunserver ADDRESS}: answer on ADDRESS:3478 until stopped."""
    reactor.listenUDP(STUN_PORT, StunProtocol(), interface=address)
    print("listening", flush=True)
    return Deferred()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m twistvpn.testing.stunserver ADDRESS")
    react(main, sys.argv[1:])
