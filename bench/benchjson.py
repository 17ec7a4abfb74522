"""Where and how the benchmarks in this directory write their results."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def save(kind: str, started: float, record: dict[str, Any]) -> Path:
    """
    Write C{record}, with the start time and the machine, as
    bench/results/<kind>-<UTC start time>.json; return the path.
    """
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    path = RESULTS / f"{kind}-{stamp}.json"
    machine = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    path.write_text(
        json.dumps({"started": stamp, "machine": machine, **record}, indent=2) + "\n"
    )
    print(f"written {path}")
    return path
