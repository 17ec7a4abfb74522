"""
The path manager over the simulated network: keepalives against NAT
timeouts, recovery after a NAT reboot, fallback to the relay when a path
dies, upgrade from the relay, retry backoff, ranking and status.
"""

from __future__ import annotations

import random
from dataclasses import replace

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistvpn.testing.pathsim import Pair, SimPeer
from twistvpn.traversal.candidates import Candidates, NatHints, hints_from_observations
from twistvpn.traversal.context import TraversalContext
from twistvpn.traversal.manager import PathConfig, PathManager
from twistvpn.traversal.strategies import PunchStrategy


def first(events, event, kind=None, after=0.0):
    """The time of the first matching manager event at or after C{after}."""
    for t, e, k, _ in events:
        if e == event and (kind is None or k == kind) and t >= after:
            return t
    return None


def ping_arrives(pair: Pair) -> bool:
    """Data sent along each side's chosen path reaches the other side."""
    before = [len(n.inbox.received) for n in pair.nodes]
    for node in pair.nodes:
        node.ping()
    pair.internet.run(1.0)
    return all(len(n.inbox.received) == b + 1 for n, b in zip(pair.nodes, before, strict=True))


class KeepaliveTests(SynchronousTestCase):
    def test_silent_path_kept_alive(self) -> None:
        pair = Pair("easy", "hard", seed=4, mapping_timeout=30.0)
        pair.start()
        pair.run(15.0)
        ma, mb = pair.managers()
        endpoints = (ma.endpoint, mb.endpoint)
        self.assertEqual((ma.kind, mb.kind), ("direct", "direct"))
        pair.internet.run(600.0)  # ten silent minutes: only keepalives
        self.assertEqual((ma.endpoint, mb.endpoint), endpoints)
        self.assertIsNone(first(ma.events, "lost"))
        self.assertIsNone(first(mb.events, "lost"))
        self.assertGreater(ma.keepalives_sent, 600 / 25 - 2)
        self.assertLess(ma.keepalives_sent, 600 / 25 + 5)
        self.assertTrue(ping_arrives(pair))

    def test_without_keepalives_the_mapping_expires(self) -> None:
        """The negative control: probes spaced past the NAT timeout lose the path."""
        config = PathConfig(keepalive_interval=100.0)
        pair = Pair("easy", "hard", seed=4, mapping_timeout=30.0, config=config)
        pair.start()
        pair.run(15.0)
        pair.internet.run(200.0)
        self.assertIsNotNone(first(pair.a.manager.events, "lost"))

    def test_known_mapping_timeout_shortens_keepalive(self) -> None:
        pair = Pair("easy", "easy", seed=1)
        pair.start()
        hints = NatHints(mapping_timeout=20.0)
        manager = pair.a.manager
        manager.update_candidates(local=replace(manager.local, hints=hints))
        self.assertEqual(manager._interval(), 16.0)


