"""
The relay as Twisted services: its UDP socket, its TLS listener, its
housekeeping and, standalone, its admin page.  Both ways of running it use
L{relay_services}: C{twistd twistvpn-relay} (L{twistvpn.relay.relay_tap})
and the rendezvous, which embeds one with L{embedded_relay}.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet.endpoints import serverFromString
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import resource
from twisted.web import server as web_server
from zope.interface import implementer

from twistvpn.common import tls
from twistvpn.common.metrics import Family, MetricsResource
from twistvpn.common.services import DatagramListenService, StartStopService, StreamListener, quiet
from twistvpn.interfaces import IRendezvousRelays
from twistvpn.relay.client import RelayInfo
from twistvpn.relay.link import RelayLinkService, relay_link_server_factory
from twistvpn.relay.policy import ControllerMembership
from twistvpn.relay.server import RelayLimits, RelayServer
from twistvpn.relay.transport import RelayDatagramProtocol, relay_stream_factory
from twistvpn.wireguard import keys


def relay_services(reactor: Any, server: RelayServer, udp_port: int, tcp: str,
                   tls_options: Any, udp_interface: str = "") -> service.MultiService:
    """
    The relay's sockets: UDP on C{udp_port}, TLS on the server endpoint
    C{tcp} ("tcp:443"), both feeding C{server}.
    """
    top = service.MultiService()
    StartStopService(server).setServiceParent(top)
    udp = DatagramListenService(reactor, udp_port, RelayDatagramProtocol(server), udp_interface)
    udp.setName("udp")
    udp.setServiceParent(top)
    stream = StreamListener(
        serverFromString(reactor, tcp),
        TLSMemoryBIOFactory(tls_options, False, relay_stream_factory(server)),
    )
    stream.setName("tcp")
    stream.setServiceParent(top)
    return top


# -- keys and certificates in a data directory --------------------------------------


def load_or_create_tls(data_dir: str, hostname: str) -> tuple[bytes, bytes]:
    """A self-signed certificate and key in C{data_dir}, made on first start."""
    return tls.load_or_create_self_signed(os.path.join(data_dir, "relay-tls.crt"),
                                          os.path.join(data_dir, "relay-tls.key"), hostname)


# -- the admin page (standalone) -----------------------------------------------------


class StatsResource(resource.Resource):
    """GET /stats: the relay's counters as JSON."""

    isLeaf = True

    def __init__(self, relay: RelayServer,
                 extra: Callable[[], dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.relay = relay
        self.extra = extra

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        stats = self.relay.stats()
        if self.extra is not None:
            stats.update(self.extra())
        return json.dumps(stats, indent=1).encode() + b"\n"


def admin_site(server: RelayServer,
               extra: Callable[[], dict[str, Any]] | None = None) -> web_server.Site:
    """The standalone relay's admin page; C{extra} adds facts (the link's state)."""
    root = resource.Resource()
    root.putChild(b"stats", StatsResource(server, extra))
    root.putChild(b"metrics", MetricsResource(server.metrics))
    return quiet(web_server.Site(root))


# -- embedding in the rendezvous -------------------------------------------------


def bound_info(services: service.MultiService, relay_id: str, host: str, public_key: bytes,
               fingerprint: str, udp_port: int = 0, tcp_port: int = 0) -> RelayInfo:
    """
    The map entry of the relay whose sockets are C{services} (from
    L{relay_services}), with the ports they are bound to (the requested
    ones until they listen).
    """
    ports = []
    for name, requested in (("udp", udp_port), ("tcp", tcp_port)):
        port = services.getServiceNamed(name).port  # type: ignore[attr-defined]
        ports.append(port.getHost().port if port is not None else requested)
    return RelayInfo(relay_id, host, ports[0], ports[1], public_key, fingerprint)


@dataclass
class EmbeddedRelay:
    """What the rendezvous holds of the relay it embeds."""

    service: service.MultiService  # hang on the rendezvous's MultiService
    server: RelayServer  # server.stats() for the admin API
    membership: ControllerMembership  # told of every change by the controller
    host: str
    udp_port: int
    tcp_port: int
    fingerprint: str

    @property
    def info(self) -> RelayInfo:
        """Its entry for network maps (C{info.to_map()})."""
        return bound_info(self.service, self.server.relay_id, self.host, self.server.public_key,
                          self.fingerprint, self.udp_port, self.tcp_port)


def embedded_relay(reactor: Any, controller: Any, private_key: bytes, cert_pem: bytes,
                   key_pem: bytes, host: str, udp_port: int = 443, tcp_port: int = 443,
                   interface: str = "", limits: RelayLimits | None = None,
                   relay_id: str = "embedded",
                   membership: ControllerMembership | None = None) -> EmbeddedRelay:
    """
    A relay inside the rendezvous, using its X25519 key and TLS certificate,
    told who may talk to whom by its controller in process (of every change
    as it is made).  C{host} is the IP address nodes reach
    it at (the rendezvous's public address).
    """
    own_membership = membership is None
    if membership is None:
        membership = ControllerMembership(controller)
    relay = RelayServer(reactor, private_key, keys.public_key(private_key), membership.policy,
                        limits, relay_id=relay_id)
    tcp = f"tcp:{tcp_port}" + (f":interface={interface}" if interface else "")
    services = relay_services(reactor, relay, udp_port, tcp, tls.server_options(cert_pem, key_pem),
                              udp_interface=interface)
    if own_membership:
        StartStopService(membership).setServiceParent(services)
    return EmbeddedRelay(services, relay, membership, host, udp_port, tcp_port,
                         tls.fingerprint(cert_pem).hex())


class _Advertiser:
    """Keeps C{controller.relays} (what network maps list) current."""

    def __init__(self, controller: Any, embedded: EmbeddedRelay | None) -> None:
        self.controller = controller
        self.embedded = embedded
        self.linked: tuple[dict[str, Any], ...] = ()

    def update(self, linked: tuple[dict[str, Any], ...] | None = None) -> None:
        if linked is not None:
            self.linked = linked
        own = (self.embedded.info.to_map(),) if self.embedded is not None else ()
        self.controller.relays = own + self.linked

    def start(self) -> None:
        self.update()  # the embedded relay's ports are bound by now

    def stop(self) -> None:
        pass


# -- everything the rendezvous hosts for relays ------------------------------------------


@implementer(IRendezvousRelays)
@dataclass
class RendezvousRelays:
    """The relays a rendezvous serves: its own, and the standalone ones' link."""

    membership: ControllerMembership
    embedded: EmbeddedRelay | None
    link: RelayLinkService | None
    link_listener: StreamListener | None

    def stats(self) -> dict[str, Any]:
        """For the admin API: the embedded relay's counters, the linked relays."""
        return {
            "embedded": self.embedded.server.stats() if self.embedded is not None else None,
            "standalone": list(self.link.relays()) if self.link is not None else [],
        }

    def metrics(self) -> list[Family]:
        return self.embedded.server.metrics() if self.embedded is not None else []


def attach_relays(parent: service.MultiService, reactor: Any, controller: Any,
                  server_private: bytes, cert_pem: bytes, key_pem: bytes,
                  host: str | None, *, embedded: bool = True, udp_port: int = 443,
                  tcp_port: int = 443, interface: str = "", link: str | None = None,
                  relay_keys: Iterable[bytes] = (),
                  limits: RelayLimits | None = None) -> RendezvousRelays:
    """
    Hang the rendezvous's relay services on C{parent}: the embedded relay
    (unless C{embedded} is False, C{--no-relay}) at C{host}, an IP address
    (its sockets bound to C{interface}, default all),
    and, when C{link} is a server endpoint, the link standalone relays whose
    keys are in C{relay_keys} log in to (TLS with the rendezvous's own
    certificate, so its C{twistvpn://} fingerprint is theirs too).  Keeps
    C{controller.relays}, which network maps carry, up to date.
    """
    membership = ControllerMembership(controller)
    StartStopService(membership).setServiceParent(parent)
    mine: EmbeddedRelay | None = None
    if embedded:
        if host is None:
            raise ValueError("the embedded relay needs the IP address nodes reach it at")
        mine = embedded_relay(reactor, controller, server_private, cert_pem, key_pem, host,
                              udp_port, tcp_port, interface, limits=limits, membership=membership)
        mine.service.setServiceParent(parent)
    advertiser = _Advertiser(controller, mine)
    advertiser.update()
    link_service: RelayLinkService | None = None
    listener: StreamListener | None = None
    if link is not None:
        authorized = frozenset(relay_keys)
        link_service = RelayLinkService(server_private, keys.public_key(server_private),
                                        membership.policy, authorized.__contains__,
                                        advertiser.update)
        listener = StreamListener(
            serverFromString(reactor, link),
            TLSMemoryBIOFactory(tls.server_options(cert_pem, key_pem), False,
                                relay_link_server_factory(link_service, reactor)),
        )
        listener.setName("relay-link")
        listener.setServiceParent(parent)
    StartStopService(advertiser).setServiceParent(parent)
    return RendezvousRelays(membership, mine, link_service, listener)
