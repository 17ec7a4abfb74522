"""
The simulated NAT network: RFC 4787 behaviours, presets, the fake reactor.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.interfaces import IReactorTime, IReactorUDP, IUDPTransport
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twistvpn.testing import natsim
from twistvpn.testing.natsim import (
    ADF,
    ADM,
    APDF,
    APDM,
    EIF,
    EIM,
    PRESERVE,
    RANDOM,
    SEQUENTIAL,
    Internet,
    NATBehavior,
)

PORTS = (PRESERVE, SEQUENTIAL, RANDOM)


class Recorder(DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []

    def datagramReceived(self, data, addr):
        self.received.append((data, addr))


class Echo(DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


class World:
    """A host behind a NAT, two public servers with two ports each."""

    def __init__(self, preset: str | NATBehavior, seed: int = 0, **changes) -> None:
        self.net = Internet(seed=seed)
        self.s1 = self.net.add_public_host()
        self.s2 = self.net.add_public_host()
        self.nat = self.net.add_nat(preset, **changes)
        self.client = self.net.add_host(self.nat)
        self.inbox = Recorder()
        self.cport = self.client.reactor.listenUDP(5000, self.inbox)
        self.servers = {}
        for host in (self.s1, self.s2):
            for port in (1000, 2000):
                rec = Recorder()
                self.servers[(host.ip, port)] = (rec, host.reactor.listenUDP(port, rec))

    def out(self, dst: tuple[str, int], data: bytes = b"x") -> tuple[str, int]:
        """Send from the client; return the source the server saw."""
        rec, _ = self.servers[dst]
        before = len(rec.received)
        self.cport.write(data, dst)
        self.net.run(1.0)
        self.check(len(rec.received) == before + 1, "datagram did not arrive")
        return rec.received[-1][1]

    def back(self, server: tuple[str, int], to: tuple[str, int]) -> bool:
        """Send from a server to the client's mapped address; did it arrive?"""
        _, port = self.servers[server]
        before = len(self.inbox.received)
        port.write(b"in", to)
        self.net.run(1.0)
        return len(self.inbox.received) == before + 1

    @staticmethod
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise AssertionError(message)


class MappingTests(SynchronousTestCase):
    def test_endpoint_independent(self) -> None:
        w = World(NATBehavior(EIM, APDF))
        a = w.out((w.s1.ip, 1000))
        self.assertEqual(a, w.out((w.s2.ip, 2000)))
        self.assertEqual(a[0], w.nat.public_ip)

    def test_address_dependent(self) -> None:
        w = World(NATBehavior(ADM, APDF, natsim.RANDOM))
        a = w.out((w.s1.ip, 1000))
        self.assertEqual(a, w.out((w.s1.ip, 2000)))
        self.assertNotEqual(a, w.out((w.s2.ip, 1000)))

    def test_address_and_port_dependent(self) -> None:
        w = World("hard")
        a = w.out((w.s1.ip, 1000))
        self.assertNotEqual(a, w.out((w.s1.ip, 2000)))
        self.assertEqual(a, w.out((w.s1.ip, 1000)))

    def test_port_preserving(self) -> None:
        w = World("easy")
        self.assertEqual(w.out((w.s1.ip, 1000))[1], 5000)

    def test_sequential_ports(self) -> None:
        w = World("hard-sequential")
        ports = [w.out(dst)[1] for dst in sorted(w.servers)]
        self.assertEqual([p - ports[0] for p in ports], [0, 1, 2, 3])

    def test_random_ports_depend_on_seed_only(self) -> None:
        def port(seed: int) -> int:
            w = World("hard", seed=seed)
            return w.out((w.s1.ip, 1000))[1]

        self.assertEqual(port(5), port(5))
        self.assertNotEqual(port(5), port(6))


