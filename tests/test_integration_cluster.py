"""
Two rendezvous instances on one real PostgreSQL (a throwaway cluster made
by the test, twistvpn/testing/postgres.py), hearing each other through its
LISTEN/NOTIFY: the schema's triggers announce admin changes, the
instances announce sessions, endpoints and punches.  Nodes are fake
sessions here; test_integration_failover.py runs real nodes behind NATs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.support.rendezvous import FakeSession, fake_member
from twistvpn.testing.postgres import Cluster as PostgreSQL
from twistvpn.testing.postgres import postgres_missing

WAIT = 10.0  # seconds any change may take to reach the other instance (it takes ms)


class TwoInstances(TestCase):
    skip = postgres_missing()

    def setUp(self) -> None:
        self.postgres = PostgreSQL()
        self.addCleanup(self.postgres.stop)
        self.postgres.start()
        self.one = self.instance()
        self.two = self.instance()
        self.net = self.one.create_network("lab")["id"]

    def instance(self) -> Any:
        from twistvpn.rendezvous import pgstore
        from twistvpn.rendezvous.cluster import Cluster
        from twistvpn.rendezvous.controller import Controller

        db = pgstore.connect(self.postgres.dsn)
        controller = Controller(pgstore.PostgreSQLStore(db), reactor)
        cluster = Cluster(controller.registry, controller.membership, pgstore.notifier(db),
                          controller.counters)
        controller.attach_cluster(cluster)
        service = pgstore.ClusterService(reactor, self.postgres.dsn, cluster, db)
        service.startService()
        controller.service = service

        def stop() -> None:
            if service.running:
                service.stopService()
            controller.close()
            db.close()

        self.addCleanup(stop)
        return controller

    def node(self, controller: Any, name: str, authorize: bool = True) -> tuple[bytes, Any]:
        return fake_member(controller, self.net, name, authorize)

    @defer.inlineCallbacks
    def until(self, what: str, check: Callable[[], bool]) -> Any:
        for _ in range(int(WAIT / 0.02)):
            if check():
                return
            yield deferLater(reactor, 0.02, lambda: None)
        self.fail(f"not within {WAIT} s: {what}")

    @staticmethod
    def members(session: FakeSession) -> dict[str, bool]:
        if not session.maps:
            return {}
        return {m.name: m.online for m in session.maps[-1][1].members}

    @defer.inlineCallbacks
    def test_admin_change_and_session_elsewhere(self) -> Any:
        """
        Authorized through instance 1: the node connected to instance 2
        gets the new member in its map, online; a deauthorization made
        through instance 2 is pushed to the node on instance 1.
        """
        from twistvpn.rendezvous.controller import node_id_of

        _, gpu = self.node(self.two, "gpu")
        laptop, laptop_session = self.node(self.one, "laptop", authorize=False)
        self.one.authorize(self.net, node_id_of(laptop))
        yield self.until("instance 2 pushes the laptop, online",
                         lambda: self.members(gpu) == {"gpu": True, "laptop": True})
        self.two.deauthorize(self.net, node_id_of(laptop))
        yield self.until("instance 1 revokes the laptop",
                         lambda: laptop_session.revoked == [(self.net, "deauthorized")])
        yield self.until("instance 2 pushes the map without it",
                         lambda: self.members(gpu) == {"gpu": True})

    @defer.inlineCallbacks
    def test_punch_across(self) -> Any:
        gpu, gpu_session = self.node(self.two, "gpu")
        laptop, laptop_session = self.node(self.one, "laptop")
        self.two.record_endpoint(gpu, ("198.51.100.9", 41641), 0)
        yield self.until("instance 1 knows the gpu online",
                         lambda: self.one.registry.node(gpu).elsewhere is not None
                         and self.one.registry.node(gpu).endpoints[0] is not None)
        self.one.request_punch(laptop, self.net, gpu)
        yield self.until("both got the punch", lambda: bool(gpu_session.punches))
        self.assertEqual(laptop_session.punches[0][1].punch_id,
                         gpu_session.punches[0][1].punch_id)
        self.assertEqual(laptop_session.punches[0][1].candidates, ("198.51.100.9:41641",))

    @defer.inlineCallbacks
    def test_dead_instance(self) -> Any:
        """
        An instance whose connections vanish (killed): the other marks its
        nodes offline within a few seconds, and changes made meanwhile
        reach a restarted instance.
        """
        _, gpu = self.node(self.two, "gpu")
        self.node(self.one, "laptop")
        yield self.until("instance 2 sees the laptop online",
                         lambda: self.members(gpu) == {"gpu": True, "laptop": True})
        yield self.until("each instance counts two", lambda: (
            self.one._cluster.alive, self.two._cluster.alive) == (2, 2))
        # As kill -9 leaves it: no goodbye, its database sessions just end.
        self.one.service.stopService()
        self.one.store.db.close()
        yield self.until("instance 2 marks the laptop offline",
                         lambda: self.members(gpu) == {"gpu": True, "laptop": False})
        self.assertEqual(self.two._cluster.alive, 1)
        _, phone = self.node(self.two, "phone")
        three = self.instance()
        _, watch = self.node(three, "watch")
        yield self.until("the new instance's node sees every member",
                         lambda: set(self.members(watch)) == {"gpu", "laptop", "phone", "watch"})
        self.assertTrue(self.members(watch)["gpu"])
