"""
The control channel's transport: a TLS 1.3 handshake, then records of our
own.

A rendezvous keeps one connection open to every node for as long as the
node runs.  Kept as a TLS connection, each costs about 33 KiB of OpenSSL
state (C{SSL_new} alone is 16 KiB): 330 MB for 10,000 nodes, before any of
our own.  So, as QUIC does with TLS and DTLS-SRTP with DTLS, TLS is used for
what needs it, authenticating the rendezvous (a pinned fingerprint, or a CA
and the hostname) and agreeing keys, and its C{SSL} object is freed as soon
as the handshake is done.  The stream then carries ChaCha20-Poly1305
records keyed from the TLS exporter (RFC 8446, section 7.5): one key per
direction, a counter as the nonce, the frame header as associated data.
TCP delivers in order, so a record that does not decrypt under the next
counter is an attack or a bug, and closes the connection.

Frames (both directions)::

    type (1 byte) | length (2 bytes, big-endian) | body
    HANDSHAKE (0x16): TLS bytes, until the sender's handshake is done
    RECORD    (0x17): a record, after it

The server's TLS may still emit bytes once its handshake is done (TLS 1.3
session tickets); a client that has switched ignores those, up to
L{MAX_LATE_HANDSHAKE} bytes.
"""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from OpenSSL import SSL
from twisted.internet import defer, interfaces
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from twistvpn.interfaces import IChannelBinding

HANDSHAKE = 0x16
RECORD = 0x17
HEADER_SIZE = 3
MAX_BODY = 0xFFFF
TAG_SIZE = 16
MAX_PLAINTEXT = MAX_BODY - TAG_SIZE
# Handshake bytes a side accepts in all: a certificate chain and its
# messages, with room to spare; beyond that is abuse.
MAX_HANDSHAKE = 64 * 1024
# What a server takes from a client before it is keyed: a ClientHello and a
# Finished are a few hundred bytes; an unauthenticated peer gets no more.
MAX_CLIENT_HANDSHAKE = 8 * 1024
# A server's bounds on unauthenticated peers: connections open at once from
# one address (an office behind one NAT is well within it), and seconds to
# finish the handshake.
MAX_PER_SOURCE = 64
HANDSHAKE_TIMEOUT = 10.0
# TLS 1.3 session tickets a server sends after its handshake (a client
# ignores them); a few hundred bytes each, two of them.
MAX_LATE_HANDSHAKE = 4 * 1024
EXPORTER_LABEL = b"EXPORTER-twistvpn-control-channel-v1"
BINDING_LABEL = b"EXPORTER-twistvpn-channel-binding-v1"
_MAX_COUNTER = 2**64 - 1


class ChannelError(Exception):
    """The peer broke the channel's protocol, or the TLS handshake failed."""

    def __init__(self, message: str, final: bytes = b"") -> None:
        super().__init__(message)
        self.final = final  # what to send before closing: a TLS alert


def _frame(kind: int, body: bytes) -> bytes:
    return bytes((kind,)) + len(body).to_bytes(2, "big") + body


class _Sealer:
    """One direction's key and counter."""

    __slots__ = ("_aead", "_counter")

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0

    def _nonce(self) -> bytes:
        if self._counter > _MAX_COUNTER:
            raise ChannelError("record counter exhausted")
        nonce = b"\x00\x00\x00\x00" + self._counter.to_bytes(8, "little")
        self._counter += 1
        return nonce

    def seal(self, plaintext: bytes) -> bytes:
        header = bytes((RECORD,)) + (len(plaintext) + TAG_SIZE).to_bytes(2, "big")
        return header + self._aead.encrypt(self._nonce(), plaintext, header)

    def open(self, header: bytes, body: bytes) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(), body, header)
        except InvalidTag:
            raise ChannelError("a record failed authentication") from None


