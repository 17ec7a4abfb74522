"""
Stock WireGuard devices through the relay (issue 18), two measurements:

1. mac1 look-up: what the relay spends on one device's handshake
   initiation to find its node among N reachable nodes (the node whose mac1
   key validates is last, in the middle, or none), against one keyed BLAKE2s
   MAC in the same run.  Plain Python, no root.
2. With --lab (root): device -> node against node -> node through the same
   embedded relay, in the lab: sites A and B behind hard NATs (so node pairs
   are relayed too), a stock wireguard-go device on a2 from the file
   `twistvpn admin device add` printed, twistvpn nodes on a1 and b1.  Ping
   RTT (50 pings, 20 ms apart) and TCP throughput (iperf3, 3 s) of a2 -> b1
   and a1 -> b1, interleaved, medians of --rounds.

    .venv/bin/python bench/devices.py [--nodes 1000] [--lab] [--rounds 3]

Prints tables and writes bench/results/devices-<time>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from twistvpn.relay.devices import DeviceRouter
from twistvpn.wireguard.keys import generate_private_key, public_key
from twistvpn.wireguard.messages import INITIATION_MAC1, INITIATION_SIZE, LABEL_MAC1
from twistvpn.wireguard.noise import blake2s_hash


def initiation_for(node: bytes) -> bytes:
    """An initiation-shaped datagram whose mac1 is valid for C{node}."""
    body = bytes([1, 0, 0, 0]) + os.urandom(INITIATION_MAC1 - 4)
    mac1 = hashlib.blake2s(body, digest_size=16, key=blake2s_hash(LABEL_MAC1, node)).digest()
    return body + mac1 + bytes(16)


def per_call(function: Any, repeat: int) -> float:
    """Median of five timings of C{repeat} calls, in microseconds per call."""
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeat):
            function()
        samples.append((time.perf_counter() - started) / repeat * 1e6)
    return statistics.median(samples)


def mac1_costs(sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    body = os.urandom(INITIATION_MAC1)
    key = os.urandom(32)
    one_mac = per_call(lambda: hashlib.blake2s(body, digest_size=16, key=key).digest(), 20000)
    for n in sizes:
        nodes = [public_key(generate_private_key()) for _ in range(n)]
        router = DeviceRouter(secret=b"b" * 32)
        router.set_reachable(nodes)
        order = list(router._mac1_keys)  # the order they are tried in
        last, middle = initiation_for(order[-1]), initiation_for(order[len(order) // 2])
        stranger = initiation_for(public_key(generate_private_key()))
        assert len(last) == INITIATION_SIZE
        repeat = max(20, 20000 // n)
        row = {"nodes": n, "one_mac_us": one_mac}
        for name, datagram in (("last", last), ("middle", middle), ("none", stranger)):
            route = router.from_device
            row[f"{name}_us"] = per_call(
                lambda d=datagram, r=route: r(d, ("198.51.100.1", 1), 0.0), repeat)
        assert router.counters["device_drop_no_node"] > 0
        rows.append(row)
    return rows


def lab_compare(rounds: int) -> dict[str, Any]:
    from twistvpn.testing import netns
    from twistvpn.testing.lab import JoinedLab

    missing = netns.missing_requirements("wireguard-go", "wg", "iperf3", "ping")
    if missing:
        raise SystemExit(f"--lab: {missing}")
    results: dict[str, dict[str, list[float]]] = {
        "device": {"rtt_ms": [], "tcp_mbps": []}, "node": {"rtt_ms": [], "tcp_mbps": []}}
    with netns.Network(prefix="tvb") as network:
        lab = JoinedLab(network, "hard", "hard", hosts_a=2, device_hosts=("a2",))
        lab.start()
        text = lab.admin("device", "add", lab.network_id, "phone")
        lab.start_device("a2", text)
        ips = lab.overlay_ips()
        sources = {"device": next(h for h in lab.hosts if h.name == "a2").namespace,
                   "node": lab.nodes["a1"].host.namespace}
        for source in sources.values():
            netns.wait_for_ping(network, source, ips["b1"], 30)
        paths = lab.nodes["a1"].paths()
        if paths.get("b1") != "relay":
            raise SystemExit(f"a1 -> b1 is not relayed ({paths.get('b1')}): no comparison")
        server = lab.nodes["b1"].host.namespace
        for _ in range(rounds):
            for name, source in sources.items():
                done = netns.ping(network, source, ips["b1"], count=50, interval=0.02)
                loss, rtt = netns.ping_stats(done.stdout.decode(errors="replace"))
                if rtt is not None and loss == 0:
                    results[name]["rtt_ms"].append(rtt)
                report = netns.iperf3(network, server, source, ips["b1"], seconds=3)
                results[name]["tcp_mbps"].append(netns.tcp_throughput_bps(report) / 1e6)
    return {name: {k: statistics.median(v) if v else None for k, v in r.items()}
            | {"samples": r} for name, r in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--nodes", type=int, default=1000, help="reachable nodes (largest)")
    parser.add_argument("--lab", action="store_true", help="also device vs node (root)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (--lab)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.nodes < 1 or args.rounds < 1:
        parser.error("--nodes and --rounds must be at least 1")
    sizes = sorted({1, 10, 100, args.nodes})
    rows = mac1_costs(sizes)
    print(f"{'nodes':>6} {'found last':>11} {'in middle':>10} {'no node':>9} {'1 MAC':>7}")
    for row in rows:
        print(f"{row['nodes']:>6} {row['last_us']:>9.1f}us {row['middle_us']:>8.1f}us "
              f"{row['none_us']:>7.1f}us {row['one_mac_us']:>5.2f}us")
    out: dict[str, Any] = {"mac1": rows}
    if args.lab:
        compare = lab_compare(args.rounds)
        out["lab"] = compare
        print(f"\n{'through the relay':24} {'RTT (ms)':>9} {'TCP (Mbit/s)':>13}")
        for name, label in (("device", "device a2 -> node b1"), ("node", "node a1 -> node b1")):
            r = compare[name]
            print(f"{label:24} {r['rtt_ms'] or 0:>9.3f} {r['tcp_mbps'] or 0:>13.0f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"devices-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
