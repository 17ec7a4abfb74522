"""
Every parser of untrusted input, as a fuzz target: the tests feed each a
bounded number of hypothesis-made inputs (C{tests/test_fuzz.py}), the
benchmark many more (C{bench/fuzz.py}).

A target is a name and a function that builds a fresh harness and returns
C{feed(data)}: it hands C{data} to the parser as a peer would, and raises
L{EscapedError} if anything came out that should not have: an exception other
than the parser's own refusal, or a 5xx from an HTTP API.  Errors a parser
logs instead of raising are found by the caller (trial's logged errors, or
the benchmark's log observer).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

Feed = Callable[[bytes], None]


class EscapedError(AssertionError):
    """An input got something out of a parser that it must not."""


@dataclass(frozen=True)
class Target:
    name: str
    build: Callable[[], Feed]
    # The first bytes that reach deeper than random ones (message types).
    prefixes: tuple[bytes, ...] = (b"",)


def _keys() -> tuple[bytes, bytes]:
    from twistvpn.wireguard.keys import generate_private_key, public_key

    private = generate_private_key()
    return private, public_key(private)


def wireguard() -> Feed:
    """Types 1-4 on the node's socket: handshakes, cookie replies, transport data."""
    from twistvpn.wireguard.device import WireGuardDevice

    private, _ = _keys()
    _, peer = _keys()
    device = WireGuardDevice(private, Clock(), lambda data, addr: None, lambda packet: None)
    device.add_peer(peer, endpoint=("203.0.113.2", 51820), allowed_ips=["100.64.0.2/32"])
    return lambda data: device.datagram_received(data, ("203.0.113.2", 51820))


def probes() -> Feed:
    """Authenticated traversal probes and their replies (0xF3, 0xF4)."""
    from twistvpn.node.forwarder import Forwarder
    from twistvpn.traversal.probe import ProbeService

    private, public = _keys()
    forwarder = Forwarder()
    ProbeService(forwarder, MemoryReactorClock(), private, public)
    return lambda data: forwarder.datagramReceived(data, ("203.0.113.2", 51820))


def relay_udp() -> Feed:
    """What any source may send to a relay's UDP port."""
    from twistvpn.relay.policy import MembershipPolicy
    from twistvpn.relay.server import RelayServer

    private, public = _keys()
    server = RelayServer(Clock(), private, public, MembershipPolicy())
    server.attach_udp(lambda data, addr: None)
    return lambda data: server.udp_received(data, ("198.51.100.9", 9))


def relay_tcp() -> Feed:
    """A relay's TLS stream after the handshake: length-prefixed frames."""
    from twistvpn.relay.policy import MembershipPolicy
    from twistvpn.relay.server import RelayServer
    from twistvpn.relay.transport import relay_stream_factory

    private, public = _keys()
    server = RelayServer(Clock(), private, public, MembershipPolicy())
    factory = relay_stream_factory(server)

    def feed(data: bytes) -> None:
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(data)
        protocol.connectionLost(Failure(ConnectionDone()))

    return feed


def relay_client() -> Feed:
    """What a node takes from its relay's address."""
    from twistvpn.node.forwarder import Forwarder
    from twistvpn.relay.client import RelayClient, RelayInfo

    private, _ = _keys()
    _, relay_key = _keys()
    forwarder = Forwarder()
    client = RelayClient(Clock(), forwarder, private, lambda info, receiver: Deferred())
    client.set_relays([RelayInfo("r1", "203.0.113.1", 3478, 443, relay_key)])
    return lambda data: forwarder.datagramReceived(data, ("203.0.113.1", 3478))


def discovery() -> Feed:
    """A rendezvous's discovery port."""
    from twistvpn.rendezvous.controller import Controller
    from twistvpn.rendezvous.discovery import DiscoveryServer, DiscoveryState
    from twistvpn.rendezvous.store import open_store

    private, _ = _keys()
    clock = Clock()
    state = DiscoveryState(Controller(open_store(":memory:"), clock), private, clock)
    server = DiscoveryServer(state, 0, lambda data, addr: None)
    return lambda data: server.datagram_received(data, ("198.51.100.9", 9))


def channel() -> Feed:
    """The control channel's frames, as the rendezvous takes them before a handshake."""
    from OpenSSL import SSL

    from twistvpn.common import tls
    from twistvpn.rendezvous.channel import ChannelError, ChannelState

    cert, key = tls.make_self_signed("rendezvous.test")
    context = tls.server_options(cert, key).getContext()

    def feed(data: bytes) -> None:
        state = ChannelState(SSL.Connection(context, None), False)
        try:
            state.received(data)
        except ChannelError:
            pass

    return feed


