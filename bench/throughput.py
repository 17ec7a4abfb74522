"""
Throughput benchmark: twistvpn against stock wireguard-go, in one run, on
this machine (root; `.venv/bin/python bench/throughput.py`).

Five set-ups, each two network namespaces over a veth pair:

- raw veth (link MTU 1420: the baseline, no VPN);
- wireguard-go <-> wireguard-go;
- twistvpn <-> twistvpn (the build installed: compiled, see
  docs/performance.md);
- twistvpn <-> twistvpn, pure Python (the same install with
  TWISTVPN_PURE_PYTHON=1);
- twistvpn <-> twistvpn, --tso off (the compiled build reading plain
  packets from its TUN device);
- twistvpn <-> wireguard-go (twistvpn sending);

each tunnel with MTU 1420 over a 1500-byte veth.  For each: iperf3 TCP (one
stream), iperf3 UDP at a fixed offered rate, ping RTT (20 pings 50 ms apart, and
100 pings 2 ms apart: the path kept warm), and the CPU seconds
the two VPN processes spent per GB moved and per TCP segment sent
through the tunnel (from /proc/<pid>/stat, and the bytes iperf3 sent over
its MSS: with TSO the sending tunnel interface's tx_packets counts 64 KiB
packets).  Every set-up is measured --runs times, the runs interleaved
so that a change in the machine's load hits all set-ups alike; the table
shows medians, and each tunnel's TCP ratio to wireguard-go is the median
of the ratios within a run.  Writes every run as JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from benchjson import save

from twistvpn.table import columns
from twistvpn.testing import netns
from twistvpn.testing.netns import TWISTVPN, TWISTVPN_NO_TSO, TWISTVPN_PURE, WIREGUARD_GO

SETUPS: list[tuple[str, list[str] | None]] = [
    ("raw veth", None),
    ("wireguard-go <-> wireguard-go", [WIREGUARD_GO, WIREGUARD_GO]),
    ("twistvpn <-> twistvpn", [TWISTVPN, TWISTVPN]),
    ("twistvpn <-> twistvpn, pure Python", [TWISTVPN_PURE, TWISTVPN_PURE]),
    ("twistvpn <-> twistvpn, --tso off", [TWISTVPN_NO_TSO, TWISTVPN_NO_TSO]),
    ("twistvpn <-> wireguard-go", [TWISTVPN, WIREGUARD_GO]),
]


def cpu(processes: list[netns.Process]) -> float:
    return sum(p.cpu_seconds() for p in processes)


def tx_packets(network: netns.Network, namespace: str, ifname: str | None) -> int:
    """Packets the kernel has sent into the interface (0 without one)."""
    if ifname is None:
        return 0
    path = f"/sys/class/net/{ifname}/statistics/tx_packets"
    return int(network.run(namespace, ["cat", path]).stdout)


def segments(report: dict[str, Any], tx: int) -> int:
    """
    TCP segments sent: the bytes over iperf3's MSS.  The tunnel's own
    tx_packets (C{tx}) counts what the kernel handed it, which with TSO is
    one packet of up to 64 KiB for some 45 segments; without TSO the two
    agree (1,368 bytes a packet in earlier runs).
    """
    mss = report.get("start", {}).get("tcp_mss_default")
    sent = report["end"]["sum_sent"]["bytes"]
    return -(-sent // mss) if mss and tx else tx


def build(
    network: netns.Network, kinds: list[str] | None
) -> tuple[str, str, str, list[netns.Process], str | None]:
    """
    Two namespaces over a veth pair, with a tunnel of C{kinds} (none: the raw
    veth), pinged once through (the first handshake): (namespace a,
    namespace b, the address to reach b at, VPN processes, a's tunnel).
    """
    if kinds is None:
        a_ns = network.add_namespace("a")
        b_ns = network.add_namespace("b")
        network.veth(a_ns, b_ns, "203.0.113.1/24", "203.0.113.2/24", mtu=1420)
        target = "203.0.113.2"
        processes: list[netns.Process] = []
        tunnel = None
    else:
        a, b = netns.build_mesh(network, kinds, mtu=1420)
        a_ns, b_ns, target = a.namespace, b.namespace, b.overlay_ip
        processes = [n.process for n in (a, b) if n.process is not None]
        tunnel = a.ifname
    netns.wait_for_ping(network, a_ns, target)
    return a_ns, b_ns, target, processes, tunnel


def builds(processes: list[netns.Process]) -> list[str]:
    """Which build each twistvpn node ran, from its start-up line."""
    found = []
    for process in processes:
        for line in process.log().splitlines():
            if "twistvpn node up" in line and "; " in line:
                found.append(line.rsplit("; ", 1)[1].strip())
    return found


def ping_rtts(
    network: netns.Network, namespace: str, target: str, count: int, interval: float
) -> dict[str, Any]:
    """
    C{count} pings C{interval} s apart: every reply's RTT (ms), their mean
    (what ping's summary reports), median and 90th percentile, and the loss.
    """
    netns.check_address(target)
    pinged = network.run(
        namespace,
        ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", target],
        check=False,
        timeout=30 + count * (interval + 0.01),
    )
    rtts = [
        float(line.split("time=")[1].split()[0])
        for line in pinged.stdout.decode().splitlines()
        if "time=" in line
    ]
    ordered = sorted(rtts)
    return {
        "rtts_ms": rtts,
        "loss_percent": 100.0 * (count - len(rtts)) / count,
        "mean": statistics.fmean(rtts) if rtts else None,
        "median": statistics.median(rtts) if rtts else None,
        "p90": ordered[int(0.9 * (len(ordered) - 1))] if rtts else None,
    }


def measure(name: str, kinds: list[str] | None, args: argparse.Namespace) -> dict[str, Any]:
    with netns.Network(prefix="tvb") as network:
        a_ns, b_ns, target, processes, tunnel = build(network, kinds)
        cold = ping_rtts(network, a_ns, target, args.pings, 0.05)
        # The same path kept warm: pings 2 ms apart.
        warm = ping_rtts(network, a_ns, target, 100, 0.002)
        loss, rtt, rtt_busy = cold["loss_percent"], cold["mean"], warm["mean"]

        before = cpu(processes)
        packets_before = tx_packets(network, a_ns, tunnel)
        tcp = netns.iperf3(network, b_ns, a_ns, target, seconds=args.seconds)
        tcp_cpu = cpu(processes) - before
        tcp_bytes = tcp["end"]["sum_received"]["bytes"]
        tcp_packets = segments(tcp, tx_packets(network, a_ns, tunnel) - packets_before)

        before = cpu(processes)
        udp = netns.iperf3(
            network,
            b_ns,
            a_ns,
            target,
            seconds=args.udp_seconds,
            udp=True,
            bitrate=args.udp_rate,
        )
        udp_cpu = cpu(processes) - before
        udp_bps, udp_loss = netns.udp_result(udp)
        udp_bytes = udp_bps * args.udp_seconds / 8
        running = builds(processes)
    result = {
        "setup": name,
        "builds": running,
        "tcp_bps": netns.tcp_throughput_bps(tcp),
        "tcp_retransmits": tcp["end"]["sum_sent"].get("retransmits"),
        "udp_offered": args.udp_rate,
        "udp_received_bps": udp_bps,
        "udp_loss_percent": udp_loss,
        "ping_loss_percent": loss,
        "rtt_ms": rtt,
        "rtt_busy_ms": rtt_busy,
        "rtt_median_ms": cold["median"],
        "rtt_busy_median_ms": warm["median"],
        "cpu_s_per_gb_tcp": tcp_cpu / (tcp_bytes / 1e9) if processes and tcp_bytes else None,
        "tcp_packets": tcp_packets,
        "cpu_us_per_packet_tcp": tcp_cpu / tcp_packets * 1e6 if tcp_packets else None,
        "cpu_s_per_gb_udp": udp_cpu / (udp_bytes / 1e9) if processes and udp_bytes else None,
    }
    print(f"  {name}: TCP {result['tcp_bps'] / 1e6:.0f} Mbit/s", flush=True)
    return result


METRICS = (
    "tcp_bps",
    "udp_received_bps",
    "udp_loss_percent",
    "rtt_ms",
    "rtt_busy_ms",
    "rtt_median_ms",
    "rtt_busy_median_ms",
    "cpu_s_per_gb_tcp",
    "cpu_s_per_gb_udp",
    "cpu_us_per_packet_tcp",
)
WIREGUARD_GO_SETUP = "wireguard-go <-> wireguard-go"


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per set-up: the median of each metric, and of the TCP ratio to wireguard-go within a run."""
    names = [r["setup"] for r in runs[0]]
    summary = []
    for name in names:
        rows = [next(r for r in run if r["setup"] == name) for run in runs]
        median: dict[str, Any] = {"setup": name, "runs": len(rows)}
        for metric in METRICS:
            median[metric] = _median([r[metric] for r in rows])
        ratios: list[float | None] = []
        for run in runs:
            wg = next((r for r in run if r["setup"] == WIREGUARD_GO_SETUP), None)
            mine = next(r for r in run if r["setup"] == name)
            ok = wg is not None and wg["tcp_bps"] and name != "raw veth"
            ratios.append(mine["tcp_bps"] / wg["tcp_bps"] if ok else None)  # type: ignore[index]
        median["tcp_ratio_to_wireguard_go"] = _median(ratios)
        summary.append(median)
    raw = next((r for r in summary if r["setup"] == "raw veth"), None)
    for r in summary:
        added = None
        if raw is not None and raw["rtt_ms"] is not None and r["rtt_ms"] is not None:
            added = r["rtt_ms"] - raw["rtt_ms"] if r is not raw else None
        r["rtt_added_ms"] = added
    return summary


def table(summary: list[dict[str, Any]]) -> str:
    def num(value: float | None, fmt: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(value / scale, fmt)

    header = (
        "setup",
        "TCP Mbit/s",
        "vs wg-go",
        "UDP Mbit/s (loss)",
        "RTT ms",
        "RTT ms 2 ms apart",
        "CPU s/GB TCP",
        "CPU s/GB UDP",
        "CPU us/packet TCP",
    )
    rows = [
        (
            r["setup"],
            num(r["tcp_bps"], ".0f", 1e6),
            num(r["tcp_ratio_to_wireguard_go"], ".2f"),
            f"{r['udp_received_bps'] / 1e6:.0f} ({r['udp_loss_percent']:.1f} %)",
            num(r["rtt_ms"], ".3f"),
            num(r["rtt_busy_ms"], ".3f"),
            num(r["cpu_s_per_gb_tcp"], ".1f"),
            num(r["cpu_s_per_gb_udp"], ".1f"),
            num(r["cpu_us_per_packet_tcp"], ".1f"),
        )
        for r in summary
    ]
    return columns(header, rows)


def add_run_options(parser: argparse.ArgumentParser, names: list[str], runs: int) -> None:
    """The options every namespace benchmark here takes: --runs, --only, --no-save."""
    parser.add_argument("--runs", type=int, default=runs, help="runs of every set-up (medians)")
    parser.add_argument(
        "--only", action="append", choices=[*names, REFERENCE],
        help="run only these set-ups (repeatable)",
    )
    parser.add_argument("--no-save", action="store_true", help="do not write JSON")
    parser.add_argument(
        "--reference", metavar="SRC",
        help="also measure the twistvpn in this source tree (a checkout's src/, e.g. of "
        "an earlier commit) as 'twistvpn <-> twistvpn, reference', in the same runs",
    )


REFERENCE = "twistvpn <-> twistvpn, reference"


def with_reference(
    setups: list[tuple[str, list[str] | None]], args: argparse.Namespace
) -> list[tuple[str, list[str] | None]]:
    """C{setups}, and the --reference tree's node as a set-up of its own."""
    if not args.reference:
        return setups
    source = os.path.abspath(args.reference)
    if not os.path.isdir(os.path.join(source, "twistvpn")):
        raise SystemExit(f"--reference: no twistvpn package in {source}")
    netns.TWISTVPN_KINDS[REFERENCE] = ({"PYTHONPATH": source}, ())
    return [*setups, (REFERENCE, [REFERENCE, REFERENCE])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="iperf3 TCP duration")
    parser.add_argument("--udp-seconds", type=float, default=5, help="iperf3 UDP duration")
    parser.add_argument("--udp-rate", default="1G", help="iperf3 UDP offered rate (-b)")
    parser.add_argument("--pings", type=int, default=20, help="pings per set-up")
    add_run_options(parser, [name for name, _ in SETUPS], runs=3)
    args = parser.parse_args(argv)
    missing = netns.missing_requirements("wireguard-go", "wg", "iperf3", "ping")
    if missing:
        print(f"throughput benchmark: cannot run: {missing}", file=sys.stderr)
        return 1
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    started = time.time()
    runs: list[list[dict[str, Any]]] = []
    for number in range(1, args.runs + 1):
        print(f"run {number} of {args.runs}", flush=True)
        results = []
        for name, kinds in with_reference(SETUPS, args):
            if args.only and name not in args.only:
                continue
            results.append(measure(name, kinds, args))
        runs.append(results)
    summary = summarise(runs)
    print()
    print(f"medians of {args.runs} run(s):")
    print(table(summary))
    if not args.no_save:
        options = {
            "seconds": args.seconds,
            "udp_seconds": args.udp_seconds,
            "udp_rate": args.udp_rate,
            "tunnel_mtu": 1420,
            "runs": args.runs,
        }
        save("throughput", started, {"options": options, "medians": summary, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
