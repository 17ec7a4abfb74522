"""
Real networks in network namespaces, for integration tests, the lab and
benchmarks (root only).

A L{Network} names everything it creates after a run id unique to the
process, remembers each namespace, process and socket file by its own
name or pid, and removes them all in L{Network.close} (a context manager,
or C{addCleanup(network.close)} in a test), also when setting up fails
half-way.  It refuses addresses outside the ranges documentation and
carrier-grade NAT reserve, so nothing it builds can leak onto a real
network.  Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import NetNS

# The only addresses a harness network may use (GUIDE.md): the simulated
# internet, LANs behind NATs, the overlay, loopback.
ALLOWED_RANGES = tuple(
    ipaddress.ip_network(n)
    for n in ("203.0.113.0/24", "198.51.100.0/24", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8")
)
WIREGUARD_SOCKET_DIR = Path("/var/run/wireguard")
NETNS_DIR = "/run/netns"  # where `ip netns add` puts its names
COMMAND_TIMEOUT = 20.0
# twistd of the running interpreter (`python -m twisted` is `twist`, not twistd).
TWISTD = (sys.executable, "-c", "from twisted.scripts.twistd import run; run()")
# Nodes run on the reactor that dispatches the data plane directly
# (twistvpn.node.reactor).
NODE_REACTOR = ("--reactor", "twistvpn")


class HarnessError(RuntimeError):
    """Setting up or driving a namespace network failed."""


def missing_requirements(*programs: str) -> str | None:
    """
    Why integration tests cannot run here, or None when they can: they need
    root, network namespaces, and the named programs.
    """
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    for program in ("ip", *programs):
        if shutil.which(program) is None:
            return f"{program} is not installed (sudo bash scripts/bootstrap.sh)"
    return None


def check_address(cidr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """Refuse an address outside the harness's ranges."""
    iface = ipaddress.ip_interface(cidr)
    if not any(
        iface.network.version == r.version and iface.network.subnet_of(r)  # type: ignore[arg-type]
        for r in ALLOWED_RANGES
    ):
        raise ValueError(f"{cidr} is outside the ranges a test network may use")
    return iface


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll C{condition} until it returns something true, at most C{timeout} s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise HarnessError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def _signals_safe_for_children() -> Iterator[None]:
    """
    pyroute2 forks a short-lived child to open a netlink socket inside a
    namespace, and then SIGTERMs it.  A child inherits our signal handlers:
    one that raises (the lab's, KeyboardInterrupt) would unwind this
    process's stack in the child, running its clean-up a second time.  Here
    a signal ends a child at once, and reaches this process after the block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()
    pending: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        pending.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for restored, old in previous.items():
            signal.signal(restored, old)
        for late in pending:
            signal.raise_signal(late)


@dataclass
class Process:
    """A process started in a namespace, known by its pid."""

    namespace: str
    argv: Sequence[str]
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        """What the process wrote so far (stdout and stderr together)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def cpu_seconds(self) -> float:
        """User plus system CPU time so far, from /proc/<pid>/stat."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        # utime and stime are fields 14 and 15 of stat(5); we dropped 2.
        ticks = int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Switch:
    """A bridge in its own namespace: a shared segment many namespaces join."""

    network: Network
    namespace: str
    bridge: str = "br0"
    members: list[str] = field(default_factory=list)

    def attach(self, namespace: str, address: str | None = None, mtu: int = 1500) -> str:
        """Connect C{namespace} to the segment; return its interface's name."""
        inside, outside = self.network.veth(namespace, self.namespace, address, None, mtu=mtu)
        self.network.ip("link", "set", outside, "master", self.bridge, namespace=self.namespace)
        self.members.append(inside)
        return inside


def process_prefix(prefix: str, pid: int | None = None) -> str:
    """
    How the names of every L{Network} made by process C{pid} (this one by
    default) with C{prefix} begin: tests look for what they left behind
    by it, not for what other test processes have up at the same time.
    """
    return f"{prefix}{(os.getpid() if pid is None else pid) % 0x10000:04x}"