def amp_control() -> Feed:
    """AMP boxes on a control connection, from a peer that has not registered."""
    from twistvpn.rendezvous.controller import Controller
    from twistvpn.rendezvous.server import ControlServerFactory
    from twistvpn.rendezvous.store import open_store

    private, _ = _keys()
    clock = Clock()
    factory = ControlServerFactory(Controller(open_store(":memory:"), clock), private, clock)

    def feed(data: bytes) -> None:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(data)
        clock.advance(60)  # its timers: the registration timeout closes it

    return feed


class _Request:
    """What the admin API reads and sets of a twisted.web request, in memory."""

    def __init__(self, body: bytes) -> None:
        self.method = b"POST"
        self.postpath = [b"api", b"v1", b"networks"]
        self.content = io.BytesIO(body)
        self.responseCode: int | None = None
        self.headers: dict[bytes, bytes] = {b"content-length": str(len(body)).encode()}

    def getHeader(self, name: bytes) -> bytes | None:  # noqa: N802 (twisted.web's name)
        return self.headers.get(name.lower())

    def setHeader(self, name: bytes, value: bytes) -> None:  # noqa: N802
        pass

    def setResponseCode(self, code: int) -> None:  # noqa: N802
        self.responseCode = code


def admin_api() -> Feed:
    """Bodies POSTed to the admin API: never a 5xx."""
    from twistvpn.rendezvous.admin import AdminAPI
    from twistvpn.rendezvous.controller import Controller
    from twistvpn.rendezvous.store import open_store

    api = AdminAPI(Controller(open_store(":memory:"), Clock()), None)

    def feed(data: bytes) -> None:
        request: Any = _Request(data)
        answer = api.render(request)
        if (request.responseCode or 200) >= 500:
            raise EscapedError(f"admin API answered {request.responseCode}: {answer[:200]!r}")
        json.loads(answer)

    return feed


def local_api() -> Feed:
    """A line on the node's local API socket."""
    from twistvpn.node.local_api import LocalAPIProtocol

    class Node:
        """Answers what parses (a fuzzer writes a valid request now and then)."""

        def handle(self, request: Any, send: Any) -> Any:
            return {"ok": True, "result": None}

    protocol = LocalAPIProtocol(Node())  # type: ignore[arg-type]

    def feed(data: bytes) -> None:
        protocol.makeConnection(StringTransport())
        protocol.lineReceived(data.replace(b"\n", b" "))

    return feed


def uapi() -> Feed:
    """A request on the node's WireGuard control socket (wg's UAPI)."""
    from twistvpn.node.uapi import UAPIFactory

    factory = UAPIFactory(lambda: "private_key=00\n\n")

    def feed(data: bytes) -> None:
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(data)

    return feed


def wg_quick() -> Feed:
    """A wg-quick file's text."""
    from twistvpn.node.config import ConfigError, parse_config

    def feed(data: bytes) -> None:
        try:
            parse_config(data.decode("utf-8", "replace"), "fuzz.conf")
        except ConfigError as e:
            if "\n" in str(e):
                raise EscapedError(f"a configuration error of more than one line: {e!r}") from e

    return feed


def netmap() -> Feed:
    """Network maps and deltas as a node receives them."""
    from twistvpn.rendezvous.netmap import MapDelta, MapError, NetworkMap

    def feed(data: bytes) -> None:
        for kind in (NetworkMap, MapDelta):
            try:
                kind.from_json(data)
            except MapError:
                pass

    return feed


TARGETS = (
    Target("wireguard", wireguard, (b"\x01\x00\x00\x00", b"\x02\x00\x00\x00",
                                    b"\x03\x00\x00\x00", b"\x04\x00\x00\x00")),
    Target("probes", probes, (b"\xf3", b"\xf4")),
    Target("relay-udp", relay_udp, (b"\xf5\x01", b"\xf5\x10", b"\xf5\x12", b"\xf5\x20",
                                    b"\xf5\x30")),
    Target("relay-tcp", relay_tcp, (b"\x00\x02\xf5", b"\x00\x22\xf5\x10")),
    Target("relay-client", relay_client, (b"\xf5\x02", b"\xf5\x11", b"\xf5\x13", b"\xf5\x14",
                                          b"\xf5\x15", b"\xf5\x21")),
    Target("discovery", discovery, (b"\xf1\x00\x00\x00",)),
    Target("channel", channel, (b"\x16", b"\x17")),
    Target("amp-control", amp_control, (b"\x00\x08_command\x00",)),
    Target("admin-api", admin_api, (b"{", b'{"name": ')),
    Target("local-api", local_api, (b"{", b'{"command": ')),
    Target("uapi", uapi, (b"get=1\n", b"set=1\n")),
    Target("wg-quick", wg_quick, (b"[Interface]\n", b"[Peer]\n")),
    Target("netmap", netmap, (b"{", b'{"network": ')),
)
