"""
C{twistvpn lab}: a whole twistvpn network on one machine, in network
namespaces, measured and torn down again.

The lab is the project's demonstration and its end-to-end check.  By
default (L{JoinedLab}): a rendezvous on a simulated internet
(203.0.113.0/24) and two sites behind Linux NAT routers of the chosen kinds
(two hosts on site A's LAN, one on site B's); it starts the rendezvous and
joined nodes with twistd, creates a network, authorizes the nodes with
C{twistvpn admin}, pings across every pair and prints which path each took
and its time to first ping.  With C{--static}: two twistvpn nodes and a
stock wireguard-go peer from wg-quick files with generated keys, ping and
iperf3 across every pair.  Either way it removes everything it built, also
on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, TextIO

from twistvpn.common.datadir import load_or_create_key
from twistvpn.rendezvous import wgquick
from twistvpn.table import columns
from twistvpn.testing import netns
from twistvpn.wireguard.keys import encode_key, public_key


@dataclass(frozen=True)
class HostSpec:
    """One lab host: the VPN it runs."""

    kind: str  # netns.TWISTVPN or netns.WIREGUARD_GO


DEFAULT_HOSTS = (
    HostSpec(netns.TWISTVPN),
    HostSpec(netns.TWISTVPN),
    HostSpec(netns.WIREGUARD_GO),
)


@dataclass
class PairResult:
    source: netns.VpnNode
    destination: netns.VpnNode
    loss: float
    rtt_ms: float | None
    throughput_bps: float | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return (
            f"{self.source.label} ({self.source.kind}) -> "
            f"{self.destination.label} ({self.destination.kind})"
        )


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "lab",
        help="build a twistvpn network behind NATs in namespaces, measure it, remove it (root)",
        description="Build a simulated internet (203.0.113.0/24) in network namespaces with "
        "a rendezvous on it and two sites behind Linux NAT routers (two hosts on site A's "
        "LAN, one on site B's), start the rendezvous and the nodes, create a network and "
        "authorize the nodes with `twistvpn admin`, ping across every pair, print which "
        "path each pair took and its time to first ping, and remove everything (also on "
        "Ctrl-C or failure). With --static: the static-mode demo (two twistvpn nodes and a "
        "wireguard-go peer, iperf3). Needs root.",
    )
    p.add_argument("--nat-a", choices=netns.SITE_MODES, default="easy",
                   help="site A's NAT (default easy)")
    p.add_argument("--nat-b", choices=netns.SITE_MODES, default="easy",
                   help="site B's NAT (default easy)")
    p.add_argument("--ipv6", action="store_true",
                   help="dual stack: global IPv6 (2001:db8::/32) behind each NAT router, "
                        "with a firewall that lets in only answers")
    p.add_argument("--static", action="store_true",
                   help="the static-mode demo instead (wireguard-go interop, iperf3)")
    p.add_argument(
        "--timeout", type=_positive, default=30.0,
        help="seconds each pair may take to its first ping (default 30)",
    )
    p.add_argument(
        "--settle", type=_positive, default=10.0,
        help="seconds relayed pairs may take to go direct before the matrix is printed "
             "(default 10; an easy NAT meeting a hard one can take 11 s: 25)",
    )
    p.add_argument(
        "--seconds", type=_positive, default=3.0,
        help="--static: iperf3 duration per pair (default 3)",
    )
    p.add_argument(
        "--pings",
        type=int,
        default=10,
        choices=range(1, 101),
        metavar="N",
        help="pings per direction after the first (default 10)",
    )
    p.add_argument("--mtu", type=int, default=1420, help="tunnel MTU (default 1420)")
    p.add_argument(
        "--all-throughput",
        action="store_true",
        help="run iperf3 across every pair, not only twistvpn to twistvpn",
    )
    p.set_defaults(func=run)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 60")
    return value


class _TerminatedError(Exception):
    pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _TerminatedError()


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    static = getattr(args, "static", False)
    needs = ("wireguard-go", "wg", "iperf3", "ping") if static else ("iptables", "ping")
    missing = netns.missing_requirements(*needs)
    if missing:
        out.write(f"twistvpn lab: cannot run: {missing}\n")
        return 1
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.monotonic()
    try:
        with netns.Network(prefix="tvl") as network:
            if static:
                out.write(f"twistvpn lab {network.run_id}: building {len(DEFAULT_HOSTS)} hosts\n")
                results = run_lab(network, DEFAULT_HOSTS, args, out)
                out.write(format_table(results))
                failed = any(r.loss > 0 or r.error for r in results)
            else:
                failed = not run_joined_lab(network, args, out)
            out.write("removing the lab...\n")
    except (KeyboardInterrupt, _TerminatedError):
        out.write("twistvpn lab: interrupted; everything it built is removed\n")
        return 130
    except netns.HarnessError as e:
        out.write(f"twistvpn lab: failed: {e}\neverything it built is removed\n")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    out.write(f"done in {time.monotonic() - started:.1f}s\n")
    return 1 if failed else 0


def run_lab(
    network: netns.Network, hosts: Sequence[HostSpec], args: argparse.Namespace, out: TextIO
) -> list[PairResult]:
    nodes = netns.build_mesh(network, [h.kind for h in hosts], mtu=args.mtu)
    for node in nodes:
        out.write(
            f"  {node.label}: {node.kind:13} {node.underlay_ip:15} overlay "
            f"{node.overlay_ip} ({node.namespace})\n"
        )
    results = []
    for source, destination in itertools.permutations(nodes, 2):
        # The first packet waits for a handshake; measure after it.
        try:
            netns.wait_for_ping(network, source.namespace, destination.overlay_ip)
        except netns.HarnessError as e:
            results.append(PairResult(source, destination, 100.0, None, error=str(e)))
            continue
        completed = netns.ping(
            network, source.namespace, destination.overlay_ip, count=args.pings, interval=0.05
        )
        loss, rtt = netns.ping_stats(completed.stdout.decode(errors="replace"))
        results.append(PairResult(source, destination, loss, rtt))
    for result in results:
        wanted = args.all_throughput or (
            result.source.kind == result.destination.kind == netns.TWISTVPN
        )
        if not wanted or result.error:
            continue
        out.write(f"  iperf3 {result.label} for {args.seconds:g}s...\n")
        try:
            report = netns.iperf3(
                network,
                result.destination,
                result.source.namespace,
                result.destination.overlay_ip,
                seconds=args.seconds,
            )
            result.throughput_bps = netns.tcp_throughput_bps(report)
        except netns.HarnessError as e:
            result.error = str(e)
    return results


def format_table(results: Sequence[PairResult]) -> str:
    rows = [
        (
            r.label,
            f"{r.loss:.0f} %",
            "-" if r.rtt_ms is None else f"{r.rtt_ms:.2f} ms",
            "-" if r.throughput_bps is None else f"{r.throughput_bps / 1e6:.1f} Mbit/s",
        )
        for r in results
    ]
    errors = [f"{r.label}: {r.error}" for r in results if r.error]
    table = columns(("pair", "ping loss", "RTT", "TCP throughput"), rows)
    return table + "".join(f"{line}\n" for line in errors)


# -- the joined-mode lab: a rendezvous, sites behind NATs, nodes that join -------------

RENDEZVOUS_IP = "203.0.113.10"
# Each site's router WAN address, or its first host's when the site is open.
SITE_ADDRESSES = {"a": ("203.0.113.21", "203.0.113.31", "192.168.1"),
                  "b": ("203.0.113.22", "203.0.113.41", "192.168.2")}
# With --ipv6: each router's WAN address on the internet's /64, and its LAN's /64.
IPV6_WAN = {"a": "2001:db8::21", "b": "2001:db8::22"}
RENDEZVOUS_IP6 = "2001:db8::10"  # with --ipv6: discovery answers there too
RELAY_IP = "203.0.113.11"  # a standalone relay, when the lab runs one
RELAY_LINK_PORT = 8446
RELAY_ADMIN_PORT = 8449
IPV6_LAN = {"a": "2001:db8:a", "b": "2001:db8:b"}
PATH_KINDS = ("lan", "direct", "relay")


@dataclass
class PathResult:
    """One ordered pair of the path matrix."""

    source: str
    destination: str
    first_ping_s: float | None  # from the last authorization to the first reply
    path: str | None = None  # the source's path to the destination, once settled
    first_path: str | None = None  # the same when the first reply came
    loss: float | None = None
    rtt_ms: float | None = None

    @property
    def label(self) -> str:
        return f"{self.source} -> {self.destination}"


class JoinedLab:
    """
    The joined-mode lab over a L{netns.Network}: the simulated internet, the
    rendezvous on it, sites A and B behind their NATs, a node on every host,
    and the admin flow users follow.  The tests drive the same object.
    """

    def __init__(self, network: netns.Network, nat_a: str = "easy", nat_b: str = "easy",
                 hosts_a: int = 2, hosts_b: int = 1, ipv6: bool = False,
                 device_hosts: tuple[str, ...] = (), standalone_relay: bool = False) -> None:
        self.network = network
        # A standalone twistvpn-relay at RELAY_IP instead of the embedded one.
        self.standalone_relay = standalone_relay
        self.relay_process: netns.Process | None = None
        # Hosts that run a stock WireGuard (wireguard-go) as a device, not a node.
        self.device_hosts = device_hosts
        self.ipv6 = ipv6  # dual stack: global IPv6 behind each NAT router (2001:db8::/32)
        self.modes = {"a": nat_a, "b": nat_b}
        self.host_counts = {"a": hosts_a, "b": hosts_b}
        self.sites: dict[str, netns.Site] = {}
        self.rendezvous: netns.Rendezvous | None = None
        self.network_id = ""
        self.nodes: dict[str, netns.NodeProcess] = {}
        self.authorized_at: float | None = None
        self.ips: dict[str, str] = {}  # overlay IPs, as of the last authorization

    # -- building --------------------------------------------------------------------

    def build(self) -> None:
        """Namespaces, links and NAT routers."""
        # A router, not a bridge: one hop between any two of its members, as
        # on the internet (a node's openers die there: twistvpn.traversal).
        self.internet = internet = self.network.add_core("net")
        self.rendezvous_namespace = self.network.add_namespace("rdv")
        self.rendezvous_if = internet.attach(self.rendezvous_namespace, f"{RENDEZVOUS_IP}/24")
        for name in ("a", "b"):
            router_ip, open_ip, lan = SITE_ADDRESSES[name]
            mode = self.modes[name]
            self.sites[name] = netns.add_site(
                self.network, name, internet, open_ip if mode == "open" else router_ip, lan,
                mode=mode, hosts=self.host_counts[name],
            )
        if self.ipv6:
            self._add_ipv6()

    def _add_ipv6(self) -> None:
        """Each NAT site's router and hosts get global IPv6 (no NAT, a stateful firewall)."""
        self.internet.add_address(self.rendezvous_namespace, self.rendezvous_if,
                                  f"{RENDEZVOUS_IP6}/64")
        behind = {name: site for name, site in self.sites.items() if site.router is not None}
        for name, site in behind.items():
            netns.add_ipv6(self.network, site, f"{IPV6_WAN[name]}/64", IPV6_LAN[name])
            assert site.wan_if is not None
            self.internet.reach(site.wan_if, f"{IPV6_WAN[name]}/64")
            self.internet.route(f"{IPV6_LAN[name]}::/64", IPV6_WAN[name])
            # The rendezvous answers the site's discovery requests through its router.
            self.network.ip("-6", "route", "replace", f"{IPV6_LAN[name]}::/64", "via",
                            IPV6_WAN[name], namespace=self.rendezvous_namespace)
        for name, site in behind.items():
            for other in behind:
                if other != name:
                    netns.route_ipv6(self.network, site, f"{IPV6_LAN[other]}::/64",
                                     IPV6_WAN[other])

    @property
    def hosts(self) -> list[netns.Host]:
        return [h for site in self.sites.values() for h in site.hosts]

    def start_rendezvous(self) -> netns.Rendezvous:
        """Start it (or start it again, keeping its data directory)."""
        extra = ["--udp-interface6", RENDEZVOUS_IP6] if self.ipv6 else []
        if self.standalone_relay:
            extra += ["--no-relay", "--relay-link",
                      f"tcp:{RELAY_LINK_PORT}:interface={RENDEZVOUS_IP}",
                      "--relay-key", self._relay_key()]
        self.rendezvous = netns.start_rendezvous(
            self.network, self.rendezvous_namespace, RENDEZVOUS_IP, rendezvous=self.rendezvous,
            extra=extra,
        )
        if self.standalone_relay and self.relay_process is None:
            self._start_relay()
        return self.rendezvous

    def _relay_dir(self) -> str:
        return str(self.network.tmpdir / "relay")

    def _relay_key(self) -> str:
        """The standalone relay's public key (its key file made now, as it would be)."""
        os.makedirs(self._relay_dir(), mode=0o700, exist_ok=True)
        private = load_or_create_key(os.path.join(self._relay_dir(), "relay.key"))
        return encode_key(public_key(private))

    def _start_relay(self) -> None:
        """C{twistd twistvpn-relay} in its own namespace on the internet, logged in."""
        assert self.rendezvous is not None
        namespace = self.network.add_namespace("rly")
        self.internet.attach(namespace, f"{RELAY_IP}/24")
        fingerprint = self.rendezvous.url.partition("#")[2]
        process = self.network.spawn(namespace, [
            *netns.TWISTD, "-n", "--pidfile=", "twistvpn-relay",
            "--rendezvous", f"twistvpn://{RENDEZVOUS_IP}:{RELAY_LINK_PORT}#{fingerprint}",
            "--udp-port", "443", "--udp-interface", RELAY_IP,
            "--tcp", f"tcp:443:interface={RELAY_IP}", "--public-host", RELAY_IP,
            "--data-dir", self._relay_dir(), "--admin",
            f"tcp:{RELAY_ADMIN_PORT}:interface=127.0.0.1"], log_name="relay")
        self.relay_process = process
        self.relay_namespace = namespace

        def logged_in() -> bool:
            if not process.running():
                raise netns.HarnessError(f"the relay exited:\n{process.log()}")
            return "logged in to the rendezvous" in process.log()

        netns.wait_for(logged_in, 20, "the standalone relay to log in", interval=0.1)

    def kill_rendezvous(self) -> None:
        """SIGKILL: the rendezvous's machine dies."""
        assert self.rendezvous is not None and self.rendezvous.process is not None
        self.network.kill(self.rendezvous.process)

    def admin(self, *args: str) -> str:
        assert self.rendezvous is not None
        return netns.admin(self.network, self.rendezvous, *args)

    def create_network(self) -> str:
        self.network_id = self.admin("network", "create", "lab").strip()
        return self.network_id

    def start_nodes(self, auth_keys: dict[str, str] | None = None) -> None:
        """Start every host's node; with a pre-auth key for a host, it joins with it."""
        assert self.rendezvous is not None
        for host in self.hosts:
            if host.name in self.device_hosts:
                continue
            extra: list[str] = []
            if self.sites[host.name[0]].mode.endswith("+natpmp"):
                # miniupnpd answers PCP too; this site's nodes ask NAT-PMP alone.
                extra += ["--port-mapping", "natpmp"]
            key = (auth_keys or {}).get(host.name)
            if key is not None:
                path = self.network.write_private(f"auth-key-{host.name}", key + "\n")
                extra += ["--auth-key-file", str(path)]
            self.nodes[host.name] = netns.start_joined_node(
                self.network, host, self.rendezvous, self.network_id, extra_args=extra
            )

    def members(self) -> dict[str, dict[str, Any]]:
        """The network's members by name (the admin API's JSON)."""
        assert self.rendezvous is not None
        found = netns.admin_json(self.rendezvous, f"networks/{self.network_id}/members")
        return {m["name"]: m for m in found}

    def wait_pending(self, timeout: float = 30.0) -> None:
        """Until every node has joined (pending authorization); learn their IDs."""

        def joined() -> bool:
            for node in self.nodes.values():
                if node.process is not None and not node.process.running():
                    raise netns.HarnessError(f"node {node.name} exited:\n{node.process.log()}")
            members = self.members()
            for name, node in self.nodes.items():
                if name in members:
                    node.node_id = members[name]["node_id"]
            return all(node.node_id for node in self.nodes.values())

        netns.wait_for(joined, timeout, "every node to join the network", interval=0.2)

    def authorize(self, *names: str) -> None:
        """C{twistvpn admin member auth} for each (every node when none named)."""
        for name in names or tuple(self.nodes):
            node_id = self.nodes[name].node_id
            assert node_id is not None
            self.admin("member", "auth", self.network_id, node_id)
        self.authorized_at = time.monotonic()
        self.ips = self.overlay_ips()

    def deauthorize(self, name: str) -> None:
        node_id = self.nodes[name].node_id
        assert node_id is not None
        self.admin("member", "deauth", self.network_id, node_id)

    def relay_stats(self) -> dict[str, Any]:
        """The relay's counters: the embedded one's, or the standalone one's /stats."""
        assert self.rendezvous is not None
        if not self.standalone_relay:
            stats: dict[str, Any] = netns.admin_json(self.rendezvous, "status")["relays"][
                "embedded"]
            return stats
        script = ("import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
                  f"'http://127.0.0.1:{RELAY_ADMIN_PORT}/stats', timeout=5).read().decode())")
        done = self.network.run(self.relay_namespace, [sys.executable, "-c", script])
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def start_device(self, host_name: str, config_text: str) -> netns.Process:
        """
        Run stock wireguard-go on C{host_name} as a device, from a wg-quick
        file as C{twistvpn admin device add} prints it: C{wg setconf} takes
        its stripped form, and its Address and AllowedIPs become the
        interface's addresses and routes (what wg-quick does).
        """
        host = next(h for h in self.hosts if h.name == host_name)
        ifname = self.network.interface_name(f"d{host_name}")
        addresses: list[str] = []
        routes: list[str] = []
        for line in config_text.splitlines():
            key, _, value = line.partition("=")
            values = [v.strip() for v in value.split(",") if v.strip()]
            if key.strip() == "Address":
                addresses += values
            elif key.strip() == "AllowedIPs":
                routes += values
        process = netns.start_wireguard_go(self.network, host.namespace, ifname,
                                           wgquick.strip(config_text), addresses)
        for route in routes:
            self.network.ip("route", "replace", route, "dev", ifname,
                            namespace=host.namespace)
        return process

    def overlay_ips(self) -> dict[str, str]:
        return {name: m["ip"] for name, m in self.members().items() if m["ip"]}

    def start(self) -> None:
        """Everything up to authorized nodes: build, rendezvous, network, nodes."""
        self.build()
        self.start_rendezvous()
        self.create_network()
        self.start_nodes()
        self.wait_pending()
        self.authorize()

    # -- measuring --------------------------------------------------------------------

    def pairs(self) -> list[tuple[str, str]]:
        return list(itertools.permutations(sorted(self.nodes), 2))

    def first_pings(self, timeout: float = 30.0,
                    pairs: Sequence[tuple[str, str]] | None = None) -> list[PathResult]:
        """
        Ping every ordered pair at once until its first reply; the time is
        counted from the last authorization (or from now).
        """
        ips = self.ips
        start = self.authorized_at if self.authorized_at is not None else time.monotonic()
        self.authorized_at = None
        todo = list(pairs or self.pairs())
        give_up = time.monotonic() + timeout

        def ping(pair: tuple[str, str]) -> subprocess.Popen[bytes]:
            left = max(1.0, give_up - time.monotonic())
            return netns.ping_until_answered(
                self.network, self.nodes[pair[0]].host.namespace, ips[pair[1]], left
            )

        pings = {pair: ping(pair) for pair in todo}
        results = {}
        deadline = give_up + 5
        try:
            while pings and time.monotonic() < deadline:
                for pair, process in list(pings.items()):
                    status = process.poll()
                    if status is None:
                        continue
                    if status != 0 and time.monotonic() < give_up - 1:
                        # Ended early (no route yet: the node has not had its
                        # map): ping again until the time is up.
                        pings[pair] = ping(pair)
                        continue
                    del pings[pair]
                    answered = time.monotonic() - start if status == 0 else None
                    results[pair] = PathResult(
                        *pair, answered, first_path=self.path(*pair) if status == 0 else None
                    )
                time.sleep(0.02)
        finally:
            for process in pings.values():
                process.kill()
                process.wait(netns.COMMAND_TIMEOUT)
        return [results.get(pair) or PathResult(*pair, None) for pair in todo]

    def path(self, source: str, destination: str) -> str | None:
        """The path C{source}'s node reports to C{destination}."""
        return self.nodes[source].paths().get(destination)

    def settle(self, results: Sequence[PathResult], timeout: float = 10.0) -> None:
        """
        Give the nodes up to C{timeout} s to move relayed pairs to a direct
        path (the upgrade keeps trying), then record each pair's path.
        """
        def settled() -> bool:
            return all(self.path(r.source, r.destination) in ("lan", "direct")
                       for r in results if r.first_ping_s is not None)

        try:
            netns.wait_for(settled, timeout, "direct paths", interval=0.2)
        except netns.HarnessError:
            pass  # some pairs stay relayed: that is a result, not an error
        reported = {name: self.status_paths(name) for name in {r.source for r in results}}
        for r in results:
            r.path = reported[r.source].get(r.destination) or self.path(r.source, r.destination)

    def status_paths(self, name: str) -> dict[str, str]:
        """Each peer's path as C{twistvpn status --json} of node C{name} says."""
        status = netns.node_status(self.network, self.nodes[name])
        peers = status.get("peers", []) if isinstance(status, dict) else []
        return {p["name"]: p["path"] for p in peers
                if isinstance(p, dict) and isinstance(p.get("name"), str)
                and p.get("path") in PATH_KINDS}

    def measure(self, results: Sequence[PathResult], count: int = 5) -> None:
        """Loss and RTT of C{count} pings per answered pair."""
        ips = self.ips
        for r in results:
            if r.first_ping_s is None:
                continue
            completed = netns.ping(self.network, self.nodes[r.source].host.namespace,
                                   ips[r.destination], count=count, interval=0.05)
            r.loss, r.rtt_ms = netns.ping_stats(completed.stdout.decode(errors="replace"))

    def describe(self) -> str:
        lines = []
        assert self.rendezvous is not None
        lines.append(f"  rendezvous {RENDEZVOUS_IP}: {self.rendezvous.url}")
        ips = self.overlay_ips()
        for name, site in self.sites.items():
            where = ("open on the internet" if site.mode == "open"
                     else f"behind {site.public_ip} ({site.mode} NAT)")
            for host in site.hosts:
                node = self.nodes.get(host.name)
                status = netns.node_status(self.network, node) if node else None
                seen = status.get("public_endpoint") if isinstance(status, dict) else None
                lines.append(
                    f"  {host.name}: site {name.upper()} {host.address} {where}, node "
                    f"{node.node_id if node else '-'}, overlay {ips.get(host.name, '-')}, "
                    f"seen as {seen or '-'}"
                )
        return "\n".join(lines) + "\n"


