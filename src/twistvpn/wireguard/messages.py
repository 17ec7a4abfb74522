"""
WireGuard's four messages on the wire (whitepaper section 5.4), its
protocol constants (section 6) and TAI64N timestamps.

Every message starts with a little-endian 32-bit word whose low byte is the
type and whose other three bytes are zero; reading that word as one integer
checks both at once.
"""

from __future__ import annotations

import struct
from typing import Final

from twistvpn.wire import (
    WG_COOKIE_REPLY,
    WG_HANDSHAKE_INITIATION,
    WG_HANDSHAKE_RESPONSE,
    WG_TRANSPORT_DATA,
)
from twistvpn.wireguard.noise import IKPSK2_NAME, blake2s_hash

CONSTRUCTION: Final = IKPSK2_NAME
IDENTIFIER: Final = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"

# type|reserved as one u32, sender, ephemeral, encrypted static, encrypted
# timestamp, mac1, mac2
INITIATION: Final = struct.Struct("<II32s48s28s16s16s")
# type|reserved, sender, receiver, ephemeral, encrypted nothing, mac1, mac2
RESPONSE: Final = struct.Struct("<III32s16s16s16s")
# type|reserved, receiver, nonce, encrypted cookie
COOKIE_REPLY: Final = struct.Struct("<II24s32s")
# type|reserved, receiver, counter
TRANSPORT_HEADER: Final = struct.Struct("<IIQ")

INITIATION_SIZE: Final = INITIATION.size  # 148
RESPONSE_SIZE: Final = RESPONSE.size  # 92
COOKIE_REPLY_SIZE: Final = COOKIE_REPLY.size  # 64
TRANSPORT_HEADER_SIZE: Final = TRANSPORT_HEADER.size  # 16
TRANSPORT_MIN_SIZE: Final = TRANSPORT_HEADER_SIZE + 16  # a keepalive: header + tag
assert (INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE) == (148, 92, 64)

# Where mac1 and mac2 start in the two handshake messages.
INITIATION_MAC1 = INITIATION_SIZE - 32
RESPONSE_MAC1 = RESPONSE_SIZE - 32

MESSAGE_INITIATION: Final = WG_HANDSHAKE_INITIATION
MESSAGE_RESPONSE: Final = WG_HANDSHAKE_RESPONSE
MESSAGE_COOKIE_REPLY: Final = WG_COOKIE_REPLY
MESSAGE_TRANSPORT: Final = WG_TRANSPORT_DATA

# Hi and Ci before the responder's static key is mixed in.
CONSTRUCTION_HASH = blake2s_hash(CONSTRUCTION)
IDENTIFIER_HASH = blake2s_hash(CONSTRUCTION_HASH, IDENTIFIER)

# --- protocol constants (whitepaper section 6.1; wireguard-go constants.go) ---

REKEY_AFTER_MESSAGES: Final = 1 << 60
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME: Final = 120.0
REJECT_AFTER_TIME: Final = 180.0
REKEY_ATTEMPT_TIME: Final = 90.0
REKEY_TIMEOUT: Final = 5.0
REKEY_TIMEOUT_JITTER_MAX = 0.333
KEEPALIVE_TIMEOUT: Final = 10.0
COOKIE_REFRESH_TIME = 120.0
HANDSHAKE_INITIATION_RATE: Final = 0.020  # at most one initiation per peer per 20 ms
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)  # 18
UNDER_LOAD_AFTER_TIME: Final = 1.0
# wireguard-go counts itself under load when 1/8 of its 1024-deep handshake
# queue is full; we count handshake messages per second instead.
UNDER_LOAD_HANDSHAKES_PER_SECOND = 128
MAX_STAGED_PACKETS = 128

# --- TAI64N ---------------------------------------------------------------

TAI64N: Final = struct.Struct(">QI")
TAI64_BASE: Final = (1 << 62) + 10  # 2**62 plus the 10 s TAI-UTC offset of 1972
# Like wireguard-go, round the nanoseconds down to about 16 ms so the
# timestamp does not leak a precise clock.
TAI64N_WHITENER: Final = ~0xFFFFFF


def tai64n(wall_seconds: float) -> bytes:
    """The 12-byte TAI64N label of a Unix time."""
    seconds = int(wall_seconds)
    nanoseconds = int((wall_seconds - seconds) * 1e9) & TAI64N_WHITENER
    return TAI64N.pack(TAI64_BASE + seconds, nanoseconds)


def message_type(data: bytes) -> int:
    """
    The type of a WireGuard message, or 0 when the first four bytes are not
    a type followed by three zero bytes.
    """
    if len(data) < 4:
        return 0
    word = int.from_bytes(data[:4], "little")
    return word if 1 <= word <= 4 else 0
