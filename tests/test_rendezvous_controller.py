"""
The controller as a plain object: networks, IP address management, member
state and coalesced pushes, with fake sessions and a Clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.support.rendezvous import FakeSession, new_key
from twistvpn.interfaces import IControlSession, INetworkController
from twistvpn.rendezvous.controller import (
    ConflictError,
    Controller,
    InvalidArgumentError,
    NotFoundError,
    node_id_of,
)
from twistvpn.rendezvous.store import open_store
from twistvpn.wireguard.keys import encode_key


class SubnetTests(SynchronousTestCase):
    """Audit item 7: a network's subnet cannot take over its members' routing."""

    def setUp(self) -> None:
        self.controller = Controller(open_store(":memory:"), Clock())

    def test_outside_private_space_refused(self) -> None:
        for subnet in ("0.0.0.0/0", "8.8.8.0/24", "203.0.113.0/24", "100.0.0.0/8", "172.0.0.0/8"):
            e = self.assertRaises(InvalidArgumentError, self.controller.create_network, "x",
                                  subnet)
            self.assertIn("private or shared space", str(e))
        for subnet in ("10.1.0.0/16", "172.16.5.0/24", "192.168.77.0/24", "100.127.0.0/24"):
            self.assertEqual(self.controller.create_network(subnet, subnet)["subnet"], subnet)

    def test_duplicate_names_need_force(self) -> None:
        first = self.controller.create_network("home")
        e = self.assertRaises(ConflictError, self.controller.create_network, "home")
        self.assertIn(first["id"], str(e))
        self.assertEqual(self.controller.create_network("home", force=True)["name"], "home")
        self.assertEqual(len(self.controller.list_networks()), 2)

    def test_overlapping_networks_refused(self) -> None:
        first = self.controller.create_network("home")  # the first free /24: 100.64.0.0/24
        e = self.assertRaises(ConflictError, self.controller.create_network, "lab", "100.64.0.0/16")
        self.assertIn(first["id"], str(e))
        self.controller.create_network("lab", "10.0.0.0/16")
        self.assertRaises(ConflictError, self.controller.create_network, "sub", "10.0.5.0/24")
        self.assertEqual(len(self.controller.list_networks()), 2)


class ControllerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.controller = Controller(open_store(":memory:"), self.clock, push_delay=0.05)

    def node(self, name: str = "n", network: str | None = None) -> tuple[bytes, FakeSession]:
        _, public = new_key()
        session = FakeSession(public)
        self.controller.register_node(public, name, session)
        if network is not None:
            self.controller.join(public, network)
        return public, session


class Networks(ControllerTestCase):
    def test_interface(self) -> None:
        verifyObject(INetworkController, self.controller)
        verifyObject(IControlSession, FakeSession(b"k" * 32))

    def test_create(self) -> None:
        network = self.controller.create_network("home")
        self.assertEqual(len(network["id"]), 16)
        int(network["id"], 16)
        self.assertEqual(network["subnet"], "100.64.0.0/24")
        self.assertTrue(network["private"])
        self.assertEqual(self.controller.list_networks(), [network])

    def test_default_subnets_do_not_overlap(self) -> None:
        self.controller.create_network("taken", "100.64.1.0/25")
        subnets = [self.controller.create_network(f"n{i}")["subnet"] for i in range(3)]
        self.assertEqual(subnets, ["100.64.0.0/24", "100.64.2.0/24", "100.64.3.0/24"])

    def test_deleted_subnet_is_free_again(self) -> None:
        first = self.controller.create_network("a")
        self.controller.delete_network(first["id"])
        self.assertEqual(self.controller.create_network("b")["subnet"], "100.64.0.0/24")

    def test_bad_subnets(self) -> None:
        for bad in ("nonsense", "10.0.0.1/24", "fd00::/64", "10.0.0.0/31", "10.0.0.0/33", ""):
            self.assertRaises(InvalidArgumentError, self.controller.create_network, "x", bad)
        self.assertEqual(self.controller.list_networks(), [])

    def test_bad_names(self) -> None:
        for bad in ("x" * 65, "tab\there", 7):
            self.assertRaises(InvalidArgumentError, self.controller.create_network, bad)

    def test_unknown_network(self) -> None:
        for bad in ("0123456789abcdef", "zz", "0123456789ABCDEFX"):
            self.assertRaises(NotFoundError, self.controller.list_members, bad)
            self.assertRaises(NotFoundError, self.controller.delete_network, bad)

    def test_domain_and_rename(self) -> None:
        """
        A network's DNS domain is NAME.twistvpn.internal until an admin sets
        one; members get it in their map at once (a delta), and a renamed
        node's new name too.
        """
        network = self.controller.create_network("Home Lab")
        self.assertEqual((network["domain"], network["domain_set"]),
                         ("home-lab.twistvpn.internal", False))
        public, session = self.node("laptop", network["id"])
        self.controller.authorize(network["id"], encode_key(public))
        self.clock.advance(1)
        self.assertEqual(session.maps[-1][1].domain, "home-lab.twistvpn.internal")
        changed = self.controller.update_network(network["id"], domain="Lab.Example.")
        self.assertEqual((changed["domain"], changed["domain_set"]), ("lab.example", True))
        self.controller.rename_node(public, "gpu-server")
        self.clock.advance(1)
        netmap = session.maps[-1][1]
        self.assertEqual((netmap.domain, netmap.members[0].name), ("lab.example", "gpu-server"))
        self.assertTrue(session.deltas)
        # Back to the default; a rename follows the name.
        changed = self.controller.update_network(network["id"], name="Lab", domain="")
        self.assertEqual((changed["name"], changed["domain"]), ("Lab", "lab.twistvpn.internal"))

    def test_bad_domain_changes_nothing(self) -> None:
        first = self.controller.create_network("one")
        second = self.controller.create_network("two")
        self.controller.update_network(first["id"], domain="lab.example")
        for bad in ("a..b", "x_y.example", "1.64.100.in-addr.arpa"):
            self.assertRaises(InvalidArgumentError, self.controller.update_network,
                              second["id"], "renamed", bad)
        self.assertRaises(ConflictError, self.controller.update_network, second["id"],
                          "renamed", "lab.example")
        self.assertRaises(InvalidArgumentError, self.controller.update_network, second["id"],
                          "x" * 65)
        self.assertEqual(self.controller.get_network(second["id"]), second)

    def test_ids_are_case_insensitive(self) -> None:
        network = self.controller.create_network("home")
        self.assertEqual(self.controller.get_network(network["id"].upper()), network)


class Members(ControllerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.net = self.controller.create_network("tiny", "10.1.0.0/30")["id"]

    def test_node_names(self) -> None:
        """A node is named by its ID or its public key in text form."""
        public, _ = self.node("a", self.net)
        by_id = self.controller.authorize(self.net, node_id_of(public))
        by_key = self.controller.get_member(self.net, encode_key(public))
        self.assertEqual(by_id, by_key)
        self.assertEqual(by_id["ip"], "10.1.0.1")
        self.assertRaises(NotFoundError, self.controller.authorize, self.net, "0000000000")
        self.assertRaises(NotFoundError, self.controller.authorize, self.net, "x" * 1000)

    def test_not_a_member(self) -> None:
        public, _ = self.node("a")
        self.assertRaises(NotFoundError, self.controller.authorize, self.net, node_id_of(public))

    def test_exhaustion(self) -> None:
        """A /30 holds two members; the third cannot be authorized."""
        keys = [self.node(str(i), self.net)[0] for i in range(3)]
        ips = [self.controller.authorize(self.net, node_id_of(k))["ip"] for k in keys[:2]]
        self.assertEqual(ips, ["10.1.0.1", "10.1.0.2"])
        e = self.assertRaises(
            ConflictError, self.controller.authorize, self.net, node_id_of(keys[2])
        )
        self.assertIn("no free address", str(e))
        member = self.controller.get_member(self.net, node_id_of(keys[2]))
        self.assertFalse(member["authorized"])
        self.assertIsNone(member["ip"])
        # deleting a member frees its address
        self.controller.delete_member(self.net, node_id_of(keys[0]))
        self.assertEqual(self.controller.authorize(self.net, node_id_of(keys[2]))["ip"], "10.1.0.1")

    def test_set_ip(self) -> None:
        a, _ = self.node("a", self.net)
        b, _ = self.node("b", self.net)
        ida, idb = node_id_of(a), node_id_of(b)
        self.assertEqual(self.controller.set_ip(self.net, ida, "10.1.0.2")["ip"], "10.1.0.2")
        # authorizing keeps an address set before
        self.assertEqual(self.controller.authorize(self.net, ida)["ip"], "10.1.0.2")
        self.assertEqual(self.controller.authorize(self.net, idb)["ip"], "10.1.0.1")
        self.assertRaises(ConflictError, self.controller.set_ip, self.net, idb, "10.1.0.2")
        for bad in ("10.1.0.9", "10.1.0.0", "10.1.0.3", "banana", "fd00::1", "10.1.0.1/32"):
            self.assertRaises(InvalidArgumentError, self.controller.set_ip, self.net, idb, bad)
        self.assertEqual(self.controller.set_ip(self.net, idb, "10.1.0.1")["ip"], "10.1.0.1")

    def test_member_names(self) -> None:
        """
        An admin names a member in its network: peers' maps (and so their
        DNS names) use it, the node's own name stays what it calls itself,
        and "" gives the node's name back.  A bad name changes nothing.
        """
        a, session = self.node("laptop", self.net)
        b, session_b = self.node("server", self.net)
        for key in (a, b):
            self.controller.authorize(self.net, encode_key(key))
        member = self.controller.update_member(self.net, encode_key(a), name="Alice's laptop")
        self.assertEqual((member["name"], member["node_name"]), ("Alice's laptop", "laptop"))
        self.clock.advance(1)
        self.assertEqual(session_b.maps[-1][1].member(a).name, "Alice's laptop")
        self.controller.rename_node(a, "laptop2")  # the node renames itself: the admin's wins
        self.clock.advance(1)
        self.assertEqual(session_b.maps[-1][1].member(a).name, "Alice's laptop")
        self.assertRaises(InvalidArgumentError, self.controller.update_member, self.net,
                          encode_key(a), authorized=False, name="x" * 65)
        self.assertTrue(self.controller.get_member(self.net, encode_key(a))["authorized"])
        member = self.controller.update_member(self.net, encode_key(a), name="")
        self.assertEqual(member["name"], "laptop2")
        self.clock.advance(1)
        self.assertEqual(session_b.maps[-1][1].member(a).name, "laptop2")

    def test_member_fields(self) -> None:
        self.clock.advance(100)
        a, session = self.node("laptop", self.net)
        self.controller.set_local_endpoints(a, ["192.168.1.2:51820"])
        self.controller.record_endpoint(a, ("198.51.100.1", 1000), 0)
        self.controller.record_endpoint(a, ("198.51.100.1", 1001), 1)
        [m] = self.controller.list_members(self.net)
        self.assertEqual(
            m,
            {
                "node_id": node_id_of(a),
                "public_key": encode_key(a),
                "name": "laptop",
                "node_name": "laptop",
                "authorized": False,
                "ip": None,
                "created": 100.0,
                "last_seen": 100.0,
                "endpoints": ["198.51.100.1:1000", "198.51.100.1:1001"],
                "local_endpoints": ["192.168.1.2:51820"],
                "nat_varies": True,
                "online": True,
                "version": None,  # the in-memory session registered without one
                "kind": "node",
            },
        )
        self.clock.advance(5)
        self.controller.detach(session)
        [m] = self.controller.list_members(self.net)
        self.assertFalse(m["online"])
        self.assertEqual(m["last_seen"], 105.0)

    def test_pushes_are_coalesced(self) -> None:
        keys = [self.node(str(i), self.net) for i in range(2)]
        for public, _ in keys:
            self.controller.authorize(self.net, node_id_of(public))
        self.controller.set_local_endpoints(keys[0][0], ["10.0.0.1:1"])
        self.assertEqual(keys[0][1].maps, [])
        self.clock.advance(0.05)
        self.assertEqual(len(keys[0][1].maps), 1)
        self.assertEqual(len(keys[1][1].maps), 1)
        netmap = keys[1][1].maps[0][1]
        self.assertEqual({m.ip for m in netmap.members}, {"10.1.0.1", "10.1.0.2"})

    def test_deltas(self) -> None:
        """A member holding the last map gets only the change; a newcomer
        the whole map; a change nobody sees sends nothing."""
        net = self.controller.create_network("big", "10.7.0.0/24")["id"]
        a, sa = self.node("a", net)
        b, sb = self.node("b", net)
        self.controller.authorize(net, node_id_of(a))
        self.controller.authorize(net, node_id_of(b))
        self.clock.advance(1)
        self.assertEqual((len(sa.maps), len(sa.deltas)), (1, 0))
        self.controller.set_local_endpoints(b, ["10.0.0.2:2"])
        self.clock.advance(1)
        [(_, delta)] = sa.deltas
        self.assertEqual([m.public_key for m in delta.upsert], [b])
        self.assertEqual(delta.remove, ())
        self.assertEqual(sa.maps[-1][1], self.controller.network_map(net))
        c, sc = self.node("c", net)
        self.controller.authorize(net, node_id_of(c))
        self.clock.advance(1)
        self.assertEqual(len(sc.deltas), 0)
        self.assertEqual(len(sc.maps[-1][1].members), 3)
        self.controller.deauthorize(net, node_id_of(c))
        self.clock.advance(1)
        self.assertEqual(sa.deltas[-1][1].remove, (c,))
        # last_seen moving without an endpoint change is not worth a push
        count = len(sa.maps)
        self.controller.record_endpoint(a, ("198.51.100.1", 1), 0)
        self.clock.advance(1)
        self.controller.record_endpoint(a, ("198.51.100.1", 1), 0)
        self.clock.advance(1)
        self.assertEqual(len(sa.maps), count + 1)

    def test_relays_in_maps(self) -> None:
        """Setting the relays (the embedded relay does) re-sends every map."""
        a, session = self.node("a", self.net)
        self.controller.authorize(self.net, node_id_of(a))
        self.clock.advance(1)
        relay = {"host": "203.0.113.1", "port": 3478, "public_key": "k"}
        self.controller.relays = (relay,)
        self.clock.advance(1)
        self.assertEqual(session.maps[-1][1].relays, (relay,))
        self.assertEqual(len(session.deltas), 1)

    def test_revision_increases(self) -> None:
        a, session = self.node("a", self.net)
        self.controller.authorize(self.net, node_id_of(a))
        self.clock.advance(1)
        self.controller.set_local_endpoints(a, ["10.0.0.1:1"])
        self.clock.advance(1)
        revisions = [m.revision for _, m in session.maps]
        self.assertEqual(len(revisions), 2)
        self.assertLess(revisions[0], revisions[1])

    def test_unregistered_node_cannot_join(self) -> None:
        _, public = new_key()
        self.assertRaises(InvalidArgumentError, self.controller.join, public, self.net)

    def test_close(self) -> None:
        _, session = self.node("a", self.net)
        self.controller.close()
        self.assertEqual(session.closed, ["the rendezvous is stopping"])
        self.assertEqual(self.controller.status()["online"], 0)
