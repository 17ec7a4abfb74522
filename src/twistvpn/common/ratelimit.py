"""
Token buckets: the relay's per-node byte rate, the rendezvous's
per-source datagram rate.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime


class TokenBucket:
    """Bytes per second with a burst; C{take} is the per-datagram check."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, amount: int, now: float) -> bool:
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens < amount:
            self.tokens = tokens
            return False
        self.tokens = tokens - amount
        return True


class TokenBuckets:
    """
    Per-source rate limits: C{rate} datagrams a second, bursts of C{burst}.
    Bounded: when full, the table is cleared (a flood of spoofed sources
    must not grow memory).
    """

    def __init__(
        self, clock: IReactorTime, rate: float, burst: float, max_sources: int = 65536
    ) -> None:
        self._clock = clock
        self._rate = rate
        self._burst = burst
        self._max = max_sources
        self._buckets: dict[Any, TokenBucket] = {}

    def allow(self, source: Any, amount: int = 1) -> bool:
        """Take C{amount} (datagrams, or bytes for a byte budget) from C{source}'s bucket."""
        now = self._clock.seconds()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self._max:
                self._buckets.clear()
            bucket = self._buckets[source] = TokenBucket(self._rate, self._burst, now)
        return bucket.take(amount, now)
