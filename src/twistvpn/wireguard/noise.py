"""
The Noise framework's symmetric and handshake state, for the one pattern
WireGuard uses: Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s.

General enough (protocol name, prologue, payloads, injected ephemeral keys,
preshared key) to reproduce the published Noise test vectors; WireGuard is
this handshake with the prologue "WireGuard v1 zx2c4 Jason@zx2c4.com", a
TAI64N timestamp as the first payload and an empty second payload.

Every primitive comes from hashlib/hmac (BLAKE2s), PyNaCl (X25519) and
C{cryptography} (ChaCha20-Poly1305).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
from nacl.exceptions import CryptoError

HASH_LEN: Final = 32
DH_LEN: Final = 32
TAG_LEN: Final = 16

# ChaChaPoly's 96-bit nonce: 32 zero bits, then the 64-bit counter, little-endian.
NONCE: Final = struct.Struct("<4xQ")

IKPSK2_NAME = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"


class NoiseError(Exception):
    """A handshake message failed to authenticate or to parse."""


def blake2s_hash(*parts: bytes) -> bytes:
    """HASH(a || b || ...): unkeyed BLAKE2s-256."""
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def blake2s_mac(key: bytes, data: bytes) -> bytes:
    """WireGuard's MAC: keyed BLAKE2s with a 16-byte output (not HMAC)."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """HMAC over BLAKE2s (block length 64), as Noise's HKDF requires."""
    return hmac.new(key, data, hashlib.blake2s).digest()


def hkdf(chaining_key: bytes, input_key_material: bytes, outputs: int) -> list[bytes]:
    """Noise's HKDF: 1 to 3 32-byte outputs."""
    prk = hmac_blake2s(chaining_key, input_key_material)
    out = []
    t = b""
    for i in range(1, outputs + 1):
        t = hmac_blake2s(prk, t + bytes((i,)))
        out.append(t)
    return out


def dh(private_key: bytes, public_key: bytes) -> bytes:
    """
    X25519.  An all-zero result (a low-order point) is refused, as
    WireGuard refuses it.
    """
    try:
        shared = crypto_scalarmult(private_key, public_key)
    except (CryptoError, RuntimeError, ValueError, TypeError) as e:
        raise NoiseError(f"bad DH: {e}") from None
    if shared == bytes(DH_LEN):
        raise NoiseError("DH with a low-order point")
    return shared


