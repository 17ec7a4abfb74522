"""
Data-path benchmark: CPU per packet of twistvpn's per-packet Python, in
process, for the compiled build against the pure-Python one in the same
run (`.venv/bin/python bench/datapath.py`; no root).

Two L{WireGuardDevice}s with a session between them, in memory. Each round
cuts a TSO packet of 46 segments as a TUN read with TSO hands it over
(L{twistvpn.node.offload.segment}: the headers and checksums of each
segment, the ``segment`` column, per segment), then sends a batch of 64
TCP segments of 1,368 bytes (a TUN read batch) from A: C{send_packet},
padding, the counter, ChaCha20-Poly1305 (the ``send`` column); hands each
datagram to B's L{Forwarder} as the socket would: dispatch, the session,
the AEAD, the replay window, AllowedIPs (``receive``); and joins B's
decrypted batch for the TUN device (L{coalesce}, ``coalesce``). The TUN
device, the sockets and the reactor are not here (bench/throughput.py
measures them, with the kernel).

Each build runs in a child process (the pure one with
TWISTVPN_PURE_PYTHON=1, twistvpn.build), the runs interleaved; the table
shows medians of CPU microseconds per packet; the total leaves out the
cutting, which only a node with TSO does (the compiled build's default).
With C{--worth}, also builds one wheel per compiled module, that module
left out, and measures each: what compiling that module is worth on this
path. Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from benchjson import save

from twistvpn.build import COMPILED, PURE_ENV
from twistvpn.table import columns

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent
BATCH = 64
PAYLOAD = 1368
STAGES = ("segment", "send", "receive", "coalesce")
TSO_SEGMENTS = 46  # 46 x 1,368 bytes and the headers: what fits in 64 KiB


def _segment(seq: int, payload: int = PAYLOAD) -> bytes:
    """A TCP/IPv4 segment of the overlay (checksums are not checked on this path)."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 7, 5 << 4, 0x10, 500, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + payload, 1, 0x4000, 64, 6, 0,
                     bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2]))
    return ip + tcp + os.urandom(payload)


def child(rounds: int) -> dict[str, Any]:
    """Measure in this process; what the parent reads on stdout."""
    from twisted.internet.task import Clock

    from twistvpn import build
    from twistvpn.node.forwarder import Forwarder
    from twistvpn.node.offload import coalesce, segment
    from twistvpn.wireguard.device import WireGuardDevice
    from twistvpn.wireguard.keys import generate_private_key

    clock = Clock()
    wire: list[bytes] = []
    delivered: list[bytes] = []
    handshake: list[tuple[Any, bytes, Any]] = []
    a = WireGuardDevice(generate_private_key(), clock,
                        lambda data, addr: (wire if b_peer.current else handshake).append(
                            (b_forwarder, data, ("203.0.113.1", 51820))),
                        lambda packet: None)
    b = WireGuardDevice(generate_private_key(), clock,
                        lambda data, addr: handshake.append((a, data, ("203.0.113.2", 51820))),
                        delivered.append)
    b_forwarder = Forwarder()
    b_forwarder.set_wireguard(b)
    b_peer = a.add_peer(b.public_key, endpoint=("203.0.113.2", 51820),
                        allowed_ips=["100.64.0.2/32"])
    b.add_peer(a.public_key, endpoint=("203.0.113.1", 51820), allowed_ips=["100.64.0.1/32"])
    b_peer.send_initiation(False)
    for _ in range(10):  # initiation, response, the confirming keepalive
        while handshake:
            target, data, source = handshake.pop(0)
            if target is b_forwarder:
                target.datagramReceived(data, source)
            else:
                target.datagram_received(data, source)
    if b_peer.current is None:
        raise SystemExit("datapath benchmark: no session")
    wire.clear()
    seq = 0
    totals = dict.fromkeys(STAGES, 0.0)
    clock_time = time.process_time
    tso = _segment(0, TSO_SEGMENTS * PAYLOAD)
    for _ in range(rounds):
        started = clock_time()
        cut = segment(tso, 20, PAYLOAD)
        totals["segment"] += (clock_time() - started) * BATCH / TSO_SEGMENTS
        if cut is None or len(cut) != TSO_SEGMENTS:
            raise SystemExit("datapath benchmark: the TSO packet was not cut")
        packets = []
        for _ in range(BATCH):
            packets.append(_segment(seq))
            seq += PAYLOAD
        started = clock_time()
        for packet in packets:
            a.send_packet(packet)
        sent = clock_time()
        datagrams = [entry[1] for entry in wire]  # type: ignore[index]
        wire.clear()
        dispatch = b_forwarder.dispatch
        source = ("203.0.113.1", 51820)
        started_receive = clock_time()
        for datagram in datagrams:
            dispatch(datagram, source)
        received = clock_time()
        coalesce(delivered)
        done = clock_time()
        if len(delivered) != BATCH:
            raise SystemExit(f"datapath benchmark: {len(delivered)} of {BATCH} delivered")
        delivered.clear()
        totals["send"] += sent - started
        totals["receive"] += received - started_receive
        totals["coalesce"] += done - received
    packets_total = rounds * BATCH
    return {
        "build": build.describe(),
        **{stage: totals[stage] / packets_total * 1e6 for stage in STAGES},
    }


def run_child(rounds: int, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--rounds", str(rounds)],
        env={**os.environ, **env}, check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def build_without(module: str, where: Path) -> Path:
    """A wheel with every compiled module but C{module}, unpacked into C{where}."""
    keep = ",".join(name for name in COMPILED if name != module)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(where), str(CHECKOUT)],
        env={**os.environ, "TWISTVPN_COMPILE": keep}, check=True, timeout=900,
    )
    wheel = next(where.glob("*.whl"))
    target = where / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=400, help="batches of 64 per run")
    parser.add_argument("--runs", type=int, default=5, help="runs per build (median)")
    parser.add_argument("--worth", action="store_true",
                        help="also measure builds with one compiled module left out")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true", help="do not write JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.runs < 1:
        parser.error("--rounds and --runs must be at least 1")
    if args.child:
        print(json.dumps(child(args.rounds)))
        return 0
    started = time.time()
    variants: list[tuple[str, dict[str, str]]] = [
        ("as installed", {PURE_ENV: ""}),
        ("pure Python", {PURE_ENV: "1"}),
    ]
    with tempfile.TemporaryDirectory(prefix="twistvpn-datapath-") as tmp:
        if args.worth:
            for module in COMPILED:
                site = build_without(module, Path(tmp) / module)
                variants.append((f"without {module}", {PURE_ENV: "", "PYTHONPATH": str(site)}))
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
        for number in range(args.runs):
            print(f"run {number + 1} of {args.runs}", flush=True)
            for name, env in variants:
                runs[name].append(run_child(args.rounds, env))
    results = []
    for name, _ in variants:
        medians = {s: statistics.median(r[s] for r in runs[name]) for s in STAGES}
        results.append({"variant": name, "build": runs[name][0]["build"], **medians,
                        "total": sum(medians[s] for s in STAGES if s != "segment"),
                        "runs": runs[name]})
    base = results[0]["total"]
    print(columns(
        ("variant", "build", *(f"{s} µs" for s in STAGES), "total µs (no segment)",
         "vs installed"),
        [(r["variant"], r["build"], *(f"{r[s]:.2f}" for s in STAGES), f"{r['total']:.2f}",
          f"{r['total'] / base:.2f}") for r in results],
    ))
    if not args.no_save:
        save("datapath", started, {"rounds": args.rounds, "batch": BATCH,
                                   "payload": PAYLOAD, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
