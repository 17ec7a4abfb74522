"""
The path manager: one per peer, it finds, chooses and keeps a path.

It runs every applicable strategy in parallel (strategies that would
disturb each other decline through C{applicable}), collects the paths their
probes verify, and moves the WireGuard peer to the best one: LAN before
direct before relay, then the lowest smoothed RTT.  The chosen path is
probed periodically, often enough to keep NAT mappings open; when it stops
answering the manager falls back (to the relay) within a few seconds and
tries again, with exponential backoff while nothing direct works.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistvpn.interfaces import IPathManager
from twistvpn.traversal.candidates import Candidates, ReactorTime, RelayProvider, Strategy, describe
from twistvpn.traversal.context import TraversalContext
from twistvpn.traversal.probe import BoundEndpoint, ProbeService, address_of
from twistvpn.wireguard.keys import encode_key

LAN, DIRECT, RELAY, NONE = "lan", "direct", "relay", "none"
RANK = {LAN: 0, DIRECT: 1, RELAY: 2}
# An IPv6 path's round trip counts this much when paths of a kind are
# ranked: within 10 %, IPv6 is preferred (below switch_ratio: no flapping).
IPV6_RTT_BONUS = 0.9


def _is_ipv6(endpoint: Any) -> bool:
    address = address_of(endpoint)
    return type(address) is tuple and ":" in str(address[0])
KEEPALIVE = "keepalive"
ROAMING = "roaming"
NEW_CANDIDATE = "new candidate"  # a triggered check of an endpoint learned mid-attempt


@dataclass
class PathConfig:
    """The path manager's timers; defaults follow WireGuard and Tailscale."""

    keepalive_interval: float = 25.0  # idle; shortened to fit known NAT timeouts
    active_interval: float = 2.0  # while the peer carries traffic
    retry_interval: float = 0.5  # between unanswered liveness probes
    dead_after: float = 3.0  # no answer for this long: the path is gone
    settle: float = 0.25  # after a first path, let parallel strategies find a better one
    confirm_after: float = 1.0  # first probe on a new path, so the peer verifies it too
    backoff_initial: float = 2.0
    backoff_max: float = 120.0
    relay_while_trying: bool = True  # Tailscale-like: relay at once, upgrade later
    triggered_holdoff: float = 1.0  # between triggered probes to one endpoint
    triggered_tries: int = 5
    switch_ratio: float = 0.7  # a same-kind path must be this much faster to switch
    history_limit: int = 32

    def __post_init__(self) -> None:
        for name in ("keepalive_interval", "active_interval", "retry_interval",
                     "dead_after", "backoff_initial", "backoff_max"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass
class Path:
    """A verified way to reach the peer."""

    endpoint: Any
    kind: str
    strategy: str
    rtt: float | None
    verified_at: float
    last_reply: float
    awaiting: float | None = None  # first unanswered liveness probe
    last_probe: float | None = None  # last liveness probe (None: probe soon)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "endpoint": describe(self.endpoint),
                "strategy": self.strategy, "rtt": self.rtt, "last_reply": self.last_reply}


@dataclass
class Attempt:
    """One round of strategies, as the status CLI shows it."""

    number: int
    reason: str
    started: float
    finished: float | None = None
    outcomes: dict[str, str] = field(default_factory=dict)
    probes: int = 0
    result: str | None = None  # the kind of the first path found, or "failed"
    first_path_at: float | None = None
    first_path_strategy: str | None = None
    running: dict[str, tuple[Deferred, TraversalContext]] = field(default_factory=dict)
    verified_by: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        return {"number": self.number, "reason": self.reason, "started": self.started,
                "finished": self.finished, "outcomes": dict(self.outcomes),
                "probes": self.probes, "result": self.result,
                "first_path_at": self.first_path_at,
                "first_path_strategy": self.first_path_strategy}