class RecoveryTests(SynchronousTestCase):
    def test_nat_reboot_port_preserving(self) -> None:
        """An easy NAT reboots: the next keepalive makes the same mapping again."""
        pair = Pair("easy", "easy", seed=2)
        pair.start()
        pair.run(10.0)
        pair.nats[0].reboot()
        pair.internet.run(60.0)
        ma, mb = pair.managers()
        self.assertEqual((ma.kind, mb.kind), ("direct", "direct"))
        self.assertTrue(ping_arrives(pair))

    def test_nat_reboot_hard_side(self) -> None:
        """
        The hard NAT reboots and its random mapping is gone: both sides
        notice within a keepalive interval plus a few seconds, fall back to
        the relay at once, and birthday finds a new direct path.
        """
        pair = Pair("easy", "hard", seed=6)
        pair.start()
        pair.run(15.0)
        ma, mb = pair.managers()
        old = ma.endpoint
        rebooted = pair.clock.seconds()
        pair.nats[1].reboot()
        pair.internet.run(60.0)
        for manager in (ma, mb):
            lost = first(manager.events, "lost", after=rebooted)
            self.assertIsNotNone(lost)
            self.assertLessEqual(lost - rebooted, 25.0 + 3.0 + 1.0)
            relay = first(manager.events, "chosen", "relay", after=lost)
            self.assertEqual(relay, lost)
            direct = first(manager.events, "chosen", "direct", after=lost)
            self.assertIsNotNone(direct, manager.status())
            self.assertLessEqual(direct - lost, 15.0)
        self.assertEqual((ma.kind, mb.kind), ("direct", "direct"))
        self.assertNotEqual(ma.endpoint, old)
        self.assertTrue(ping_arrives(pair))
        self.assertEqual(ma.history[-1].reason in ("path lost", "peer probing"), True)

    def test_active_path_failure_falls_back_within_seconds(self) -> None:
        pair = Pair("easy", "easyaf", seed=3)
        pair.start()
        pair.run(5.0)
        ma = pair.a.manager
        peer = pair.a.peer

        def traffic() -> None:
            peer.tx_bytes += 1000
            pair.clock.callLater(0.5, traffic)

        traffic()
        pair.internet.run(10.0)  # the heartbeat follows the traffic
        nat = pair.nats[1]
        nat.behavior = replace(nat.behavior, udp_blocked=True)  # the path dies
        died = pair.clock.seconds()
        pair.internet.run(10.0)
        lost = first(ma.events, "lost", after=died)
        self.assertIsNotNone(lost)
        self.assertLessEqual(lost - died, PathConfig().active_interval + 3.0 + 0.5)
        self.assertEqual(ma.kind, "relay")


class UpgradeTests(SynchronousTestCase):
    def test_relay_then_direct_when_udp_returns(self) -> None:
        pair = Pair("easy", "easy", seed=5)
        nat = pair.nats[0]
        nat.behavior = replace(nat.behavior, udp_blocked=True)
        pair.start()
        pair.run(20.0)
        ma, mb = pair.managers()
        self.assertEqual((ma.kind, mb.kind), ("relay", "relay"))
        self.assertTrue(ping_arrives(pair))  # through the relay
        nat.behavior = replace(nat.behavior, udp_blocked=False)
        # The rendezvous sees the node again and hands out new candidates.
        for node in pair.nodes:
            node.discovery.received.clear()
            node.discover(pair.reflectors)
        pair.internet.run(1.0)
        cands = [n.candidates(pair.reflectors) for n in pair.nodes]
        upgraded = pair.clock.seconds()
        ma.update_candidates(local=cands[0], peer=cands[1])
        mb.update_candidates(local=cands[1], peer=cands[0])
        pair.internet.run(5.0)
        self.assertEqual((ma.kind, mb.kind), ("direct", "direct"))
        self.assertLessEqual(first(ma.events, "chosen", "direct") - upgraded, 1.0)
        self.assertTrue(ping_arrives(pair))

    def test_retries_back_off(self) -> None:
        pair = Pair("hard", "hard", seed=1)
        pair.start()
        pair.internet.run(400.0)
        manager = pair.a.manager
        self.assertEqual(manager.kind, "relay")
        retries = [a for a in manager.history if a.reason == "retry"]
        self.assertGreater(len(retries), 3)
        starts = [a.started for a in manager.history]
        ends = [a.finished for a in manager.history[:-1]]
        waits = [s - e for s, e in zip(starts[1:], ends, strict=False)]
        # Doubling from 2 s, each with +-20 % jitter, capped at 120 s.
        for before, after in zip(waits, waits[1:], strict=False):
            self.assertGreater(after, before * 1.3 if before < 60 else 0.6 * before)
        self.assertLessEqual(max(waits), 120 * 1.2)
        manager.punch_now()
        self.assertEqual(manager.history[-1].reason, "punch now")


