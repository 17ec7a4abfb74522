"""
A node in a network of N members: what a real C{twistd twistvpn-node}
process costs holding that map, idle
(`sudo .venv/bin/python bench/bignode.py --members 10000`).

In a network namespace made for the run (loopback only: nothing can leave
it), a real C{twistd twistvpn-rendezvous} holds a public network of
N - 1 members written into its database beforehand (authorized, with
addresses, offline), and one real node (its TUN device, its UDP socket,
TLS to the rendezvous) joins it.  Measured: how long until the node holds
the whole map (``twistvpn status``), its RSS then, its CPU over
C{--idle-seconds} of idling, and how many WireGuard peers it made (lazy
peers: none until traffic needs one).  Prints a table; writes JSON to
bench/results/.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchjson  # noqa: E402

from twistvpn.rendezvous.admin_cli import AdminClient  # noqa: E402
from twistvpn.rendezvous.membership import node_id_of  # noqa: E402
from twistvpn.rendezvous.store import open_store  # noqa: E402
from twistvpn.testing.localrun import TWISTD, LocalRendezvous  # noqa: E402
from twistvpn.testing.netns.namespaces import Network, missing_requirements  # noqa: E402
from twistvpn.wireguard.keys import generate_private_key, public_key  # noqa: E402

SUBNET = "10.77.0.0/16"
POLL = 0.5


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def add_members(db_path: str, network_id: str, count: int) -> None:
    """C{count} authorized members, offline, with the first addresses after ours."""
    store = open_store(db_path)
    hosts = ipaddress.IPv4Network(SUBNET).hosts()
    now = time.time()
    for i in range(count):
        key = public_key(generate_private_key())
        store.add_node(key, node_id_of(key), f"member-{i}", now)
        store.add_member(network_id, key, now, authorized=True, ip=str(next(hosts)))
    store.close()


def node_status(data_dir: str) -> dict[str, Any] | None:
    result = subprocess.run(
        [sys.executable, "-m", "twistvpn", "status", "--json", "--data-dir", data_dir],
        capture_output=True, timeout=30, check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    with Network(prefix="bn") as network:
        namespace = network.add_namespace("ns")
        tmp = str(network.tmpdir)
        log = open(os.path.join(tmp, "rendezvous.log"), "ab")
        rendezvous_dir = os.path.join(tmp, "rendezvous")
        prefix = ("ip", "netns", "exec", namespace)
        rendezvous = LocalRendezvous(rendezvous_dir, log=log, prefix=prefix,
                                     extra_args=("--registration-rate", "0"))
        rendezvous.start()
        try:
            admin = AdminClient(data_dir=rendezvous_dir)
            network_id = admin.create_network("big", SUBNET, private=False)["id"]
        finally:
            rendezvous.kill(15)
        add_members(os.path.join(rendezvous_dir, "rendezvous.sqlite"), network_id,
                    args.members - 1)
        info = rendezvous.start(timeout=120)
        try:
            node_dir = os.path.join(tmp, "node")
            os.mkdir(node_dir, 0o700)
            node = network.spawn(namespace, [
                sys.executable, "-c", TWISTD, "-n", "--pidfile=", "twistvpn-node",
                "--data-dir", node_dir, "--rendezvous", info["url"], "--join", network_id,
                "--name", "bignode", "--interface", network.interface_name("n"),
                "--port", "0", "--dns-port", "0", "--system-dns", "off",
                "--port-mapping", "off", "--control-dir", "",
            ], log_name="node")
            begun = time.monotonic()
            holding = None
            status: dict[str, Any] | None = None
            while time.monotonic() - begun < args.timeout and node.running():
                status = node_status(node_dir)
                net = (status or {}).get("networks", {}).get(network_id) or {}
                if net.get("members") == args.members:
                    holding = time.monotonic() - begun
                    break
                time.sleep(POLL)
            if holding is None:
                raise RuntimeError(f"the node did not get the map of {args.members} in "
                                   f"{args.timeout:.0f} s: {node.log()[-2000:]}")
            time.sleep(args.settle_seconds)  # the map's aftermath (names, the first discovery)
            rss_start = rss_kib(node.pid)
            cpu0 = cpu_seconds(node.pid)
            time.sleep(args.idle_seconds)
            cpu = cpu_seconds(node.pid) - cpu0
            status = node_status(node_dir) or {}
            record = {
                "members": args.members,
                "holding_map_seconds": holding,
                "node_rss_kib": rss_kib(node.pid),
                "node_rss_kib_before_idle": rss_start,
                "idle_seconds": args.idle_seconds,
                "node_cpu_seconds_idle": cpu,
                "node_cpu_percent_idle": 100 * cpu / args.idle_seconds,
                "peers_made": len(status.get("peers", [])),
                "rendezvous_rss_kib": rendezvous.rss_kib(),
            }
            network.stop(node)
        finally:
            rendezvous.kill(15)
            log.close()
    print_table(record)
    benchjson.save("bignode", started, record)
    return record


def print_table(r: dict[str, Any]) -> None:
    rows = [
        ("members", f"{r['members']}"),
        ("node holds the whole map", f"{r['holding_map_seconds']:.1f} s after starting"),
        ("node RSS", f"{r['node_rss_kib'] / 1024:.0f} MiB"),
        ("node CPU idle", f"{r['node_cpu_percent_idle']:.2f} % of a core "
                          f"({r['node_cpu_seconds_idle']:.2f} s in {r['idle_seconds']:.0f} s)"),
        ("WireGuard peers made", f"{r['peers_made']}"),
    ]
    for name, value in rows:
        print(f"{name:28} {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=10000, help="members in all (≥ 2)")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--settle-seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    if args.members < 2:
        parser.error("--members must be at least 2")
    why = missing_requirements("ip")
    if why is not None:
        raise SystemExit(f"bench/bignode.py: {why}")
    try:
        run(args)
    except RuntimeError as e:
        raise SystemExit(f"bench/bignode.py: {e}") from None


if __name__ == "__main__":
    main()
