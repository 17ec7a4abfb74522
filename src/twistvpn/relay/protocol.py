"""
The relay's frames, shared by both transports.

Every frame starts with L{twistvpn.wire.RELAY} (0xF5) and a kind byte, so a
frame is a datagram on the node's one UDP socket as it is; on TCP (TLS) the
same frame is preceded by a two-byte big-endian length.

Node to relay::

    HELLO      F5 10 node_key(32)                       ask for a challenge
    AUTH       F5 12 node_key(32) challenge(24) proof(16)
    SEND       F5 01 token(8) dst_key(32) datagram      relay this datagram
    PING       F5 20 nonce(8) [token(8) tag(16)]        liveness, RTT, keepalive; the
                                                        tag proves the session key
    BYE        F5 30 token(8)                           end the session

Relay to node::

    CHALLENGE  F5 11 challenge(24)
    WELCOME    F5 13 token(8)
    REFUSED    F5 14 reason(1)                          (also: unknown token)
    RECV       F5 02 src_key(32) datagram               a datagram from src_key
    PONG       F5 21 nonce(8) known(1)                  known: the token was valid
    REBIND     F5 15                                    a SEND came from an address
                                                        the session is not bound to

The proof is the rendezvous's proof of possession (L{twistvpn.common.auth}:
a MAC keyed by X25519(node private, relay public)) over the challenge and both
keys, under a label of the relay's own, so registering proves possession of the node's
WireGuard private key; the relay never learns a key that decrypts traffic.

The token names a session in every UDP frame, in clear, so it is no
credential: a session moves to a new address (NAT rebinding) only on a
PING whose tag is a MAC under the session key, which both ends derive from
the same shared key and the token (L{session_key}).  A SEND
from another address is dropped and answered with REBIND, which makes the
node send such a PING at once; a forged REBIND or REFUSED costs the node a
PING or a re-registration, never its session.
"""

from __future__ import annotations

import struct

from twistvpn.common import auth as auth_module
from twistvpn.common.auth import AuthError
from twistvpn.wire import RELAY

KEY = 32
TOKEN = 8
NONCE = 8
CHALLENGE_LENGTH = 24
PROOF = auth_module.MAC_LENGTH
TAG = 16

SEND = 0x01
RECV = 0x02
HELLO = 0x10
CHALLENGE = 0x11
AUTH = 0x12
WELCOME = 0x13
REFUSED = 0x14
REBIND = 0x15
PING = 0x20
PONG = 0x21
BYE = 0x30

# REFUSED reasons
REFUSED_BAD_PROOF = 1
REFUSED_NOT_AUTHORIZED = 2
REFUSED_FULL = 3
REFUSED_UNKNOWN_SESSION = 4  # a SEND with a token the relay does not know

# Offsets of a SEND frame's fields: the hot path slices at these.
SEND_DST = 2 + TOKEN
SEND_PAYLOAD = SEND_DST + KEY
RECV_PAYLOAD = 2 + KEY

# The largest frame a two-byte length prefix carries.
MAX_FRAME = 0xFFFF

_PREFIX = bytes((RELAY,))
_AUTH_LABEL = b"twistvpn relay register v1"
_SESSION_LABEL = b"twistvpn relay session v1"
_PING_LABEL = b"twistvpn relay ping v1"


class MalformedFrameError(ValueError):
    """A frame that is too short, too long, or of an unknown kind."""


def header(kind: int) -> bytes:
    """The two bytes that open a frame of C{kind}."""
    return bytes((RELAY, kind))


def hello(node_key: bytes) -> bytes:
    return header(HELLO) + node_key


def challenge(value: bytes) -> bytes:
    return header(CHALLENGE) + value


def auth(node_key: bytes, challenge_value: bytes, proof_value: bytes) -> bytes:
    return header(AUTH) + node_key + challenge_value + proof_value


def welcome(token: bytes) -> bytes:
    return header(WELCOME) + token


def refused(reason: int) -> bytes:
    return header(REFUSED) + bytes((reason,))


def send(token: bytes, dst_key: bytes, datagram: bytes) -> bytes:
    return header(SEND) + token + dst_key + datagram


def recv(src_key: bytes, datagram: bytes) -> bytes:
    return header(RECV) + src_key + datagram


def ping(nonce: bytes, token: bytes = b"", key: bytes = b"") -> bytes:
    """A PING; with C{token}, tagged under the session C{key}."""
    if not token:
        return header(PING) + nonce
    return header(PING) + nonce + token + ping_tag(key, nonce, token)


def ping_tag(key: bytes, nonce: bytes, token: bytes) -> bytes:
    return auth_module.mac(key, _PING_LABEL, nonce, token)[:TAG]


