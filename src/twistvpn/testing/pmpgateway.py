"""
A port-mapping gateway for tests: answers PCP (RFC 6887, MAP for UDP) and
NAT-PMP (RFC 6886) requests and keeps port forwards through callbacks.
The simulated NAT (L{twistvpn.testing.natsim}) keeps them in its table; in
the lab, a router namespace runs it as a process
(C{python -m twistvpn.testing.pmpgateway ...}) and keeps them as iptables
DNAT rules, so the kernel's connection tracking does the rest.

(The lab would run the real miniupnpd, but Debian 12's miniupnpd 2.3.1
refuses to forward ports on a reserved WAN address, and the lab's internet
is the documentation ranges: see docs/traversal.md.)
"""

from __future__ import annotations

import ipaddress
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import react

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
                 port_free: Callable[[int], bool], booted: float = 0.0) -> None:
        self.public_ip = public_ip
        self.protocols = protocols
        self._add = add
        self._remove = remove
        self._port_free = port_free
        self.booted = booted
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
                port = self.map(src[0], internal, suggested, lifetime)
                return struct.pack(">BBHIHHI", 0, 129, 0, epoch, internal, port, lifetime)
            return struct.pack(">BBHI", 0, 128 + data[1] % 128, 5, epoch)  # unsupported op
        if len(data) >= 60 and data[0] == 2 and data[1] == 1:
            if "pcp" not in self.protocols:
                if "natpmp" in self.protocols:  # RFC 6887 section 9: NAT-PMP only
                    return struct.pack(">BBHI", 0, 129, 1, epoch)
                return None
            self.requests["pcp"] += 1
            lifetime = struct.unpack(">I", data[4:8])[0]
            nonce, protocol = data[24:36], data[36]
            internal, suggested = struct.unpack(">HH", data[40:44])
            port = self.map(src[0], internal, suggested, lifetime)
            external = ipaddress.IPv6Address(f"::ffff:{self.public_ip}").packed
            return (struct.pack(">BBBBII12x", 2, 0x81, 0, 0, lifetime, epoch) + nonce
                    + struct.pack(">B3xHH", protocol, internal, port) + external)
        return None

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


class GatewayProtocol(DatagramProtocol):
    """Thin adapter: the gateway's UDP port 5351 on the router's LAN address."""

    def __init__(self, gateway: Gateway, clock: Any) -> None:
        self.gateway = gateway
        self.clock = clock

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        reply = self.gateway.answer(data, addr, self.clock.seconds())
        if reply is not None and self.transport is not None:
            self.transport.write(reply, addr)


def iptables_forwards(wan: str) -> tuple[Callable[[int, Addr], None], Callable[[int], None]]:
    """add and remove callbacks keeping forwards as iptables DNAT rules on C{wan}."""
    rules: dict[int, Addr] = {}

    def rule(action: str, port: int, target: Addr) -> None:
        subprocess.run(["iptables", "-t", "nat", action, "PREROUTING", "-i", wan, "-p", "udp",
                        "--dport", str(port), "-j", "DNAT",
                        "--to-destination", f"{target[0]}:{target[1]}"], check=True)
        print(f"{'forward' if action == '-A' else 'removed'} {port} -> "
              f"{target[0]}:{target[1]}", flush=True)

    def add(port: int, target: Addr) -> None:
        rules[port] = target
        rule("-A", port, target)

    def remove(port: int) -> None:
        rule("-D", port, rules.pop(port))

    return add, remove


def main(reactor: Any, lan_ip: str, wan: str, public_ip: str,
         protocols: str) -> Deferred[None]:
    """
    C{pmpgateway LAN_IP WAN_INTERFACE PUBLIC_IP pcp,natpmp}: answer at
    LAN_IP:5351, forwarding with iptables DNAT on WAN_INTERFACE; runs until stopped.
    """
    add, remove = iptables_forwards(wan)
    gateway = Gateway(public_ip, tuple(p for p in protocols.split(",") if p), add=add,
                      remove=remove, port_free=lambda port: True, booted=reactor.seconds())
    reactor.listenUDP(GATEWAY_PORT, GatewayProtocol(gateway, reactor), interface=lan_ip)
    print("listening", flush=True)
    return Deferred()


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit("usage: python -m twistvpn.testing.pmpgateway LAN_IP WAN PUBLIC_IP PROTOCOLS")
    react(main, sys.argv[1:])
