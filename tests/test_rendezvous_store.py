"""
The store's contract (L{IRendezvousStore}), run against both
implementations: sqlite (the embedded default) and PostgreSQL (a real
cluster made by the test: twistvpn/testing/postgres.py).
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twistvpn.interfaces import IRendezvousStore
from twistvpn.rendezvous.database import get_db
from twistvpn.rendezvous.store import KeyRecord, SQLiteStore, WriteConflictError
from twistvpn.testing.postgres import Cluster, postgres_missing

NET = "8056c2e21c000001"
OTHER = "8056c2e21c000002"
A, B, C = b"a" * 32, b"b" * 32, b"c" * 32


class StoreContract:
    """The tests; a subclass gives C{make_store}."""

    store: Any

    def make_store(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.store = self.make_store()
        self.addCleanup(self.store.close)  # type: ignore[attr-defined]

    def network(self, network_id: str = NET) -> None:
        self.store.add_network(network_id, "lab", "100.64.0.0/24", True, 1.0)

    def test_interface(self) -> None:
        verifyObject(IRendezvousStore, self.store)

    def test_nodes(self) -> None:
        s = self.store
        record = s.add_node(A, "aaaaaaaaaa", "laptop", 10.0)
        self.assertEqual((record.public_key, record.kind), (A, "node"))
        s.update_node(A, 20.0, "renamed")
        s.set_endpoint(A, 0, "203.0.113.7:41641", 21.0)
        s.set_endpoint(A, 1, "203.0.113.7:41642", 22.0)
        s.set_local_endpoints(A, ("192.168.1.2:41641",))
        [node] = s.load_nodes()
        self.assertEqual((node.name, node.last_seen, node.endpoints, node.local_endpoints),
                         ("renamed", 22.0, ("203.0.113.7:41641", "203.0.113.7:41642"),
                          ("192.168.1.2:41641",)))
        self.assertEqual((s.get_node(A), s.get_node_by_id("aaaaaaaaaa")), (node, node))
        self.assertEqual((s.get_node(B), s.get_node_by_id("bbbbbbbbbb")), (None, None))

    def test_networks(self) -> None:
        s = self.store
        self.network()
        self.assertIsNone(s.add_network(NET, "again", "100.64.1.0/24", True, 2.0))
        s.add_network(OTHER, "two", "100.64.1.0/24", False, 3.0)
        self.assertEqual([n.id for n in s.list_networks()], [NET, OTHER])
        self.assertEqual((s.count_networks(), sorted(s.subnets())),
                         (2, ["100.64.0.0/24", "100.64.1.0/24"]))
        changed = s.update_network(NET, "renamed", "lab.example", False)
        self.assertEqual((changed.name, changed.domain, changed.private),
                         ("renamed", "lab.example", False))
        s.set_revision(NET, 7)
        self.assertEqual(s.revisions(), {NET: 7, OTHER: 0})
        self.assertEqual(s.get_network(NET).revision, 7)

    def test_members(self) -> None:
        s = self.store
        self.network()
        for key, name in ((A, "a"), (B, "b"), (C, "c")):
            s.add_node(key, name * 10, name, 1.0)
        s.add_member(NET, A, 2.0, True, "100.64.0.1")
        s.add_member(NET, B, 3.0, False, None)
        self.assertEqual(s.get_member(NET, A).ip, "100.64.0.1")
        self.assertIsNone(s.get_member(NET, C))
        self.assertEqual([m.public_key for m in s.list_members(NET)], [A, B])
        self.assertEqual([m.public_key for m in s.list_members(NET, authorized_only=True)],
                         [A])
        self.assertEqual(s.count_members(NET), (2, 1))
        self.assertEqual(s.member_networks(A), [NET])
        self.assertEqual(s.authorized_members(), {NET: frozenset({A})})
        self.assertEqual((s.used_ips(NET), s.ip_holder(NET, "100.64.0.1")),
                         ({"100.64.0.1"}, A))
        s.update_member(NET, B, True, "100.64.0.2", "bee")
        self.assertEqual(s.get_member(NET, B).name, "bee")
        s.delete_member(NET, A)
        self.assertEqual(s.authorized_members(), {NET: frozenset({B})})
        self.assertEqual(s.delete_network(NET), [B])
        self.assertEqual((s.list_members(NET), s.get_network(NET)), ([], None))

    def test_an_ip_is_one_members(self) -> None:
        s = self.store
        self.network()
        s.add_node(A, "a" * 10, "a", 1.0)
        s.add_node(B, "b" * 10, "b", 1.0)
        s.add_member(NET, A, 2.0, True, "100.64.0.1")
        with self.assertRaises(WriteConflictError):
            s.add_member(NET, B, 3.0, True, "100.64.0.1")
        self.assertIsNone(s.get_member(NET, B))

    def test_devices(self) -> None:
        s = self.store
        self.network()
        node, member = s.add_device(A, "a" * 10, "phone", NET, "100.64.0.5", 4.0)
        self.assertEqual((node.kind, member.authorized, member.name), ("device", True, "phone"))
        self.assertEqual(s.authorized_devices(), {NET: frozenset({A})})
        s.add_network(OTHER, "two", "100.64.1.0/24", True, 5.0)
        s.add_device(A, "a" * 10, "phone", OTHER, "100.64.1.5", 6.0)  # the same device
        self.assertEqual(len(s.load_nodes()), 1)
        self.assertEqual(set(s.authorized_devices()), {NET, OTHER})

    def test_half_done_writes_nothing(self) -> None:
        """A device whose IP is taken: neither its node nor its membership is written."""
        s = self.store
        self.network()
        s.add_node(A, "a" * 10, "a", 1.0)
        s.add_member(NET, A, 2.0, True, "100.64.0.1")
        with self.assertRaises(WriteConflictError):
            s.add_device(B, "b" * 10, "phone", NET, "100.64.0.1", 3.0)
        self.assertEqual([n.public_key for n in s.load_nodes()], [A])
        self.assertEqual(s.authorized_devices(), {})

    def test_keys(self) -> None:
        s = self.store
        self.network()
        s.add_node(A, "a" * 10, "a", 1.0)
        s.add_node(B, "b" * 10, "b", 1.0)
        key = KeyRecord("k1", NET, False, 0, None, "lab-", False, 5.0)
        s.add_key(key, b"h" * 32)
        self.assertEqual(s.key_by_hash(b"h" * 32), key)
        self.assertIsNone(s.key_by_hash(b"x" * 32))
        member = s.join_with_key("k1", NET, A, 6.0, "100.64.0.1", True, "lab-a")
        self.assertEqual((member.authorized, member.ip, member.name), (True, "100.64.0.1", "lab-a"))
        # Single use: spent.
        self.assertIsNone(s.join_with_key("k1", NET, B, 7.0, "100.64.0.2", True))
        self.assertIsNone(s.get_member(NET, B))
        self.assertEqual(s.list_keys(NET)[0].uses, 1)
        self.assertTrue(s.revoke_key("k1"))
        self.assertFalse(s.revoke_key("nope"))
        self.assertTrue(s.list_keys()[0].revoked)


class SQLiteStoreTests(StoreContract, SynchronousTestCase):
    def make_store(self) -> Any:
        return SQLiteStore(get_db(":memory:"))


class PostgreSQLStoreTests(StoreContract, SynchronousTestCase):
    skip = postgres_missing()

    def make_store(self) -> Any:
        from twistvpn.rendezvous.pgstore import open_postgresql_store

        # A cluster of its own per test (about a second): nothing shared, all removed.
        self.cluster = Cluster()
        self.addCleanup(self.cluster.stop)
        self.cluster.start()
        return open_postgresql_store(self.cluster.dsn)

    def test_schema_made_once_and_kept(self) -> None:
        """A second instance on the same database finds the tables, and the data."""
        from twistvpn.rendezvous.pgstore import open_postgresql_store

        assert self.cluster is not None
        self.network()
        second = open_postgresql_store(self.cluster.dsn)
        self.addCleanup(second.close)
        self.assertEqual([n.id for n in second.list_networks()], [NET])


class PostgreSQLRendezvousTests(SynchronousTestCase):
    """`twistd twistvpn-rendezvous --database postgresql://...`: the controller's state there."""

    skip = postgres_missing()

    def test_two_instances_share_the_database(self) -> None:
        import os
        import shutil
        import tempfile

        from tests.support.ports import free_tcp_port
        from twistvpn.rendezvous.admin_cli import AdminClient
        from twistvpn.rendezvous.pgstore import open_postgresql_store
        from twistvpn.testing.localrun import LocalRendezvous

        cluster = Cluster()
        self.addCleanup(cluster.stop)
        cluster.start()
        seen = []
        urls = []
        for name in ("one", "two"):
            tmp = tempfile.mkdtemp(prefix="tvr")
            self.addCleanup(shutil.rmtree, tmp, True)
            with open(os.path.join(tmp, "log"), "ab") as log:
                instance = LocalRendezvous(os.path.join(tmp, "data"), free_tcp_port(), log,
                                           extra_args=("--database", cluster.dsn, "--no-relay"))
                self.addCleanup(instance.kill)
                info = instance.start()
                urls.append((info["url"].partition("#")[2], info["server_key"]))
            client = AdminClient(data_dir=instance.data_dir)
            if name == "one":
                client.request("POST", "networks", {"name": "shared"})
            seen.append([n["name"] for n in client.request("GET", "networks")])
        self.assertEqual(seen, [["shared"], ["shared"]])
        # One identity: the same certificate fingerprint and server key.
        self.assertEqual(urls[0], urls[1])
        store = open_postgresql_store(cluster.dsn)
        self.addCleanup(store.close)
        self.assertEqual([n.name for n in store.list_networks()], ["shared"])

    def test_bad_database_option(self) -> None:
        from twisted.python import usage

        from twistvpn.rendezvous.rendezvous_tap import Options

        options = Options()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--database", "mysql://x", "--data-dir", self.mktemp()])
        self.assertEqual(str(caught.exception), "--database 'mysql://x': not a postgresql:// URL")

    def test_concurrent_authorizations_get_distinct_ips(self) -> None:
        """
        Two instances authorize 200 members of one /24 at once (a thread
        each): 200 distinct addresses; the loser of a race for an address
        takes the next free one (the database refuses the duplicate).
        """
        import threading

        from twisted.internet.task import Clock

        from tests.support.rendezvous import FakeSession, new_key
        from twistvpn.rendezvous.controller import Controller, node_id_of
        from twistvpn.rendezvous.pgstore import open_postgresql_store

        cluster = Cluster()
        self.addCleanup(cluster.stop)
        cluster.start()
        one = Controller(open_postgresql_store(cluster.dsn), Clock())
        self.addCleanup(one.store.close)
        net = one.create_network("big", subnet="100.64.0.0/24")["id"]
        keys = []
        for i in range(200):
            _, public = new_key()
            one.register_node(public, f"n{i}", FakeSession(public))
            one.join(public, net)
            keys.append(public)
        two = Controller(open_postgresql_store(cluster.dsn), Clock())  # reads the nodes in
        self.addCleanup(two.store.close)
        errors: list[Exception] = []

        def authorize(controller: Controller, chunk: list[bytes]) -> None:
            for key in chunk:
                try:
                    controller.authorize(net, node_id_of(key))
                except Exception as e:  # collected: the test says which
                    errors.append(e)

        threads = [threading.Thread(target=authorize, args=(one, keys[0::2])),
                   threading.Thread(target=authorize, args=(two, keys[1::2]))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        self.assertEqual(errors, [])
        ips = [m.ip for m in one.store.list_members(net)]
        self.assertEqual((len(ips), len(set(ips)), None in ips), (200, 200, False))
        print(f"address races lost and retried: {one.counters['ip_races']} + "
              f"{two.counters['ip_races']}")

    def test_a_node_of_the_other_instance(self) -> None:
        """
        A node that registered (and was authorized) through one instance
        after the other started: the other lists it, maps it, resolves it,
        and takes its registration without writing it twice.
        """
        from twisted.internet.task import Clock

        from tests.support.rendezvous import FakeSession, new_key
        from twistvpn.rendezvous.controller import Controller, node_id_of
        from twistvpn.rendezvous.pgstore import open_postgresql_store

        cluster = Cluster()
        self.addCleanup(cluster.stop)
        cluster.start()
        one = Controller(open_postgresql_store(cluster.dsn), Clock())
        self.addCleanup(one.store.close)
        two = Controller(open_postgresql_store(cluster.dsn), Clock())
        self.addCleanup(two.store.close)
        net = one.create_network("lab")["id"]
        _, public = new_key()
        one.register_node(public, "gpu", FakeSession(public))
        one.join(public, net)
        one.authorize(net, node_id_of(public))
        self.assertEqual([m["name"] for m in two.list_members(net)], ["gpu"])
        self.assertEqual([m.name for m in two.network_map(net).members], ["gpu"])
        self.assertEqual(two.get_member(net, node_id_of(public))["authorized"], True)
        # Its next connection reaches the other instance.
        self.assertEqual(two.register_node(public, "gpu", FakeSession(public)),
                         node_id_of(public))
