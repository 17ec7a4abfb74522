"""
WireGuard's denial-of-service cookies (whitepaper section 5.4.7).

Every handshake message carries mac1, keyed by the receiver's public key,
so only someone who knows that key can make us do Curve25519 work.  Under
load a responder also demands mac2, keyed by a cookie that proves the
sender can receive at its source address; without it the message is
answered with an encrypted cookie (a 64-byte type-3 reply) and dropped.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from twistvpn.wireguard.messages import (
    COOKIE_REFRESH_TIME,
    COOKIE_REPLY,
    LABEL_COOKIE,
    LABEL_MAC1,
    MESSAGE_COOKIE_REPLY,
    REKEY_TIMEOUT,
)
from twistvpn.wireguard.noise import blake2s_hash, blake2s_mac

ZERO_MAC = bytes(16)


def source_bytes(addr: Any) -> bytes:
    """
    What a cookie is bound to: the sender's address.  Endpoints are opaque
    here (a tuple, or a relay path object), so their repr stands for them;
    the cookie is only ever checked by the one who made it.
    """
    return repr(addr).encode("utf-8", "backslashreplace")


class CookieChecker:
    """
    The receiving side: checks mac1 and mac2 and makes cookie replies.
    C{clock} provides IReactorTime (typed Any: mypy cannot check zope
    interfaces).
    """

    def __init__(self, public_key: bytes, clock: Any, random: Callable[[int], bytes]) -> None:
        self._mac1_key = blake2s_hash(LABEL_MAC1, public_key)
        self._cookie_key = blake2s_hash(LABEL_COOKIE, public_key)
        self._clock = clock
        self._random = random
        self._secret = b""
        self._secret_set = -COOKIE_REFRESH_TIME * 2

    def check_mac1(self, message: bytes, mac1_offset: int) -> bool:
        """Is mac1 of C{message} keyed with our public key?"""
        expected = blake2s_mac(self._mac1_key, message[:mac1_offset])
        return hmac.compare_digest(expected, message[mac1_offset : mac1_offset + 16])

    def _cookie(self, addr: Any) -> bytes:
        now = self._clock.seconds()
        if now - self._secret_set >= COOKIE_REFRESH_TIME:
            # A fresh random secret every two minutes: old cookies expire.
            self._secret = self._random(32)
            self._secret_set = now
        return blake2s_mac(self._secret, source_bytes(addr))

    def check_mac2(self, message: bytes, mac1_offset: int, addr: Any) -> bool:
        """Does mac2 of C{message} use the cookie we give C{addr} now?"""
        mac2_offset = mac1_offset + 16
        expected = blake2s_mac(self._cookie(addr), message[:mac2_offset])
        return hmac.compare_digest(expected, message[mac2_offset : mac2_offset + 16])

    def make_reply(self, message: bytes, mac1_offset: int, sender_index: int, addr: Any) -> bytes:
        """The cookie reply to C{message} (whose sender index is C{sender_index})."""
        nonce = self._random(24)
        mac1 = message[mac1_offset : mac1_offset + 16]
        encrypted = crypto_aead_xchacha20poly1305_ietf_encrypt(
            self._cookie(addr), mac1, nonce, self._cookie_key
        )
        return COOKIE_REPLY.pack(MESSAGE_COOKIE_REPLY, sender_index, nonce, encrypted)


class CookieGenerator:
    """The sending side, one per peer: adds mac1/mac2, stores cookies."""

    def __init__(self, peer_public_key: bytes, clock: Any) -> None:
        self._mac1_key = blake2s_hash(LABEL_MAC1, peer_public_key)
        self._cookie_key = blake2s_hash(LABEL_COOKIE, peer_public_key)
        self._clock = clock
        self._last_mac1: bytes | None = None
        self.cookie: bytes | None = None
        self._cookie_set = 0.0

    def add_macs(self, body: bytes) -> bytes:
        """C{body} (a handshake message up to mac1) with mac1 and mac2 appended."""
        mac1 = blake2s_mac(self._mac1_key, body)
        self._last_mac1 = mac1
        cookie = self.cookie
        # wireguard-go stops using a cookie a little before the responder
        # would have rotated the secret it was made from.
        if cookie is not None and (
            self._clock.seconds() - self._cookie_set < COOKIE_REFRESH_TIME - REKEY_TIMEOUT
        ):
            mac2 = blake2s_mac(cookie, body + mac1)
        else:
            mac2 = ZERO_MAC
        return body + mac1 + mac2

    def consume_reply(self, nonce: bytes, encrypted_cookie: bytes) -> bool:
        """Decrypt and keep the cookie of a reply to our last message."""
        if self._last_mac1 is None:
            return False
        try:
            cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(
                encrypted_cookie, self._last_mac1, nonce, self._cookie_key
            )
        except (CryptoError, ValueError, TypeError):
            return False
        self.cookie = cookie
        self._cookie_set = self._clock.seconds()
        return True
