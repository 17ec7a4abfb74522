"""
Names instead of IPs, in memory: the names derived from the maps, the
resolver's answers (A, PTR, NXDOMAIN, REFUSED), the server's replies,
listening on the overlay addresses, and systemd-resolved told and untold.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer
from twisted.names import dns, error
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twistvpn.common.dnsname import check_domain, default_domain, dns_label
from twistvpn.interfaces import INameService
from twistvpn.node import names as names_module
from twistvpn.node.names import (
    NameService,
    OverlayResolver,
    ResolvedLink,
    member_labels,
    name_table,
    reverse_zone,
)
from twistvpn.rendezvous.netmap import Member, NetworkMap


def member(node_id: str, name: str, ip: str) -> Member:
    return Member(node_id=node_id, public_key=node_id.encode().ljust(32, b"k"), name=name, ip=ip)


HOME = NetworkMap("8f3a5c0d9e1b2a47", "Home Lab", "100.64.0.0/24", 1, (
    member("aaaaaaaaaa", "GPU Server", "100.64.0.2"),
    member("bbbbbbbbbb", "laptop", "100.64.0.1"),
    member("0000000000", "laptop", "100.64.0.3"),
    member("cccccccccc", "###", "100.64.0.4"),
))
WORK = NetworkMap("0123456789abcdef", "work", "100.64.1.0/24", 1, (
    member("bbbbbbbbbb", "laptop", "100.64.1.7"),
), domain="corp.example")


class LabelTests(SynchronousTestCase):
    def test_dns_label(self) -> None:
        for name, label in [("GPU Server", "gpu-server"), ("Lab GPU #2", "lab-gpu-2"),
                            ("--x--", "x"), ("ünïcode", "n-code"), ("###", ""),
                            ("a" * 80, "a" * 63), ("a" * 62 + "-b", "a" * 62)]:
            self.assertEqual(dns_label(name), label, name)

    def test_clashing_names_are_distinct_and_stable(self) -> None:
        labels = member_labels(HOME.members)
        by_id = {m.node_id: labels[m.public_key] for m in HOME.members}
        # The lowest node ID keeps the bare name, whatever the order in the map.
        self.assertEqual(by_id, {"aaaaaaaaaa": "gpu-server", "0000000000": "laptop",
                                 "bbbbbbbbbb": "laptop-bbbbbbbbbb", "cccccccccc": "cccccccccc"})
        reordered = member_labels(reversed(HOME.members))
        self.assertEqual(reordered, labels)

    def test_domains(self) -> None:
        self.assertEqual(default_domain("Home Lab", "8f3a5c0d9e1b2a47"),
                         "home-lab.twistvpn.internal")
        self.assertEqual(default_domain("###", "8f3a5c0d9e1b2a47"),
                         "8f3a5c0d9e1b2a47.twistvpn.internal")
        self.assertEqual(check_domain("Corp.Example."), "corp.example")
        for bad in ["", "a..b", "-a.b", "a_b.c", "x" * 64 + ".com", "1.0.100.in-addr.arpa"]:
            self.assertRaises(ValueError, check_domain, bad)

    def test_reverse_zone(self) -> None:
        self.assertEqual(reverse_zone("100.64.1.0/24"), "1.64.100.in-addr.arpa")
        self.assertEqual(reverse_zone("100.64.0.0/10"), "100.in-addr.arpa")


class ResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resolver = OverlayResolver(name_table({HOME.network_id: HOME,
                                                    WORK.network_id: WORK}))

    def answers(self, d: defer.Deferred) -> list[str]:
        answers, authority, additional = self.successResultOf(d)
        return [str(a.payload.dottedQuad() if a.type == dns.A else a.payload.name)
                for a in answers]

    def test_a_records(self) -> None:
        r = self.resolver
        self.assertEqual(self.answers(r.lookupAddress("gpu-server.home-lab.twistvpn.internal")),
                         ["100.64.0.2"])
        self.assertEqual(self.answers(r.lookupAddress("GPU-Server.Home-Lab.twistvpn.internal.")),
                         ["100.64.0.2"])
        self.assertEqual(self.answers(r.lookupAddress("laptop.corp.example")), ["100.64.1.7"])
        self.assertEqual(self.answers(r.lookupAddress("laptop-bbbbbbbbbb.home-lab."
                                                      "twistvpn.internal")), ["100.64.0.1"])
        answers, _, _ = self.successResultOf(
            r.lookupAddress("laptop.corp.example"))
        self.assertTrue(answers[0].auth)
        self.assertEqual(answers[0].ttl, 10)

    def test_ptr(self) -> None:
        self.assertEqual(self.answers(self.resolver.lookupPointer("2.0.64.100.in-addr.arpa")),
                         ["gpu-server.home-lab.twistvpn.internal"])
        self.failureResultOf(self.resolver.lookupPointer("99.0.64.100.in-addr.arpa"),
                             error.AuthoritativeDomainError)

    def test_no_such_name_and_no_such_record(self) -> None:
        self.failureResultOf(
            self.resolver.lookupAddress("nobody.home-lab.twistvpn.internal"),
            error.AuthoritativeDomainError)
        # The domain exists, without an address: an empty answer, not NXDOMAIN.
        self.assertEqual(self.answers(self.resolver.lookupAddress("corp.example")), [])
        self.assertEqual(self.answers(self.resolver.lookupMailExchange("laptop.corp.example")),
                         [])

    def test_aaaa_and_ip6_ptr(self) -> None:
        """Every member also answers in its network's IPv6 (ULA) prefix."""
        answers, _, _ = self.successResultOf(
            self.resolver.lookupIPV6Address("laptop.corp.example"))
        expected = WORK.ip6(WORK.members[0])
        self.assertEqual([a.payload._address for a in answers],
                         [expected])
        reverse = ipaddress.ip_address(expected).reverse_pointer
        self.assertEqual(self.answers(self.resolver.lookupPointer(reverse)),
                         ["laptop.corp.example"])
        self.failureResultOf(self.resolver.lookupPointer(
            ipaddress.ip_address("fd00::1").reverse_pointer), error.DNSQueryRefusedError)

    def test_other_names_refused(self) -> None:
        for name in ["example.org", "twistvpn.internal", "other.twistvpn.internal",
                     "1.1.168.192.in-addr.arpa", "x.example"]:
            self.failureResultOf(self.resolver.lookupAddress(name), error.DNSQueryRefusedError)
        self.failureResultOf(self.resolver.lookupPointer("1.1.168.192.in-addr.arpa"),
                             error.DNSQueryRefusedError)


