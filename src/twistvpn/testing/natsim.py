"""
A simulated internet of hosts, LANs and NAT routers, driven by a clock.

Shipped in the package so that plugin authors can test traversal strategies,
and so that any UDP protocol (discovery, a relay) can be tested behind NATs
without a kernel.  Everything is deterministic for a given seed.

Building a network::

    net = Internet(seed=7)                          # its own Clock, or clock=
    server = net.add_public_host("203.0.113.10")    # no NAT
    home = net.add_nat("easy")                      # a preset name or a NATBehavior
    laptop = net.add_host(home)                     # 192.168.N.x behind it
    port = laptop.reactor.listenUDP(0, SomeDatagramProtocol())
    net.run(5.0)                                    # 5 simulated seconds

Each L{Host} has a C{reactor} (L{SimReactor}) providing C{IReactorUDP} and
C{IReactorTime}: C{listenUDP(port, protocol)} returns a L{SimPort} whose
C{write(data, (host, port))} routes through the simulated network, and
C{callLater} runs on the shared clock.  So the real forwarder, strategies and
any C{DatagramProtocol} run unchanged on top.

A datagram from a host behind a NAT is translated on the way out (mapping),
checked on the way in (filtering), and delivered after the sum of the two
hosts' link latencies; each link drops a packet with its loss probability.
NAT behaviour follows RFC 4787:

  - mapping: endpoint-independent (C{EIM}), address-dependent (C{ADM}),
    address-and-port-dependent (C{APDM});
  - filtering: the same three (C{EIF}, C{ADF}, C{APDF});
  - port assignment: C{PRESERVE}, C{SEQUENTIAL}, C{RANDOM};
  - hairpinning on or off; a mapping timeout refreshed by outbound traffic
    only; or all UDP blocked.

Presets by name (L{PRESETS}): C{open} (a public address, no NAT), C{easy}
(EIM, APDF, port preserving: Linux MASQUERADE), C{easyaf} (EIM, ADF),
C{hard} (APDM, random ports), C{hard-sequential} (APDM, sequential ports),
C{udpblock}.  Two hosts behind one NAT: call L{Internet.add_host} twice with
the same NAT (build it with C{hairpin=True} or not), or
C{add_pair("same-nat-hairpin", "easy")}; C{add_pair(a, b)} builds any pair of
presets.

Time to live: a datagram leaves with 64 (or the hop limit given to
L{SimPort.write_hop_limited}); the sender's NAT router takes one (a datagram
it cannot forward makes no mapping), the internet's core C{core_hops} (one
by default, as the lab's core router: the real internet has more), and a
receiving NAT router one more to forward it into its LAN.  A datagram with
too little left is dropped and counted (C{drop_ttl}); one that reaches a
router's own address unsolicited still counts for the clash, as in Linux.

Dual stack: C{add_nat(..., ipv6=True)} gives the NAT's LAN a global IPv6
prefix (2001:db8:N::/64) and each of its hosts an address in it;
C{add_public_host(..., ipv6=True)} a public host one of 2001:db8::/64.  IPv6
crosses the router without translation, through a stateful firewall as
home routers have: it lets in only what answers a flow its host opened
(address and port dependent, as conntrack; the NAT's timeout; no clash:
the router is never the destination).  A socket writes to either family
(as a dual-stack socket does), from the host's address of that family.

Simplifications, on purpose: datagrams to a private address that is not on
the sender's own LAN are dropped at the router (a real one would NAT them
toward its ISP, which drops them); no fragmentation, no ICMP, no cross
traffic from other users of a NAT.

L{Internet.run} moves the clock from event to event (never skipping one), so
a long simulated run costs only as much as the packets and timers in it.
"""

from __future__ import annotations

import collections
import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTime,
    IReactorUDP,
    IUDPTransport,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from zope.interface import implementer

from twistvpn.interfaces import IHopLimitedWriter
from twistvpn.testing import pmpgateway
from twistvpn.traversal.upnp import SSDP_GROUP, SSDP_PORT

# RFC 4787 mapping and filtering behaviours.
EIM, ADM, APDM = "endpoint-independent", "address-dependent", "address-and-port-dependent"
EIF, ADF, APDF = EIM, ADM, APDM
PRESERVE, SEQUENTIAL, RANDOM = "preserve", "sequential", "random"

LOW_PORT = 1024
HIGH_PORT = 65535
DEFAULT_TTL = 64

