"""
Joined mode: a node whose peers, addresses and routes come from a rendezvous.

L{JoinedNode} is the rendezvous client's L{IRendezvousListener}.  On every
network map it works out what the node should look like (its managed
addresses, the networks' routes, one WireGuard peer per member, keyed by
public key across all joined networks) and changes the TUN device and the
WireGuard state to match, live.  Each peer gets a traversal
L{PathManager}, which moves the peer's endpoint between LAN, direct and
relay paths.  Endpoint discovery runs from the node's one UDP socket, so
the endpoint the rendezvous sees is the mapping WireGuard's packets use, and
re-runs periodically to keep that mapping open.

In a big network (more than C{eager_peers} peers) peers are made lazily,
as Tailscale's lazy WireGuard configuration and ZeroTier do: the node keeps
every member's map entry but makes a member's WireGuard peer and path
manager only when traffic needs it (a packet to its address, its handshake
or probe, a punch the rendezvous arranges, C{twistvpn ping}), and retires
it after C{lazy_idle} seconds without traffic.  So a node in a network of
10,000 probes and keeps alive the few paths it uses, not 9,999.

Everything is injected (clock, TUN, device, forwarder, probe service, relay
client, interface enumeration, discovery), so the whole node runs on the
simulated NAT network in tests.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from zope.interface import implementer

from twistvpn.common.metrics import Family
from twistvpn.interfaces import (
    IDatagramHandler,
    INameService,
    IPeerDemand,
    IRendezvousListener,
)
from twistvpn.node.devicepath import DevicePath
from twistvpn.node.names import NameTable, name_table, network_domain
from twistvpn.relay.client import RelayInfo
from twistvpn.rendezvous.discovery import NetcheckResult
from twistvpn.rendezvous.netmap import (
    MapError,
    Member,
    NetworkMap,
    Punch,
    format_endpoint,
    overlay6,
    parse_endpoint,
)
from twistvpn.traversal.candidates import (
    Candidates,
    NatHints,
    describe,
    hints_from_observations,
    preserved_mapping,
)
from twistvpn.traversal.manager import DIRECT, LAN, NONE, PathConfig, PathManager
from twistvpn.traversal.probe import address_of, peer_id
from twistvpn.wire import DISCOVERY_RESPONSE
from twistvpn.wireguard.keys import encode_key

Address = tuple[str, int]
# Re-run discovery this often: keeps the NAT mapping towards the rendezvous
# (and so the endpoint peers punch to) open, and notices a new mapping.
DISCOVERY_INTERVAL = 20.0
PING_TAG = "ping"
# Up to this many peers, every member's peer and path are made at once (a
# first packet finds its path ready); beyond, peers are made lazily.
EAGER_PEERS = 100
# A lazily made peer with no traffic for this long is retired.
LAZY_IDLE = 300.0


def host_addresses(exclude: Iterable[str] = ()) -> list[str]:
    """
    This host's unicast interface addresses (pyroute2), IPv4 then IPv6,
    loopback and link-local left out, and those on the interfaces named in
    C{exclude} (our own TUN device) too.
    """
    from pyroute2 import IPRoute

    excluded = set(exclude)
    found: list[str] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for family in (socket.AF_INET, socket.AF_INET6):
            for addr in ipr.get_addr(family=family):
                if names.get(addr["index"]) in excluded:
                    continue
                ip = addr.get_attr("IFA_ADDRESS")
                if ip is None:
                    continue
                parsed = ipaddress.ip_address(ip)
                if parsed.is_loopback or parsed.is_link_local or parsed.is_multicast:
                    continue
                found.append(str(parsed))
    return found


def is_public_ipv6(address: Address) -> bool:
    """
    An IPv6 address any peer may reach: no NAT stands in front of it (a
    firewall may, and is punched as IPv4's NATs are).  Unique local
    (fc00::/7) and link-local ones are LAN addresses.
    """
    try:
        ip = ipaddress.ip_address(address[0])
    except ValueError:
        return False
    return (ip.version == 6 and not ip.is_link_local and not ip.is_loopback
            and ip not in _ULA)


_ULA = ipaddress.IPv6Network("fc00::/7")


@implementer(IDatagramHandler)
class DiscoveryResponses:
    """
    Discovery answers to the client that asked: the IPv4 one (both ports of
    the rendezvous's address) or the IPv6 one.  The forwarder has one
    handler per message type; a source no client asked is dropped, counted.
    """

    def __init__(self) -> None:
        self.clients: list[Any] = []
        self.dropped = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        source = (addr[0], addr[1])
        for client in self.clients:
            if source in client.servers:
                client.datagram_received(data, addr)
                return
        self.dropped += 1


def member_candidates(member: Member) -> Candidates:
    """
    A peer's candidates from its map entry.  The map lists the distinct
    mappings the two discovery ports saw; one entry and no C{nat_varies}
    means both saw the same (endpoint-independent mapping).  Its global IPv6
    addresses are public candidates too, after the observed IPv4 one.
    """
    observed = [_parse(e) for e in member.endpoints]
    local = tuple(a for a in (_parse(e) for e in member.local_endpoints) if a is not None)
    seen = [a for a in observed if a is not None]
    public6 = tuple(a for a in local if is_public_ipv6(a))
    mapped = tuple(a for a in (_parse(e) for e in member.mapped) if a is not None)
    if mapped:
        # Its gateway forwards these to it: one address for every peer, as
        # behind an endpoint-independent NAT, whatever its NAT does otherwise.
        return Candidates(public=tuple(dict.fromkeys(mapped + tuple(seen) + public6)),
                          local=local, hints=NatHints(mapping_varies=False))
    if not seen:
        return Candidates(public=public6, local=local, hints=NatHints(mapping_varies=None))
    observations = seen if member.nat_varies else [seen[0], seen[0]]
    reference = _reference(seen[0], local)
    # Where a neighbour took its port towards one server, the mapping that
    # kept it is the one fresh destinations get.
    public = preserved_mapping(reference, observations) or seen[0]
    return Candidates(public=(public, *public6), local=local,
                      hints=hints_from_observations(reference, observations))


def own_candidates(result: NetcheckResult | None, local: Sequence[Address],
                   mapped: Address | None = None) -> Candidates:
    """This node's candidates from its own discovery result, interfaces and port mapping."""
    if mapped is not None:
        observed = (result.endpoint,) if result is not None and result.endpoint else ()
        return Candidates(public=tuple(dict.fromkeys((mapped, *observed))), local=tuple(local),
                          hints=NatHints(mapping_varies=False))
    public6 = tuple(a for a in local if is_public_ipv6(a))
    if result is None:
        return Candidates(public=public6, local=tuple(local),
                          hints=NatHints(mapping_varies=None))
    local4 = [a for a in local if ":" not in a[0]]
    reference = _reference(result.endpoint, local4) if result.endpoint else _first(local4)
    hints = hints_from_observations(reference, list(result.mapped))
    endpoint = preserved_mapping(reference, list(result.mapped)) or result.endpoint
    public = (endpoint,) if endpoint is not None else ()
    return Candidates(public=public + public6, local=tuple(local), hints=hints)


def _parse(text: str) -> Address | None:
    try:
        return parse_endpoint(text)
    except MapError:
        return None


def _first(local: Sequence[Address]) -> Address:
    return local[0] if local else ("0.0.0.0", 0)


def _reference(observed: Address, local: Sequence[Address]) -> Address:
    """The local address to compare observations with: no NAT if one matches."""
    return observed if observed in local else _first(local)


# Punch requests the rendezvous could not arrange are made again after 1, 2,
# 4, 8, 8... s, at most this many times in a row.
MAX_LOCAL_ENDPOINTS = 8  # what a map entry carries (netmap.MAX_ENDPOINTS)
REAPPLY_AFTER = 1.0  # seconds before the interface is configured again after a failure
PUNCH_RETRY_FIRST = 1.0
PUNCH_RETRY_MAX = 8.0
PUNCH_RETRIES = 8


def _is_device(members: dict[str, Member]) -> bool:
    """Whether a peer's map entries say it is a stock WireGuard app."""
    return any(m.device for m in members.values())


def _cancel(peer: JoinedPeer) -> None:
    if peer.punch_retry is not None and peer.punch_retry.active():
        peer.punch_retry.cancel()
    peer.punch_retry = None


def member_ips(members: dict[str, Member]) -> list[str]:
    """A peer's IPv4 overlay addresses, one per network it shares with us."""
    return sorted({m.ip for m in members.values()}, key=ipaddress.IPv4Address)


def member_ips6(members: dict[str, Member]) -> list[str]:
    """Its IPv6 overlay addresses, derived from each network's ID and its node ID."""
    return sorted({overlay6(network_id, m.node_id) for network_id, m in members.items()},
                  key=ipaddress.IPv6Address)


def allowed_ips(members: dict[str, Member]) -> list[str]:
    """What the peer's WireGuard AllowedIPs hold: every overlay address, both families."""
    return ([f"{ip}/32" for ip in member_ips(members)]
            + [f"{ip}/128" for ip in member_ips6(members)])


@dataclass
class JoinedPeer:
    """One WireGuard peer and the network members it stands for."""

    public_key: bytes
    wg: Any  # IWireGuardPeer
    manager: Any  # IPathManager: a PathManager, or a DevicePath for a device
    members: dict[str, Member] = field(default_factory=dict)  # network ID -> entry
    reported: tuple[str, Any] = (NONE, None)  # last (kind, endpoint) logged
    punch_failures: int = 0  # punch requests the rendezvous could not arrange, in a row
    punch_retry: Any = None  # IDelayedCall of the next request

    @property
    def name(self) -> str:
        return next(iter(self.members.values())).name if self.members else "?"

    @property
    def ips(self) -> list[str]:
        return member_ips(self.members)

    @property
    def ips6(self) -> list[str]:
        return member_ips6(self.members)

    @property
    def allowed_ips(self) -> list[str]:
        return allowed_ips(self.members)

    @property
    def member(self) -> Member:
        """The entry with the most to say (online, most endpoints) first."""
        return _best(self.members)

    @property
    def device(self) -> bool:
        """A stock WireGuard app: reached through the relay only (docs/devices.md)."""
        return _is_device(self.members)


class PeerNotFoundError(KeyError):
    """No peer matches the name, address, node ID or key given."""

    def __str__(self) -> str:
        return str(self.args[0])


@implementer(IRendezvousListener, IPeerDemand)
class JoinedNode:
    """The node's state as the rendezvous describes it, applied live."""

    log = Logger()

    def __init__(self, clock: Any, public_key: bytes, *,
                 forwarder: Any, device: Any, tun: Any, probes: Any,
                 relay: Any = None, listen_port: Callable[[], int | None],
                 local_addresses: Callable[[], list[str]] = list,
                 make_discovery: Callable[[bytes, list[Address], bytes], Any] | None = None,
                 discovery_host: str | None = None,
                 discovery_hosts: Sequence[str] = (),
                 discovery_interval: float = DISCOVERY_INTERVAL,
                 strategies: Sequence[Any] | None = None,
                 path_config: PathConfig | None = None,
                 rng: random.Random | None = None,
                 on_join_status: Callable[[str, str], object] | None = None,
                 names: INameService | None = None,
                 eager_peers: int = EAGER_PEERS,
                 lazy_idle: float = LAZY_IDLE) -> None:
        self.clock = clock
        self.on_join_status = on_join_status
        self.mapped: Address | None = None  # what our gateway forwards to us
        self.port_mapper: Any = None  # its PortMapper, for netcheck
        self.names = names  # the name server, told of every change
        self.name_table = NameTable()
        self.public_key = public_key
        self.forwarder = forwarder
        self.device = device
        self.tun = tun
        self.probes = probes
        self.relay = relay
        self._listen_port = listen_port
        self._local_addresses = local_addresses
        self._make_discovery = make_discovery
        # Every rendezvous instance's address (the one the client is
        # connected to answers discovery); none of them is routed into the tunnel.
        self.discovery_hosts = tuple(discovery_hosts) or (
            (discovery_host,) if discovery_host is not None else ())
        self.discovery_host = self.discovery_hosts[0] if self.discovery_hosts else None
        self.discovery_interval = discovery_interval
        self.strategies = strategies
        self.path_config = path_config
        self.random = rng if rng is not None else random.Random()
        self.client: Any = None  # the RendezvousClient, set by attach()
        self.node_id: str | None = None
        self.rendezvous_up = False
        self.join_answers: dict[str, str] = {}  # network ID -> last answer
        # network ID -> why its subnet is not routed (it covers our underlay)
        self.refused_routes: dict[str, str] = {}
        self.peers: dict[bytes, JoinedPeer] = {}
        # public key -> its map entries (network ID -> Member): every peer we
        # may have, made or not (lazy).
        self.members: dict[bytes, dict[str, Member]] = {}
        self.eager_peers = eager_peers
        self.lazy_idle = lazy_idle
        # Look-ups for lazy peers, made when first needed after a change:
        # overlay address (packed) -> key; probe sender ID -> key.
        self._by_address: dict[bytes, bytes] | None = None
        self._by_probe_id: dict[bytes, bytes] | None = None
        self._probe_ids: dict[bytes, bytes] = {}  # key -> its probe ID (kept: BLAKE2s each)
        # key -> (rx + tx bytes, when that last changed), for retiring lazy peers
        self._traffic: dict[bytes, tuple[int, float]] = {}
        self._retirer: LoopingCall | None = None
        self.addresses: tuple[str, ...] = ()
        self.routes: list[str] = []
        self.route_sources: dict[str, str] = {}
        self.relay_infos: tuple[RelayInfo, ...] = ()
        self.discovery: Any = None
        self.discovery6: Any = None  # over IPv6, when the rendezvous answers there
        self.public6: Address | None = None  # what it saw of us over IPv6
        self._responses = DiscoveryResponses()
        self._discovery_for: tuple[list[Address], bytes, bytes] | None = None
        self.netcheck_result: NetcheckResult | None = None
        self.local = own_candidates(None, self.local_candidates())
        self._stopped = False
        self._reapply: Any = None

    def attach(self, client: Any) -> None:
        """The L{RendezvousClient} whose news this node follows."""
        self.client = client

    @property
    def maps(self) -> dict[str, NetworkMap]:
        """
        The maps of the networks this node is an authorized member of: the
        client's copies (it keeps the one copy, the base of the next delta).
        """
        if self.client is None:
            return {}
        return {network_id: netmap for network_id, netmap in self.client.maps.items()
                if netmap.member(self.public_key) is not None}

    # -- this node's own addresses ---------------------------------------------

    def local_candidates(self) -> list[Address]:
        """(LAN address, our port) for every interface address but the overlay's."""
        port = self._listen_port()
        if not port:
            return []
        overlay = [net for m in self.maps.values()
                   for net in (ipaddress.IPv4Network(m.subnet), ipaddress.IPv6Network(m.subnet6))]
        found = []
        for ip in self._local_addresses():
            address = ipaddress.ip_address(ip)
            if not any(address.version == net.version and address in net for net in overlay):
                found.append((ip, port))
        if self.public6 is not None and self.public6 not in found:
            found.insert(0, self.public6)  # behind NAT66 or a prefix translator, not ours
        return found[:MAX_LOCAL_ENDPOINTS]

    def local_endpoints(self) -> list[str]:
        """The "host:port" LAN endpoints told to the rendezvous."""
        return [format_endpoint(a) for a in self.local_candidates()]

    # -- IRendezvousListener ---------------------------------------------------

    def connected(self, node_id: str) -> None:
        self.node_id = node_id
        self.rendezvous_up = True
        if self.client is not None and self.client.current < len(self.discovery_hosts):
            self.discovery_host = self.discovery_hosts[self.client.current]
        self.log.info("registered with the rendezvous {where} as node {node}",
                      where=self.client.where if self.client is not None else "",
                      node=node_id)
        self._start_discovery()
        # Back after an outage: pairs that fell back to the relay meanwhile
        # (a NAT that moved) go direct again, now rather than at the next change.
        for peer in list(self.peers.values()):
            peer.punch_failures = 0
            self._punch_together(peer)

    def disconnected(self, reason: str) -> None:
        self.rendezvous_up = False
        if self._stopped:
            return
        self.log.info(
            "rendezvous connection lost ({reason}); reconnecting, {n} peer(s) stay up",
            reason=reason, n=len(self.peers))

    def join_status(self, network_id: str, status: str) -> None:
        before = self.join_answers.get(network_id)
        self.join_answers[network_id] = status
        if self.on_join_status is not None:
            self.on_join_status(network_id, status)
        if status == before:
            return  # said once: a reconnection repeats every join
        if status == "pending":
            self.log.info(
                "node {node} is waiting for authorization in network {network}",
                node=self.node_id, network=network_id)
        elif status == "authorized":
            self.log.info("node {node} is authorized in network {network}",
                          node=self.node_id, network=network_id)

    def forget(self, network_id: str) -> None:
        """A network left: its peers, routes and address go now."""
        self.join_answers.pop(network_id, None)
        self.refused_routes.pop(network_id, None)
        self._apply()

    def map_received(self, network_id: str, netmap: NetworkMap) -> None:
        # A map without us in it (no longer a member) is left out of maps.
        if netmap.member(self.public_key) is not None:
            self.join_answers[network_id] = "authorized"
        self._apply()

    def punch_requested(self, network_id: str, punch: Punch) -> None:
        # A peer that wants to reach us: made now if it is a lazy member.
        if not self._demand(punch.peer_key, punch=False):
            return
        self.clock.callLater(max(0.0, punch.delay), self._punch, punch.peer_key)

    def _punch(self, peer_key: bytes) -> None:
        peer = self.peers.get(peer_key)
        if peer is not None and not self._stopped:
            peer.manager.punch_now()

    def revoked(self, network_id: str, reason: str) -> None:
        # Deauthorized: still joined, an admin may authorize it again.
        self.join_answers[network_id] = reason
        self.log.warn(
            "node {node} is no longer a member of network {network} ({reason}); "
            "its peers and routes are removed", node=self.node_id, network=network_id,
            reason=reason)
        self._apply()  # the client dropped the network's map: its peers and routes go

    # -- applying the maps -----------------------------------------------------

    def _apply(self) -> None:
        if self._stopped:
            return
        maps = self.maps  # derived from the client's copies: once per change
        self._apply_relays(maps)
        try:
            self._apply_interface(maps)
        except Exception:
            # The kernel refused an address or route (netlink): say so, keep
            # the peers and the rest of the node going, and try again soon.
            self.log.failure("configuring {name} failed", name=self.tun.name)
            if self._reapply is None or not self._reapply.active():
                self._reapply = self.clock.callLater(REAPPLY_AFTER, self._apply)
        wanted: dict[bytes, dict[str, Member]] = {}
        for network_id, netmap in maps.items():
            for member in netmap.peers(self.public_key):
                wanted.setdefault(member.public_key, {})[network_id] = member
        self.members = wanted
        self._by_address = self._by_probe_id = None
        lazy = self.lazy
        for key in [k for k in self.peers if k not in wanted]:
            self._remove_peer(key)
        for key, members in wanted.items():
            peer = self.peers.get(key)
            if peer is None:
                if not lazy or _is_device(members):  # a device's relay session waits for it
                    self._add_peer(key, members)
            else:
                self._update_peer(peer, members)
        self.name_table = name_table(maps)
        if self.names is not None:
            try:
                self.names.update(self.name_table, self.addresses)
            except Exception:
                self.log.failure("updating the name server failed")

    # -- lazy peers (IPeerDemand) -------------------------------------------------

    @property
    def lazy(self) -> bool:
        """Whether peers are made when traffic needs them (a big network)."""
        return len(self.members) > self.eager_peers

    def peer_for_address(self, destination: bytes) -> bool:
        if self._by_address is None:
            index: dict[bytes, bytes] = {}
            for key, members in self.members.items():
                for network_id, m in members.items():
                    index[ipaddress.IPv4Address(m.ip).packed] = key
                    index[ipaddress.IPv6Address(overlay6(network_id, m.node_id)).packed] = key
            self._by_address = index
        found = self._by_address.get(bytes(destination))
        return found is not None and self._demand(found, punch=True)

    def peer_for_key(self, public_key: bytes) -> bool:
        return self._demand(public_key, punch=False)

    def key_for_probe_id(self, sender_id: bytes) -> bytes | None:
        if self._by_probe_id is None:
            ids = self._probe_ids
            for key in [k for k in ids if k not in self.members]:
                del ids[key]
            for key in self.members:
                if key not in ids:
                    ids[key] = peer_id(key)
            self._by_probe_id = {probe: key for key, probe in ids.items()}
        return self._by_probe_id.get(bytes(sender_id))

    def _demand(self, key: bytes, punch: bool) -> bool:
        """
        Make C{key}'s peer now, if it is a member.  C{punch}: we want to
        reach it (a packet of ours), and it may not know yet, so we have the
        rendezvous start both sides whichever key is lower.
        """
        if key in self.peers:
            return True
        members = self.members.get(key)
        if members is None or self._stopped:
            return False
        self._add_peer(key, members, punch=punch)
        return True

    def _retire_idle(self) -> None:
        """Retire lazily made peers that carried no traffic for lazy_idle seconds."""
        if not self.lazy:
            self._traffic.clear()
            return
        now = self.clock.seconds()
        for key, peer in list(self.peers.items()):
            if peer.device:
                continue
            total = peer.wg.rx_bytes + peer.wg.tx_bytes
            seen = self._traffic.get(key)
            if seen is None or seen[0] != total:
                self._traffic[key] = (total, now)
            elif now - seen[1] >= self.lazy_idle:
                self._remove_peer(key)
                self.log.info("peer {name} retired after {idle:.0f} s without traffic",
                              name=peer.name, idle=now - seen[1])
        for key in [k for k in self._traffic if k not in self.peers]:
            del self._traffic[key]

    def underlay(self) -> list[tuple[str, str]]:
        """(address, what it is) of everything the tunnel must not take over."""
        found = [(ip, "this host's address") for ip in self._local_addresses()]
        found += [(host, "the rendezvous") for host in dict.fromkeys(self.discovery_hosts)]
        return found + [(info.host, f"relay {info.relay_id}") for info in self.relay_infos]

    @staticmethod
    def underlay_conflict(subnet: str, underlay: list[tuple[str, str]]) -> str | None:
        """
        Why routing C{subnet} through the tunnel would cut this node off
        (it covers one of the C{underlay} addresses), or None.  A network's
        subnet is the rendezvous's to choose; whether it may take over our
        routing is ours.
        """
        net = ipaddress.ip_network(subnet, strict=False)
        for ip, what in underlay:
            try:
                covered = ipaddress.ip_address(ip) in net
            except ValueError:
                continue
            if covered:
                return f"{subnet} covers {what} {ip}"
        return None

    def _apply_interface(self, maps: dict[str, NetworkMap]) -> None:
        addresses, routes = [], []
        refused: dict[str, str] = {}
        underlay = self.underlay()  # one look at the host's addresses (netlink)
        for network_id, netmap in maps.items():
            me = netmap.member(self.public_key)
            assert me is not None
            conflict = self.underlay_conflict(netmap.subnet, underlay)
            if conflict is not None:
                refused[network_id] = conflict
                if self.refused_routes.get(network_id) != conflict:
                    self.log.warn("network {network}: not routing {conflict}; its peers stay "
                                  "unreachable", network=network_id, conflict=conflict)
                continue
            addresses.append(f"{me.ip}/32")
            routes.append((netmap.subnet, me.ip))
            # And IPv6, in the network's ULA prefix, beside it.
            addresses.append(f"{netmap.ip6(me)}/128")
            routes.append((netmap.subnet6, netmap.ip6(me)))
        self.refused_routes = refused
        addresses = list(dict.fromkeys(addresses))
        # Each network's route leaves from our address there: a peer in
        # one network alone accepts no packet from our address in another.
        sources = dict(routes)
        if tuple(addresses) != self.addresses:
            self.tun.set_addresses(addresses)
            self.addresses = tuple(addresses)
            self.log.info("interface {name} addresses: {addresses}", name=self.tun.name,
                          addresses=", ".join(addresses) or "none")
        for route in [r for r in self.routes if r not in sources]:
            self.tun.remove_route(route)
            self.log.info("route {route} removed", route=route)
        for route, source in sources.items():
            if self.route_sources.get(route) != source:
                self.tun.add_route(route, source)
                self.log.info("route {route} via {name} from {source}", route=route,
                              name=self.tun.name, source=source)
        self.routes = list(sources)
        self.route_sources = sources

    def _apply_relays(self, maps: dict[str, NetworkMap]) -> None:
        if self.relay is None:
            return
        infos: dict[str, RelayInfo] = {}
        for netmap in maps.values():
            for entry in netmap.relays:
                try:
                    info = RelayInfo.from_map(entry)
                except ValueError as e:
                    self.log.warn("ignoring a relay in network {n}: {e}",
                                  n=netmap.network_id, e=str(e))
                    continue
                infos.setdefault(info.relay_id, info)
        if tuple(infos.values()) != self.relay_infos:
            self.relay_infos = tuple(infos.values())
            self.relay.set_relays(self.relay_infos)

    def _add_peer(self, key: bytes, members: dict[str, Member], punch: bool = False) -> None:
        peer_members = dict(members)
        wg = self.device.add_peer(key, allowed_ips=allowed_ips(peer_members))
        if _is_device(peer_members):
            self._add_device(key, wg, peer_members)
            return
        manager = PathManager(
            wg, self.probes, self.clock, local=self.local,
            remote=member_candidates(_best(peer_members)), strategies=self.strategies,
            relay=self.relay, rng=random.Random(self.random.random()),
            config=self.path_config, on_change=self._path_changed, on_retry=self._retry_together)
        peer = self.peers[key] = JoinedPeer(key, wg, manager, peer_members)
        self.log.info("peer {name} added: {ips}, key {key}", name=peer.name,
                      ips=", ".join(peer.ips), key=encode_key(key))
        manager.start()
        if punch:
            # A lazy peer we have a packet for: the other side has no peer
            # for us yet, so we ask for the punch whichever key is lower.
            self.request_punch(peer)
            return
        # Both sides start when they see each other in the map, a few
        # milliseconds apart; the rendezvous's punch starts them again at
        # one moment, as simultaneous open needs.
        self._punch_together(peer)

    def _add_device(self, key: bytes, wg: Any, members: dict[str, Member]) -> None:
        """
        A stock WireGuard device: no traversal (it answers no probes); we
        hold a session on the relay its file names (the map's first), so
        that its handshakes find us there.
        """
        peer = self.peers[key] = JoinedPeer(key, wg, DevicePath(wg, key), members)
        self.log.info("device {name} added: {ips}, key {key}", name=peer.name,
                      ips=", ".join(peer.ips), key=encode_key(key))
        if self.relay is not None and self.relay_infos:
            d = self.relay.open_relay(key, self.relay_infos[0].relay_id)
            d.addErrback(lambda f: self.log.info("relay for device {name}: {why}",
                                                 name=peer.name, why=f.getErrorMessage()))

    def _punch_together(self, peer: JoinedPeer, moved: bool = False) -> None:
        """
        New candidates on either side: unless the path is already direct
        (and no endpoint it uses C{moved}), the side with the lower key (one
        of the two, without talking) asks the rendezvous to start both at
        once.
        """
        if peer.device:
            return
        if self.public_key < peer.public_key and (
                moved or peer.manager.kind not in (LAN, DIRECT)):
            self.request_punch(peer)

    def request_punch(self, peer: JoinedPeer) -> None:
        """
        Have the rendezvous tell both sides to start traversal at once;
        without the rendezvous, start on our side.  A request the rendezvous
        cannot arrange (the peer is not back yet, the connection dropped) is
        made again with backoff, until the path is direct or the tries run out.
        """
        _cancel(peer)
        if peer.device:
            return  # a device does not punch: the relay is its only path
        client = self.client
        if client is None or not self.rendezvous_up:
            peer.manager.punch_now()
            return
        network_id = sorted(peer.members)[0]

        def arranged(_: object) -> None:
            peer.punch_failures = 0

        def failed(failure: Any) -> None:
            peer.punch_failures += 1
            if (self._stopped or self.peers.get(peer.public_key) is not peer
                    or peer.manager.kind in (LAN, DIRECT)):
                return
            if peer.punch_failures > PUNCH_RETRIES:
                self.log.info("punch towards {name} not arranged: {why}; giving up",
                              name=peer.name, why=failure.getErrorMessage())
                return
            delay = min(PUNCH_RETRY_FIRST * 2 ** (peer.punch_failures - 1), PUNCH_RETRY_MAX)
            self.log.info("punch towards {name} not arranged: {why}; asking again in {delay} s",
                          name=peer.name, why=failure.getErrorMessage(), delay=delay)
            peer.punch_retry = self.clock.callLater(delay, self._retry_punch, peer)

        client.request_punch(network_id, peer.public_key).addCallbacks(arranged, failed)

    def _retry_together(self, manager: PathManager) -> bool:
        """
        A failed attempt's retry is due: the side with the lower key has the
        rendezvous start both sides at once, as the first punch was (a
        strategy like birthday needs both, and a hard side's probes may never
        reach the other to make it join in).  The other side retries alone.
        """
        peer = self.peers.get(manager.peer_key)
        if (peer is None or not self.rendezvous_up or self.client is None
                or not self.public_key < peer.public_key):
            return False
        self.request_punch(peer)
        return True

    def _retry_punch(self, peer: JoinedPeer) -> None:
        peer.punch_retry = None
        if (not self._stopped and self.peers.get(peer.public_key) is peer
                and peer.manager.kind not in (LAN, DIRECT)):
            self.request_punch(peer)

    def _update_peer(self, peer: JoinedPeer, members: dict[str, Member]) -> None:
        before = member_candidates(peer.member)
        old_allowed = peer.allowed_ips
        peer.members = dict(members)
        if peer.allowed_ips != old_allowed:
            peer.wg.set_allowed_ips(peer.allowed_ips)
            self.log.info("peer {name} now {ips}", name=peer.name, ips=", ".join(peer.ips))
        after = member_candidates(peer.member)
        if after != before:
            peer.manager.update_candidates(peer=after)
            current = address_of(peer.manager.endpoint)
            self._punch_together(peer, moved=type(current) is tuple
                                 and current not in after.public + after.local)

    def _remove_peer(self, key: bytes) -> None:
        peer = self.peers.pop(key)
        _cancel(peer)
        peer.manager.stop()
        if peer.device and self.relay is not None:
            self.relay.close_relay(key)
        self.device.remove_peer(key)
        self.log.info("peer {name} removed", name=peer.name)

    def _path_changed(self, manager: PathManager) -> None:
        peer = self.peers.get(manager.peer_key)
        if peer is None:
            return
        now = (manager.kind, manager.endpoint)
        if now != peer.reported:
            peer.reported = now
            self.log.info(
                "peer {name} path {kind} {endpoint}{rtt}", name=peer.name, kind=manager.kind,
                endpoint=describe(manager.endpoint) if manager.endpoint is not None else "-",
                rtt=f" rtt {manager.rtt * 1000:.1f} ms" if manager.rtt is not None else "")

    # -- discovery -------------------------------------------------------------

    def _start_discovery(self) -> None:
        client = self.client
        if (self._make_discovery is None or client is None or self.discovery_host is None
                or client.server_key is None or not client.udp_ports):
            return
        servers = [(self.discovery_host, port) for port in client.udp_ports[:2]]
        current = self.discovery
        if current is not None:
            if (servers, client.server_key, client.discovery_epoch) == self._discovery_for:
                return
            current.stop()
        self._discovery_for = (servers, client.server_key, client.discovery_epoch)
        self.discovery = self._make_discovery(client.server_key, servers,
                                              client.discovery_epoch)
        self._responses.clients = [self.discovery]
        self.forwarder.register_handler(DISCOVERY_RESPONSE, self._responses)
        self.discovery.start(self.discovery_interval, self._discovered)
        self._start_discovery6()

    def _start_discovery6(self) -> None:
        """
        With a global IPv6 address of ours and an IPv6 address the
        rendezvous answers on, learn our IPv6 public endpoint too: it is
        published with our addresses (peers take global IPv6 as public).
        """
        if self.discovery6 is not None:
            self.discovery6.stop()
            self.discovery6 = None
        client = self.client
        if (client is None or client.discovery6 is None or self._make_discovery is None
                or self.discovery is None or client.server_key is None
                or not any(is_public_ipv6((ip, 0)) for ip in self._local_addresses())):
            return
        servers = [(client.discovery6, client.udp_ports[0])]
        self.discovery6 = self._make_discovery(client.server_key, servers,
                                               client.discovery_epoch)
        self._responses.clients.append(self.discovery6)
        self.discovery6.start(self.discovery_interval, self._discovered6)

    def _discovered6(self, result: NetcheckResult) -> None:
        endpoint = result.endpoint
        if endpoint is None or endpoint == self.public6:
            return
        self.public6 = endpoint
        self.log.info("IPv6 public endpoint {endpoint}", endpoint=describe(endpoint))
        if self.netcheck_result is not None:
            self._discovered(self.netcheck_result)

    def set_mapped(self, address: Address | None) -> None:
        """
        Our gateway forwards C{address} to our port now (PCP, NAT-PMP), or no
        longer: peers learn it through the rendezvous, strategies use it.
        """
        before, self.mapped = self.mapped, address
        client = self.client
        if client is not None:
            endpoints = [format_endpoint(address)] if address is not None else []
            if endpoints != client.mapped_endpoints:
                client.set_mapped_endpoints(endpoints).addErrback(
                    lambda f: self.log.failure("telling the rendezvous our mapped address", f))
        if self.netcheck_result is not None:
            self._discovered(self.netcheck_result)
        if address is not None and before is None:
            # A mapping made again (the gateway rebooted) may be the same
            # address the peers still have: they see no change, so ask.
            for peer in self.peers.values():
                if peer.manager.kind not in (LAN, DIRECT):
                    self.request_punch(peer)

    def _discovered(self, result: NetcheckResult) -> None:
        self.netcheck_result = result
        local = self.local_candidates()
        candidates = own_candidates(result, local, self.mapped)
        if candidates != self.local:
            moved = candidates.public != self.local.public
            self.local = candidates
            self.log.info(
                "public endpoint {endpoint}, mapping varies by destination: {varies}",
                endpoint=describe(result.endpoint) if result.endpoint else "none (UDP blocked?)",
                varies=_yes_no(result.varies_by_destination))
            for peer in self.peers.values():
                peer.manager.update_candidates(local=candidates)
                self._punch_together(peer, moved)
        endpoints = [format_endpoint(a) for a in local]
        client = self.client
        if client is not None and endpoints != client.local_endpoints:
            client.set_local_endpoints(endpoints).addErrback(
                lambda f: self.log.failure("telling the rendezvous our LAN endpoints", f))

    # -- life ------------------------------------------------------------------

    def start(self) -> None:
        """Start reading the TUN device and using the relays."""
        self.tun.start_reading(self.device.send_packet)
        self._ask_us(self)
        self._retirer = LoopingCall(self._retire_idle)
        self._retirer.clock = self.clock
        self._retirer.start(self.lazy_idle / 10, now=False)
        if self.relay is not None:
            self.relay.start()

    def _ask_us(self, demand: IPeerDemand | None) -> None:
        """Have the data plane (or no one) make lazy peers when it meets them."""
        for part in (self.device, self.probes):
            if part is not None:
                part.demand = demand

    def stop(self) -> None:
        """Stop every path manager and timer; remove peers and routes."""
        if self._stopped:
            return
        self._stopped = True
        if self._reapply is not None and self._reapply.active():
            self._reapply.cancel()
        if self._retirer is not None and self._retirer.running:
            self._retirer.stop()
        self._ask_us(None)
        for discovery in (self.discovery, self.discovery6):
            if discovery is not None:
                discovery.stop()
        for key in list(self.peers):
            self._remove_peer(key)
        if self.relay is not None:
            self.relay.stop()
        for route in self.routes:
            self.tun.remove_route(route)
        self.routes = []
        self.route_sources = {}

    # -- for the local API -----------------------------------------------------

    def find_peer(self, query: str) -> JoinedPeer:
        """A peer by name, overlay IP, node ID or public key."""
        for peer in self.peers.values():
            if (query in (encode_key(peer.public_key), *peer.ips)
                    or any(query in (m.name, m.node_id) for m in peer.members.values())):
                return peer
        # A member whose peer is not made (lazy): made now, as traffic would.
        for key, members in self.members.items():
            if (query in (encode_key(key), *member_ips(members))
                    or any(query in (m.name, m.node_id) for m in members.values())):
                self._demand(key, punch=True)
                return self.peers[key]
        raise PeerNotFoundError(f"no peer {query!r}")

    def status(self) -> dict[str, Any]:
        """This node and one entry per peer, for C{twistvpn status}."""
        now = self.clock.seconds()
        networks = {}
        for network_id in dict.fromkeys([*self.join_answers, *self.maps]):
            netmap = self.maps.get(network_id)
            me = netmap.member(self.public_key) if netmap is not None else None
            networks[network_id] = {
                "status": "authorized" if me is not None
                else self.join_answers.get(network_id, "joining"),
                "name": netmap.name if netmap else None,
                "subnet": netmap.subnet if netmap else None,
                "domain": network_domain(netmap) if netmap else None,
                "ip": me.ip if me else None,
                "ip6": netmap.ip6(me) if netmap is not None and me is not None else None,
                "members": len(netmap.members) if netmap is not None else None,
                "route_refused": self.refused_routes.get(network_id),
            }
        result = self.netcheck_result
        return {
            "node_id": self.node_id,
            "public_key": encode_key(self.public_key),
            "interface": self.tun.name,
            "listen_port": self._listen_port(),
            "addresses": list(self.addresses),
            "rendezvous_connected": self.rendezvous_up,
            "public_endpoint": describe(result.endpoint) if result and result.endpoint else None,
            "public_endpoint6": describe(self.public6) if self.public6 is not None else None,
            "networks": networks,
            "peers": [self._peer_status(p, now) for p in self.peers.values()],
        }

    def _peer_status(self, peer: JoinedPeer, now: float) -> dict[str, Any]:
        manager, wg, member = peer.manager, peer.wg, peer.member
        handshake = wg.last_handshake
        return {
            "name": peer.name,
            "dns_name": self.name_table.by_key.get(peer.public_key),
            "node_id": member.node_id,
            "public_key": encode_key(peer.public_key),
            "ips": peer.ips,
            "ips6": peer.ips6,
            "networks": sorted(peer.members),
            "online": any(m.online for m in peer.members.values()),
            "path": manager.kind,
            "endpoint": describe(wg.endpoint) if wg.endpoint is not None else None,
            "rtt": manager.rtt,
            "last_handshake_ago": None if handshake is None else max(0.0, now - handshake),
            "rx_bytes": wg.rx_bytes,
            "tx_bytes": wg.tx_bytes,
            "traversal": manager.status(),
        }

    def metrics(self) -> list[Family]:
        """
        Prometheus families: each peer's path, RTT, handshake age and bytes;
        the rendezvous connection; and every counter the data path keeps
        (forged and replayed packets among them).
        """
        now = self.clock.seconds()
        path = Family("twistvpn_node_peer_path", "gauge", "1 for the path each peer is on.",
                      ("peer", "path"))
        rtt = Family("twistvpn_node_peer_rtt_seconds", "gauge", "Smoothed RTT of the path.",
                     ("peer",))
        age = Family("twistvpn_node_peer_handshake_age_seconds", "gauge",
                     "Seconds since the last WireGuard handshake.", ("peer",))
        transferred = Family("twistvpn_node_peer_bytes", "counter", "Bytes, by direction.",
                             ("peer", "direction"))
        for peer in self.peers.values():
            status = self._peer_status(peer, now)
            path.add(1, peer.name, status["path"])
            if status["rtt"] is not None:
                rtt.add(status["rtt"], peer.name)
            if status["last_handshake_ago"] is not None:
                age.add(status["last_handshake_ago"], peer.name)
            transferred.add(status["rx_bytes"], peer.name, "rx")
            transferred.add(status["tx_bytes"], peer.name, "tx")
        datapath = Family("twistvpn_node_datapath", "counter",
                          "Packets and drops counted by each part of the data path.",
                          ("part", "event"))
        for part, kept in (("forwarder", self.forwarder.counters),
                           ("wireguard", self.device.counters), ("tun", self.tun.counters),
                           ("probes", self.probes.counters if self.probes is not None else {}),
                           ("relay", self.relay.counters if self.relay is not None else {})):
            for event, value in sorted(kept.items()):
                datapath.add(value, part, event)
        connected = Family("twistvpn_node_rendezvous_connected", "gauge",
                           "1 while the control connection is up.").add(int(self.rendezvous_up))
        return [connected, path, rtt, age, transferred, datapath]

    def ping_once(self, query: str, timeout: float = 2.0) -> defer.Deferred[dict[str, Any]]:
        """
        One authenticated probe to the peer over its current path: fires with
        the path kind, endpoint and RTT (C{rtt} None when no answer came).
        """
        peer = self.find_peer(query)
        manager = peer.manager
        endpoint = manager.endpoint if manager.endpoint is not None else peer.wg.endpoint
        kind = manager.kind
        result: dict[str, Any] = {"peer": peer.name, "ip": peer.ips[0] if peer.ips else None,
                                  "path": kind, "rtt": None,
                                  "endpoint": None if endpoint is None else describe(endpoint)}
        if endpoint is None:
            result["error"] = "no path to the peer yet"
            return defer.succeed(result)
        done: defer.Deferred[dict[str, Any]] = defer.Deferred()

        def replied(_: Any, rtt: float) -> None:
            if not done.called:
                timer.cancel()
                done.callback({**result, "rtt": rtt})

        def expired() -> None:
            done.callback({**result, "error": "timeout"})

        timer = self.clock.callLater(timeout, expired)
        self.probes.send_probe(peer.public_key, endpoint, PING_TAG, on_reply=replied)
        return done

    def netcheck(self, wait: float = 1.0) -> defer.Deferred[dict[str, Any]]:
        """
        Ask both discovery ports again (timing the answers) and measure the
        relays: the public endpoint, whether the mapping varies by
        destination, UDP reachability, RTTs.
        """
        discovery = self.discovery
        if self.relay is not None:
            self.relay.measure()
        rendezvous: list[dict[str, Any]] = []
        queries = []
        if discovery is not None:
            for i, server in enumerate(discovery.servers):
                entry: dict[str, Any] = {"server": describe(server), "mapped": None, "rtt": None}
                rendezvous.append(entry)
                queries.append(self._timed_query(discovery, i, entry))
        queries.append(deferLater(self.clock, wait))

        def done(_: Any) -> dict[str, Any]:
            mapped = tuple(_parse(e["mapped"]) if e["mapped"] else None for e in rendezvous)
            result = NetcheckResult(mapped)
            if discovery is not None:
                self._discovered(result)
            relays = []
            for info in self.relay_infos:
                rtt = self.relay.rtt.get(info.relay_id) if self.relay is not None else None
                relays.append({"id": info.relay_id,
                               "address": describe((info.host, info.udp_port)),
                               "rtt": rtt,
                               "path": self.relay.path(info.relay_id)})
            return {
                "public_endpoint": describe(result.endpoint) if result.endpoint else None,
                "public_endpoint6": describe(self.public6) if self.public6 is not None else None,
                "mapping_varies_by_destination": result.varies_by_destination,
                "udp": result.endpoint is not None,
                "rendezvous": rendezvous,
                "relays": relays,
                "port_mapping": (self.port_mapper.status() if self.port_mapper is not None
                                 else None),
            }

        return defer.gatherResults(queries).addCallback(done)

    def _timed_query(self, discovery: Any, which: int, entry: dict[str, Any]) -> defer.Deferred:
        started = self.clock.seconds()

        def answered(mapped: Address) -> None:
            entry["mapped"] = describe(mapped)
            entry["rtt"] = self.clock.seconds() - started

        return discovery.query(which).addCallbacks(answered, lambda _: None)


def _best(members: dict[str, Member]) -> Member:
    """Of one peer's entries in several maps, the one with the most to say."""
    return max(members.values(),
               key=lambda m: (m.online, len(m.endpoints) + len(m.local_endpoints)))


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")
