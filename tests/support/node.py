"""
A static node on in-memory fakes (TUN device, WireGuard state, reactor),
and the wg-quick file it runs.
"""

from __future__ import annotations

from typing import Any

from twisted.names.test.test_util import MemoryReactor

from tests.support.fakes import FakeWireGuardDevice
from twistvpn.node.service import (
    StaticNodeService,
)
from twistvpn.testing.faketun import FakeTunDevice
from twistvpn.wireguard.keys import encode_key

PRIVATE = bytes(range(32))


PEER1 = bytes([1] * 32)


PEER2 = bytes([2] * 32)


PSK = bytes([3] * 32)


CONFIG = f"""\
[Interface]
PrivateKey = {encode_key(PRIVATE)}
Address = 100.64.0.1/24
ListenPort = 51820
MTU = 1380

[Peer]
PublicKey = {encode_key(PEER1)}
PresharedKey = {encode_key(PSK)}
Endpoint = 203.0.113.2:51820
AllowedIPs = 100.64.0.2/32, 100.64.8.0/24
PersistentKeepalive = 25

[Peer]
PublicKey = {encode_key(PEER2)}
AllowedIPs = 100.64.0.3/32, 0.0.0.0/0
"""


class FakeNode:
    """A node service on in-memory fakes, and the fakes it made."""

    def __init__(self, reactor: MemoryReactor, config: Any, **kwargs: Any) -> None:
        self.tuns: list[FakeTunDevice] = []
        self.devices: list[FakeWireGuardDevice] = []
        self.service = StaticNodeService(
            reactor,
            config,
            interface_name="tvtest0",
            open_tun=self._open_tun,
            make_device=self._make_device,
            **kwargs,
        )

    def _open_tun(self, name: str, mtu: int) -> FakeTunDevice:
        self.tuns.append(FakeTunDevice(name, mtu))
        return self.tuns[-1]

    def _make_device(self, *args: Any) -> FakeWireGuardDevice:
        self.devices.append(FakeWireGuardDevice(*args))
        return self.devices[-1]
