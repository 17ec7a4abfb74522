"""
Joined mode across real kernel NAT (root only): the lab's rendezvous,
sites behind Linux NAT routers in network namespaces and twistd nodes,
driven through the admin CLI as users do (L{twistvpn.testing.lab.JoinedLab}).

One lab per NAT pairing, each taken through as many checks as it honestly
supports, so the suite stays within a few minutes on two cores:

* easy x easy, two hosts on site A: the LAN pair goes lan, the cross-site
  pairs direct; the rendezvous killed, pings over established tunnels keep
  flowing; restarted, every node registers again with no member or IP
  lost; a node's LAN address changes and its tunnels recover; a member
  deauthorized, not one of its packets arrives after 5 s;
* easy x hard: direct, or relayed with the upgrade still being attempted;
* hard x hard: relayed;
* UDP blocked at one site: relayed over TLS on TCP;
* routers without a firewall on themselves: easy x easy and easy x hard
  direct (openers).

Every wait is bounded; every namespace and process is removed by its own
name and pid (L{twistvpn.testing.netns.Network.close}), also on failure.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from twisted.trial import unittest

from tests.support.requirements import joined_mode_missing
from tests.support.steps import run_step
from twistvpn.testing import netns
from twistvpn.testing.lab import JoinedLab, PathResult

TRANSFER_BYTES = 8 * 1024 * 1024


class NatTestCase(unittest.SynchronousTestCase):
    skip = joined_mode_missing()

    def lab(self, nat_a: str, nat_b: str, hosts_a: int = 1) -> JoinedLab:
        network = netns.Network(prefix="tvn")
        self.addCleanup(network.close)
        self.current = JoinedLab(network, nat_a, nat_b, hosts_a=hosts_a)
        self.step("starting the lab", self.current.start)
        return self.current

    def step(self, name: str, check: Callable[[], object]) -> None:
        """One step of a scenario; its name heads any failure, with the logs."""
        run_step(self, self.current.network, name, check)

    def first_pings(self, lab: JoinedLab, settle: float) -> dict[tuple[str, str], PathResult]:
        """Every pair's first ping (all must answer), then their paths once settled."""
        results = lab.first_pings(30)

        def answered() -> None:
            silent = [r.label for r in results if r.first_ping_s is None]
            self.assertEqual(silent, [], "pairs that never answered")

        self.step("every pair answers", answered)
        lab.settle(results, timeout=settle)
        return {(r.source, r.destination): r for r in results}

    def ping_ok(self, lab: JoinedLab, source: str, destination: str, count: int = 10) -> None:
        ip = lab.ips[destination]
        completed = netns.ping(lab.network, lab.nodes[source].host.namespace, ip,
                               count=count, interval=0.1)
        loss, _ = netns.ping_stats(completed.stdout.decode(errors="replace"))
        self.assertEqual(loss, 0.0, f"{source} -> {destination}: {loss:.0f} % lost")

    def recovers(self, lab: JoinedLab, source: str, destination: str,
                 timeout: float = 30.0) -> None:
        ip = lab.ips[destination]
        netns.wait_for_ping(lab.network, lab.nodes[source].host.namespace, ip, timeout)


