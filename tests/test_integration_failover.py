"""
Two rendezvous instances on one real PostgreSQL, and two nodes behind real
kernel NATs that know both (root, PostgreSQL's binaries): an admin change
made on one instance reaches the node connected to the other; instance 1
killed with SIGKILL in the middle of a loop of admin changes, no committed
change is lost, its node is registered with instance 2 within 10 s and
pings between the nodes (every 0.2 s) lose nothing; instance 1 started
again catches up.

The database is a throwaway cluster on a UNIX socket in a temporary
directory (twistvpn/testing/postgres.py), which the instances' namespaces
share with us: it is files, not network.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.trial import unittest

from tests.support.requirements import joined_mode_missing
from tests.support.steps import run_step
from twistvpn.testing import netns
from twistvpn.testing.lab import RENDEZVOUS_IP, JoinedLab
from twistvpn.testing.postgres import Cluster, postgres_missing

SECOND_IP = "203.0.113.11"
PINGS = 150  # every 0.2 s: 30 s, across the kill and the fail-over
FAILOVER_LIMIT = 10.0


class TwoInstances(unittest.SynchronousTestCase):
    skip = joined_mode_missing() or postgres_missing()

    def step(self, name: str, check: Callable[[], object]) -> None:
        run_step(self, self.network, name, check)

    def setUp(self) -> None:
        self.postgres = Cluster()
        self.addCleanup(self.postgres.stop)  # after the instances are gone
        self.postgres.start()
        self.network = netns.Network(prefix="tvh")
        self.addCleanup(self.network.close)
        self.lab = JoinedLab(self.network, "easy", "easy", hosts_a=1, hosts_b=1)
        self.database = ["--database", self.postgres.dsn]

    def start_instance(self, namespace: str, ip: str,
                       again: netns.Rendezvous | None = None) -> netns.Rendezvous:
        """An instance on the database (C{again}: this one, or one with its own directory)."""
        return netns.start_rendezvous(self.network, namespace, ip, rendezvous=again,
                                      extra=self.database)

    def admin(self, instance: netns.Rendezvous, *args: str) -> Any:
        return self.network.command(instance.admin_argv(*args), check=False, timeout=30)

    def registered_with(self, name: str, where: str) -> bool:
        process = self.lab.nodes[name].process
        assert process is not None
        return f"registered with the rendezvous {where}:8443" in process.log()

    def peer_names(self, name: str) -> set[str]:
        status = netns.node_status(self.network, self.lab.nodes[name])
        peers = status.get("peers", []) if isinstance(status, dict) else []
        return {p.get("name") for p in peers if isinstance(p, dict)}

    def test_failover(self) -> None:
        lab, network = self.lab, self.network
        instances: dict[str, netns.Rendezvous] = {}

        def start() -> None:
            lab.build()
            second = network.add_namespace("rd2")
            lab.internet.attach(second, f"{SECOND_IP}/24")
            instances["one"] = self.start_instance(lab.rendezvous_namespace, RENDEZVOUS_IP)
            instances["two"] = self.start_instance(second, SECOND_IP, again=netns.Rendezvous(
                second, SECOND_IP, network.tmpdir / network.name("rdv2")))
            self.instance_two_namespace = second
            one, two = instances["one"].url, instances["two"].url
            # One identity: nodes pin one fingerprint whichever they reach.
            self.assertEqual(one.partition("#")[2], two.partition("#")[2])
            lab.rendezvous = instances["one"]
            lab.create_network()
            hosts = {h.name: h for h in lab.hosts}
            # a1 prefers instance 1, b1 instance 2.
            lab.nodes["a1"] = netns.start_joined_node(
                network, hosts["a1"], instances["one"], lab.network_id,
                extra_args=["--rendezvous", two])
            lab.nodes["b1"] = netns.start_joined_node(
                network, hosts["b1"], instances["two"], lab.network_id,
                extra_args=["--rendezvous", one])
            lab.wait_pending()
            self.assertTrue(self.registered_with("a1", RENDEZVOUS_IP))
            self.assertTrue(self.registered_with("b1", SECOND_IP))

        self.step("two instances on one database, a node on each", start)

        def authorized_on_one() -> None:
            lab.authorize()  # through instance 1 only
            results = lab.first_pings(30)
            silent = [r.label for r in results if r.first_ping_s is None]
            self.assertEqual(silent, [], "the node on instance 2 never learned its peer")
            lab.settle(results, timeout=10)
            for result in results:
                print(f"{result.label}: first ping {result.first_ping_s:.2f} s, "
                      f"path {lab.path(result.source, result.destination)}")

        self.step("authorized on instance 1: the node on instance 2 learns it",
                  authorized_on_one)

        committed: dict[str, str] = {}
        in_flight: dict[str, str] = {}
        pings: list[netns.Process] = []

        def killed_during_admin_changes() -> None:
            for source, destination in (("a1", "b1"), ("b1", "a1")):
                ip = lab.ips[destination]
                netns.check_address(ip)
                pings.append(network.spawn(
                    lab.nodes[source].host.namespace,
                    ["ping", "-n", "-q", "-i", "0.2", "-c", str(PINGS), "-W", "2", ip],
                    log_name=f"ping-{source}"))
            stop = threading.Event()

            def changes() -> None:
                """Rename the members in turn through instance 1 until it is gone."""
                for i in range(1000):
                    if stop.is_set():
                        return
                    member = ("a1", "b1")[i % 2]
                    name = f"{member}-{i}"
                    in_flight[member] = name
                    node_id = lab.nodes[member].node_id
                    assert node_id is not None
                    done = self.admin(instances["one"], "member", "rename", lab.network_id,
                                      node_id, name)
                    if done.returncode != 0:
                        return
                    committed[member] = name

            loop = threading.Thread(target=changes)
            loop.start()
            try:
                time.sleep(3)
                network.kill(instances["one"].process)  # type: ignore[arg-type]
                killed = time.monotonic()
            finally:
                stop.set()
                loop.join(60)
            print(f"admin changes committed before the kill: {committed}")
            self.assertEqual(set(committed), {"a1", "b1"})
            took = netns.wait_for(
                lambda: self.registered_with("a1", SECOND_IP) and time.monotonic() - killed,
                FAILOVER_LIMIT, "a1 to register with instance 2")
            print(f"a1 registered with instance 2 {took:.2f} s after the kill")
            self.assertLessEqual(took, FAILOVER_LIMIT)

        self.step("instance 1 killed during admin changes: a1 moves to instance 2",
                  killed_during_admin_changes)

        def nothing_committed_lost() -> None:
            members = {m["node_id"]: m for m in netns.admin_json(
                instances["two"], f"networks/{lab.network_id}/members")}
            for member, name in committed.items():
                node_id = lab.nodes[member].node_id
                # The change in flight at the kill may or may not have committed.
                self.assertIn(members[node_id]["name"], {name, in_flight[member]})
            # Both nodes, both on instance 2 now, see what instance 2 says.
            for source, destination in (("a1", "b1"), ("b1", "a1")):
                wanted = members[lab.nodes[destination].node_id]["name"]
                netns.wait_for(lambda s=source, w=wanted: w in self.peer_names(s), 10,
                               f"{source} to see {wanted}")

        self.step("no committed change lost", nothing_committed_lost)

        def traffic_never_stopped() -> None:
            for process in pings:
                process.popen.wait(PINGS * 0.2 + 30)
                loss, rtt = netns.ping_stats(process.log())
                print(f"{' '.join(process.argv[-1:])}: {loss:.0f} % lost, avg {rtt} ms")
                self.assertEqual(loss, 0.0, process.log())

        self.step("pings every 0.2 s across the kill: none lost", traffic_never_stopped)

        def back_again() -> None:
            node_id = lab.nodes["b1"].node_id
            assert node_id is not None
            done = self.admin(instances["two"], "member", "rename", lab.network_id, node_id,
                              "b1-after")
            self.assertEqual(done.returncode, 0, done.stderr)
            instances["one"] = self.start_instance(lab.rendezvous_namespace, RENDEZVOUS_IP,
                                                   again=instances["one"])

            def caught_up() -> bool:
                members = netns.admin_json(instances["one"],
                                           f"networks/{lab.network_id}/members")
                names = {m["name"] for m in members}
                return "b1-after" in names and all(m["online"] for m in members)

            netns.wait_for(caught_up, 15, "instance 1 to list every change and both nodes "
                           "online", interval=0.2)

        self.step("instance 1 started again catches up", back_again)
