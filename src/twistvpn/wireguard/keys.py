"""
Curve25519 keys in WireGuard's text form (base64 of 32 bytes), byte for byte
what C{wg genkey}, C{wg pubkey} and C{wg genpsk} produce and read.
"""

from __future__ import annotations

import base64
import binascii
import os

from nacl.bindings import crypto_scalarmult_base

KEY_LENGTH = 32


class InvalidKey(ValueError):  # noqa: N818 (public name others use)
    """A key in text form is not 32 bytes of base64."""


def clamp(private_key: bytes) -> bytes:
    """
    Clamp a Curve25519 scalar as C{wg genkey} does, so that our keys print
    the same as WireGuard's.
    """
    k = bytearray(private_key)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def generate_private_key() -> bytes:
    """A fresh, clamped private key."""
    return clamp(os.urandom(KEY_LENGTH))


def generate_preshared_key() -> bytes:
    """A fresh symmetric preshared key (not clamped, as C{wg genpsk})."""
    return os.urandom(KEY_LENGTH)


def public_key(private_key: bytes) -> bytes:
    """The public key of C{private_key}."""
    if len(private_key) != KEY_LENGTH:
        raise InvalidKey("a private key is 32 bytes")
    return crypto_scalarmult_base(private_key)


def encode_key(key: bytes) -> str:
    """WireGuard's text form of a key."""
    return base64.standard_b64encode(key).decode("ascii")


def decode_key(text: str) -> bytes:
    """
    Parse WireGuard's text form of a key, refusing anything that is not
    exactly 32 bytes of canonical base64.
    """
    text = text.strip()
    if len(text) != 44 or not text.endswith("="):
        raise InvalidKey("a key is 44 characters of base64 ending in '='")
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidKey(f"not valid base64: {e}") from None
    if len(key) != KEY_LENGTH or encode_key(key) != text:
        raise InvalidKey("not the base64 of a 32-byte key")
    return key