class ChannelState:
    """
    One end of a channel, with no I/O: bytes from the peer go into
    L{received}, which returns what to send back and the application data
    they carried; application data to send goes through L{seal}.

    C{tls} is its C{SSL.Connection} on memory BIOs, fresh.
    """

    __slots__ = (
        "_tls", "is_client", "_buffer", "_handshake_in", "_late_handshake",
        "_verification_failure", "_send", "_receive", "binding",
    )

    def __init__(self, tls: SSL.Connection, is_client: bool) -> None:
        self.is_client = is_client
        self._buffer = b""
        self._handshake_in = 0
        self._late_handshake = 0
        self._verification_failure: Failure | None = None
        self._send: _Sealer | None = None
        self._receive: _Sealer | None = None
        self.binding = b""  # IChannelBinding's value, once keyed
        if is_client:
            tls.set_connect_state()
        else:
            tls.set_accept_state()
        self._tls: SSL.Connection | None = tls

    @property
    def keyed(self) -> bool:
        """Whether the handshake is done and records flow."""
        return self._send is not None

    def failVerification(self, reason: Failure) -> None:  # noqa: N802 (Twisted's name)
        """A certificate check refused the peer's certificate."""
        self._verification_failure = reason

    def start(self) -> bytes:
        """What to send first (the client's hello; nothing for a server)."""
        return self._advance()

    def seal(self, data: bytes) -> bytes:
        """Frames carrying C{data}; only once L{keyed}."""
        assert self._send is not None, "sealing before the handshake is done"
        if len(data) <= MAX_PLAINTEXT:
            return self._send.seal(data)
        return b"".join(
            self._send.seal(data[i : i + MAX_PLAINTEXT])
            for i in range(0, len(data), MAX_PLAINTEXT)
        )

    def received(self, data: bytes) -> tuple[bytes, list[bytes]]:
        """
        Take bytes from the peer: (frames to send, application data).
        Raises L{ChannelError} when the channel must close.
        """
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        delivered: list[bytes] = []
        offset = 0
        end = len(buffer)
        while end - offset >= 1:
            # Judge a frame by its first bytes, before buffering its body:
            # what may not come is refused before it costs memory.
            kind = buffer[offset]
            self._check_kind(kind)
            if end - offset < HEADER_SIZE:
                break
            length = int.from_bytes(buffer[offset + 1 : offset + 3], "big")
            if kind == HANDSHAKE:
                self._check_handshake_length(length)
            stop = offset + HEADER_SIZE + length
            if stop > end:
                break
            header = buffer[offset : offset + HEADER_SIZE]
            body = buffer[offset + HEADER_SIZE : stop]
            offset = stop
            if kind == RECORD:
                if self._receive is None:
                    raise ChannelError("a record before the handshake was done")
                delivered.append(self._receive.open(header, body))
            else:
                out.append(self._handshake(body))
        self._buffer = buffer[offset:]
        return b"".join(out), delivered

    def _check_kind(self, kind: int) -> None:
        if kind == RECORD:
            if self._receive is None:
                raise ChannelError("a record before the handshake was done")
        elif kind == HANDSHAKE:
            if self._tls is None and not self.is_client:
                # A TLS 1.3 client sends nothing after its Finished.
                raise ChannelError("handshake bytes after the handshake")
        else:
            raise ChannelError(f"unknown frame type {kind:#x}")

    def _check_handshake_length(self, length: int) -> None:
        if length == 0:
            raise ChannelError("an empty handshake frame")
        if self._tls is None:
            if self._late_handshake + length > MAX_LATE_HANDSHAKE:
                raise ChannelError("too many handshake bytes after the handshake")
        elif self._handshake_in + length > (MAX_HANDSHAKE if self.is_client
                                            else MAX_CLIENT_HANDSHAKE):
            raise ChannelError("the TLS handshake is too long")

    def _handshake(self, body: bytes) -> bytes:
        if self._tls is None:
            # Our side is done: TLS 1.3 session tickets from a server, which
            # we have no use for.
            self._late_handshake += len(body)
            return b""
        self._handshake_in += len(body)
        try:
            self._tls.bio_write(body)
        except SSL.Error as e:
            raise ChannelError(f"TLS handshake failed: {e}") from e
        return self._advance()

    def _advance(self) -> bytes:
        """Drive the handshake; switch to records once it is done."""
        tls = self._tls
        assert tls is not None
        done = False
        failure: Exception | None = None
        try:
            tls.do_handshake()
            done = True
        except SSL.WantReadError:
            pass
        except SSL.Error as e:
            failure = e
        out = self._drain(tls)
        if self._verification_failure is not None:
            raise ChannelError(
                f"certificate refused: {self._verification_failure.getErrorMessage()}", out
            )
        if failure is not None:
            raise ChannelError(f"TLS handshake failed: {failure}", out) from failure
        if done:
            self._switch(tls)
        return out

    @staticmethod
    def _drain(tls: SSL.Connection) -> bytes:
        frames = []
        while True:
            try:
                chunk = tls.bio_read(MAX_BODY)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            frames.append(_frame(HANDSHAKE, chunk))
        return b"".join(frames)

    def _switch(self, tls: SSL.Connection) -> None:
        version = tls.get_protocol_version_name()
        if version != "TLSv1.3":
            raise ChannelError(f"the control channel needs TLS 1.3; the peer spoke {version}")
        material = tls.export_keying_material(EXPORTER_LABEL, 64)
        certificate = tls.get_peer_certificate() if self.is_client else tls.get_certificate()
        identity = b"" if certificate is None else certificate.digest("sha256")
        self.binding = tls.export_keying_material(BINDING_LABEL, 32) + identity
        to_server, to_client = material[:32], material[32:]
        self._send = _Sealer(to_server if self.is_client else to_client)
        self._receive = _Sealer(to_client if self.is_client else to_server)
        # Everything TLS was needed for is done: free OpenSSL's state.
        tls.set_app_data(None)
        self._tls = None


