"""
The control channel's TLS 1.3 handshake (L{twistvpn.rendezvous.channel}) on
loopback (port 0): pinning by fingerprint, CA-verified hostnames, and
refusal on either mismatch.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.rendezvous import RecordingListener
from twistvpn.common import tls
from twistvpn.rendezvous.channel import ChannelFactory
from twistvpn.rendezvous.client import RendezvousClient
from twistvpn.rendezvous.controller import Controller
from twistvpn.rendezvous.server import ControlServerFactory
from twistvpn.rendezvous.store import open_store
from twistvpn.wireguard.keys import generate_private_key


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca_and_leaf(hostname: str) -> tuple[bytes, bytes, bytes]:
    """A test CA and a certificate it signed for C{hostname}: (ca, cert, key) PEM."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("twistvpn test CA"))
        .issuer_name(_name("twistvpn test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(hostname))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return (
        ca.public_bytes(pem),
        leaf.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


class Addresses(SynchronousTestCase):
    def test_round_trip(self) -> None:
        url = "twistvpn://rdv.example.org:9443#sha256=" + "ab" * 32
        address = tls.parse_address(url)
        self.assertEqual(address, tls.RendezvousAddress("rdv.example.org", 9443, b"\xab" * 32))
        self.assertEqual(str(address), url)
        self.assertEqual(tls.parse_address("twistvpn://h").port, tls.DEFAULT_PORT)
        self.assertEqual(str(tls.parse_address("twistvpn://[::1]:5")), "twistvpn://[::1]:5")

    def test_bad_addresses(self) -> None:
        for bad in (
            "http://h:1",
            "twistvpn://",
            "twistvpn://h:99999",
            "twistvpn://h:1/path",
            "twistvpn://h:1#sha1=" + "ab" * 20,
            "twistvpn://h:1#sha256=abc",
            "twistvpn://h:1#sha256=" + "zz" * 32,
        ):
            self.assertRaises(tls.TLSConfigError, tls.parse_address, bad)

    def test_key_must_match_certificate(self) -> None:
        cert, _ = tls.make_self_signed("a.example")
        _, other_key = tls.make_self_signed("b.example")
        self.assertRaises(tls.TLSConfigError, tls.server_options, cert, other_key)
        self.assertRaises(tls.TLSConfigError, tls.server_options, b"junk", b"junk")


class Loopback(TestCase):
    """Real sockets on 127.0.0.1, port 0, the real reactor; all closed after."""

    timeout = 20

    def listen(self, cert_pem: bytes, key_pem: bytes) -> defer.Deferred[int]:
        self.controller = Controller(open_store(":memory:"), reactor)
        factory = ControlServerFactory(self.controller, generate_private_key(), reactor)
        self.addCleanup(factory.close_all)
        options = tls.server_options(cert_pem, key_pem, ssl.TLSVersion.TLSv1_3)
        wrapped = ChannelFactory(options, False, factory)
        d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(wrapped)

        def listening(port: object) -> int:
            self.addCleanup(port.stopListening)
            return port.getHost().port

        return d.addCallback(listening)

    def connect(self, url: str, ca_pem: bytes | None = None) -> defer.Deferred:
        listener = RecordingListener()
        client = RendezvousClient.from_address(
            reactor, url, generate_private_key(), "tls-test", listener, ca_pem=ca_pem
        )
        client.startService()
        self.addCleanup(client.stopService)
        self.client, self.listener = client, listener
        return client.when_connected(fail_after_failures=1)

    @defer.inlineCallbacks
    def test_pinned_fingerprint(self) -> defer.Generator:
        cert, key = tls.make_self_signed("localhost")
        port = yield self.listen(cert, key)
        url = str(tls.RendezvousAddress("127.0.0.1", port, tls.fingerprint(cert)))
        yield self.connect(url)
        self.assertEqual(self.listener.of("connected")[0][1], self.client.node_id)
        self.assertTrue(self.controller.is_registered(self.client.public_key))

    @defer.inlineCallbacks
    def test_fingerprint_mismatch(self) -> defer.Generator:
        cert, key = tls.make_self_signed("localhost")
        other, _ = tls.make_self_signed("localhost")
        port = yield self.listen(cert, key)
        url = str(tls.RendezvousAddress("127.0.0.1", port, tls.fingerprint(other)))
        yield self.assertFailure(self.connect(url), Exception)
        self.assertEqual(self.listener.of("connected"), [])
        self.assertFalse(self.controller.is_registered(self.client.public_key))

    @defer.inlineCallbacks
    def test_ca_verified_hostname(self) -> defer.Generator:
        ca, cert, key = make_ca_and_leaf("localhost")
        port = yield self.listen(cert, key)
        yield self.connect(f"twistvpn://localhost:{port}", ca_pem=ca)
        self.assertTrue(self.controller.is_registered(self.client.public_key))

    @defer.inlineCallbacks
    def test_hostname_mismatch(self) -> defer.Generator:
        ca, cert, key = make_ca_and_leaf("rendezvous.example")
        port = yield self.listen(cert, key)
        yield self.assertFailure(self.connect(f"twistvpn://localhost:{port}", ca_pem=ca), Exception)
        self.assertFalse(self.controller.is_registered(self.client.public_key))

    @defer.inlineCallbacks
    def test_untrusted_ca(self) -> defer.Generator:
        _, cert, key = make_ca_and_leaf("localhost")
        other_ca, _, _ = make_ca_and_leaf("localhost")
        port = yield self.listen(cert, key)
        yield self.assertFailure(
            self.connect(f"twistvpn://localhost:{port}", ca_pem=other_ca), Exception
        )
        self.assertFalse(self.controller.is_registered(self.client.public_key))
