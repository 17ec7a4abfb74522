"""
The maps members receive, and the pushes that keep them current: the
controller's map publisher.

It holds each network's one map revision: counted up on every change a
member could see, carried by every map and delta, and stored with the
network whenever a map goes out, so that after a restart revisions go on
from where they were.  Changes are coalesced for C{push_delay} seconds, so
that a burst of changes (a hundred nodes coming online) costs one map per
member, not a hundred.  And after a push, the next waits at least as long
as that one took: in a network of thousands, where one push is thousands
of sends, the rendezvous spends at most half its time pushing however fast
changes come (a network of 10,000 joining: one delta to everyone every few
hundred milliseconds, not one per join), while a change after a quiet
spell goes out after C{push_delay}.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from twistvpn.interfaces import IMembershipObserver, IRendezvousStore
from twistvpn.rendezvous.errors import NotFoundError
from twistvpn.rendezvous.netmap import Member, NetworkMap
from twistvpn.rendezvous.registry import SessionRegistry
from twistvpn.rendezvous.store import MemberRecord, NetworkRecord

# The longest the pause after a push may be (it is as long as the push took).
MAX_PUSH_WINDOW = 0.5


class LatencyHistogram:
    """Counts of observations at or below each bound, their sum and count."""

    BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.buckets = [0] * len(self.BOUNDS)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        for i, bound in enumerate(self.BOUNDS):
            if seconds <= bound:
                self.buckets[i] += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus's buckets: (upper bound, observations at or below it), +Inf last."""
        return [(str(b), float(n)) for b, n in zip(self.BOUNDS, self.buckets, strict=True)] + [
            ("+Inf", float(self.count))]