Addr = tuple[str, int]


@dataclass(frozen=True)
class NATBehavior:
    """What a NAT does with UDP, in RFC 4787's terms."""

    mapping: str = EIM
    filtering: str = APDF
    ports: str = PRESERVE
    hairpin: bool = False
    timeout: float = 30.0
    udp_blocked: bool = False
    # False: unsolicited UDP to the router itself is not dropped (a bare Linux
    # router): it leaves a connection-tracking entry, and the router's own
    # host can then no longer use that port towards that sender (the clash).
    firewall: bool = True

    def __post_init__(self) -> None:
        for field, value in (("mapping", self.mapping), ("filtering", self.filtering)):
            if value not in (EIM, ADM, APDM):
                raise ValueError(f"unknown {field} behaviour {value!r}")
        if self.ports not in (PRESERVE, SEQUENTIAL, RANDOM):
            raise ValueError(f"unknown port assignment {self.ports!r}")
        if self.timeout <= 0:
            raise ValueError("a mapping timeout must be positive")


PRESETS: dict[str, NATBehavior | None] = {
    "open": None,
    "easy": NATBehavior(EIM, APDF, PRESERVE),
    "easyaf": NATBehavior(EIM, ADF, PRESERVE),
    "hard": NATBehavior(APDM, APDF, RANDOM),
    "hard-sequential": NATBehavior(APDM, APDF, SEQUENTIAL),
    "udpblock": NATBehavior(udp_blocked=True),
    # Without the firewall on the router itself (docs/lab.md: the conntrack clash).
    "easynf": NATBehavior(EIM, APDF, PRESERVE, firewall=False),
    "hardnf": NATBehavior(APDM, APDF, RANDOM, firewall=False),
}


# Two hosts behind one NAT, for L{Internet.add_pair}.
SAME_NAT = ("same-nat", "same-nat-hairpin")


def behavior(preset: str | NATBehavior, **changes: Any) -> NATBehavior:
    """A preset's behaviour (by name), with C{changes} applied."""
    if isinstance(preset, NATBehavior):
        base = preset
    else:
        try:
            found = PRESETS[preset]
        except KeyError:
            raise ValueError(f"unknown NAT preset {preset!r}") from None
        if found is None:
            raise ValueError(f"preset {preset!r} is a public address, not a NAT")
        base = found
    return replace(base, **changes) if changes else base


# RFC 1918, link-local and loopback.  (Python's C{is_private} also covers
# the documentation ranges that the simulated internet itself uses.)
_PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8"))


def is_private(ip: str) -> bool:
    """True for addresses that the simulated internet does not route."""
    address = ipaddress.ip_address(ip)
    return any(address in net for net in _PRIVATE)


class _Mapping:
    __slots__ = ("key", "internal", "port", "expires", "allowed")

    def __init__(self, key: Any, internal: Addr, port: int, expires: float) -> None:
        self.key = key
        self.internal = internal
        self.port = port
        self.expires = expires
        self.allowed: set[Any] = set()


def _live(expiries: dict[Any, float], key: Any, now: float) -> bool:
    """Whether C{key} has an entry that has not expired (an expired one goes)."""
    expires = expiries.get(key)
    if expires is None:
        return False
    if expires <= now:
        del expiries[key]
        return False
    return True