def ping_tag_valid(key: bytes, frame: bytes) -> bool:
    """Whether a token-bearing PING's tag is the session C{key}'s."""
    nonce = frame[2 : 2 + NONCE]
    token = frame[2 + NONCE : 2 + NONCE + TOKEN]
    return auth_module.check(ping_tag(key, nonce, token), frame[2 + NONCE + TOKEN :])


def session_key(shared: bytes, token: bytes) -> bytes:
    """
    The key a session's rebinding PINGs are tagged with: both ends derive it
    from their X25519 shared key, which nobody else has, and the token.
    """
    return auth_module.mac(shared, _SESSION_LABEL, token)


def rebind() -> bytes:
    return header(REBIND)


def pong(nonce: bytes, known: bool) -> bytes:
    return header(PONG) + nonce + (b"\x01" if known else b"\x00")


def bye(token: bytes) -> bytes:
    return header(BYE) + token


# The exact or least length of each kind, for validation before parsing.
_EXACT = {
    HELLO: 2 + KEY,
    CHALLENGE: 2 + CHALLENGE_LENGTH,
    AUTH: 2 + KEY + CHALLENGE_LENGTH + PROOF,
    WELCOME: 2 + TOKEN,
    REFUSED: 3,
    REBIND: 2,
    PONG: 2 + NONCE + 1,
    BYE: 2 + TOKEN,
}
_LEAST = {SEND: SEND_PAYLOAD + 1, RECV: RECV_PAYLOAD + 1}


def frame_kind(frame: bytes) -> int:
    """
    Return the kind of C{frame} after checking its prefix and length, or
    raise L{MalformedFrameError}.
    """
    if len(frame) < 2 or frame[0] != RELAY:
        raise MalformedFrameError("not a relay frame")
    if len(frame) > MAX_FRAME:
        raise MalformedFrameError("frame too long")
    kind = frame[1]
    exact = _EXACT.get(kind)
    if exact is not None:
        if len(frame) != exact:
            raise MalformedFrameError(f"frame of kind {kind:#x} has length {len(frame)}")
        return kind
    least = _LEAST.get(kind)
    if least is not None:
        if len(frame) < least:
            raise MalformedFrameError(f"frame of kind {kind:#x} too short")
        return kind
    if kind == PING:
        if len(frame) not in (2 + NONCE, 2 + NONCE + TOKEN + TAG):
            raise MalformedFrameError("ping of bad length")
        return kind
    raise MalformedFrameError(f"unknown frame kind {kind:#x}")


def proof(private_key: bytes, peer_public: bytes, relay_key: bytes, node_key: bytes,
          challenge_value: bytes) -> bytes:
    """
    The registration proof, computed alike by the node (its private key, the
    relay's public key) and the relay (its private key, the node's public
    key): both arrive at the same shared key (L{twistvpn.common.auth}).
    Raises L{AuthError} for a low-order key.
    """
    shared = auth_module.shared_key(private_key, peer_public)
    return auth_module.mac(shared, _AUTH_LABEL, challenge_value, node_key, relay_key)


def proof_is_valid(shared_keys: auth_module.SharedKeyCache, relay_key: bytes, node_key: bytes,
                   challenge_value: bytes, received: bytes) -> bool:
    """
    Whether C{received} proves possession of C{node_key}'s private half;
    C{shared_keys} (the relay's) spares the Diffie-Hellman for nodes seen
    recently.
    """
    try:
        shared = shared_keys.get(node_key)
    except AuthError:
        return False
    expected = auth_module.mac(shared, _AUTH_LABEL, challenge_value, node_key, relay_key)
    return auth_module.check(expected, received)


# -- stream framing (TCP) --------------------------------------------------------

_LENGTH = struct.Struct(">H")


def frame_for_stream(frame: bytes) -> bytes:
    """C{frame} with its two-byte length prefix."""
    return _LENGTH.pack(len(frame)) + frame


class StreamDecoder:
    """
    Splits a byte stream into frames.  Zero-length frames are malformed; a
    length prefix cannot exceed L{MAX_FRAME}, so the buffer stays bounded.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Return the complete frames in C{data} and what came before it."""
        buf = self._buffer + data
        frames = []
        offset = 0
        end = len(buf)
        while end - offset >= 2:
            (length,) = _LENGTH.unpack_from(buf, offset)
            if length == 0:
                raise MalformedFrameError("zero-length frame")
            if end - offset - 2 < length:
                break
            frames.append(buf[offset + 2 : offset + 2 + length])
            offset += 2 + length
        self._buffer = buf[offset:]
        return frames
