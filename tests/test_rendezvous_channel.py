"""
The control channel's transport (L{twistvpn.rendezvous.channel}): a TLS 1.3
handshake between two L{ChannelState}s in memory, then records of our own;
and its Twisted adapter over in-memory connections (C{twisted.test.iosim}).
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twistvpn.common import tls
from twistvpn.rendezvous import channel
from twistvpn.rendezvous.channel import (
    HANDSHAKE,
    MAX_PLAINTEXT,
    RECORD,
    ChannelClientEndpoint,
    ChannelError,
    ChannelFactory,
    ChannelState,
)

CERT, KEY = tls.make_self_signed("127.0.0.1")
PIN = tls.fingerprint(CERT)


def server_state(maximum: int | None = None) -> ChannelState:
    options = tls.server_options(CERT, KEY, ssl.TLSVersion.TLSv1_2)
    context = options.getContext()
    if maximum is not None:
        context.set_max_proto_version(maximum)
    return ChannelState(SSL.Connection(context, None), is_client=False)


def client_state(pin: bytes = PIN) -> ChannelState:
    creator = tls.PinnedCertificateCreator("127.0.0.1", pin)
    return ChannelState(creator.clientConnectionForTLS(None), is_client=True)


def run_handshake(client: ChannelState, server: ChannelState) -> list[bytes]:
    """Exchange handshake frames until both sides are quiet; what the client got."""
    got: list[bytes] = []
    to_server = client.start()
    to_client = b""
    for _ in range(10):
        if not (to_server or to_client):
            break
        if to_server:
            to_client, delivered = server.received(to_server)
            to_server = b""
            assert not delivered
        if to_client:
            to_server, delivered = client.received(to_client)
            to_client = b""
            got.extend(delivered)
    return got


class Handshake(SynchronousTestCase):
    def test_keyed_and_records_flow(self) -> None:
        client, server = client_state(), server_state()
        run_handshake(client, server)
        self.assertTrue(client.keyed)
        self.assertTrue(server.keyed)
        out, delivered = server.received(client.seal(b"challenge please"))
        self.assertEqual((out, delivered), (b"", [b"challenge please"]))
        out, delivered = client.received(server.seal(b"here") + server.seal(b"and here"))
        self.assertEqual((out, delivered), (b"", [b"here", b"and here"]))

    def test_both_ends_name_the_channel_alike(self) -> None:
        """The binding a proof is made with: this connection's, and the pinned identity."""
        client, server = client_state(), server_state()
        self.assertEqual(client.binding, b"")
        run_handshake(client, server)
        self.assertEqual(client.binding, server.binding)
        self.assertEqual(len(client.binding), 32 + len(PIN.hex(":").upper()))
        self.assertTrue(client.binding.endswith(PIN.hex(":").upper().encode()))
        other_client, other_server = client_state(), server_state()
        run_handshake(other_client, other_server)
        self.assertNotEqual(other_client.binding, client.binding)

    def test_tls_freed_after_the_handshake(self) -> None:
        """The point of the channel: no OpenSSL state per idle connection."""
        context = tls.server_options(CERT, KEY).getContext()
        connection = SSL.Connection(context, None)
        alive = weakref.ref(connection)
        server = ChannelState(connection, is_client=False)
        del connection
        run_handshake(client_state(), server)
        gc.collect()
        self.assertTrue(server.keyed)
        self.assertIsNone(alive())

    def test_large_writes_split(self) -> None:
        client, server = client_state(), server_state()
        run_handshake(client, server)
        data = bytes(range(256)) * 1000  # 256,000 bytes: four records
        sealed = server.seal(data)
        self.assertEqual(sealed[0], RECORD)
        _, delivered = client.received(sealed)
        self.assertEqual(len(delivered), 4)
        self.assertTrue(all(len(chunk) <= MAX_PLAINTEXT for chunk in delivered))
        self.assertEqual(b"".join(delivered), data)

    def test_any_split_of_the_stream(self) -> None:
        """TCP may cut frames anywhere: byte by byte, the same data arrives."""
        client, server = client_state(), server_state()
        run_handshake(client, server)
        sealed = server.seal(b"one") + server.seal(b"two")
        delivered = []
        for i in range(len(sealed)):
            out, got = client.received(sealed[i : i + 1])
            self.assertEqual(out, b"")
            delivered.extend(got)
        self.assertEqual(delivered, [b"one", b"two"])

    def test_pin_mismatch(self) -> None:
        """The client refuses, and has a TLS alert to send; the server fails on it."""
        client = client_state(pin=tls.fingerprint(tls.make_self_signed("127.0.0.1")[0]))
        server = server_state()
        to_client, _ = server.received(client.start())
        with self.assertRaises(ChannelError) as caught:
            client.received(to_client)
        self.assertIn("TLS handshake failed", str(caught.exception))
        self.assertFalse(client.keyed)
        self.assertEqual(caught.exception.final[0], HANDSHAKE)
        self.assertRaises(ChannelError, server.received, caught.exception.final)

    def test_pin_mismatch_says_what_was_seen(self) -> None:
        """Not just "certificate verify failed": the fingerprint seen and the one pinned."""
        wrong_pin = tls.fingerprint(tls.make_self_signed("127.0.0.1")[0])
        client = client_state(pin=wrong_pin)
        client._tls.set_app_data(client)  # as the channel's protocol does: it is told
        to_client, _ = server_state().received(client.start())
        with self.assertRaises(ChannelError) as caught:
            client.received(to_client)
        message = str(caught.exception)
        self.assertIn(f"fingerprint sha256={PIN.hex()}", message)
        self.assertIn(f"not the pinned sha256={wrong_pin.hex()}", message)

    def test_needs_tls_13(self) -> None:
        client, server = client_state(), server_state(maximum=SSL.TLS1_2_VERSION)
        with self.assertRaises(ChannelError) as caught:
            run_handshake(client, server)
        self.assertIn("needs TLS 1.3", str(caught.exception))
        self.assertFalse(client.keyed)

    def test_verification_failure_reported_by_twisted(self) -> None:
        """
        Twisted's hostname check reports through failVerification during the
        handshake; the channel must not switch to records then.
        """
        client, server = client_state(), server_state()
        hello = client.start()
        client.failVerification(Failure(ValueError("wrong hostname")))
        to_client, _ = server.received(hello)
        with self.assertRaises(ChannelError) as caught:
            client.received(to_client)
        self.assertIn("wrong hostname", str(caught.exception))
        self.assertFalse(client.keyed)


