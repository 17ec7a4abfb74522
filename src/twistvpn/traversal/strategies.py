"""
The built-in traversal strategies.  Their plugin objects (default settings)
are in L{twistvpn.plugins.twistvpn_strategies}; build your own instances to
change the settings.

Each strategy only sends probes through its L{ITraversalContext}; the probe
layer verifies paths and the path manager chooses among them.  Strategies
that could disturb each other decline to run together through
C{applicable}: on a NAT with sequential ports, only L{SequentialStrategy}
opens new mappings, so that its predictions hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.plugin import IPlugin
from zope.interface import implementer

from twistvpn.interfaces import ITraversalStrategy
from twistvpn.traversal.candidates import Address, Context, NatHints
from twistvpn.traversal.probe import address_of

LOW_PORT = 1024
HIGH_PORT = 65535


def paced(context: Context, steps: Iterable[tuple[float, Callable[[], Any]]],
          linger: float) -> Deferred[None]:
    """
    Run C{steps}, each C{(delay after the previous step, action)}, on the
    context's clock, then wait C{linger} seconds for late answers and fire
    None.  Only one timer is pending at a time, however many steps; the
    Deferred's cancellation stops it.
    """
    iterator: Iterator[tuple[float, Callable[[], Any]]] = iter(steps)
    pending: list[Any] = []

    def cancel(d: Deferred[None]) -> None:
        for call in pending:
            if call.active():
                call.cancel()
        pending.clear()

    done: Deferred[None] = Deferred(cancel)

    def step(action: Callable[[], Any] | None) -> None:
        pending.clear()
        if action is not None:
            action()
        try:
            delay, following = next(iterator)
        except StopIteration:
            pending.append(context.clock.callLater(linger, finish))
            return
        pending.append(context.clock.callLater(max(0.0, delay), step, following))

    def finish() -> None:
        pending.clear()
        done.callback(None)

    step(None)
    return done


def rounds(times: Sequence[float], action: Callable[[], Any]) -> list[tuple[float, Callable]]:
    """Steps doing C{action} at each of the absolute C{times}."""
    steps = []
    previous = 0.0
    for t in times:
        steps.append((t - previous, action))
        previous = t
    return steps


def _send_all(context: Context, targets: Sequence[Any]) -> Callable[[], None]:
    def send() -> None:
        for target in targets:
            context.send_probe(target)
    return send


# Openers: a probe's first round goes out with this IP time to live, enough
# to pass our own NAT router (which maps it) and too little to reach the
# peer's router.  A router without a firewall on itself keeps an early
# probe as a connection-tracking entry and then maps its own host's packets
# to that sender from another port (docs/lab.md: the clash); with both
# sides' mappings open before any full probe arrives, there is no early
# probe.  The full rounds start OPEN_LEAD later, time enough for the peer's
# openers too (both sides start within a few milliseconds of the
# rendezvous's "punch now").
OPEN_HOPS = 2
OPEN_LEAD = 0.2


def opening(context: Context, targets: Sequence[Any], times: Sequence[float],
            hops: int | None, lead: float) -> list[tuple[float, Callable]]:
    """
    Steps: openers to C{targets} at once, then full probes at C{times},
    C{lead} later.  Only when both sides are behind NATs: a side with a
    public address has nothing to open, and its probes need no wait either
    (a router it reaches too early maps its host's answer elsewhere, and
    the public side, filtering nothing, answers it there).
    """
    if hops is None or context.local.hints.public or context.peer.hints.public:
        return rounds(times, _send_all(context, targets))

    def open_all() -> None:
        for target in targets:
            context.send_probe(target, hop_limit=hops)

    return [(0.0, open_all), *rounds([t + lead for t in times], _send_all(context, targets))]


def _reachable(context: Context) -> bool:
    """Both sides have a public endpoint and UDP gets out of both."""
    return (bool(context.local.public) and bool(context.peer.public)
            and not context.local.hints.udp_blocked and not context.peer.hints.udp_blocked)


# Tailscale-like spacing: dense at first (both sides start at once), then
# sparse, for ten seconds.
PUNCH_TIMES = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0)
LAN_TIMES = (0.0, 0.1, 0.3, 0.7, 1.5, 3.0)


@implementer(IPlugin, ITraversalStrategy)
class LanStrategy:
    """Probe the peer's own interface addresses: peers behind the same NAT."""

    def __init__(self, name: str = "lan", times: Sequence[float] = LAN_TIMES,
                 linger: float = 1.0) -> None:
        self.name = name
        self.times = tuple(times)
        self.linger = linger

    def applicable(self, context: Context) -> bool:
        return bool(context.peer.lan_only())

    def start(self, context: Context) -> Deferred[None]:
        targets = context.peer.lan_only()
        return paced(context, rounds(self.times, _send_all(context, targets)), self.linger)