class NAT:
    """
    A NAT router: one public address, a LAN behind it.  Its translation is
    a pure function of the packet, the time and its table, so every test
    can reason about it.
    """

    def __init__(
        self, internet: Internet, public_ip: str, subnet: str, behavior: NATBehavior,
        link: Link, prefix6: str | None = None,
    ) -> None:
        self.internet = internet
        self.public_ip = public_ip
        self.subnet = ipaddress.ip_network(subnet)
        # Dual stack: the LAN's global IPv6 prefix, and the IPv6 firewall's
        # flows: (inside, outside) -> expiry.
        self.prefix6 = ipaddress.ip_network(prefix6) if prefix6 is not None else None
        self._flows6: dict[tuple[Addr, Addr], float] = {}
        self.behavior = behavior
        self.link = link
        self.hosts: dict[str, Host] = {}
        self._rng = internet.random
        self._mappings: dict[Any, _Mapping] = {}
        self._by_port: dict[int, _Mapping] = {}
        self._forwards: dict[int, Addr] = {}
        self._flows: dict[tuple[Addr, Addr], _Mapping] = {}  # through a forward
        # (sender, our port) -> expiry: unsolicited packets the router kept (no firewall)
        self._local: dict[tuple[Addr, int], float] = {}
        self._next_port = self._rng.randrange(LOW_PORT, HIGH_PORT)
        self._next_ip = 2
        # The port-mapping gateway at .1:5351, its forwards in this table; it
        # answers the protocols in L{portmap} (none until a test says so).
        self.gateway_ip = str(self.subnet.network_address + 1)
        self.gateway = pmpgateway.Gateway(
            public_ip, (), add=self.forward_port, remove=self.remove_forward,
            port_free=lambda port: self._port_free(port, internet.clock.seconds()),
            booted=internet.clock.seconds())
        # UPnP IGD at .1 (SSDP on 1900; HTTP in memory): answers when
        # "upnp" is in L{portmap}; its mappings are forwards of this table too.
        self.igd = pmpgateway.IGDServer(self.gateway_ip, public_ip, add=self.forward_port,
                                        remove=self.remove_forward)

    @property
    def portmap(self) -> tuple[str, ...]:
        """What the gateway answers: any of "pcp", "natpmp", "upnp", or nothing (silence)."""
        return self.gateway.protocols

    @portmap.setter
    def portmap(self, protocols: tuple[str, ...]) -> None:
        self.gateway.protocols = protocols

    @property
    def hairpin(self) -> bool:
        return self.behavior.hairpin

    def reboot(self) -> None:
        """Forget every dynamic mapping (a power cycle); static forwards stay."""
        self._flows.clear()
        self._mappings.clear()
        self._by_port.clear()
        self._next_port = self._rng.randrange(LOW_PORT, HIGH_PORT)

    def forward_port(self, external_port: int, internal: Addr) -> None:
        """
        A static port forward, as a user configures on a home router.  Like
        conntrack, a flow that came in through it answers from that port.
        """
        self._forwards[external_port] = internal

    def _forwarded(self, port: int, src: Addr, now: float) -> Addr | None:
        internal = self._forwards.get(port)
        if internal is not None:
            flow = _Mapping((internal, src), internal, port, now + self.behavior.timeout)
            self._flows[(internal, src)] = flow
        return internal

    def remove_forward(self, external_port: int) -> None:
        self._forwards.pop(external_port, None)
        for key in [k for k, flow in self._flows.items() if flow.port == external_port]:
            del self._flows[key]

    @property
    def forwards(self) -> dict[int, Addr]:
        return dict(self._forwards)

    def mappings(self, now: float) -> dict[int, Addr]:
        """The live mappings, external port to internal address (for tests)."""
        return {p: m.internal for p, m in self._by_port.items() if m.expires > now}

    # -- translation ----------------------------------------------------------

    def _key(self, internal: Addr, dst: Addr) -> Any:
        mapping = self.behavior.mapping
        if mapping == EIM:
            return internal
        if mapping == ADM:
            return (internal, dst[0])
        return (internal, dst)

    def _port_free(self, port: int, now: float) -> bool:
        if port in self._forwards:
            return False
        m = self._by_port.get(port)
        if m is None:
            return True
        if m.expires <= now:
            self._drop(m)
            return True
        return False

    def _drop(self, m: _Mapping) -> None:
        self._by_port.pop(m.port, None)
        if self._mappings.get(m.key) is m:
            del self._mappings[m.key]

    def _allocate(self, wanted: int, now: float) -> int:
        ports = self.behavior.ports
        span = HIGH_PORT - LOW_PORT + 1
        if ports == RANDOM:
            for _ in range(span):
                port = self._rng.randrange(LOW_PORT, HIGH_PORT + 1)
                if self._port_free(port, now):
                    return port
            raise RuntimeError("NAT port space exhausted")
        start = wanted if ports == PRESERVE and wanted >= LOW_PORT else self._next_port
        for i in range(span):
            port = LOW_PORT + (start - LOW_PORT + i) % span
            if self._port_free(port, now):
                if ports == SEQUENTIAL:
                    self._next_port = port + 1 if port < HIGH_PORT else LOW_PORT
                return port
        raise RuntimeError("NAT port space exhausted")

    def note_unsolicited(self, src: Addr, port: int, now: float) -> None:
        """A packet nothing let in reached the router itself; without a firewall it stays."""
        if not self.behavior.firewall:
            self._local[(src, port)] = now + self.behavior.timeout

    def _clashes(self, dst: Addr, port: int, now: float) -> bool:
        return _live(self._local, (dst, port), now)

    def outbound(self, internal: Addr, dst: Addr, now: float) -> int:
        """The external port for a packet from C{internal} to C{dst}."""
        if self._flows:
            flow = self._flows.get((internal, dst))
            if flow is not None and flow.expires > now:
                flow.expires = now + self.behavior.timeout
                return flow.port
        key = self._key(internal, dst)
        m = self._mappings.get(key)
        if m is not None and m.expires <= now:
            self._drop(m)
            m = None
        if m is None:
            m = _Mapping(key, internal, self._allocate(internal[1], now), 0.0)
            self._mappings[key] = m
            self._by_port[m.port] = m
        if self._local and self._clashes(dst, m.port, now):
            # conntrack already has dst -> our port (a packet the router kept):
            # this flow gets a port of its own, as Linux's NAT does.
            clash = _Mapping(("clash", internal, dst), internal, self._allocate(0, now),
                             now + self.behavior.timeout)
            clash.allowed.add(dst)
            self._by_port[clash.port] = clash
            self._flows[(internal, dst)] = clash
            return clash.port
        m.expires = now + self.behavior.timeout
        filtering = self.behavior.filtering
        if filtering == APDF:
            m.allowed.add(dst)
        elif filtering == ADF:
            m.allowed.add(dst[0])
        return m.port

    def outbound6(self, inside: Addr, outside: Addr, now: float) -> None:
        """An IPv6 datagram leaves: its answers may come in until the timeout."""
        self._flows6[(inside, outside)] = now + self.behavior.timeout

    def inbound6(self, inside: Addr, outside: Addr, now: float) -> bool:
        """May an IPv6 datagram from C{outside} reach C{inside}?"""
        return _live(self._flows6, (inside, outside), now)

    def inbound(self, port: int, src: Addr, now: float) -> Addr | None:
        """Where a packet from C{src} to our C{port} goes, or None (dropped)."""
        m = self._by_port.get(port)
        if m is None:
            return self._forwarded(port, src, now)
        if m.expires <= now:
            self._drop(m)
            return self._forwarded(port, src, now)
        filtering = self.behavior.filtering
        if filtering == APDF:
            ok = src in m.allowed
        elif filtering == ADF:
            ok = src[0] in m.allowed
        else:
            ok = True
        return m.internal if ok else None