class Malformed(SynchronousTestCase):
    def keyed_pair(self) -> tuple[ChannelState, ChannelState]:
        client, server = client_state(), server_state()
        run_handshake(client, server)
        return client, server

    def test_record_before_handshake(self) -> None:
        server = server_state()
        record = bytes((RECORD,)) + (20).to_bytes(2, "big") + b"x" * 20
        with self.assertRaises(ChannelError):
            server.received(record)

    def test_unknown_frame_type(self) -> None:
        _, server = self.keyed_pair()
        with self.assertRaises(ChannelError):
            server.received(b"\x42\x00\x01x")

    def test_tampered_record(self) -> None:
        client, server = self.keyed_pair()
        sealed = bytearray(client.seal(b"register me"))
        sealed[5] ^= 1
        with self.assertRaises(ChannelError):
            server.received(bytes(sealed))

    def test_replayed_record(self) -> None:
        """The nonce is a counter: the same record twice fails the second time."""
        client, server = self.keyed_pair()
        sealed = client.seal(b"join")
        self.assertEqual(server.received(sealed)[1], [b"join"])
        with self.assertRaises(ChannelError):
            server.received(sealed)

    def test_reflected_record(self) -> None:
        """A record sent back to its sender does not open: one key per direction."""
        client, _ = self.keyed_pair()
        with self.assertRaises(ChannelError):
            client.received(client.seal(b"ping"))

    def test_handshake_too_long(self) -> None:
        server = server_state()
        junk = bytes((HANDSHAKE,)) + (0xFFFF).to_bytes(2, "big") + b"\x16" * 0xFFFF
        with self.assertRaises(ChannelError):
            server.received(junk + junk[:10])

    def test_empty_handshake_frame(self) -> None:
        """Audit item 5: three bytes (16 00 00) made OpenSSL's error escape."""
        with self.assertRaises(ChannelError):
            server_state().received(b"\x16\x00\x00")

    def test_judged_by_the_first_bytes(self) -> None:
        """A frame that may not come is refused before its body is buffered."""
        with self.assertRaises(ChannelError):
            server_state().received(bytes((RECORD,)))
        with self.assertRaises(ChannelError):
            server_state().received(b"\x42")
        # A client's handshake frame larger than a client sends: at its header.
        header = bytes((HANDSHAKE,)) + (channel.MAX_CLIENT_HANDSHAKE + 1).to_bytes(2, "big")
        with self.assertRaises(ChannelError):
            server_state().received(header)

    def test_server_takes_no_handshake_after_keying(self) -> None:
        """Audit item 5: a keyed server took 16 KiB of unauthenticated handshake bytes."""
        _, server = self.keyed_pair()
        with self.assertRaises(ChannelError):
            server.received(bytes((HANDSHAKE,)) + (10).to_bytes(2, "big") + b"t" * 10)

    def test_ssl_errors_do_not_escape_the_protocol(self) -> None:
        """Whatever OpenSSL raises ends that connection, counted, and nothing else."""
        factory = channel.ChannelFactory(tls.server_options(CERT, KEY), False,
                                         Factory.forProtocol(Protocol))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"\x16\x00\x00")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(factory.counters["failed"], 1)

    def server_connection(self, factory: channel.ChannelFactory,
                          host: str = "198.51.100.9") -> tuple[Any, StringTransport]:
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_connections_per_source_bounded(self) -> None:
        """
        Audit item 8b: 3,000 stalled connections from one source took the
        rendezvous from 57 to 382 MiB; one source now holds at most
        MAX_PER_SOURCE, and a refused one never gets TLS state.
        """
        factory = channel.ChannelFactory(tls.server_options(CERT, KEY), False,
                                         Factory.forProtocol(Protocol), max_per_source=3)
        held = [self.server_connection(factory) for _ in range(3)]
        protocol, transport = self.server_connection(factory)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(protocol.state)
        self.assertEqual(factory.counters["refused_per_source"], 1)
        _, other = self.server_connection(factory, "198.51.100.10")
        self.assertFalse(other.disconnecting)
        first, _ = held[0]
        first.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(first.state)
        _, again = self.server_connection(factory)
        self.assertFalse(again.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))  # the refused one
        self.assertEqual(factory.per_source, {"198.51.100.9": 3, "198.51.100.10": 1})

    def test_handshake_time_bounded(self) -> None:
        """A peer that never finishes its handshake is cut off after HANDSHAKE_TIMEOUT."""
        clock = Clock()
        factory = channel.ChannelFactory(tls.server_options(CERT, KEY), False,
                                         Factory.forProtocol(Protocol), clock=clock)
        protocol, transport = self.server_connection(factory)
        clock.advance(channel.HANDSHAKE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(factory.counters["handshake_timeout"], 1)

    def test_late_handshake_bytes_bounded(self) -> None:
        """Session tickets after the switch are ignored, but not without end."""
        client, _ = self.keyed_pair()
        frame = bytes((HANDSHAKE,)) + (1000).to_bytes(2, "big") + b"t" * 1000
        for _ in range(channel.MAX_LATE_HANDSHAKE // 1000 - 1):
            self.assertEqual(client.received(frame), (b"", []))
        with self.assertRaises(ChannelError):
            client.received(frame * 2)


class _Recorder(Protocol):
    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.received: list[bytes] = []
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)  # before the handshake is done

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason


class Adapter(SynchronousTestCase):
    def connect(self, pin: bytes = PIN) -> tuple[_Recorder, _Recorder, ChannelFactory]:
        client_app, server_app = _Recorder(b"hello from the node"), _Recorder(b"welcome")
        options = tls.server_options(CERT, KEY, ssl.TLSVersion.TLSv1_3)
        server_factory = ChannelFactory(options, False, Factory.forProtocol(lambda: server_app))
        client_factory = ChannelFactory(
            tls.PinnedCertificateCreator("127.0.0.1", pin),
            True,
            Factory.forProtocol(lambda: client_app),
        )
        address = IPv4Address("TCP", "127.0.0.1", 8443)
        server = server_factory.buildProtocol(address)
        client = client_factory.buildProtocol(address)
        pump = iosim.connect(
            server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client),
            greet=False,
        )
        pump.flush()
        self.pump = pump
        return client_app, server_app, server_factory

    def test_writes_before_the_handshake_are_sent_after_it(self) -> None:
        client_app, server_app, factory = self.connect()
        self.assertEqual(b"".join(server_app.received), b"hello from the node")
        self.assertEqual(b"".join(client_app.received), b"welcome")
        self.assertEqual((factory.counters["keyed"], factory.counters["failed"]), (1, 0))
        client_app.transport.write(b"more")
        self.pump.flush()
        self.assertEqual(server_app.received[-1], b"more")

    def test_refused_certificate_reaches_the_protocol(self) -> None:
        other = tls.fingerprint(tls.make_self_signed("127.0.0.1")[0])
        client_app, server_app, factory = self.connect(pin=other)
        self.assertEqual(client_app.received, [])
        self.assertEqual(server_app.received, [])
        assert client_app.lost is not None
        self.assertIsInstance(client_app.lost.value, ChannelError)
        self.assertEqual(factory.counters["failed"], 1)
        assert server_app.lost is not None
        self.assertIsInstance(server_app.lost.value, ChannelError)

    def test_endpoint_interface(self) -> None:
        endpoint = ChannelClientEndpoint(tls.PinnedCertificateCreator("h", PIN), None)  # type: ignore[arg-type]
        self.assertTrue(verifyObject(IStreamClientEndpoint, endpoint))