@implementer(IPlugin, ITraversalStrategy)
class PunchStrategy:
    """
    Simultaneous open: both sides probe the endpoints the rendezvous
    observed, so each side's outbound probe opens its NAT for the other's.
    """

    def __init__(self, name: str = "punch", times: Sequence[float] = PUNCH_TIMES,
                 linger: float = 1.0, open_hops: int | None = OPEN_HOPS,
                 open_lead: float = OPEN_LEAD) -> None:
        self.name = name
        self.times = tuple(times)
        self.linger = linger
        self.open_hops = open_hops  # None: no openers (see OPEN_HOPS)
        self.open_lead = open_lead

    def targets(self, context: Context) -> tuple[Any, ...]:
        if context.local.hints.sequential:
            # On a sequential-port NAT every new IPv4 destination would take
            # a port that SequentialStrategy has predicted for the peer;
            # IPv6 crosses without a mapping.
            return tuple(t for t in context.peer.public if ":" in address_of(t)[0])
        return tuple(context.peer.public)

    def applicable(self, context: Context) -> bool:
        return _reachable(context) and bool(self.targets(context))

    def start(self, context: Context) -> Deferred[None]:
        steps = opening(context, self.targets(context), self.times, self.open_hops,
                        self.open_lead)
        return paced(context, steps, self.linger)


@implementer(IPlugin, ITraversalStrategy)
class SequentialStrategy:
    """
    Port prediction for NATs that map each new destination to the next
    port: probe the ports the peer's NAT will give its next mappings.  When
    both NATs are sequential, each side's k-th new mapping goes to the
    other's k-th predicted port, so the k-th pair meets.
    """

    def __init__(self, name: str = "sequential", window: int = 16,
                 times: Sequence[float] = PUNCH_TIMES, linger: float = 1.0,
                 open_hops: int | None = OPEN_HOPS, open_lead: float = OPEN_LEAD) -> None:
        if window < 1:
            raise ValueError("the prediction window must be at least 1")
        self.name = name
        self.window = window
        self.times = tuple(times)
        self.linger = linger
        # The openers take the predicted mappings in order; the full
        # probes that follow reuse them.
        self.open_hops = open_hops
        self.open_lead = open_lead

    def applicable(self, context: Context) -> bool:
        local, peer = context.local.hints, context.peer.hints
        if not _reachable(context) or not (local.sequential or peer.sequential):
            return False
        # A random-port side cannot be predicted and cannot predict.
        return not (local.hard_random or peer.hard_random)

    def targets(self, context: Context) -> list[Address]:
        peer: NatHints = context.peer.hints
        if not peer.sequential:
            return list(context.peer.public)
        host = context.peer.public[0][0]
        base = peer.last_port if peer.last_port is not None else context.peer.public[0][1]
        delta = peer.port_delta or 1
        ports = (base + delta * (i + 1) for i in range(self.window))
        return [(host, p) for p in ports if LOW_PORT <= p <= HIGH_PORT]

    def start(self, context: Context) -> Deferred[None]:
        steps = opening(context, self.targets(context), self.times, self.open_hops,
                        self.open_lead)
        return paced(context, steps, self.linger)


