"""
Fixtures shared by the WireGuard tests: two or more devices wired together
in memory on one L{Clock}, packets, and keys made by the real tools.

The key pair below was made on this machine with the real tools::

    wg genkey | tee k | wg pubkey

so L{twistvpn.wireguard.keys} is checked against WireGuard's own output.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock

from twistvpn.wireguard import keys
from twistvpn.wireguard.device import WireGuardDevice

# From `wg genkey | tee k | wg pubkey` (wireguard-tools), see the docstring.
WG_PRIVATE_KEY = "ONOlt9Q/yL3ECrbN3GdDMAzGyPykeLoiidIs82DS5FI="
WG_PUBLIC_KEY = "X31ezzyHVW0uZE72cIHMKIXre/6vR8rYBY9VEvUyqTA="
WG_PRIVATE_KEY_2 = "eMCLcr79QVWu3UkmRi7BT2iseF9RA+M9DfzR5zwcEUc="
WG_PUBLIC_KEY_2 = "NHM3GxGN6rBCn6DwLna93E0HKgM8T3RX/endgVV3JVc="
# From `wg genpsk`.
WG_PSK = "+SkH3ZEtjbh55USAec/+AFTHMOpBqse1kc1E8SbG2xw="

WALL_EPOCH = 1_700_000_000.0


def ipv4_packet(src: str, dst: str, payload: bytes = b"ping") -> bytes:
    """A minimal UDP-in-IPv4 packet (checksums are not WireGuard's business)."""
    return (
        struct.pack(
            ">BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(payload),
            0,
            0,
            64,
            17,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
        + payload
    )


def ipv6_packet(src: str, dst: str, payload: bytes = b"ping6") -> bytes:
    """A minimal IPv6 packet with a UDP next header."""
    return (
        struct.pack(
            ">IHBB16s16s",
            6 << 28,
            len(payload),
            17,
            64,
            ipaddress.IPv6Address(src).packed,
            ipaddress.IPv6Address(dst).packed,
        )
        + payload
    )


class Network:
    """
    Devices joined by an in-memory "internet": what one sends to an address
    reaches the device listening there on the next clock turn (so nothing
    re-enters), unless C{drop} says otherwise.  Everything sent is logged.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.devices: dict[Any, WireGuardDevice] = {}
        self.delivered: dict[Any, list[bytes]] = {}
        self.sent: list[tuple[Any, Any, bytes]] = []
        self.drop: Callable[[Any, Any, bytes], bool] = lambda src, dst, data: False
        # the address a device's datagrams appear to come from (for roaming)
        self.source_of: dict[Any, Any] = {}

    def add(
        self, address: Any, private_key: bytes | None = None, seed: int = 0, **kw: Any
    ) -> WireGuardDevice:
        clock = self.clock
        self.delivered[address] = []
        self.source_of[address] = address
        kw.setdefault("random", random.Random(seed or hash(address)).randbytes)
        kw.setdefault("wall_clock", lambda: WALL_EPOCH + clock.seconds())
        device = WireGuardDevice(
            private_key or keys.clamp(random.Random(f"key{address}{seed}").randbytes(32)),
            clock,
            lambda data, endpoint: self._send(address, endpoint, data),
            self.delivered[address].append,
            **kw,
        )
        self.devices[address] = device
        return device

    def _send(self, src: Any, dst: Any, data: bytes) -> None:
        self.sent.append((src, dst, data))
        if self.drop(src, dst, data):
            return
        device = self.devices.get(dst)
        if device is not None:
            self.clock.callLater(0, device.datagram_received, data, self.source_of[src])

    def flush(self) -> None:
        """Deliver everything in flight (and what it provokes) at this instant."""
        self.clock.advance(0)

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """
        Let C{seconds} pass in small steps: L{Clock.advance} runs every due
        call with the clock already at the end, so one big step would let
        timers fire before the replies that should have stopped them.
        """
        steps = int(round(seconds / step))
        self.clock.pump([step] * steps)
        self.clock.advance(seconds - steps * step)

    def sent_types(self, src: Any | None = None) -> list[int]:
        return [data[0] for s, _, data in self.sent if src is None or s == src]


def hold(store: list[bytes], src: Any = None) -> Callable[[Any, Any, bytes], bool]:
    """A C{Network.drop} that keeps back (in C{store}) what C{src} (or anyone) sends."""

    def drop(sender: Any, dst: Any, data: bytes) -> bool:
        if src is None or sender == src:
            store.append(data)
            return True
        return False

    return drop


def pair(
    network: Network | None = None, **kw: Any
) -> tuple[Network, WireGuardDevice, WireGuardDevice]:
    """
    Two devices "a" (10.0.0.1, fd00::1) and "b" (10.0.0.2, fd00::2) that
    know each other; only a knows where b is.
    """
    network = network or Network()
    a = network.add("a", seed=1, **kw)
    b = network.add("b", seed=2, **kw)
    a.add_peer(b.public_key, endpoint="b", allowed_ips=["10.0.0.2/32", "fd00::2/128"])
    b.add_peer(a.public_key, allowed_ips=["10.0.0.1/32", "fd00::1/128"])
    return network, a, b


A_TO_B = ipv4_packet("10.0.0.1", "10.0.0.2", b"from a")
B_TO_A = ipv4_packet("10.0.0.2", "10.0.0.1", b"from b")
