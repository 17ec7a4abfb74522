"""
Port mapping: ask the LAN's gateway to forward a UDP port to the node's
WireGuard port, with PCP (RFC 6887), NAT-PMP (RFC 6886) or UPnP IGD
(L{twistvpn.traversal.upnp}), so that a node
behind a NAT that maps every destination to a new port (a "hard" NAT)
still has one address every peer can reach.  The mapped address is
published to the rendezvous as a candidate; peers probe it as any other.

L{PortMapper} is a plain object: time from a clock, datagrams out through
C{send(data, addr)} and in through L{PortMapper.datagram_received}, so it
runs on a C{Clock} and on the simulated NAT network; L{PortMapProtocol} is
its thin Twisted adapter on a UDP socket of its own.

PCP is asked first; a gateway that speaks only NAT-PMP answers a PCP
request with "unsupported version" (RFC 6887 section 9), and NAT-PMP is
asked next, then UPnP IGD (an SSDP search, then SOAP over HTTP).  A
gateway that does not answer costs about two seconds a protocol, once,
and is asked again after L{RETRY_SILENT}.  A mapping is renewed at half its
lifetime and deleted (lifetime 0) on stop.  Malformed answers are dropped
and counted.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistvpn.traversal.upnp import (
    IGD,
    SSDP_GROUP,
    SSDP_PORT,
    UPnPError,
    search_answer,
    search_request,
)

GATEWAY_PORT = 5351
PCP, NATPMP, UPNP = "pcp", "natpmp", "upnp"
PROTOCOLS = (PCP, NATPMP, UPNP)
PERMANENT_RECHECK = 1800.0  # a lease-less UPnP mapping is re-added this often
LIFETIME = 7200  # seconds asked for; the gateway may grant less
TRIES = (0.25, 0.5, 1.0)  # waits after each try: about 2 s for a silent gateway
RETRY_SILENT = 300.0  # a gateway that did not answer is asked again this much later
RETRY_FAILED = 60.0  # one that refused, this much later

# NAT-PMP (RFC 6886)
_NATPMP_ADDRESS = struct.Struct(">BBHII")  # version, op 128, result, epoch, address
_NATPMP_MAP_REQUEST = struct.Struct(">BBHHHI")
_NATPMP_MAP_ANSWER = struct.Struct(">BBHIHHI")  # version, op 129, result, epoch, int, ext, life
# PCP (RFC 6887)
_PCP_HEADER = struct.Struct(">BBBBI")  # version, R|opcode, reserved, result, lifetime
_PCP_MAP_REQUEST = struct.Struct(">BBHI16s12sB3xHH16s")
_PCP_ANSWER = struct.Struct(">BBBBII12x12sB3xHH16s")
PCP_VERSION = 2
OP_MAP = 1
UDP = 17
RESULT_UNSUPPORTED_VERSION = 1


class PortMapError(ValueError):
    """An answer that is not one (malformed, or not to our question)."""


def _v4mapped(ip: str) -> bytes:
    return ipaddress.IPv6Address(f"::ffff:{ip}").packed


def _from_v4mapped(raw: bytes) -> str:
    address = ipaddress.IPv6Address(raw)
    if address.ipv4_mapped is None:
        raise PortMapError("not an IPv4 address")
    return str(address.ipv4_mapped)


def natpmp_address_request() -> bytes:
    return bytes((0, 0))


def natpmp_map_request(internal_port: int, external_port: int, lifetime: int) -> bytes:
    return _NATPMP_MAP_REQUEST.pack(0, 1, 0, internal_port, external_port, lifetime)


def pcp_map_request(client_ip: str, nonce: bytes, internal_port: int, external_port: int,
                    lifetime: int, external_ip: str = "0.0.0.0") -> bytes:
    return _PCP_MAP_REQUEST.pack(PCP_VERSION, OP_MAP, 0, lifetime, _v4mapped(client_ip), nonce,
                                 UDP, internal_port, external_port, _v4mapped(external_ip))


@dataclass(frozen=True)
class Answer:
    """What a gateway said: the protocol, its result code, and for a map, the mapping."""

    protocol: str
    opcode: int  # 0: the external address (NAT-PMP); 1: a UDP mapping
    result: int
    epoch: int
    internal_port: int = 0
    external_port: int = 0
    external_ip: str | None = None
    lifetime: int = 0
    nonce: bytes = b""


def decode_answer(data: bytes) -> Answer:
    """A PCP or NAT-PMP answer, or L{PortMapError}."""
    if len(data) < 2:
        raise PortMapError("too short")
    version, op = data[0], data[1]
    if version == 0:
        if op == 128:
            if len(data) < 8:
                raise PortMapError("NAT-PMP address answer too short")
            if len(data) < _NATPMP_ADDRESS.size:
                # An error answer may stop after the epoch.
                _, _, result, epoch = struct.unpack(">BBHI", data[:8])
                return Answer(NATPMP, 0, result, epoch)
            _, _, result, epoch, raw = _NATPMP_ADDRESS.unpack(data[:_NATPMP_ADDRESS.size])
            return Answer(NATPMP, 0, result, epoch,
                          external_ip=str(ipaddress.IPv4Address(raw)))
        if op == 129 + 0 and len(data) >= _NATPMP_MAP_ANSWER.size:
            _, _, result, epoch, internal, external, lifetime = _NATPMP_MAP_ANSWER.unpack(
                data[:_NATPMP_MAP_ANSWER.size])
            return Answer(NATPMP, 1, result, epoch, internal, external, None, lifetime)
        if op >= 128 and len(data) >= 4:
            # An answer to what this gateway does not understand (a PCP request).
            (result,) = struct.unpack(">H", data[2:4])
            return Answer(NATPMP, op - 128, result, 0)
        raise PortMapError(f"NAT-PMP opcode {op}")
    if version == PCP_VERSION:
        if not op & 0x80:
            raise PortMapError("a PCP request, not an answer")
        if (op & 0x7F) != OP_MAP:
            raise PortMapError(f"PCP opcode {op & 0x7F}")
        if len(data) < _PCP_ANSWER.size:
            if len(data) >= _PCP_HEADER.size:
                _, _, _, result, lifetime = _PCP_HEADER.unpack(data[:_PCP_HEADER.size])
                if result:
                    return Answer(PCP, OP_MAP, result, 0, lifetime=lifetime)
            raise PortMapError("PCP MAP answer too short")
        (_, _, _, result, lifetime, epoch, nonce, protocol, internal, external,
         raw_ip) = _PCP_ANSWER.unpack(data[:_PCP_ANSWER.size])
        if protocol != UDP:
            raise PortMapError(f"PCP MAP for protocol {protocol}")
        return Answer(PCP, OP_MAP, result, epoch, internal, external,
                      _from_v4mapped(raw_ip) if not result else None, lifetime, nonce)
    raise PortMapError(f"version {version}")


Address = tuple[str, int]


class PortMapper:
    """
    One UDP mapping of C{internal_port} at C{gateway}, kept while running:
    C{on_change(address or None)} hears of every change; C{status()} says
    what the gateway offers (for netcheck).
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, send: Callable[[bytes, Address], Any], *,
                 gateway: str, client_ip: str, internal_port: int,
                 on_change: Callable[[Address | None], Any] = lambda address: None,
                 protocols: Sequence[str] = PROTOCOLS, lifetime: int = LIFETIME,
                 igd: IGD | None = None) -> None:
        self.clock = clock
        self._send = send
        self.gateway = gateway
        self.client_ip = client_ip
        self.internal_port = internal_port
        self.on_change = on_change
        # UPnP needs HTTP, which comes with the IGD object; without one it is not asked.
        self.protocols = [p for p in protocols
                          if p in PROTOCOLS and (p != UPNP or igd is not None)]
        self._igd = igd
        self._upnp_busy = False  # a description or SOAP request is out
        self.lifetime = lifetime
        self.mapped: Address | None = None
        self.protocol: str | None = None  # the one that mapped
        self.offered: dict[str, bool | None] = dict.fromkeys(self.protocols)
        self.counters: collections.Counter[str] = collections.Counter()
        self._nonce = os.urandom(12)
        self._asking: str | None = None
        self._try = 0
        self._timer: IDelayedCall | None = None
        self._natpmp_ip: str | None = None
        self._epoch: tuple[float, int] | None = None  # (when, gateway's epoch)
        self._running = False

    # -- life ---------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._ask(0)

    def stop(self) -> Deferred[Any] | None:
        """Stop renewing, and ask the gateway to delete the mapping (UPnP: fires when done)."""
        self._running = False
        self._cancel()
        deleted: Deferred[Any] | None = None
        if self.mapped is not None and self.protocol is not None:
            if self.protocol == UPNP and self._igd is not None:
                deleted = self._igd.delete()
            else:
                self._send(self._request(self.protocol, 0), (self.gateway, GATEWAY_PORT))
            self.counters["deleted"] += 1
        self._set(None)
        return deleted

    def status(self) -> dict[str, Any]:
        return {"gateway": self.gateway, "offered": dict(self.offered),
                "protocol": self.protocol,
                "mapped": f"{self.mapped[0]}:{self.mapped[1]}" if self.mapped else None}

    # -- asking -------------------------------------------------------------------

    def _request(self, protocol: str, lifetime: int) -> bytes:
        external = self.mapped[1] if self.mapped else self.internal_port
        if protocol == PCP:
            return pcp_map_request(self.client_ip, self._nonce, self.internal_port, external,
                                   lifetime, self.mapped[0] if self.mapped else "0.0.0.0")
        return natpmp_map_request(self.internal_port, external, lifetime)

    def _ask(self, index: int) -> None:
        """Ask with the protocol at C{index}, from its first try."""
        self._cancel()
        if not self._running:
            return
        if index >= len(self.protocols):
            self._give_up(RETRY_SILENT, "the gateway answered no port mapping protocol")
            return
        self._asking = self.protocols[index]
        self._try = 0
        self._send_try()

    def _send_try(self) -> None:
        protocol = self._asking
        assert protocol is not None
        gateway = (self.gateway, GATEWAY_PORT)
        if protocol == UPNP:
            # To the gateway and to the SSDP group: some IGDs answer only one of them.
            for address in ((self.gateway, SSDP_PORT), (SSDP_GROUP, SSDP_PORT)):
                self._send(search_request(), address)
            self.counters["upnp_requests"] += 1
            self._timer = self.clock.callLater(TRIES[self._try], self._timed_out)
            return
        if protocol == NATPMP:
            self._send(natpmp_address_request(), gateway)
        self._send(self._request(protocol, self.lifetime), gateway)
        self.counters[f"{protocol}_requests"] += 1
        wait = TRIES[self._try]
        self._timer = self.clock.callLater(wait, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._try += 1
        if self._try < len(TRIES):
            self._send_try()
            return
        protocol = self._asking
        assert protocol is not None
        if self.offered[protocol] is None:
            self.offered[protocol] = False
        self.counters[f"{protocol}_silent"] += 1
        if self.mapped is not None and protocol == self.protocol:
            # The gateway that mapped us went quiet: the mapping may be gone.
            self._set(None)
        self._ask(self.protocols.index(protocol) + 1)

    def _give_up(self, after: float, why: str) -> None:
        self._asking = None
        self.counters["gave_up"] += 1
        if self.counters["gave_up"] == 1:
            self.log.info("port mapping at {gateway}: {why}; asking again in {after:.0f} s",
                          gateway=self.gateway, why=why, after=after)
        self._timer = self.clock.callLater(after, self._ask, 0)

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- answers ------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """An answer from the gateway.  Never raises."""
        if tuple(addr[:2]) == (self.gateway, SSDP_PORT):
            self._search_answered(data)
            return
        if tuple(addr[:2]) != (self.gateway, GATEWAY_PORT):
            self.counters["drop_not_gateway"] += 1
            return
        try:
            answer = decode_answer(data)
        except (PortMapError, struct.error, ValueError):
            self.counters["drop_malformed"] += 1
            return
        if not self._running or self._asking is None:
            self.counters["drop_unexpected"] += 1
            return
        if answer.protocol == NATPMP and self._asking == PCP:
            if answer.result == RESULT_UNSUPPORTED_VERSION:
                self.offered[PCP] = False
                self.counters["pcp_unsupported"] += 1
                self._ask(self.protocols.index(PCP) + 1)
            else:
                self.counters["drop_unexpected"] += 1
            return
        if answer.protocol != self._asking:
            self.counters["drop_unexpected"] += 1
            return
        if answer.protocol == PCP and answer.nonce and answer.nonce != self._nonce:
            self.counters["drop_wrong_nonce"] += 1
            return
        if answer.opcode == 0:
            if answer.result == 0 and answer.external_ip:
                self._natpmp_ip = answer.external_ip
                self._check_epoch(answer.epoch)
            return
        if answer.internal_port != self.internal_port and answer.result == 0:
            self.counters["drop_wrong_port"] += 1
            return
        self.offered[answer.protocol] = True
        if answer.result != 0:
            self.counters[f"{answer.protocol}_refused"] += 1
            self._cancel()
            self._set(None)
            self._give_up(RETRY_FAILED, f"{answer.protocol} refused (result {answer.result})")
            return
        external_ip = answer.external_ip or self._natpmp_ip
        if external_ip is None:
            return  # the NAT-PMP address answer is still to come; the next try asks again
        self._cancel()
        self._check_epoch(answer.epoch)
        self.protocol = answer.protocol
        self.counters[f"{answer.protocol}_mapped"] += 1
        self._set((external_ip, answer.external_port))
        renew = max(10.0, answer.lifetime / 2)
        self._timer = self.clock.callLater(renew, self._ask, self.protocols.index(answer.protocol))

    # -- UPnP IGD -----------------------------------------------------------------

    def _search_answered(self, data: bytes) -> None:
        try:
            location = search_answer(data, self.gateway)
        except UPnPError:
            self.counters["drop_malformed"] += 1
            return
        if not self._running or self._asking != UPNP or self._upnp_busy or self._igd is None:
            self.counters["drop_unexpected"] += 1
            return
        self._cancel()
        self._upnp_busy = True
        self.offered[UPNP] = True
        igd = self._igd
        port = self.mapped[1] if self.mapped else self.internal_port
        d = igd.discover(location)
        d.addCallback(lambda _: igd.add(port, self.lifetime))
        d.addCallbacks(self._upnp_mapped, self._upnp_failed)

    def _upnp_mapped(self, mapping: tuple[str, int, int]) -> None:
        self._upnp_busy = False
        if not self._running:
            if self._igd is not None:
                self._igd.delete()  # stopped while the mapping was being made
            return
        external_ip, external_port, lease = mapping
        self._asking = None  # the search's other answers (unicast and group) are late now
        self.protocol = UPNP
        self.counters["upnp_mapped"] += 1
        self._set((external_ip, external_port))
        renew = max(10.0, lease / 2) if lease else PERMANENT_RECHECK
        self._timer = self.clock.callLater(renew, self._ask, self.protocols.index(UPNP))

    def _upnp_failed(self, failure: Failure) -> None:
        self._upnp_busy = False
        if not self._running:
            return
        if self.protocol == UPNP:
            self._set(None)
        if failure.check(UPnPError) is not None:
            self.counters["upnp_refused"] += 1
            self._give_up(RETRY_FAILED, f"upnp: {failure.getErrorMessage()}")
            return
        self.counters["upnp_silent"] += 1
        self._ask(self.protocols.index(UPNP) + 1)

    def _check_epoch(self, epoch: int) -> None:
        """A gateway whose epoch went back has rebooted: our mapping may be gone (RFC 6886)."""
        now = self.clock.seconds()
        if self._epoch is not None:
            when, before = self._epoch
            if epoch + 2 < before + (now - when) * 7 / 8:
                self.counters["gateway_rebooted"] += 1
                self._set(None)
        self._epoch = (now, epoch)

    def _set(self, address: Address | None) -> None:
        if address != self.mapped:
            self.mapped = address
            self.log.info("port mapping at {gateway}: {address}", gateway=self.gateway,
                          address=f"{address[0]}:{address[1]} ({self.protocol})"
                          if address else "none")
            self.on_change(address)


class PortMapProtocol(DatagramProtocol):
    """Thin adapter: the mapper's socket (one of its own, not the WireGuard port's)."""

    def __init__(self, mapper_factory: Callable[[Callable[[bytes, Address], Any]],
                                                PortMapper]) -> None:
        self._factory = mapper_factory
        self.mapper: PortMapper | None = None

    def startProtocol(self) -> None:
        self.mapper = self._factory(self._write)

    def _write(self, data: bytes, addr: Address) -> None:
        if self.transport is not None:
            self.transport.write(data, addr)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self.mapper is not None:
            self.mapper.datagram_received(data, addr)


def default_gateway(path: str = "/proc/net/route") -> str | None:
    """The IPv4 default route's gateway, from the kernel's table, or None."""
    try:
        with open(path) as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 2:
                    return str(ipaddress.IPv4Address(bytes.fromhex(fields[2])[::-1]))
    except (OSError, ValueError, StopIteration):
        return None
    return None


def source_address_for(destination: str) -> str | None:
    """Our address on the route to C{destination} (a connected UDP socket sends nothing)."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((destination, GATEWAY_PORT))
            return str(probe.getsockname()[0])
    except OSError:
        return None
