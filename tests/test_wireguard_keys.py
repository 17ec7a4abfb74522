"""
Our key text form against WireGuard's own: the key pairs in
L{tests.support.wireguard} were made with C{wg genkey | tee k | wg pubkey}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.support.wireguard import (
    WG_PRIVATE_KEY,
    WG_PRIVATE_KEY_2,
    WG_PSK,
    WG_PUBLIC_KEY,
    WG_PUBLIC_KEY_2,
)
from twistvpn.wireguard import keys


class KeyEncodingTests(SynchronousTestCase):
    """Our key text form is byte for byte wg(8)'s."""

    def test_public_key_matches_wg_pubkey(self) -> None:
        for private, public in [
            (WG_PRIVATE_KEY, WG_PUBLIC_KEY),
            (WG_PRIVATE_KEY_2, WG_PUBLIC_KEY_2),
        ]:
            self.assertEqual(keys.encode_key(keys.public_key(keys.decode_key(private))), public)

    def test_round_trip(self) -> None:
        for text in (WG_PRIVATE_KEY, WG_PUBLIC_KEY, WG_PSK):
            self.assertEqual(keys.encode_key(keys.decode_key(text)), text)

    def test_wg_genkey_output_is_clamped(self) -> None:
        private = keys.decode_key(WG_PRIVATE_KEY)
        self.assertEqual(keys.clamp(private), private)

    def test_generated_keys_are_clamped(self) -> None:
        private = keys.generate_private_key()
        self.assertEqual(keys.clamp(private), private)
        self.assertEqual(len(keys.generate_preshared_key()), 32)

    def test_bad_text_refused(self) -> None:
        for bad in ("", "abc", WG_PUBLIC_KEY[:-2] + "==", "!" * 43 + "=", WG_PUBLIC_KEY[:-1]):
            self.assertRaises(keys.InvalidKey, keys.decode_key, bad)