class FilteringTests(SynchronousTestCase):
    def test_endpoint_independent_filtering(self) -> None:
        w = World(NATBehavior(EIM, EIF))
        mapped = w.out((w.s1.ip, 1000))
        self.assertTrue(w.back((w.s2.ip, 2000), mapped))

    def test_address_dependent_filtering(self) -> None:
        w = World("easyaf")
        mapped = w.out((w.s1.ip, 1000))
        self.assertTrue(w.back((w.s1.ip, 2000), mapped))
        self.assertFalse(w.back((w.s2.ip, 1000), mapped))

    def test_address_and_port_dependent_filtering(self) -> None:
        w = World("easy")
        mapped = w.out((w.s1.ip, 1000))
        self.assertTrue(w.back((w.s1.ip, 1000), mapped))
        self.assertFalse(w.back((w.s1.ip, 2000), mapped))
        self.assertEqual(w.net.counters["drop_filtered"], 1)

    def test_unsolicited_is_dropped(self) -> None:
        w = World("easyaf")
        self.assertFalse(w.back((w.s1.ip, 1000), (w.nat.public_ip, 5000)))

    def test_udp_blocked(self) -> None:
        w = World("udpblock")
        w.cport.write(b"x", (w.s1.ip, 1000))
        w.net.run(1.0)
        self.assertEqual(w.servers[(w.s1.ip, 1000)][0].received, [])
        self.assertEqual(w.net.counters["drop_udp_blocked"], 1)

    def test_static_port_forward(self) -> None:
        w = World("hard")
        w.nat.forward_port(51820, (w.client.ip, 5000))
        self.assertTrue(w.back((w.s2.ip, 2000), (w.nat.public_ip, 51820)))


class ConntrackClashTests(SynchronousTestCase):
    """
    A router without a firewall on itself keeps an unsolicited packet's
    connection-tracking entry; its host's packets to that sender then leave
    from another port (Linux's NAT avoids the clash), as docs/lab.md shows.
    """

    def test_clash_without_the_firewall(self) -> None:
        w = World("easynf")
        mapped = w.out((w.s1.ip, 1000))
        self.assertEqual(mapped[1], 5000)  # port preserved
        # s2 knocks first on the port our host will use towards it...
        self.assertFalse(w.back((w.s2.ip, 2000), mapped))
        # ...so our host's flow to s2 gets another port (and its answers come back there).
        other = w.out((w.s2.ip, 2000))
        self.assertNotEqual(other[1], 5000)
        self.assertTrue(w.back((w.s2.ip, 2000), other))
        # Other destinations keep the preserved port.
        self.assertEqual(w.out((w.s1.ip, 2000)), mapped)

    def test_no_clash_with_the_firewall(self) -> None:
        w = World("easy")
        mapped = w.out((w.s1.ip, 1000))
        self.assertFalse(w.back((w.s2.ip, 2000), mapped))
        self.assertEqual(w.out((w.s2.ip, 2000)), mapped)

    def test_entry_expires(self) -> None:
        w = World("easynf")
        mapped = w.out((w.s1.ip, 1000))
        w.back((w.s2.ip, 2000), mapped)
        w.net.run(31)
        self.assertEqual(w.out((w.s1.ip, 1000)), mapped)  # the mapping lives on
        self.assertEqual(w.out((w.s2.ip, 2000)), mapped)


class TimeToLiveTests(SynchronousTestCase):
    """
    Openers: the sender's router takes one hop, the core one more (as the
    lab's core router), the receiving router one to forward into its LAN.
    """

    def test_one_hop_dies_at_our_router_unmapped(self) -> None:
        w = World("easy")
        w.cport.write_hop_limited(b"x", (w.s1.ip, 1000), 1)
        w.net.run(1.0)
        self.assertEqual(w.nat.mappings(w.net.clock.seconds()), {})
        self.assertEqual(w.net.counters["drop_ttl"], 1)

    def test_two_hops_map_and_die_in_the_core(self) -> None:
        w = World("easy")
        w.cport.write_hop_limited(b"x", (w.s1.ip, 1000), 2)
        w.net.run(1.0)
        self.assertEqual(w.servers[(w.s1.ip, 1000)][0].received, [])
        self.assertEqual(w.net.counters["drop_ttl"], 1)
        self.assertEqual(list(w.nat.mappings(w.net.clock.seconds()).values()),
                         [(w.client.ip, 5000)])
        # The mapping it made lets the server's answer in.
        self.assertTrue(w.back((w.s1.ip, 1000), (w.nat.public_ip, 5000)))

    def test_three_hops_arrive(self) -> None:
        w = World("easy")
        w.cport.write_hop_limited(b"x", (w.s1.ip, 1000), 3)
        w.net.run(1.0)
        self.assertEqual(len(w.servers[(w.s1.ip, 1000)][0].received), 1)

    def test_an_opener_prevents_the_clash(self) -> None:
        """Our mapping is open before the peer's packet comes: no clash."""
        w = World("easynf")
        w.cport.write_hop_limited(b"x", (w.s2.ip, 2000), 2)
        w.net.run(1.0)
        self.assertTrue(w.back((w.s2.ip, 2000), (w.nat.public_ip, 5000)))
        self.assertEqual(w.out((w.s2.ip, 2000)), (w.nat.public_ip, 5000))

    def test_last_hop_into_a_lan(self) -> None:
        """A packet with one hop left reaches the router, not the host behind it."""
        net = Internet(core_hops=1)
        server = net.add_public_host()
        nat = net.add_nat("easy")
        client = net.add_host(nat)
        inbox = Recorder()
        cport = client.reactor.listenUDP(5000, inbox)
        sport = server.reactor.listenUDP(1000, Recorder())
        cport.write(b"open", (server.ip, 1000))
        sport.write_hop_limited(b"in", (nat.public_ip, 5000), 2)
        net.run(1.0)
        self.assertEqual(inbox.received, [])
        sport.write_hop_limited(b"in", (nat.public_ip, 5000), 3)
        net.run(1.0)
        self.assertEqual(len(inbox.received), 1)


