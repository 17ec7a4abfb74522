"""
An in-memory TUN device for tests: what the node's services and the joined
node do to their interface, without root or a kernel.
"""

from __future__ import annotations

from collections.abc import Iterable

from zope.interface import implementer

from twistvpn.interfaces import ITunDevice
from twistvpn.node.tun import (
    DEFAULT_MTU,
    DEFAULT_NAME,
    Receiver,
    TunBase,
    parse_interface_address,
)


@implementer(ITunDevice)
class FakeTunDevice(TunBase):
    """
    An in-memory TUN device.  Packets the "kernel" sends into the device are
    injected with L{inject}; packets written to the kernel collect in
    L{written}.
    """

    def __init__(self, name: str = DEFAULT_NAME, mtu: int = DEFAULT_MTU) -> None:
        super().__init__(name, mtu)
        self.written: list[bytes] = []
        self.up = False
        self.closed = False

    def start_reading(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def stop_reading(self) -> None:
        self._receiver = None

    def inject(self, packet: bytes) -> None:
        """Pretend the kernel routed C{packet} into the device."""
        if self.closed:
            raise RuntimeError("device is closed")
        self._deliver(packet)

    def write(self, packet: bytes) -> None:
        if self.closed:
            self.counters["drop_closed"] += 1
            return
        self.counters["tx_packets"] += 1
        self.written.append(packet)

    def set_addresses(self, addresses: Iterable[str]) -> None:
        self.addresses = tuple(str(parse_interface_address(a)) for a in addresses)
        self.up = True

    # The IPv4 or IPv6 part alone (a joined node has both), for tests.
    @property
    def routes4(self) -> list[str]:
        return [r for r in self.routes if ":" not in r]

    @property
    def routes6(self) -> list[str]:
        return [r for r in self.routes if ":" in r]

    @property
    def addresses4(self) -> tuple[str, ...]:
        return tuple(a for a in self.addresses if ":" not in a)

    @property
    def addresses6(self) -> tuple[str, ...]:
        return tuple(a for a in self.addresses if ":" in a)

    def add_route(self, cidr: str, source: str | None = None) -> None:
        route = self._normalise_route(cidr)
        self.sources[route] = source
        if route not in self.routes:
            self.routes.append(route)

    def remove_route(self, cidr: str) -> None:
        route = self._normalise_route(cidr)
        self.sources.pop(route, None)
        if route in self.routes:
            self.routes.remove(route)

    def close(self) -> None:
        self._receiver = None
        self.routes = []
        self.sources = {}
        self.addresses = ()
        self.up = False
        self.closed = True
