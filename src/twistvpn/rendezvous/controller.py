"""
The network controller: networks, members, IP address management, the
maps members receive and the pushes that keep them current.

A plain object over the sqlite database (L{twistvpn.rendezvous.database})
and an injected clock.  Every change is one transaction; pushes are
coalesced per network for C{push_delay} seconds so that a burst of changes
(a hundred nodes coming online) costs one map per member, not a hundred.
"""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import json
import os
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from twistvpn.interfaces import IControlSession, INetworkController
from twistvpn.rendezvous.database import transaction
from twistvpn.rendezvous.netmap import (
    MAX_NAME_LENGTH,
    MapError,
    Member,
    NetworkMap,
    Punch,
    check_endpoints,
    format_endpoint,
)
from twistvpn.wireguard.keys import KEY_LENGTH, InvalidKey, decode_key, encode_key

# Overlay addresses come from the shared address space (RFC 6598), as
# Tailscale's do.
DEFAULT_POOL = ipaddress.IPv4Network("100.64.0.0/10")
DEFAULT_PREFIX = 24
NETWORK_ID_LENGTH = 16
NODE_ID_LENGTH = 10
# How often last_seen is written for a node that keeps sending discovery
# requests from the same address.
LAST_SEEN_WRITE_INTERVAL = 60.0
PUNCH_DELAY = 0.5
PUNCH_MIN_INTERVAL = 1.0


class ControllerError(Exception):
    """A request the controller refuses; the message is for the user."""


class NotFoundError(ControllerError):
    """No such network, node or member."""


class ConflictError(ControllerError):
    """The request collides with existing state (an IP in use, a full subnet)."""


class InvalidArgumentError(ControllerError):
    """A malformed name, subnet, address or key."""