def format_matrix(results: Sequence[PathResult]) -> str:
    """The path matrix: which pair took which path, and when it first answered."""
    rows = [
        (
            r.label,
            r.path or "-",
            r.first_path or "-",
            "no answer" if r.first_ping_s is None else f"{r.first_ping_s:.2f} s",
            "-" if r.loss is None else f"{r.loss:.0f} %",
            "-" if r.rtt_ms is None else f"{r.rtt_ms:.2f} ms",
        )
        for r in results
    ]
    return columns(("pair", "path", "first path", "first ping", "loss", "RTT"), rows)


def run_joined_lab(network: netns.Network, args: argparse.Namespace, out: TextIO) -> bool:
    """Build, start, authorize, ping, print; True when every pair answered."""
    lab = JoinedLab(network, args.nat_a, args.nat_b, ipv6=args.ipv6)
    out.write(f"twistvpn lab {network.run_id}: site A {args.nat_a} (2 hosts), "
              f"site B {args.nat_b} (1 host), rendezvous {RENDEZVOUS_IP}"
              + (", dual stack (IPv6 2001:db8::/32)" if args.ipv6 else "") + "\n")
    lab.build()
    lab.start_rendezvous()
    out.write(f"  network {lab.create_network()}; starting {len(lab.hosts)} nodes\n")
    lab.start_nodes()
    lab.wait_pending()
    lab.authorize()
    results = lab.first_pings(args.timeout)
    out.write(lab.describe())
    out.write("  authorized every node at once; every pair answered or timed out; waiting for "
              "paths to settle...\n")
    lab.settle(results, timeout=args.settle)
    lab.measure(results, args.pings)
    out.write(format_matrix(results))
    return all(r.first_ping_s is not None and r.loss == 0 for r in results)
