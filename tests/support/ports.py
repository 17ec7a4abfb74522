"""Ports for processes a test starts on loopback."""

from __future__ import annotations

import socket


def free_tcp_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
