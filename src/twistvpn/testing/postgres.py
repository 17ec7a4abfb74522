"""
A throwaway PostgreSQL cluster for tests and benchmarks: Debian's own binaries, a cluster
made by C{initdb} in a temporary directory, started by C{pg_ctl} on a
UNIX socket in that directory only (no TCP), as a non-root user (PostgreSQL
refuses root: as root the cluster runs as C{nobody}), and removed again,
also when the test fails.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

PORT = 54329  # only a socket file's name: nothing listens on TCP


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found is not None:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def postgres_missing() -> str | None:
    """Why a PostgreSQL cluster cannot be made here, or None."""
    for name in ("initdb", "pg_ctl"):
        if _binary(name) is None:
            return f"PostgreSQL's {name} is not installed (sudo bash scripts/bootstrap.sh)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    return None


class Cluster:
    """One cluster; C{dsn} reaches its C{postgres} database as superuser C{twistvpn}."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tvpg")
        self.data = os.path.join(self.dir, "data")
        self._as: list[str] = []
        if os.geteuid() == 0:
            os.chown(self.dir, 65534, 65534)  # nobody
            self._as = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        os.chmod(self.dir, 0o700)
        self.started = False

    @property
    def dsn(self) -> str:
        return f"postgresql://twistvpn@/postgres?host={self.dir}&port={PORT}"

    def _run(self, argv: Sequence[str], timeout: float = 60) -> None:
        done = subprocess.run([*self._as, *argv], capture_output=True, timeout=timeout,
                              check=False, cwd=self.dir, env={**os.environ, "LC_ALL": "C"})
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stderr.decode(errors='replace')}")

    def start(self) -> Cluster:
        initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
        assert initdb is not None and pg_ctl is not None
        self._run([initdb, "-D", self.data, "-U", "twistvpn", "--auth=trust", "-E", "UTF8",
                   "--no-sync"])
        options = f"-k {self.dir} -p {PORT} -c listen_addresses='' -c fsync=off"
        self._run([pg_ctl, "-D", self.data, "-o", options, "-l",
                   os.path.join(self.dir, "log"), "-w", "-t", "30", "start"])
        self.started = True
        return self

    def stop(self) -> None:
        try:
            if self.started:
                pg_ctl = _binary("pg_ctl")
                assert pg_ctl is not None
                self._run([pg_ctl, "-D", self.data, "-m", "immediate", "-w", "-t", "30",
                           "stop"])
                self.started = False
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
