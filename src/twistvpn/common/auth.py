"""
Proof that a peer holds the private half of an X25519 key.

X25519 keys cannot sign, so a node proves possession of its WireGuard static
key the way WireGuard's own handshake does: both sides compute the
Diffie-Hellman of their static keys, and only the holders of either private
key can derive the MAC key.  The rendezvous (and, later, the relay) holds a
key pair of its own for this and never one that decrypts traffic.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from nacl.bindings import crypto_scalarmult
from nacl.exceptions import RuntimeError as NaClRuntimeError

from twistvpn.wireguard.keys import KEY_LENGTH

MAC_LENGTH = 16
CHALLENGE_LENGTH = 32

LABEL_REGISTER = b"twistvpn control register v1"
LABEL_DISCOVERY_REQUEST = b"twistvpn discovery request v1"
LABEL_DISCOVERY_RESPONSE = b"twistvpn discovery response v1"


class AuthError(ValueError):
    """A key is unusable or a proof does not verify."""


def shared_key(private_key: bytes, peer_public: bytes) -> bytes:
    """
    The MAC key two static keys share.  Low-order public keys, whose shared
    secret is all zeros and so known to everyone, are refused.
    """
    if len(private_key) != KEY_LENGTH or len(peer_public) != KEY_LENGTH:
        raise AuthError("an X25519 key is 32 bytes")
    try:
        dh = crypto_scalarmult(private_key, peer_public)
    except NaClRuntimeError:
        raise AuthError("low-order public key") from None
    if not any(dh):
        raise AuthError("low-order public key")
    return hashlib.blake2s(dh, key=b"twistvpn rendezvous auth", digest_size=32).digest()


def mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    """
    Keyed BLAKE2s over the label and length-prefixed parts, so that no two
    different messages (or messages for different purposes) share a MAC.
    """
    h = hashlib.blake2s(key=key, digest_size=MAC_LENGTH)
    h.update(struct.pack("!H", len(label)) + label)
    for part in parts:
        h.update(struct.pack("!I", len(part)) + part)
    return h.digest()


def check(expected: bytes, received: bytes) -> bool:
    """Constant-time comparison of two MACs."""
    return hmac.compare_digest(expected, received)


def new_challenge() -> bytes:
    """A fresh random challenge."""
    return os.urandom(CHALLENGE_LENGTH)


def registration_proof(
    node_private: bytes, node_public: bytes, server_public: bytes, challenge: bytes,
    binding: bytes,
) -> bytes:
    """
    The node's answer to a registration challenge, bound to the connection
    it is sent on and the server identity the node checked (C{binding}:
    L{twistvpn.interfaces.IChannelBinding}), so nobody can pass it on.
    """
    key = shared_key(node_private, server_public)
    return mac(key, LABEL_REGISTER, challenge, node_public, server_public, binding)


def verify_registration(
    server_private: bytes,
    server_public: bytes,
    node_public: bytes,
    challenge: bytes,
    proof: bytes,
    binding: bytes,
) -> bool:
    """Whether C{proof} answers C{challenge} for C{node_public} on this connection."""
    try:
        key = shared_key(server_private, node_public)
    except AuthError:
        return False
    expected = mac(key, LABEL_REGISTER, challenge, node_public, server_public, binding)
    return check(expected, proof)


class SharedKeyCache:
    """
    Remembers the shared keys of recently seen node keys: a discovery server
    verifies a datagram per node every few seconds and the Diffie-Hellman is
    the expensive part.  Bounded, oldest entries go first.
    """

    def __init__(self, private_key: bytes, size: int = 4096) -> None:
        self._private = private_key
        self._size = size
        self._keys: dict[bytes, bytes] = {}

    def get(self, peer_public: bytes) -> bytes:
        """The shared key with C{peer_public}; raises L{AuthError}."""
        key = self._keys.pop(peer_public, None)
        if key is None:
            key = shared_key(self._private, peer_public)
            if len(self._keys) >= self._size:
                del self._keys[next(iter(self._keys))]
        self._keys[peer_public] = key
        return key
