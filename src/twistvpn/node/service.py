"""
The static-mode node: a wg-quick configuration brought to life.

L{StaticNodeService} opens the TUN device and the UDP socket when it starts
and removes both when it stops.  Everything it builds comes from factories
it is given, so a test can hand it an in-memory TUN device, a fake
WireGuard device and a L{MemoryReactor}.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from twistvpn.common.services import enlarge_socket_buffers
from twistvpn.node.config import InterfaceConfig, PeerConfig
from twistvpn.node.fastpath import AnswerWait, DatagramBatcher, listen_udp
from twistvpn.node.forwarder import Forwarder
from twistvpn.node.tun import DEFAULT_MTU
from twistvpn.node.uapi import PeerStatus, UAPIFactory, claim_socket_path, format_get
from twistvpn.wireguard.keys import encode_key, public_key

# Interface-typed values are Any: mypy cannot check zope interfaces.
TunFactory = Callable[[str, int], Any]  # returns an ITunDevice
# (private_key, clock, send_datagram, deliver_packet) -> the WireGuard state
DeviceFactory = Callable[..., Any]  # returns an IWireGuardDevice
Resolver = Callable[[str, int], tuple[str, int]]

def resolve_endpoint(host: str, port: int) -> tuple[str, int]:
    """
    An endpoint's address, resolving a host name once at start-up as
    wg-quick does (IPv4 preferred, as wg does).
    """
    try:
        ipaddress.ip_address(host)
        return host, port
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0]), port


def routed_prefixes(peers: tuple[PeerConfig, ...]) -> tuple[list[str], list[str]]:
    """
    The prefixes to route through the device, and the default routes left
    out: routing 0.0.0.0/0 through the tunnel would also capture the
    tunnel's own UDP traffic, which wg-quick avoids with policy routing that
    twistvpn does not do.
    """
    routes: list[str] = []
    skipped: list[str] = []
    for peer in peers:
        for cidr in peer.allowed_ips:
            target = skipped if ipaddress.ip_network(cidr).prefixlen == 0 else routes
            if cidr not in target:
                target.append(cidr)
    return routes, skipped


class NodeStartError(RuntimeError):
    """The node could not set up its device or socket; the message is one line."""


def _one_line(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return " ".join(text.split())


class StaticNodeService(service.Service):
    """
    A node configured entirely by a wg-quick file: no rendezvous, fixed
    peers, fixed endpoints (which still roam as WireGuard's do).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: InterfaceConfig,
        *,
        interface_name: str,
        open_tun: TunFactory,
        make_device: DeviceFactory,
        resolve: Resolver = resolve_endpoint,
        listen_interface: str = "::",
        control_socket: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._interface_name = interface_name
        self._open_tun = open_tun
        self._make_device = make_device
        self._resolve = resolve
        self._listen_interface = listen_interface
        self._control_socket = control_socket
        self._wall_clock = wall_clock
        self.control_port: Any = None
        self.tun: Any = None  # ITunDevice
        self.device: Any = None  # IWireGuardDevice
        self.forwarder: Forwarder | None = None
        self.port: Any = None
        self._batcher: DatagramBatcher | None = None

    @property
    def listening_port(self) -> int | None:
        """The UDP port actually bound (ListenPort may be left to the kernel)."""
        return None if self.port is None else self.port.getHost().port

    def startService(self) -> None:
        super().startService()
        try:
            self._start()
        except Exception as e:
            self._teardown()
            raise NodeStartError(f"twistvpn node cannot start: {_one_line(e)}") from e
        except BaseException:
            self._teardown()
            raise

    def _start(self) -> None:
        config = self._config
        mtu = config.mtu or DEFAULT_MTU
        # Resolve first: a bad name should fail before anything is created.
        endpoints = [
            None if p.endpoint is None else self._resolve(*p.endpoint) for p in config.peers
        ]
        self.tun = tun = self._open_tun(self._interface_name, mtu)
        self.forwarder = forwarder = Forwarder()
        self.device = device = self._make_device(
            config.private_key, self._reactor, forwarder.send_datagram, tun.write
        )
        forwarder.set_wireguard(device)  # type: ignore[arg-type]
        for peer, endpoint in zip(config.peers, endpoints, strict=True):
            device.add_peer(
                peer.public_key,
                preshared_key=peer.preshared_key,
                endpoint=endpoint,
                allowed_ips=peer.allowed_ips,
                persistent_keepalive=peer.persistent_keepalive,
            )
        tun.set_addresses(config.addresses)
        routes, skipped = routed_prefixes(config.peers)
        for cidr in routes:
            tun.add_route(cidr)
        for cidr in skipped:
            self.log.warn(
                "not routing {cidr} through {name}: default routes need policy routing, "
                "which twistvpn does not set up; add narrower AllowedIPs",
                cidr=cidr,
                name=tun.name,
            )
        self.port = self._listen(config.listen_port or 0, forwarder)
        if self._control_socket:
            claim_socket_path(self._control_socket)
            self.control_port = self._reactor.listenUNIX(
                self._control_socket, UAPIFactory(self.describe), mode=0o600
            )
        tun.start_reading(device.send_packet)
        self.log.info(
            "twistvpn node up: interface {name} (mtu {mtu}) addresses {addresses}, "
            "UDP port {port}, public key {key}, {count} peer(s)",
            name=tun.name,
            mtu=mtu,
            addresses=", ".join(config.addresses) or "none",
            port=self.listening_port,
            key=encode_key(public_key(config.private_key)),
            count=len(config.peers),
        )
        for peer, endpoint in zip(config.peers, endpoints, strict=True):
            self.log.info(
                "peer {key}: endpoint {endpoint}, allowed IPs {allowed}{keepalive}",
                key=encode_key(peer.public_key),
                endpoint="(none yet)" if endpoint is None else f"{endpoint[0]}:{endpoint[1]}",
                allowed=", ".join(peer.allowed_ips) or "none",
                keepalive=(
                    f", keepalive every {peer.persistent_keepalive}s"
                    if peer.persistent_keepalive
                    else ""
                ),
            )

    def describe(self) -> str:
        """The node's state in the control socket's C{get=1} form (for C{wg show})."""
        if self.device is None:
            return f"errno=-{errno.ENODEV}\n\n"
        configured = {p.public_key: p for p in self._config.peers}
        elapsed = self._wall_clock() - self._reactor.seconds()
        statuses = []
        for peer in self.device.peers():
            config = configured.get(peer.public_key)
            statuses.append(
                PeerStatus(
                    public_key=peer.public_key,
                    preshared_key=None if config is None else config.preshared_key,
                    endpoint=peer.endpoint,
                    allowed_ips=tuple(peer.allowed_ips),
                    last_handshake_wall=(
                        None if peer.last_handshake is None else peer.last_handshake + elapsed
                    ),
                    rx_bytes=peer.rx_bytes,
                    tx_bytes=peer.tx_bytes,
                    persistent_keepalive=0 if config is None else config.persistent_keepalive,
                )
            )
        return format_get(self._config.private_key, self.listening_port, statuses)

    def _listen(self, port: int, forwarder: Forwarder) -> Any:
        try:
            listening = listen_udp(self._reactor, port, forwarder, self._listen_interface)
        except CannotListenError:
            if self._listen_interface != "::":
                raise
            # No IPv6 in this network namespace: IPv4 only.
            listening = listen_udp(self._reactor, port, forwarder, "")
        sock = getattr(listening, "socket", None)
        if isinstance(sock, socket.socket):
            enlarge_socket_buffers(sock)
            # The fast path: sends straight on the socket, in GSO batches.
            self._batcher = DatagramBatcher(sock, self._reactor, forwarder.counters)
            forwarder.use_batcher(self._batcher, sock.family == socket.AF_INET6)
        # Send and write what each batch of reads produced as soon as it ends.
        tun = self.tun
        if self._batcher is not None and hasattr(tun, "read_batch_window"):
            tun.read_batch_window = self._batcher.window
        if hasattr(listening, "read_batch_window") and hasattr(tun, "window"):
            listening.read_batch_window = tun.window
        readiness = getattr(listening, "readiness", None)
        if getattr(tun, "answer_wait", 0) and readiness is not None:
            # A lone packet sent: look for its answer before sleeping.
            tun.after_lone_read = AnswerWait(
                tun.answer_wait, readiness.poll, listening.doRead, tun.counters
            )
        return listening

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        stopped = self._teardown()
        self.log.info("twistvpn node down: {name} removed", name=self._interface_name)
        # twistd waits for the sockets to be closed (and the control socket
        # file unlinked) before the reactor stops.
        return gatherResults(stopped, consumeErrors=True)

    def _teardown(self) -> list[Deferred[Any]]:
        stopped: list[Deferred[Any]] = []
        if self.control_port is not None:
            stopped.append(maybeDeferred(self.control_port.stopListening))
            self.control_port = None
        if self.tun is not None:
            self.tun.stop_reading()
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None
        if self.port is not None:
            stopped.append(maybeDeferred(self.port.stopListening))
            self.port = None
        if self.device is not None:
            self.device.close()
            self.device = None
        if self.tun is not None:
            self.tun.close()
            self.tun = None
        return stopped