class RankingTests(SynchronousTestCase):
    def test_lan_beats_hairpin_direct(self) -> None:
        pair = Pair("easy", "easy", seed=1, same_nat=True, hairpin=True)
        pair.start()
        pair.run(5.0)
        pair.internet.run(1.0)
        status = pair.a.manager.status()
        self.assertEqual(status["kind"], "lan")
        kinds = {p["kind"] for p in status["paths"]}
        self.assertEqual(kinds, {"lan", "direct", "relay"})

    def test_faster_path_wins_only_clearly(self) -> None:
        pair = Pair("open", "open", seed=1)
        pair.start()
        pair.run(3.0)
        manager = pair.a.manager
        current = manager.endpoint
        manager.path_verified(("203.0.113.99", 1), manager.rtt * 0.9, "punch")
        self.assertEqual(manager.endpoint, current)
        manager.path_verified(("203.0.113.98", 1), manager.rtt * 0.5, "punch")
        self.assertEqual(manager.endpoint, ("203.0.113.98", 1))


class StatusTests(SynchronousTestCase):
    def test_status_and_stop(self) -> None:
        pair = Pair("easy", "hard", seed=4)
        pair.start()
        pair.run(15.0)
        pair.internet.run(1.0)
        hard = pair.b
        # The winning birthday socket stays open; the other 255 are closed.
        self.assertEqual(len(hard.probes.sockets), 1)
        status = hard.manager.status()
        self.assertEqual(status["kind"], "direct")
        self.assertEqual(status["strategy"], "birthday")
        self.assertIn("via local port", status["endpoint"])
        self.assertGreater(status["rtt"], 0)
        attempt = status["attempts"][0]
        self.assertEqual(attempt["result"], "direct")
        self.assertEqual(attempt["outcomes"]["birthday"], "verified")
        self.assertEqual(attempt["outcomes"]["sequential"], "not applicable")
        self.assertGreater(attempt["probes"], 0)
        for node in pair.nodes:
            node.manager.stop()
        pair.internet.run(100.0)
        self.assertEqual(len(hard.probes.sockets), 0)
        self.assertEqual(pair.clock.getDelayedCalls(), [])

    def test_no_relay_means_none(self) -> None:
        pair = Pair("hard", "hard", seed=1, relay=False)
        pair.start()
        pair.run(5.0)
        self.assertEqual(pair.a.manager.kind, "none")
        self.assertIsNone(pair.a.peer.endpoint)


class StrategyAloneTests(SynchronousTestCase):
    def test_punch_with_a_context(self) -> None:
        """A strategy needs only a context: no path manager involved."""
        pair = Pair("easy", "easyaf", seed=1)
        for node in pair.nodes:
            node.discover(pair.reflectors)
        pair.internet.run(1.0)
        ca, cb = (n.candidates(pair.reflectors) for n in pair.nodes)

        class Quiet:
            def path_verified(self, *a): pass
            def probe_received(self, *a): pass

        pair.a.probes.add_peer(pair.b.public_key, Quiet())
        pair.b.probes.add_peer(pair.a.public_key, Quiet())
        rng = random.Random(0)
        ctx_a = TraversalContext(pair.a.probes, "punch", pair.b.public_key, ca, cb,
                                 pair.a.reactor, rng)
        ctx_b = TraversalContext(pair.b.probes, "punch", pair.a.public_key, cb, ca,
                                 pair.b.reactor, rng)
        done = [PunchStrategy().start(ctx_a), PunchStrategy().start(ctx_b)]
        pair.internet.run(20.0)
        self.assertEqual([self.successResultOf(d) for d in done], [None, None])
        self.assertEqual({p.endpoint for p in ctx_a.verified}, set(cb.public))
        # One opener (hop-limited: it dies in the core), then ten rounds.
        self.assertEqual(ctx_a.probes_sent, 11)
        self.assertEqual(pair.a.probes.counters["opener_sent"], 1)
        self.assertEqual(pair.internet.counters["drop_ttl"], 2)

    def test_cancel_stops_timers(self) -> None:
        pair = Pair("open", "open", seed=1)
        pair.start()
        pair.a.manager.stop()
        pair.b.manager.stop()
        pair.internet.run(1.0)
        rng = random.Random(0)
        peer = SimPeer(pair.b.public_key)
        manager = PathManager(peer, pair.a.probes, pair.a.reactor, local=Candidates(),
                              remote=Candidates(), rng=rng)
        ctx = TraversalContext(pair.a.probes, "punch", pair.b.public_key,
                               Candidates(public=(pair.a.local,)),
                               Candidates(public=(pair.b.local,)), pair.a.reactor, rng)
        d = PunchStrategy().start(ctx)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(pair.clock.getDelayedCalls(), [])
        self.assertEqual(ctx.probes_sent, 0)
        manager.stop()


