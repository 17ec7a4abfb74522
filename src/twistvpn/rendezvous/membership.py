"""
Networks, their members, and the addresses members are given: the
controller's membership part, over an L{IRendezvousStore}.

Every change is written through the store in one call (one transaction),
then told to the L{IMembershipObserver}s: the map publisher, which pushes
maps, and the relays' policy, which learns who may talk to whom.
"""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import os
import secrets
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twistvpn.common.dnsname import check_domain
from twistvpn.interfaces import IMembershipObserver, IRendezvousStore
from twistvpn.rendezvous.errors import ConflictError, InvalidArgumentError, NotFoundError
from twistvpn.rendezvous.files import KEY_PREFIX
from twistvpn.rendezvous.registry import (
    MAX_NAME_LENGTH,
    Node,
    SessionRegistry,
    check_name,
    node_id_of,
)
from twistvpn.rendezvous.store import (
    KeyRecord,
    MemberRecord,
    NetworkRecord,
    WriteConflictError,
)
from twistvpn.wireguard.keys import encode_key

# Overlay addresses come from the shared address space (RFC 6598), as
# Tailscale's do.
DEFAULT_POOL = ipaddress.IPv4Network("100.64.0.0/10")
DEFAULT_PREFIX = 24
NETWORK_ID_LENGTH = 16

_UNCHANGED: Any = object()
# Addresses tried when concurrent writers (rendezvous instances sharing a
# database) keep taking the lowest free one first.
IP_TRIES = 64
T = TypeVar("T")


class KeyRefusedError(Exception):
    """A pre-auth key that does not authorize (wrong, revoked, expired, used)."""


def _hash(secret: str) -> bytes:
    """Keys are 256 random bits: a plain hash suffices to keep the secret out of the store."""
    return hashlib.sha256(secret.encode("utf-8", "replace")).digest()


def describe_key(key: KeyRecord, now: float) -> dict[str, Any]:
    return {
        "id": key.id, "network_id": key.network_id, "reusable": key.reusable,
        "uses": key.uses, "expires": key.expires, "name_prefix": key.name_prefix,
        "revoked": key.revoked, "created": key.created,
        "valid": not key.revoked and (key.expires is None or now < key.expires)
        and (key.reusable or not key.uses),
    }


def check_network_id(network_id: Any) -> str:
    if (
        not isinstance(network_id, str)
        or len(network_id) != NETWORK_ID_LENGTH
        or any(c not in "0123456789abcdef" for c in network_id.lower())
    ):
        raise NotFoundError(f"unknown network {str(network_id)[:40]!r} (an ID is 16 hex digits)")
    return network_id.lower()