class FakeProtocol:
    def __init__(self) -> None:
        self.sent: list[dns.Message] = []

    def writeMessage(self, message: dns.Message, address: Any = None) -> None:
        self.sent.append(message)


class Port:
    def __init__(self, ports: list[tuple[int, str]], entry: tuple[int, str]) -> None:
        self.ports, self.entry = ports, entry

    def stopListening(self) -> None:
        self.ports.remove(self.entry)


class ListeningReactor:
    """Records what is listened on, and stops it."""

    def __init__(self) -> None:
        self.udpServers: list[tuple[int, str]] = []
        self.tcpServers: list[tuple[int, str]] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "") -> Port:
        self.udpServers.append((port, interface))
        return Port(self.udpServers, (port, interface))

    def listenTCP(self, port: int, factory: Any, interface: str = "") -> Port:
        self.tcpServers.append((port, interface))
        return Port(self.tcpServers, (port, interface))


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ListeningReactor()
        self.commands: list[list[str]] = []

        def run(argv: list[str]) -> defer.Deferred:
            self.commands.append(argv)
            return defer.succeed((b"", b"", 0))

        self.patch(names_module, "same_network_namespace_as_init", lambda: True)
        self.resolved = ResolvedLink(run, resolvectl="/usr/bin/resolvectl", run_dir="/")
        self.names = NameService(self.reactor, "twvpn0", port=53, resolved=self.resolved)

    def ask(self, name: str, type: int = dns.A) -> dns.Message:
        protocol = FakeProtocol()
        query = dns.Message(id=7, recDes=True)
        query.addQuery(name.encode(), type)
        self.names.factory.messageReceived(query, protocol, ("100.64.0.9", 5353))
        [reply] = protocol.sent
        return reply

    def test_interface(self) -> None:
        verifyObject(INameService, self.names)

    def test_server_replies(self) -> None:
        self.names.update(name_table({HOME.network_id: HOME}), ["100.64.0.1/32"])
        reply = self.ask("gpu-server.home-lab.twistvpn.internal")
        self.assertEqual((reply.rCode, reply.auth, reply.id), (dns.OK, True, 7))
        self.assertEqual([a.payload.dottedQuad() for a in reply.answers], ["100.64.0.2"])
        self.assertEqual(self.ask("nobody.home-lab.twistvpn.internal").rCode, dns.ENAME)
        self.assertEqual(self.ask("example.org").rCode, dns.EREFUSED)

    def test_listens_on_overlay_addresses_and_tells_resolved(self) -> None:
        table = name_table({HOME.network_id: HOME, WORK.network_id: WORK})
        self.names.update(table, ["100.64.0.1/32", "100.64.1.7/32"])
        self.assertEqual(self.reactor.udpServers, [(53, "100.64.0.1"), (53, "100.64.1.7")])
        self.assertEqual(self.reactor.tcpServers, [(53, "100.64.0.1"), (53, "100.64.1.7")])
        self.assertEqual(self.commands, [
            ["/usr/bin/resolvectl", "dns", "twvpn0", "100.64.0.1", "100.64.1.7"],
            # In network ID order, as every node derives them.
            ["/usr/bin/resolvectl", "domain", "twvpn0", "~corp.example",
             "~home-lab.twistvpn.internal", "~1.64.100.in-addr.arpa",
             f"~{reverse_zone(WORK.subnet6)}", "~0.64.100.in-addr.arpa",
             f"~{reverse_zone(HOME.subnet6)}"]])
        # The same again: nothing to tell.
        self.names.update(table, ["100.64.0.1/32", "100.64.1.7/32"])
        self.assertEqual(len(self.commands), 2)
        # One network left: its address is no longer listened on.
        self.names.update(name_table({HOME.network_id: HOME}), ["100.64.0.1/32"])
        self.assertEqual(sorted(self.names.listening), ["100.64.0.1"])
        self.assertEqual(self.reactor.udpServers, [(53, "100.64.0.1")])
        self.assertEqual(self.commands[-2][3:], ["100.64.0.1"])
        self.successResultOf(self.names.stop())
        self.assertEqual(self.commands[-1], ["/usr/bin/resolvectl", "revert", "twvpn0"])
        self.assertEqual(self.names.listening, {})

    def test_without_resolved(self) -> None:
        """Not running, or in another network namespace: resolved is not told."""

        def refuse(argv: list[str]) -> defer.Deferred:
            raise AssertionError(argv)

        not_running = ResolvedLink(refuse, resolvectl="/usr/bin/resolvectl",
                                   run_dir="/nonexistent")
        self.patch(names_module, "same_network_namespace_as_init", lambda: False)
        elsewhere = ResolvedLink(refuse, resolvectl="/usr/bin/resolvectl", run_dir="/")
        for resolved in (not_running, elsewhere):
            self.assertFalse(resolved.available)
            names = NameService(self.reactor, "twvpn0", resolved=resolved)
            names.update(name_table({HOME.network_id: HOME}), ["100.64.0.1/32"])
            self.assertEqual(len(self.reactor.udpServers), 1)
            self.successResultOf(names.stop())
            self.assertEqual(self.reactor.udpServers, [])
