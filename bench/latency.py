"""
Latency benchmark: the round-trip time twistvpn and stock wireguard-go add,
in one run, on this machine (root; `.venv/bin/python bench/latency.py`).

The ping part of bench/throughput.py on its own, with more samples and
per-ping statistics: for raw veth, wireguard-go <-> wireguard-go,
twistvpn <-> twistvpn (as installed, and its pure-Python build), and
twistvpn without the stay-awake timer (two namespaces over a veth pair,
tunnel MTU 1420),
pings 50 ms apart (the path cold between pings) and 2 ms apart (kept
warm), after the first handshake; with --idle-pings, also pings 1 s apart
(ping's default: the node idle between them).  Every set-up is measured --runs times,
the runs interleaved; the table shows the median over runs of each run's
mean and median RTT.  Writes every run as JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from benchjson import save
from throughput import (
    SETUPS,
    _median,
    add_run_options,
    build,
    builds,
    ping_rtts,
    with_reference,
)

from twistvpn.table import columns
from twistvpn.testing import netns

LATENCY_SETUPS = [s for s in SETUPS if s[0] != "twistvpn <-> wireguard-go"] + [
    ("twistvpn <-> twistvpn, --stay-awake-ms 0",
     [netns.TWISTVPN_NO_STAY_AWAKE, netns.TWISTVPN_NO_STAY_AWAKE]),
]
METRICS = ("mean", "median", "p90")


def spacings(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    """(label, seconds apart, count) of each set of pings a run sends."""
    chosen = [("50ms", 0.05, args.pings), ("2ms", 0.002, args.busy_pings)]
    if args.idle_pings:
        chosen.append(("1s", 1.0, args.idle_pings))
    return chosen


def measure(name: str, kinds: list[str] | None, args: argparse.Namespace) -> dict[str, Any]:
    with netns.Network(prefix="tvl") as network:
        a_ns, _, target, processes, _ = build(network, kinds)
        result: dict[str, Any] = {"setup": name, "builds": builds(processes)}
        for label, interval, count in spacings(args):
            result[label] = ping_rtts(network, a_ns, target, count, interval)
    print(
        f"  {name}: {result['50ms']['mean']:.3f} / {result['2ms']['mean']:.3f} ms",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pings", type=int, default=100, help="pings 50 ms apart")
    parser.add_argument("--busy-pings", type=int, default=300, help="pings 2 ms apart")
    parser.add_argument("--idle-pings", type=int, default=0,
                        help="pings 1 s apart (default none: 20 take 20 s a set-up and run)")
    add_run_options(parser, [name for name, _ in LATENCY_SETUPS], runs=5)
    args = parser.parse_args(argv)
    missing = netns.missing_requirements("wireguard-go", "wg", "ping")
    if missing:
        print(f"latency benchmark: cannot run: {missing}", file=sys.stderr)
        return 1
    if args.runs < 1 or args.pings < 1 or args.busy_pings < 1 or args.idle_pings < 0:
        parser.error("--runs, --pings and --busy-pings must be at least 1, --idle-pings 0 "
                     "or more")
    started = time.time()
    runs: list[list[dict[str, Any]]] = []
    for number in range(1, args.runs + 1):
        print(f"run {number} of {args.runs}", flush=True)
        runs.append(
            [
                measure(name, kinds, args)
                for name, kinds in with_reference(LATENCY_SETUPS, args)
                if not args.only or name in args.only
            ]
        )
    labels = [label for label, _, _ in spacings(args)]
    header = ["setup"] + [f"{m} ms {s}" for s in labels for m in METRICS]
    rows = []
    medians = []
    for name in [r["setup"] for r in runs[0]]:
        mine = [next(r for r in run if r["setup"] == name) for run in runs]
        median = {
            s: {m: _median([r[s][m] for r in mine]) for m in METRICS} for s in labels
        }
        medians.append({"setup": name, **median})
        rows.append(
            [name]
            + [
                "-" if median[s][m] is None else f"{median[s][m]:.3f}"
                for s in labels
                for m in METRICS
            ]
        )
    print()
    print(f"medians of {args.runs} run(s), pings after the first handshake:")
    print(columns(header, rows))
    if not args.no_save:
        options = {"pings": args.pings, "busy_pings": args.busy_pings,
                   "idle_pings": args.idle_pings, "runs": args.runs}
        save("latency", started, {"options": options, "medians": medians, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
