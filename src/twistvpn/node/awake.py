"""
Staying awake while the tunnel carries traffic.

On a virtual machine a vCPU that has been idle for tens of milliseconds
runs everything several times slower for the first hundred-odd
microseconds after it wakes (the host has put it, or its core, to sleep;
caches and predictors are cold), and an idle flow's packet runs its whole
path through the node in that window.  A process that woke a few
milliseconds ago does not pay it.  Go's runtime keeps its process awake
like this as a side effect (its C{sysmon} thread wakes every 20 µs to
10 ms while the program is busy), which is part of why wireguard-go's idle
round trips were faster than twistvpn's; L{StayAwake} does it on purpose,
and only while packets flow (docs/performance.md, "Staying awake").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twistvpn.wireguard.messages import KEEPALIVE_TIMEOUT

# While packets flow, wake at least this often (seconds) ...
DEFAULT_STAY_AWAKE = 10e-3
# ... until this long after the last one: WireGuard's keepalive timeout.
STAY_AWAKE_PERIOD = KEEPALIVE_TIMEOUT
# A quiet node looks this often whether traffic has started again.
IDLE_LOOK = 1.0


class StayAwake:
    """
    A timer on C{clock} that fires every C{interval} seconds for C{period}
    seconds after C{activity()} (a count, of packets say) last moved, and
    every L{IDLE_LOOK} seconds otherwise, to notice the next traffic; or at
    once, when the one counting L{poke}s it while it is L{idle}.

    Each firing is a reactor wake-up that runs almost nothing: it costs
    microseconds of CPU, about 100 times a second while traffic flows with
    the default interval.
    """

    def __init__(
        self,
        clock: Any,  # IReactorTime
        activity: Callable[[], int],
        interval: float = DEFAULT_STAY_AWAKE,
        period: float = STAY_AWAKE_PERIOD,
        idle_look: float = IDLE_LOOK,
    ) -> None:
        if interval <= 0:
            raise ValueError("the interval must be positive")
        self._clock = clock
        self._activity = activity
        self.interval = interval
        self.period = period
        self._idle_look = idle_look
        self._seen = activity()
        self._until = -math.inf
        self._call: Any = None  # the reactor call (IDelayedCall) while running
        # Whether the next firing is an idle look: the packet path reads it
        # once per wake-up, and pokes only then.
        self.idle = True

    def start(self) -> None:
        if self._call is None:
            self.idle = True
            self._call = self._clock.callLater(self._idle_look, self._fire)

    def poke(self) -> None:
        """
        Traffic has started: stay awake from now on, rather than from the
        next idle look (up to L{IDLE_LOOK} seconds of a new flow's packets
        would find the CPU asleep).
        """
        call = self._call
        if call is None or not self.idle:
            return
        self.idle = False
        call.reset(self.interval)

    def stop(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _fire(self) -> None:
        now = self._clock.seconds()
        count = self._activity()
        if count != self._seen:
            self._seen = count
            self._until = now + self.period
        self.idle = now >= self._until
        delay = self._idle_look if self.idle else self.interval
        self._call = self._clock.callLater(delay, self._fire)