def node_id_of(public_key: bytes) -> str:
    """The short, stable node ID admins see (10 hex digits, as ZeroTier's)."""
    return hashlib.blake2s(public_key, digest_size=NODE_ID_LENGTH // 2).hexdigest()


def check_name(name: Any, what: str = "name") -> str:
    """A printable name of at most 64 characters."""
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise InvalidArgumentError(f"{what} must be at most {MAX_NAME_LENGTH} printable characters")
    return name


def check_network_id(network_id: Any) -> str:
    if (
        not isinstance(network_id, str)
        or len(network_id) != NETWORK_ID_LENGTH
        or any(c not in "0123456789abcdef" for c in network_id.lower())
    ):
        raise NotFoundError(f"unknown network {str(network_id)[:40]!r} (an ID is 16 hex digits)")
    return network_id.lower()


def parse_subnet(text: Any) -> ipaddress.IPv4Network:
    """An IPv4 subnet with room for at least two members."""
    try:
        net = ipaddress.ip_network(str(text), strict=True)
    except ValueError as e:
        raise InvalidArgumentError(f"bad subnet {str(text)[:50]!r}: {e}") from None
    if net.version != 4:
        raise InvalidArgumentError(f"bad subnet {text!r}: only IPv4 subnets are supported")
    if net.prefixlen > 30:
        raise InvalidArgumentError(f"bad subnet {text!r}: a /30 or larger is needed")
    return net


@dataclass
class _Node:
    """What the controller keeps in memory about a registered node."""

    public_key: bytes
    node_id: str
    name: str
    last_seen: float | None
    endpoints: list[str | None] = field(default_factory=lambda: [None, None])
    local_endpoints: tuple[str, ...] = ()
    last_seen_written: float = 0.0
    session: IControlSession | None = None
    subscriptions: set[str] = field(default_factory=set)
    # network ID -> revision of the last map this session was sent
    sent: dict[str, int] = field(default_factory=dict)


def _nat_varies(node: _Node) -> bool:
    """Whether the two discovery ports saw different mappings of one socket."""
    first, second = node.endpoints
    return first is not None and second is not None and first != second


def _candidates(node: _Node) -> tuple[str, ...]:
    """Every address worth probing for C{node}, observed ones first."""
    return tuple(dict.fromkeys([e for e in node.endpoints if e] + list(node.local_endpoints)))


@implementer(INetworkController)
class Controller:
    """The state of every network, persisted in C{db}."""

    log = Logger()

    def __init__(
        self,
        db: sqlite3.Connection,
        clock: IReactorTime,
        push_delay: float = 0.05,
        relays: tuple[dict[str, Any], ...] = (),
    ) -> None:
        self._db = db
        self._clock = clock
        self._push_delay = push_delay
        self._relays = tuple(relays)
        self.counters: collections.Counter[str] = collections.Counter()
        self._nodes: dict[bytes, _Node] = {}
        self._by_id: dict[str, bytes] = {}
        # network ID -> node keys whose current session joined it
        self._subscribers: dict[str, set[bytes]] = collections.defaultdict(set)
        self._revisions: dict[str, int] = {}
        # network ID -> the map last pushed (the base of the next delta)
        self._pushed: dict[str, NetworkMap] = {}
        self._dirty: set[str] = set()
        self._flush_call: IDelayedCall | None = None
        self._last_punch: dict[tuple[bytes, bytes], float] = {}
        for row in db.execute("SELECT * FROM nodes"):
            self._remember(row)
        for row in db.execute("SELECT id, revision FROM networks"):
            self._revisions[row["id"]] = row["revision"]

    @property
    def relays(self) -> tuple[dict[str, Any], ...]:
        """The relays every network map lists ({"host", "port", "public_key"}...)."""
        return self._relays

    @relays.setter
    def relays(self, relays: tuple[dict[str, Any], ...]) -> None:
        relays = tuple(relays)
        if relays == self._relays:
            return
        self._relays = relays
        for network_id in list(self._revisions):
            self._changed(network_id)

    def _remember(self, row: sqlite3.Row) -> _Node:
        node = _Node(
            public_key=bytes(row["public_key"]),
            node_id=row["node_id"],
            name=row["name"],
            last_seen=row["last_seen"],
            endpoints=[row["endpoint"], row["endpoint2"]],
            local_endpoints=tuple(json.loads(row["local_endpoints"])),
        )
        self._nodes[node.public_key] = node
        self._by_id[node.node_id] = node.public_key
        return node

    def _now(self) -> float:
        return self._clock.seconds()

    # -- nodes and sessions ---------------------------------------------------

    def is_registered(self, public_key: bytes) -> bool:
        """Whether C{public_key} ever registered (discovery serves only those)."""
        return public_key in self._nodes

    def register_node(self, public_key: bytes, name: str, session: IControlSession) -> str:
        if len(public_key) != KEY_LENGTH:
            raise InvalidArgumentError("a public key is 32 bytes")
        name = check_name(name)
        now = self._now()
        node = self._nodes.get(public_key)
        with transaction(self._db):
            if node is None:
                node_id = node_id_of(public_key)
                self._db.execute(
                    "INSERT INTO nodes (public_key, node_id, name, created, last_seen)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (public_key, node_id, name, now, now),
                )
            else:
                self._db.execute(
                    "UPDATE nodes SET name = ?, last_seen = ? WHERE public_key = ?",
                    (name, now, public_key),
                )
        if node is None:
            node = self._remember(
                self._db.execute(
                    "SELECT * FROM nodes WHERE public_key = ?", (public_key,)
                ).fetchone()
            )
        node.name, node.last_seen, node.last_seen_written = name, now, now
        old = node.session
        if old is not None and old is not session:
            self._unsubscribe(node)
            node.session = None
            old.close("replaced by a newer connection")
        node.session = session
        self.counters["registrations"] += 1
        self._mark_member_networks(public_key)
        return node.node_id

    def detach(self, session: IControlSession) -> None:
        node = self._nodes.get(session.public_key)
        if node is None or node.session is not session:
            return
        node.session = None
        self._unsubscribe(node)
        now = self._now()
        with transaction(self._db):
            self._db.execute(
                "UPDATE nodes SET last_seen = ? WHERE public_key = ?", (now, node.public_key)
            )
        node.last_seen = node.last_seen_written = now
        self._mark_member_networks(node.public_key)

    def _unsubscribe(self, node: _Node) -> None:
        for network_id in node.subscriptions:
            self._subscribers[network_id].discard(node.public_key)
        node.subscriptions.clear()
        node.sent.clear()

    def _session_node(self, public_key: bytes) -> _Node:
        node = self._nodes.get(public_key)
        if node is None or node.session is None:
            raise InvalidArgumentError("register first")
        return node

    def set_local_endpoints(self, public_key: bytes, endpoints: Any) -> None:
        node = self._session_node(public_key)
        try:
            local = check_endpoints(endpoints)
        except MapError as e:
            raise InvalidArgumentError(str(e)) from None
        if local == node.local_endpoints:
            return
        with transaction(self._db):
            self._db.execute(
                "UPDATE nodes SET local_endpoints = ? WHERE public_key = ?",
                (json.dumps(local), public_key),
            )
        node.local_endpoints = local
        self._mark_member_networks(public_key)

    def record_endpoint(self, public_key: bytes, endpoint: tuple[str, int], which: int) -> bool:
        node = self._nodes.get(public_key)
        if node is None:
            return False
        text = format_endpoint(endpoint)
        now = self._now()
        node.last_seen = now
        changed = node.endpoints[which] != text
        if changed or now - node.last_seen_written >= LAST_SEEN_WRITE_INTERVAL:
            column = ("endpoint", "endpoint2")[which]
            with transaction(self._db):
                self._db.execute(
                    f"UPDATE nodes SET {column} = ?, last_seen = ? WHERE public_key = ?",
                    (text, now, public_key),
                )
            node.endpoints[which] = text
            node.last_seen_written = now
        if changed:
            self.counters["endpoint_changes"] += 1
            self._mark_member_networks(public_key)
        return True

    # -- membership -------------------------------------------------------------

    def join(self, public_key: bytes, network_id: str) -> str:
        node = self._session_node(public_key)
        network = self._network_row(network_id)
        network_id = network["id"]
        member = self._member_row(network_id, public_key)
        if member is None:
            with transaction(self._db):
                self._db.execute(
                    "INSERT INTO members (network_id, public_key, authorized, ip, created)"
                    " VALUES (?, ?, 0, NULL, ?)",
                    (network_id, public_key, self._now()),
                )
                if not network["private"]:
                    self._authorize_in_transaction(network, public_key, None)
            member = self._member_row(network_id, public_key)
            assert member is not None, "the row was inserted in this transaction"
            self.counters["joins"] += 1
        node.subscriptions.add(network_id)
        self._subscribers[network_id].add(public_key)
        if member["authorized"]:
            # The joining node needs the map now, and the others learn it
            # is online (or new).
            self._changed(network_id)
            return "authorized"
        return "pending"

    def leave(self, public_key: bytes, network_id: str) -> None:
        node = self._session_node(public_key)
        node.subscriptions.discard(network_id)
        node.sent.pop(network_id, None)
        self._subscribers[network_id].discard(public_key)

    def resend_map(self, public_key: bytes, network_id: str) -> None:
        """Send the node the full current map (its copy could not take a delta)."""
        node = self._session_node(public_key)
        if network_id not in node.subscriptions:
            raise NotFoundError(f"not joined to network {str(network_id)[:40]}")
        member = self._member_row(network_id, public_key)
        if member is None or not member["authorized"]:
            raise NotFoundError("not an authorized member of the network")
        netmap = self._pushed.get(network_id) or self.network_map(network_id)
        assert node.session is not None
        node.session.send_map(network_id, netmap)
        node.sent[network_id] = netmap.revision
        self.counters["maps_resent"] += 1

    def request_punch(self, public_key: bytes, network_id: str, peer_key: bytes) -> None:
        node = self._session_node(public_key)
        network_id = self._network_row(network_id)["id"]
        peer = self._nodes.get(peer_key)
        for key in (public_key, peer_key):
            member = self._member_row(network_id, key)
            if member is None or not member["authorized"]:
                raise NotFoundError("both peers must be authorized members of the network")
        if peer is None or peer.session is None or network_id not in peer.subscriptions:
            raise NotFoundError("the peer is offline")
        pair = (min(public_key, peer_key), max(public_key, peer_key))
        now = self._now()
        if now - self._last_punch.get(pair, -PUNCH_MIN_INTERVAL) < PUNCH_MIN_INTERVAL:
            self.counters["punch_rate_limited"] += 1
            return
        self._last_punch[pair] = now
        punch_id = os.urandom(8).hex()
        # Each side is told to wait so that both start at about the same
        # moment despite different latencies to the rendezvous.
        for me, other in ((node, peer), (peer, node)):
            assert me.session is not None
            rtt = me.session.rtt or 0.0
            me.session.send_punch(
                network_id,
                Punch(
                    peer_key=other.public_key,
                    candidates=_candidates(other),
                    delay=max(0.0, PUNCH_DELAY - rtt / 2),
                    punch_id=punch_id,
                ),
            )
        self.counters["punches"] += 1

    # -- pushes -------------------------------------------------------------

    def _mark_member_networks(self, public_key: bytes) -> None:
        for row in self._db.execute(
            "SELECT network_id FROM members WHERE public_key = ? AND authorized = 1",
            (public_key,),
        ):
            self._changed(row["network_id"])

    def _changed(self, network_id: str) -> None:
        self._revisions[network_id] = self._revisions.get(network_id, 0) + 1
        if not self._subscribers.get(network_id):
            return
        self._dirty.add(network_id)
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(self._push_delay, self.flush)

    def flush(self) -> None:
        """Push the maps of every network that changed since the last flush."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        dirty, self._dirty = self._dirty, set()
        for network_id in sorted(dirty):
            if self._network_exists(network_id):
                self._push(network_id)

    def _push(self, network_id: str) -> None:
        """
        A member holding the previous map gets only the change (so a change
        costs its own size, not the network's); others get the whole map.
        """
        netmap = self.network_map(network_id)
        previous = self._pushed.get(network_id)
        delta = None
        if previous is not None:
            delta = netmap.diff(previous)
            if (
                not delta.upsert
                and not delta.remove
                and (
                    (previous.name, previous.subnet, previous.relays)
                    == (netmap.name, netmap.subnet, netmap.relays)
                )
            ):
                delta = None
                netmap = previous  # nothing a member sees has changed
        self._pushed[network_id] = netmap
        authorized = {m.public_key for m in netmap.members}
        for key in sorted(self._subscribers.get(network_id, ())):
            node = self._nodes[key]
            if key not in authorized or node.session is None:
                continue
            sent = node.sent.get(network_id)
            if sent == netmap.revision:
                continue
            if delta is not None and previous is not None and sent == previous.revision:
                node.session.send_map_delta(network_id, delta)
                self.counters["deltas_pushed"] += 1
            else:
                node.session.send_map(network_id, netmap)
                self.counters["maps_pushed"] += 1
            node.sent[network_id] = netmap.revision

    def _notify_revoked(self, network_id: str, public_key: bytes, reason: str) -> None:
        node = self._nodes.get(public_key)
        if node is not None and node.session is not None and network_id in node.subscriptions:
            node.sent.pop(network_id, None)
            node.session.send_revoked(network_id, reason)

    def network_map(self, network_id: str) -> NetworkMap:
        """The map every authorized member of C{network_id} receives."""
        network = self._network_row(network_id)
        members = []
        for row in self._db.execute(
            "SELECT public_key, ip FROM members WHERE network_id = ? AND authorized = 1"
            " ORDER BY created, public_key",
            (network["id"],),
        ):
            node = self._nodes[bytes(row["public_key"])]
            members.append(
                Member(
                    node_id=node.node_id,
                    public_key=node.public_key,
                    name=node.name,
                    ip=row["ip"],
                    endpoints=tuple(dict.fromkeys(e for e in node.endpoints if e)),
                    local_endpoints=node.local_endpoints,
                    nat_varies=_nat_varies(node),
                    online=node.session is not None,
                    last_seen=node.last_seen,
                )
            )
        return NetworkMap(
            network_id=network["id"],
            name=network["name"],
            subnet=network["subnet"],
            revision=self._revisions.get(network["id"], 0),
            members=tuple(members),
            relays=self.relays,
        )

    # -- networks -----------------------------------------------------------

    def _network_row(self, network_id: Any) -> sqlite3.Row:
        network_id = check_network_id(network_id)
        row = self._db.execute("SELECT * FROM networks WHERE id = ?", (network_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"unknown network {network_id}")
        return row

    def _network_exists(self, network_id: str) -> bool:
        return (
            self._db.execute("SELECT 1 FROM networks WHERE id = ?", (network_id,)).fetchone()
            is not None
        )

    def _describe_network(self, row: sqlite3.Row) -> dict[str, Any]:
        counts = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(authorized), 0) FROM members WHERE network_id = ?",
            (row["id"],),
        ).fetchone()
        return {
            "id": row["id"],
            "name": row["name"],
            "subnet": row["subnet"],
            "private": bool(row["private"]),
            "created": row["created"],
            "members": counts[0],
            "authorized": counts[1],
        }

    def _free_subnet(self) -> ipaddress.IPv4Network:
        taken = [
            ipaddress.IPv4Network(r["subnet"])
            for r in self._db.execute("SELECT subnet FROM networks")
        ]
        for candidate in DEFAULT_POOL.subnets(new_prefix=DEFAULT_PREFIX):
            if not any(candidate.overlaps(t) for t in taken):
                return candidate
        raise ConflictError("no free /24 left in 100.64.0.0/10; give --subnet")

    def create_network(
        self, name: str, subnet: str | None = None, private: bool = True
    ) -> dict[str, Any]:
        name = check_name(name, "a network name")
        net = self._free_subnet() if subnet is None else parse_subnet(subnet)
        with transaction(self._db):
            while True:
                network_id = os.urandom(NETWORK_ID_LENGTH // 2).hex()
                if not self._network_exists(network_id):
                    break
            self._db.execute(
                "INSERT INTO networks (id, name, subnet, private, created, revision)"
                " VALUES (?, ?, ?, ?, ?, 0)",
                (network_id, name, str(net), int(bool(private)), self._now()),
            )
        self.counters["networks_created"] += 1
        return self.get_network(network_id)

    def get_network(self, network_id: str) -> dict[str, Any]:
        return self._describe_network(self._network_row(network_id))

    def list_networks(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM networks ORDER BY created, id").fetchall()
        return [self._describe_network(r) for r in rows]

    def delete_network(self, network_id: str) -> None:
        network_id = self._network_row(network_id)["id"]
        keys = [
            bytes(r["public_key"])
            for r in self._db.execute(
                "SELECT public_key FROM members WHERE network_id = ?", (network_id,)
            )
        ]
        with transaction(self._db):
            self._db.execute("DELETE FROM members WHERE network_id = ?", (network_id,))
            self._db.execute("DELETE FROM networks WHERE id = ?", (network_id,))
        for key in keys:
            self._notify_revoked(network_id, key, "network deleted")
        for key in self._subscribers.pop(network_id, set()):
            self._nodes[key].subscriptions.discard(network_id)
        self._revisions.pop(network_id, None)
        self._pushed.pop(network_id, None)
        self._dirty.discard(network_id)

    # -- members --------------------------------------------------------------

    def _resolve_node(self, node: Any) -> bytes:
        """A node named by its ID (10 hex digits) or public key (base64)."""
        if isinstance(node, str):
            key = self._by_id.get(node.lower())
            if key is not None:
                return key
            try:
                key = decode_key(node)
            except InvalidKey:
                pass
            else:
                if key in self._nodes:
                    return key
        raise NotFoundError(f"unknown node {str(node)[:50]!r}")

    def _member_row(self, network_id: str, public_key: bytes) -> sqlite3.Row | None:
        return self._db.execute(
            "SELECT * FROM members WHERE network_id = ? AND public_key = ?",
            (network_id, public_key),
        ).fetchone()

    def _member(self, network_id: Any, node: Any) -> tuple[sqlite3.Row, sqlite3.Row]:
        network = self._network_row(network_id)
        key = self._resolve_node(node)
        member = self._member_row(network["id"], key)
        if member is None:
            raise NotFoundError(
                f"node {node_id_of(key)} is not a member of network {network['id']}"
            )
        return network, member

    def _describe_member(self, row: sqlite3.Row) -> dict[str, Any]:
        node = self._nodes[bytes(row["public_key"])]
        return {
            "node_id": node.node_id,
            "public_key": encode_key(node.public_key),
            "name": node.name,
            "authorized": bool(row["authorized"]),
            "ip": row["ip"],
            "created": row["created"],
            "last_seen": node.last_seen,
            "endpoints": [e for e in node.endpoints if e],
            "local_endpoints": list(node.local_endpoints),
            "nat_varies": _nat_varies(node),
            "online": node.session is not None,
        }

    def list_members(self, network_id: str) -> list[dict[str, Any]]:
        network = self._network_row(network_id)
        rows = self._db.execute(
            "SELECT * FROM members WHERE network_id = ? ORDER BY created, public_key",
            (network["id"],),
        ).fetchall()
        return [self._describe_member(r) for r in rows]

    def get_member(self, network_id: str, node: str) -> dict[str, Any]:
        return self._describe_member(self._member(network_id, node)[1])

    def _used_ips(self, network_id: str) -> set[ipaddress.IPv4Address]:
        return {
            ipaddress.IPv4Address(r["ip"])
            for r in self._db.execute(
                "SELECT ip FROM members WHERE network_id = ? AND ip IS NOT NULL", (network_id,)
            )
        }

    def _next_free_ip(self, network: sqlite3.Row) -> str:
        used = self._used_ips(network["id"])
        for host in ipaddress.IPv4Network(network["subnet"]).hosts():
            if host not in used:
                return str(host)
        raise ConflictError(
            f"no free address left in {network['subnet']} of network {network['id']}"
        )

    def _authorize_in_transaction(
        self, network: sqlite3.Row, public_key: bytes, ip: str | None
    ) -> None:
        if ip is None:
            ip = self._next_free_ip(network)
        self._db.execute(
            "UPDATE members SET authorized = 1, ip = ? WHERE network_id = ? AND public_key = ?",
            (ip, network["id"], public_key),
        )
        self._bump_revision(network["id"])

    def _bump_revision(self, network_id: str) -> None:
        """Count a persisted change of the network's map (inside a transaction)."""
        self._db.execute("UPDATE networks SET revision = revision + 1 WHERE id = ?", (network_id,))

    def authorize(self, network_id: str, node: str) -> dict[str, Any]:
        network, member = self._member(network_id, node)
        key = bytes(member["public_key"])
        if not member["authorized"]:
            with transaction(self._db):
                self._authorize_in_transaction(network, key, member["ip"])
            self._changed(network["id"])
        return self.get_member(network["id"], node)

    def deauthorize(self, network_id: str, node: str) -> dict[str, Any]:
        network, member = self._member(network_id, node)
        key = bytes(member["public_key"])
        if member["authorized"]:
            with transaction(self._db):
                self._db.execute(
                    "UPDATE members SET authorized = 0 WHERE network_id = ? AND public_key = ?",
                    (network["id"], key),
                )
                self._bump_revision(network["id"])
            self._notify_revoked(network["id"], key, "deauthorized")
            self._changed(network["id"])
        return self.get_member(network["id"], node)

    def delete_member(self, network_id: str, node: str) -> None:
        network, member = self._member(network_id, node)
        key = bytes(member["public_key"])
        with transaction(self._db):
            self._db.execute(
                "DELETE FROM members WHERE network_id = ? AND public_key = ?", (network["id"], key)
            )
            self._bump_revision(network["id"])
        self._notify_revoked(network["id"], key, "deleted")
        self._subscribers[network["id"]].discard(key)
        self._nodes[key].subscriptions.discard(network["id"])
        if member["authorized"]:
            self._changed(network["id"])

    def set_ip(self, network_id: str, node: str, ip: str) -> dict[str, Any]:
        network, member = self._member(network_id, node)
        subnet = ipaddress.IPv4Network(network["subnet"])
        try:
            address = ipaddress.IPv4Address(str(ip))
        except ValueError:
            raise InvalidArgumentError(f"bad IP address {str(ip)[:50]!r}") from None
        if address not in subnet:
            raise InvalidArgumentError(f"{address} is not in the network's subnet {subnet}")
        if address in (subnet.network_address, subnet.broadcast_address):
            raise InvalidArgumentError(f"{address} is not a host address of {subnet}")
        holder = self._db.execute(
            "SELECT public_key FROM members WHERE network_id = ? AND ip = ?",
            (network["id"], str(address)),
        ).fetchone()
        key = bytes(member["public_key"])
        if holder is not None and bytes(holder["public_key"]) != key:
            raise ConflictError(
                f"{address} is already used by node {node_id_of(holder['public_key'])}"
            )
        with transaction(self._db):
            self._db.execute(
                "UPDATE members SET ip = ? WHERE network_id = ? AND public_key = ?",
                (str(address), network["id"], key),
            )
            self._bump_revision(network["id"])
        if member["authorized"]:
            self._changed(network["id"])
        return self.get_member(network["id"], node)

    # -- the service ----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Numbers for the admin API and the log."""
        return {
            "nodes": len(self._nodes),
            "online": sum(1 for n in self._nodes.values() if n.session is not None),
            "networks": self._db.execute("SELECT COUNT(*) FROM networks").fetchone()[0],
            "counters": dict(self.counters),
        }

    def close(self) -> None:
        """Close every session and stop pending pushes."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        for node in self._nodes.values():
            if node.session is not None:
                session, node.session = node.session, None
                session.close("the rendezvous is stopping")
