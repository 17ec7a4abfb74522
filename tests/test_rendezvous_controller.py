"""
The controller as a plain object: networks, IP address management, member
state and coalesced pushes, with fake sessions and a Clock.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.support.rendezvous import FakeSession, RecordingObserver, new_key
from twistvpn.interfaces import IControlSession, INetworkController
from twistvpn.rendezvous import controller as controller_module
from twistvpn.rendezvous.controller import (
    FAILOVER_RATE,
    ConflictError,
    Controller,
    InvalidArgumentError,
    NotFoundError,
    node_id_of,
)
from twistvpn.rendezvous.protocol import FAILOVER_SPREAD, FAILOVER_SPREAD_MAX
from twistvpn.rendezvous.publisher import MAX_PUSH_WINDOW
from twistvpn.rendezvous.store import open_store
from twistvpn.wireguard.keys import decode_key, encode_key


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


class CountingStore:
    """A store that counts the calls of each of its methods."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


class JoinCost(SynchronousTestCase):
    """
    Joining a network of thousands costs a few indexed look-ups, not a
    listing of every member: the joins of N nodes must not cost N².
    """

    def setUp(self) -> None:
        self.store = CountingStore(open_store(":memory:"))
        self.controller = Controller(self.store, Clock())
        self.net = self.controller.create_network("big", "10.9.0.0/16", private=False)["id"]

    def join(self, name: str) -> bytes:
        _, public = new_key()
        self.controller.register_node(public, name, FakeSession(public))
        self.controller.join(public, self.net)
        return public

    def test_joins_do_not_list_members(self) -> None:
        self.store.calls.clear()
        keys = [self.join(f"n{i}") for i in range(300)]
        for listing in ("list_members", "used_ips", "authorized_devices", "authorized_members"):
            self.assertLessEqual(self.store.calls[listing], 1, listing)
        ips = [self.controller.get_member(self.net, encode_key(k))["ip"] for k in keys]
        self.assertEqual(ips[:3], ["10.9.0.1", "10.9.0.2", "10.9.0.3"])
        self.assertEqual(len(set(ips)), 300)
        self.assertEqual(ips[-1], "10.9.1.44")  # .255 and .0 of 10.9.0.0/24 are hosts of a /16

    def test_pushes_read_members_once_per_change(self) -> None:
        """
        Nodes coming and going change what the map shows but not who is a
        member: those pushes read no member list; an admin's change does.
        """
        sessions = {}
        for i in range(20):
            _, public = new_key()
            sessions[public] = FakeSession(public)
            self.controller.register_node(public, f"n{i}", sessions[public])
            self.controller.join(public, self.net)
        self.controller.publisher.flush()
        self.store.calls.clear()
        first = next(iter(sessions))
        for _ in range(5):
            self.controller.detach(sessions[first])
            self.controller.publisher.flush()
            self.controller.register_node(first, "n0", sessions[first])
            self.controller.publisher.flush()
        self.assertEqual(self.store.calls["list_members"], 0)
        last = sessions[list(sessions)[-1]].maps[-1][1]
        self.assertTrue(last.member(first).online)
        self.controller.update_member(self.net, encode_key(first), name="renamed")
        self.controller.publisher.flush()
        self.assertEqual(self.store.calls["list_members"], 2)  # the observers' sets, the map
        last = sessions[list(sessions)[-1]].maps[-1][1]
        self.assertEqual(last.member(first).name, "renamed")

    def test_freed_addresses_are_taken_first(self) -> None:
        keys = [self.join(f"n{i}") for i in range(5)]
        self.controller.delete_member(self.net, encode_key(keys[3]))
        self.controller.set_ip(self.net, encode_key(keys[1]), "10.9.0.100")
        self.assertEqual(self.controller.get_member(self.net, encode_key(self.join("a")))["ip"],
                         "10.9.0.2")
        self.assertEqual(self.controller.get_member(self.net, encode_key(self.join("b")))["ip"],
                         "10.9.0.4")
        self.assertEqual(self.controller.get_member(self.net, encode_key(self.join("c")))["ip"],
                         "10.9.0.6")

    def test_observers_get_every_member(self) -> None:
        """The sets told on a join are the store's, though not read from it."""
        observer = RecordingObserver()
        self.controller.add_membership_observer(observer)
        keys = {self.join(f"n{i}") for i in range(20)}
        device = self.controller.add_device(self.net, "phone", new_key()[1])
        last = [e for e in observer.events if e[0] == "members"][-1]
        self.assertEqual(last[2], self.controller.authorized_members()[self.net])
        self.assertEqual(last[2] - {decode_key(device["public_key"])}, keys)
        self.assertEqual(last[3], {decode_key(device["public_key"])})
        self.join("late")
        last = [e for e in observer.events if e[0] == "members"][-1]
        self.assertEqual(len(last[2]), 22)
        self.assertEqual(last[3], {decode_key(device["public_key"])})