@implementer(IPathManager)
class PathManager:
    """
    Keeps the best working path to one peer.  C{peer} is the WireGuard peer
    (L{IWireGuardPeer}, or anything with C{public_key} and an assignable
    C{endpoint}); the manager moves it by assigning C{peer.endpoint}.
    """

    log = Logger()

    def __init__(self, peer: Any, probes: ProbeService, clock: ReactorTime, *,
                 local: Candidates, remote: Candidates,
                 strategies: Sequence[Strategy] | None = None,
                 relay: RelayProvider | None = None, rng: random.Random | None = None,
                 config: PathConfig | None = None,
                 on_change: Callable[[PathManager], None] | None = None,
                 on_retry: Callable[[PathManager], bool] | None = None) -> None:
        if strategies is None:
            from twistvpn.traversal import load_strategies

            strategies = load_strategies()
        self.peer = peer
        self.peer_key: bytes = peer.public_key
        self.probes = probes
        self.clock = clock
        self.local = local
        self.remote = remote
        self.strategies = list(strategies)
        self.relay = relay
        self.random = rng if rng is not None else random.Random()
        self.config = config if config is not None else PathConfig()
        self.on_change = on_change
        # Asked when a failed attempt's backoff is over: True if the owner
        # arranged the retry (a punch both sides start at once, through the
        # rendezvous); otherwise this side retries alone.
        self.on_retry = on_retry
        self.history: list[Attempt] = []
        self.events: list[tuple[float, str, str, str]] = []  # time, event, kind, detail
        self.keepalives_sent = 0
        self._paths: dict[Any, Path] = {}
        self._current: Path | None = None
        self._attempt: Attempt | None = None
        self._attempts = 0
        self._backoff = self.config.backoff_initial
        self._retry: Any = None
        self._heartbeat_call: Any = None
        self._settle_call: Any = None
        self._triggered: dict[Any, Any] = {}  # endpoint -> pending re-check
        self._relay_endpoint: Any = None
        self._relay_opening = False
        self._running = False
        self._activity: tuple[int, int] | None = None
        probes.add_peer(self.peer_key, self)

    # -- IPathManager ---------------------------------------------------------

    @property
    def kind(self) -> str:
        return self._current.kind if self._current else NONE

    @property
    def endpoint(self) -> Any:
        return self._current.endpoint if self._current else None

    @property
    def rtt(self) -> float | None:
        return self._current.rtt if self._current else None

    @property
    def relay_endpoint(self) -> Any:
        """The relay path's endpoint, once the relay is open."""
        return self._relay_endpoint

    @property
    def strategy(self) -> str | None:
        return self._current.strategy if self._current else None

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        if self.relay is not None and self.config.relay_while_trying:
            self._open_relay()
        self._begin("start")

    def stop(self) -> None:
        self._running = False
        if self._attempt is not None:
            self._cancel_attempt(self._attempt)
        for name in ("_retry", "_heartbeat_call", "_settle_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        for call in self._triggered.values():
            if call.active():
                call.cancel()
        self._triggered.clear()
        for path in list(self._paths.values()):
            self._forget(path)
        self._current = None
        if self.relay is not None and (self._relay_endpoint is not None or self._relay_opening):
            self.relay.close_relay(self.peer_key)
        self._relay_endpoint = None
        self.probes.remove_peer(self.peer_key)

    def update_candidates(self, local: Candidates | None = None,
                          peer: Candidates | None = None) -> None:
        if local is not None:
            self.local = local
        if peer is not None:
            known = set(self.remote.public) | set(self.remote.local)
            self.remote = peer
            if self._attempt is not None and self.kind in (NONE, RELAY):
                # The running attempt's strategies took the old list: check
                # the new endpoints now (ICE adds them to its checklist) rather
                # than after the attempt failed and backed off.
                for endpoint in (*peer.public, *peer.local):
                    if endpoint not in known and endpoint not in self._triggered:
                        self._triggered_check(endpoint, NEW_CANDIDATE, self.config.triggered_tries)
        if self.kind in (NONE, RELAY):
            self._backoff = self.config.backoff_initial
            self._begin("new candidates")

    def punch_now(self) -> None:
        # The backoff is kept: a coordinated retry of a pair that cannot go
        # direct must not come back every 2 s.  What is new (candidates, a
        # lost path, the peer probing) resets it where it is seen.
        if self._attempt is not None:
            self._cancel_attempt(self._attempt)
        self._begin("punch now")

    def status(self) -> dict[str, Any]:
        return {
            "peer": encode_key(self.peer_key),
            "kind": self.kind,
            "endpoint": describe(self.endpoint) if self.endpoint is not None else None,
            "rtt": self.rtt,
            "strategy": self.strategy,
            "paths": [p.as_dict() for p in self._paths.values()],
            "attempts": [a.as_dict() for a in self.history],
            "events": [{"time": t, "event": e, "kind": k, "detail": d}
                       for t, e, k, d in self.events],
        }

    # -- attempts -------------------------------------------------------------

    def _begin(self, reason: str) -> None:
        if not self._running or self._attempt is not None:
            return
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._attempts += 1
        attempt = Attempt(self._attempts, reason, self.clock.seconds())
        self._attempt = attempt
        self.history.append(attempt)
        del self.history[:-self.config.history_limit]
        for strategy in self.strategies:
            context = TraversalContext(self.probes, strategy.name, self.peer_key, self.local,
                                       self.remote, self.clock, self.random)
            try:
                usable = strategy.applicable(context)
            except Exception:
                self.log.failure("strategy {name} failed in applicable()", name=strategy.name)
                usable = False
            if not usable:
                attempt.outcomes[strategy.name] = "not applicable"
                continue
            attempt.outcomes[strategy.name] = "running"
            d = maybeDeferred(strategy.start, context)
            attempt.running[strategy.name] = (d, context)
            d.addBoth(self._strategy_done, attempt, strategy.name)
        if not attempt.running and self._attempt is attempt:
            self._finish(attempt)

    def _strategy_done(self, result: Any, attempt: Attempt, name: str) -> None:
        _, context = attempt.running.pop(name)
        attempt.probes += context.probes_sent
        context.close()
        if name in attempt.verified_by or context.verified:
            outcome = "verified"
        elif isinstance(result, Failure):
            if result.check(CancelledError):
                outcome = "cancelled"
            else:
                outcome = "error"
                self.log.failure("strategy {name} failed", result, name=name)
        else:
            outcome = "gave up"
        attempt.outcomes[name] = outcome
        if not attempt.running and self._attempt is attempt:
            self._finish(attempt)

    def _cancel_attempt(self, attempt: Attempt) -> None:
        for d, _ in list(attempt.running.values()):
            d.cancel()

    def _settled(self) -> None:
        self._settle_call = None
        if self._attempt is not None:
            self._cancel_attempt(self._attempt)

    def _finish(self, attempt: Attempt) -> None:
        attempt.finished = self.clock.seconds()
        self._attempt = None
        if self._settle_call is not None and self._settle_call.active():
            self._settle_call.cancel()
        self._settle_call = None
        if attempt.result is not None:
            self._backoff = self.config.backoff_initial
            return
        attempt.result = "failed"
        if not self._running:
            return
        if self.relay is not None and self.kind == NONE:
            self._open_relay()
        if self.kind in (NONE, RELAY):
            delay = self._backoff * self.random.uniform(0.8, 1.2)
            self._backoff = min(self._backoff * 2, self.config.backoff_max)
            self._retry = self.clock.callLater(delay, self._retry_due)

    def _retry_due(self) -> None:
        self._retry = None
        if self.on_retry is not None and self.on_retry(self):
            return
        self._begin("retry")

    # -- what the probe service tells us --------------------------------------

    def path_verified(self, endpoint: Any, rtt: float, tag: str) -> None:
        if not self._running:
            return
        now = self.clock.seconds()
        path = self._paths.get(endpoint)
        if path is None:
            path = Path(endpoint, self._kind_of(endpoint), tag, rtt, now, now)
            self._paths[endpoint] = path
            if isinstance(endpoint, BoundEndpoint):
                self.probes.sockets.retain(endpoint.socket)
            self.events.append((now, "verified", path.kind, f"{describe(endpoint)} by {tag}"))
        else:
            path.rtt = rtt if path.rtt is None else 0.875 * path.rtt + 0.125 * rtt
            path.last_reply = now
            path.awaiting = None
        attempt = self._attempt
        # The relay answering (a ping through it) is no result of the
        # attempt: it must not end the strategies still looking for a path.
        if attempt is not None and tag != KEEPALIVE and path.kind != RELAY:
            attempt.verified_by.add(tag)
            if attempt.result is None:
                attempt.result = path.kind
                attempt.first_path_at = now
                attempt.first_path_strategy = tag
                self._settle_call = self.clock.callLater(self.config.settle, self._settled)
        self._select()

    def probe_received(self, endpoint: Any, tag: str) -> None:
        if not self._running:
            return
        now = self.clock.seconds()
        path = self._paths.get(endpoint)
        if path is not None and now - path.last_reply < self.config.dead_after:
            return
        if endpoint in self._triggered:
            return  # a triggered check to it is already under way
        if len(self._triggered) > 4096:
            return
        self._triggered_check(endpoint, tag, self.config.triggered_tries)
        if self._attempt is None and self.kind in (NONE, RELAY):
            # The peer is trying: try with it (strategies like birthday need both).
            self._backoff = self.config.backoff_initial
            self._begin("peer probing")

    def _triggered_check(self, endpoint: Any, tag: str, tries: int) -> None:
        """
        The peer's probe got here, so ours may get there: probe back, and
        again while unanswered (a lost check must not leave only one side
        with the path).
        """
        self._triggered.pop(endpoint, None)
        path = self._paths.get(endpoint)
        fresh = path is not None and self.clock.seconds() - path.last_reply < 1.0
        if not self._running or tries <= 0 or fresh:
            return
        self.probes.send_probe(self.peer_key, endpoint, tag)
        if self._attempt is not None:
            self._attempt.probes += 1
        self._triggered[endpoint] = self.clock.callLater(
            self.config.triggered_holdoff, self._triggered_check, endpoint, tag, tries - 1)

    # -- choosing -------------------------------------------------------------

    def _kind_of(self, endpoint: Any) -> str:
        if self._relay_endpoint is not None and endpoint == self._relay_endpoint:
            return RELAY
        if address_of(endpoint) in self.remote.lan_only():
            return LAN
        return DIRECT

    @staticmethod
    def _score(path: Path) -> tuple[int, float]:
        if path.rtt is None:
            return (RANK[path.kind], math.inf)
        # IPv6 crosses no NAT (no mapping to expire or move): it wins
        # unless IPv4 is clearly faster, as Tailscale's magicsock decides.
        bonus = IPV6_RTT_BONUS if _is_ipv6(path.endpoint) else 1.0
        return (RANK[path.kind], path.rtt * bonus)

    def _select(self) -> None:
        if not self._paths:
            best = None
        else:
            best = min(self._paths.values(), key=self._score)
        current = self._current
        if best is None or best is current:
            return
        if current is not None and current.endpoint in self._paths:
            if RANK[best.kind] == RANK[current.kind]:
                if current.rtt is None or best.rtt is None:
                    return
                # Onto IPv6 as soon as it ranks first; otherwise only for a
                # clearly faster path, so that paths do not flap.
                to_ipv6 = _is_ipv6(best.endpoint) and not _is_ipv6(current.endpoint)
                if not to_ipv6 and best.rtt >= current.rtt * self.config.switch_ratio:
                    return
            elif RANK[best.kind] > RANK[current.kind]:
                return
        self._current = best
        self.peer.endpoint = best.endpoint
        self.events.append((self.clock.seconds(), "chosen", best.kind, describe(best.endpoint)))
        if best.kind != RELAY:
            # Probe the new path soon: should the peer not have verified it
            # yet (its own check lost), our probe triggers one.
            best.last_probe = None
            self._schedule_heartbeat(self.config.confirm_after)
        elif self._heartbeat_call is not None and self._heartbeat_call.active():
            self._heartbeat_call.cancel()
        if self.on_change is not None:
            self.on_change(self)

    def _forget(self, path: Path) -> None:
        if self._paths.get(path.endpoint) is path:
            del self._paths[path.endpoint]
            if isinstance(path.endpoint, BoundEndpoint):
                self.probes.sockets.release(path.endpoint.socket)

    # -- keeping the path -----------------------------------------------------

    def _interval(self) -> float:
        """Probe often while traffic flows, else just inside NAT timeouts."""
        active = False
        rx, tx = getattr(self.peer, "rx_bytes", None), getattr(self.peer, "tx_bytes", None)
        if isinstance(rx, int) and isinstance(tx, int):
            active = self._activity is not None and self._activity != (rx, tx)
            self._activity = (rx, tx)
        if active:
            return self.config.active_interval
        interval = self.config.keepalive_interval
        for hints in (self.local.hints, self.remote.hints):
            if hints.mapping_timeout:
                interval = min(interval, 0.8 * hints.mapping_timeout)
        return interval

    def _schedule_heartbeat(self, delay: float) -> None:
        if self._heartbeat_call is not None and self._heartbeat_call.active():
            self._heartbeat_call.cancel()
        self._heartbeat_call = self.clock.callLater(max(0.0, delay), self._heartbeat)

    def _heartbeat(self) -> None:
        """
        Probe the chosen path when due: every few seconds while traffic
        flows, else just inside the NAT timeout; when a probe goes
        unanswered, again and again until C{dead_after}, then give up on it.
        Ticks at least every C{active_interval} to notice traffic starting.
        """
        self._heartbeat_call = None
        path = self._current
        if path is None or path.kind == RELAY or not self._running:
            return
        now = self.clock.seconds()
        self._follow_roaming(path)
        if path.awaiting is not None:
            if now - path.awaiting >= self.config.dead_after:
                self._lost(path)
                return
        else:
            interval = self._interval()
            due = now if path.last_probe is None else path.last_probe + interval
            if now < due:
                self._schedule_heartbeat(min(self.config.active_interval, due - now))
                return
            path.awaiting = now
        path.last_probe = now
        self.keepalives_sent += 1
        self.probes.send_probe(self.peer_key, path.endpoint, KEEPALIVE)
        self._schedule_heartbeat(self.config.retry_interval)

    def _follow_roaming(self, path: Path) -> None:
        """
        WireGuard moves a peer to wherever an authenticated packet came
        from.  An endpoint we have not verified is probed, so that it
        becomes a candidate (and wins if it ranks better); a known path
        that ranks below ours yields to ours again while ours answers.
        """
        actual = self.peer.endpoint
        if actual is None or actual == path.endpoint:
            return
        known = self._paths.get(actual)
        if known is None:
            if type(actual) is tuple or isinstance(actual, BoundEndpoint):
                if actual not in self._triggered:
                    self._triggered_check(actual, ROAMING, 1)
            return
        if path.awaiting is None:
            self.peer.endpoint = path.endpoint
            self.events.append((self.clock.seconds(), "reasserted", path.kind,
                                f"{describe(path.endpoint)} over {describe(actual)}"))

    def _lost(self, path: Path) -> None:
        now = self.clock.seconds()
        self.events.append((now, "lost", path.kind, describe(path.endpoint)))
        self._forget(path)
        # Paths nobody kept alive may have lost their NAT mappings too.
        for other in list(self._paths.values()):
            if other.kind != RELAY and now - other.last_reply > self.config.dead_after:
                self._forget(other)
        self._current = None
        self._select()
        if self.kind == NONE:
            if self.on_change is not None:
                self.on_change(self)
            if self.relay is not None:
                self._open_relay()
        self._backoff = self.config.backoff_initial
        if self._attempt is None:
            self._begin("path lost")

    # -- the relay ------------------------------------------------------------

    def _open_relay(self) -> None:
        if self.relay is None or self._relay_opening or self._relay_endpoint is not None:
            return
        self._relay_opening = True
        d = self.relay.open_relay(self.peer_key)
        d.addCallbacks(self._relay_opened, self._relay_failed)

    def _relay_opened(self, endpoint: Any) -> None:
        self._relay_opening = False
        if not self._running:
            return
        self._relay_endpoint = endpoint
        now = self.clock.seconds()
        self._paths[endpoint] = Path(endpoint, RELAY, RELAY, None, now, now)
        self.events.append((now, "verified", RELAY, describe(endpoint)))
        self._select()

    def _relay_failed(self, failure: Failure) -> None:
        self._relay_opening = False
        self.events.append((self.clock.seconds(), "relay failed", RELAY,
                            failure.getErrorMessage()))
