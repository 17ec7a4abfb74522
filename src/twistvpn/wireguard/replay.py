"""
The sliding window that refuses replayed transport counters (whitepaper
section 5.4.6, RFC 6479).

A Python integer is the bitmap: bit i says that counter C{last - i} has been
seen.  Shifting a 2048-bit integer costs about as much as wireguard-go's
word-by-word ring, and the common case (the next counter in order) is one
shift, one or and one mask.
"""

from __future__ import annotations

from typing import Final

from twistvpn.wireguard.messages import REJECT_AFTER_MESSAGES

WINDOW_SIZE: Final = 2048
_MASK: Final = (1 << WINDOW_SIZE) - 1


class ReplayWindow:
    """
    Accepts each counter at most once, and none older than the window
    behind the highest counter accepted so far.
    """

    __slots__ = ("last", "bitmap")

    def __init__(self) -> None:
        self.last = -1
        self.bitmap = 0

    def accept(self, counter: int) -> bool:
        """
        Record C{counter} and say whether it is fresh.  Call only after the
        message has authenticated, so forgeries cannot move the window.
        """
        last = self.last
        if counter > last:
            if counter >= REJECT_AFTER_MESSAGES:
                return False
            shift = counter - last
            if shift >= WINDOW_SIZE:
                self.bitmap = 1
            else:
                self.bitmap = ((self.bitmap << shift) | 1) & _MASK
            self.last = counter
            return True
        diff = last - counter
        if diff >= WINDOW_SIZE:
            return False
        bit = 1 << diff
        if self.bitmap & bit:
            return False
        self.bitmap |= bit
        return True
