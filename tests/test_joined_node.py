"""
Joined mode end to end, in memory: a real rendezvous and relay, joined
nodes on the simulated NAT network (see L{tests.test_joined_support}).
"""

from __future__ import annotations

from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.support.joined import Mesh
from tests.support.logs import LogCatcher
from twistvpn.interfaces import IPathManager, IRendezvousListener
from twistvpn.node.joined import member_candidates, own_candidates
from twistvpn.rendezvous.discovery import NetcheckResult
from twistvpn.rendezvous.netmap import Member, overlay6, overlay6_prefix
from twistvpn.testing.pathsim import ipv4_packet
from twistvpn.traversal.candidates import NatHints


class JoinAndAuthorize(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = LogCatcher(self)
        self.mesh = Mesh(seed=1)
        self.a, self.b = self.mesh.members("easy", "easy", authorize=False)

    def test_listener_interface(self) -> None:
        self.assertTrue(verifyObject(IRendezvousListener, self.a.node))

    def test_pending_until_authorized(self) -> None:
        a, b = self.a, self.b
        self.assertEqual(a.node.join_answers, {self.mesh.network: "pending"})
        self.assertEqual(a.node.peers, {})
        self.assertEqual(a.tun.addresses4, ())
        waiting = self.log.grep(
            f"node {a.client.node_id} is waiting for authorization in network "
            f"{self.mesh.network}")
        self.assertEqual(len(waiting), 1)
        self.mesh.authorize(a)
        # Alone in the network: an address and a route, no peers.
        self.assertEqual(len(a.tun.addresses4), 1)
        self.assertTrue(a.tun.addresses4[0].startswith("100.64."))
        self.assertEqual(a.tun.routes4, [self.mesh.controller.get_network(self.mesh.network)
                                        ["subnet"]])
        self.assertEqual(a.node.peers, {})
        self.mesh.authorize(b)
        self.assertEqual(set(a.node.peers), {b.public_key})
        self.assertEqual(set(b.node.peers), {a.public_key})
        # Its IPv4 address, and its IPv6 one in the network's ULA prefix.
        b6 = overlay6(self.mesh.network, b.client.node_id)
        self.assertEqual(a.peer(b).wg.allowed_ips, (f"{b.ip}/32", f"{b6}/128"))
        self.assertEqual(a.tun.routes6, [overlay6_prefix(self.mesh.network)])
        self.assertEqual(a.tun.addresses6,
                         (f"{overlay6(self.mesh.network, a.client.node_id)}/128",))
        self.assertTrue(verifyObject(IPathManager, a.peer(b).manager))

    def test_packet_crosses(self) -> None:
        a, b = self.a, self.b
        self.mesh.authorize(a, b)
        self.assertTrue(self.mesh.delivered(a, b, b"hello beta"))
        self.assertTrue(self.mesh.delivered(b, a, b"hello alpha"))
        self.assertTrue(self.mesh.run(10, until=lambda: a.peer(b).manager.kind == "direct"))
        self.assertTrue(self.log.grep("peer beta path direct"))


class FirstPacket(SynchronousTestCase):
    """
    A packet sent the moment the peers appear, before any path is known
    (as the lab's pings right after authorization): its handshake goes out
    on the first path verified, not REKEY_TIMEOUT later.
    """

    def first_packet(self, *presets: str) -> None:
        mesh = Mesh(seed=9)
        if presets[0] == "same-nat":
            hosts = mesh.internet.add_pair("same-nat", presets[1])
            a, b = mesh.add("alpha", hosts[0]), mesh.add("beta", hosts[1])
        else:
            a, b = mesh.members(*presets, authorize=False)
        for node in (a, b):
            mesh.controller.authorize(mesh.network, node.client.node_id)
        self.assertTrue(mesh.run(1.0, until=lambda: b.public_key in a.node.peers
                                 and a.public_key in b.node.peers))
        started = mesh.clock.seconds()
        self.assertIsNone(a.peer(b).wg.endpoint)  # nothing verified yet
        to_b, to_a = a.send_to(b, b"at once"), b.send_to(a, b"at once too")
        self.assertTrue(mesh.run(4.0, until=lambda: to_b in b.tun.written
                                 and to_a in a.tun.written))
        self.assertLess(mesh.clock.seconds() - started, 1.0)
        self.assertEqual(a.device.counters["handshake_retransmit"], 0)
        self.assertEqual(b.device.counters["handshake_retransmit"], 0)

    def test_direct(self) -> None:
        self.first_packet("easy", "easy")

    def test_lan(self) -> None:
        self.first_packet("same-nat", "easy")


class Paths(SynchronousTestCase):
    """Which path the joined nodes settle on, by NAT pair."""

    def pair(self, a: str, b: str, seed: int = 2) -> tuple:
        mesh = Mesh(seed=seed)
        net = mesh.internet
        if a == "same-nat":
            hosts = net.add_pair("same-nat", b)
        else:
            hosts = (net.add(a), net.add(b))
        x = mesh.add("x", hosts[0])
        y = mesh.add("y", hosts[1])
        mesh.authorize(x, y)
        return mesh, x, y

    def settle(self, mesh: Mesh, x, y, kind: str) -> None:
        self.assertTrue(mesh.run(20, until=lambda: x.peer(y).manager.kind == kind
                                 and y.peer(x).manager.kind == kind),
                        (x.peer(y).manager.kind, y.peer(x).manager.kind))
        self.assertTrue(mesh.delivered(x, y, b"over " + kind.encode()))
        self.assertTrue(mesh.delivered(y, x, b"and back"))

    def test_easy_easy_direct(self) -> None:
        mesh, x, y = self.pair("easy", "easy")
        self.settle(mesh, x, y, "direct")
        nat_ip = y.host.nat.public_ip
        self.assertEqual(x.peer(y).wg.endpoint[0], nat_ip)

    def test_same_nat_lan(self) -> None:
        mesh, x, y = self.pair("same-nat", "easy")
        self.settle(mesh, x, y, "lan")
        self.assertEqual(x.peer(y).wg.endpoint, (y.host.ip, 41641))

    def test_hard_hard_relay(self) -> None:
        mesh, x, y = self.pair("hard", "hard")
        relayed = mesh.relay_server.traffic.relayed_packets
        self.settle(mesh, x, y, "relay")
        self.assertGreaterEqual(mesh.relay_server.traffic.relayed_packets, relayed + 2)
        # The map said both NATs vary their mapping by destination.
        netmap = x.client.maps[mesh.network]
        self.assertTrue(netmap.member(y.public_key).nat_varies)
        self.assertTrue(x.node.local.hints.mapping_varies)


class LiveChanges(SynchronousTestCase):
    """Map updates, deauthorizations and a lost rendezvous, while traffic flows."""

    def setUp(self) -> None:
        self.log = LogCatcher(self)
        self.mesh = Mesh(seed=3)
        self.a, self.b = self.mesh.members("easy", "easyaf")
        self.assertTrue(self.mesh.delivered(self.a, self.b, b"warm up"))

    def test_new_member_added_live(self) -> None:
        c = self.mesh.add("gamma", self.mesh.internet.add("easy"))
        self.assertEqual(set(self.a.node.peers), {self.b.public_key})
        self.mesh.authorize(c)
        self.assertEqual(set(self.a.node.peers), {self.b.public_key, c.public_key})
        self.assertTrue(self.mesh.delivered(c, self.a, b"hi alpha, gamma here"))
        self.assertTrue(self.log.grep("peer gamma added"))

    def test_deauthorized_peer_dropped_at_once(self) -> None:
        a, b = self.a, self.b
        b_ip = b.ip
        self.mesh.controller.deauthorize(self.mesh.network, b.client.node_id)
        self.mesh.run(0.2)
        self.assertNotIn(b.public_key, a.node.peers)
        self.assertIsNone(a.device.get_peer(b.public_key))
        self.assertTrue(self.log.grep("peer beta removed"))
        # Nothing of a's reaches b any more: a has no peer for b's address.
        packet = ipv4_packet(a.ip, b_ip, b"after deauth")
        dropped = a.device.counters["drop_no_route"]
        a.tun.inject(packet)
        self.mesh.run(2)
        self.assertNotIn(packet, b.tun.written)
        self.assertEqual(a.device.counters["drop_no_route"], dropped + 1)

    def test_own_deauthorization_tears_down_routes(self) -> None:
        a, b = self.a, self.b
        self.mesh.controller.deauthorize(self.mesh.network, a.client.node_id)
        self.mesh.run(0.2)
        self.assertEqual(a.tun.routes4, [])
        self.assertEqual(a.tun.addresses4, ())
        self.assertEqual(a.node.peers, {})
        # Still joined, as `twistvpn networks` says: an admin may authorize it again.
        self.assertEqual(a.node.join_answers[self.mesh.network], "deauthorized")
        self.assertTrue(self.log.grep("is no longer a member of network"))
        self.assertNotIn(a.public_key, b.node.peers)
        # Authorized again: back with the same address.
        self.mesh.authorize(a)
        self.assertEqual(len(a.tun.addresses4), 1)
        self.assertTrue(self.mesh.delivered(a, b, b"welcome back"))

    def test_deleted_member_removed(self) -> None:
        self.mesh.controller.delete_member(self.mesh.network, self.b.client.node_id)
        self.mesh.run(0.2)
        self.assertEqual(self.a.node.peers, {})

    def test_rendezvous_down_tunnel_keeps_working(self) -> None:
        a, b = self.a, self.b
        for node in (a, b):
            node.endpoint.refuse = True
            node.endpoint.drop()
        self.assertFalse(a.node.rendezvous_up)
        self.assertTrue(self.log.grep("rendezvous connection lost"))
        # 30 s without the rendezvous: peers, addresses and traffic stay.
        self.mesh.run(30)
        self.assertIn(b.public_key, a.node.peers)
        self.assertTrue(self.mesh.delivered(a, b, b"still here"))
        self.assertGreater(a.client.counters["failed_attempts"], 1)
        for node in (a, b):
            node.endpoint.refuse = False
        self.assertTrue(self.mesh.run(20, until=lambda: a.node.rendezvous_up
                                      and b.node.rendezvous_up))
        self.assertEqual(a.client.counters["registrations"], 2)
        self.assertEqual(a.node.join_answers[self.mesh.network], "authorized")
        self.assertTrue(self.mesh.delivered(b, a, b"and after"))

    def test_new_peers_punch_together(self) -> None:
        """The lower key asks the rendezvous for a punch: both sides start again at once."""
        a, b = self.a, self.b
        for x, y in ((a, b), (b, a)):
            reasons = [attempt.reason for attempt in x.peer(y).manager.history]
            self.assertEqual(reasons[:2], ["start", "punch now"])
        self.assertEqual(self.mesh.controller.counters["punches"], 1)

    def test_punch_request_restarts_traversal(self) -> None:
        a, b = self.a, self.b
        self.mesh.run(10)
        attempts = len(b.peer(a).manager.history)
        a.client.request_punch(self.mesh.network, b.public_key)
        self.mesh.run(1)
        reasons = [x.reason for x in b.peer(a).manager.history[attempts:]]
        self.assertIn("punch now", reasons)

    def test_local_endpoints_reach_the_map(self) -> None:
        member = self.b.client.maps[self.mesh.network].member(self.a.public_key)
        self.assertEqual(member.local_endpoints, (f"{self.a.host.ip}:41641",))
        self.assertEqual(member.endpoints, (f"{self.a.host.nat.public_ip}:41641",))

    def test_stop_removes_everything(self) -> None:
        self.a.stop()
        self.assertEqual(self.a.node.peers, {})
        self.assertEqual(self.a.tun.routes4, [])
        self.mesh.run(5)
        self.assertEqual([c for c in self.mesh.clock.getDelayedCalls()
                          if getattr(c.func, "__self__", None) is self.a.node], [])


class SeveralNetworks(SynchronousTestCase):
    def test_one_device_peers_across_networks(self) -> None:
        mesh = Mesh(seed=4)
        second = mesh.controller.create_network("work", subnet="100.70.0.0/24")["id"]
        net = mesh.internet
        a = mesh.add("alpha", net.add("easy"), [mesh.network, second])
        b = mesh.add("beta", net.add("easy"), [mesh.network, second])
        c = mesh.add("gamma", net.add("easy"), [second])
        mesh.authorize(a, b)
        mesh.authorize(a, b, c, network=second)
        self.assertEqual(len(a.tun.addresses4), 2)
        self.assertEqual(sorted(a.tun.routes4), sorted(
            [mesh.controller.get_network(mesh.network)["subnet"], "100.70.0.0/24"]))
        self.assertEqual(set(a.node.peers), {b.public_key, c.public_key})
        # b is in both networks: one peer, both addresses.
        self.assertEqual(len(a.peer(b).wg.allowed_ips), 4)  # IPv4 and IPv6 in each
        self.assertEqual(len(c.node.peers), 2)
        # b leaves "work": one address left, the peer stays.
        mesh.controller.deauthorize(second, b.client.node_id)
        mesh.run(0.2)
        self.assertEqual(len(a.peer(b).wg.allowed_ips), 2)
        self.assertNotIn(b.public_key, c.node.peers)
        self.assertEqual(len(b.tun.addresses4), 1)
        self.assertEqual(b.tun.routes4, [mesh.controller.get_network(mesh.network)["subnet"]])


class Candidates(SynchronousTestCase):
    def member(self, **kw) -> Member:
        base = dict(node_id="n", public_key=b"k" * 32, name="n", ip="100.64.0.2")
        return Member(**{**base, **kw})

    def test_easy_member(self) -> None:
        c = member_candidates(self.member(endpoints=("203.0.113.7:5000",),
                                          local_endpoints=("192.168.1.2:41641",)))
        self.assertEqual(c.public, (("203.0.113.7", 5000),))
        self.assertEqual(c.local, (("192.168.1.2", 41641),))
        self.assertTrue(c.hints.easy)

    def test_hard_member(self) -> None:
        c = member_candidates(self.member(endpoints=("203.0.113.7:5000", "203.0.113.7:6100"),
                                          nat_varies=True))
        self.assertTrue(c.hints.hard_random)

    def test_sequential_member(self) -> None:
        c = member_candidates(self.member(endpoints=("203.0.113.7:5000", "203.0.113.7:5001"),
                                          nat_varies=True))
        self.assertTrue(c.hints.sequential)

    def test_neighbour_took_the_port(self) -> None:
        """
        Two nodes behind one easy router, both on 41641: each keeps the port
        towards one discovery server and not the other (Linux keeps ports
        unique per destination).  That is an easy NAT, reached at the kept
        port, not a hard one (seen in the lab: easy x hard then stayed relayed).
        """
        c = member_candidates(self.member(endpoints=("203.0.113.21:33386", "203.0.113.21:41641"),
                                          nat_varies=True,
                                          local_endpoints=("192.168.1.2:41641",)))
        self.assertTrue(c.hints.easy)
        self.assertEqual(c.public, (("203.0.113.21", 41641),))
        own = own_candidates(NetcheckResult((("203.0.113.21", 33386), ("203.0.113.21", 41641))),
                             [("192.168.1.2", 41641)])
        self.assertTrue(own.hints.easy)
        self.assertEqual(own.public, (("203.0.113.21", 41641),))
        # Neither kept: nothing says it was a neighbour; hard, as before.
        other = member_candidates(self.member(endpoints=("203.0.113.21:33386", "203.0.113.21:5"),
                                              nat_varies=True,
                                              local_endpoints=("192.168.1.2:41641",)))
        self.assertTrue(other.hints.hard_random)

    def test_public_member(self) -> None:
        c = member_candidates(self.member(endpoints=("203.0.113.7:41641",),
                                          local_endpoints=("203.0.113.7:41641",)))
        self.assertTrue(c.hints.public)

    def test_member_not_yet_discovered(self) -> None:
        c = member_candidates(self.member())
        self.assertEqual(c.public, ())
        self.assertEqual(c.hints, NatHints(mapping_varies=None))

    def test_global_ipv6_is_public(self) -> None:
        """No NAT in front of a global IPv6 address: a public candidate; a ULA is a LAN one."""
        c = member_candidates(self.member(
            endpoints=("203.0.113.7:5000", "203.0.113.7:6100"), nat_varies=True,
            local_endpoints=("192.168.1.2:41641", "[2001:db8:b::2]:41641",
                             "[fd12::2]:41641")))
        self.assertEqual(c.public, (("203.0.113.7", 5000), ("2001:db8:b::2", 41641)))
        self.assertTrue(c.hints.hard_random)  # from the IPv4 observations only
        self.assertEqual(c.lan_only(), (("192.168.1.2", 41641), ("fd12::2", 41641)))
        own = own_candidates(NetcheckResult((("203.0.113.9", 41641),) * 2),
                             [("192.168.1.2", 41641), ("2001:db8:a::2", 41641)])
        self.assertEqual(own.public, (("203.0.113.9", 41641), ("2001:db8:a::2", 41641)))
        self.assertTrue(own.hints.easy)

    def test_own(self) -> None:
        local = [("192.168.1.2", 41641)]
        self.assertIsNone(own_candidates(None, local).hints.mapping_varies)
        blocked = own_candidates(NetcheckResult((None, None)), local)
        self.assertTrue(blocked.hints.udp_blocked)
        easy = own_candidates(NetcheckResult((("203.0.113.9", 41641),) * 2), local)
        self.assertEqual(easy.public, (("203.0.113.9", 41641),))
        self.assertTrue(easy.hints.easy)


class KernelRefuses(SynchronousTestCase):
    def test_route_refused_peers_still_added(self) -> None:
        log = LogCatcher(self)
        mesh = Mesh(seed=7)
        a, b = mesh.members("easy", "easy", authorize=False)

        def refuse(cidr: str, source: str | None = None) -> None:
            raise OSError(17, "File exists")

        add_route = a.tun.add_route
        a.tun.add_route = refuse
        mesh.authorize(a, b)
        self.assertEqual(set(a.node.peers), {b.public_key})
        self.assertTrue(log.grep("configuring twvpn0 failed"))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        # The kernel takes it a moment later (an IPv6 address still
        # tentative, say): configured again without waiting for a map change.
        a.tun.add_route = add_route
        mesh.run(1.5)
        self.assertEqual(len(a.tun.routes), 2)
        self.assertEqual(self.flushLoggedErrors(OSError), [])


class AdminChanges(SynchronousTestCase):
    def setUp(self) -> None:
        self.mesh = Mesh(seed=8)
        self.a, self.b = self.mesh.members("easy", "easy")

    def test_new_ip_applied(self) -> None:
        subnet = self.mesh.controller.get_network(self.mesh.network)["subnet"]
        new_ip = subnet.replace("0/24", "77")
        self.mesh.controller.set_ip(self.mesh.network, self.b.client.node_id, new_ip)
        self.mesh.run(0.5)
        self.assertEqual(self.b.tun.addresses4, (f"{new_ip}/32",))
        self.assertEqual(self.a.peer(self.b).wg.allowed_ips[:1], (f"{new_ip}/32",))
        self.assertTrue(self.mesh.delivered(self.a, self.b, b"to the new address"))

    def test_network_deleted(self) -> None:
        self.mesh.controller.delete_network(self.mesh.network)
        self.mesh.run(0.5)
        for node in (self.a, self.b):
            self.assertEqual(node.node.peers, {})
            self.assertEqual(node.tun.routes4, [])
            self.assertEqual(node.node.join_answers[self.mesh.network], "network deleted")

    def new_mapping(self, node) -> None:
        """The node's NAT reboots and another machine behind it takes its port."""
        nat = node.host.nat
        nat.reboot()
        other = self.mesh.internet.add_host(nat)
        port = other.reactor.listenUDP(41641, DatagramProtocol())
        port.write(b"x", (self.mesh.rendezvous_host.ip, 9))

    def test_new_endpoint_punched_together(self) -> None:
        """Whichever side's endpoint changes, the pair punches again at once."""
        a, b = self.a, self.b
        for moved in (a, b):
            punches = self.mesh.controller.counters["punches"]
            self.mesh.run(2)
            self.new_mapping(moved)
            self.mesh.run(25)
            self.assertNotEqual(a.client.maps[self.mesh.network].member(moved.public_key)
                                .endpoints, (f"{moved.host.nat.public_ip}:41641",))
            self.assertGreater(self.mesh.controller.counters["punches"], punches)
            self.assertTrue(self.mesh.run(20, until=lambda: a.peer(b).manager.kind == "direct"
                                          and b.peer(a).manager.kind == "direct"))
            self.assertTrue(self.mesh.delivered(a, b, b"after the reboot"))


class HostAddresses(SynchronousTestCase):
    def test_reads_this_hosts_addresses(self) -> None:
        """pyroute2 read of this namespace: unicast, IPv4 first, loopback and link-local out."""
        import ipaddress

        from twistvpn.node.joined import host_addresses

        found = host_addresses()
        versions = [ipaddress.ip_address(ip).version for ip in found]
        self.assertEqual(versions, sorted(versions))
        for ip in found:
            address = ipaddress.ip_address(ip)
            self.assertFalse(address.is_loopback or address.is_link_local, ip)
        self.assertEqual(host_addresses(exclude=["lo", *self._names()]), [])

    @staticmethod
    def _names() -> list[str]:
        import socket

        return [name for _, name in socket.if_nameindex()]


class DiscoveryRouting(SynchronousTestCase):
    """Discovery answers go to the client whose servers sent them (IPv4 or IPv6)."""

    def test_routed_by_source(self) -> None:
        from twistvpn.node.joined import DiscoveryResponses

        class Client:
            def __init__(self, servers: list[tuple[str, int]]) -> None:
                self.servers = servers
                self.got: list[object] = []

            def datagram_received(self, data: bytes, addr: object) -> None:
                self.got.append((data, addr))

        v4 = Client([("203.0.113.10", 3478), ("203.0.113.10", 3479)])
        v6 = Client([("2001:db8::10", 3478)])
        responses = DiscoveryResponses()
        responses.clients = [v4, v6]
        responses.datagram_received(b"4", ("203.0.113.10", 3479))
        responses.datagram_received(b"6", ("2001:db8::10", 3478, 0, 0))
        responses.datagram_received(b"?", ("2001:db8::66", 3478, 0, 0))
        self.assertEqual(v4.got, [(b"4", ("203.0.113.10", 3479))])
        self.assertEqual(v6.got, [(b"6", ("2001:db8::10", 3478, 0, 0))])
        self.assertEqual(responses.dropped, 1)
