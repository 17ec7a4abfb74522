"""
The rendezvous and joined-mode nodes as C{twistd} processes in
namespaces: started, administered, asked for their status and paths.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twistvpn.rendezvous.files import STATE_FILE
from twistvpn.testing.netns.namespaces import (
    NODE_REACTOR,
    TWISTD,
    WIREGUARD_SOCKET_DIR,
    HarnessError,
    Network,
    Process,
    check_address,
    wait_for,
)
from twistvpn.testing.netns.sites import Host

RENDEZVOUS_STATE = STATE_FILE


CONTROL_PORT = 8443


DISCOVERY_PORTS = (3478, 3479)


RELAY_PORT = 443


@dataclass
class Rendezvous:
    """A rendezvous process: where it runs and how nodes reach it."""

    namespace: str
    ip: str
    data_dir: Path
    process: Process | None = None
    url: str = ""

    def admin_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "twistvpn", "admin", "--data-dir", str(self.data_dir), *args]


def start_rendezvous(
    network: Network, namespace: str, ip: str, *, rendezvous: Rendezvous | None = None,
    extra: Sequence[str] = (), timeout: float = 20.0,
) -> Rendezvous:
    """
    Run C{twistd -n twistvpn-rendezvous} in C{namespace} at C{ip} (its
    discovery ports, control channel and embedded relay on the standard
    ports there), or start C{rendezvous} again with its data directory;
    ready once it wrote its state file.
    """
    check_address(f"{ip}/32")
    if rendezvous is None:
        rendezvous = Rendezvous(namespace, ip, network.tmpdir / network.name("rdv"))
    state = rendezvous.data_dir / RENDEZVOUS_STATE
    state.unlink(missing_ok=True)  # left by a killed one
    process = network.spawn(
        namespace,
        [
            *TWISTD, "-n", "--pidfile=", "twistvpn-rendezvous",
            "--data-dir", str(rendezvous.data_dir),
            "--hostname", ip,
            "--control", f"tcp:{CONTROL_PORT}:interface={ip}",
            "--udp-port", str(DISCOVERY_PORTS[0]), "--udp-port2", str(DISCOVERY_PORTS[1]),
            "--udp-interface", ip,
            "--relay-udp-port", str(RELAY_PORT), "--relay-tcp-port", str(RELAY_PORT),
            "--admin-http", "none",
            *extra,
        ],
        log_name="rendezvous",
    )
    rendezvous.process = process

    def ready() -> dict[str, Any] | None:
        if not process.running():
            raise HarnessError(f"the rendezvous exited:\n{process.log()}")
        try:
            text = state.read_text()
        except FileNotFoundError:
            return None
        return json.loads(text) if text.endswith("\n") else None

    info = wait_for(ready, timeout, "the rendezvous to listen")
    rendezvous.url = info["url"]
    return rendezvous


def admin(network: Network, rendezvous: Rendezvous, *args: str) -> str:
    """Run C{twistvpn admin ARGS} against C{rendezvous}; return its output."""
    result = network.command(rendezvous.admin_argv(*args))
    return result.stdout.decode()


def admin_json(rendezvous: Rendezvous, path: str) -> Any:
    """GET an admin API path (JSON) over the rendezvous's admin socket."""
    from twistvpn.rendezvous.admin_cli import AdminClient, AdminError

    try:
        return AdminClient(data_dir=str(rendezvous.data_dir)).request("GET", path)
    except AdminError as e:
        raise HarnessError(f"admin API {path}: {e}") from None


@dataclass
class NodeProcess:
    """A node in joined mode: its host, data directory and process."""

    name: str
    host: Host
    data_dir: Path
    ifname: str
    process: Process | None = None
    node_id: str | None = None

    def paths(self) -> dict[str, str]:
        """Each peer's current path kind, from the node's "peer NAME path KIND" lines."""
        return peer_paths(self.process.log() if self.process is not None else "")


PEER_PATH = re.compile(r"\bpeer (\S+) path (\w+)")


WAITING = re.compile(r"\bnode (\w+) is waiting for authorization in network (\w+)")


def peer_paths(log: str) -> dict[str, str]:
    """The last path the log reported for each peer."""
    return {m.group(1): m.group(2) for m in PEER_PATH.finditer(log)}


