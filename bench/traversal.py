"""
NAT traversal benchmark: for every pair of NAT presets on the simulated
network, the success rate and the time to the first direct (or LAN) path
over many seeds, and the probes it took.  Prints a table and writes JSON to
bench/results/.

    python bench/traversal.py [--seeds 200] [--loss 0.0] [--deadline 15] [--ipv6]

With --ipv6 both sites are dual stack (IPv6 through stateful firewalls);
the "family" column says which IP version the pairs settled on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from twistvpn.testing.natsim import SAME_NAT
from twistvpn.testing.pathsim import expected, grid_pairs, measure


def fmt(value: float | None, unit: str = "s") -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if unit == "s" and value < 1 else f"{value:.2f} {unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seeds", type=int, default=200, help="runs per pair")
    parser.add_argument("--loss", type=float, default=0.0, help="loss per link (0-1)")
    parser.add_argument("--deadline", type=float, default=15.0,
                        help="simulated seconds per run")
    parser.add_argument("--ipv6", action="store_true", help="dual-stack sites")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.seeds < 1 or not 0 <= args.loss < 1 or args.deadline <= 0:
        parser.error("--seeds >= 1, 0 <= --loss < 1, --deadline > 0")
    rows = []
    started = time.monotonic()
    header = (f"{'pair':34} {'kind':7} {'strategy':11} {'success':>8} {'median':>9} "
              f"{'p90':>9} {'max':>9} {'probes med/max':>15} {'family':>7}")
    print(header)
    print("-" * len(header))
    for a, b in grid_pairs():
        if args.ipv6 and a in SAME_NAT:
            continue
        stats = measure(a, b, range(args.seeds), args.deadline, loss=args.loss,
                        ipv6=args.ipv6)
        kind, strategy = expected(a, b, args.ipv6)
        row = stats.as_dict()
        row["expected"] = {"kind": kind, "strategy": strategy}
        rows.append(row)
        found = ",".join(sorted(stats.strategies)) or "-"
        t = row["time"]
        pair = f"{a} x {b}" if a != b or a not in ("same-nat", "same-nat-hairpin") else a
        print(f"{pair:34} {kind:7} {found:11} {stats.rate:8.1%} {fmt(t['median']):>9} "
              f"{fmt(t['p90']):>9} {fmt(t['max']):>9} "
              f"{row['probes']['median']:>7.0f}/{row['probes']['max']:<7} "
              f"{','.join(f'v{v}' for v in sorted(stats.families)) or '-':>7}")
    elapsed = time.monotonic() - started
    print(f"\n{args.seeds} seeds per pair, loss {args.loss:.1%} per link, "
          f"deadline {args.deadline:g} s simulated{', dual stack' if args.ipv6 else ''}; "
          f"{elapsed:.1f} s wall clock")
    args.out.mkdir(parents=True, exist_ok=True)
    stack = "-ipv6" if args.ipv6 else ""
    path = (args.out
            / f"traversal-{time.strftime('%Y%m%dT%H%M%S')}-loss{args.loss:g}{stack}.json")
    path.write_text(json.dumps({"seeds": args.seeds, "loss": args.loss, "ipv6": args.ipv6,
                                "deadline": args.deadline, "wall_seconds": elapsed,
                                "pairs": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