def dh_public(private_key: bytes) -> bytes:
    """The X25519 public key of C{private_key}."""
    return crypto_scalarmult_base(private_key)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    """ChaCha20-Poly1305 with Noise's nonce encoding."""
    return ChaCha20Poly1305(key).encrypt(NONCE.pack(counter), plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    """The inverse of L{aead_encrypt}; L{NoiseError} if it does not authenticate."""
    try:
        return ChaCha20Poly1305(key).decrypt(NONCE.pack(counter), ciphertext, ad)
    except InvalidTag:
        raise NoiseError("AEAD tag mismatch") from None


class CipherState:
    """A key and its nonce counter (Noise section 5.1)."""

    __slots__ = ("key", "nonce")

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key
        self.nonce = 0

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self.key is None:
            return plaintext
        ciphertext = aead_encrypt(self.key, self.nonce, plaintext, ad)
        self.nonce += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self.key is None:
            return ciphertext
        plaintext = aead_decrypt(self.key, self.nonce, ciphertext, ad)
        self.nonce += 1
        return plaintext


class SymmetricState:
    """The chaining key and handshake hash (Noise section 5.2)."""

    __slots__ = ("chaining_key", "hash", "cipher")

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASH_LEN:
            h = protocol_name.ljust(HASH_LEN, b"\0")
        else:
            h = blake2s_hash(protocol_name)
        self.chaining_key = h
        self.hash = h
        self.cipher = CipherState()

    def copy(self) -> SymmetricState:
        """A fresh state with the same chaining key and hash (no key yet)."""
        # The constructor (not __new__, which a compiled class refuses), its
        # placeholder hash and empty cipher state then overwritten in place.
        other = SymmetricState(b"")
        other.chaining_key = self.chaining_key
        other.hash = self.hash
        other.cipher.key = self.cipher.key
        other.cipher.nonce = self.cipher.nonce
        return other

    def mix_key(self, input_key_material: bytes) -> None:
        self.chaining_key, key = hkdf(self.chaining_key, input_key_material, 2)
        self.cipher = CipherState(key)

    def mix_hash(self, data: bytes) -> None:
        self.hash = blake2s_hash(self.hash, data)

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        self.chaining_key, temp_hash, key = hkdf(self.chaining_key, input_key_material, 3)
        self.mix_hash(temp_hash)
        self.cipher = CipherState(key)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.hash, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.hash, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        """The two transport keys: the initiator sends with the first."""
        first, second = hkdf(self.chaining_key, b"", 2)
        return first, second


def initial_state(protocol_name: bytes, prologue: bytes, responder_static: bytes) -> SymmetricState:
    """
    The state after the prologue and IK's pre-message (the responder's
    static key), which depends only on the responder: WireGuard computes it
    once per key.
    """
    state = SymmetricState(protocol_name)
    state.mix_hash(prologue)
    state.mix_hash(responder_static)
    return state


class IKpsk2Handshake:
    """
    One side of a Noise_IKpsk2 handshake::

        <- s
        ...
        -> e, es, s, ss
        <- e, ee, se, psk

    C{ephemeral} (a private key) may be injected, for test vectors and for
    a device that draws randomness from an injected source.  The responder
    learns the initiator's static key from message 1 (L{remote_static}) and
    may set L{psk} after reading it, before writing message 2.

    WireGuard's own speed-ups, both optional: C{static_public} saves
    deriving our public key again, and C{static_shared(remote_static)}
    returns the static-static DH (the same for every handshake with a
    peer, so computed once per peer, as wireguard-go does).
    """

    def __init__(
        self,
        initiator: bool,
        static_private: bytes,
        ephemeral_private: bytes,
        remote_static: bytes | None = None,
        psk: bytes = bytes(32),
        prologue: bytes = b"",
        protocol_name: bytes = IKPSK2_NAME,
        state: SymmetricState | None = None,
        static_public: bytes | None = None,
        static_shared: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.initiator = initiator
        self.static_private = static_private
        self.static_public = dh_public(static_private) if static_public is None else static_public
        self._static_shared = static_shared
        self.ephemeral_private = ephemeral_private
        self.ephemeral_public = dh_public(ephemeral_private)
        self.remote_static = remote_static
        self.remote_ephemeral: bytes | None = None
        self.psk = psk
        if state is None:
            responder_static = remote_static if initiator else self.static_public
            if responder_static is None:
                raise ValueError("an IK initiator must know the responder's static key")
            state = initial_state(protocol_name, prologue, responder_static)
        self.symmetric = state.copy()

    def _ss(self, remote_static: bytes) -> bytes:
        if self._static_shared is not None:
            return self._static_shared(remote_static)
        return dh(self.static_private, remote_static)

    @property
    def handshake_hash(self) -> bytes:
        return self.symmetric.hash

    def _write_e(self) -> bytes:
        s = self.symmetric
        s.mix_hash(self.ephemeral_public)
        s.mix_key(self.ephemeral_public)  # psk modes mix e into the key too
        return self.ephemeral_public

    @staticmethod
    def _read_e(s: SymmetricState, public: bytes) -> None:
        s.mix_hash(public)
        s.mix_key(public)

    # -- message 1: -> e, es, s, ss --------------------------------------------

    def write_message_1(self, payload: bytes) -> bytes:
        """The initiator's first message (C{payload} encrypted at its end)."""
        assert self.initiator and self.remote_static is not None
        s = self.symmetric
        e = self._write_e()
        s.mix_key(dh(self.ephemeral_private, self.remote_static))
        encrypted_static = s.encrypt_and_hash(self.static_public)
        s.mix_key(self._ss(self.remote_static))
        return e + encrypted_static + s.encrypt_and_hash(payload)

    def read_message_1(self, message: bytes) -> bytes:
        """Consume message 1 as the responder; return its payload."""
        if len(message) < DH_LEN + DH_LEN + TAG_LEN + TAG_LEN:
            raise NoiseError("message 1 too short")
        s = self.symmetric.copy()  # a forgery must not spoil the state
        remote_ephemeral = message[:DH_LEN]
        self._read_e(s, remote_ephemeral)
        s.mix_key(dh(self.static_private, remote_ephemeral))
        remote_static = s.decrypt_and_hash(message[DH_LEN : 2 * DH_LEN + TAG_LEN])
        s.mix_key(self._ss(remote_static))
        payload = s.decrypt_and_hash(message[2 * DH_LEN + TAG_LEN :])
        self.symmetric = s
        self.remote_ephemeral = remote_ephemeral
        self.remote_static = remote_static
        return payload

    # -- message 2: <- e, ee, se, psk -------------------------------------------

    def write_message_2(self, payload: bytes) -> bytes:
        """The responder's message (C{payload} encrypted at its end)."""
        assert not self.initiator and self.remote_static is not None
        assert self.remote_ephemeral is not None
        s = self.symmetric
        e = self._write_e()
        s.mix_key(dh(self.ephemeral_private, self.remote_ephemeral))
        s.mix_key(dh(self.ephemeral_private, self.remote_static))
        s.mix_key_and_hash(self.psk)
        return e + s.encrypt_and_hash(payload)

    def read_message_2(self, message: bytes) -> bytes:
        """Consume message 2 as the initiator; return its payload."""
        if len(message) < DH_LEN + TAG_LEN:
            raise NoiseError("message 2 too short")
        assert self.remote_static is not None
        s = self.symmetric.copy()  # a forgery must not spoil the state
        remote_ephemeral = message[:DH_LEN]
        self._read_e(s, remote_ephemeral)
        s.mix_key(dh(self.ephemeral_private, remote_ephemeral))
        s.mix_key(dh(self.static_private, remote_ephemeral))
        s.mix_key_and_hash(self.psk)
        payload = s.decrypt_and_hash(message[DH_LEN:])
        self.symmetric = s
        self.remote_ephemeral = remote_ephemeral
        return payload

    def split(self) -> tuple[bytes, bytes]:
        """(send key, receive key) for this side."""
        first, second = self.symmetric.split()
        return (first, second) if self.initiator else (second, first)
