"""
Handshake benchmark: complete WireGuard handshakes per second on one core,
in process (`.venv/bin/python bench/handshake.py`).

Two L{WireGuardDevice}s are wired to each other in memory on a
L{twisted.internet.task.Clock}; each round, the initiator starts a
handshake and the datagrams go back and forth until the responder holds
the confirmed session (initiation, response, the confirming keepalive):
everything both sides compute, mac1 checks included, in one Python
thread.  The clock moves past the rate limits (one initiation per
REKEY_TIMEOUT, 20 ms between initiations consumed) between rounds, so
every round is a full handshake.  Prints a table and writes JSON to
bench/results/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from benchjson import save
from twisted.internet.task import Clock

from twistvpn.table import columns
from twistvpn.wireguard.device import WireGuardDevice
from twistvpn.wireguard.keys import generate_preshared_key, generate_private_key
from twistvpn.wireguard.messages import REKEY_TIMEOUT

A = ("203.0.113.1", 51820)
B = ("203.0.113.2", 51820)


class Pair:
    """Two devices joined by an in-memory wire; datagrams are carried in order."""

    def __init__(self, preshared: bool) -> None:
        self.clock = Clock()
        self.wall = 1_800_000_000.0
        self.wire: list[tuple[Any, bytes, Any]] = []
        self.a: WireGuardDevice = self._device(lambda: self.b, A)
        self.b: WireGuardDevice = self._device(lambda: self.a, B)
        psk = generate_preshared_key() if preshared else None
        self.peer_b = self.a.add_peer(self.b.public_key, psk, B, ["100.64.0.2/32"])
        self.peer_a = self.b.add_peer(self.a.public_key, psk, A, ["100.64.0.1/32"])

    def _device(self, other: Any, source: Any) -> WireGuardDevice:
        """A device whose datagrams reach C{other()} from C{source}."""
        return WireGuardDevice(
            generate_private_key(),
            self.clock,
            lambda data, addr: self.wire.append((other(), data, source)),
            lambda packet: None,
            wall_clock=self._wall,
        )

    def _wall(self) -> float:
        # TAI64N timestamps must grow by more than their 16 ms granularity.
        self.wall += 1.0
        return self.wall

    def handshake(self) -> None:
        """One complete handshake, confirmed on both sides."""
        self.clock.advance(REKEY_TIMEOUT + 1)
        self.peer_b.send_initiation(False)
        wire = self.wire
        while wire:
            device, data, source = wire.pop(0)
            device.datagram_received(data, source)


def run(rounds: int, preshared: bool) -> float:
    """Handshakes per second over C{rounds} handshakes."""
    pair = Pair(preshared)
    pair.handshake()  # warm up
    before = pair.b.counters["handshake_complete"]
    started = time.process_time()
    for _ in range(rounds):
        pair.handshake()
    elapsed = time.process_time() - started
    completed = pair.b.counters["handshake_complete"] - before
    if completed != rounds or pair.a.counters["handshake_complete"] != rounds + 1:
        raise SystemExit(f"handshake benchmark: {completed} of {rounds} handshakes completed")
    return rounds / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000, help="handshakes per run")
    parser.add_argument("--runs", type=int, default=5, help="runs (the median is reported)")
    parser.add_argument("--no-save", action="store_true", help="do not write JSON")
    args = parser.parse_args(argv)
    started = time.time()
    results: list[dict[str, Any]] = []
    for preshared in (False, True):
        rates = [run(args.rounds, preshared) for _ in range(args.runs)]
        results.append(
            {
                "preshared_key": preshared,
                "handshakes_per_second": statistics.median(rates),
                "runs": rates,
                "cpu_ms_per_handshake": 1000 / statistics.median(rates),
            }
        )
    print(
        columns(
            ("set-up", "handshakes/s (median)", "CPU ms per handshake", "runs"),
            [
                (
                    "with preshared key" if r["preshared_key"] else "no preshared key",
                    f"{r['handshakes_per_second']:.0f}",
                    f"{r['cpu_ms_per_handshake']:.3f}",
                    " ".join(f"{x:.0f}" for x in r["runs"]),
                )
                for r in results
            ],
        )
    )
    if not args.no_save:
        save("handshake", started, {"rounds": args.rounds, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