class TimeoutTests(SynchronousTestCase):
    def test_mapping_expires_without_outbound_traffic(self) -> None:
        w = World("easy", timeout=30.0)
        mapped = w.out((w.s1.ip, 1000))
        # out() and back() each run one second: the mapping was made at 0.
        w.net.run(27.0)
        self.assertTrue(w.back((w.s1.ip, 1000), mapped))
        # Inbound traffic does not refresh the mapping (RFC 4787 REQ-6 is
        # about outbound).
        w.net.run(1.5)
        self.assertFalse(w.back((w.s1.ip, 1000), mapped))

    def test_outbound_refreshes(self) -> None:
        w = World("easy", timeout=30.0)
        mapped = w.out((w.s1.ip, 1000))
        for _ in range(5):
            w.net.run(20.0)
            w.out((w.s1.ip, 1000))
        self.assertTrue(w.back((w.s1.ip, 1000), mapped))

    def test_reboot_flushes(self) -> None:
        w = World("easy")
        mapped = w.out((w.s1.ip, 1000))
        w.nat.reboot()
        self.assertEqual(w.nat.mappings(w.net.clock.seconds()), {})
        self.assertFalse(w.back((w.s1.ip, 1000), mapped))


class TopologyTests(SynchronousTestCase):
    def _two_behind_one(self, hairpin: bool):
        net = Internet(seed=1)
        server = net.add_public_host()
        nat = net.add_nat("easy", hairpin=hairpin)
        a, b = net.add_host(nat), net.add_host(nat)
        ra, rb = Recorder(), Recorder()
        pa = a.reactor.listenUDP(4000, ra)
        pb = b.reactor.listenUDP(4000, rb)
        srv = Recorder()
        server.reactor.listenUDP(3478, srv)
        pa.write(b"a", (server.ip, 3478))
        pb.write(b"b", (server.ip, 3478))
        net.run(1.0)
        mapped = {data: addr for data, addr in srv.received}
        return net, a, b, pa, pb, ra, rb, mapped

    def test_lan_delivery(self) -> None:
        net, a, b, pa, pb, ra, rb, _ = self._two_behind_one(False)
        pa.write(b"hi", (b.ip, 4000))
        net.run(0.1)
        self.assertEqual(rb.received, [(b"hi", (a.ip, 4000))])

    def test_hairpin(self) -> None:
        net, a, b, pa, pb, ra, rb, mapped = self._two_behind_one(True)
        # b must have sent to a's mapping first: the NAT filters (APDF).
        pb.write(b"open", mapped[b"a"])
        pa.write(b"hi", mapped[b"b"])
        net.run(0.1)
        self.assertIn((b"hi", mapped[b"a"]), rb.received)

    def test_no_hairpin(self) -> None:
        net, a, b, pa, pb, ra, rb, mapped = self._two_behind_one(False)
        pa.write(b"hi", mapped[b"b"])
        net.run(0.1)
        self.assertEqual(rb.received, [])
        self.assertEqual(net.counters["drop_no_hairpin"], 1)

    def test_private_destination_elsewhere_is_unroutable(self) -> None:
        w = World("easy")
        w.cport.write(b"x", ("192.168.77.5", 1))
        w.net.run(1.0)
        self.assertEqual(w.net.counters["drop_unroutable"], 1)
        self.assertEqual(w.nat.mappings(w.net.clock.seconds()), {})


