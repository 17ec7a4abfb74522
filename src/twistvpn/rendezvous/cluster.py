"""
Several rendezvous instances as one: what each tells the others through
the database they share.

Admin changes need no help from us: they are in the database, and the
database announces each as it commits (PostgreSQL triggers notify the
C{members} channel, L{twistvpn.rendezvous.pgstore}), so an instance told of
a change reads it like one of its own and pushes it to the nodes connected
to it.  What only one instance knows travels on the C{nodes} channel:

  - a node's session and what discovery saw of it (online, endpoints),
    when it changes, never on every keep-alive;
  - the half of a punch meant for a node connected to another instance;
  - "hello" from an instance that (re)starts listening: every instance
    answers with the facts of the nodes connected to it.

An instance is known by its database connection's backend process ID,
which PostgreSQL stamps on every notification.  When an instance dies its
connections go, and L{Cluster.instances_alive} (the database's list of
sessions) marks its nodes offline until they reconnect elsewhere.

This is the plain part: it takes notifications as (channel, instance,
payload) and sends through a function; the connection is pgstore's.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterable
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from twistvpn.interfaces import IRendezvousCluster
from twistvpn.rendezvous.membership import Membership
from twistvpn.rendezvous.netmap import MapError, Punch, check_endpoints
from twistvpn.rendezvous.registry import Node, NodeFacts, SessionRegistry, check_name
from twistvpn.wireguard.keys import KEY_LENGTH

MEMBERS_CHANNEL = "twistvpn_members"  # written by the database's triggers
NODES_CHANNEL = "twistvpn_nodes"  # written by the instances
# PostgreSQL refuses payloads of 8000 bytes or more.
MAX_PAYLOAD = 7000
REASONS = ("deauthorized", "deleted")
MAX_RELAYS = 16

_log = Logger(namespace=__name__)


class NotificationError(ValueError):
    """A notification this code cannot use (another version's, or damaged)."""


def _key(text: Any) -> bytes:
    try:
        key = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise NotificationError("a public key is 64 hex digits") from None
    if len(key) != KEY_LENGTH:
        raise NotificationError("a public key is 64 hex digits")
    return key


def _endpoint(value: Any) -> str | None:
    if value is None:
        return None
    return check_endpoints([value])[0]


def encode_facts(node: Node) -> dict[str, Any]:
    facts = NodeFacts.of(node)
    return {"k": node.public_key.hex(), "on": node.session is not None, "n": facts.name,
            "s": facts.last_seen, "e": list(facts.endpoints), "l": list(facts.local_endpoints),
            "m": list(facts.mapped)}


def decode_facts(data: Any) -> tuple[bytes, bool, NodeFacts]:
    """(public key, connected, facts) from C{encode_facts}'s dict; NotificationError if bad."""
    try:
        last_seen = data["s"]
        if last_seen is not None and not isinstance(last_seen, int | float):
            raise NotificationError("last_seen is not a number")
        if not isinstance(data["on"], bool) or len(data["e"]) != 2:
            raise NotificationError("malformed node facts")
        facts = NodeFacts(
            name=check_name(data["n"]),
            last_seen=last_seen,
            endpoints=(_endpoint(data["e"][0]), _endpoint(data["e"][1])),
            local_endpoints=check_endpoints(data["l"]),
            mapped=check_endpoints(data["m"]),
        )
        return _key(data["k"]), data["on"], facts
    except (KeyError, TypeError, MapError, ValueError) as e:
        if isinstance(e, NotificationError):
            raise
        raise NotificationError(f"malformed node facts: {e}") from None


@implementer(IRendezvousCluster)
class Cluster:
    """This instance's side of the conversation between instances."""

    def __init__(
        self,
        registry: SessionRegistry,
        membership: Membership,
        send: Callable[[str, str], None],
        counters: collections.Counter[str],
    ) -> None:
        self._registry = registry
        self._membership = membership
        self._send = send  # (channel, payload): a notification to every instance
        self.counters = counters
        self.instance: int | None = None  # ours, once the database said it
        self.alive = 1  # instances alive, ours included
        self._relays_here: tuple[dict[str, Any], ...] = ()
        # instance -> the relays it announced (its embedded one, those linked to it)
        self._relays: dict[int, tuple[dict[str, Any], ...]] = {}
        self._relays_changed: Callable[[], None] = lambda: None

    # -- telling the others -------------------------------------------------------

    def node_changed(self, node: Node) -> None:
        self._publish([encode_facts(node)])

    def punch(self, owner: int, network_id: str, public_key: bytes, punch: Punch) -> None:
        self._notify({"t": "punch", "to": owner, "net": network_id, "k": public_key.hex(),
                      "peer": punch.peer_key.hex(), "c": list(punch.candidates),
                      "d": punch.delay, "id": punch.punch_id})

    def announce_relays(self, relays: tuple[dict[str, Any], ...]) -> None:
        self._relays_here = tuple(relays)
        self._notify({"t": "relays", "relays": list(self._relays_here)})

    def relays_elsewhere(self) -> tuple[dict[str, Any], ...]:
        return tuple(r for instance in sorted(self._relays) for r in self._relays[instance])

    def on_relays_elsewhere(self, callback: Callable[[], None]) -> None:
        self._relays_changed = callback

    def hello(self) -> None:
        """We (re)joined: everyone, say who is connected to you."""
        self._notify({"t": "hello"})

    def _publish(self, facts: Iterable[dict[str, Any]]) -> None:
        """Node facts, as few notifications as fit under PostgreSQL's payload limit."""
        batch: list[str] = []
        size = 0
        for item in facts:
            text = json.dumps(item, separators=(",", ":"))
            if batch and size + len(text) > MAX_PAYLOAD:
                self._send_nodes(batch)
                batch, size = [], 0
            batch.append(text)
            size += len(text) + 1
        if batch:
            self._send_nodes(batch)

    def _send_nodes(self, batch: list[str]) -> None:
        self._send(NODES_CHANNEL, '{"t":"nodes","nodes":[' + ",".join(batch) + "]}")
        self.counters["cluster_sent"] += 1

    def _notify(self, message: dict[str, Any]) -> None:
        self._send(NODES_CHANNEL, json.dumps(message, separators=(",", ":")))
        self.counters["cluster_sent"] += 1

    # -- hearing them --------------------------------------------------------------

    def received(self, notifications: Iterable[tuple[str, int, str]]) -> None:
        """
        Notifications as the database delivered them, (channel, sending
        instance, payload), in commit order; ours are skipped.  Changes of
        one network in one batch are handled once.
        """
        networks: dict[str, list[tuple[bytes, str]]] = {}
        for channel, sender, payload in notifications:
            if sender == self.instance:
                continue
            self.counters["cluster_received"] += 1
            try:
                if channel == MEMBERS_CHANNEL:
                    network_id, revoked = self._parse_member_change(payload)
                    networks.setdefault(network_id, []).extend(revoked)
                elif channel == NODES_CHANNEL:
                    self._node_message(sender, json.loads(payload))
                else:
                    raise NotificationError(f"unknown channel {channel[:40]!r}")
            except (NotificationError, ValueError, TypeError, KeyError) as e:
                self.counters["cluster_bad_notification"] += 1
                _log.warn("dropped a notification from instance {sender}: {why}",
                          sender=sender, why=str(e)[:200])
        for network_id, revoked in networks.items():
            self._membership.changed_elsewhere(network_id, revoked)
            self.counters["cluster_network_changes"] += 1

    @staticmethod
    def _parse_member_change(payload: str) -> tuple[str, list[tuple[bytes, str]]]:
        """"NETWORK" or "NETWORK REASON KEY" (the triggers' format)."""
        parts = payload.split(" ")
        network_id = parts[0]
        if len(network_id) != 16 or any(c not in "0123456789abcdef" for c in network_id):
            raise NotificationError(f"not a network ID: {network_id[:40]!r}")
        if len(parts) == 1:
            return network_id, []
        if len(parts) != 3 or parts[1] not in REASONS:
            raise NotificationError(f"malformed member change {payload[:80]!r}")
        return network_id, [(_key(parts[2]), parts[1])]

    def _node_message(self, sender: int, message: Any) -> None:
        kind = message["t"]
        if kind == "nodes":
            for item in message["nodes"]:
                public_key, connected, facts = decode_facts(item)
                self._registry.changed_elsewhere(public_key, sender, connected, facts)
        elif kind == "punch":
            if message["to"] != self.instance:
                return
            node = self._registry.find(_key(message["k"]))
            delay = message["d"]
            if not isinstance(delay, int | float) or not 0 <= delay <= 10:
                raise NotificationError("a punch's delay is 0 to 10 s")
            try:
                candidates = check_endpoints(message["c"])
            except MapError as e:
                raise NotificationError(str(e)) from None
            punch = Punch(_key(message["peer"]), candidates, float(delay),
                          str(message["id"])[:32])
            if node is not None:
                self._registry.send_punch(node, str(message["net"]), punch)
                self.counters["cluster_punches"] += 1
        elif kind == "hello":
            self._publish(encode_facts(n) for n in self._registry.connected_here())
            self.announce_relays(self._relays_here)
        elif kind == "relays":
            relays = message["relays"]
            if (not isinstance(relays, list) or len(relays) > MAX_RELAYS
                    or not all(isinstance(r, dict) for r in relays)):
                raise NotificationError(f"at most {MAX_RELAYS} relays, each a dict")
            if self._relays.get(sender) != tuple(relays):
                self._relays[sender] = tuple(relays)
                self._relays_changed()
        else:
            raise NotificationError(f"unknown message {str(kind)[:40]!r}")

    def instances_alive(self, alive: set[int]) -> None:
        """
        The instances the database has sessions of now: the others' nodes
        are offline, and their relays no longer listed.
        """
        self.alive = max(1, len(alive))
        self._registry.instances_gone(alive)
        gone = [instance for instance in self._relays if instance not in alive]
        for instance in gone:
            del self._relays[instance]
        if gone:
            self._relays_changed()

    def resync(self) -> None:
        """
        After we (re)started listening: changes made meanwhile were not
        heard, so every network is treated as changed, and we say hello.
        """
        for network in self._membership.network_ids():
            self._membership.changed_elsewhere(network)
        self.hello()
