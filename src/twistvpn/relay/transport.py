"""
Thin Twisted adapters between sockets and the relay's plain objects: the
relay's UDP socket, its TCP (TLS) connections, and a node's TCP connection
to a relay.  Streams carry length-prefixed frames (L{protocol.StreamDecoder}).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from OpenSSL.SSL import Connection
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
)
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.python.failure import Failure
from zope.interface import implementer

from twistvpn.common import tls
from twistvpn.common.services import quiet
from twistvpn.relay import protocol as p
from twistvpn.relay.server import RelayServer, StreamConnection


class RelayDatagramProtocol(DatagramProtocol):
    """The relay's UDP socket."""

    noisy = False  # no "Starting protocol/factory" line per connection or port

    def __init__(self, server: RelayServer) -> None:
        self.server = server

    def startProtocol(self) -> None:
        self.server.attach_udp(self._write)

    def _write(self, data: bytes, addr: Any) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(data, addr)
        except OSError:
            self.server.drop("send_error")

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.server.udp_received(data, addr)


class FramedProtocol(Protocol):
    """Splits the stream into frames for C{frame_received}; bad framing ends it."""

    decoder: p.StreamDecoder
    # A TLS or TCP transport once connected: it also produces and aborts.
    transport: Any

    def connectionMade(self) -> None:
        self.decoder = p.StreamDecoder()

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except p.MalformedFrameError:
            self.framing_error()
            return
        for frame in frames:
            if not self.connected:
                return
            self.frame_received(frame)

    def write_frame(self, frame: bytes) -> None:
        self.transport.write(p.frame_for_stream(frame))

    def frame_received(self, frame: bytes) -> None:
        raise NotImplementedError

    def framing_error(self) -> None:
        self.transport.loseConnection()


@implementer(IPushProducer)
class RelayStreamProtocol(FramedProtocol):
    """One node's TCP (TLS) connection to the relay."""

    connection: StreamConnection

    def __init__(self, server: RelayServer) -> None:
        self.server = server

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = getattr(self.transport.getPeer(), "host", None)
        self.connection = self.server.stream_opened(self.transport.write, self._lose, peer)
        self.transport.registerProducer(self, True)

    def _lose(self) -> None:
        self.transport.loseConnection()

    def frame_received(self, frame: bytes) -> None:
        self.connection.frame_received(frame)
        if self.connection.closed:
            self.connected = False

    def framing_error(self) -> None:
        self.connection.stream_malformed()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected = False
        self.connection.connection_lost()

    # IPushProducer: the transport's buffer is full (or drained).
    def pauseProducing(self) -> None:
        self.connection.pause()

    def resumeProducing(self) -> None:
        self.connection.resume()

    def stopProducing(self) -> None:
        self.connection.close()


def relay_stream_factory(server: RelayServer) -> Factory:
    """The relay's TCP (inside TLS) listening factory: one stream per node."""
    return quiet(Factory.forProtocol(functools.partial(RelayStreamProtocol, server)))


@implementer(IHandshakeListener)
class RelayClientStreamProtocol(FramedProtocol):
    """
    A node's TCP (TLS) connection to a relay: a L{client.StreamLink} for the
    relay client.  C{ready} fires with this protocol once the connection can
    be used (after the TLS handshake, and the certificate pin if one is set).
    """

    def __init__(self, receiver: Any, tls: bool = True) -> None:
        self.receiver = receiver
        self.tls = tls
        self.ready: Deferred[RelayClientStreamProtocol] = Deferred()
        self._usable = False

    def connectionMade(self) -> None:
        super().connectionMade()
        if not self.tls:
            self._became_usable()

    def handshakeCompleted(self) -> None:
        self._became_usable()

    def _became_usable(self) -> None:
        self._usable = True
        self.ready.callback(self)

    def frame_received(self, frame: bytes) -> None:
        self.receiver.frame_received(frame)

    def framing_error(self) -> None:
        self.transport.loseConnection()

    def close(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected = False
        if not self.ready.called:
            self.ready.errback(reason or Failure(ConnectionError("connection lost")))
        elif self._usable:
            self.receiver.link_lost()


def tls_stream_connector(reactor: Any) -> Callable[[Any, Any], Deferred[Any]]:
    """
    A C{connect_stream} for L{twistvpn.relay.client.RelayClient} that opens
    TLS over TCP to the relay.  The certificate is pinned by the
    fingerprint the network map gives; without one it is not checked at all
    (the relay never sees plaintext, and a node proves who it is inside the
    connection), so TLS then only hides the traffic from onlookers.
    """

    def connect(info: Any, receiver: Any) -> Deferred[Any]:
        proto = RelayClientStreamProtocol(receiver)
        creator: Any
        if info.tls_fingerprint:
            creator = tls.PinnedCertificateCreator(info.host, bytes.fromhex(info.tls_fingerprint))
        else:
            creator = _UnverifiedCreator()
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, info.host, info.tcp_port,
                                                             timeout=10))
        d = connectProtocol(endpoint, proto)
        d.addCallback(lambda _: proto.ready)
        return d

    return connect


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedCreator:
    """TLS that accepts any certificate (no pin known)."""

    def __init__(self) -> None:
        self._context = CertificateOptions(verify=False).getContext()

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        connection = Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        return connection
