"""
The node's reactor: Twisted's epoll reactor, with the data plane's
descriptors dispatched directly.

For every event the epoll reactor calls C{log.callWithLogger}, which sets up
a logging context (the selectable's C{logPrefix}, a copied context dict)
around C{_doReadOrWrite}, which checks the event, the descriptor and what
C{doRead} returned.  That is about 12 µs warm; on a path that has been
idle for 50 ms it is 45-75 µs of a wake-up that also has to read, encrypt
and send one packet, because nothing is in the CPU's caches (see
docs/performance.md, "Latency").  A reader added with
L{DataPlaneReactor.addDataPlaneReader} (the TUN device, the UDP port) gets
a plain C{doRead()} call for a plain read event instead; anything else
about it (an error or hang-up event, C{doRead} raising or returning a
reason to disconnect) goes the epoll reactor's way.  Every other
descriptor, and everything else the reactor does, is Twisted's.

Run a node on it with C{twistd --reactor twistvpn twistvpn-node ...}
(C{twisted/plugins/twistvpn_reactors.py}); on any other reactor the node
adds its descriptors with C{addReader} and works the same, a little slower
when idle.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from twisted.internet.epollreactor import EPOLLIN, EPollReactor
from twisted.internet.interfaces import IReadDescriptor
from twisted.python import log
from zope.interface import implementer

from twistvpn.interfaces import IDataPlaneReactor

__all__ = ["DataPlaneReactor", "add_reader", "install"]


@implementer(IDataPlaneReactor)
class DataPlaneReactor(EPollReactor):
    """An epoll reactor that calls data-plane readers' C{doRead} directly."""

    def __init__(self) -> None:
        # The readers dispatched directly (by identity: a descriptor number
        # can be reused by something else once its reader is gone).
        self._data_plane: set[IReadDescriptor] = set()
        super().__init__()

    def addDataPlaneReader(self, reader: IReadDescriptor) -> None:
        self.addReader(reader)
        self._data_plane.add(reader)

    def removeReader(self, reader: IReadDescriptor) -> None:
        self._data_plane.discard(reader)
        super().removeReader(reader)

    def removeAll(self) -> list[Any]:
        self._data_plane.clear()
        return super().removeAll()  # type: ignore[no-any-return]

    def doPoll(self, timeout: float | None) -> None:
        """Twisted's C{EPollReactor.doPoll}, with the direct dispatch."""
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        data_plane = self._data_plane
        _drdw = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event == EPOLLIN and selectable in data_plane:
                try:
                    why = selectable.doRead()
                except BaseException:
                    why = sys.exc_info()[1]
                    log.err(None, f"{type(selectable).__name__}.doRead raised")
                if why:
                    self._disconnectSelectable(selectable, why, True)
            else:
                log.callWithLogger(selectable, _drdw, selectable, fd, event)

    doIteration = doPoll


def add_reader(reactor: Any, reader: IReadDescriptor) -> None:
    """Add a data-plane reader: directly dispatched if C{reactor} can."""
    if IDataPlaneReactor.providedBy(reactor):
        reactor.addDataPlaneReader(reader)
    else:
        reactor.addReader(reader)


def install() -> None:
    """Install L{DataPlaneReactor} as the global reactor (twistd --reactor)."""
    from twisted.internet.main import installReactor

    installReactor(DataPlaneReactor())