class LinkTests(SynchronousTestCase):
    def _lossy(self, seed: int) -> list[bytes]:
        net = Internet(seed=seed)
        a = net.add_public_host(latency=0.02, loss=0.3)
        b = net.add_public_host(latency=0.03)
        rec = Recorder()
        b.reactor.listenUDP(9, rec)
        port = a.reactor.listenUDP(0, Recorder())
        for i in range(100):
            port.write(b"%d" % i, (b.ip, 9))
        net.run(0.049)
        self.assertEqual(rec.received, [])
        net.run(0.002)
        return [d for d, _ in rec.received]

    def test_latency_and_seeded_loss(self) -> None:
        first = self._lossy(3)
        self.assertEqual(first, self._lossy(3))
        self.assertNotEqual(first, self._lossy(4))
        self.assertTrue(50 < len(first) < 90, len(first))

    def test_run_until(self) -> None:
        net = Internet()
        fired = []
        net.clock.callLater(5.0, fired.append, 1)
        net.clock.callLater(50.0, fired.append, 2)
        self.assertTrue(net.run(100.0, until=lambda: bool(fired)))
        self.assertEqual(net.clock.seconds(), 5.0)
        self.assertFalse(net.run(10.0))
        self.assertEqual(net.clock.seconds(), 15.0)


class ReactorTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        net = Internet()
        host = net.add_public_host()
        verifyObject(IReactorUDP, host.reactor)
        verifyObject(IReactorTime, host.reactor)
        verifyObject(IUDPTransport, host.reactor.listenUDP(0, Recorder()))

    def test_any_datagram_protocol(self) -> None:
        net = Internet()
        server = net.add_public_host()
        server.reactor.listenUDP(7, Echo())
        client = net.add_host(net.add_nat("hard"))
        rec = Recorder()
        port = client.reactor.listenUDP(0, rec)
        port.write(b"ping", (server.ip, 7))
        net.run(1.0)
        self.assertEqual(rec.received, [(b"ping", (server.ip, 7))])
        self.assertEqual(port.getHost().host, client.ip)

    def test_bind_conflict_and_close(self) -> None:
        host = Internet().add_public_host()
        port = host.reactor.listenUDP(1234, Recorder())
        self.assertRaises(OSError, host.reactor.listenUDP, 1234, Recorder())
        port.stopListening()
        self.assertRaises(OSError, port.write, b"x", ("203.0.113.9", 1))
        host.reactor.listenUDP(1234, Recorder())

    def test_bad_preset(self) -> None:
        self.assertRaises(ValueError, Internet().add_nat, "nonsense")
        self.assertRaises(ValueError, NATBehavior, mapping="sideways")


class PropertyTests(SynchronousTestCase):
    """RFC 4787's definitions, checked on random traffic."""

    destinations = st.lists(
        st.tuples(st.sampled_from(["203.0.113.50", "203.0.113.51", "198.51.100.7"]),
                  st.sampled_from([1000, 2000, 3000])),
        min_size=1, max_size=12)

    @settings(max_examples=60, deadline=None)
    @given(destinations, st.sampled_from([EIM, ADM, APDM]), st.sampled_from(list(PORTS)))
    def test_mapping(self, sent, mapping, ports) -> None:
        nat = Internet(seed=1).add_nat(NATBehavior(mapping, APDF, ports))
        internal = ("192.168.1.2", 5000)
        external = {dst: nat.outbound(internal, dst, 0.0) for dst in sent}
        key = {EIM: lambda d: None, ADM: lambda d: d[0], APDM: lambda d: d}[mapping]
        groups = {key(d) for d in external}
        self.assertEqual(len(set(external.values())), len(groups))
        for d1, p1 in external.items():
            for d2, p2 in external.items():
                self.assertEqual(p1 == p2, key(d1) == key(d2))

    @settings(max_examples=60, deadline=None)
    @given(destinations, st.tuples(st.sampled_from(["203.0.113.50", "203.0.113.99"]),
                                   st.sampled_from([1000, 4000])),
           st.sampled_from([EIF, ADF, APDF]))
    def test_filtering(self, sent, source, filtering) -> None:
        nat = Internet(seed=1).add_nat(NATBehavior(EIM, filtering))
        internal = ("192.168.1.2", 5000)
        port = 0
        for dst in sent:
            port = nat.outbound(internal, dst, 0.0)
        allowed = {EIF: True, ADF: source[0] in {d[0] for d in sent},
                   APDF: source in sent}[filtering]
        self.assertEqual(nat.inbound(port, source, 1.0) == internal, allowed)
        # After the timeout nothing gets in.
        self.assertIsNone(nat.inbound(port, source, nat.behavior.timeout + 0.1))


