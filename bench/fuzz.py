"""
The long fuzz run: every parser of untrusted input (twistvpn.testing.fuzz)
fed many inputs, each a known first bytes (a message type) or none, then
random bytes or a mutation of an earlier input (bytes flipped, cut,
repeated, spliced).  Counts per parser: inputs, exceptions that escaped,
errors logged.  Prints a table and writes JSON to bench/results/.

    python bench/fuzz.py [--inputs 20000] [--seed 1] [--only relay-udp]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from typing import Any

from benchjson import save
from twisted.logger import globalLogPublisher

from twistvpn.table import columns
from twistvpn.testing.fuzz import TARGETS, Target


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(5)
        if choice == 0 and buffer:
            buffer[rng.randrange(len(buffer))] ^= 1 << rng.randrange(8)
        elif choice == 1 and buffer:
            del buffer[rng.randrange(len(buffer)):]
        elif choice == 2:
            buffer += rng.randbytes(rng.randint(1, 64))
        elif choice == 3 and buffer:
            start = rng.randrange(len(buffer))
            buffer[start:start] = buffer[start:start + rng.randint(1, 32)] * rng.randint(1, 8)
        elif corpus:
            other = rng.choice(corpus)
            buffer = buffer[: len(buffer) // 2] + other[len(other) // 2:]
    return bytes(buffer[:4096])


def run(target: Target, inputs: int, rng: random.Random) -> dict[str, Any]:
    logged: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            logged.append(str(event.get("log_failure") or event.get("log_format")))

    globalLogPublisher.addObserver(observe)
    escaped: list[str] = []
    corpus: list[bytes] = []
    feed = target.build()
    started = time.perf_counter()
    try:
        for n in range(inputs):
            if corpus and rng.random() < 0.5:
                data = mutate(rng, rng.choice(corpus), corpus)
            else:
                data = rng.choice(target.prefixes) + rng.randbytes(rng.randint(0, 300))
            if len(corpus) < 256:
                corpus.append(data)
            elif n % 7 == 0:
                corpus[rng.randrange(len(corpus))] = data
            try:
                feed(data)
            except Exception:
                escaped.append(traceback.format_exc(limit=3))
                feed = target.build()
    finally:
        globalLogPublisher.removeObserver(observe)
    seconds = time.perf_counter() - started
    return {"target": target.name, "inputs": inputs, "seconds": round(seconds, 2),
            "escaped": len(escaped), "logged_errors": len(logged),
            "examples": (escaped + logged)[:3]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--inputs", type=int, default=20000, help="inputs per parser")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", action="append", choices=[t.name for t in TARGETS])
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    started = time.time()
    rng = random.Random(args.seed)
    results = [run(t, args.inputs, rng) for t in TARGETS if not args.only or t.name in args.only]
    header = ["parser", "inputs", "inputs/s", "escaped", "logged errors"]
    rows = [[r["target"], str(r["inputs"]), f"{r['inputs'] / max(r['seconds'], 1e-9):.0f}",
             str(r["escaped"]), str(r["logged_errors"])] for r in results]
    print(columns(header, rows))
    for r in results:
        for example in r["examples"]:
            print(f"--- {r['target']}:\n{example}")
    if not args.no_save:
        print(save("fuzz", started, {"inputs": args.inputs, "seed": args.seed,
                                     "results": results}))
    return 1 if any(r["escaped"] or r["logged_errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
