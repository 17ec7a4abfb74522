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
import os
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
    for n in ("203.0.113.0/24", "198.51.100.0/24", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8",
              "fd00::/8", "2001:db8::/32")
)


WIREGUARD_SOCKET_DIR = Path("/var/run/wireguard")

# The internet core router's own address (L{Network.add_core}).
CORE_ADDRESS = "198.51.100.254/32"


# The NAT routers L{Network.masquerade} builds (twistvpn.testing.netns.sites).
NAT_MODES = ("easy", "easyaf", "hard", "udpblock", "easynf", "hardnf")
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
def signals_safe_for_children() -> Iterator[None]:
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


@dataclass
class Core:
    """
    The simulated internet as a router rather than a bridge: each member
    namespace has a link of its own to the core, keeps its address in the
    shared subnet (203.0.113.0/24, 2001:db8::/64), and reaches every other
    member through the core, which answers ARP and NDP for them (proxy ARP,
    proxy NDP) and routes by host routes.  So a datagram between two of the
    lab's routers crosses one router more, as on the internet, and one sent
    with a short time to live (an opener) dies on the way.
    """

    network: Network
    namespace: str
    links: dict[str, str] = field(default_factory=dict)  # member's interface -> ours
    proxied: list[tuple[str, str]] = field(default_factory=list)  # (IPv6, our interface)

    def attach(self, namespace: str, address: str | None = None, mtu: int = 1500) -> str:
        """Connect C{namespace} to the core; return its interface's name."""
        inside, outside = self.network.veth(namespace, self.namespace, address, None, mtu=mtu)
        self.links[inside] = outside
        # Linux holds each proxied ARP answer up to 0.8 s (a random
        # proxy_delay), which stalled the first packets between two members.
        # (Proxied NDP answers still take 1-2 s for a pair's first IPv6
        # packets here, proxy_delay or not: not understood yet.)
        self.network.run(self.namespace, [
            "sysctl", "-q", "-w", f"net.ipv4.neigh.{outside}.proxy_delay=0",
            f"net.ipv6.neigh.{outside}.proxy_delay=0"])
        for ip, _owner in self.proxied:
            self.network.ip("-6", "neigh", "add", "proxy", ip, "dev", outside,
                            namespace=self.namespace)
        if address is not None:
            self._route(outside, address)
        return inside

    def reach(self, ifname: str, address: str) -> None:
        """Route C{address}, which a member gave its link C{ifname} itself."""
        self._route(self.links[ifname], address)

    def add_address(self, namespace: str, ifname: str, address: str) -> None:
        """Give a member's link another address (IPv6 without DAD); the core routes it."""
        iface = check_address(address)
        extra = ["nodad"] if iface.version == 6 else []
        self.network.ip("addr", "add", address, "dev", ifname, *extra, namespace=namespace)
        self.reach(ifname, address)

    def route(self, prefix: str, via: str) -> None:
        """Route C{prefix} (a site's LAN) through the member at C{via}."""
        check_address(prefix)
        check_address(via)
        self.network.ip("route", "replace", prefix, "via", via, namespace=self.namespace)

    def _route(self, outside: str, address: str) -> None:
        iface = check_address(address)
        ip = str(iface.ip)
        self.network.ip("route", "replace", f"{ip}/{iface.max_prefixlen}", "dev", outside,
                        namespace=self.namespace)
        if iface.version == 6:
            for other in self.links.values():
                if other != outside:
                    self.network.ip("-6", "neigh", "add", "proxy", ip, "dev", other,
                                    namespace=self.namespace)
            self.proxied.append((ip, outside))


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
        with signals_safe_for_children(), NetNS(namespace) as ns:
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

    def add_core(self, role: str) -> Core:
        """A router namespace joining members of one subnet: see L{Core}."""
        namespace = self.add_namespace(role)
        for sysctl in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.proxy_arp=1",
                       "net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.all.proxy_ndp=1"):
            self.run(namespace, ["sysctl", "-q", "-w", sysctl])
        # Its own address, the source of its ICMP errors (time exceeded).
        self.ip("addr", "add", CORE_ADDRESS, "dev", "lo", namespace=namespace)
        return Core(self, namespace)

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
        "udpblock" (MASQUERADE, UDP not forwarded at all); "easynf" and
        "hardnf" are "easy" and "hard" without the firewall on the router
        itself, as a bare Linux router is (docs/lab.md: the conntrack clash).
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
        firewalled = not mode.endswith("nf")
        mode = mode.removesuffix("nf")
        if mode == "hard":
            rule.append("--random-fully")
        self.run(namespace, rule)
        # As every home router: unsolicited UDP to the router itself is
        # dropped.  Without it a peer's early probe is delivered to the
        # router, its conntrack entry confirmed, and the router then maps
        # its own host's packets to that peer to another port.
        if firewalled:
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
        An empty C{namespace} is the root one (a bridge's loopback end).
        """
        self._check_open()
        log_path = self.tmpdir / f"{log_name or Path(argv[0]).name}-{len(self.processes)}.log"
        command = ["ip", "netns", "exec", namespace, *argv] if namespace else list(argv)
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                command,
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
