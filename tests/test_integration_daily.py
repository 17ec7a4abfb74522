"""
Daily use across real kernel NAT (root only), as a user types it: nodes
set up with C{twistvpn join --rendezvous ... --auth-key-file ...} and
C{twistvpn set}, started as C{twistd -n twistvpn-node --data-dir DIR}
and nothing else; names answered by the nodes (C{dig}); a second network
joined and the first left at run time; a node killed with SIGKILL and
started again.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import time
from collections.abc import Callable

from twisted.trial import unittest

from tests.support.requirements import joined_mode_missing
from tests.support.steps import run_step
from twistvpn.testing import netns
from twistvpn.testing.lab import JoinedLab


def _missing() -> str | None:
    return joined_mode_missing() or (None if shutil.which("dig") else
                                     "needs dig (Debian package dnsutils)")


class DailyUse(unittest.SynchronousTestCase):
    skip = _missing()

    def step(self, name: str, check: Callable[[], object]) -> None:
        run_step(self, self.lab.network, name, check)

    def key_file(self, network_id: str, name: str) -> str:
        key = self.lab.admin("key", "create", network_id, "--reusable").strip()
        return str(self.lab.network.write_private(name, key + "\n"))

    def members(self, network_id: str) -> dict[str, dict]:
        assert self.lab.rendezvous is not None
        found = netns.admin_json(self.lab.rendezvous, f"networks/{network_id}/members")
        return {m["name"]: m for m in found}

    def networks(self, name: str) -> dict[str, dict]:
        out = netns.node_command(self.lab.network, self.lab.nodes[name], "networks", "--json")
        return {row["id"]: row for row in json.loads(out.stdout)}

    def test_daily_use(self) -> None:
        network = netns.Network(prefix="tvd")
        self.addCleanup(network.close)
        lab = self.lab = JoinedLab(network, "easy", "easy", hosts_a=1)
        self.step("building the lab", lab.build)
        self.step("starting the rendezvous", lab.start_rendezvous)
        first = lab.create_network()
        rendezvous = lab.rendezvous
        assert rendezvous is not None
        hosts = {host.name: host for host in lab.hosts}

        # -- one command to join, one to run ------------------------------------------
        key = self.key_file(first, "key-first")
        for name in ("a1", "b1"):
            node = netns.configure_node(network, hosts[name], rendezvous, first)
            netns.node_command(network, node, "join", first, "--auth-key-file", key)
            lab.nodes[name] = node
        started = time.monotonic()
        for node in lab.nodes.values():
            netns.start_node(network, node)
        self.step("authorized by the key, no admin", lambda: netns.wait_for(
            lambda: all(m["authorized"] for m in self.members(first).values())
            and len(self.members(first)) == 2, 20, "a1 and b1 to be authorized"))
        lab.ips = lab.overlay_ips()
        results = lab.first_pings(30)
        self.assertEqual([r.label for r in results if r.first_ping_s is None], [])
        print(f"`twistd -n twistvpn-node --data-dir DIR` with a pre-auth key to the first "
              f"ping across two NATs: {time.monotonic() - started:.2f} s")
        ips = lab.ips
        a1, b1 = lab.nodes["a1"], lab.nodes["b1"]
        ns_a = a1.host.namespace

        # -- names -------------------------------------------------------------------
        domain = self.networks("a1")[first]["domain"]
        self.assertEqual(domain, "lab.twistvpn.internal")

        def names() -> None:
            # Asked of b1 over the tunnel, and of a1 itself.
            for server in (ips["b1"], ips["a1"]):
                self.assertEqual(netns.dig(network, ns_a, server, f"b1.{domain}"),
                                 ("NOERROR", [ips["b1"]]))
            reverse = ipaddress.ip_address(ips["b1"]).reverse_pointer
            self.assertEqual(netns.dig(network, ns_a, ips["a1"], reverse, "PTR"),
                             ("NOERROR", [f"b1.{domain}."]))
            self.assertEqual(netns.dig(network, ns_a, ips["a1"], f"nobody.{domain}"),
                             ("NXDOMAIN", []))
            self.assertEqual(netns.dig(network, ns_a, ips["a1"], "example.org")[0], "REFUSED")

        self.step("dig answers the members' names", names)

        def ipv6() -> None:
            # Every member also has an address in the network's ULA prefix.
            b6 = self.networks("b1")[first]["ip6"]
            self.assertTrue(b6.startswith("fd"), b6)
            try:
                netns.wait_for_ping(network, ns_a, b6, 10)
            except netns.HarnessError:
                for ns in (ns_a, b1.host.namespace):
                    for what in (["addr"], ["route"]):
                        print(ns, network.command(["ip", "-6", "-n", ns, *what],
                                                  check=False).stdout.decode())
                print(json.dumps(netns.node_status(network, a1), indent=1)[:3000])
                raise
            self.assertEqual(netns.dig(network, ns_a, ips["b1"], f"b1.{domain}", "AAAA"),
                             ("NOERROR", [b6]))

        self.step("IPv6 across the overlay, and AAAA", ipv6)

        def renamed() -> None:
            netns.node_command(network, b1, "set", "name", "gpu-server")
            renamed_at = time.monotonic()
            netns.wait_for(
                lambda: netns.dig(network, ns_a, ips["a1"], f"gpu-server.{domain}")[1]
                == [ips["b1"]], 10, "the new name to be answered", interval=0.2)
            print(f"rename to answer: {time.monotonic() - renamed_at:.2f} s")
            self.assertEqual(netns.dig(network, ns_a, ips["a1"], f"b1.{domain}")[0],
                             "NXDOMAIN")

        self.step("renaming a member changes the answer within seconds", renamed)

        # -- a second network at run time; the first left ----------------------------------
        second = lab.admin("network", "create", "second").strip()
        key2 = self.key_file(second, "key-second")
        second_ips: dict[str, str] = {}

        def joined_second() -> None:
            for node in (a1, b1):
                out = netns.node_command(network, node, "join", second, "--auth-key-file", key2)
                self.assertEqual(out.stdout.decode().strip(), f"{second}: authorized")
            netns.wait_for(lambda: len([m for m in self.members(second).values()
                                        if m["ip"]]) == 2, 10, "both in the second network")
            second_ips.update({("b1" if name == "gpu-server" else name): m["ip"]
                               for name, m in self.members(second).items()})
            netns.wait_for_ping(network, ns_a, second_ips["b1"], 20)
            netns.wait_for_ping(network, ns_a, ips["b1"], 5)  # the first still works

        self.step("a second network joined at run time", joined_second)

        def left_first() -> None:
            netns.node_command(network, a1, "leave", first)
            routes = network.command(["ip", "-n", ns_a, "route"]).stdout.decode()
            first_subnet = str(ipaddress.ip_network(f"{ips['b1']}/24", strict=False))
            self.assertNotIn(first_subnet, routes)
            addresses = network.command(["ip", "-n", ns_a, "addr"]).stdout.decode()
            self.assertNotIn(ips["a1"], addresses)
            lost = netns.ping(network, ns_a, ips["b1"], count=2, timeout=5)
            self.assertNotEqual(lost.returncode, 0)
            netns.wait_for_ping(network, ns_a, second_ips["b1"], 5)
            self.assertEqual(list(self.networks("a1")), [second])

        self.step("the first network left: its route and address go", left_first)

        # -- a crash: the same node comes back ------------------------------------------------
        def crash() -> None:
            before = netns.node_status(network, a1)
            assert a1.process is not None
            network.kill(a1.process)
            netns.start_node(network, a1)
            netns.wait_for(lambda: (netns.node_status(network, a1) or {}).get("node_id"),
                           20, "a1 to register again", interval=0.2)
            netns.wait_for_ping(network, ns_a, second_ips["b1"], 30)
            after = netns.node_status(network, a1)
            self.assertEqual(after["node_id"], before["node_id"])
            self.assertEqual(after["networks"][second]["ip"], second_ips["a1"])
            self.assertEqual(list(after["networks"]), [second])  # the left one stays left

        self.step("kill -9 and start again: same node, same IP, traffic resumes", crash)
