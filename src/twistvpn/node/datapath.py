"""
The node's data plane as one object: the TUN device, the UDP port with the
forwarder on it, the WireGuard device between them, and the fast path's
parts (the GSO batcher, each reader's batch window, the answer wait).

Both node services (static and joined) own a L{DataPath}: they say what to
open, the data path opens it and wires the parts through their declared
interfaces (L{IWindowedTunDevice}, L{IReadinessPort}); what a part does not
provide (an in-memory TUN device, a reactor without real sockets) simply
stays unwired, and packets still flow, one at a time.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError

from twistvpn.common.services import enlarge_socket_buffers
from twistvpn.interfaces import IBatchReader, IReadinessPort, IWindowedTunDevice
from twistvpn.node.fastpath import AnswerWait, DatagramBatcher, listen_udp
from twistvpn.node.forwarder import Forwarder
from twistvpn.node.uapi import PeerStatus, format_get

# Interface-typed values are Any: mypy cannot check zope interfaces.
TunFactory = Callable[[str, int], Any]  # returns an ITunDevice
# (private_key, clock, send_datagram, deliver_packet) -> the WireGuard state
DeviceFactory = Callable[..., Any]  # returns an IWireGuardDevice


class DataPathOwner:
    """What a node service that owns a L{DataPath} shows of it."""

    datapath: DataPath

    @property
    def forwarder(self) -> Forwarder | None:
        return self.datapath.forwarder

    @property
    def listening_port(self) -> int | None:
        """The UDP port actually bound (port 0 leaves it to the kernel)."""
        return self.datapath.listening_port


class DataPath:
    """A node's TUN device, UDP port and WireGuard state, wired for speed."""

    def __init__(
        self,
        reactor: Any,
        private_key: bytes,
        *,
        interface_name: str,
        mtu: int,
        open_tun: TunFactory,
        make_device: DeviceFactory,
        listen_interface: str = "::",
    ) -> None:
        self.reactor = reactor
        self.private_key = private_key
        self.interface_name = interface_name
        self.mtu = mtu
        self._open_tun = open_tun
        self._make_device = make_device
        self.listen_interface = listen_interface
        self.tun: Any = None  # ITunDevice
        self.device: Any = None  # IWireGuardDevice
        self.forwarder: Forwarder | None = None
        self.port: Any = None
        self.batcher: DatagramBatcher | None = None

    @property
    def listening_port(self) -> int | None:
        """The UDP port actually bound (port 0 leaves it to the kernel)."""
        return None if self.port is None else self.port.getHost().port

    def open(self, listen_port: int) -> None:
        """
        Create the TUN device, the WireGuard state and the socket; on
        failure the caller calls L{close}, which removes what was made.
        """
        self.tun = tun = self._open_tun(self.interface_name, self.mtu)
        self.forwarder = forwarder = Forwarder()
        self.device = self._make_device(self.private_key, self.reactor,
                                        forwarder.send_datagram, tun.write)
        forwarder.set_wireguard(self.device)
        self.port = self._listen(listen_port, forwarder)

    def _listen(self, port: int, forwarder: Forwarder) -> Any:
        try:
            listening = listen_udp(self.reactor, port, forwarder, self.listen_interface)
        except CannotListenError:
            if self.listen_interface != "::":
                raise
            # No IPv6 in this network namespace: IPv4 only.
            listening = listen_udp(self.reactor, port, forwarder, "")
        sock = getattr(listening, "socket", None)
        if isinstance(sock, socket.socket):
            enlarge_socket_buffers(sock)
            # The fast path: sends straight on the socket, in GSO batches.
            self.batcher = DatagramBatcher(sock, self.reactor, forwarder.counters)
            forwarder.use_batcher(self.batcher, sock.family == socket.AF_INET6)
        self._wire(self.tun, listening)
        return listening

    def _wire(self, tun: Any, port: Any) -> None:
        """Send and write what each batch of reads produced as soon as it ends."""
        windowed = IWindowedTunDevice.providedBy(tun)
        if self.batcher is not None and IBatchReader.providedBy(tun):
            tun.read_batch_window = self.batcher.window
        if windowed and IBatchReader.providedBy(port):
            port.read_batch_window = tun.window
        if windowed and tun.answer_wait and IReadinessPort.providedBy(port):
            readiness = port.readiness
            if readiness is not None:
                # A lone packet sent: look for its answer before sleeping.
                tun.after_lone_read = AnswerWait(
                    tun.answer_wait, readiness.poll, port.doRead, tun.counters
                )

    def start_reading(self) -> None:
        """Packets from the kernel go to WireGuard from now on."""
        self.tun.start_reading(self.device.send_packet)

    def describe(self, configured: Iterable[Any] = (),
                 wall_clock: Callable[[], float] = time.time) -> str:
        """
        The state in the UAPI's C{get=1} form (for C{wg show}); C{configured}
        are the wg-quick peers (PeerConfig), whose preshared keys and
        keepalives are reported as configured.
        """
        if self.device is None:
            return f"errno=-{errno.ENODEV}\n\n"
        by_key = {p.public_key: p for p in configured}
        elapsed = wall_clock() - self.reactor.seconds()
        statuses = []
        for peer in self.device.peers():
            config = by_key.get(peer.public_key)
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
        return format_get(self.private_key, self.listening_port, statuses)

    def close(self) -> list[Deferred[Any]]:
        """Remove everything opened; the Deferreds fire once the socket is closed."""
        stopped: list[Deferred[Any]] = []
        if self.tun is not None:
            self.tun.stop_reading()
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None
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
