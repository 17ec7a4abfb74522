"""
The static-mode node: a wg-quick configuration brought to life.

L{StaticNodeService} opens its L{DataPath} (the TUN device, the UDP socket,
the WireGuard state) when it starts and closes it when it stops.  Everything
it builds comes from factories it is given, so a test can hand it an
in-memory TUN device, a fake WireGuard device and a L{MemoryReactor}.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger

from twistvpn import build
from twistvpn.node.config import InterfaceConfig, PeerConfig
from twistvpn.node.datapath import DataPath, DataPathOwner, DeviceFactory, TunFactory
from twistvpn.node.tun import DEFAULT_MTU
from twistvpn.node.uapi import UAPIFactory, claim_socket_path
from twistvpn.wireguard.keys import encode_key, public_key

__all__ = ["DeviceFactory", "NodeStartError", "StaticNodeService", "TunFactory"]

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


@contextlib.contextmanager
def starting(teardown: Callable[[], object]) -> Iterator[None]:
    """
    Start a node: on any failure remove what was made, and report an
    ordinary error as one line (L{NodeStartError}).
    """
    try:
        yield
    except Exception as e:
        teardown()
        raise NodeStartError(f"twistvpn node cannot start: {_one_line(e)}") from e
    except BaseException:
        teardown()
        raise


def listen_control_socket(reactor: Any, path: str | None,
                          describe: Callable[[], str]) -> Any:
    """The control socket C{wg show} reads (the UAPI), if a path is given."""
    if not path:
        return None
    claim_socket_path(path)
    return reactor.listenUNIX(path, UAPIFactory(describe), mode=0o600)


class StaticNodeService(DataPathOwner, service.Service):
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
        self._resolve = resolve
        self._control_socket = control_socket
        self._wall_clock = wall_clock
        self.datapath = DataPath(reactor, config.private_key, interface_name=interface_name,
                                 mtu=config.mtu or DEFAULT_MTU, open_tun=open_tun,
                                 make_device=make_device, listen_interface=listen_interface)
        self.control_port: Any = None

    def startService(self) -> None:
        super().startService()
        with starting(self._teardown):
            self._start()

    def _start(self) -> None:
        config = self._config
        # Resolve first: a bad name should fail before anything is created.
        endpoints = [
            None if p.endpoint is None else self._resolve_peer(p) for p in config.peers
        ]
        datapath = self.datapath
        datapath.open(config.listen_port or 0)
        tun, device = datapath.tun, datapath.device
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
        self.control_port = listen_control_socket(self._reactor, self._control_socket,
                                                  self.describe)
        datapath.start_reading()
        self.log.info(
            "twistvpn node up: interface {name} (mtu {mtu}) addresses {addresses}, "
            "UDP port {port}, public key {key}, {count} peer(s); {build}",
            build=build.describe(),
            name=tun.name,
            mtu=datapath.mtu,
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

    def _resolve_peer(self, peer: PeerConfig) -> tuple[str, int]:
        assert peer.endpoint is not None
        host, port = peer.endpoint
        try:
            return self._resolve(host, port)
        except OSError as e:  # socket.gaierror: an unknown name, no DNS
            where = f"{peer.endpoint_source}: Endpoint: " if peer.endpoint_source else ""
            raise NodeStartError(
                f"{where}cannot resolve {host!r}: {e.strerror or e}") from None

    def describe(self) -> str:
        """The node's state in the control socket's C{get=1} form (for C{wg show})."""
        return self.datapath.describe(self._config.peers, self._wall_clock)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        stopped = self._teardown()
        self.log.info("twistvpn node down: {name} removed", name=self.datapath.interface_name)
        # twistd waits for the sockets to be closed (and the control socket
        # file unlinked) before the reactor stops.
        return gatherResults(stopped, consumeErrors=True)

    def _teardown(self) -> list[Deferred[Any]]:
        stopped: list[Deferred[Any]] = []
        if self.control_port is not None:
            stopped.append(maybeDeferred(self.control_port.stopListening))
            self.control_port = None
        return stopped + self.datapath.close()