@implementer(IPlugin, ITraversalStrategy)
class BirthdayStrategy:
    """
    One side has endpoint-dependent mapping with random ports ("hard"), the
    other not.  The hard side opens C{ports} sockets and probes the easy
    side from each, so that its NAT holds that many mappings toward it; the
    easy side probes C{probes} random ports of the hard side's address at
    C{rate} per second.  Each probe hits one of the mappings with
    probability C{ports}/64512: with 256 and 1024, about 98 % of attempts
    succeed (the birthday paradox, as Tailscale measured).
    """

    def __init__(self, name: str = "birthday", ports: int = 256, probes: int = 1024,
                 rate: float = 100.0, refresh: float = 20.0, start_delay: float = 0.5,
                 linger: float = 2.0, late_after: float = 0.1,
                 late_again: float = 3.0, open_hops: int | None = OPEN_HOPS) -> None:
        if not 1 <= ports <= 4096:
            raise ValueError("birthday: ports must be between 1 and 4096")
        if not 1 <= probes <= HIGH_PORT - LOW_PORT + 1:
            raise ValueError("birthday: probes must be between 1 and 64512")
        if rate <= 0:
            raise ValueError("birthday: rate must be positive")
        self.name = name
        self.ports = ports
        self.probes = probes
        self.rate = rate
        self.refresh = refresh
        self.start_delay = start_delay
        self.linger = linger
        self.late_after = late_after  # the fresh round, this long after the easy side's last
        self.late_again = late_again  # and another, this much later
        # The hard side's rounds only open mappings for the easy side's
        # probes to find: openers, which leave the easy router untouched.
        self.open_hops = open_hops

    def applicable(self, context: Context) -> bool:
        if not _reachable(context):
            return False
        local, peer = context.local.hints, context.peer.hints
        if local.hard_random == peer.hard_random:
            return False
        # The other side must be known to keep one mapping (and a public
        # side needs no birthday: plain probes reach it).
        return (peer if local.hard_random else local).easy

    @property
    def duration(self) -> float:
        """How long the easy side probes."""
        return self.probes / self.rate

    def start(self, context: Context) -> Deferred[None]:
        if context.local.hints.hard_random:
            return self._hard(context)
        return self._easy(context)

    def _hard(self, context: Context) -> Deferred[None]:
        targets = list(context.peer.public)
        sockets: list[Any] = []

        def spray(hops: int | None = self.open_hops) -> None:
            if not sockets:
                sockets.extend(context.open_socket() for _ in range(self.ports))
            for sock in sockets:
                for target in targets:
                    context.send_probe(sock.endpoint(address_of(target)), hop_limit=hops)

        def late() -> None:
            # Fresh mappings, full probes, after the easy side's probes: a
            # fresh mapping that meets one of the easy side's open entries
            # gets in (peer-reflexive, as ICE calls it: the easy side answers
            # where our probe came from).  A second chance, and the only one
            # where the openers die too early (a network of one hop).
            sockets.clear()
            spray(None)

        # Keep the mappings open for as long as the easy side probes.
        times = [self.start_delay]
        while times[-1] + self.refresh < self.start_delay + self.duration:
            times.append(times[-1] + self.refresh)
        steps = list(rounds(times, spray))
        # Twice: the two sides' attempts start a little apart, and the second
        # round still meets the easy side's entries if the first came too early.
        end = self.start_delay + self.duration + self.late_after
        steps += [(end - times[-1], late), (self.late_again, late)]
        return paced(context, steps, self.linger)

    def _easy(self, context: Context) -> Deferred[None]:
        host = context.peer.public[0][0]
        ports = context.random.sample(range(LOW_PORT, HIGH_PORT + 1), self.probes)
        interval = 1.0 / self.rate

        def probe(port: int) -> Callable[[], None]:
            return lambda: context.send_probe((host, port))

        # Start a little after the hard side so that its mappings exist.
        first = self.start_delay + 0.05
        steps = [(first if i == 0 else interval, probe(p)) for i, p in enumerate(ports)]
        return paced(context, steps, self.linger)
