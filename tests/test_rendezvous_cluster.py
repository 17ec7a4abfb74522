"""
Several rendezvous instances as one (L{twistvpn.rendezvous.cluster}): two
controllers over one store, their notifications carried by a bus in
memory, the database's triggers played by an observer that writes what
they write.  tests/test_integration_cluster.py runs the same against a
real PostgreSQL.
"""

from __future__ import annotations

import collections
import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.support.rendezvous import FakeSession, fake_member, new_key
from twistvpn.interfaces import IMembershipObserver, IRendezvousCluster
from twistvpn.rendezvous.cluster import MEMBERS_CHANNEL, NODES_CHANNEL, Cluster
from twistvpn.rendezvous.controller import Controller, node_id_of
from twistvpn.rendezvous.database import get_db
from twistvpn.rendezvous.store import SQLiteStore


class MemoryBus:
    """PostgreSQL's LISTEN/NOTIFY, in memory: every instance hears every notification."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, int, str]] = []
        self.clusters: list[Cluster] = []
        self.delivering = False

    def sender(self, instance: int) -> Any:
        return lambda channel, payload: self.pending.append((channel, instance, payload))

    def deliver(self) -> int:
        """Everything sent so far, to everyone (who skip their own); how many."""
        count = 0
        while self.pending:
            batch, self.pending = self.pending, []
            count += len(batch)
            self.delivering = True
            try:
                for cluster in self.clusters:
                    cluster.received(batch)
            finally:
                self.delivering = False
        return count


@implementer(IMembershipObserver)
class Triggers:
    """
    What the schema's triggers announce of an instance's committed changes
    (an instance hearing of another's change writes nothing: no trigger).
    """

    def __init__(self, bus: MemoryBus, instance: int) -> None:
        self._bus = bus
        self._sender = bus.sender(instance)

    def _send(self, channel: str, payload: str) -> None:
        if not self._bus.delivering:
            self._sender(channel, payload)

    def members_changed(self, network_id: str, authorized: frozenset[bytes],
                        devices: frozenset[bytes]) -> None:
        self._send(MEMBERS_CHANNEL, network_id)

    def member_revoked(self, network_id: str, public_key: bytes, reason: str) -> None:
        reason = "deleted" if reason == "network deleted" else reason
        self._send(MEMBERS_CHANNEL, f"{network_id} {reason} {public_key.hex()}")

    def network_deleted(self, network_id: str) -> None:
        self._send(MEMBERS_CHANNEL, network_id)


class Instances(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = SQLiteStore(get_db(":memory:"))
        self.clock = Clock()
        self.bus = MemoryBus()
        self.one = self.instance(101)
        self.two = self.instance(102)
        self.net = self.one.create_network("lab")["id"]

    def instance(self, pid: int) -> Controller:
        controller = Controller(self.store, self.clock)
        cluster = Cluster(controller.registry, controller.membership, self.bus.sender(pid),
                          controller.counters)
        cluster.instance = pid
        controller.attach_cluster(cluster)
        controller.membership.add_observer(Triggers(self.bus, pid))
        self.bus.clusters.append(cluster)
        return controller

    def node(self, controller: Controller, name: str, authorize: bool = True) -> Any:
        return fake_member(controller, self.net, name, authorize)

    def settle(self) -> None:
        self.bus.deliver()
        self.clock.advance(1)
        self.bus.deliver()

    def members(self, session: FakeSession) -> dict[str, bool]:
        """The latest map the session got: member name -> online."""
        netmap = session.maps[-1][1]
        return {m.name: m.online for m in netmap.members}

    def test_interface(self) -> None:
        cluster = self.one.registry.cluster
        verifyObject(IRendezvousCluster, cluster)

    def test_authorized_on_one_seen_on_two(self) -> None:
        """An admin change on one instance reaches a node connected to the other."""
        gpu, gpu_session = self.node(self.two, "gpu")
        self.settle()
        _, laptop_session = self.node(self.one, "laptop", authorize=False)
        self.settle()
        self.assertEqual(self.members(gpu_session), {"gpu": True})
        self.one.authorize(self.net, node_id_of(laptop_session.public_key))
        self.settle()
        self.assertEqual(self.members(gpu_session), {"gpu": True, "laptop": True})
        self.assertEqual(self.members(laptop_session), {"gpu": True, "laptop": True})

    def test_online_and_endpoints_elsewhere(self) -> None:
        """
        A node's session and discovery's endpoints, which only its instance
        knows, reach the other's maps; its going offline too.
        """
        _, gpu_session = self.node(self.two, "gpu")
        laptop, _ = self.node(self.one, "laptop")
        self.one.record_endpoint(laptop, ("203.0.113.7", 41641), 0)
        self.settle()
        netmap = gpu_session.maps[-1][1]
        member = next(m for m in netmap.members if m.name == "laptop")
        self.assertEqual((member.online, member.endpoints), (True, ("203.0.113.7:41641",)))
        self.one.registry.detach(self.one.registry.node(laptop).session)
        self.settle()
        self.assertEqual(self.members(gpu_session), {"gpu": True, "laptop": False})

    def test_old_instance_late_goodbye(self) -> None:
        """
        A node that moved on to a third instance before its old one noticed
        it had gone: the old one's late "offline" does not hide it.
        """
        _, gpu_session = self.node(self.two, "gpu")
        laptop, _ = self.node(self.one, "laptop")
        self.settle()
        three = self.instance(103)
        old_session = self.one.registry.node(laptop).session
        three.register_node(laptop, "laptop", FakeSession(laptop))
        self.settle()
        self.one.registry.detach(old_session)
        self.settle()
        self.assertEqual(self.members(gpu_session), {"gpu": True, "laptop": True})
        self.assertEqual(self.two.registry.node(laptop).elsewhere, 103)

    def test_a_dead_instance_nodes_go_offline(self) -> None:
        """When the database no longer lists an instance, its nodes are offline."""
        _, gpu_session = self.node(self.two, "gpu")
        self.node(self.one, "laptop")
        self.settle()
        self.assertEqual(self.members(gpu_session), {"gpu": True, "laptop": True})
        self.two.registry.cluster.instances_alive({102})
        self.settle()
        self.assertEqual(self.members(gpu_session), {"gpu": True, "laptop": False})

    def test_punch_across_instances(self) -> None:
        """A punch between nodes on two instances reaches both, with the same ID."""
        gpu, gpu_session = self.node(self.two, "gpu")
        laptop, laptop_session = self.node(self.one, "laptop")
        self.one.record_endpoint(laptop, ("203.0.113.7", 41641), 0)
        self.two.record_endpoint(gpu, ("198.51.100.9", 41641), 0)
        self.settle()
        self.one.request_punch(laptop, self.net, gpu)
        self.settle()
        [(_, mine)] = laptop_session.punches
        [(net, theirs)] = gpu_session.punches
        self.assertEqual((net, mine.punch_id), (self.net, theirs.punch_id))
        self.assertEqual((mine.peer_key, theirs.peer_key), (gpu, laptop))
        self.assertEqual(mine.candidates, ("198.51.100.9:41641",))
        self.assertEqual(theirs.candidates, ("203.0.113.7:41641",))

    def test_deauthorized_on_one_revoked_on_two(self) -> None:
        gpu, gpu_session = self.node(self.two, "gpu")
        self.settle()
        self.one.deauthorize(self.net, node_id_of(gpu))
        self.settle()
        self.assertEqual(gpu_session.revoked, [(self.net, "deauthorized")])

    def test_network_deleted_on_one(self) -> None:
        gpu, gpu_session = self.node(self.two, "gpu")
        self.settle()
        self.one.delete_network(self.net)
        self.settle()
        self.assertEqual(gpu_session.revoked, [(self.net, "network deleted")])
        self.assertEqual(self.two.registry.node(gpu).subscriptions, set())

    def test_hello_is_answered(self) -> None:
        """An instance that starts listening hears who is connected to the others."""
        self.node(self.one, "laptop")
        self.settle()
        three = self.instance(103)
        three.registry.instances_gone(set())  # knows nothing of the others yet
        self.assertFalse(three.network_map(self.net).members[0].online)
        three.registry.cluster.resync()
        self.settle()
        self.assertEqual([m.online for m in three.network_map(self.net).members], [True])

    def test_changes_batched(self) -> None:
        """Many changes of one network in one delivery: handled once."""
        _, gpu_session = self.node(self.two, "gpu")
        for i in range(5):
            self.node(self.one, f"n{i}")
        before = self.two.counters["cluster_network_changes"]
        self.bus.deliver()
        self.assertEqual(self.two.counters["cluster_network_changes"] - before, 1)

    def test_bad_notifications_dropped_and_counted(self) -> None:
        """Damaged or foreign notifications are counted and dropped; the good ones count."""
        cluster = self.two.registry.cluster
        _, gpu_session = self.node(self.two, "gpu")
        self.bus.deliver()
        bad = [
            (MEMBERS_CHANNEL, 101, "not-a-network"),
            (MEMBERS_CHANNEL, 101, f"{self.net} exploded {'00' * 32}"),
            (MEMBERS_CHANNEL, 101, f"{self.net} deleted abc"),
            (NODES_CHANNEL, 101, "{"),
            (NODES_CHANNEL, 101, json.dumps({"t": "nodes", "nodes": [{"k": "00"}]})),
            (NODES_CHANNEL, 101, json.dumps({"t": "punch", "to": 102, "k": "00" * 32,
                                             "peer": "00" * 32, "c": ["x"], "d": 0.5,
                                             "id": "p"})),
            (NODES_CHANNEL, 101, json.dumps({"t": "bogus"})),
            ("elsewhere", 101, "x"),
        ]
        cluster.received(bad + [(MEMBERS_CHANNEL, 101, self.net)])
        self.assertEqual(self.two.counters["cluster_bad_notification"], len(bad))
        self.assertEqual(self.two.counters["cluster_network_changes"], 1)

    def test_facts_fit_in_a_notification(self) -> None:
        """The answer to hello is split under PostgreSQL's 8000-byte payload limit."""
        sent: list[tuple[str, str]] = []
        controller = Controller(self.store, self.clock)
        cluster = Cluster(controller.registry, controller.membership,
                          lambda c, p: sent.append((c, p)), collections.Counter())
        for i in range(300):
            _, public = new_key()
            controller.register_node(public, f"node-with-a-long-name-{i:04}", FakeSession(public))
            controller.set_local_endpoints(public, [f"192.168.{i % 250}.{j}:41641"
                                                    for j in range(8)])
        sent.clear()
        cluster.received([(NODES_CHANNEL, 7, json.dumps({"t": "hello"}))])
        self.assertGreater(len(sent), 1)
        self.assertTrue(all(len(p.encode()) < 8000 for _, p in sent))
        nodes = [n for _, p in sent for n in json.loads(p).get("nodes", [])]
        self.assertEqual(len(nodes), 300)

    def test_relays_elsewhere_listed(self) -> None:
        """
        Each instance's relays are in every instance's maps (a relayed pair
        on two instances meets on one relay); a dead instance's go.
        """
        relay_one = {"host": "203.0.113.10", "port": 443, "public_key": "one"}
        relay_two = {"host": "203.0.113.11", "port": 443, "public_key": "two"}
        self.one.relays = (relay_one,)
        self.two.relays = (relay_two,)
        self.settle()
        self.assertEqual(self.one.relays, (relay_one, relay_two))
        self.assertEqual(self.two.relays, (relay_two, relay_one))
        _, gpu_session = self.node(self.two, "gpu")
        self.settle()
        self.assertEqual(gpu_session.maps[-1][1].relays, (relay_two, relay_one))
        self.two.registry.cluster.instances_alive({102})
        self.settle()
        self.assertEqual(self.two.relays, (relay_two,))
        self.assertEqual(gpu_session.maps[-1][1].relays, (relay_two,))
        three = self.instance(103)
        three.registry.cluster.resync()
        self.settle()
        self.assertEqual(set(r["public_key"] for r in three.relays), {"one", "two"})
