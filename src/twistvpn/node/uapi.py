"""
WireGuard's cross-platform control socket, read-only: C{wg show} works on a
twistvpn node as on wireguard-go.

Userspace WireGuard implementations listen on
C{/var/run/wireguard/<interface>.sock}; C{wg} sends C{get=1} and a blank
line, and reads C{key=value} lines ending in C{errno=0} and a blank line
(U{https://www.wireguard.com/xplatform/}); errors are negative errno
values, as wireguard-go sends them.  A static node's configuration comes
from its file, so C{set=1} is refused with EPERM.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet.protocol import Factory, Protocol

# A request bigger than this is not one wg sends; drop the connection.
MAX_REQUEST = 64 * 1024


@dataclass(frozen=True)
class PeerStatus:
    public_key: bytes
    preshared_key: bytes | None
    endpoint: Any
    allowed_ips: tuple[str, ...]
    last_handshake_wall: float | None
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int


def _endpoint(endpoint: Any) -> str | None:
    if type(endpoint) is not tuple or len(endpoint) < 2:
        return None  # no endpoint yet, or a path (relay) wg cannot name
    host, port = endpoint[0], endpoint[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def format_get(private_key: bytes, listen_port: int | None, peers: Iterable[PeerStatus]) -> str:
    """The answer to C{get=1}."""
    lines = [f"private_key={private_key.hex()}"]
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    for peer in peers:
        lines.append(f"public_key={peer.public_key.hex()}")
        if peer.preshared_key is not None:
            lines.append(f"preshared_key={peer.preshared_key.hex()}")
        lines.append("protocol_version=1")
        endpoint = _endpoint(peer.endpoint)
        if endpoint is not None:
            lines.append(f"endpoint={endpoint}")
        seconds = peer.last_handshake_wall or 0.0
        whole = int(seconds)
        lines.append(f"last_handshake_time_sec={whole}")
        lines.append(f"last_handshake_time_nsec={int((seconds - whole) * 1e9)}")
        lines.append(f"tx_bytes={peer.tx_bytes}")
        lines.append(f"rx_bytes={peer.rx_bytes}")
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        lines.extend(f"allowed_ip={cidr}" for cidr in peer.allowed_ips)
    lines.append("errno=0")
    return "\n".join(lines) + "\n\n"


class UAPIProtocol(Protocol):
    """One request on the control socket, answered, then the connection closes."""

    factory: UAPIFactory

    def connectionMade(self) -> None:
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport  # ITransport; mypy cannot check zope interfaces
        self._buffer += data
        if b"\n\n" not in self._buffer:
            if len(self._buffer) > MAX_REQUEST:
                transport.loseConnection()
            return
        command = self._buffer.split(b"\n", 1)[0]
        if command == b"get=1":
            answer = self.factory.describe()
        elif command == b"set=1":
            answer = f"errno=-{errno.EPERM}\n\n"
        else:
            answer = f"errno=-{errno.EINVAL}\n\n"
        transport.write(answer.encode("ascii"))
        transport.loseConnection()


class UAPIFactory(Factory):
    noisy = False  # no "Starting protocol/factory" line per connection or port
    protocol = UAPIProtocol  # type: ignore[assignment]

    def __init__(self, describe: Callable[[], str]) -> None:
        self.describe = describe


def claim_socket_path(path: str) -> None:
    """
    Make way for a control socket at C{path}: refuse when a live process
    answers there (another node or wireguard-go using the same interface
    name), remove a stale one left by a crash.
    """
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise OSError(errno.EADDRINUSE, f"{path} is in use by another process")
    finally:
        probe.close()
