"""
The node's one UDP socket.

The forwarder is a thin adapter: it moves datagrams between the socket and
whoever handles their kind (WireGuard for types 1 to 4, twistvpn's own
probe, discovery and relay messages for the others; see L{twistvpn.wire}),
and packets from the TUN device into the WireGuard state.  It holds no
protocol state of its own.
"""

from __future__ import annotations

import collections
import ipaddress
import socket
from collections.abc import Callable
from typing import Any, ClassVar

from twisted.internet import error
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from twistvpn.common.hoplimit import write_hop_limited
from twistvpn.interfaces import IDatagramHandler, IDatagramSender
from twistvpn.wire import WIREGUARD_TYPES

Address = Any  # a (host, port) tuple, or an endpoint object a route knows
# Entries in each address-translation cache before it is emptied.
ADDRESS_CACHE_MAX = 4096


def _unmap(addr: Address) -> Address:
    """
    A dual-stack socket reports IPv4 senders as ::ffff:a.b.c.d with IPv6's
    (host, port); give handlers the plain (a.b.c.d, port) a peer's endpoint
    is configured as, so that both compare equal.
    """
    if type(addr) is tuple and addr and str(addr[0]).startswith("::ffff:"):
        try:
            mapped = ipaddress.IPv6Address(addr[0]).ipv4_mapped
        except ValueError:
            return addr
        if mapped is not None:
            return (str(mapped), addr[1])
    return addr


def _map(addr: tuple) -> tuple:  # type: ignore[type-arg]
    """The form of C{addr} an IPv6 (dual-stack) socket can send to."""
    try:
        ipaddress.IPv4Address(addr[0])
    except ValueError:
        return addr
    return ("::ffff:" + addr[0], addr[1])


def _cache(cache: dict[Any, Any], key: Any, value: Any) -> Any:
    """Remember C{value} for C{key} in a bounded cache; return C{value}."""
    if len(cache) >= ADDRESS_CACHE_MAX:
        cache.clear()
    cache[key] = value
    return value


