"""
C{twistvpn lab}: a whole twistvpn network on one machine, in network
namespaces, measured and torn down again.

The lab is the project's demonstration and its end-to-end check: hosts on a
simulated internet (203.0.113.0/24), two running twistvpn and one stock
wireguard-go, all in static mode with generated keys; it pings across every
pair, runs iperf3 across every pair, prints a table and removes everything
it built, also on Ctrl-C or failure.

The topology is a list of L{HostSpec}s, so later modes (hosts behind NAT
routers, a rendezvous instead of static endpoints) are new fields and new
steps, not a new lab.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TextIO

from twistvpn.testing import netns


@dataclass(frozen=True)
class HostSpec:
    """One lab host: the VPN it runs."""

    kind: str  # netns.TWISTVPN or netns.WIREGUARD_GO


DEFAULT_HOSTS = (
    HostSpec(netns.TWISTVPN),
    HostSpec(netns.TWISTVPN),
    HostSpec(netns.WIREGUARD_GO),
)


@dataclass
class PairResult:
    source: netns.VpnNode
    destination: netns.VpnNode
    loss: float
    rtt_ms: float | None
    throughput_bps: float | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return (
            f"{self.source.label} ({self.source.kind}) -> "
            f"{self.destination.label} ({self.destination.kind})"
        )


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "lab",
        help="build a twistvpn network in namespaces, measure it, remove it (root)",
        description="Build hosts on a simulated internet in network namespaces (two twistvpn "
        "nodes and a wireguard-go peer, static mode), ping across every pair, run iperf3 "
        "between them, print a table, and remove everything. Needs root.",
    )
    p.add_argument(
        "--seconds", type=_positive, default=3.0, help="iperf3 duration per pair (default 3)"
    )
    p.add_argument(
        "--pings",
        type=int,
        default=10,
        choices=range(1, 101),
        metavar="N",
        help="pings per direction (default 10)",
    )
    p.add_argument("--mtu", type=int, default=1420, help="tunnel MTU (default 1420)")
    p.add_argument(
        "--all-throughput",
        action="store_true",
        help="run iperf3 across every pair, not only twistvpn to twistvpn",
    )
    p.set_defaults(func=run)


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 60")
    return value


class _TerminatedError(Exception):
    pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _TerminatedError()


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    missing = netns.missing_requirements("wireguard-go", "wg", "iperf3", "ping")
    if missing:
        out.write(f"twistvpn lab: cannot run: {missing}\n")
        return 1
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.monotonic()
    try:
        with netns.Network(prefix="tvl") as network:
            out.write(f"twistvpn lab {network.run_id}: building {len(DEFAULT_HOSTS)} hosts\n")
            results = run_lab(network, DEFAULT_HOSTS, args, out)
            out.write(format_table(results))
            out.write("removing the lab...\n")
    except (KeyboardInterrupt, _TerminatedError):
        out.write("twistvpn lab: interrupted; everything it built is removed\n")
        return 130
    except netns.HarnessError as e:
        out.write(f"twistvpn lab: failed: {e}\neverything it built is removed\n")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    out.write(f"done in {time.monotonic() - started:.1f}s\n")
    failed = [r for r in results if r.loss > 0 or r.error]
    return 1 if failed else 0


def run_lab(
    network: netns.Network, hosts: Sequence[HostSpec], args: argparse.Namespace, out: TextIO
) -> list[PairResult]:
    nodes = netns.build_mesh(network, [h.kind for h in hosts], mtu=args.mtu)
    for node in nodes:
        out.write(
            f"  {node.label}: {node.kind:13} {node.underlay_ip:15} overlay "
            f"{node.overlay_ip} ({node.namespace})\n"
        )
    results = []
    for source, destination in itertools.permutations(nodes, 2):
        # The first packet waits for a handshake; measure after it.
        try:
            netns.wait_for_ping(network, source.namespace, destination.overlay_ip)
        except netns.HarnessError as e:
            results.append(PairResult(source, destination, 100.0, None, error=str(e)))
            continue
        completed = netns.ping(
            network, source.namespace, destination.overlay_ip, count=args.pings, interval=0.05
        )
        loss, rtt = netns.ping_stats(completed.stdout.decode(errors="replace"))
        results.append(PairResult(source, destination, loss, rtt))
    for result in results:
        wanted = args.all_throughput or (
            result.source.kind == result.destination.kind == netns.TWISTVPN
        )
        if not wanted or result.error:
            continue
        out.write(f"  iperf3 {result.label} for {args.seconds:g}s...\n")
        try:
            report = netns.iperf3(
                network,
                result.destination,
                result.source.namespace,
                result.destination.overlay_ip,
                seconds=args.seconds,
            )
            result.throughput_bps = netns.tcp_throughput_bps(report)
        except netns.HarnessError as e:
            result.error = str(e)
    return results


def format_table(results: Sequence[PairResult]) -> str:
    rows = [
        (
            r.label,
            f"{r.loss:.0f} %",
            "-" if r.rtt_ms is None else f"{r.rtt_ms:.2f} ms",
            "-" if r.throughput_bps is None else f"{r.throughput_bps / 1e6:.1f} Mbit/s",
        )
        for r in results
    ]
    errors = [f"{r.label}: {r.error}" for r in results if r.error]
    table = columns(("pair", "ping loss", "RTT", "TCP throughput"), rows)
    return table + "".join(f"{line}\n" for line in errors)


def columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: left-aligned columns under a ruled header."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"