@implementer(IChannelBinding)
class ChannelProtocol(ProtocolWrapper):
    """
    The channel on a TCP connection, for the wrapped protocol (AMP).  As
    with Twisted's TLS, the wrapped protocol is connected at once, and what
    it writes before the handshake is done is sent when it is.  The wrapped
    protocol's transport is this wrapper: L{channel_binding} names the
    connection for proofs of possession.
    """

    @property
    def channel_binding(self) -> bytes:
        return b"" if self.state is None else self.state.binding

    factory: ChannelFactory
    transport: Any  # the TCP transport

    def __init__(self, factory: ChannelFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self.state: ChannelState | None = None
        self._pending: list[bytes] = []
        self._reason: Failure | None = None
        self.source: str | None = None  # counted against the factory's per-source bound
        self._handshake_timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        if not self.factory.admit(self):
            # Refused before any TLS state exists: it costs nothing to hold.
            self._reason = Failure(ChannelError("too many connections from this address"))
            transport.loseConnection()
            return
        self.state = self.factory.new_state(self)
        super().makeConnection(transport)
        clock = self.factory.clock
        if clock is not None and not self.factory.is_client:
            self._handshake_timer = clock.callLater(self.factory.handshake_timeout,
                                                    self._handshake_timed_out)
        first = self.state.start()
        if first:
            self.transport.write(first)

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if self.state is not None and not self.state.keyed:
            self.factory.counters["handshake_timeout"] += 1
            self._reason = Failure(ChannelError("no TLS handshake in time"))
            self.transport.abortConnection()

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state is None or self._reason is not None:
            return
        was_keyed = state.keyed
        try:
            out, delivered = state.received(data)
        except SSL.Error as e:  # never expected: ChannelState wraps what it knows
            self._fail(ChannelError(f"TLS failed: {e}"))
            return
        except ChannelError as e:
            self._fail(e)
            return
        if out:
            self.transport.write(out)
        if state.keyed and not was_keyed:
            self.factory.counters["keyed"] += 1
            self._cancel_handshake_timer()
            pending, self._pending = self._pending, []
            for chunk in pending:
                self.transport.write(state.seal(chunk))
        for chunk in delivered:
            self.wrappedProtocol.dataReceived(chunk)
            if self._reason is not None or self.disconnecting:
                return

    def _fail(self, error: ChannelError) -> None:
        self.factory.counters["failed"] += 1
        self._reason = Failure(error)
        if error.final:
            self.transport.write(error.final)  # the TLS alert, for the peer's log
        self.transport.loseConnection()

    def write(self, data: bytes) -> None:
        if self.disconnecting or self._reason is not None:
            return
        state = self.state
        if state is None or not state.keyed:
            self._pending.append(data)
            return
        self.transport.write(state.seal(data))

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def failVerification(self, reason: Failure) -> None:  # noqa: N802 (Twisted's name)
        """Twisted's hostname check, during the handshake, refused the certificate."""
        if self.state is not None:
            self.state.failVerification(reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_handshake_timer()
        self.factory.release(self)
        admitted = self.state is not None
        self.state = None  # the OpenSSL object of an unkeyed channel goes now
        self._pending = []
        if admitted:
            super().connectionLost(self._reason or reason)


class ChannelFactory(WrappingFactory[ChannelProtocol]):
    """
    Wraps C{wrapped} in the channel: on the client side C{tls} is an
    C{IOpenSSLClientConnectionCreator} (the pinning or CA check of
    L{twistvpn.common.tls.client_creator}), on the server side the
    server's C{CertificateOptions}.
    """

    noisy = False  # no "Starting protocol/factory" line per connection or port

    protocol = ChannelProtocol

    def __init__(self, tls: Any, is_client: bool, wrapped: IProtocolFactory, *,
                 clock: interfaces.IReactorTime | None = None,
                 max_per_source: int = MAX_PER_SOURCE,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        super().__init__(wrapped)
        self._tls = tls
        self.is_client = is_client
        # A server's bounds on what unauthenticated peers cost it: open
        # connections per source address, and the time to key the channel
        # (with a clock; without one, the wrapped protocol's timeouts only).
        self.clock = clock
        self.max_per_source = max_per_source
        self.handshake_timeout = handshake_timeout
        self.per_source: dict[str, int] = {}
        self.counters: dict[str, int] = {"keyed": 0, "failed": 0, "refused_per_source": 0,
                                         "handshake_timeout": 0}

    def admit(self, protocol: ChannelProtocol) -> bool:
        """Whether a server takes one more connection from its source."""
        if self.is_client:
            return True
        host = getattr(protocol.transport.getPeer(), "host", None)
        if host is None:
            return True
        if self.per_source.get(host, 0) >= self.max_per_source:
            self.counters["refused_per_source"] += 1
            return False
        self.per_source[host] = self.per_source.get(host, 0) + 1
        protocol.source = host
        return True

    def release(self, protocol: ChannelProtocol) -> None:
        host = protocol.source
        if host is not None:
            left = self.per_source.get(host, 1) - 1
            if left > 0:
                self.per_source[host] = left
            else:
                self.per_source.pop(host, None)
            protocol.source = None

    def new_state(self, protocol: ChannelProtocol) -> ChannelState:
        if self.is_client:
            # The creator sets up the pinning, or the CA and hostname check;
            # Twisted's looks up ALPN on protocol.factory.wrappedFactory.
            return ChannelState(self._tls.clientConnectionForTLS(protocol), True)
        return ChannelState(SSL.Connection(self._tls.getContext(), None), False)


@implementer(interfaces.IStreamClientEndpoint)
class ChannelClientEndpoint:
    """
    Connects through C{endpoint} and runs the channel over it; fires with
    the wrapped protocol as soon as TCP is connected (as
    C{wrapClientTLS} does), so a refused certificate fails its first call.
    """

    def __init__(self, creator: Any, endpoint: interfaces.IStreamClientEndpoint) -> None:
        self._creator = creator
        self._endpoint = endpoint

    def connect(
        self, protocolFactory: IProtocolFactory  # noqa: N803 (the interface's name)
    ) -> defer.Deferred[Any]:
        wrapping = ChannelFactory(self._creator, True, protocolFactory)
        connected: defer.Deferred[Any] = self._endpoint.connect(wrapping)
        return connected.addCallback(_wrapped_protocol)


def _wrapped_protocol(wrapper: Any) -> Any:
    return wrapper.wrappedProtocol