@implementer(IDatagramSender)
class Forwarder(DatagramProtocol):
    """
    Dispatches each datagram on its first byte; sends for everyone.

    Endpoints that are not (host, port) tuples (a relay path, say) are sent
    through a route registered with L{register_route} for their type.
    """

    noisy = False  # no "Starting protocol/factory" line per connection or port

    log = Logger()

    # The same method as datagramReceived (set below the class, where the
    # compiled build allows it), so that a socket's datagram goes through
    # one Python call here, not two.
    dispatch: ClassVar[Callable[[Forwarder, bytes, Address], None]]

    def __init__(self) -> None:
        # Values provide IDatagramHandler (Any: mypy cannot check zope interfaces).
        self._handlers: dict[int, Any] = {}
        self._routes: dict[type, Callable[[bytes, Any], None]] = {}
        self._wireguard: Any = None
        self.counters: collections.Counter[str] = collections.Counter()
        # Sends straight on the socket (twistvpn.node.fastpath), when wired.
        self._batcher: Any = None
        self._dual_stack = False
        # Address translations are parsed once per address, not per packet.
        self._unmapped: dict[Address, Address] = {}
        self._mapped: dict[tuple, tuple] = {}  # type: ignore[type-arg]

    # -- wiring ---------------------------------------------------------------

    def set_wireguard(self, device: IDatagramHandler) -> None:
        """Hand WireGuard messages (types 1 to 4) to C{device}."""
        self._wireguard = device

    def use_batcher(self, batcher: Any, dual_stack: bool) -> None:
        """
        Send (host, port) datagrams with C{batcher} (a
        L{twistvpn.node.fastpath.DatagramBatcher} on this protocol's socket)
        instead of C{transport.write}; C{dual_stack} when the socket is IPv6
        and needs IPv4 addresses mapped.
        """
        self._batcher = batcher
        self._dual_stack = dual_stack

    def register_handler(self, message_type: int, handler: IDatagramHandler) -> None:
        if message_type in WIREGUARD_TYPES:
            raise ValueError(f"message type {message_type} belongs to WireGuard")
        if not 0 <= message_type <= 255:
            raise ValueError(f"message type {message_type} is not a byte")
        self._handlers[message_type] = handler

    def unregister_handler(self, message_type: int) -> None:
        """Stop dispatching C{message_type}; unknown types are ignored."""
        self._handlers.pop(message_type, None)

    def register_route(self, endpoint_type: type, send: Callable[[bytes, Any], None]) -> None:
        """
        Send datagrams whose endpoint is an instance of C{endpoint_type}
        with C{send(data, endpoint)} instead of the UDP socket.
        """
        self._routes[endpoint_type] = send

    # -- receiving ------------------------------------------------------------

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        """
        Hand C{data} to the handler of its kind, with a dual-stack socket's
        IPv4-mapped sender as plain IPv4.  Also the entry point for
        datagrams that arrive by another path (a relay), as L{dispatch},
        with that path's endpoint as C{addr}, so that roaming follows them
        there (such an endpoint is not a tuple and passes unchanged).
        """
        unmapped = self._unmapped.get(addr)
        if unmapped is None:
            unmapped = _cache(self._unmapped, addr, _unmap(addr))
        if not data:
            self.counters["drop_empty"] += 1
            return
        kind = data[0]
        if kind in WIREGUARD_TYPES:
            handler = self._wireguard
        else:
            handler = self._handlers.get(kind)
        if handler is None:
            self.counters["drop_unknown_type"] += 1
            return
        try:
            handler.datagram_received(data, unmapped)
        except Exception:
            # A handler is not supposed to raise; if one does, the socket
            # must keep working for every other peer.
            self.counters["drop_handler_error"] += 1
            self.log.failure("handler for message type {kind} raised", kind=kind)

    # -- sending --------------------------------------------------------------

    def send_datagram(self, data: bytes, addr: Address) -> None:
        if type(addr) is not tuple:
            route = self._routes.get(type(addr))
            if route is None:
                self.counters["drop_no_route"] += 1
                return
            route(data, addr)
            return
        batcher = self._batcher
        if batcher is not None:
            if self._dual_stack:
                mapped = self._mapped.get(addr)
                addr = _cache(self._mapped, addr, _map(addr)) if mapped is None else mapped
            batcher.send(data, addr)
            return
        transport, addr = self._transport_for(addr)
        if transport is None:
            return
        try:
            transport.write(data, addr)
        except (OSError, error.MessageLengthError, error.InvalidAddressError):
            # ENETUNREACH, EPERM from a firewall, a full buffer: the packet
            # is lost as it would be on the wire; WireGuard retransmits.
            self.counters["drop_send_error"] += 1

    def _transport_for(self, addr: Address) -> tuple[Any, Address]:
        """
        The transport (None, counted, when not listening) and C{addr} as it
        takes it: IPv4 mapped on a dual-stack socket.  Where no batcher is.
        """
        transport: Any = self.transport
        if transport is None:
            self.counters["drop_not_listening"] += 1
        elif getattr(transport, "addressFamily", None) == socket.AF_INET6:
            addr = _map(addr)
        return transport, addr

    def send_hop_limited(self, data: bytes, addr: Address, hops: int) -> None:
        if type(addr) is not tuple:
            # A relay's endpoint: no NAT of ours on that path to open.
            self.counters["hop_limit_unsupported"] += 1
            self.send_datagram(data, addr)
            return
        self.counters["hop_limited_sent"] += 1
        try:
            batcher = self._batcher
            if batcher is not None:
                batcher.send_hop_limited(data, _map(addr) if self._dual_stack else addr, hops)
                return
            transport, addr = self._transport_for(addr)
            if transport is None:
                return
            if not write_hop_limited(transport, data, addr, hops):
                self.counters["hop_limit_unsupported"] += 1
        except (OSError, error.MessageLengthError, error.InvalidAddressError):
            self.counters["drop_send_error"] += 1


Forwarder.dispatch = Forwarder.datagramReceived