@dataclass
class Link:
    """One hop's one-way latency (seconds) and loss probability."""

    latency: float = 0.010
    loss: float = 0.0


@implementer(IReactorTime, IReactorUDP)
class SimReactor:
    """
    A host's view of the simulation: the shared clock and UDP sockets bound
    to the host's address.
    """

    def __init__(self, host: Host) -> None:
        self._host = host
        self._clock = host.internet.clock

    # IReactorTime
    def seconds(self) -> float:
        return self._clock.seconds()

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any):
        return self._clock.callLater(delay, callable, *args, **kw)

    def getDelayedCalls(self):
        return self._clock.getDelayedCalls()

    # IReactorUDP
    def listenUDP(self, port: int, protocol: DatagramProtocol, interface: str = "",
                  maxPacketSize: int = 8192) -> SimPort:
        return self._host.bind(port, protocol)


@implementer(IUDPTransport, IListeningPort, IHopLimitedWriter)
class SimPort:
    """A bound UDP socket on a simulated host."""

    def __init__(self, host: Host, port: int, protocol: Any) -> None:
        self.host = host
        self.port = port
        self.protocol = protocol
        self.connected: Addr | None = None
        self._broadcast = False
        self.listening = True

    def write(self, packet: bytes, addr: Addr | None = None) -> None:
        if addr is None:
            if self.connected is None:
                raise ValueError("no address given and the socket is not connected")
            addr = self.connected
        if not self.listening:
            raise OSError("socket closed")
        self.host.internet.send(self.host, self.port, bytes(packet), (addr[0], int(addr[1])))

    def write_hop_limited(self, data: bytes, addr: Addr, hops: int) -> None:
        if not self.listening:
            raise OSError("socket closed")
        self.host.internet.send(self.host, self.port, bytes(data), (addr[0], int(addr[1])),
                                ttl=hops)

    def connect(self, host: str, port: int) -> None:
        self.connected = (host, port)

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.host.ip, self.port)

    def startListening(self) -> None:
        """Nothing to do: the simulated listenUDP binds the port as it makes it."""

    def stopListening(self) -> None:
        if self.listening:
            self.listening = False
            self.host.unbind(self.port)
            self.protocol.doStop()

    loseConnection = stopListening

    def setBroadcastAllowed(self, enabled: bool) -> None:
        self._broadcast = bool(enabled)

    def getBroadcastAllowed(self) -> bool:
        return self._broadcast