def new_node(network: Network, host: Host) -> NodeProcess:
    """A node's place on C{host}: its data directory and interface name (no process yet)."""
    node = NodeProcess(host.name, host, network.tmpdir / network.name(host.name),
                       network.interface_name(f"t{host.name}"))
    network.track_socket(WIREGUARD_SOCKET_DIR / f"{node.ifname}.sock")
    return node


def _spawn_node(network: Network, node: NodeProcess, args: Sequence[str]) -> None:
    node.process = network.spawn(
        node.host.namespace,
        [*TWISTD, *NODE_REACTOR, "-n", "--pidfile=", "twistvpn-node",
         "--data-dir", str(node.data_dir), *args],
        log_name=f"node-{node.name}",
    )


def start_joined_node(
    network: Network, host: Host, rendezvous: Rendezvous, network_id: str, *,
    port: int = 41641, extra_args: Sequence[str] = (),
) -> NodeProcess:
    """Run C{twistd -n twistvpn-node} joined to C{network_id} on C{host}."""
    node = new_node(network, host)
    _spawn_node(network, node, [
        "--rendezvous", rendezvous.url,
        "--join", network_id,
        "--name", node.name,
        "--port", str(port),
        "--interface", node.ifname,
        # resolved serves the host's namespace, not the test's
        "--system-dns", "off",
        *extra_args,
    ])
    return node


def node_command(network: Network, node: NodeProcess, *args: str,
                 check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """C{twistvpn ARGS --data-dir DIR}: a user's command for the node (its socket or file)."""
    return network.command([sys.executable, "-m", "twistvpn", *args,
                            "--data-dir", str(node.data_dir)], check=check, timeout=30)


def configure_node(network: Network, host: Host, rendezvous: Rendezvous, network_id: str,
                   *, port: int = 41641) -> NodeProcess:
    """
    A node set up as a user sets one up, before it runs: C{twistvpn join
    NETWORK --rendezvous URL} and C{twistvpn set} for what the test needs.
    """
    node = new_node(network, host)
    node_command(network, node, "join", network_id, "--rendezvous", rendezvous.url)
    for key, value in (("name", node.name), ("port", str(port)), ("interface", node.ifname),
                       ("system-dns", "off")):
        node_command(network, node, "set", key, value)
    return node


def start_node(network: Network, node: NodeProcess) -> None:
    """C{twistd -n twistvpn-node --data-dir DIR}: the settings file is the rest."""
    _spawn_node(network, node, [])


def node_status(network: Network, node: NodeProcess) -> Any:
    """C{twistvpn status --json} of a joined node (its local API), or None."""
    result = network.command(
        [sys.executable, "-m", "twistvpn", "status", "--json", "--data-dir", str(node.data_dir)],
        check=False, timeout=10,
    )
    if result.returncode != 0:
        return None
    try:
        return json.loads(result.stdout)
    except ValueError:
        return None


def ping_until_answered(
    network: Network, namespace: str, destination: str, timeout: float = 30.0,
) -> subprocess.Popen[bytes]:
    """
    Start C{ping} that ends at the first reply (or after C{timeout} s):
    C{-c 1 -w T} keeps sending every 0.2 s until one answer.  The caller
    waits for it; its exit status 0 means answered.
    """
    check_address(destination)
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace, "ping", "-n", "-q", "-c", "1", "-i", "0.2",
         "-W", "1", "-w", str(int(timeout)), destination],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def start_bridge(network: Network, namespace: str, listen: str, connect: str,
                 timeout: float = 10.0) -> Process:
    """
    A L{twistvpn.testing.bridge} in C{namespace} ("" for the root one):
    C{listen} spliced to C{connect}; returns once it listens.
    """
    process = network.spawn(namespace, [sys.executable, "-m", "twistvpn.testing.bridge",
                                        listen, connect], log_name="bridge")

    def ready() -> bool:
        if not process.running():
            raise HarnessError(f"the bridge exited:\n{process.log()}")
        return "listening" in process.log()

    wait_for(ready, timeout, f"a bridge listening on {listen}", interval=0.05)
    return process