# Where an overlay may live: private (RFC 1918) and shared (RFC 6598) space.
# Anything else could be a member's path to the internet or to us.
OVERLAY_SPACE = tuple(ipaddress.IPv4Network(n) for n in
                      ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"))


def parse_subnet(text: Any) -> ipaddress.IPv4Network:
    """
    An IPv4 subnet with room for at least two members, inside private or
    shared address space (L{OVERLAY_SPACE}).
    """
    try:
        net = ipaddress.ip_network(str(text), strict=True)
    except ValueError as e:
        raise InvalidArgumentError(f"bad subnet {str(text)[:50]!r}: {e}") from None
    if net.version != 4:
        raise InvalidArgumentError(f"bad subnet {text!r}: only IPv4 subnets are supported")
    if net.prefixlen > 30:
        raise InvalidArgumentError(f"bad subnet {text!r}: a /30 or larger is needed")
    if not any(net.subnet_of(space) for space in OVERLAY_SPACE):
        raise InvalidArgumentError(
            f"bad subnet {text!r}: an overlay must be in private or shared space "
            f"({', '.join(str(s) for s in OVERLAY_SPACE)}), not addresses members "
            "may need to reach the internet or the rendezvous")
    return net


def check_ip(network: NetworkRecord, ip: Any) -> str:
    """C{ip} as a host address of the network's subnet."""
    subnet = ipaddress.IPv4Network(network.subnet)
    try:
        address = ipaddress.IPv4Address(str(ip))
    except ValueError:
        raise InvalidArgumentError(f"bad IP address {str(ip)[:50]!r}") from None
    if address not in subnet:
        raise InvalidArgumentError(f"{address} is not in the network's subnet {subnet}")
    if address in (subnet.network_address, subnet.broadcast_address):
        raise InvalidArgumentError(f"{address} is not a host address of {subnet}")
    return str(address)


class Membership:
    """Networks and members: create, authorize, address, remove; observers told."""

    log = Logger()

    def __init__(
        self,
        store: IRendezvousStore,
        registry: SessionRegistry,
        clock: IReactorTime,
        counters: collections.Counter[str],
    ) -> None:
        self._store = store
        self._registry = registry
        self._clock = clock
        self.counters = counters
        self._observers: list[IMembershipObserver] = []
        # network ID -> its authorized members' and devices' keys as last told
        # the observers: a join adds one key to them instead of listing a
        # network of thousands from the store again.
        self._authorized: dict[str, tuple[frozenset[bytes], frozenset[bytes]]] = {}
        # network ID -> the lowest address that may be free (each one below
        # was taken when last looked at): a join looks up a few addresses,
        # not every member's.
        self._ip_floor: dict[str, int] = {}

    # -- observers --------------------------------------------------------------

    def add_observer(self, observer: IMembershipObserver) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: IMembershipObserver) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def _members_changed(self, network_id: str, joined: bytes | None = None) -> None:
        """
        Tell the observers C{network_id}'s members now.  C{joined}: the one
        change is that node (not a device) joining, authorized; the sets
        are then the last ones and it, not a query of every member.
        """
        last = self._authorized.get(network_id)
        if joined is not None and last is not None:
            authorized, devices = last[0] | {joined}, last[1]
        else:
            authorized = frozenset(m.public_key for m in
                                   self._store.list_members(network_id, authorized_only=True))
            devices = self._store.authorized_devices(network_id).get(network_id, frozenset())
        self._authorized[network_id] = (authorized, devices)
        for observer in list(self._observers):
            observer.members_changed(network_id, authorized, devices)

    def _network_gone(self, network_id: str) -> None:
        self._authorized.pop(network_id, None)
        self._ip_floor.pop(network_id, None)
        for observer in list(self._observers):
            observer.network_deleted(network_id)
            observer.members_changed(network_id, frozenset(), frozenset())

    def _revoked(self, network_id: str, public_key: bytes, reason: str) -> None:
        for observer in list(self._observers):
            observer.member_revoked(network_id, public_key, reason)

    def changed_elsewhere(self, network_id: str,
                          revoked: Sequence[tuple[bytes, str]] = ()) -> None:
        """
        Another rendezvous instance on the shared database changed
        C{network_id} (and took it from the members in C{revoked}, with
        the reason): the observers here are told as if the change were ours.
        """
        gone = self._store.get_network(network_id) is None
        self._ip_floor.pop(network_id, None)  # it may have freed addresses
        for public_key, reason in revoked:
            self._revoked(network_id, public_key, "network deleted" if gone else reason)
            node = self._registry.find(public_key)
            if node is not None and reason != "deauthorized":
                self._registry.unsubscribe(node, network_id)
        if gone:
            self._network_gone(network_id)
        else:
            self._members_changed(network_id)

    # -- networks ---------------------------------------------------------------

    def network(self, network_id: Any) -> NetworkRecord:
        network_id = check_network_id(network_id)
        record = self._store.get_network(network_id)
        if record is None:
            raise NotFoundError(f"unknown network {network_id}")
        return record

    def exists(self, network_id: str) -> bool:
        return self._store.get_network(network_id) is not None

    def describe_network(self, network: NetworkRecord) -> dict[str, Any]:
        members, authorized = self._store.count_members(network.id)
        return {
            "id": network.id,
            "name": network.name,
            "subnet": network.subnet,
            "domain": network.dns_domain,
            "domain_set": network.domain is not None,
            "private": network.private,
            "created": network.created,
            "members": members,
            "authorized": authorized,
        }

    def _free_subnet(self) -> ipaddress.IPv4Network:
        taken = [ipaddress.IPv4Network(s) for s in self._store.subnets()]
        for candidate in DEFAULT_POOL.subnets(new_prefix=DEFAULT_PREFIX):
            if not any(candidate.overlaps(t) for t in taken):
                return candidate
        raise ConflictError("no free /24 left in 100.64.0.0/10; give --subnet")

    def create_network(self, name: str, subnet: str | None = None,
                       private: bool = True, force: bool = False) -> dict[str, Any]:
        name = check_name(name, "a network name")
        net = self._free_subnet() if subnet is None else parse_subnet(subnet)
        for taken in self._store.list_networks():
            if taken.name == name and not force:
                raise ConflictError(f"a network named {name!r} exists already ({taken.id}); "
                                    "give another name, or force a second one")
            if net.overlaps(ipaddress.IPv4Network(taken.subnet)):
                raise ConflictError(
                    f"subnet {net} overlaps network {taken.id} ({taken.name}, {taken.subnet}): "
                    "a member of both could not route to either")
        record = None
        while record is None:
            record = self._store.add_network(os.urandom(NETWORK_ID_LENGTH // 2).hex(), name,
                                             str(net), bool(private), self._clock.seconds())
        self.counters["networks_created"] += 1
        return self.describe_network(record)

    def update_network(self, network_id: str, name: str | None = None,
                       domain: str | None = None,
                       private: bool | None = None) -> dict[str, Any]:
        """
        Rename a network and/or set its DNS domain ("" puts the default
        back); members get the new map.  Everything is checked before
        anything is written.
        """
        network = self.network(network_id)
        new_name = network.name if name is None else check_name(name, "a network name")
        new_domain = network.domain
        if domain is not None:
            try:
                new_domain = check_domain(domain) if domain else None
            except ValueError as e:
                raise InvalidArgumentError(str(e)) from None
        if new_domain is not None:
            for other in self._store.list_networks():
                if other.id != network.id and other.dns_domain == new_domain:
                    raise ConflictError(f"network {other.id} ({other.name}) has the domain "
                                        f"{new_domain} already")
        new_private = network.private if private is None else bool(private)
        record = self._store.update_network(network.id, new_name, new_domain, new_private)
        if record is None:
            raise NotFoundError(f"unknown network {network.id}")
        self._members_changed(network.id)  # the same members, a new map
        return self.describe_network(record)

    def network_ids(self) -> list[str]:
        return [n.id for n in self._store.list_networks()]

    def list_networks(self) -> list[dict[str, Any]]:
        return [self.describe_network(n) for n in self._store.list_networks()]

    def delete_network(self, network_id: str) -> None:
        network_id = self.network(network_id).id
        keys = self._store.delete_network(network_id)
        for key in keys:
            self._revoked(network_id, key, "network deleted")
        self._network_gone(network_id)

    # -- members --------------------------------------------------------------

    def member(self, network_id: Any, node_name: Any) -> tuple[NetworkRecord, Node, MemberRecord]:
        """The network, the node and its membership: one look-up for a request."""
        network = self.network(network_id)
        try:
            node = self._registry.resolve(node_name)
        except NotFoundError:
            # Its name in this network (a device's, or a node's), when only one has it.
            named = [m for m in self._store.list_members(network.id)
                     if self._name_of(m) == node_name]
            if len(named) != 1:
                raise
            node = self._registry.node(named[0].public_key)
        member = self._store.get_member(network.id, node.public_key)
        if member is None:
            raise NotFoundError(f"node {node.node_id} is not a member of network {network.id}")
        return network, node, member

    def _name_of(self, member: MemberRecord) -> str:
        """A member's name in its network: the admin's, or the node's own."""
        return member.name or self._registry.node(member.public_key).name

    def describe_member(self, member: MemberRecord, node: Node | None = None) -> dict[str, Any]:
        if node is None:
            node = self._registry.node(member.public_key)
        return {
            "node_id": node.node_id,
            "public_key": encode_key(node.public_key),
            "name": member.name or node.name,
            "node_name": node.name,  # what the node calls itself
            "authorized": member.authorized,
            "ip": member.ip,
            "created": member.created,
            "last_seen": node.last_seen,
            "endpoints": [e for e in node.endpoints if e],
            "local_endpoints": list(node.local_endpoints),
            "nat_varies": node.nat_varies,
            "online": node.online,
            "version": node.version or None,
            "kind": node.kind,
        }

    def list_members(self, network_id: str) -> list[dict[str, Any]]:
        network = self.network(network_id)
        return [self.describe_member(m) for m in self._store.list_members(network.id)]

    def is_authorized(self, network_id: str, public_key: bytes) -> bool:
        member = self._store.get_member(network_id, public_key)
        return member is not None and member.authorized

    def add_device(self, network_id: str, name: str, public_key: bytes) -> dict[str, Any]:
        """A stock WireGuard device: authorized at once, with the next free IP."""
        network = self.network(network_id)
        name = check_name(name, "a device name")
        if len(public_key) != 32:
            raise InvalidArgumentError("a public key is 32 bytes")
        known = self._registry.find(public_key)
        if known is not None and known.kind != "device":
            raise ConflictError(f"that key is node {known.node_id}'s")
        if known is not None and self._store.get_member(network.id, public_key) is not None:
            raise ConflictError(f"device {known.node_id} is already a member of {network.id}")
        if any(self._name_of(m) == name for m in self._store.list_members(network.id)):
            raise ConflictError(f"network {network.id} already has a member named {name}")
        node_record, member = self._with_free_ip(network, lambda ip: self._store.add_device(
            public_key, node_id_of(public_key), name, network.id, ip, self._clock.seconds()))
        node = known if known is not None else self._registry.remember_device(node_record)
        self.counters["devices_added"] += 1
        self._members_changed(network.id)
        return self.describe_member(member, node)

    def authorized_devices(self, network_id: str | None = None) -> dict[str, frozenset[bytes]]:
        return self._store.authorized_devices(network_id)

    def _with_free_ip(self, network: NetworkRecord, write: Callable[[str], T]) -> T:
        """
        C{write(ip)} with the lowest free address; when another writer (a
        second rendezvous instance on the same database) took that one
        meanwhile, the database refuses it and the next free one is tried.
        """
        for _ in range(IP_TRIES):
            ip = self._next_free_ip(network)
            try:
                return write(ip)
            except WriteConflictError:
                self.counters["ip_races"] += 1
        raise ConflictError(f"no address of {network.subnet} could be assigned: other writers "
                            f"took each of the {IP_TRIES} tried; try again")

    def _next_free_ip(self, network: NetworkRecord) -> str:
        """
        The lowest free host address, found from the floor up by looking
        each up (one indexed query, usually the first is free); the floor
        comes from every used address only when there is none yet.
        """
        subnet = ipaddress.IPv4Network(network.subnet)
        first, last = int(subnet.network_address) + 1, int(subnet.broadcast_address) - 1
        floor = self._ip_floor.get(network.id)
        if floor is None:
            used = {int(ipaddress.IPv4Address(ip)) for ip in self._store.used_ips(network.id)}
            floor = first
            while floor in used:
                floor += 1
        for host in range(max(floor, first), last + 1):
            ip = str(ipaddress.IPv4Address(host))
            if self._store.ip_holder(network.id, ip) is None:
                self._ip_floor[network.id] = host
                return ip
        self._ip_floor[network.id] = last + 1
        raise ConflictError(f"no free address left in {network.subnet} of network {network.id}")

    def _freed(self, network_id: str, ip: str | None) -> None:
        """C{ip} of C{network_id} is free again: the next join may take it."""
        if ip is not None and network_id in self._ip_floor:
            host = int(ipaddress.IPv4Address(ip))
            self._ip_floor[network_id] = min(self._ip_floor[network_id], host)

    def join(self, public_key: bytes, network: NetworkRecord,
             auth_key: str | None = None) -> tuple[MemberRecord, str | None]:
        """
        The node's membership, made on its first join: authorized if the
        network is public or C{auth_key} is a valid pre-auth key for it.
        Also returns why a key was refused (None if it was not), for the node.
        """
        member = self._store.get_member(network.id, public_key)
        refused = None
        if auth_key is not None and (member is None or not member.authorized):
            try:
                return self._join_with_key(public_key, network, auth_key, member), None
            except KeyRefusedError as e:
                self.counters["keys_refused"] += 1
                refused = str(e)
        if member is not None:
            return member, refused
        def add(ip: str | None) -> MemberRecord:
            return self._store.add_member(network.id, public_key, self._clock.seconds(),
                                          authorized=not network.private, ip=ip)

        member = add(None) if network.private else self._with_free_ip(network, add)
        self.counters["joins"] += 1
        if member.authorized:
            self._members_changed(network.id, joined=public_key)
        return member, refused

    # -- pre-auth keys ----------------------------------------------------------

    def create_key(self, network_id: str, reusable: bool = False,
                   expires_in: float | None = None,
                   name_prefix: str | None = None) -> dict[str, Any]:
        """A new key for a network: its description, with the secret (shown this once)."""
        network = self.network(network_id)
        if expires_in is not None and expires_in <= 0:
            raise InvalidArgumentError("a key must expire in the future")
        if name_prefix is not None:
            check_name(name_prefix, "a name prefix")
        now = self._clock.seconds()
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(secrets.token_hex(6), network.id, reusable, 0,
                           None if expires_in is None else now + expires_in, name_prefix,
                           False, now)
        self._store.add_key(record, _hash(secret))
        self.counters["keys_created"] += 1
        return {**describe_key(record, now), "secret": secret}

    def list_keys(self, network_id: str | None = None) -> list[dict[str, Any]]:
        if network_id is not None:
            network_id = self.network(network_id).id
        now = self._clock.seconds()
        return [describe_key(k, now) for k in self._store.list_keys(network_id)]

    def revoke_key(self, key_id: str) -> None:
        if not isinstance(key_id, str) or not self._store.revoke_key(key_id.lower()):
            raise NotFoundError(f"unknown key {str(key_id)[:20]!r}")

    def _join_with_key(self, public_key: bytes, network: NetworkRecord, auth_key: str,
                       member: MemberRecord | None) -> MemberRecord:
        key = self._store.key_by_hash(_hash(auth_key)) if isinstance(auth_key, str) else None
        now = self._clock.seconds()
        if key is None or key.network_id != network.id:
            raise KeyRefusedError("the pre-auth key is not one of this network's")
        if key.revoked:
            raise KeyRefusedError(f"the pre-auth key {key.id} was revoked")
        if key.expires is not None and now >= key.expires:
            raise KeyRefusedError(f"the pre-auth key {key.id} has expired")
        if not key.reusable and key.uses:
            raise KeyRefusedError(f"the pre-auth key {key.id} was used already (single use)")
        name = None
        if key.name_prefix:
            own = self._registry.node(public_key).name
            name = own if own.startswith(key.name_prefix) else key.name_prefix + own
            name = name[:MAX_NAME_LENGTH]

        def spend(ip: str) -> MemberRecord | None:
            return self._store.join_with_key(key.id, network.id, public_key, now, ip,
                                             single_use=not key.reusable, name=name)

        if member is not None and member.ip:
            joined = spend(member.ip)
        else:
            joined = self._with_free_ip(network, spend)
        if joined is None:
            raise KeyRefusedError(f"the pre-auth key {key.id} was used already (single use)")
        self.counters["joins_with_key"] += 1
        if member is None:
            self.counters["joins"] += 1
        self._members_changed(network.id)
        return joined

    def update_member(self, network_id: str, node_name: str, authorized: bool | None = None,
                      ip: Any = _UNCHANGED, name: str | None = None) -> dict[str, Any]:
        """
        Change a member's authorization and address together: one look-up,
        one write, then the observers (a revocation first, so the node drops
        its peers before the others learn it is gone).
        """
        network, node, member = self.member(network_id, node_name)
        new_ip = member.ip
        if ip is not _UNCHANGED:
            new_ip = check_ip(network, ip)
            holder = self._store.ip_holder(network.id, new_ip)
            if holder is not None and holder != node.public_key:
                raise ConflictError(f"{new_ip} is already used by node {node_id_of(holder)}")
        new_name = member.name
        if name is not None:
            new_name = check_name(name, "a member name") if name else None
        new_authorized = member.authorized if authorized is None else authorized

        def write(ip: str | None) -> str | None:
            self._store.update_member(network.id, node.public_key, new_authorized, ip,
                                      new_name)
            return ip

        if new_authorized and new_ip is None:
            new_ip = self._with_free_ip(network, write)
        elif (new_authorized, new_ip, new_name) != (member.authorized, member.ip, member.name):
            try:
                write(new_ip)
            except WriteConflictError:
                raise ConflictError(f"{new_ip} was taken by another member meanwhile") from None
        if (new_authorized, new_ip, new_name) != (member.authorized, member.ip, member.name):
            if new_ip != member.ip:
                self._freed(network.id, member.ip)
            if member.authorized and not new_authorized:
                self._revoked(network.id, node.public_key, "deauthorized")
            if member.authorized or new_authorized:
                self._members_changed(network.id)
        updated = MemberRecord(network.id, node.public_key, new_authorized, new_ip,
                               member.created, new_name)
        return self.describe_member(updated, node)

    def delete_member(self, network_id: str, node_name: str) -> None:
        network, node, member = self.member(network_id, node_name)
        self._store.delete_member(network.id, node.public_key)
        self._freed(network.id, member.ip)
        self._revoked(network.id, node.public_key, "deleted")
        self._registry.unsubscribe(node, network.id)
        if member.authorized:
            self._members_changed(network.id)

    def authorized_members(self) -> dict[str, frozenset[bytes]]:
        return self._store.authorized_members()