class HintTests(SynchronousTestCase):
    def test_classification(self) -> None:
        local = ("192.168.1.2", 41641)
        self.assertTrue(hints_from_observations(local, [None, None]).udp_blocked)
        self.assertTrue(hints_from_observations(local, [local, local]).public)
        easy = hints_from_observations(local, [("1.1.1.1", 5), ("1.1.1.1", 5)])
        self.assertTrue(easy.easy)
        seq = hints_from_observations(local, [("1.1.1.1", 5), ("1.1.1.1", 6)])
        self.assertEqual((seq.sequential, seq.port_delta, seq.last_port), (True, 1, 6))
        hard = hints_from_observations(local, [("1.1.1.1", 5), ("1.1.1.1", 40000)])
        self.assertTrue(hard.hard_random)
        collided = hints_from_observations(local, [("1.1.1.1", 5), ("1.1.1.1", 41641)])
        self.assertTrue(collided.easy)  # a neighbour behind the NAT holds 41641 to one server
        unknown = hints_from_observations(local, [("1.1.1.1", 5), None])
        self.assertIsNone(unknown.mapping_varies)
        self.assertFalse(unknown.easy or unknown.hard_random or unknown.sequential)


class RoamingTests(SynchronousTestCase):
    def test_roamed_to_relay_is_undone(self) -> None:
        pair = Pair("easy", "easy", seed=1)
        pair.start()
        pair.run(5.0)
        pair.internet.run(1.0)
        manager = pair.a.manager
        direct = manager.endpoint
        relay = next(p["endpoint"] for p in manager.status()["paths"] if p["kind"] == "relay")
        self.assertTrue(relay.startswith("relay:"))
        # An authenticated packet came through the relay: WireGuard roamed.
        pair.a.peer.endpoint = manager.relay_endpoint
        pair.internet.run(3.0)
        self.assertEqual(pair.a.peer.endpoint, direct)
        self.assertIsNotNone(first(manager.events, "reasserted"))

    def test_roamed_to_unverified_endpoint_is_probed(self) -> None:
        pair = Pair("easy", "easy", seed=1, same_nat=True, hairpin=True)
        pair.start()
        pair.run(5.0)
        pair.internet.run(1.0)
        manager = pair.a.manager
        lan = manager.endpoint
        # Say B's packets arrived through the NAT's hairpin: a direct path
        # the manager has dropped or never verified.
        hairpin = next(p for p in manager._paths.values() if p.kind == "direct")
        manager._forget(hairpin)
        pair.a.peer.endpoint = hairpin.endpoint
        pair.internet.run(3.0)
        paths = {p["endpoint"]: p for p in manager.status()["paths"]}
        self.assertIn("roaming", {p["strategy"] for p in paths.values()})
        self.assertEqual(pair.a.peer.endpoint, lan)  # LAN still ranks first


class _Slow:
    """A strategy that runs until cancelled."""

    name = "slow"

    def applicable(self, context: TraversalContext) -> bool:
        return True

    def start(self, context: TraversalContext) -> Deferred[None]:
        return Deferred()


class _Fails:
    """A strategy that gives up at once."""

    name = "fails"

    def applicable(self, context: TraversalContext) -> bool:
        return True

    def start(self, context: TraversalContext) -> Deferred[None]:
        return succeed(None)  # gave up


