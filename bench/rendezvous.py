"""
Rendezvous benchmark: N simulated nodes against a real
C{twistd twistvpn-rendezvous} process on loopback
(`.venv/bin/python bench/rendezvous.py --nodes 1000`).

Each node is a real L{RendezvousClient}: its own TLS connection pinned to
the server's fingerprint, a challenge, a proof of possession, a join.
Measured:

- registrations per second (TLS handshake + challenge + proof + join),
  at most C{--concurrency} in flight, all from this one process (so the
  client side shares the machine's two cores with the server);
- the server's resident set size idle, and with N nodes registered and
  connected;
- with C{--network}: all N join one public network (each is authorized on
  joining), and the time until every node holds a map listing all N.

Writes the numbers as JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, task
from zope.interface import implementer

from twistvpn.interfaces import IRendezvousListener
from twistvpn.rendezvous.admin_cli import AdminClient
from twistvpn.rendezvous.client import RendezvousClient
from twistvpn.rendezvous.localrun import LocalRendezvous
from twistvpn.wireguard.keys import generate_private_key

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@implementer(IRendezvousListener)
class NodeListener:
    """Remembers the size of the last map one node received."""

    def __init__(self, index: int, map_sizes: dict[int, int]) -> None:
        self._index = index
        self._sizes = map_sizes

    def connected(self, node_id: str) -> None:
        pass

    def disconnected(self, reason: str) -> None:
        pass

    def join_status(self, network_id: str, status: str) -> None:
        pass

    def map_received(self, network_id: str, netmap: Any) -> None:
        self._sizes[self._index] = len(netmap.members)

    def punch_requested(self, network_id: str, punch: Any) -> None:
        pass

    def revoked(self, network_id: str, reason: str) -> None:
        pass


def raise_fd_limit(needed: int) -> None:
    """One socket per node here, so the soft limit of 1024 is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


@defer.inlineCallbacks
def run(reactor: Any, args: argparse.Namespace) -> Any:
    tmp = tempfile.mkdtemp(prefix="tvrb")
    log = open(os.path.join(tmp, "twistd.log"), "ab")
    # every simulated node comes from 127.0.0.1: lift the per-address limit
    rendezvous = LocalRendezvous(
        os.path.join(tmp, "data"), log=log, extra_args=("--registration-rate", "0")
    )
    clients: list[RendezvousClient] = []
    try:
        info = rendezvous.start()
        time.sleep(0.5)
        rss_idle = rendezvous.rss_kib()
        networks: list[str] = []
        if args.network:
            admin = AdminClient(data_dir=rendezvous.data_dir)
            network = admin.create_network("bench", "100.96.0.0/16", private=False)
            networks = [network["id"]]
        map_sizes: dict[int, int] = {}
        semaphore = defer.DeferredSemaphore(args.concurrency)

        def one(i: int) -> defer.Deferred[Any]:
            client = RendezvousClient.from_address(
                reactor,
                info["url"],
                generate_private_key(),
                f"bench-{i}",
                NodeListener(i, map_sizes),
                networks=networks,
            )
            clients.append(client)
            client.startService()
            return client.when_connected(fail_after_failures=3)

        # the keys are made before the clock starts
        start = time.monotonic()
        yield defer.gatherResults(
            [semaphore.run(one, i) for i in range(args.nodes)], consumeErrors=True
        )
        elapsed = time.monotonic() - start
        rate = args.nodes / elapsed
        print(
            f"{args.nodes} registrations in {elapsed:.2f} s: {rate:.0f}/s "
            f"(concurrency {args.concurrency})"
        )
        full_map = None
        if args.network:
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                if sum(1 for n in map_sizes.values() if n == args.nodes) == args.nodes:
                    full_map = time.monotonic() - start
                    break
                yield task.deferLater(reactor, 0.1, lambda: None)
            print(
                "every node holds the full map after "
                + (f"{full_map:.2f} s" if full_map else f"more than {args.timeout} s")
            )
        yield task.deferLater(reactor, 1.0, lambda: None)
        rss = rendezvous.rss_kib()
        print(
            f"server RSS: {rss_idle / 1024:.1f} MiB idle, {rss / 1024:.1f} MiB with "
            f"{args.nodes} nodes connected ({(rss - rss_idle) / args.nodes:.1f} KiB/node)"
        )
        os.makedirs(RESULTS, exist_ok=True)
        out = os.path.join(RESULTS, time.strftime("rendezvous-%Y%m%dT%H%M%SZ.json", time.gmtime()))
        with open(out, "w") as f:
            json.dump(
                {
                    "benchmark": "rendezvous",
                    "nodes": args.nodes,
                    "concurrency": args.concurrency,
                    "network": args.network,
                    "registration_seconds": elapsed,
                    "registrations_per_second": rate,
                    "full_map_seconds": full_map,
                    "rss_idle_kib": rss_idle,
                    "rss_kib": rss,
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                    "cpus": os.cpu_count(),
                },
                f,
                indent=1,
            )
        print(f"wrote {out}")
    finally:
        yield defer.DeferredList([c.stopService() for c in clients])
        rendezvous.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument(
        "--network",
        action="store_true",
        help="all nodes join one public network; time the full map",
    )
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    raise_fd_limit(args.nodes + 256)  # the child rendezvous inherits it
    task.react(run, [args])


if __name__ == "__main__":
    sys.exit(main())
