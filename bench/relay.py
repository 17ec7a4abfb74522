"""
Relayed against direct throughput on loopback, measured in the same run.

Starts the rendezvous's relay side and a real C{twistd -n twistvpn-relay}
that logs in to it (L{twistvpn.testing.loopback.Lab}), then moves the same stream of datagrams
between two peer processes three ways: directly (UDP socket to UDP
socket), through the standalone relay over UDP, and through it over TLS
on TCP.  The peers run a go-back-N window and check every datagram's bytes;
a run counts only if the receiver's digest of the whole stream is right.
The datagrams are opaque to the relay, exactly as WireGuard messages are,
so WireGuard's own encryption cost (the same on every path) is left out.

    .venv/bin/python bench/relay.py [--count 20000] [--size 1200] [--rounds 3]

Prints a table and writes bench/results/relay-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

from twistvpn.testing.loopback import Lab, expected_digest

PATHS = ("direct", "udp", "tcp")
LABELS = {"direct": "direct UDP", "udp": "relayed, UDP", "tcp": "relayed, TLS/TCP"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--count", type=int, default=20000, help="datagrams per transfer")
    parser.add_argument("--size", type=int, default=1200, help="bytes per datagram")
    parser.add_argument("--window", type=int, default=128, help="datagrams in flight")
    parser.add_argument("--rounds", type=int, default=3, help="transfers per path")
    args = parser.parse_args()

    results: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}
    digest = expected_digest(args.count, args.size)
    lab = Lab(tempfile.mkdtemp(prefix="twistvpn-bench-relay-"))
    try:
        lab.start_relay()
        for _ in range(args.rounds):
            for path in PATHS:  # interleaved, so drift hits every path alike
                sent, received = lab.transfer(path, args.count, args.size, args.window)
                if received["sha256"] != digest or received["bad"]:
                    print(f"{path}: the stream arrived damaged", file=sys.stderr)
                    return 1
                results[path].append(sent)
    finally:
        lab.close()

    direct = statistics.median(r["mbit_per_s"] for r in results["direct"])
    rows = []
    print(f"{args.count} datagrams of {args.size} bytes, window {args.window}, "
          f"median of {args.rounds} rounds, loopback")
    print(f"{'path':<20}{'Mbit/s':>10}{'vs direct':>11}{'retransmits':>13}")
    for path in PATHS:
        mbps = statistics.median(r["mbit_per_s"] for r in results[path])
        retransmits = sum(int(r["retransmits"]) for r in results[path])
        rows.append({"path": path, "mbit_per_s": mbps, "ratio_to_direct": mbps / direct,
                     "retransmits": retransmits,
                     "runs_mbit_per_s": [r["mbit_per_s"] for r in results[path]]})
        print(f"{LABELS[path]:<20}{mbps:>10.1f}{mbps / direct:>10.0%}{retransmits:>13}")

    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, time.strftime("relay-%Y%m%dT%H%M%SZ.json", time.gmtime()))
    with open(out, "w") as f:
        json.dump({"benchmark": "relay", "count": args.count, "size": args.size,
                   "window": args.window, "rounds": args.rounds,
                   "python": platform.python_version(), "machine": platform.machine(),
                   "cpus": os.cpu_count(), "results": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