class Host:
    """A machine with an IPv4 address (and maybe an IPv6 one), on the internet or behind a NAT."""

    def __init__(self, internet: Internet, ip: str, nat: NAT | None, link: Link,
                 ip6: str | None = None) -> None:
        self.internet = internet
        self.ip = ip
        self.ip6 = ip6
        self.nat = nat
        self.link = link
        self.ports: dict[int, SimPort] = {}
        self.reactor = SimReactor(self)
        self._next_ephemeral = 40000 + internet.random.randrange(0, 20000)

    def bind(self, port: int, protocol: Any) -> SimPort:
        if port == 0:
            for _ in range(65536):
                candidate = self._next_ephemeral
                self._next_ephemeral = candidate + 1 if candidate < 65000 else 32768
                if candidate not in self.ports:
                    port = candidate
                    break
        if port in self.ports:
            raise OSError(f"{self.ip}:{port} is already bound")
        sim_port = SimPort(self, port, protocol)
        self.ports[port] = sim_port
        protocol.makeConnection(sim_port)
        return sim_port

    def unbind(self, port: int) -> None:
        self.ports.pop(port, None)

    def deliver(self, port: int, data: bytes, src: Addr) -> None:
        sim_port = self.ports.get(port)
        if sim_port is None:
            self.internet.counters["drop_port_closed"] += 1
            return
        self.internet.counters["delivered"] += 1
        sim_port.protocol.datagramReceived(data, src)


