"""
Fail-over benchmark: N nodes on rendezvous instance 1 of two sharing one
PostgreSQL; instance 1 is killed (SIGKILL); how long until every node is
registered with instance 2, and how hard the arrival hits it
(`sudo .venv/bin/python bench/failover.py --nodes 2000`).

Everything is real and on loopback: a throwaway PostgreSQL cluster
(L{twistvpn.testing.postgres}), two C{twistd twistvpn-rendezvous
--database} processes, and the nodes as real L{RendezvousClient}s (TLS,
proof, join) in worker processes (bench/rendezvous.py's workers), each
given both instances, instance 1 first.  Measured: for every node, the
time from the kill to its registration with instance 2 (p50/p99/max),
the busiest second of arrivals, and the survivor's CPU and RSS.  Prints
a table; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchjson  # noqa: E402
from rendezvous import (  # noqa: E402
    Worker,
    cpu_seconds,
    percentile,
    raise_fd_limit,
    total,
    wait_until,
)

from twistvpn.rendezvous.admin_cli import AdminClient  # noqa: E402
from twistvpn.rendezvous.client import LIVENESS_INTERVAL  # noqa: E402
from twistvpn.testing.localrun import LocalRendezvous  # noqa: E402
from twistvpn.testing.postgres import Cluster, postgres_missing  # noqa: E402
from twistvpn.wireguard.keys import encode_key, generate_private_key  # noqa: E402


def run(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    started = time.time()
    postgres = Cluster().start()
    log = open(os.path.join(tmp, "twistd.log"), "ab")
    worker_log = open(os.path.join(tmp, "workers.log"), "ab")
    extra = ("--registration-rate", "0", "--database", postgres.dsn)
    one = LocalRendezvous(os.path.join(tmp, "one"), log=log, extra_args=extra)
    two = LocalRendezvous(os.path.join(tmp, "two"), log=log, extra_args=extra)
    workers: list[Worker] = []
    try:
        urls = [one.start()["url"], two.start()["url"]]
        admin = AdminClient(data_dir=one.data_dir)
        count = args.nodes // args.network_size
        networks = [admin.create_network(f"bench-{i}", f"100.{64 + i // 256}.{i % 256}.0/24",
                                         private=False)["id"] for i in range(count)]
        nodes = count * args.network_size
        keys = [encode_key(generate_private_key()) for _ in range(nodes)]
        assignments = [(f"bench-{i}", keys[i], networks[i // args.network_size])
                       for i in range(nodes)]
        for w in range(args.workers):
            path = os.path.join(tmp, f"worker-{w}.json")
            with open(path, "w") as f:
                json.dump({"url": urls, "concurrency": max(1, 200 // args.workers),
                           "sizes": {n: args.network_size for n in networks},
                           "nodes": assignments[w::args.workers]}, f)
            workers.append(Worker(path, worker_log))
        for w in workers:
            if w.wait_for("ready", time.monotonic() + 120) is None:
                raise RuntimeError("a worker did not start (see its log)")
        for w in workers:
            w.send({"cmd": "go"})
        if wait_until(workers, "connected", nodes, args.timeout) is None:
            raise RuntimeError(f"only {total(workers, 'connected')} of {nodes} registered")
        if wait_until(workers, "settled", nodes, args.timeout) is None:
            raise RuntimeError("not every node got its network's map")
        # Every node has heard its instance's spread (a liveness ping's answer).
        time.sleep(LIVENESS_INTERVAL + 1)
        survivor = two.pid
        cpu0, rss0 = cpu_seconds(survivor), two.rss_kib()
        killed = time.time()
        one.kill(signal.SIGKILL)
        # Until every node has registered again (asked of the workers each
        # second: their progress reports may still show the old connections).
        times: list[float] = []
        again = failed = 0
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            time.sleep(1)
            times = []
            again = failed = 0
            for w in workers:
                w.send({"cmd": "reconnects"})
                event = w.wait_for("reconnects", time.monotonic() + 30)
                times += [t - killed for t in (event or {}).get("times", [])]
                again += (event or {}).get("again", 0)
                failed += (event or {}).get("failed_attempts", 0)
            if len(times) >= nodes:
                break
        back = max(times) if len(times) >= nodes else None
        cpu = cpu_seconds(survivor) - cpu0
        per_second = collections.Counter(int(t) for t in times)
        record = {
            "benchmark": "failover",
            "nodes": nodes,
            "network_size": args.network_size,
            "reconnected": len(times),
            "all_back_seconds": back,
            "p10": percentile(times, 10),
            "p25": percentile(times, 25),
            "p50": percentile(times, 50),
            "p75": percentile(times, 75),
            "p90": percentile(times, 90),
            "arrivals_per_second": [per_second.get(i, 0) for i in range(int(max(times)) + 1)]
            if times else [],
            "p99": percentile(times, 99),
            "max": max(times) if times else None,
            "busiest_second": max(per_second.values()) if per_second else 0,
            "connected_again": again,
            "failed_attempts": failed,  # since the nodes started (the kill's and any before)
            "survivor_cpu_seconds": cpu,
            "survivor_rss_kib_before": rss0,
            "survivor_rss_kib_after": two.rss_kib(),
        }
        print(f"{nodes} nodes on instance 1 ({count} networks of {args.network_size}); "
              f"instance 1 killed:")
        print(f"  registered with instance 2: {len(times)}, all within "
              f"{record['max']:.2f} s (p50 {record['p50']:.2f}, p99 {record['p99']:.2f})")
        print(f"  dropped and connected again after that: {again}; failed attempts: {failed}")
        print(f"  busiest second: {record['busiest_second']} arrivals; survivor CPU "
              f"{cpu:.1f} s, RSS {rss0 / 1024:.0f} -> {record['survivor_rss_kib_after'] / 1024:.0f}"
              " MiB")
        benchjson.save("failover", started, record)
        return record
    finally:
        for w in workers:
            w.stop()
        for instance in (one, two):
            instance.kill(signal.SIGTERM)
        postgres.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--network-size", type=int, default=100)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    why = postgres_missing()
    if why is not None:
        raise SystemExit(f"bench/failover.py: {why}")
    raise_fd_limit(args.nodes * 2 + 256)
    tmp = tempfile.mkdtemp(prefix="tvfail")
    try:
        run(args, tmp)
    except RuntimeError as e:
        for name in ("twistd.log", "workers.log"):
            with open(os.path.join(tmp, name), "rb") as f:
                sys.stderr.write(f"==== {name}\n" + f.read()[-3000:].decode(errors="replace"))
        raise SystemExit(f"bench/failover.py: {e}") from None
    finally:
        if not os.environ.get("KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
