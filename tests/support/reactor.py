"""
A memory reactor that also binds UDP ports, for building the rendezvous's
services without a network.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock


class _UDPPort:
    def __init__(self, port: int) -> None:
        self.port = port

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "0.0.0.0", self.port)

    def stopListening(self) -> None:
        pass


class FakeReactor(MemoryReactorClock):
    """MemoryReactorClock, plus the listenUDP it lacks."""

    def __init__(self) -> None:
        super().__init__()
        self.udpPorts: dict[int, Any] = {}

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 0):
        self.udpPorts[port] = protocol
        return _UDPPort(port)
