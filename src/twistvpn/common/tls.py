"""
TLS for the control channel: the rendezvous's certificate (self-signed on
first start unless one is given), the address nodes use
(C{twistvpn://HOST:PORT#sha256=FINGERPRINT}) and the node's side: pinning
the certificate's SHA-256 fingerprint, or verifying the hostname with
service_identity against a CA when no fingerprint is given.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from twistvpn.common.datadir import write_atomically

SCHEME = "twistvpn"
DEFAULT_PORT = 8443


class PinMismatchError(Exception):
    """The server's certificate is not the pinned one."""


class TLSConfigError(ValueError):
    """A certificate, key or rendezvous address is unusable."""


@dataclass(frozen=True)
class RendezvousAddress:
    """Where a node finds the rendezvous, and how it recognises it."""

    host: str
    port: int
    fingerprint: bytes | None  # SHA-256 of the certificate (DER), or None: use CAs

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        url = f"{SCHEME}://{host}:{self.port}"
        if self.fingerprint is not None:
            url += f"#sha256={self.fingerprint.hex()}"
        return url


def parse_address(url: str) -> RendezvousAddress:
    """Parse C{twistvpn://HOST[:PORT][#sha256=HEX]}."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise TLSConfigError(f"bad rendezvous address {url!r}: {e}") from None
    if parts.scheme != SCHEME or not parts.hostname:
        raise TLSConfigError(f"bad rendezvous address {url!r}: expected {SCHEME}://HOST:PORT")
    if parts.path not in ("", "/") or parts.query:
        raise TLSConfigError(f"bad rendezvous address {url!r}: unexpected path or query")
    fingerprint = None
    if parts.fragment:
        name, _, value = parts.fragment.partition("=")
        value = value.replace(":", "").lower()
        if name != "sha256" or len(value) != 64:
            raise TLSConfigError(f"bad fingerprint in {url!r}: expected #sha256=<64 hex digits>")
        try:
            fingerprint = bytes.fromhex(value)
        except ValueError:
            raise TLSConfigError(f"bad fingerprint in {url!r}: not hex") from None
    return RendezvousAddress(parts.hostname, port or DEFAULT_PORT, fingerprint)


def fingerprint(cert_pem: bytes) -> bytes:
    """SHA-256 of the (first) certificate's DER encoding."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def make_self_signed(hostname: str, days: int = 3650) -> tuple[bytes, bytes]:
    """A new P-256 key and a certificate for C{hostname}: (cert PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        san = x509.DNSName(hostname)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def write_private(path: str, data: bytes) -> None:
    """Write a file only its owner can read, atomically."""
    write_atomically(path, data, mode=0o600)


def load_or_create_self_signed(
    cert_path: str, key_path: str, hostname: str
) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) from these files, self-signed for C{hostname} on first start."""
    if not (os.path.exists(cert_path) and os.path.exists(key_path)):
        cert_pem, key_pem = make_self_signed(hostname)
        write_private(key_path, key_pem)
        write_private(cert_path, cert_pem)
        return cert_pem, key_pem
    with open(cert_path, "rb") as c, open(key_path, "rb") as k:
        return c.read(), k.read()


def server_options(
    cert_pem: bytes, key_pem: bytes, minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
) -> ssl.CertificateOptions:
    """
    The server's TLS options: the first certificate in C{cert_pem} is ours,
    the others its chain.
    """
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"cannot load the TLS certificate or key: {e}") from None
    usable = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)
    if not isinstance(key, usable):
        raise TLSConfigError("the TLS key must be an RSA, EC or Ed25519 key")
    if certs[0].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise TLSConfigError("the TLS key does not match the certificate")
    return ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(certs[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in certs[1:]],
        raiseMinimumTo=minimum,
    )


@implementer(IOpenSSLClientConnectionCreator)
class PinnedCertificateCreator:
    """
    Client TLS that accepts exactly one server certificate, named by its
    SHA-256 fingerprint: a self-signed certificate needs no CA, and a
    different certificate is refused even if some CA signed it.
    """

    def __init__(self, hostname: str, pin: bytes) -> None:
        self._hostname = hostname
        self._pin = pin
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_verify(SSL.VERIFY_PEER, self._verify)
        self._context = ctx

    def _verify(
        self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        if depth != 0:
            # The chain is irrelevant: the leaf itself is pinned.
            return True
        der = cert.to_cryptography().public_bytes(serialization.Encoding.DER)
        seen = hashlib.sha256(der).digest()
        if hmac.compare_digest(seen, self._pin):
            return True
        # Say what did not match (OpenSSL says only "certificate verify
        # failed"): the protocol that owns the connection reports it.
        owner = conn.get_app_data()
        fail = getattr(owner, "failVerification", None)
        if fail is not None:
            fail(Failure(PinMismatchError(
                f"the server's certificate has fingerprint sha256={seen.hex()}, "
                f"not the pinned sha256={self._pin.hex()} (a different server, or its "
                "certificate changed)")))
        return False

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        try:
            ipaddress.ip_address(self._hostname)
        except ValueError:
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        return connection


def client_creator(
    address: RendezvousAddress, ca_pem: bytes | None = None
) -> IOpenSSLClientConnectionCreator:
    """
    How a node checks the rendezvous: the pinned fingerprint if the address
    has one, else the hostname against C{ca_pem} (or the system's CAs).
    """
    if address.fingerprint is not None:
        return PinnedCertificateCreator(address.host, address.fingerprint)
    trust = ssl.Certificate.loadPEM(ca_pem) if ca_pem is not None else None
    return ssl.optionsForClientTLS(address.host, trustRoot=trust)
