"""
Listening services that say where and when they listen, a service that
runs a plain object's start and stop, and UDP socket sizing: what the
rendezvous, the relay and the node hang on their C{MultiService}s.

Streams listen through Twisted's own L{StreamServerEndpointService}; the
endpoint is wrapped so that the service's owner learns the bound port
(C{port}, C{listening}).  Twisted has no UDP counterpart, so
L{DatagramListenService} is one.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

# Bursts from many peers overflow the default (about 200 kB) at a few Mbit/s.
SOCKET_BUFFER = 4 << 20


def enlarge_socket_buffers(sock: socket.socket, size: int = SOCKET_BUFFER) -> None:
    """
    Ask for C{size}-byte receive and send buffers: as root the system's
    limit does not apply (SO_RCVBUFFORCE); otherwise we get what
    net.core.rmem_max allows.
    """
    for forced, plain in ((getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
                          (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)):
        for option in (forced, plain):
            if option is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, size)
                break
            except OSError:
                continue


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up once (find_library runs ldconfig), or None."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """
    Hand the C heap's free pages back to the system (glibc's malloc_trim):
    after a flood of connections closes, CPython frees their memory but the
    allocator keeps it, so the process stays at its peak.  False where there
    is no glibc.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def quiet(factory: Any) -> Any:
    """C{factory} without Twisted's "Starting factory <... at 0x...>" log lines."""
    factory.noisy = False
    return factory


class StartStopService(service.Service):
    """Runs a plain object's C{start()} and C{stop()} with the service's life."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def startService(self) -> None:
        super().startService()
        self.target.start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        return self.target.stop()


@implementer(IStreamServerEndpoint)
class _ObservedEndpoint:
    """An endpoint that remembers the port it listened on, and says when."""

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self.endpoint = endpoint
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        def listened(port: IListeningPort) -> IListeningPort:
            self.port = port
            self.listening.callback(port)
            return port

        def failed(reason: Failure) -> None:
            # The owner reports it (one line, with the option); the
            # service's own handler would log a traceback besides.
            self.listening.errback(reason)

        return self.endpoint.listen(factory).addCallbacks(listened, failed)  # type: ignore[arg-type]


class StreamListener(StreamServerEndpointService):
    """
    L{StreamServerEndpointService} whose owner can read the bound port
    (C{port}, None until listening and after stopping) and wait for it
    (C{listening}, which fails when the endpoint cannot listen).
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self._observed = _ObservedEndpoint(endpoint)
        super().__init__(self._observed, factory)

    @property
    def port(self) -> IListeningPort | None:
        return self._observed.port

    @property
    def listening(self) -> Deferred[IListeningPort]:
        return self._observed.listening

    def stopService(self) -> Deferred[None]:
        d: Deferred[None] = super().stopService()

        def forget(result: object) -> object:
            self._observed.port = None
            return result

        return d.addBoth(forget)


class DatagramListenService(service.Service):
    """
    A UDP port as a service (Twisted has none), its buffers enlarged to
    C{buffer_size} (None leaves the system's); C{port} is the bound port
    (port 0 picks one) once started.
    """

    port: Any = None

    def __init__(self, reactor: Any, port: int, protocol: Any, interface: str = "",
                 buffer_size: int | None = SOCKET_BUFFER) -> None:
        self.reactor = reactor
        self.requested = port
        self.protocol = protocol
        self.interface = interface
        self.buffer_size = buffer_size
        self.listening: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        super().startService()
        try:
            port = self.reactor.listenUDP(self.requested, self.protocol,
                                          interface=self.interface, maxPacketSize=65535)
        except Exception:
            self.listening.errback(Failure())
            return
        sock = getattr(port, "socket", None)
        if sock is not None and self.buffer_size is not None:
            enlarge_socket_buffers(sock, self.buffer_size)
        self.port = port
        self.listening.callback(port)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return succeed(None)