@implementer(IMembershipObserver)
class MapPublisher:
    """Builds each network's map and pushes it (or its delta) to subscribed members."""

    def __init__(
        self,
        store: IRendezvousStore,
        registry: SessionRegistry,
        clock: IReactorTime,
        counters: collections.Counter[str],
        push_delay: float = 0.05,
        relays: tuple[dict[str, Any], ...] = (),
    ) -> None:
        self._store = store
        self._registry = registry
        self._clock = clock
        self.counters = counters
        self._push_delay = push_delay
        # No push before this (clock time): the last one ended, and then as
        # long again as it took (up to MAX_PUSH_WINDOW).
        self.quiet_until = float("-inf")
        self._relays = tuple(relays)
        self._revisions: dict[str, int] = store.revisions()
        # network ID -> the map last pushed (the base of the next delta)
        self._pushed: dict[str, NetworkMap] = {}
        # network ID -> its authorized members' records, as the store last
        # listed them: kept until membership changes (members_changed), so
        # that a push for a node coming online reads no database.
        self._records: dict[str, list[MemberRecord]] = {}
        self._dirty: set[str] = set()
        self._flush_call: IDelayedCall | None = None
        # network ID -> when the oldest change not yet pushed was made
        self._changed_at: dict[str, float] = {}
        # Seconds from a change to its push, in buckets (a Prometheus histogram).
        self.push_latency = LatencyHistogram()

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
            self.changed(network_id)

    def revision(self, network_id: str) -> int:
        return self._revisions.get(network_id, 0)

    # -- what changed --------------------------------------------------------------

    def changed(self, network_id: str) -> None:
        """Something members of C{network_id} see changed: count it, push soon."""
        self._revisions[network_id] = self._revisions.get(network_id, 0) + 1
        if not self._registry.has_subscribers(network_id):
            return
        self._dirty.add(network_id)
        self._changed_at.setdefault(network_id, self._clock.seconds())
        if self._flush_call is None:
            now = self._clock.seconds()
            # (Bounded, should the clock have stepped back since the last push.)
            due = max(now + self._push_delay, min(self.quiet_until, now + MAX_PUSH_WINDOW))
            self._flush_call = self._clock.callLater(due - now, self.flush)

    def node_changed(self, public_key: bytes) -> None:
        """A node's facts changed (online, endpoints): its networks' maps show them."""
        for network_id in self._store.member_networks(public_key):
            self.changed(network_id)

    def members_changed(self, network_id: str, authorized: frozenset[bytes],
                        devices: frozenset[bytes]) -> None:
        self._records.pop(network_id, None)
        if authorized or self._store.get_network(network_id) is not None:
            self.changed(network_id)

    def member_revoked(self, network_id: str, public_key: bytes, reason: str) -> None:
        """Tell a connected node it lost the network, if it joined it."""
        try:
            node = self._registry.node(public_key)
        except KeyError:
            return
        if node.session is not None and network_id in node.subscriptions:
            node.sent.pop(network_id, None)
            node.session.send_revoked(network_id, reason)

    def network_deleted(self, network_id: str) -> None:
        self._registry.forget_network(network_id)
        self._revisions.pop(network_id, None)
        self._pushed.pop(network_id, None)
        self._records.pop(network_id, None)
        self._dirty.discard(network_id)

    # -- pushing -----------------------------------------------------------------------

    def flush(self) -> None:
        """Push the maps of every network that changed since the last flush."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        dirty, self._dirty = self._dirty, set()
        started = self._clock.seconds()
        for network_id in sorted(dirty):
            network = self._store.get_network(network_id)
            if network is not None:
                self._push(network)
            since = self._changed_at.pop(network_id, None)
            if since is not None:
                self.push_latency.observe(self._clock.seconds() - since)
        ended = self._clock.seconds()
        self.quiet_until = ended + min(MAX_PUSH_WINDOW, ended - started)

    def _push(self, network: NetworkRecord) -> None:
        """
        A member holding the previous map gets only the change (so a change
        costs its own size, not the network's); others get the whole map.
        """
        network_id = network.id
        netmap = self.network_map(network)
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
        if netmap is not previous:
            self._store.set_revision(network_id, netmap.revision)
        self._pushed[network_id] = netmap
        authorized = {m.public_key for m in netmap.members}
        for node in self._registry.subscribers(network_id):
            if node.public_key not in authorized or node.session is None:
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

    def resend(self, public_key: bytes, network: NetworkRecord) -> None:
        """Send the node the full current map (its copy could not take a delta)."""
        node = self._registry.session_node(public_key)
        if network.id not in node.subscriptions:
            raise NotFoundError(f"not joined to network {network.id}")
        netmap = self._pushed.get(network.id)
        if netmap is None:
            netmap = self.network_map(network)
            self._store.set_revision(network.id, netmap.revision)
        assert node.session is not None
        node.session.send_map(network.id, netmap)
        node.sent[network.id] = netmap.revision
        self.counters["maps_resent"] += 1

    def network_map(self, network: NetworkRecord) -> NetworkMap:
        """The map every authorized member of C{network} receives."""
        records = self._records.get(network.id)
        if records is None:
            records = self._records[network.id] = self._store.list_members(
                network.id, authorized_only=True)
        members = []
        for member in records:
            if member.ip is None:
                continue  # (authorized members have one: without, none could reach it)
            node = self._registry.node(member.public_key)
            members.append(
                Member(
                    node_id=node.node_id,
                    public_key=node.public_key,
                    name=member.name or node.name,
                    ip=member.ip,
                    endpoints=node.seen_endpoints(),
                    local_endpoints=node.local_endpoints,
                    mapped=node.mapped_endpoints,
                    nat_varies=node.nat_varies,
                    online=node.online,
                    last_seen=node.last_seen,
                    device=node.kind == "device",
                )
            )
        return NetworkMap(
            network_id=network.id,
            name=network.name,
            subnet=network.subnet,
            domain=network.dns_domain,
            revision=self.revision(network.id),
            members=tuple(members),
            relays=self.relays,
        )

    def close(self) -> None:
        """Stop pending pushes."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
