"""
The network controller, as its front ends see it (L{INetworkController}):
three parts over one store, composed here.

- L{SessionRegistry} (C{registry.py}): who is connected, their
  subscriptions, endpoints, punch timing;
- L{Membership} (C{membership.py}): networks, members and their addresses,
  over an L{IRendezvousStore} (the only place with SQL is the store), telling
  L{IMembershipObserver}s of every change;
- L{MapPublisher} (C{publisher.py}): each network's map with its one
  revision counter, and the coalesced pushes (whole maps or deltas).

The controller itself only routes a request to the parts it concerns, so a
request looks its member up once.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from twistvpn.interfaces import (
    IControlSession,
    IMembershipObserver,
    INetworkController,
    IRendezvousCluster,
    IRendezvousStore,
)
from twistvpn.rendezvous.errors import (
    ConflictError,
    ControllerError,
    InvalidArgumentError,
    NotFoundError,
)
from twistvpn.rendezvous.membership import _UNCHANGED, Membership
from twistvpn.rendezvous.netmap import NetworkMap, format_endpoint, overlay6
from twistvpn.rendezvous.protocol import FAILOVER_SPREAD, FAILOVER_SPREAD_MAX
from twistvpn.rendezvous.publisher import MapPublisher
from twistvpn.rendezvous.registry import SessionRegistry, node_id_of
from twistvpn.wireguard.keys import encode_key

# Registrations a surviving instance takes per second: a dead instance's
# nodes spread their moves over their number divided by the survivors' rate
# (the fail-over benchmark's survivor, sharing 2 cores with PostgreSQL and
# 10,000 clients, took 350 a second on average and 700 at its busiest,
# docs/performance.md; more arrive queued, not refused).
FAILOVER_RATE = 400.0

__all__ = [
    "ConflictError",
    "Controller",
    "ControllerError",
    "InvalidArgumentError",
    "NotFoundError",
    "node_id_of",
]


@implementer(INetworkController)
class Controller:
    """Every network's state, persisted in C{store}; requests routed to the three parts."""

    log = Logger()

    def __init__(
        self,
        store: IRendezvousStore,
        clock: IReactorTime,
        push_delay: float = 0.05,
        relays: tuple[dict[str, Any], ...] = (),
    ) -> None:
        self.store = store
        self.counters: collections.Counter[str] = collections.Counter()
        self.registry = SessionRegistry(store, clock, self.counters)
        self.publisher = MapPublisher(store, self.registry, clock, self.counters, push_delay,
                                      relays)
        self.registry.node_changed = self.publisher.node_changed
        self.membership = Membership(store, self.registry, clock, self.counters)
        self.membership.add_observer(self.publisher)
        self._own_relays = tuple(relays)
        self._cluster: IRendezvousCluster | None = None
        self._clock = clock
        self._spread: tuple[float, float] | None = None  # (seconds, when worked out)

    @property
    def relays(self) -> tuple[dict[str, Any], ...]:
        """The relays every network map lists ({"host", "port", "public_key"}...)."""
        return self.publisher.relays

    @relays.setter
    def relays(self, relays: tuple[dict[str, Any], ...]) -> None:
        """This instance's relays (its embedded one, those linked to it)."""
        self._own_relays = tuple(relays)
        self._list_relays()
        if self._cluster is not None:
            self._cluster.announce_relays(self._own_relays)

    def _list_relays(self) -> None:
        """Ours, then the other instances': every node meets every relay in its map."""
        elsewhere = self._cluster.relays_elsewhere() if self._cluster is not None else ()
        listed: dict[Any, dict[str, Any]] = {}
        for relay in self._own_relays + tuple(elsewhere):
            listed.setdefault(relay.get("public_key"), relay)
        self.publisher.relays = tuple(listed.values())

    def attach_cluster(self, cluster: IRendezvousCluster) -> None:
        """
        Other instances share our database: C{cluster} tells them what only
        we know (sessions, discovery's endpoints, our relays) and us theirs.
        """
        self._cluster = cluster
        self.registry.cluster = cluster
        cluster.on_relays_elsewhere(self._list_relays)
        cluster.announce_relays(self._own_relays)

    # -- nodes and sessions ---------------------------------------------------

    def is_registered(self, public_key: bytes) -> bool:
        return self.registry.is_registered(public_key)

    def register_node(self, public_key: bytes, name: str, session: IControlSession) -> str:
        return self.registry.register(public_key, name, session)

    def set_version(self, public_key: bytes, version: str) -> None:
        self.registry.set_version(public_key, version)

    def rename_node(self, public_key: bytes, name: str) -> None:
        self.registry.rename(public_key, name)

    def detach(self, session: IControlSession) -> None:
        self.registry.detach(session)

    def set_local_endpoints(self, public_key: bytes, endpoints: Any) -> None:
        self.registry.set_local_endpoints(public_key, endpoints)

    def set_mapped_endpoints(self, public_key: bytes, endpoints: Any) -> None:
        self.registry.set_mapped_endpoints(public_key, endpoints)

    def record_endpoint(self, public_key: bytes, endpoint: tuple[str, int], which: int) -> bool:
        return self.registry.record_endpoint(public_key, endpoint, which)

    # -- a node's own requests ---------------------------------------------------

    def join(self, public_key: bytes, network_id: str, auth_key: str | None = None) -> str:
        return self.join_with_key(public_key, network_id, auth_key)[0]

    def join_with_key(self, public_key: bytes, network_id: str,
                      auth_key: str | None) -> tuple[str, str | None]:
        node = self.registry.session_node(public_key)
        network = self.membership.network(network_id)
        member, refused = self.membership.join(public_key, network, auth_key)
        self.registry.subscribe(node, network.id)
        if member.authorized:
            # The joining node needs the map now, and the others learn it
            # is online (or new).
            self.publisher.changed(network.id)
            return "authorized", None
        return "pending", refused

    def create_key(self, network_id: str, reusable: bool = False,
                   expires_in: float | None = None,
                   name_prefix: str | None = None) -> dict[str, Any]:
        return self.membership.create_key(network_id, reusable, expires_in, name_prefix)

    def list_keys(self, network_id: str | None = None) -> list[dict[str, Any]]:
        return self.membership.list_keys(network_id)

    def revoke_key(self, key_id: str) -> None:
        self.membership.revoke_key(key_id)

    def leave(self, public_key: bytes, network_id: str) -> None:
        self.registry.unsubscribe(self.registry.session_node(public_key), network_id)

    def resend_map(self, public_key: bytes, network_id: str) -> None:
        node = self.registry.session_node(public_key)
        if network_id not in node.subscriptions:
            raise NotFoundError(f"not joined to network {str(network_id)[:40]}")
        network = self.membership.network(network_id)
        if not self.membership.is_authorized(network.id, public_key):
            raise NotFoundError("not an authorized member of the network")
        self.publisher.resend(public_key, network)

    def request_punch(self, public_key: bytes, network_id: str, peer_key: bytes) -> None:
        node = self.registry.session_node(public_key)
        network_id = self.membership.network(network_id).id
        for key in (public_key, peer_key):
            if not self.membership.is_authorized(network_id, key):
                raise NotFoundError("both peers must be authorized members of the network")
        self.registry.punch(network_id, node, peer_key)

    # -- maps ------------------------------------------------------------------

    def network_map(self, network_id: str) -> NetworkMap:
        """The map every authorized member of C{network_id} receives."""
        return self.publisher.network_map(self.membership.network(network_id))

    # -- networks and members (the admin API) -----------------------------------

    def create_network(
        self, name: str, subnet: str | None = None, private: bool = True, force: bool = False
    ) -> dict[str, Any]:
        return self.membership.create_network(name, subnet, private, force)

    def update_network(self, network_id: str, name: str | None = None,
                       domain: str | None = None,
                       private: bool | None = None) -> dict[str, Any]:
        return self.membership.update_network(network_id, name, domain, private)

    def get_network(self, network_id: str) -> dict[str, Any]:
        return self.membership.describe_network(self.membership.network(network_id))

    def list_networks(self) -> list[dict[str, Any]]:
        return self.membership.list_networks()

    def delete_network(self, network_id: str) -> None:
        self.membership.delete_network(network_id)

    def list_members(self, network_id: str) -> list[dict[str, Any]]:
        return self.membership.list_members(network_id)

    def get_member(self, network_id: str, node: str) -> dict[str, Any]:
        _, found, member = self.membership.member(network_id, node)
        return self.membership.describe_member(member, found)

    def update_member(self, network_id: str, node: str, authorized: bool | None = None,
                      ip: Any = _UNCHANGED, name: str | None = None) -> dict[str, Any]:
        return self.membership.update_member(network_id, node, authorized, ip, name)

    def authorize(self, network_id: str, node: str) -> dict[str, Any]:
        return self.membership.update_member(network_id, node, authorized=True)

    def deauthorize(self, network_id: str, node: str) -> dict[str, Any]:
        return self.membership.update_member(network_id, node, authorized=False)

    def set_ip(self, network_id: str, node: str, ip: str) -> dict[str, Any]:
        return self.membership.update_member(network_id, node, ip=ip)

    def delete_member(self, network_id: str, node: str) -> None:
        self.membership.delete_member(network_id, node)

    def add_membership_observer(self, observer: IMembershipObserver) -> None:
        self.membership.add_observer(observer)

    def remove_membership_observer(self, observer: IMembershipObserver) -> None:
        self.membership.remove_observer(observer)

    def authorized_members(self) -> dict[str, frozenset[bytes]]:
        return self.membership.authorized_members()

    def authorized_devices(self, network_id: str | None = None) -> dict[str, frozenset[bytes]]:
        return self.membership.authorized_devices(network_id)

    # -- stock WireGuard devices (docs/devices.md) -------------------------------

    def add_device(self, network_id: str, name: str, public_key: bytes) -> dict[str, Any]:
        return self.membership.add_device(network_id, name, public_key)

    def device_config(self, network_id: str, node: str) -> dict[str, Any]:
        network, found, member = self.membership.member(network_id, node)
        if found.kind != "device":
            raise InvalidArgumentError(f"{found.node_id} is a node, not a device")
        if not member.authorized or member.ip is None:
            raise ConflictError(f"device {found.node_id} is not authorized in {network.id}")
        if not self.relays:
            raise ConflictError("no relay: devices are reached through one (run the "
                                "embedded relay, or link a standalone one)")
        relay = self.relays[0]
        peers = []
        for other in self.store.list_members(network.id, authorized_only=True):
            holder = self.registry.node(other.public_key)
            if holder.kind == "device" or other.ip is None:
                continue
            peers.append({"name": other.name or holder.name, "node_id": holder.node_id,
                          "public_key": encode_key(holder.public_key),
                          "allowed_ips": [f"{other.ip}/32",
                                          f"{overlay6(network.id, holder.node_id)}/128"]})
        return {
            "network_id": network.id,
            "name": member.name or found.name,
            "node_id": found.node_id,
            "public_key": encode_key(found.public_key),
            "address": [f"{member.ip}/32", f"{overlay6(network.id, found.node_id)}/128"],
            # The nodes answer names on their overlay addresses (port 53).
            "dns": ([peers[0]["allowed_ips"][0].split("/")[0], network.dns_domain]
                    if peers else []),
            "endpoint": format_endpoint((str(relay["host"]), int(relay["port"]))),
            "peers": peers,
        }

    # -- the service ----------------------------------------------------------

    def failover_spread(self) -> float:
        """Worked out at most once a second: every node's liveness ping asks."""
        now = self._clock.seconds()
        if self._spread is None or not 0 <= now - self._spread[1] < 1.0:
            survivors = max(1, (self._cluster.alive if self._cluster is not None else 1) - 1)
            here = len(self.registry.connected_here())
            spread = here / (FAILOVER_RATE * survivors)
            self._spread = (min(FAILOVER_SPREAD_MAX, max(FAILOVER_SPREAD, spread)), now)
        return self._spread[0]

    def status(self) -> dict[str, Any]:
        """Numbers for the admin API and the log."""
        return {
            "nodes": len(self.registry),
            "online": self.registry.online_count(),
            "networks": self.store.count_networks(),
            "counters": dict(self.counters),
        }

    def close(self) -> None:
        """Close every session and stop pending pushes."""
        self.publisher.close()
        self.registry.close()