class Network:
    """
    Namespaces, links, routers and processes of one test run.
    """

    def __init__(self, prefix: str = "tv") -> None:
        # Short: interface names are at most 15 characters.
        self.run_id = process_prefix(prefix) + secrets.token_hex(2)
        self.namespaces: list[str] = []
        self.processes: list[Process] = []
        self.socket_files: list[Path] = []
        self._links = 0
        self._tmp: Path | None = None
        self._closed = False

    # -- context manager ---------------------------------------------------------

    def __enter__(self) -> Network:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except HarnessError as e:
            if exc_type is None:
                raise
            # Do not hide the failure that brought us here behind this one.
            sys.stderr.write(f"netns: while cleaning up after an error: {e}\n")

    @property
    def tmpdir(self) -> Path:
        """A private directory for configs and logs, removed on close."""
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix=f"{self.run_id}-"))
            os.chmod(self._tmp, 0o700)
        return self._tmp

    def name(self, role: str) -> str:
        """A name unique to this run, for a namespace or a file."""
        return f"{self.run_id}-{role}"

    def interface_name(self, tag: str) -> str:
        """An interface name unique to this run (at most 15 characters)."""
        name = f"{self.run_id}{tag}"
        if len(name) > 15:
            raise ValueError(f"interface name {name} is longer than 15 characters")
        return name

    # -- commands ------------------------------------------------------------------

    def command(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a command in the root namespace, bounded in time."""
        result = subprocess.run(
            list(argv), capture_output=True, timeout=timeout, input=input, check=False
        )
        if check and result.returncode != 0:
            raise HarnessError(
                f"{' '.join(argv)} failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result

    def run(
        self,
        namespace: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a command inside C{namespace} and wait for it, bounded in time."""
        return self.command(
            ["ip", "netns", "exec", namespace, *argv], check=check, timeout=timeout, input=input
        )

    def ip(self, *args: str, namespace: str | None = None, check: bool = True) -> None:
        """Run C{ip} (never to read its output: only to change things)."""
        prefix = ["ip"] if namespace is None else ["ip", "-n", namespace]
        self.command([*prefix, *args], check=check)

    # -- topology --------------------------------------------------------------------

    def add_namespace(self, role: str) -> str:
        """Create a namespace with loopback up; return its name."""
        self._check_open()
        name = self.name(role)
        # Recorded first: an interrupt while `ip netns add` runs must not
        # leave the namespace behind (close() skips it if it never came).
        self.namespaces.append(name)
        self.ip("netns", "add", name)
        self.ip("link", "set", "lo", "up", namespace=name)
        return name

    def veth(
        self,
        ns_a: str,
        ns_b: str,
        address_a: str | None = None,
        address_b: str | None = None,
        *,
        mtu: int = 1500,
    ) -> tuple[str, str]:
        """A veth pair between two namespaces, addressed and up."""
        for address in (address_a, address_b):
            if address is not None:
                check_address(address)
        self._links += 1
        name_a = self.interface_name(f"v{self._links}a")
        name_b = self.interface_name(f"v{self._links}b")
        self.ip(
            "link",
            "add",
            name_a,
            "netns",
            ns_a,
            "type",
            "veth",
            "peer",
            "name",
            name_b,
            "netns",
            ns_b,
        )
        for ns, ifname, address in ((ns_a, name_a, address_a), (ns_b, name_b, address_b)):
            self.configure_interface(ns, ifname, [address] if address else [], mtu=mtu)
        return name_a, name_b

    def configure_interface(
        self, namespace: str, ifname: str, addresses: Iterable[str], *, mtu: int | None = None
    ) -> None:
        """Add addresses to an interface (through netlink) and bring it up."""
        ifaces = [check_address(a) for a in addresses]
        with _signals_safe_for_children(), NetNS(namespace) as ns:
            found = ns.link_lookup(ifname=ifname)
            if not found:
                raise HarnessError(f"no interface {ifname} in {namespace}")
            index = found[0]
            for iface in ifaces:
                ns.addr(
                    "add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
                )
            if mtu is not None:
                ns.link("set", index=index, mtu=mtu)
            ns.link("set", index=index, state="up")

    def add_switch(self, role: str) -> Switch:
        """A namespace holding a bridge: a shared segment (the simulated internet)."""
        namespace = self.add_namespace(role)
        self.ip("link", "add", "br0", "type", "bridge", namespace=namespace)
        self.ip("link", "set", "br0", "up", namespace=namespace)
        return Switch(self, namespace)

    def add_route(self, namespace: str, destination: str, via: str) -> None:
        check_address(via)
        self.ip("route", "replace", destination, "via", via, namespace=namespace)

    def enable_forwarding(self, namespace: str) -> None:
        self.run(namespace, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])

    def masquerade(self, namespace: str, out_interface: str, *, mode: str = "easy") -> None:
        """
        Make C{namespace} a NAT router towards C{out_interface}, firewalled
        as home routers are (new inbound UDP to the router itself dropped).
        C{mode} (L{NAT_MODES}): "easy" (MASQUERADE: the source port kept where it
        is free, one mapping for every destination, and conntrack letting
        in only replies from the exact address and port a mapping was
        opened to), "easyaf" (the same plus an explicit stateful filter on
        the WAN side: see docs/lab.md for what it really is), "hard"
        (C{--random-fully}: a new random port for every destination),
        "udpblock" (MASQUERADE, UDP not forwarded at all).
        """
        if mode not in NAT_MODES:
            raise ValueError(f"unknown NAT mode {mode!r} (one of {', '.join(NAT_MODES)})")
        self.enable_forwarding(namespace)
        rule = [
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            out_interface,
            "-j",
            "MASQUERADE",
        ]
        if mode == "hard":
            rule.append("--random-fully")
        self.run(namespace, rule)
        # As every home router: unsolicited UDP to the router itself is
        # dropped.  Without it a peer's early probe is delivered to the
        # router, its conntrack entry confirmed, and the router then maps
        # its own host's packets to that peer to another port.
        self.run(namespace, ["iptables", "-A", "INPUT", "-i", out_interface, "-p", "udp",
                             "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"])
        if mode == "udpblock":
            self.run(namespace, ["iptables", "-A", "FORWARD", "-p", "udp", "-j", "DROP"])
        if mode == "easyaf":
            for extra in (
                ["-m", "conntrack", "--ctstate", "ESTABLISHED", "-j", "ACCEPT"],
                ["-j", "DROP"],
            ):
                self.run(namespace, ["iptables", "-A", "FORWARD", "-i", out_interface, *extra])

    # -- processes ---------------------------------------------------------------------

    def spawn(
        self,
        namespace: str,
        argv: Sequence[str],
        *,
        log_name: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Process:
        """
        Start C{argv} inside C{namespace} (ip netns exec replaces itself with
        the command, so the pid is the command's own), output to a log file.
        """
        self._check_open()
        log_path = self.tmpdir / f"{log_name or Path(argv[0]).name}-{len(self.processes)}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", namespace, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if env is None else {**os.environ, **env},
                start_new_session=True,
            )
        process = Process(namespace, list(argv), popen, log_path)
        self.processes.append(process)
        return process

    def stop(self, process: Process, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after C{timeout} s; return the exit status."""
        if process.running():
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                return process.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
        return process.popen.wait(timeout)

    def kill(self, process: Process) -> int:
        """SIGKILL at once: a crash, not a shutdown."""
        if process.running():
            try:
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return process.popen.wait(COMMAND_TIMEOUT)

    # -- files -----------------------------------------------------------------------

    def write_private(self, name: str, text: str) -> Path:
        """A file only its owner may read (configs holding keys)."""
        path = self.tmpdir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    def track_socket(self, path: Path) -> None:
        """Remove C{path} (a wireguard-go control socket) on close."""
        self.socket_files.append(path)

    # -- teardown --------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process and remove every namespace and file of this run."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for process in reversed(self.processes):
            try:
                self.stop(process, timeout=3.0)
            except Exception as e:  # keep tearing down the rest
                errors.append(f"stopping {process.pid}: {e}")
        for namespace in reversed(self.namespaces):
            result = self.command(["ip", "netns", "del", namespace], check=False)
            if result.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, namespace)):
                errors.append(f"removing {namespace}: {result.stderr.decode().strip()}")
        for path in self.socket_files:
            path.unlink(missing_ok=True)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        if errors:
            raise HarnessError("; ".join(errors))

    def _check_open(self) -> None:
        if self._closed:
            raise HarnessError("network already closed")


# -- sites: LANs behind NAT routers on the simulated internet -------------------------

# How a site reaches the simulated internet: "open" is no NAT at all (its
# hosts have public addresses), the others are L{Network.masquerade}'s.
NAT_MODES = ("easy", "easyaf", "hard", "udpblock")
SITE_MODES = ("open", *NAT_MODES)


@dataclass
class Host:
    """One machine of a site: its namespace, its interface and address."""

    name: str
    namespace: str
    ifname: str
    address: str
    prefixlen: int
    gateway: str | None


@dataclass
class Site:
    """A LAN with its NAT router on the internet, or open hosts on the internet."""

    name: str
    mode: str
    public_ip: str  # the router's WAN address (the first host's, open)
    hosts: list[Host]
    router: str | None = None
    lan: str | None = None  # e.g. "192.168.1" (a /24)


def add_site(
    network: Network,
    name: str,
    internet: Switch,
    public_ip: str,
    lan: str,
    *,
    mode: str = "easy",
    hosts: int = 1,
    mtu: int = 1500,
) -> Site:
    """
    A site: C{hosts} machines on the LAN C{lan}.0/24 (.2, .3, ...) behind a
    router whose WAN side is C{public_ip} on C{internet} (a /24), NATting
    as C{mode} says; with C{mode} "open", the machines are on the internet
    themselves, at C{public_ip} and the addresses after it.  Namespaces are
    C{name}r (router), C{name}l (the LAN's switch), C{name}1, C{name}2...
    """
    if mode not in SITE_MODES:
        raise ValueError(f"unknown site mode {mode!r} (one of {', '.join(SITE_MODES)})")
    first = ipaddress.ip_address(public_ip)
    if mode == "open":
        members = []
        for i in range(hosts):
            address = str(first + i)
            namespace = network.add_namespace(f"{name}{i + 1}")
            ifname = internet.attach(namespace, f"{address}/24", mtu=mtu)
            members.append(Host(f"{name}{i + 1}", namespace, ifname, address, 24, None))
        return Site(name, mode, public_ip, members)
    router = network.add_namespace(f"{name}r")
    wan = internet.attach(router, f"{public_ip}/24", mtu=mtu)
    switch = network.add_switch(f"{name}l")
    switch.attach(router, f"{lan}.1/24", mtu=mtu)
    members = []
    for i in range(hosts):
        namespace = network.add_namespace(f"{name}{i + 1}")
        address = f"{lan}.{i + 2}"
        ifname = switch.attach(namespace, f"{address}/24", mtu=mtu)
        network.add_route(namespace, "default", f"{lan}.1")
        members.append(Host(f"{name}{i + 1}", namespace, ifname, address, 24, f"{lan}.1"))
    network.masquerade(router, wan, mode=mode)
    return Site(name, mode, public_ip, members, router, lan)


def change_address(network: Network, host: Host, address: str) -> None:
    """
    Move C{host} to another address of its subnet (roaming: a new DHCP
    lease), the old one gone and the default route back through the gateway.
    """
    new = check_address(f"{address}/{host.prefixlen}")
    old = check_address(f"{host.address}/{host.prefixlen}")
    with _signals_safe_for_children(), NetNS(host.namespace) as ns:
        index = ns.link_lookup(ifname=host.ifname)[0]
        # Old first: removing a primary address removes its secondaries too.
        ns.addr("del", index=index, address=str(old.ip), prefixlen=old.network.prefixlen)
        ns.addr("add", index=index, address=str(new.ip), prefixlen=new.network.prefixlen)
    if host.gateway is not None:
        network.add_route(host.namespace, "default", host.gateway)
    host.address = address


# -- the rendezvous and joined nodes as processes ------------------------------------

RENDEZVOUS_STATE = "rendezvous.json"  # twistvpn.rendezvous.service.STATE_FILE
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
class JoinedNode:
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


def start_joined_node(
    network: Network, host: Host, rendezvous: Rendezvous, network_id: str, *,
    port: int = 41641,
) -> JoinedNode:
    """Run C{twistd -n twistvpn-node} joined to C{network_id} on C{host}."""
    node = JoinedNode(host.name, host, network.tmpdir / network.name(host.name),
                      network.interface_name(f"t{host.name}"))
    network.track_socket(WIREGUARD_SOCKET_DIR / f"{node.ifname}.sock")
    node.process = network.spawn(
        host.namespace,
        [
            *TWISTD, *NODE_REACTOR, "-n", "--pidfile=", "twistvpn-node",
            "--data-dir", str(node.data_dir),
            "--rendezvous", rendezvous.url,
            "--join", network_id,
            "--name", node.name,
            "--port", str(port),
            "--interface", node.ifname,
        ],
        log_name=f"node-{node.name}",
    )
    return node


def node_status(network: Network, node: JoinedNode) -> Any:
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


_UDP_SENDER = """
import socket, sys, time
addresses = sys.argv[3:]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    for address in addresses:
        try:
            s.sendto(b"x" * 64, (address, 9))
        except OSError:
            pass  # no route (yet, or any more): keep trying
    time.sleep(float(sys.argv[2]))
"""


def start_udp_sender(network: Network, namespace: str, destinations: Sequence[str],
                     seconds: float, interval: float = 0.05) -> Process:
    """
    A process in C{namespace} sending a small UDP datagram to each of
    C{destinations} every C{interval} s for C{seconds} s, whatever errors
    it meets (unlike ping, which gives up when its route goes).
    """
    for destination in destinations:
        check_address(f"{destination}/32")
    return network.spawn(
        namespace,
        [sys.executable, "-c", _UDP_SENDER, str(seconds), str(interval), *destinations],
        log_name="udp-sender",
    )


def count_packets(network: Network, namespace: str, source: str, chain: str = "INPUT") -> int:
    """
    Packets from C{source} seen so far by a counting rule in C{namespace}:
    C{chain} INPUT (of the filter table: what reaches the host), or
    PREROUTING (of the raw table: all that arrives, before NAT and
    conntrack).  The rule is added on first use.
    """
    check_address(f"{source}/32")
    table = {"INPUT": "filter", "PREROUTING": "raw"}[chain]
    rule = [chain, "-s", source, "-j", "ACCEPT"]
    iptables = ["iptables", "-t", table]
    if network.run(namespace, [*iptables, "-C", *rule], check=False).returncode != 0:
        network.run(namespace, [*iptables, "-I", *rule])
    listing = network.run(namespace, [*iptables, "-n", "-v", "-x", "-L", chain]).stdout
    for line in listing.decode().splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[2] == "ACCEPT" and fields[7] == source:
            return int(fields[0])
    raise HarnessError(f"no {chain} rule for {source} in {namespace}")


# -- the VPN endpoints the tests, the lab and the benchmark run ------------------------


@dataclass
class PeerSpec:
    """One peer line of a wg config, in our terms."""

    public_key: str
    allowed_ips: Sequence[str]
    endpoint: str | None = None
    preshared_key: str | None = None
    persistent_keepalive: int = 0


def wg_config(
    private_key: str,
    peers: Sequence[PeerSpec],
    *,
    listen_port: int | None = None,
    addresses: Sequence[str] = (),
    mtu: int | None = None,
) -> str:
    """
    A wg config. With C{addresses}/C{mtu} it is a wg-quick file (what a
    twistvpn node reads); without, what C{wg setconf} takes.
    """
    lines = ["[Interface]", f"PrivateKey = {private_key}"]
    if addresses:
        lines.append(f"Address = {', '.join(addresses)}")
    if listen_port is not None:
        lines.append(f"ListenPort = {listen_port}")
    if mtu is not None:
        lines.append(f"MTU = {mtu}")
    for peer in peers:
        lines += ["", "[Peer]", f"PublicKey = {peer.public_key}"]
        if peer.preshared_key:
            lines.append(f"PresharedKey = {peer.preshared_key}")
        if peer.endpoint:
            lines.append(f"Endpoint = {peer.endpoint}")
        lines.append(f"AllowedIPs = {', '.join(peer.allowed_ips)}")
        if peer.persistent_keepalive:
            lines.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
    return "\n".join(lines) + "\n"


def start_twistvpn_node(
    network: Network,
    namespace: str,
    ifname: str,
    config_text: str,
    *,
    timeout: float = 15.0,
) -> Process:
    """
    Run C{twistd -n twistvpn-node} in C{namespace}, wait until its TUN
    device is up, and return the process.
    """
    config = network.write_private(f"{ifname}.conf", config_text)
    # Its control socket (for `wg show`), should the node be killed.
    network.track_socket(WIREGUARD_SOCKET_DIR / f"{ifname}.sock")
    process = network.spawn(
        namespace,
        [
            *TWISTD,
            *NODE_REACTOR,
            "-n",
            "--pidfile=",
            "twistvpn-node",
            "--config",
            str(config),
            "--interface",
            ifname,
        ],
        log_name=f"twistvpn-{ifname}",
    )

    def up() -> bool:
        if not process.running():
            raise HarnessError(f"twistvpn node {ifname} exited:\n{process.log()}")
        return "twistvpn node up" in process.log()

    wait_for(up, timeout, f"twistvpn node {ifname} to come up")
    return process


def start_wireguard_go(
    network: Network,
    namespace: str,
    ifname: str,
    config_text: str,
    addresses: Sequence[str],
    *,
    mtu: int = 1420,
    timeout: float = 10.0,
) -> Process:
    """
    Run wireguard-go in the foreground in C{namespace}, configure it with
    C{wg setconf}, address and raise its interface, and return the process.
    """
    socket_path = WIREGUARD_SOCKET_DIR / f"{ifname}.sock"
    if socket_path.exists():
        raise HarnessError(f"{socket_path} exists: another wireguard-go uses {ifname}")
    network.track_socket(socket_path)
    process = network.spawn(
        namespace, ["wireguard-go", "-f", ifname], log_name=f"wireguard-go-{ifname}"
    )

    def ready() -> bool:
        if not process.running():
            raise HarnessError(f"wireguard-go {ifname} exited:\n{process.log()}")
        return socket_path.exists()

    wait_for(ready, timeout, f"wireguard-go {ifname}'s control socket")
    config = network.write_private(f"{ifname}.wg", config_text)
    network.run(namespace, ["wg", "setconf", ifname, str(config)])
    network.configure_interface(namespace, ifname, addresses, mtu=mtu)
    return process


def ping(
    network: Network,
    namespace: str,
    destination: str,
    *,
    count: int = 5,
    interval: float = 0.2,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[bytes]:
    """C{ping} from a namespace (check_address keeps it inside the test network)."""
    check_address(destination)
    return network.run(
        namespace,
        ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "2", destination],
        check=False,
        timeout=timeout,
    )


def ping_stats(output: str) -> tuple[float, float | None]:
    """(loss percentage, average RTT in ms or None) from ping's summary."""
    loss = 100.0
    rtt = None
    for line in output.splitlines():
        if "packet loss" in line:
            for part in line.split(","):
                if "packet loss" in part:
                    loss = float(part.strip().split("%")[0])
        if line.startswith(("rtt ", "round-trip")):
            rtt = float(line.split("=")[1].split("/")[1])
    return loss, rtt


def wait_for_ping(
    network: Network, namespace: str, destination: str, timeout: float = 20.0
) -> None:
    """Wait until one ping gets through (the first handshake), bounded."""
    wait_for(
        lambda: ping(network, namespace, destination, count=1, timeout=5).returncode == 0,
        timeout,
        f"{destination} to answer from {namespace}",
        interval=0.2,
    )


# -- meshes of VPN nodes -------------------------------------------------------------

TWISTVPN = "twistvpn"
WIREGUARD_GO = "wireguard-go"
WG_PORT = 51820
OVERLAY_PREFIX = "100.64.0"


@dataclass
class VpnNode:
    """One host of a mesh: its namespace, keys, addresses and VPN process."""

    label: str
    kind: str  # TWISTVPN or WIREGUARD_GO
    namespace: str
    ifname: str
    private_key: str
    public_key: str
    underlay_ip: str
    overlay_ip: str
    mtu: int
    peers: list[PeerSpec] = field(default_factory=list)
    process: Process | None = None


def generate_keypair() -> tuple[str, str]:
    """A (private, public) key pair in WireGuard's text form."""
    from twistvpn.wireguard.keys import encode_key, generate_private_key, public_key

    private = generate_private_key()
    return encode_key(private), encode_key(public_key(private))


def generate_preshared_key() -> str:
    from twistvpn.wireguard.keys import encode_key
    from twistvpn.wireguard.keys import generate_preshared_key as generate

    return encode_key(generate())


def build_mesh(
    network: Network,
    kinds: Sequence[str],
    *,
    mtu: int = 1420,
    link_mtu: int = 1500,
    keepalive: int = 0,
    preshared_keys: bool = False,
    start: bool = True,
) -> list[VpnNode]:
    """
    One namespace per entry of C{kinds} on a simulated internet
    (203.0.113.0/24: a veth pair for two hosts, a bridge for more), each
    running that kind of VPN configured with every other as a peer (with a
    preshared key per pair if asked), the overlay in 100.64.0.0/24.
    """
    labels = [chr(ord("a") + i) for i in range(len(kinds))]
    namespaces = [network.add_namespace(label) for label in labels]
    underlay = [f"203.0.113.{i + 1}" for i in range(len(kinds))]
    if len(kinds) == 2:
        network.veth(
            namespaces[0], namespaces[1], f"{underlay[0]}/24", f"{underlay[1]}/24", mtu=link_mtu
        )
    else:
        switch = network.add_switch("net")
        for ns, ip in zip(namespaces, underlay, strict=True):
            switch.attach(ns, f"{ip}/24", mtu=link_mtu)
    nodes = []
    for i, (label, kind, ns) in enumerate(zip(labels, kinds, namespaces, strict=True)):
        private, public = generate_keypair()
        nodes.append(
            VpnNode(
                label,
                kind,
                ns,
                network.interface_name(f"w{label}"),
                private,
                public,
                underlay[i],
                f"{OVERLAY_PREFIX}.{i + 1}",
                mtu,
            )
        )
    psks = {
        frozenset((a.label, b.label)): generate_preshared_key() if preshared_keys else None
        for a in nodes
        for b in nodes
    }
    for node in nodes:
        node.peers = [
            PeerSpec(
                other.public_key,
                [f"{other.overlay_ip}/32"],
                f"{other.underlay_ip}:{WG_PORT}",
                preshared_key=psks[frozenset((node.label, other.label))],
                persistent_keepalive=keepalive,
            )
            for other in nodes
            if other is not node
        ]
    if start:
        for node in nodes:
            start_vpn(network, node)
    return nodes


def start_vpn(network: Network, node: VpnNode) -> Process:
    """Start (or start again) the node's VPN process."""
    address = f"{node.overlay_ip}/24"
    if node.kind == TWISTVPN:
        text = wg_config(
            node.private_key, node.peers, listen_port=WG_PORT, addresses=[address], mtu=node.mtu
        )
        node.process = start_twistvpn_node(network, node.namespace, node.ifname, text)
    elif node.kind == WIREGUARD_GO:
        text = wg_config(node.private_key, node.peers, listen_port=WG_PORT)
        node.process = start_wireguard_go(
            network, node.namespace, node.ifname, text, [address], mtu=node.mtu
        )
    else:
        raise ValueError(f"unknown VPN kind {node.kind!r}")
    return node.process


def stop_vpn(network: Network, node: VpnNode) -> None:
    """Stop the node's VPN process (its device goes with it)."""
    if node.process is not None:
        network.stop(node.process)
        node.process = None


# -- traffic -----------------------------------------------------------------------


def iperf3(
    network: Network,
    server: VpnNode | str,
    client_ns: str,
    address: str,
    *,
    seconds: float = 3,
    udp: bool = False,
    bitrate: str | None = None,
    port: int = 5201,
) -> dict[str, Any]:
    """
    One iperf3 run from C{client_ns} to a server started for it in
    C{server}'s namespace; return iperf3's JSON report.
    """
    import json

    check_address(address)
    server_ns = server.namespace if isinstance(server, VpnNode) else server
    srv = network.spawn(
        server_ns,
        ["iperf3", "-s", "-1", "--forceflush", "-B", address, "-p", str(port)],
        log_name="iperf3-server",
    )
    try:
        wait_for(lambda: "Server listening" in srv.log() or not srv.running(), 10, "iperf3 server")
        argv = [
            "iperf3",
            "-c",
            address,
            "-p",
            str(port),
            "-t",
            str(seconds),
            "-J",
            "--connect-timeout",
            "5000",
        ]
        if udp:
            argv += ["-u", "-b", bitrate or "1G", "-l", "1300"]
        elif bitrate:
            argv += ["-b", bitrate]
        result = network.run(client_ns, argv, check=False, timeout=seconds + 30)
        report: dict[str, Any] = json.loads(result.stdout or b"{}")
        if result.returncode != 0 or "error" in report:
            raise HarnessError(f"iperf3 to {address} failed: {report.get('error', result)}")
        return report
    finally:
        network.stop(srv)


def tcp_throughput_bps(report: dict[str, Any]) -> float:
    """Receiver-side bits per second of an iperf3 TCP report."""
    return float(report["end"]["sum_received"]["bits_per_second"])


def udp_result(report: dict[str, Any]) -> tuple[float, float]:
    """(receiver bits per second, loss percentage) of an iperf3 UDP report."""
    end = report["end"]
    total = end.get("sum_received") or end["sum"]
    return float(total["bits_per_second"]), float(end["sum"].get("lost_percent", 0.0))


# -- a byte-exact transfer tool (python -m twistvpn.testing.netns ...) -----------------

CHUNK = 64 * 1024


def _serve(host: str, port: int) -> int:
    """Accept one connection, hash everything it sends, report progress."""
    import hashlib
    import socket

    with socket.create_server((host, port)) as listener:
        print("listening", flush=True)
        listener.settimeout(60)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(60)
            digest = hashlib.sha256()
            total = 0
            reported = 0
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    break
                digest.update(data)
                total += len(data)
                if total - reported >= 256 * 1024:
                    reported = total
                    print(f"received {total}", flush=True)
            print(f"done {total} {digest.hexdigest()}", flush=True)
    return 0


def _send(host: str, port: int, size: int, rate: float) -> int:
    """Send C{size} random bytes at about C{rate} bytes/s (0: flat out)."""
    import hashlib
    import socket

    digest = hashlib.sha256()
    sent = 0
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=60) as conn:
        while sent < size:
            chunk = os.urandom(min(CHUNK, size - sent))
            conn.sendall(chunk)
            digest.update(chunk)
            sent += len(chunk)
            if rate:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(60)
        while conn.recv(CHUNK):  # until the server has read everything
            pass
    print(f"sent {sent} {digest.hexdigest()}", flush=True)
    return 0


def _main(argv: Sequence[str]) -> int:
    if len(argv) == 3 and argv[0] == "serve":
        return _serve(argv[1], int(argv[2]))
    if len(argv) == 5 and argv[0] == "send":
        return _send(argv[1], int(argv[2]), int(argv[3]), float(argv[4]))
    sys.stderr.write("usage: netns serve HOST PORT | send HOST PORT BYTES RATE\n")
    return 2


@dataclass
class Transfer:
    """A running byte-exact transfer between two namespaces."""

    server: Process
    client: Process

    def received(self) -> int:
        """Bytes the server has reported so far."""
        lines = [ln for ln in self.server.log().splitlines() if ln.startswith(("received", "done"))]
        return int(lines[-1].split()[1]) if lines else 0

    def wait(self, timeout: float) -> tuple[str, str]:
        """Wait for both ends; return (sent line, done line)."""
        for process in (self.client, self.server):
            try:
                process.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                raise HarnessError(
                    f"transfer did not finish in {timeout}s: {self.server.log()[-500:]}"
                ) from None
        sent = [ln for ln in self.client.log().splitlines() if ln.startswith("sent ")]
        done = [ln for ln in self.server.log().splitlines() if ln.startswith("done ")]
        if not sent or not done:
            raise HarnessError(
                f"transfer failed:\nclient: {self.client.log()[-800:]}\n"
                f"server: {self.server.log()[-800:]}"
            )
        return sent[-1], done[-1]


def start_transfer(
    network: Network,
    server_ns: str,
    client_ns: str,
    address: str,
    size: int,
    *,
    rate: float = 0,
    port: int = 7001,
) -> Transfer:
    """Send C{size} random bytes from C{client_ns} to C{address} in C{server_ns}."""
    check_address(address)
    tool = [sys.executable, "-m", "twistvpn.testing.netns"]
    server = network.spawn(
        server_ns, [*tool, "serve", address, str(port)], log_name="transfer-server"
    )
    wait_for(lambda: "listening" in server.log() or not server.running(), 10, "transfer server")
    client = network.spawn(
        client_ns,
        [*tool, "send", address, str(port), str(size), str(rate)],
        log_name="transfer-client",
    )
    return Transfer(server, client)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
