"""
Names instead of IPs: every authorized member answers at
C{LABEL.DOMAIN} (C{gpu-server.home.twistvpn.internal}), served by the
node itself with Twisted Names from the maps it already holds.

L{name_table} derives the names from the maps (a pure function, so every
node derives the same ones); L{OverlayResolver} answers from that table
(A, AAAA, PTR; NXDOMAIN for an unknown name in our domains; REFUSED
outside them, never a wrong answer); L{NameService} listens on the node's
overlay addresses and tells systemd-resolved to send the domains there
(L{ResolvedLink}), undoing it on stop.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns, error, server
from twisted.names.common import ResolverBase
from twisted.python.failure import Failure
from zope.interface import implementer

from twistvpn.common.dnsname import default_domain, dns_label
from twistvpn.interfaces import INameService
from twistvpn.rendezvous.netmap import Member, NetworkMap

DEFAULT_DNS_PORT = 53
TTL = 10  # seconds: a renamed member is answered anew within seconds
RESOLVED_RUN_DIR = "/run/systemd/resolve"


def network_domain(netmap: NetworkMap) -> str:
    return netmap.domain or default_domain(netmap.name, netmap.network_id)


def member_labels(members: Iterable[Member]) -> dict[bytes, str]:
    """
    Each member's label: its name made a DNS label (its node ID when nothing
    is left).  Members whose labels clash are told apart by node ID: the
    lowest keeps the bare label, the others get C{LABEL-NODEID}, so every
    node derives the same names, and a member's name stays as long as its
    clash does.
    """
    groups: dict[str, list[Member]] = {}
    for member in members:
        groups.setdefault(dns_label(member.name) or member.node_id, []).append(member)
    labels = {}
    for label, group in groups.items():
        group.sort(key=lambda m: m.node_id)
        labels[group[0].public_key] = label
        for member in group[1:]:
            labels[member.public_key] = f"{label[:63 - 11]}-{member.node_id}"
    return labels


@functools.lru_cache(maxsize=1 << 15)
def reverse_name(ip: str) -> str:
    """
    C{ip}'s PTR name.  Kept for the members of a network of thousands: the
    name table is made again on every map change, from mostly the same
    addresses (ipaddress's reverse_pointer is 10 µs each).
    """
    return ipaddress.ip_address(ip).reverse_pointer


def reverse_zone(subnet: str) -> str:
    """The in-addr.arpa (or ip6.arpa) zone covering C{subnet}, on an octet (nibble) boundary."""
    net = ipaddress.ip_network(subnet)
    if net.version == 6:
        nibbles = net.network_address.exploded.replace(":", "")[: net.prefixlen // 4]
        return ".".join([*reversed(nibbles), "ip6.arpa"])
    octets = str(net.network_address).split(".")[: net.prefixlen // 8]
    return ".".join([*reversed(octets), "in-addr.arpa"])


@dataclass(frozen=True)
class NameTable:
    """The names the node answers: forward, reverse, and the zones they live in."""

    forward: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    reverse: Mapping[str, str] = field(default_factory=dict)
    domains: tuple[str, ...] = ()  # one per network, forward
    subnets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    by_key: Mapping[bytes, str] = field(default_factory=dict)  # a member's first name

    def zone_of(self, name: str) -> str | None:
        """Which of our zones C{name} is in, or None (not ours: refused)."""
        for domain in self.domains:
            if name == domain or name.endswith("." + domain):
                return domain
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        try:
            if name.endswith(".in-addr.arpa"):
                parts = name[: -len(".in-addr.arpa")].split(".")
                if len(parts) == 4:
                    ip = ipaddress.IPv4Address(".".join(reversed(parts)))
            elif name.endswith(".ip6.arpa"):
                nibbles = name[: -len(".ip6.arpa")].split(".")
                if len(nibbles) == 32 and all(len(n) == 1 for n in nibbles):
                    ip = ipaddress.IPv6Address(int("".join(reversed(nibbles)), 16))
        except ValueError:
            return None
        if ip is not None and any(ip.version == s.version and ip in s for s in self.subnets):
            return "reverse"
        return None


def name_table(maps: Mapping[str, NetworkMap]) -> NameTable:
    """The names of every authorized member of every network, the node's own included."""
    forward: dict[str, list[str]] = {}
    reverse: dict[str, str] = {}
    by_key: dict[bytes, str] = {}
    domains = []
    subnets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for network_id in sorted(maps):
        netmap = maps[network_id]
        domain = network_domain(netmap)
        domains.append(domain)
        subnets += [ipaddress.IPv4Network(netmap.subnet), ipaddress.IPv6Network(netmap.subnet6)]
        labels = member_labels(netmap.members)
        for member in netmap.members:
            name = f"{labels[member.public_key]}.{domain}"
            for ip in (member.ip, netmap.ip6(member)):
                forward.setdefault(name, []).append(ip)
                reverse.setdefault(reverse_name(ip), name)
            by_key.setdefault(member.public_key, name)
    return NameTable({k: tuple(v) for k, v in forward.items()}, reverse,
                     tuple(dict.fromkeys(domains)), tuple(subnets), by_key)


class OverlayResolver(ResolverBase):
    """
    Answers from a L{NameTable} (swapped whole when the maps change):
    authoritative for the networks' domains and their reverse zones.
    """

    def __init__(self, table: NameTable | None = None) -> None:
        super().__init__()
        self.table = table or NameTable()

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred:
        text = name.decode("ascii", "replace").lower().rstrip(".")
        table = self.table
        if cls != dns.IN or table.zone_of(text) is None:
            return defer.fail(error.DNSQueryRefusedError(text))
        answers = []
        ips = table.forward.get(text, ())
        for ip in ips:
            version = ipaddress.ip_address(ip).version
            if version == 4 and type in (dns.A, dns.ALL_RECORDS):
                answers.append(dns.RRHeader(name, dns.A, dns.IN, TTL,
                                            dns.Record_A(ip, TTL), auth=True))
            elif version == 6 and type in (dns.AAAA, dns.ALL_RECORDS):
                answers.append(dns.RRHeader(name, dns.AAAA, dns.IN, TTL,
                                            dns.Record_AAAA(ip, TTL), auth=True))
        target = table.reverse.get(text)
        if target is not None and type in (dns.PTR, dns.ALL_RECORDS):
            answers.append(dns.RRHeader(name, dns.PTR, dns.IN, TTL,
                                        dns.Record_PTR(target, TTL), auth=True))
        if answers or ips or target is not None or text in table.domains:
            return defer.succeed((answers, [], []))  # no such record: NOERROR, empty
        return defer.fail(error.AuthoritativeDomainError(text))


class OverlayDNSFactory(server.DNSServerFactory):
    """Twisted's DNS server, answering REFUSED (not SERVFAIL) for names not ours."""

    def gotResolverError(self, failure: Failure, protocol: Any, message: dns.Message,
                         address: Any) -> None:
        if failure.check(error.DNSQueryRefusedError):
            response = self._responseFromMessage(message=message, rCode=dns.EREFUSED)
            self.sendReply(protocol, response, address)
            return
        super().gotResolverError(failure, protocol, message, address)


def same_network_namespace_as_init() -> bool:
    """Whether this process shares PID 1's network namespace (where resolved runs)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return True  # cannot tell (no /proc/1 access): assume the host's


# (argv) -> Deferred firing with (out, err, code)
ProcessRunner = Callable[[list[str]], defer.Deferred]


class ResolvedLink:
    """
    Per-link DNS through systemd-resolved (C{resolvectl}): the node's
    overlay addresses as the link's servers, its domains (and reverse
    zones) as routing domains, so only those names go to the node.
    """

    log = Logger()

    def __init__(self, run: ProcessRunner, *, resolvectl: str | None = None,
                 run_dir: str = RESOLVED_RUN_DIR) -> None:
        self._run = run
        self.resolvectl = resolvectl if resolvectl is not None else shutil.which("resolvectl")
        # In another network namespace (a container, a test's namespace)
        # resolved would take our link index for one of its own.
        self.available = (bool(self.resolvectl) and os.path.isdir(run_dir)
                          and same_network_namespace_as_init())
        self.configured: tuple[str, tuple[str, ...], tuple[str, ...]] | None = None
        self._told_manual = False

    def configure(self, interface: str, servers: tuple[str, ...],
                  domains: tuple[str, ...]) -> defer.Deferred:
        wanted = (interface, servers, domains)
        if wanted == self.configured:
            return defer.succeed(None)
        if not self.available:
            if servers and not self._told_manual:
                self._told_manual = True
                self.log.info(
                    "systemd-resolved is not running: names under {domains} are answered by "
                    "{servers} (port 53); point the system's resolver there for them "
                    "(docs/node.md, \"Names\")", domains=", ".join(domains),
                    servers=", ".join(servers))
            return defer.succeed(None)
        self.configured = wanted
        if not servers:
            return self.revert(interface)
        return self._resolvectl(["dns", interface, *servers]).addCallback(
            lambda _: self._resolvectl(["domain", interface, *("~" + d for d in domains)]))

    def revert(self, interface: str) -> defer.Deferred:
        if not self.available or self.configured is None:
            return defer.succeed(None)
        self.configured = None
        return self._resolvectl(["revert", interface])

    def _resolvectl(self, argv: list[str]) -> defer.Deferred:
        assert self.resolvectl is not None

        def done(result: tuple[bytes, bytes, int]) -> None:
            out, err, code = result
            if code != 0:
                self.log.warn("resolvectl {args} failed: {why}", args=" ".join(argv),
                              why=(err or out).decode("utf-8", "replace").strip())

        def failed(failure: Failure) -> None:
            self.log.warn("resolvectl {args} failed: {why}", args=" ".join(argv),
                          why=failure.getErrorMessage())

        return self._run([self.resolvectl, *argv]).addCallbacks(done, failed)


@implementer(INameService)
class NameService:
    """
    The node's name server: one UDP and one TCP port per overlay address,
    answering from the latest maps; systemd-resolved told where it is.
    """

    log = Logger()

    def __init__(self, reactor: Any, interface: str, *, port: int = DEFAULT_DNS_PORT,
                 resolved: ResolvedLink | None = None) -> None:
        self._reactor = reactor
        self.interface = interface
        self.port = port
        self.resolver = OverlayResolver()
        self.factory = OverlayDNSFactory(authorities=[self.resolver])
        self.resolved = resolved
        self.listening: dict[str, list[Any]] = {}  # address -> its UDP and TCP ports
        self.counters = {"listen_failed": 0}

    def update(self, table: NameTable, addresses: Iterable[str]) -> None:
        """Answer from C{table}; listen on exactly C{addresses}."""
        self.resolver.table = table
        wanted = [a.split("/")[0] for a in addresses]
        for address in [a for a in self.listening if a not in wanted]:
            for port in self.listening.pop(address):
                port.stopListening()
        for address in wanted:
            if address not in self.listening:
                self._listen(address)
        if self.resolved is not None:
            reverse = tuple(dict.fromkeys(reverse_zone(str(s)) for s in table.subnets))
            self.resolved.configure(self.interface, tuple(self.listening),
                                    table.domains + reverse)

    def _listen(self, address: str) -> None:
        try:
            # A protocol per port: a DatagramProtocol has one transport.
            udp = self._reactor.listenUDP(self.port, dns.DNSDatagramProtocol(self.factory),
                                          interface=address)
        except Exception as e:
            self.counters["listen_failed"] += 1
            self.log.warn("cannot answer names on {address} port {port}: {why}",
                          address=address, port=self.port, why=str(e))
            return
        try:
            tcp = self._reactor.listenTCP(self.port, self.factory, interface=address)
        except Exception as e:
            self.log.warn("names on {address}: UDP only ({why})", address=address, why=str(e))
            self.listening[address] = [udp]
            return
        self.listening[address] = [udp, tcp]

    def stop(self) -> defer.Deferred:
        stopped = [defer.maybeDeferred(port.stopListening)
                   for ports in self.listening.values() for port in ports]
        self.listening = {}
        if self.resolved is not None:
            stopped.append(self.resolved.revert(self.interface))
        return defer.gatherResults(stopped, consumeErrors=True)