class EasyEasy(NatTestCase):
    def test_lifecycle(self) -> None:
        lab = self.lab("easy", "easy", hosts_a=2)
        pairs = self.first_pings(lab, settle=10)

        def lan() -> None:
            for pair in (("a1", "a2"), ("a2", "a1")):
                self.assertEqual(pairs[pair].path, "lan", pairs[pair])

        self.step("two hosts behind one NAT", lan)
        before = {name: (m["node_id"], m["ip"], m["authorized"])
                  for name, m in lab.members().items()}

        def rendezvous_killed() -> None:
            # Relayed tunnels die with it (the relay is embedded); direct
            # and LAN tunnels must not notice.
            established = [pair for pair, r in pairs.items() if r.path in ("lan", "direct")]
            self.assertIn(("a1", "a2"), established)
            lab.kill_rendezvous()
            for source, destination in established:
                self.ping_ok(lab, source, destination)

        self.step("the rendezvous killed, established tunnels keep flowing", rendezvous_killed)

        def rendezvous_restarted() -> None:
            lab.start_rendezvous()

            def all_online() -> bool:
                members = lab.members()
                return len(members) == 3 and all(m["online"] for m in members.values())

            netns.wait_for(all_online, 40, "every node to register again", interval=0.5)
            after = {name: (m["node_id"], m["ip"], m["authorized"])
                     for name, m in lab.members().items()}
            self.assertEqual(after, before)
            for source, destination in pairs:
                self.recovers(lab, source, destination)

        self.step("the rendezvous restarted", rendezvous_restarted)

        def roaming() -> None:
            netns.change_address(lab.network, lab.nodes["a1"].host, "192.168.1.52")
            self.recovers(lab, "a1", "b1")
            self.recovers(lab, "b1", "a1")
            self.recovers(lab, "a2", "a1")

        self.step("a node's LAN address changes", roaming)

        def deauthorized() -> None:
            ips = lab.ips
            receivers = [lab.nodes[name].host.namespace for name in ("a1", "b1")]
            sender = netns.start_udp_sender(
                lab.network, lab.nodes["a2"].host.namespace, [ips["a1"], ips["b1"]], 25)
            netns.wait_for(
                lambda: all(netns.count_packets(lab.network, ns, ips["a2"]) > 3
                            for ns in receivers),
                10, "a2's pings to arrive", interval=0.2)
            lab.deauthorize("a2")
            time.sleep(5)
            counted = [netns.count_packets(lab.network, ns, ips["a2"]) for ns in receivers]
            time.sleep(4)
            self.assertTrue(sender.running(), "a2 kept sending all along")
            later = [netns.count_packets(lab.network, ns, ips["a2"]) for ns in receivers]
            self.assertEqual(later, counted, "packets of a2 arrived more than 5 s after")
            self.ping_ok(lab, "a1", "b1", count=5)  # the others still talk

        self.step("a member deauthorized", deauthorized)

        def direct() -> None:
            for pair in (("a1", "b1"), ("b1", "a1"), ("a2", "b1"), ("b1", "a2")):
                self.assertEqual(pairs[pair].path, "direct", pairs[pair])

        self.step("easy x easy goes direct", direct)


class Traversal(NatTestCase):
    def test_easy_hard(self) -> None:
        """Direct, or relayed while the upgrade keeps being attempted."""
        lab = self.lab("easy", "hard")
        router_b = lab.sites["b"].router
        assert router_b is not None
        probes = lab.sites["a"].public_ip
        netns.count_packets(lab.network, router_b, probes, chain="PREROUTING")
        pairs = self.first_pings(lab, settle=10)
        first = netns.count_packets(lab.network, router_b, probes, chain="PREROUTING")
        if all(r.path == "direct" for r in pairs.values()):
            return
        self.assertEqual({r.path for r in pairs.values()}, {"relay"})
        # Probes from A's public address straight to B's router: traversal
        # attempts (relayed traffic goes through the rendezvous's address).
        netns.wait_for(
            lambda: netns.count_packets(lab.network, router_b, probes, chain="PREROUTING") > first,
            25, "another traversal attempt from site A", interval=0.5)

    def test_hard_hard(self) -> None:
        lab = self.lab("hard", "hard")
        pairs = self.first_pings(lab, settle=5)
        self.assertEqual({r.path for r in pairs.values()}, {"relay"}, pairs)
        self.ping_ok(lab, "a1", "b1")

    def test_udp_blocked(self) -> None:
        lab = self.lab("udpblock", "easy")
        pairs = self.first_pings(lab, settle=0)
        self.assertEqual({r.first_path for r in pairs.values()}, {"relay"}, pairs)
        assert lab.rendezvous is not None
        relay = netns.admin_json(lab.rendezvous, "status")["relays"]["embedded"]
        self.assertGreaterEqual(relay["sessions_tcp"], 1, relay)
        self.ping_ok(lab, "a1", "b1")



