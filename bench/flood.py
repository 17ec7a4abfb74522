"""
A flood of stalled connections against a real rendezvous on loopback
(audit item 8b): its memory before, at the peak and after the flood, as a
ratio to its own baseline in the same run.  Each connection sends a TLS
ClientHello's first bytes and then nothing; the sources are loopback
addresses 127.0.0.2 and up, 50 connections each (under the per-source bound
of 64), so the rendezvous holds them until its handshake timeout.

    python bench/flood.py [--connections 3000] [--sources 60]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time

from benchjson import save

from twistvpn.testing.localrun import LocalRendezvous


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--sources", type=int, default=60)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="tvflood") as tmp:
        port = free_port()
        rendezvous = LocalRendezvous(os.path.join(tmp, "d"), port)
        try:
            rendezvous.start()
            time.sleep(1)
            baseline = rss_kib(rendezvous.pid)
            hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # the start of a ClientHello
            frame = b"\x16" + len(hello).to_bytes(2, "big") + hello
            held: list[socket.socket] = []
            per_source = -(-args.connections // args.sources)
            for n in range(args.connections):
                s = socket.socket()
                s.bind((f"127.0.0.{2 + n // per_source}", 0))
                s.settimeout(5)
                try:
                    s.connect(("127.0.0.1", port))
                    s.sendall(frame)
                except OSError:
                    s.close()
                    continue
                held.append(s)
            time.sleep(2)
            peak = rss_kib(rendezvous.pid)
            open_at_peak = len(held)
            for s in held:
                s.close()
            time.sleep(3)
            after_close = rss_kib(rendezvous.pid)
            time.sleep(35)  # past the handshake timeout and the next trim
            settled = rss_kib(rendezvous.pid)
        finally:
            rendezvous.kill()
    record = {
        "connections": open_at_peak, "sources": args.sources,
        "rss_kib": {"baseline": baseline, "peak": peak, "after_close": after_close,
                    "settled": settled},
        "per_connection_kib_at_peak": round((peak - baseline) / max(open_at_peak, 1), 1),
        "settled_over_baseline": round(settled / baseline, 2),
    }
    print(f"{open_at_peak} stalled connections from {args.sources} sources")
    print(f"RSS baseline {baseline} KiB, peak {peak} KiB "
          f"({record['per_connection_kib_at_peak']} KiB a connection), "
          f"after closing {after_close} KiB, settled {settled} KiB "
          f"({record['settled_over_baseline']}x baseline)")
    if not args.no_save:
        print(save("flood", started, record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
