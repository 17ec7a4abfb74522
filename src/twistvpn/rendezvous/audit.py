"""
The rendezvous's audit log: every admin action (from the CLI over the
admin socket, the HTTP API with its token, and the web console), with its
time, actor, object and result, one JSON object a line, appended to
C{DATA_DIR/audit.log} and flushed to disk before the action's answer goes
out.  Read back with C{twistvpn admin audit [--since]}.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from twistvpn.common.jsonin import loads

MAX_LINE = 4096


class AuditLog:
    """Appends records to a file only its owner may read; reads them back."""

    def __init__(self, path: str, clock: Callable[[], float]) -> None:
        self.path = path
        self._clock = clock
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # A line cut by a crash: end it, so the next record stands alone.
            self._file.write("\n")
            self._file.flush()

    def record(self, actor: str, action: str, target: str, result: str,
               detail: dict[str, Any] | None = None) -> dict[str, Any]:
        """Append one record, on disk (fsync) when this returns."""
        entry = {"time": round(self._clock(), 3), "actor": actor, "action": action,
                 "object": target, "result": result}
        if detail:
            entry["detail"] = detail
        line = json.dumps(entry, sort_keys=True)[:MAX_LINE]
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        return entry

    def read(self, since: float | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """The newest C{limit} records at or after C{since} (all without), oldest first."""
        found: list[dict[str, Any]] = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = loads(line)
                except ValueError:
                    continue  # a line cut by a crash: skip it, keep the rest
                if isinstance(entry, dict) and (since is None or entry.get("time", 0) >= since):
                    found.append(entry)
        return found[-limit:]

    def close(self) -> None:
        self._file.close()