class DualStackTests(SynchronousTestCase):
    """IPv6 crosses the routers untranslated, through their stateful firewalls."""

    def setUp(self) -> None:
        self.net = Internet(seed=3)
        self.server = self.net.add_public_host(ipv6=True)
        self.nat = self.net.add_nat("hard", ipv6=True)
        self.client = self.net.add_host(self.nat)
        self.inbox = Recorder()
        self.cport = self.client.reactor.listenUDP(5000, self.inbox)
        self.sinbox = Recorder()
        self.sport = self.server.reactor.listenUDP(1000, self.sinbox)

    def test_addresses(self) -> None:
        self.assertEqual(self.client.ip6, "2001:db8:1::2")
        assert self.server.ip6 is not None
        self.assertTrue(self.server.ip6.startswith("2001:db8::"))
        self.assertIsNone(self.net.add_host(self.net.add_nat("easy")).ip6)

    def test_out_untranslated_and_answers_in(self) -> None:
        assert self.server.ip6 is not None and self.client.ip6 is not None
        self.cport.write(b"out", (self.server.ip6, 1000))
        self.net.run(1.0)
        self.assertEqual(self.sinbox.received, [(b"out", (self.client.ip6, 5000))])
        self.sport.write(b"answer", (self.client.ip6, 5000))
        self.net.run(1.0)
        self.assertEqual(self.inbox.received, [(b"answer", (self.server.ip6, 1000))])

    def test_unsolicited_filtered(self) -> None:
        assert self.server.ip6 is not None and self.client.ip6 is not None
        self.sport.write(b"knock", (self.client.ip6, 5000))
        self.net.run(1.0)
        self.assertEqual(self.inbox.received, [])
        self.assertEqual(self.net.counters["drop_filtered"], 1)
        # Another port of the server is another flow (address and port dependent).
        self.cport.write(b"out", (self.server.ip6, 1000))
        other = self.server.reactor.listenUDP(2000, Recorder())
        other.write(b"other port", (self.client.ip6, 5000))
        self.net.run(1.0)
        self.assertEqual(self.inbox.received, [])

    def test_flows_expire(self) -> None:
        assert self.server.ip6 is not None and self.client.ip6 is not None
        self.cport.write(b"out", (self.server.ip6, 1000))
        self.net.run(31.0)
        self.sport.write(b"late", (self.client.ip6, 5000))
        self.net.run(1.0)
        self.assertEqual(self.inbox.received, [])

    def test_hop_limited_opens_the_firewall_only(self) -> None:
        assert self.server.ip6 is not None and self.client.ip6 is not None
        self.cport.write_hop_limited(b"opener", (self.server.ip6, 1000), 2)
        self.net.run(1.0)
        self.assertEqual(self.sinbox.received, [])
        self.sport.write(b"in", (self.client.ip6, 5000))
        self.net.run(1.0)
        self.assertEqual([d for d, _ in self.inbox.received], [b"in"])

    def test_udp_blocked_blocks_ipv6_too(self) -> None:
        nat = self.net.add_nat("udpblock", ipv6=True)
        host = self.net.add_host(nat)
        port = host.reactor.listenUDP(5000, Recorder())
        assert self.server.ip6 is not None
        port.write(b"x", (self.server.ip6, 1000))
        self.net.run(1.0)
        self.assertEqual(self.sinbox.received, [])

    def test_no_ipv6_is_unreachable(self) -> None:
        host = self.net.add_host(self.net.add_nat("easy"))
        port = host.reactor.listenUDP(5000, Recorder())
        assert self.server.ip6 is not None
        with self.assertRaises(OSError):
            port.write(b"x", (self.server.ip6, 1000))
        self.assertEqual(self.net.counters["drop_no_ipv6"], 1)
