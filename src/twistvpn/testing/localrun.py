"""
A C{twistd twistvpn-rendezvous} child process on loopback, for tests and
benchmarks: started with free ports, ready once it has written its state
file, stopped (or killed) by its own pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, BinaryIO

from twistvpn.rendezvous.files import STATE_FILE

TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


class LocalRendezvous:
    """One rendezvous process; C{info} is its state file once started."""

    def __init__(
        self,
        data_dir: str,
        control_port: int = 0,
        log: BinaryIO | None = None,
        extra_args: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.extra_args = extra_args
        # What the command runs under ("ip", "netns", "exec", NAME: in a
        # namespace; it execs, so the pid stays the rendezvous's own).
        self.prefix = prefix
        self.data_dir = data_dir
        self.control_port = control_port
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 20.0) -> dict[str, Any]:
        """Start the process and wait (blocking) until it listens."""
        state = os.path.join(self.data_dir, STATE_FILE)
        if os.path.exists(state):
            os.unlink(state)  # left by a process that was killed
        self.process = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-c",
                TWISTD,
                "-n",
                "--pidfile=",
                "twistvpn-rendezvous",
                "--data-dir",
                self.data_dir,
                "--hostname",
                "127.0.0.1",
                "--control",
                f"tcp:{self.control_port}:interface=127.0.0.1",
                "--udp-port",
                "0",
                "--udp-port2",
                "0",
                "--udp-interface",
                "127.0.0.1",
                "--admin-http",
                "tcp:0:interface=127.0.0.1",
                "--web",
                "tcp:0:interface=127.0.0.1",
                "--relay-udp-port",
                "0",
                "--relay-tcp-port",
                "0",
                *self.extra_args,
            ],
            stdout=self.log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.process.returncode}")
            if os.path.exists(state):
                with open(state) as f:
                    text = f.read()
                if text.endswith("\n"):
                    self.info = json.loads(text)
                    return self.info
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("the rendezvous did not become ready")

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        """Send C{sig} (if still running) and reap; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
        return self.process.wait(15)

    def rss_kib(self) -> int:
        """The process's resident set size (from /proc)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")