class PreAuthKeys(NatTestCase):
    """
    Issue 15: headless nodes behind NATs (easy and hard) join with
    single-use pre-auth keys and ping each other without any admin action;
    a key used a second time, and an expired key, leave their nodes pending,
    each saying why in one line that does not show the key.
    """

    def test_keys_behind_nats(self) -> None:
        network = netns.Network(prefix="tvk")
        self.addCleanup(network.close)
        lab = self.current = JoinedLab(network, "easy", "hard", hosts_a=3)
        self.step("building the lab", lab.build)
        self.step("starting the rendezvous", lab.start_rendezvous)
        self.step("creating the network", lab.create_network)
        key_a = lab.admin("key", "create", lab.network_id).strip()
        key_b = lab.admin("key", "create", lab.network_id).strip()
        expired = lab.admin("key", "create", lab.network_id, "--expires", "1s").strip()
        time.sleep(1.2)  # past its expiry before anything joins
        hosts = {host.name: host for host in lab.hosts}
        assert lab.rendezvous is not None

        def start(name: str, key: str) -> None:
            path = network.write_private(f"key-{name}", key + "\n")
            lab.nodes[name] = netns.start_joined_node(
                network, hosts[name], lab.rendezvous, lab.network_id,
                extra_args=["--auth-key-file", str(path)])

        def authorized(*names: str) -> Callable[[], bool]:
            return lambda: all(lab.members().get(n, {}).get("authorized") for n in names)

        started = time.monotonic()
        start("a1", key_a)
        start("b1", key_b)
        self.step("a1 and b1 authorized by their keys", lambda: netns.wait_for(
            authorized("a1", "b1"), 20, "a1 and b1 to be authorized by their keys"))
        lab.ips = lab.overlay_ips()
        lab.authorized_at = started
        results = lab.first_pings(30, pairs=[("b1", "a1"), ("a1", "b1")])
        silent = [r.label for r in results if r.first_ping_s is None]
        self.assertEqual(silent, [], "pairs that never answered")
        self.first_ping_s = max(r.first_ping_s or 0.0 for r in results)
        print(f"pre-auth key to first ping across two NATs: {self.first_ping_s:.2f} s")

        start("a2", key_a)  # the same single-use key, a second time
        start("a3", expired)
        self.step("a2 and a3 joined", lambda: netns.wait_for(
            lambda: {"a2", "a3"} <= set(lab.members()), 20, "a2 and a3 to join"))
        time.sleep(2)
        members = lab.members()
        keys = lab.admin("key", "list")
        self.assertFalse(members["a2"]["authorized"], f"a2 authorized: {members}\n{keys}")
        self.assertFalse(members["a3"]["authorized"], f"a3 authorized: {members}\n{keys}")
        for name, why, key in (("a2", "used already", key_a), ("a3", "expired", expired)):
            process = lab.nodes[name].process
            assert process is not None
            log = process.log()
            self.assertIn(why, log)
            self.assertNotIn(key, log)


class NoFirewall(NatTestCase):
    """
    Issue 17: routers without a firewall on themselves (a bare MASQUERADE
    router keeps a peer's early probe in conntrack and maps its own host's
    packets to that peer elsewhere: the clash).  The strategies' openers,
    which die in the lab's core router, keep the peer's router clean, so
    easy x easy goes direct at once and easy x hard by the birthday rounds.
    """

    def direct(self, nat_a: str, nat_b: str, settle: float) -> None:
        lab = self.lab(nat_a, nat_b)
        pairs = self.first_pings(lab, settle=settle)

        def direct() -> None:
            for pair in (("a1", "b1"), ("b1", "a1")):
                self.assertEqual(pairs[pair].path, "direct", pairs[pair])
            self.ping_ok(lab, "a1", "b1")

        self.step(f"{nat_a} x {nat_b} goes direct", direct)

    def test_easy_easy(self) -> None:
        self.direct("easynf", "easynf", settle=10)

    def test_easy_hard(self) -> None:
        self.direct("easynf", "hard", settle=40)

    def test_hard_easy(self) -> None:
        self.direct("hard", "easynf", settle=40)


class PortMapping(NatTestCase):
    """
    Issue 17: hard x hard goes direct when one side's router maps a port,
    for each of UPnP IGD, PCP and NAT-PMP and in both orders; the mapping is
    deleted from the real miniupnpd when the node stops.
    """

    skip = joined_mode_missing() or netns.missing_requirements("nft", "miniupnpd")

    def check(self, nat_a: str, nat_b: str) -> None:
        lab = self.lab(nat_a, nat_b)
        pairs = self.first_pings(lab, settle=10)

        def direct() -> None:
            if any(pairs[pair].path != "direct" for pair in (("a1", "b1"), ("b1", "a1"))):
                for name in ("a1", "b1"):
                    print(f"==== {name}'s status", netns.node_status(lab.network, lab.nodes[name]))
            for pair in (("a1", "b1"), ("b1", "a1")):
                self.assertEqual(pairs[pair].path, "direct", pairs[pair])

        self.step(f"{nat_a} x {nat_b} goes direct", direct)
        mapped = "a1" if "+" in nat_a else "b1"
        site = lab.sites[mapped[0]]
        assert site.router is not None
        protocol = (nat_a if mapped == "a1" else nat_b).partition("+")[2]
        report = json.loads(netns.node_command(lab.network, lab.nodes[mapped],
                                               "netcheck", "--json").stdout)
        self.assertEqual(report["port_mapping"]["protocol"], protocol, report["port_mapping"])
        forward = f"dnat ip to {lab.nodes[mapped].host.address}:41641"

        def rules() -> str:
            assert site.router is not None
            return lab.network.run(site.router, ["nft", "list", "chain", "inet", "filter",
                                                 "prerouting_miniupnpd"]).stdout.decode()

        self.assertIn(forward, rules())

        def deleted() -> None:
            process = lab.nodes[mapped].process
            assert process is not None
            lab.network.stop(process)
            netns.wait_for(lambda: forward not in rules(), 5, "the mapping's deletion")

        self.step("the mapping is deleted when the node stops", deleted)

    def test_upnp_side_a(self) -> None:
        self.check("hard+upnp", "hard")

    def test_upnp_side_b(self) -> None:
        self.check("hard", "hard+upnp")

    def test_pcp_side_a(self) -> None:
        self.check("hard+pcp", "hard")

    def test_pcp_side_b(self) -> None:
        self.check("hard", "hard+pcp")

    def test_natpmp_side_a(self) -> None:
        self.check("hard+natpmp", "hard")

    def test_natpmp_side_b(self) -> None:
        self.check("hard", "hard+natpmp")