class Internet:
    """The whole simulated network and its clock."""

    def __init__(self, clock: Clock | None = None, seed: int = 0, core_hops: int = 1) -> None:
        self.clock = clock if clock is not None else Clock()
        self.core_hops = core_hops  # routers between any two on the internet
        self.random = random.Random(seed)
        self.counters: collections.Counter[str] = collections.Counter()
        self._public: dict[str, Host | NAT] = {}
        self._hosts6: dict[str, Host] = {}  # every IPv6 address, public or behind a router
        self._nats: list[NAT] = []
        self._next_public = 1
        self._taps: list[Callable[[Addr, Addr, bytes], None]] = []

    # -- building -------------------------------------------------------------

    def _public_ip(self, ip: str | None) -> str:
        if ip is None:
            while True:
                n = self._next_public
                self._next_public += 1
                ip = f"203.0.113.{n}" if n < 255 else f"198.51.100.{n - 254}"
                if ip not in self._public:
                    break
        if ip in self._public:
            raise ValueError(f"{ip} is already on the simulated internet")
        return ip

    def add_public_host(self, ip: str | None = None, latency: float = 0.010,
                        loss: float = 0.0, ipv6: bool = False) -> Host:
        """A host with a public address and no NAT (the C{open} preset)."""
        ip = self._public_ip(ip)
        ip6 = f"2001:db8::{int(ipaddress.ip_address(ip)) & 0xFFFF:x}" if ipv6 else None
        host = Host(self, ip, None, Link(latency, loss), ip6)
        self._public[ip] = host
        if ip6 is not None:
            self._hosts6[ip6] = host
        return host

    def add_nat(self, preset: str | NATBehavior = "easy", public_ip: str | None = None,
                latency: float = 0.010, loss: float = 0.0, ipv6: bool = False,
                **changes: Any) -> NAT:
        """A NAT router with a LAN 192.168.N.0/24 behind it (and 2001:db8:N::/64)."""
        ip = self._public_ip(public_ip)
        n = len(self._nats) + 1
        nat = NAT(self, ip, f"192.168.{n}.0/24", behavior(preset, **changes),
                  Link(latency, loss), f"2001:db8:{n:x}::/64" if ipv6 else None)
        self._public[ip] = nat
        self._nats.append(nat)
        return nat

    def add_host(self, nat: NAT, lan_latency: float = 0.0005) -> Host:
        """A host on C{nat}'s LAN."""
        ip = str(nat.subnet.network_address + nat._next_ip)
        ip6 = (str(nat.prefix6.network_address + nat._next_ip) if nat.prefix6 is not None
               else None)
        nat._next_ip += 1
        host = Host(self, ip, nat, Link(lan_latency, 0.0), ip6)
        nat.hosts[ip] = host
        if ip6 is not None:
            self._hosts6[ip6] = host
        return host

    def add(self, preset: str, latency: float = 0.010, loss: float = 0.0,
            ipv6: bool = False, **changes: Any) -> Host:
        """
        A host behind a fresh NAT of C{preset} (with C{changes} to its
        behaviour, e.g. C{timeout=60}), or a public host for C{open}.
        """
        if preset == "open":
            return self.add_public_host(latency=latency, loss=loss, ipv6=ipv6)
        return self.add_host(self.add_nat(preset, latency=latency, loss=loss, ipv6=ipv6,
                                          **changes))

    def add_pair(self, a: str, b: str, latency: tuple[float, float] = (0.010, 0.010),
                 loss: float = 0.0, ipv6: bool = False, **changes: Any) -> tuple[Host, Host]:
        """
        Two hosts for presets C{a} and C{b} (dual stack with C{ipv6}); or,
        when C{a} is C{same-nat} or C{same-nat-hairpin} (see L{SAME_NAT}),
        two hosts behind one C{easy} NAT (C{b} names its preset, C{easy} if
        it is the same name).
        """
        if a in SAME_NAT:
            preset = "easy" if b in SAME_NAT else b
            nat = self.add_nat(preset, latency=latency[0], loss=loss, ipv6=ipv6,
                               **{"hairpin": a == "same-nat-hairpin", **changes})
            return (self.add_host(nat), self.add_host(nat))
        return (self.add(a, latency[0], loss, ipv6, **changes),
                self.add(b, latency[1], loss, ipv6, **changes))

    def tap(self, observer: Callable[[Addr, Addr, bytes], None]) -> None:
        """Call C{observer(src, dst, data)} for every datagram sent by a host."""
        self._taps.append(observer)

    # -- moving packets -------------------------------------------------------

    def _lost(self, link: Link) -> bool:
        return link.loss > 0 and self.random.random() < link.loss

    def send(self, host: Host, sport: int, data: bytes, dst: Addr,
             ttl: int = DEFAULT_TTL) -> None:
        """Route one datagram from C{host}:C{sport} to C{dst}, leaving with C{ttl}."""
        if ":" in dst[0]:
            self._send6(host, sport, data, dst, ttl)
            return
        counters = self.counters
        counters["sent"] += 1
        src: Addr = (host.ip, sport)
        for observer in self._taps:
            observer(src, dst, data)
        dip = dst[0]
        now = self.clock.seconds()
        nat = host.nat
        if nat is None:
            latency = host.link.latency
            if self._lost(host.link):
                counters["drop_loss"] += 1
                return
        else:
            if dst[1] == SSDP_PORT and dip in (nat.gateway_ip, SSDP_GROUP):
                answer = (nat.igd.ssdp_answer(data) if "upnp" in nat.gateway.protocols
                          else None)
                if answer is not None:
                    self.clock.callLater(2 * host.link.latency, host.deliver, sport, answer,
                                         (nat.gateway_ip, SSDP_PORT))
                return
            if dip == nat.gateway_ip and dst[1] == 5351:
                answer = nat.gateway.answer(data, src, now)
                if answer is not None:
                    self.clock.callLater(2 * host.link.latency, host.deliver, sport, answer,
                                         (nat.gateway_ip, 5351))
                return
            lan = nat.hosts.get(dip)
            if lan is not None:
                self.clock.callLater(host.link.latency + lan.link.latency,
                                     lan.deliver, dst[1], data, src)
                return
            if nat.behavior.udp_blocked:
                counters["drop_udp_blocked"] += 1
                return
            if dip == nat.public_ip:
                if not nat.behavior.hairpin:
                    counters["drop_no_hairpin"] += 1
                    return
                ext = (nat.public_ip, nat.outbound(src, dst, now))
                self.clock.callLater(2 * host.link.latency, self._arrive, nat, ext, dst[1], data)
                return
            if is_private(dip):
                counters["drop_unroutable"] += 1
                return
            ttl -= 1  # the router forwards it, or cannot (and maps nothing)
            if ttl <= 0:
                counters["drop_ttl"] += 1
                return
            src = (nat.public_ip, nat.outbound(src, dst, now))
            latency = host.link.latency + nat.link.latency
            if self._lost(nat.link):
                counters["drop_loss"] += 1
                return
        ttl -= self.core_hops
        if ttl <= 0:
            counters["drop_ttl"] += 1
            return
        target = self._public.get(dip)
        if target is None:
            counters["drop_no_such_host"] += 1
            return
        if self._lost(target.link):
            counters["drop_loss"] += 1
            return
        self.clock.callLater(latency + target.link.latency, self._arrive, target, src,
                             dst[1], data, ttl)

    def _send6(self, host: Host, sport: int, data: bytes, dst: Addr, ttl: int) -> None:
        """Route one IPv6 datagram: no translation, the routers' firewalls."""
        counters = self.counters
        if host.ip6 is None:
            counters["drop_no_ipv6"] += 1
            raise OSError(101, "Network is unreachable (no IPv6 address)")
        counters["sent"] += 1
        src: Addr = (host.ip6, sport)
        for observer in self._taps:
            observer(src, dst, data)
        now = self.clock.seconds()
        target = self._hosts6.get(dst[0])
        nat = host.nat
        latency = host.link.latency
        if nat is not None:
            if target is not None and target.nat is nat:  # on our own LAN
                self.clock.callLater(latency + target.link.latency, target.deliver, dst[1],
                                     data, src)
                return
            if nat.behavior.udp_blocked:
                counters["drop_udp_blocked"] += 1
                return
            ttl -= 1
            if ttl <= 0:
                counters["drop_ttl"] += 1
                return
            nat.outbound6(src, dst, now)
            latency += nat.link.latency
            if self._lost(nat.link):
                counters["drop_loss"] += 1
                return
        elif self._lost(host.link):
            counters["drop_loss"] += 1
            return
        ttl -= self.core_hops
        if ttl <= 0:
            counters["drop_ttl"] += 1
            return
        if target is None:
            counters["drop_no_such_host"] += 1
            return
        far = target.nat
        hop = target.link if far is None else far.link
        if self._lost(hop):
            counters["drop_loss"] += 1
            return
        latency += hop.latency + (target.link.latency if far is not None else 0.0)
        self.clock.callLater(latency, self._arrive6, target, src, dst[1], data, ttl)

    def _arrive6(self, target: Host, src: Addr, port: int, data: bytes, ttl: int) -> None:
        nat = target.nat
        if nat is not None:
            assert target.ip6 is not None
            if nat.behavior.udp_blocked:
                self.counters["drop_udp_blocked"] += 1
                return
            if not nat.inbound6((target.ip6, port), src, self.clock.seconds()):
                self.counters["drop_filtered"] += 1
                return
            if ttl <= 1:
                self.counters["drop_ttl"] += 1
                return
        target.deliver(port, data, src)

    def _arrive(self, target: Host | NAT, src: Addr, port: int, data: bytes,
                ttl: int = DEFAULT_TTL) -> None:
        if isinstance(target, Host):
            target.deliver(port, data, src)
            return
        if target.behavior.udp_blocked:
            self.counters["drop_udp_blocked"] += 1
            return
        internal = target.inbound(port, src, self.clock.seconds())
        if internal is None:
            self.counters["drop_filtered"] += 1
            target.note_unsolicited(src, port, self.clock.seconds())
            return
        if ttl <= 1:  # the router cannot forward it into its LAN
            self.counters["drop_ttl"] += 1
            return
        host = target.hosts.get(internal[0])
        if host is None:
            self.counters["drop_no_such_host"] += 1
            return
        host.deliver(internal[1], data, src)

    # -- running --------------------------------------------------------------

    def run(self, duration: float, until: Callable[[], bool] | None = None) -> bool:
        """
        Advance the clock by C{duration} seconds, event by event.  With
        C{until}, stop at the first event after which it is true, and
        return True; otherwise return False at the end of the duration.
        """
        clock = self.clock
        end = clock.seconds() + duration
        calls = clock.calls
        if until is not None and until():
            return True
        while calls:
            when = calls[0].getTime()
            if when > end:
                break
            # Jump exactly to the event's time: adding differences would
            # accumulate rounding and could leave the event just out of reach.
            if when > clock.rightNow:
                clock.rightNow = when
            clock.advance(0)
            if until is not None and until():
                return True
        if end > clock.seconds():
            clock.advance(end - clock.seconds())
        return until is not None and until()