class _Probes:
    public_key = b"a" * 32

    def __init__(self) -> None:
        self.sent: list[tuple[object, str]] = []

    def send_probe(self, key: bytes, endpoint: object, tag: str) -> None:
        self.sent.append((endpoint, tag))

    def add_peer(self, key: bytes, manager: object) -> None:
        pass

    def remove_peer(self, key: bytes) -> None:
        pass


class _Peer:
    public_key = b"k" * 32
    endpoint = None


OLD = Candidates(public=(("198.51.100.7", 40000),), local=())


def bare_manager(strategy: object, **kwargs: object) -> tuple[PathManager, _Probes, Clock]:
    """A manager with one strategy, recorded probes and no relay, on a Clock."""
    probes, clock = _Probes(), Clock()
    manager = PathManager(_Peer(), probes, clock,  # type: ignore[arg-type]
                          local=Candidates(public=(), local=()), remote=OLD,
                          strategies=[strategy], **kwargs)  # type: ignore[list-item, arg-type]
    manager.start()
    return manager, probes, clock


class NewCandidateTests(SynchronousTestCase):
    def test_candidates_learned_mid_attempt_are_checked_at_once(self) -> None:
        """
        An endpoint the peer gains while an attempt runs (its port mapping,
        pushed just after the punch began) is probed now, not after the
        attempt failed and backed off.
        """
        manager, probes, clock = bare_manager(_Slow())
        self.assertEqual(probes.sent, [])
        mapped = ("198.51.100.7", 41641)
        manager.update_candidates(peer=Candidates(public=(mapped, *OLD.public), local=()))
        self.assertEqual(probes.sent, [(mapped, "new candidate")])
        clock.advance(1.0)  # unanswered: checked again, as a triggered check is
        self.assertEqual(probes.sent[-1], (mapped, "new candidate"))
        self.assertEqual(len(probes.sent), 2)


class RelayAnswerTests(SynchronousTestCase):
    def test_relay_answer_does_not_end_the_attempt(self) -> None:
        """
        A ping answered through the relay (twistvpn ping) verifies the relay
        path; the attempt's strategies keep looking for a direct one.
        """
        pair = Pair("easy", "hard", seed=2)
        pair.start()
        manager = pair.a.manager
        assert manager is not None
        pair.internet.run(0.6)  # the relay is up; birthday has begun
        self.assertEqual(manager.kind, "relay")
        manager.path_verified(manager.relay_endpoint, 0.08, "ping")
        pair.internet.run(0.3)  # past the settle time a first path would start
        attempt = manager.history[-1]
        self.assertNotEqual(attempt.first_path_strategy, "ping")
        self.assertIn(attempt.outcomes["birthday"], ("running", "verified"))


class RetryTogetherTests(SynchronousTestCase):
    def test_owner_arranges_the_retry(self) -> None:
        """
        When the backoff is over the owner is asked first; while it arranges
        the retry (a punch both sides start at once) this side starts none,
        and punch_now keeps the backoff growing.
        """
        asked: list[float] = []

        def on_retry(manager: PathManager) -> bool:
            asked.append(clock.seconds())
            manager.punch_now()  # what the rendezvous's punch does, at once here
            return True

        manager, _, clock = bare_manager(_Fails(), on_retry=on_retry,
                                         rng=random.Random(1))
        clock.pump([1.0] * 300)
        self.assertGreaterEqual(len(asked), 5)
        gaps = [b - a for a, b in zip(asked, asked[1:], strict=False)]
        self.assertTrue(all(later > earlier for earlier, later in zip(gaps, gaps[1:],
                                                                        strict=False)), gaps)
        self.assertEqual({a.reason for a in manager.history}, {"start", "punch now"})

    def test_alone_when_the_owner_cannot(self) -> None:
        manager, _, clock = bare_manager(_Fails(), on_retry=lambda manager: False)
        clock.pump([1.0] * 3)
        self.assertEqual([a.reason for a in manager.history], ["start", "retry"])
