"""
Who is connected: the controller's session registry.

Every node that ever registered, kept in memory with its control session
(if connected), the networks that session joined, the endpoints discovery
saw and the addresses the node reported, and when a pair last punched.
Node facts are persisted through the store; what a change means for the
maps is the publisher's business, told through C{node_changed}.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twistvpn.interfaces import IControlSession, IRendezvousCluster, IRendezvousStore
from twistvpn.rendezvous.errors import InvalidArgumentError, NotFoundError
from twistvpn.rendezvous.netmap import (
    MAX_NAME_LENGTH,
    MapError,
    Punch,
    check_endpoints,
    format_endpoint,
)
from twistvpn.rendezvous.store import NodeRecord
from twistvpn.wireguard.keys import KEY_LENGTH, InvalidKey, decode_key

NODE_ID_LENGTH = 10
# How often last_seen is written for a node that keeps sending discovery
# requests from the same address.
LAST_SEEN_WRITE_INTERVAL = 60.0
PUNCH_DELAY = 0.5
PUNCH_MIN_INTERVAL = 1.0


def node_id_of(public_key: bytes) -> str:
    """The short, stable node ID admins see (10 hex digits, as ZeroTier's)."""
    return hashlib.blake2s(public_key, digest_size=NODE_ID_LENGTH // 2).hexdigest()


def check_name(name: Any, what: str = "name") -> str:
    """A printable name of at most 64 characters."""
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise InvalidArgumentError(f"{what} must be at most {MAX_NAME_LENGTH} printable characters")
    return name


@dataclass
class Node:
    """What the registry keeps in memory about a registered node."""

    public_key: bytes
    node_id: str
    name: str
    last_seen: float | None
    endpoints: list[str | None] = field(default_factory=lambda: [None, None])
    local_endpoints: tuple[str, ...] = ()
    # Public addresses its gateway forwards to it (in memory: re-sent on registering).
    mapped_endpoints: tuple[str, ...] = ()
    last_seen_written: float = 0.0
    session: IControlSession | None = None
    subscriptions: set[str] = field(default_factory=set)
    # network ID -> revision of the last map this session was sent
    sent: dict[str, int] = field(default_factory=dict)
    version: str = ""  # the twistvpn version it registered with last ("" until it does)
    kind: str = "node"  # or "device": a stock WireGuard app; it never registers
    # The other rendezvous instance its session is on (the instance's ID on
    # the shared database), or None: here, or offline.
    elsewhere: int | None = None

    @classmethod
    def from_record(cls, record: NodeRecord) -> Node:
        return cls(record.public_key, record.node_id, record.name, record.last_seen,
                   list(record.endpoints), record.local_endpoints, kind=record.kind)

    @property
    def online(self) -> bool:
        return self.session is not None or self.elsewhere is not None

    @property
    def nat_varies(self) -> bool:
        """Whether the two discovery ports saw different mappings of one socket."""
        first, second = self.endpoints
        return first is not None and second is not None and first != second

    def seen_endpoints(self) -> tuple[str, ...]:
        """The observed endpoints, once each."""
        return tuple(dict.fromkeys(e for e in self.endpoints if e))

    def candidates(self) -> tuple[str, ...]:
        """Every address worth probing, observed ones first."""
        return tuple(dict.fromkeys(self.seen_endpoints() + self.local_endpoints))


@dataclass(frozen=True)
class NodeFacts:
    """What members' maps show of a node that only the instance holding its session knows."""

    name: str
    last_seen: float | None
    endpoints: tuple[str | None, str | None]
    local_endpoints: tuple[str, ...]
    mapped: tuple[str, ...]

    @classmethod
    def of(cls, node: Node) -> NodeFacts:
        first, second = node.endpoints
        return cls(node.name, node.last_seen, (first, second), node.local_endpoints,
                   node.mapped_endpoints)


class SessionRegistry:
    """Registered nodes, their sessions and subscriptions, and punch timing."""

    def __init__(
        self,
        store: IRendezvousStore,
        clock: IReactorTime,
        counters: collections.Counter[str],
        node_changed: Callable[[bytes], None] = lambda key: None,
    ) -> None:
        self._store = store
        self._clock = clock
        self.counters = counters
        # A node's facts that members' maps show changed (its sessions,
        # endpoints): the publisher re-sends its networks' maps.
        self.node_changed = node_changed
        # The other instances on a shared database, told what only this one
        # sees (sessions here, discovery's endpoints); None: the only one.
        self.cluster: IRendezvousCluster | None = None
        self._nodes: dict[bytes, Node] = {}
        self._by_id: dict[str, bytes] = {}
        # network ID -> node keys whose current session joined it
        self._subscribers: dict[str, set[bytes]] = collections.defaultdict(set)
        self._last_punch: dict[tuple[bytes, bytes], float] = {}
        self._deferred_punches: dict[tuple[bytes, bytes], IDelayedCall] = {}
        for record in store.load_nodes():
            self._remember(Node.from_record(record))

    def remember_device(self, record: NodeRecord) -> Node:
        """A device the store has just recorded."""
        return self._remember(Node.from_record(record))

    def _remember(self, node: Node) -> Node:
        self._nodes[node.public_key] = node
        self._by_id[node.node_id] = node.public_key
        return node

    # -- looking nodes up --------------------------------------------------------

    def __len__(self) -> int:
        return len(self._nodes)

    def online_count(self) -> int:
        return sum(1 for n in self._nodes.values() if n.session is not None)

    def is_registered(self, public_key: bytes) -> bool:
        """
        Known here (in memory only: discovery asks this of every request,
        which must never cost a database query).
        """
        return public_key in self._nodes

    def find(self, public_key: bytes) -> Node | None:
        """A node known here, or registered through another instance on the database."""
        return self._nodes.get(public_key) or self._stored(public_key)

    def node(self, public_key: bytes) -> Node:
        """A registered node (KeyError if it never registered)."""
        node = self.find(public_key)
        if node is None:
            raise KeyError(public_key)
        return node

    def _stored(self, public_key: bytes) -> Node | None:
        """
        A node another rendezvous instance on the same database registered
        (or added, a device) since this one read them all at start.
        """
        record = self._store.get_node(public_key)
        return None if record is None else self._remember(Node.from_record(record))

    def session_node(self, public_key: bytes) -> Node:
        """A node with a session: what a node's own requests need."""
        node = self._nodes.get(public_key)
        if node is None or node.session is None:
            raise InvalidArgumentError("register first")
        return node

    def resolve(self, name: Any) -> Node:
        """A node named by its ID (10 hex digits) or public key (base64)."""
        if isinstance(name, str):
            key = self._by_id.get(name.lower())
            if key is not None:
                return self._nodes[key]
            try:
                key = decode_key(name)
            except InvalidKey:
                record = self._store.get_node_by_id(name.lower())
                if record is not None:
                    return self._remember(Node.from_record(record))
            else:
                found = self.find(key)
                if found is not None:
                    return found
        raise NotFoundError(f"unknown node {str(name)[:50]!r}")

    # -- sessions -----------------------------------------------------------------

    def register(self, public_key: bytes, name: str, session: IControlSession) -> str:
        if len(public_key) != KEY_LENGTH:
            raise InvalidArgumentError("a public key is 32 bytes")
        name = check_name(name)
        now = self._clock.seconds()
        node = self.find(public_key)
        if node is None:
            record = self._store.add_node(public_key, node_id_of(public_key), name, now)
            node = self._remember(Node.from_record(record))
        elif node.kind == "device":
            # Its key is a stock WireGuard app's: whoever holds it is that device.
            raise InvalidArgumentError("this key belongs to a device; a device does not register")
        else:
            self._store.update_node(public_key, now, name)
        node.name, node.last_seen, node.last_seen_written = name, now, now
        old = node.session
        if old is not None and old is not session:
            self._unsubscribe_all(node)
            node.session = None
            old.close("replaced by a newer connection")
        node.session = session
        node.elsewhere = None
        self.counters["registrations"] += 1
        self._changed(node)
        return node.node_id

    def set_version(self, public_key: bytes, version: str) -> None:
        node = self._nodes.get(public_key)
        if node is not None:
            node.version = version if version.isprintable() else ""

    def rename(self, public_key: bytes, name: str) -> None:
        """A registered node's new name; its networks' maps say so."""
        node = self._nodes.get(public_key)
        if node is None:
            raise NotFoundError("register first")
        name = check_name(name)
        if name == node.name:
            return
        now = self._clock.seconds()
        self._store.update_node(public_key, now, name)
        node.name, node.last_seen, node.last_seen_written = name, now, now
        self._changed(node)

    def detach(self, session: IControlSession) -> None:
        node = self._nodes.get(session.public_key)
        if node is None or node.session is not session:
            return
        node.session = None
        self._unsubscribe_all(node)
        now = self._clock.seconds()
        self._store.update_node(node.public_key, now)
        node.last_seen = node.last_seen_written = now
        self._changed(node)

    def _changed(self, node: Node) -> None:
        """What members see of C{node} changed here: our maps, and the other instances'."""
        self.node_changed(node.public_key)
        if self.cluster is not None:
            self.cluster.node_changed(node)

    # -- what other instances on a shared database say ---------------------------

    def changed_elsewhere(self, public_key: bytes, sender: int, connected: bool,
                          facts: NodeFacts) -> None:
        """
        The instance C{sender} holds (or no longer holds) the node's session
        and saw C{facts}; a session here outranks what it says, and so does
        a third instance that holds it now (the node moved on before its
        old instance noticed it had gone).
        """
        node = self.find(public_key)
        if node is None:
            return
        if not connected and node.elsewhere not in (None, sender):
            return
        owner = sender if connected else None
        if node.session is not None:
            # Remembered for when our session, older or dying, goes.
            node.elsewhere = owner
            return
        if (owner, facts) == (node.elsewhere, NodeFacts.of(node)):
            return
        node.elsewhere = owner
        node.name, node.last_seen = facts.name, facts.last_seen
        node.endpoints = list(facts.endpoints)
        node.local_endpoints, node.mapped_endpoints = facts.local_endpoints, facts.mapped
        self.node_changed(public_key)

    def instances_gone(self, alive: set[int]) -> None:
        """The nodes of instances not in C{alive} (stopped, or killed) are offline."""
        for node in list(self._nodes.values()):
            if node.elsewhere is not None and node.elsewhere not in alive:
                node.elsewhere = None
                self.node_changed(node.public_key)

    def connected_here(self) -> list[Node]:
        return [n for n in self._nodes.values() if n.session is not None]

    def close(self) -> None:
        """Close every session (the service is stopping)."""
        for call in self._deferred_punches.values():
            if call.active():
                call.cancel()
        self._deferred_punches.clear()
        for node in self._nodes.values():
            if node.session is not None:
                session, node.session = node.session, None
                session.close("the rendezvous is stopping")

    # -- subscriptions ---------------------------------------------------------------

    def subscribe(self, node: Node, network_id: str) -> None:
        node.subscriptions.add(network_id)
        self._subscribers[network_id].add(node.public_key)

    def unsubscribe(self, node: Node, network_id: str) -> None:
        node.subscriptions.discard(network_id)
        node.sent.pop(network_id, None)
        self._subscribers[network_id].discard(node.public_key)

    def _unsubscribe_all(self, node: Node) -> None:
        for network_id in node.subscriptions:
            self._subscribers[network_id].discard(node.public_key)
        node.subscriptions.clear()
        node.sent.clear()

    def subscribers(self, network_id: str) -> list[Node]:
        """The nodes whose sessions joined C{network_id}, in key order."""
        return [self._nodes[k] for k in sorted(self._subscribers.get(network_id, ()))]

    def has_subscribers(self, network_id: str) -> bool:
        return bool(self._subscribers.get(network_id))

    def forget_network(self, network_id: str) -> None:
        for key in self._subscribers.pop(network_id, set()):
            self._nodes[key].subscriptions.discard(network_id)

    # -- what nodes report and discovery sees ---------------------------------------

    def _new_endpoints(self, public_key: bytes, endpoints: Any,
                       field: str) -> tuple[Node, tuple[str, ...] | None]:
        """The node, and its checked C{endpoints} if they differ from its C{field}."""
        node = self.session_node(public_key)
        try:
            checked = check_endpoints(endpoints)
        except MapError as e:
            raise InvalidArgumentError(str(e)) from None
        return node, None if checked == getattr(node, field) else checked

    def set_local_endpoints(self, public_key: bytes, endpoints: Any) -> None:
        node, local = self._new_endpoints(public_key, endpoints, "local_endpoints")
        if local is not None:
            self._store.set_local_endpoints(public_key, local)
            node.local_endpoints = local
            self._changed(node)

    def set_mapped_endpoints(self, public_key: bytes, endpoints: Any) -> None:
        # Not stored: the node's gateway maps again when it reconnects.
        node, mapped = self._new_endpoints(public_key, endpoints, "mapped_endpoints")
        if mapped is not None:
            node.mapped_endpoints = mapped
            self._changed(node)

    def record_endpoint(self, public_key: bytes, endpoint: tuple[str, int], which: int) -> bool:
        node = self._nodes.get(public_key)
        if node is None:
            return False
        text = format_endpoint(endpoint)
        now = self._clock.seconds()
        node.last_seen = now
        changed = node.endpoints[which] != text
        if changed or now - node.last_seen_written >= LAST_SEEN_WRITE_INTERVAL:
            self._store.set_endpoint(public_key, which, text, now)
            node.endpoints[which] = text
            node.last_seen_written = now
        if changed:
            self.counters["endpoint_changes"] += 1
            self._changed(node)
        return True

    # -- punching ---------------------------------------------------------------------

    def punch(self, network_id: str, node: Node, peer_key: bytes) -> None:
        """
        Tell C{node} and the peer to start traversal at about the same
        moment; both must be online in C{network_id} (the caller checked
        they are authorized members).  At most one punch a second per pair;
        a request within the second is sent when it is over.
        """
        peer = self._nodes.get(peer_key)
        here = peer is not None and peer.session is not None
        if peer is None or not (here and network_id in peer.subscriptions
                                or peer.elsewhere is not None and self.cluster is not None):
            raise NotFoundError("the peer is offline")
        pair = (min(node.public_key, peer_key), max(node.public_key, peer_key))
        now = self._clock.seconds()
        wait = self._last_punch.get(pair, -PUNCH_MIN_INTERVAL) + PUNCH_MIN_INTERVAL - now
        if wait > 0:
            # Asked again within the second: new candidates (a side's public
            # endpoint, learned just after the first punch) must not be
            # dropped, so one more punch goes out when the second is over,
            # with the candidates of that moment.
            self.counters["punch_deferred"] += 1
            if pair not in self._deferred_punches:
                self._deferred_punches[pair] = self._clock.callLater(
                    wait, self._deferred_punch, network_id, node.public_key, peer_key)
            return
        self._last_punch[pair] = now
        punch_id = os.urandom(8).hex()
        # Each side is told to wait so that both start at about the same
        # moment despite different latencies to the rendezvous.
        for me, other in ((node, peer), (peer, node)):
            punch = Punch(peer_key=other.public_key, candidates=other.candidates(),
                          delay=PUNCH_DELAY, punch_id=punch_id)
            if me.session is not None:
                self.send_punch(me, network_id, punch)
            elif me.elsewhere is not None and self.cluster is not None:
                # Its instance sends it, a notification later.
                self.cluster.punch(me.elsewhere, network_id, me.public_key, punch)
        self.counters["punches"] += 1

    def _deferred_punch(self, network_id: str, node_key: bytes, peer_key: bytes) -> None:
        self._deferred_punches.pop((min(node_key, peer_key), max(node_key, peer_key)), None)
        node = self._nodes.get(node_key)
        if node is None or node.session is None or network_id not in node.subscriptions:
            return
        try:
            self.punch(network_id, node, peer_key)
        except NotFoundError:
            self.counters["punch_peer_gone"] += 1

    def send_punch(self, node: Node, network_id: str, punch: Punch) -> None:
        """
        Send C{punch} to C{node}'s session here, its delay shortened by half
        its round trip, so that both sides start at about the same moment.
        """
        if node.session is None or network_id not in node.subscriptions:
            self.counters["punch_not_here"] += 1
            return
        rtt = node.session.rtt or 0.0
        node.session.send_punch(network_id, dataclasses.replace(
            punch, delay=max(0.0, punch.delay - rtt / 2)))
