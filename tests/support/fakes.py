"""
In-memory stand-ins for the node's WireGuard state, recording what the node
asks of it.
"""

from __future__ import annotations

import collections
from typing import Any

from zope.interface import implementer

from twistvpn.interfaces import IWireGuardDevice, IWireGuardPeer
from twistvpn.wireguard.keys import public_key


@implementer(IWireGuardPeer)
class FakePeer:
    def __init__(self, public_key: bytes, endpoint: Any, allowed_ips: tuple[str, ...]) -> None:
        self.public_key = public_key
        self.endpoint = endpoint
        self.allowed_ips = allowed_ips
        self.last_handshake = None
        self.rx_bytes = 0
        self.tx_bytes = 0

    def set_allowed_ips(self, cidrs: Any) -> None:
        self.allowed_ips = tuple(cidrs)


@implementer(IWireGuardDevice)
class FakeWireGuardDevice:
    """Records what the node asks of the WireGuard state."""

    def __init__(
        self, private_key: bytes, clock: Any, send_datagram: Any, deliver_packet: Any
    ) -> None:
        self.public_key = public_key(private_key)
        self.clock = clock
        self.send_datagram = send_datagram
        self.deliver_packet = deliver_packet
        self.counters: collections.Counter[str] = collections.Counter()
        self.added: list[dict[str, Any]] = []
        self._peers: dict[bytes, FakePeer] = {}
        self.datagrams: list[tuple[bytes, Any]] = []
        self.packets: list[bytes] = []
        self.closed = False

    def add_peer(
        self,
        public_key: bytes,
        preshared_key: bytes | None = None,
        endpoint: Any = None,
        allowed_ips: Any = (),
        persistent_keepalive: int = 0,
    ) -> FakePeer:
        self.added.append(
            dict(
                public_key=public_key,
                preshared_key=preshared_key,
                endpoint=endpoint,
                allowed_ips=tuple(allowed_ips),
                persistent_keepalive=persistent_keepalive,
            )
        )
        peer = self._peers[public_key] = FakePeer(public_key, endpoint, tuple(allowed_ips))
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        self._peers.pop(public_key, None)

    def get_peer(self, public_key: bytes) -> FakePeer | None:
        return self._peers.get(public_key)

    def peers(self) -> list[FakePeer]:
        return list(self._peers.values())

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams.append((data, addr))

    def send_packet(self, packet: bytes) -> None:
        self.packets.append(packet)

    def close(self) -> None:
        self.closed = True