class SlowSession(FakeSession):
    """A session whose every push takes C{cost} seconds of the rendezvous's time."""

    def __init__(self, public_key: bytes, clock: Clock) -> None:
        super().__init__(public_key)
        self.clock = clock
        self.cost = 0.004

    def send_map(self, network_id: str, netmap: Any) -> None:
        self.clock.rightNow += self.cost
        super().send_map(network_id, netmap)

    def send_map_delta(self, network_id: str, delta: Any) -> None:
        self.clock.rightNow += self.cost
        super().send_map_delta(network_id, delta)


class PushWindow(ControllerTestCase):
    """
    After a push, the next waits as long as that one took: in a big network
    the rendezvous is not kept pushing all the time, and a change after a
    quiet spell still goes out after push_delay.
    """

    def slow_network(self, size: int) -> list[SlowSession]:
        net = self.controller.create_network("big", "10.9.0.0/16", private=False)["id"]
        sessions = []
        for i in range(size):
            _, public = new_key()
            sessions.append(SlowSession(public, self.clock))
            self.controller.register_node(public, f"n{i}", sessions[-1])
            self.controller.join(public, net)
        return sessions

    def test_pause_follows_the_push(self) -> None:
        sessions = self.slow_network(100)
        self.clock.advance(0.05)  # one map to each of 100 at 4 ms each: 0.4 s
        self.assertEqual([len(s.maps) for s in sessions], [1] * 100)
        self.assertAlmostEqual(self.controller.publisher.quiet_until, 0.85)
        self.controller.rename_node(sessions[0].public_key, "renamed")
        self.clock.advance(0.35)
        self.assertEqual(len(sessions[1].maps), 1)  # still pausing
        self.clock.advance(0.06)
        self.assertEqual(len(sessions[1].maps), 2)
        self.assertEqual(sessions[1].maps[-1][1].member(sessions[0].public_key).name, "renamed")
        # A quiet spell: the next change waits push_delay only.
        self.clock.advance(2)
        self.controller.rename_node(sessions[0].public_key, "again")
        self.clock.advance(0.051)
        self.assertEqual(sessions[1].maps[-1][1].member(sessions[0].public_key).name, "again")

    def test_clock_stepping_back_delays_at_most_the_window(self) -> None:
        sessions = self.slow_network(100)
        self.clock.advance(0.05)
        self.clock.rightNow -= 3600  # the wall clock stepped back an hour
        for s in sessions:
            s.cost = 0.0
        self.controller.rename_node(sessions[0].public_key, "renamed")
        self.clock.advance(MAX_PUSH_WINDOW + 0.01)
        self.assertEqual(sessions[1].maps[-1][1].member(sessions[0].public_key).name, "renamed")

    def test_pause_is_bounded(self) -> None:
        self.slow_network(300)  # 1.2 s of pushing
        self.clock.advance(0.05)
        self.assertAlmostEqual(self.controller.publisher.quiet_until,
                               self.clock.seconds() + MAX_PUSH_WINDOW)


class FailoverSpread(ControllerTestCase):
    """Over how long this instance's nodes spread a move if it dies: in proportion to them."""

    def test_in_proportion_to_the_nodes_here(self) -> None:
        self.assertEqual(self.controller.failover_spread(), FAILOVER_SPREAD)
        for i in range(2000):
            self.node(f"n{i}")
        self.assertEqual(self.controller.failover_spread(), FAILOVER_SPREAD)  # a second old
        self.clock.advance(1)
        self.assertEqual(self.controller.failover_spread(), 2000 / FAILOVER_RATE)
        self.patch(controller_module, "FAILOVER_RATE", 1.0)
        self.clock.advance(1)
        self.assertEqual(self.controller.failover_spread(), FAILOVER_SPREAD_MAX)

