"""
The message types that share a node's one UDP socket.

Every datagram's first byte names its kind.  WireGuard owns 1 to 4 (each
followed by three zero bytes), so stock WireGuard peers interoperate; a
WireGuard implementation drops the others, so twistvpn's own control and
probe messages can travel beside the data plane without confusing it.
"""

from __future__ import annotations

# WireGuard (whitepaper section 5.4)
WG_HANDSHAKE_INITIATION = 1
WG_HANDSHAKE_RESPONSE = 2
WG_COOKIE_REPLY = 3
WG_TRANSPORT_DATA = 4
WIREGUARD_TYPES = frozenset(
    (WG_HANDSHAKE_INITIATION, WG_HANDSHAKE_RESPONSE, WG_COOKIE_REPLY, WG_TRANSPORT_DATA)
)

# twistvpn's own messages, far from WireGuard's range.
DISCOVERY_REQUEST = 0xF1  # node -> rendezvous UDP port: "what address do you see?"
DISCOVERY_RESPONSE = 0xF2  # rendezvous -> node: the observed address
PROBE = 0xF3  # node <-> node: authenticated path probe (traversal)
PROBE_REPLY = 0xF4  # node <-> node: answer to a probe
RELAY = 0xF5  # node <-> relay over UDP: a frame carrying a peer's datagram