class OverlayIPv6(NatTestCase):
    """
    Issue 17: every member has an address in the network's ULA prefix;
    ping6 and TCP work across the tunnel, and the TCP segments take the
    TUN's offload path (joined into TCPv6 GSO writes the kernel splits).
    """

    def test_ping6_and_tcp(self) -> None:
        lab = self.lab("easy", "hard")
        self.first_pings(lab, settle=10)
        status = {name: netns.node_status(lab.network, lab.nodes[name]) for name in ("a1", "b1")}
        ip6 = {name: next(iter(s["networks"].values()))["ip6"] for name, s in status.items()}

        def pings() -> None:
            for source, destination in (("a1", "b1"), ("b1", "a1")):
                netns.wait_for_ping(lab.network, lab.nodes[source].host.namespace,
                                    ip6[destination])
                completed = netns.ping(lab.network, lab.nodes[source].host.namespace,
                                       ip6[destination], count=10, interval=0.05)
                loss, _ = netns.ping_stats(completed.stdout.decode(errors="replace"))
                self.assertEqual(loss, 0.0, f"ping6 {source} -> {destination}")

        self.step("ping6 across the overlay", pings)

        def transfers() -> None:
            for source, destination, port in (("a1", "b1", 7001), ("b1", "a1", 7002)):
                transfer = netns.start_transfer(
                    lab.network, lab.nodes[destination].host.namespace,
                    lab.nodes[source].host.namespace, ip6[destination], TRANSFER_BYTES,
                    port=port)
                sent, done = transfer.wait(60)
                self.assertEqual(sent.split()[1:], done.split()[1:], f"{source} -> {destination}")
                self.assertEqual(int(done.split()[1]), TRANSFER_BYTES)

        self.step("8 MiB over TCP/IPv6 each way, hashes equal", transfers)


class DualStack(NatTestCase):
    """
    Issue 17: with global IPv6 behind each router (no NAT, a firewall that
    lets in only answers), hard x hard goes direct over IPv6, where IPv4
    alone leaves it on the relay.
    """

    def test_hard_hard_over_ipv6(self) -> None:
        network = netns.Network(prefix="tv6")
        self.addCleanup(network.close)
        lab = self.current = JoinedLab(network, "hard", "hard", hosts_a=1, ipv6=True)
        self.step("starting the dual-stack lab", lab.start)
        pairs = self.first_pings(lab, settle=10)

        def over_ipv6() -> None:
            for source, destination in (("a1", "b1"), ("b1", "a1")):
                self.assertEqual(pairs[(source, destination)].path, "direct")
                status = netns.node_status(network, lab.nodes[source])
                [peer] = status["peers"]
                self.assertTrue(peer["endpoint"].startswith("[2001:db8:"), peer["endpoint"])

        self.step("hard x hard goes direct over IPv6", over_ipv6)

        def learned_from_the_rendezvous() -> None:
            # Its discovery ports answer on 2001:db8::10 too: each node saw
            # its IPv6 public endpoint (no NAT66: its own address and port),
            # at the latest by its next discovery round (every 20 s) when the
            # first one's packets were lost.
            for name, prefix in (("a1", "2001:db8:a"), ("b1", "2001:db8:b")):
                expected = f"[{prefix}::2]:41641"
                netns.wait_for(
                    lambda name=name, expected=expected: netns.node_status(
                        network, lab.nodes[name]).get("public_endpoint6") == expected,
                    25, f"{name}'s IPv6 public endpoint", interval=0.5)

        self.step("the IPv6 public endpoint learned from the rendezvous",
                  learned_from_the_rendezvous)
