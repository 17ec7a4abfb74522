"""
Rendezvous benchmark: N simulated nodes registering, joining and keeping
alive against a real C{twistd twistvpn-rendezvous} process on loopback
(`.venv/bin/python bench/rendezvous.py --nodes 10000 --network-size 100`).

Each node is a real L{RendezvousClient}: its own control channel (a TLS 1.3
handshake pinned to the server's fingerprint), a challenge, a proof of
possession, a join of its public network (authorized on joining).  The
nodes are shared among C{--workers} client processes, each with its own
reactor, so that the client side is not one Python process holding the
server back; the server is what is measured.  Phases, each bounded in time:

1. registration: all nodes register and join, at most C{--concurrency} in
   flight overall (TLS handshake + challenge + proof + join): registrations/s;
2. settling: until every node holds the map of its whole network;
3. keep-alive: C{--keepalive-seconds} with every node connected while the
   rendezvous pings them (every 45 s): server RSS and CPU after it;
4. updates: C{--updates} admin changes, spaced by C{--update-spacing}
   seconds, cycling through set-ip of a member, deauthorization of a
   member and its authorization again; for each, per member of that
   network, the time from the admin call to that member's client holding
   the map (full or delta) that carries the change: p50/p99/max over all
   members and updates.

The layout is C{--networks} networks of C{--network-size} nodes (the
default: one network of all nodes).  Server RSS is VmRSS from
/proc/<pid>/status, CPU is utime + stime from /proc/<pid>/stat.  Prints a
table; writes the numbers as JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchjson  # noqa: E402

from twistvpn.rendezvous.admin_cli import AdminClient  # noqa: E402
from twistvpn.testing.localrun import LocalRendezvous  # noqa: E402
from twistvpn.wireguard.keys import (  # noqa: E402
    decode_key,
    encode_key,
    generate_private_key,
    public_key,
)

PROGRESS_INTERVAL = 1.0
UPDATE_KINDS = ("set-ip", "deauthorize", "authorize")


def raise_fd_limit(needed: int) -> None:
    """One socket per node; the soft limit of 1024 is too low (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def percentile(values: list[float], p: float) -> float | None:
    """The nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


# -- the worker: a share of the nodes, in its own process and reactor ----------


def worker_main(spec_path: str) -> None:
    """Run the nodes listed in C{spec_path}; commands on stdin, events on stdout."""
    from twisted.internet import defer, reactor, stdio, task
    from twisted.protocols.basic import LineReceiver
    from zope.interface import implementer

    from twistvpn.interfaces import IRendezvousListener
    from twistvpn.rendezvous.client import RendezvousClient
    from twistvpn.testing.sharedmaps import SharedMapReader

    with open(spec_path) as f:
        spec = json.load(f)
    sizes: dict[str, int] = spec["sizes"]
    nodes = [(n, decode_key(k), net) for n, k, net in spec["nodes"]]
    state: dict[str, Any] = {
        "registered": 0,
        "failed": 0,
        "connected": 0,
        "disconnections": 0,
        "settled": set(),
        "watch": None,
        "seen": set(),  # nodes connected at least once
        "reconnects": [],  # when each node first connected again (wall clock)
        "back": set(),  # nodes that did
        "again": 0,  # connections of nodes already back (dropped again meanwhile)
    }
    # (network, revision) -> whether that revision carries the watched change
    verdicts: dict[tuple[str, int], bool] = {}

    def carries(network_id: str, netmap: Any) -> bool:
        watch = state["watch"]
        cached = verdicts.get((network_id, netmap.revision))
        if cached is None:
            member = next((m for m in netmap.members if m.public_key == watch["key"]), None)
            if watch["kind"] == "set-ip":
                cached = member is not None and member.ip == watch["ip"]
            elif watch["kind"] == "deauthorize":
                cached = member is None
            else:
                cached = member is not None
            verdicts[(network_id, netmap.revision)] = cached
        return cached

    @implementer(IRendezvousListener)
    class Listener:
        def __init__(self, name: str, key: bytes, network_id: str) -> None:
            self.name, self.key, self.network_id = name, key, network_id

        def connected(self, node_id: str) -> None:
            state["connected"] += 1
            if self.name in state["back"]:
                state["again"] += 1
            elif self.name in state["seen"]:
                state["reconnects"].append(time.time())
                state["back"].add(self.name)
            state["seen"].add(self.name)

        def disconnected(self, reason: str) -> None:
            state["connected"] -= 1
            state["disconnections"] += 1

        def join_status(self, network_id: str, status: str) -> None:
            pass

        def map_received(self, network_id: str, netmap: Any) -> None:
            now = time.time()
            if len(netmap.members) == sizes[network_id]:
                state["settled"].add(self.name)
            watch = state["watch"]
            if (
                watch is not None
                and network_id == watch["network"]
                and self.name not in watch["times"]
                and carries(network_id, netmap)
            ):
                watch["times"][self.name] = now
                if len(watch["times"]) == watch["expected"]:
                    report()

        def punch_requested(self, network_id: str, punch: Any) -> None:
            pass

        def revoked(self, network_id: str, reason: str) -> None:
            pass

    clients: list[RendezvousClient] = []
    # This process's nodes share their parsed maps (each receives its own).
    reader = SharedMapReader()

    def emit(event: dict[str, Any]) -> None:
        commands.sendLine(json.dumps(event).encode())

    def report() -> None:
        watch, state["watch"] = state["watch"], None
        if watch is not None:
            emit(
                {
                    "ev": "done",
                    "id": watch["id"],
                    "times": list(watch["times"].values()),
                    "expected": watch["expected"],
                }
            )

    @defer.inlineCallbacks
    def register() -> Any:
        semaphore = defer.DeferredSemaphore(spec["concurrency"])
        start = time.monotonic()

        def one(name: str, private: bytes, network_id: str) -> Any:
            # Each simulated node connects from its own loopback address, as
            # nodes do from theirs: the control channel admits at most 64
            # unkeyed connections per source address.
            index = int(name.rsplit("-", 1)[1])  # nodes are named bench-INDEX
            client = RendezvousClient.from_address(
                reactor,
                spec["url"],
                private,
                name,
                Listener(name, public_key(private), network_id),
                networks=[network_id],
                reader=reader,
                source=f"127.{1 + index // 62500}.{index // 250 % 250}.{index % 250 + 1}",
            )
            clients.append(client)
            client.startService()
            d = client.when_connected(fail_after_failures=3)

            def ok(_: Any) -> None:
                state["registered"] += 1

            def failed(_: Any) -> None:
                state["failed"] += 1

            return d.addCallbacks(ok, failed)

        yield defer.gatherResults([semaphore.run(one, *n) for n in nodes])
        emit(
            {
                "ev": "registered",
                "elapsed": time.monotonic() - start,
                "registered": state["registered"],
                "failed": state["failed"],
            }
        )

    def progress() -> None:
        emit(
            {
                "ev": "progress",
                "registered": state["registered"],
                "failed": state["failed"],
                "connected": state["connected"],
                "disconnections": state["disconnections"],
                "settled": len(state["settled"]),
            }
        )

    @defer.inlineCallbacks
    def stop() -> Any:
        yield defer.DeferredList([c.stopService() for c in clients])
        if reactor.running:  # (a stop command, then stdin closing)
            reactor.stop()

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            command = json.loads(line)
            what = command["cmd"]
            if what == "go":
                register()
            elif what == "watch":
                key = decode_key(command["key"])
                members = sum(1 for n in nodes if n[2] == command["network"])
                target_here = any(public_key(n[1]) == key for n in nodes)
                expected = members - (1 if command["kind"] == "deauthorize" and target_here else 0)
                state["watch"] = {
                    "id": command["id"],
                    "network": command["network"],
                    "key": key,
                    "kind": command["kind"],
                    "ip": command.get("ip"),
                    "expected": expected,
                    "times": {},
                }
                verdicts.clear()
                emit({"ev": "watching", "id": command["id"]})
                if expected == 0:
                    report()
            elif what == "report":
                report()
            elif what == "reconnects":
                emit({"ev": "reconnects", "times": state["reconnects"],
                      "again": state["again"],
                      "failed_attempts": sum(c.counters["failed_attempts"] for c in clients)})
            elif what == "stop":
                stop()

        def connectionLost(self, reason: Any = None) -> None:
            if reactor.running:
                stop()

    commands = Commands()
    stdio.StandardIO(commands)
    task.LoopingCall(progress).start(PROGRESS_INTERVAL, now=False)
    emit({"ev": "ready", "pid": os.getpid()})
    reactor.run()


# -- the parent: the rendezvous, the admin, the workers -------------------------


class Worker:
    """A worker process, its events read by a thread into a queue."""

    def __init__(self, spec_path: str, log: IO[bytes]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", spec_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.progress: dict[str, Any] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                continue

    def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        self.process.stdin.flush()

    def wait_for(self, kind: str, deadline: float) -> dict[str, Any] | None:
        """The next event of C{kind} (progress is kept on the way), or None at the deadline."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None:
                return None
            try:
                event = self.events.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if event["ev"] == "progress":
                self.progress = event
            if event["ev"] == kind:
                return event

    def drain(self) -> None:
        """Take the latest progress without waiting."""
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if event["ev"] == "progress":
                self.progress = event

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.send({"cmd": "stop"})
                self.process.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                os.kill(self.process.pid, 9)
                self.process.wait(15)


def cpu_seconds(pid: int) -> float:
    """utime + stime of C{pid}."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def total(workers: list[Worker], key: str) -> int:
    for w in workers:
        w.drain()
    return sum(w.progress.get(key, 0) for w in workers)


def wait_until(workers: list[Worker], key: str, goal: int, timeout: float) -> float | None:
    """Seconds until the workers' C{key} counts add up to C{goal}, or None."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if total(workers, key) >= goal:
            return time.monotonic() - start
        time.sleep(0.2)
    return None


def run(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    started = time.time()
    layout = f"{args.networks} network(s) of {args.network_size}"
    nodes = args.networks * args.network_size
    log = open(os.path.join(tmp, "twistd.log"), "ab")
    worker_log = open(os.path.join(tmp, "workers.log"), "ab")
    # every simulated node comes from 127.0.0.1: lift the per-address limit
    rendezvous = LocalRendezvous(
        os.path.join(tmp, "data"), log=log, extra_args=("--registration-rate", "0")
    )
    workers: list[Worker] = []
    try:
        info = rendezvous.start()
        time.sleep(0.5)
        pid = rendezvous.pid
        rss_idle = rendezvous.rss_kib()
        admin = AdminClient(data_dir=rendezvous.data_dir)
        prefix = 24 if args.network_size <= 200 else 16
        networks = []
        for i in range(args.networks):
            subnet = (
                f"100.{64 + i // 256}.{i % 256}.0/24" if prefix == 24 else f"100.{96 + i}.0.0/16"
            )
            networks.append(admin.create_network(f"bench-{i}", subnet, private=False)["id"])
        keys = [generate_private_key() for _ in range(nodes)]
        assignments = [
            (f"bench-{i}", encode_key(keys[i]), networks[i // args.network_size])
            for i in range(nodes)
        ]
        sizes = {n: args.network_size for n in networks}
        for w in range(args.workers):
            path = os.path.join(tmp, f"worker-{w}.json")
            with open(path, "w") as f:
                json.dump(
                    {
                        "url": info["url"],
                        "concurrency": max(1, args.concurrency // args.workers),
                        "sizes": sizes,
                        "nodes": assignments[w :: args.workers],
                    },
                    f,
                )
            workers.append(Worker(path, worker_log))
        for w in workers:
            if w.wait_for("ready", time.monotonic() + 120) is None:
                raise RuntimeError("a worker did not start (see its log)")

        # 1. registration (and join)
        cpu0 = cpu_seconds(pid)
        start = time.monotonic()
        for w in workers:
            w.send({"cmd": "go"})
        deadline = start + args.timeout
        registered = failed = 0
        for w in workers:
            event = w.wait_for("registered", deadline)
            if event is None:
                # not in bounded time: say how far it got, and stop there
                record = {
                    "benchmark": "rendezvous",
                    "layout": layout,
                    "nodes": nodes,
                    "completed": False,
                    "registration_seconds": args.timeout,
                    "registered": total(workers, "registered"),
                    "settled": total(workers, "settled"),
                    "rss_idle_kib": rss_idle,
                    "rss_kib": rendezvous.rss_kib(),
                    "server_cpu_seconds": cpu_seconds(pid) - cpu0,
                }
                print(
                    f"{layout}: only {record['registered']} of {nodes} registered and joined "
                    f"in {args.timeout:.0f} s (server RSS {record['rss_kib'] / 1024:.0f} MiB)"
                )
                benchjson.save("rendezvous", started, record)
                return record
            registered += event["registered"]
            failed += event["failed"]
        registration = time.monotonic() - start
        rate = registered / registration
        print(f"{registered} registrations in {registration:.1f} s: {rate:.0f}/s ({failed} failed)")

        # 2. every node holds the whole map of its network
        settle = wait_until(workers, "settled", nodes, args.timeout)
        cpu_join = cpu_seconds(pid) - cpu0
        rss_registered = rendezvous.rss_kib()
        print(
            "every node holds its network's full map "
            + (
                f"{settle:.1f} s after registering"
                if settle is not None
                else f"not after {args.timeout} s ({total(workers, 'settled')} of {nodes})"
            )
        )

        # 3. keep-alive
        cpu1 = cpu_seconds(pid)
        time.sleep(args.keepalive_seconds)
        cpu_keepalive = cpu_seconds(pid) - cpu1
        rss_keepalive = rendezvous.rss_kib()
        connected = total(workers, "connected")
        disconnections = total(workers, "disconnections")
        print(
            f"after {args.keepalive_seconds:.0f} s keep-alive: {connected} connected, "
            f"{disconnections} disconnections, server CPU "
            f"{100 * cpu_keepalive / max(args.keepalive_seconds, 1e-9):.1f} %"
        )

        # 4. map updates
        latencies: list[float] = []
        per_update = []
        missing = 0
        for u in range(args.updates):
            kind = UPDATE_KINDS[u % len(UPDATE_KINDS)]
            n = (u // len(UPDATE_KINDS)) % args.networks
            network_id = networks[n]
            target = n * args.network_size + args.network_size // 2
            target_key = encode_key(public_key(keys[target]))
            ip = None
            if kind == "set-ip":
                base = f"100.{64 + n // 256}.{n % 256}." if prefix == 24 else f"100.{96 + n}.255."
                ip = base + str(254 - u % 40)
            for w in workers:
                w.send(
                    {
                        "cmd": "watch",
                        "id": u,
                        "network": network_id,
                        "key": target_key,
                        "kind": kind,
                        "ip": ip,
                    }
                )
            for w in workers:
                if w.wait_for("watching", time.monotonic() + 30) is None:
                    raise RuntimeError("a worker did not take the watch")
            t0 = time.time()  # the workers stamp arrivals with the same wall clock
            body: dict[str, Any] = (
                {"ip": ip} if kind == "set-ip" else {"authorized": kind == "authorize"}
            )
            admin.member(network_id, target_key, "POST", body)
            deadline = time.monotonic() + args.update_timeout
            times: list[float] = []
            expected = 0
            for w in workers:
                done = w.wait_for("done", deadline)
                if done is None:
                    w.send({"cmd": "report"})
                    done = w.wait_for("done", time.monotonic() + 10)
                if done is not None:
                    times += [t - t0 for t in done["times"]]
                    expected += done["expected"]
            missing += expected - len(times)
            latencies += times
            per_update.append(
                {
                    "kind": kind,
                    "network": network_id,
                    "members": expected,
                    "received": len(times),
                    "p50": percentile(times, 50),
                    "max": max(times) if times else None,
                }
            )
            p50, top = percentile(times, 50), max(times) if times else float("nan")
            print(
                f"update {u + 1} ({kind}): {len(times)} of {expected} members in "
                f"p50 {1000 * (p50 or 0):.0f} ms, max {1000 * top:.0f} ms"
            )
            time.sleep(args.update_spacing)
        rss_final = rendezvous.rss_kib()

        record = {
            "benchmark": "rendezvous",
            "layout": layout,
            "nodes": nodes,
            "networks": args.networks,
            "network_size": args.network_size,
            "workers": args.workers,
            "concurrency": args.concurrency,
            "registered": registered,
            "registration_failures": failed,
            "registration_seconds": registration,
            "registrations_per_second": rate,
            "settle_seconds": settle,
            "server_cpu_seconds_join": cpu_join,
            "keepalive_seconds": args.keepalive_seconds,
            "keepalive_connected": connected,
            "keepalive_disconnections": disconnections,
            "server_cpu_percent_keepalive": 100 * cpu_keepalive / max(args.keepalive_seconds, 1e-9),
            "rss_idle_kib": rss_idle,
            "rss_registered_kib": rss_registered,
            "rss_keepalive_kib": rss_keepalive,
            "rss_final_kib": rss_final,
            "updates": per_update,
            "update_latency_p50": percentile(latencies, 50),
            "update_latency_p99": percentile(latencies, 99),
            "update_latency_max": max(latencies) if latencies else None,
            "update_deliveries_missing": missing,
        }
        print_table(record)
        benchjson.save("rendezvous", started, record)
        return record
    finally:
        for w in workers:
            w.stop()
        rendezvous.kill()
        log.close()
        worker_log.close()


def ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f} ms"


def print_table(r: dict[str, Any]) -> None:
    rows = [
        ("layout", r["layout"]),
        (
            "registrations/s",
            f"{r['registrations_per_second']:.0f} ({r['registered']} in "
            f"{r['registration_seconds']:.1f} s, {r['registration_failures']} failed)",
        ),
        (
            "full maps everywhere",
            "-"
            if r["settle_seconds"] is None
            else f"{r['settle_seconds']:.1f} s after registering",
        ),
        ("server RSS idle", f"{r['rss_idle_kib'] / 1024:.0f} MiB"),
        ("server RSS registered", f"{r['rss_registered_kib'] / 1024:.0f} MiB"),
        (
            "server RSS after keep-alive",
            f"{r['rss_keepalive_kib'] / 1024:.0f} MiB ({r['keepalive_seconds']:.0f} s, "
            f"{r['keepalive_connected']} connected, CPU {r['server_cpu_percent_keepalive']:.1f} %)",
        ),
        ("update latency p50", ms(r["update_latency_p50"])),
        ("update latency p99", ms(r["update_latency_p99"])),
        ("update latency max", ms(r["update_latency_max"])),
        ("updates not delivered", str(r["update_deliveries_missing"])),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        raise_fd_limit(20000)
        worker_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000, help="nodes in all (default 1000)")
    parser.add_argument("--networks", type=int, default=None, help="networks (default: 1)")
    parser.add_argument(
        "--network-size",
        type=int,
        default=None,
        help="nodes per network (default: --nodes / --networks)",
    )
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--concurrency", type=int, default=100, help="registrations in flight")
    parser.add_argument("--keepalive-seconds", type=float, default=60.0)
    parser.add_argument("--updates", type=int, default=9)
    parser.add_argument("--update-spacing", type=float, default=1.0)
    parser.add_argument("--update-timeout", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="per phase")
    args = parser.parse_args()
    if args.network_size is None:
        args.networks = args.networks or 1
        args.network_size = args.nodes // args.networks
    elif args.networks is None:
        args.networks = max(1, args.nodes // args.network_size)
    if args.networks < 1 or args.network_size < 2 or args.workers < 1 or args.updates < 0:
        parser.error("need at least one network of two nodes, one worker, no negative updates")
    raise_fd_limit(args.networks * args.network_size + 256)  # the rendezvous inherits it
    tmp = tempfile.mkdtemp(prefix="tvrb")
    try:
        run(args, tmp)
    except Exception:
        print(f"failed; logs kept in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
