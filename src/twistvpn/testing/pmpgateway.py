"""
A port-mapping gateway for the simulated NAT network: answers PCP (RFC
6887, MAP for UDP) and NAT-PMP (RFC 6886) requests and keeps port forwards
through callbacks, which L{twistvpn.testing.natsim} keeps in its table.
(The lab's real-kernel routers run the real miniupnpd instead:
L{twistvpn.testing.netns.sites.start_miniupnpd}.)
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

GATEWAY_PORT = 5351
LOW_PORT = 1024
HIGH_PORT = 65535
Addr = tuple[str, int]


class Gateway:
    """
    The protocol logic: C{answer(data, src, now)} is the reply (or None:
    silence); forwards are made and removed through C{add} and C{remove}.
    C{protocols}: "pcp", "natpmp", both, or none (a gateway without them).
    """

    def __init__(self, public_ip: str, protocols: tuple[str, ...], *,
                 add: Callable[[int, Addr], None], remove: Callable[[int], None],
                 port_free: Callable[[int], bool], booted: float = 0.0,
                 max_lifetime: int = 86400) -> None:
        self.public_ip = public_ip
        self.protocols = protocols
        self._add = add
        self._remove = remove
        self._port_free = port_free
        self.booted = booted
        self.max_lifetime = max_lifetime  # grants are capped, as miniupnpd's max_lifetime
        self.forwards: dict[int, Addr] = {}
        self.requests: dict[str, int] = {"pcp": 0, "natpmp": 0}

    def answer(self, data: bytes, src: Addr, now: float) -> bytes | None:
        epoch = int(now - self.booted)
        if len(data) >= 2 and data[0] == 0 and "natpmp" in self.protocols:
            self.requests["natpmp"] += 1
            if data[1] == 0:
                return struct.pack(">BBHI4s", 0, 128, 0, epoch,
                                   ipaddress.IPv4Address(self.public_ip).packed)
            if data[1] == 1 and len(data) >= 12:
                internal, suggested, lifetime = struct.unpack(">HHI", data[4:12])
                lifetime = min(lifetime, self.max_lifetime)
                port = self.map(src[0], internal, suggested, lifetime)
                return struct.pack(">BBHIHHI", 0, 129, 0, epoch, internal, port, lifetime)
            return struct.pack(">BBHI", 0, 128 + data[1] % 128, 5, epoch)  # unsupported op
        if len(data) >= 60 and data[0] == 2 and data[1] == 1:
            if "pcp" not in self.protocols:
                if "natpmp" in self.protocols:  # RFC 6887 section 9: NAT-PMP only
                    return struct.pack(">BBHI", 0, 129, 1, epoch)
                return None
            self.requests["pcp"] += 1
            lifetime = min(struct.unpack(">I", data[4:8])[0], self.max_lifetime)
            nonce, protocol = data[24:36], data[36]
            internal, suggested = struct.unpack(">HH", data[40:44])
            port = self.map(src[0], internal, suggested, lifetime)
            external = ipaddress.IPv6Address(f"::ffff:{self.public_ip}").packed
            return (struct.pack(">BBBBII12x", 2, 0x81, 0, 0, lifetime, epoch) + nonce
                    + struct.pack(">B3xHH", protocol, internal, port) + external)
        return None

    def reboot(self, now: float) -> None:
        """A power cycle: every forward gone, the epoch from zero again (RFC 6886 section 3.6)."""
        for port in list(self.forwards):
            del self.forwards[port]
            self._remove(port)
        self.booted = now

    def map(self, host_ip: str, internal: int, suggested: int, lifetime: int) -> int:
        """Forward a port to C{host_ip}:C{internal}: the suggested one if free; 0 deletes."""
        for port, target in list(self.forwards.items()):
            if target == (host_ip, internal):
                if lifetime == 0:
                    del self.forwards[port]
                    self._remove(port)
                    return 0
                return port
        if lifetime == 0:
            return 0
        port = suggested
        if not (LOW_PORT <= port <= HIGH_PORT and self._port_free(port)
                and port not in self.forwards):
            port = next(p for p in range(20000, HIGH_PORT)
                        if self._port_free(p) and p not in self.forwards)
        self.forwards[port] = (host_ip, internal)
        self._add(port, (host_ip, internal))
        return port
