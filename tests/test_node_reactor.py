"""Tests for twistvpn.node.reactor: the data plane's readers dispatched directly."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.reactors import getReactorTypes
from twisted.internet import error
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.testing import MemoryReactor
from twisted.python import log
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twistvpn.interfaces import IDataPlaneReactor
from twistvpn.node.reactor import DataPlaneReactor, add_reader


@implementer(IReadDescriptor)
class PipeReader:
    """The read end of a pipe; says what each doRead saw and returns C{result}."""

    def __init__(self, result: Any = None, raises: bool = False) -> None:
        self.fd, self.write_fd = os.pipe()
        self.result = result
        self.raises = raises
        self.reads: list[bytes] = []
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "PipeReader"

    def doRead(self) -> Any:
        self.reads.append(os.read(self.fd, 100))
        if self.raises:
            raise ValueError("doRead broke")
        return self.result

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)

    def close(self) -> None:
        for fd in (self.fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class DataPlaneReactorTests(unittest.TestCase):
    """A reactor instance of its own (never run, never installed), polled without waiting."""

    def setUp(self) -> None:
        self.reactor = DataPlaneReactor()
        self.addCleanup(self._close_reactor)
        self.wrapped: list[Any] = []
        original = log.callWithLogger

        def counting(logger: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
            self.wrapped.append(logger)
            return original(logger, func, *args, **kwargs)

        self.patch(log, "callWithLogger", counting)

    def _close_reactor(self) -> None:
        self.reactor.removeAll()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

    def reader(self, **kwargs: Any) -> PipeReader:
        reader = PipeReader(**kwargs)
        self.addCleanup(reader.close)
        # Before its pipe closes (cleanups run last first).
        self.addCleanup(self._forget, reader)
        return reader

    def _forget(self, reader: PipeReader) -> None:
        if reader in self.reactor.getReaders():
            self.reactor.removeReader(reader)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IDataPlaneReactor, self.reactor))

    def test_direct(self) -> None:
        """A data-plane reader's doRead is called without the logging context."""
        reader = self.reader()
        self.reactor.addDataPlaneReader(reader)
        os.write(reader.write_fd, b"x")
        self.reactor.doPoll(0)
        self.assertEqual((reader.reads, self.wrapped), ([b"x"], []))
        self.assertIn(reader, self.reactor.getReaders())

    def test_plain_reader_unchanged(self) -> None:
        """Any other reader goes through Twisted's dispatch as before."""
        reader = self.reader()
        self.reactor.addReader(reader)
        os.write(reader.write_fd, b"y")
        self.reactor.doPoll(0)
        self.assertEqual((reader.reads, self.wrapped), ([b"y"], [reader]))

    def test_removed_then_plain(self) -> None:
        """Removed and added back with addReader, a reader is dispatched the usual way."""
        reader = self.reader()
        self.reactor.addDataPlaneReader(reader)
        self.reactor.removeReader(reader)
        self.assertNotIn(reader, self.reactor.getReaders())
        self.reactor.addReader(reader)
        os.write(reader.write_fd, b"z")
        self.reactor.doPoll(0)
        self.assertEqual(self.wrapped, [reader])

    def test_reason_disconnects(self) -> None:
        """doRead returning a reason disconnects the reader, as Twisted does."""
        reader = self.reader(result=error.ConnectionDone())
        self.reactor.addDataPlaneReader(reader)
        os.write(reader.write_fd, b"x")
        self.reactor.doPoll(0)
        self.assertEqual(len(reader.lost), 1)
        reader.lost[0].trap(error.ConnectionDone)
        self.assertNotIn(reader, self.reactor.getReaders())

    def test_raising_logged_and_disconnected(self) -> None:
        """doRead raising is logged, and the reader disconnected; the reactor goes on."""
        reader = self.reader(raises=True)
        other = self.reader()
        self.reactor.addDataPlaneReader(reader)
        self.reactor.addDataPlaneReader(other)
        os.write(reader.write_fd, b"x")
        os.write(other.write_fd, b"o")
        self.reactor.doPoll(0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(reader.lost), 1)
        self.assertNotIn(reader, self.reactor.getReaders())
        self.assertEqual(other.reads, [b"o"])

    def test_hang_up_goes_twisted_way(self) -> None:
        """An event other than a plain read (the writer closed) is Twisted's to handle."""
        reader = self.reader()
        self.reactor.addDataPlaneReader(reader)
        os.close(reader.write_fd)
        self.reactor.doPoll(0)
        self.assertEqual(self.wrapped, [reader])
        self.assertEqual(len(reader.lost), 1)

    def test_remove_all(self) -> None:
        reader = self.reader()
        self.reactor.addDataPlaneReader(reader)
        self.assertIn(reader, self.reactor.removeAll())
        self.assertEqual(self.reactor._data_plane, set())


class AddReaderTests(unittest.TestCase):
    def test_other_reactor(self) -> None:
        """A reactor without the direct dispatch gets a plain addReader."""
        reactor = MemoryReactor()
        reader = PipeReader()
        self.addCleanup(reader.close)
        add_reader(reactor, reader)
        self.assertEqual(reactor.readers, {reader})

    def test_data_plane_reactor(self) -> None:
        reactor = DataPlaneReactor()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.waker.connectionLost, None)
        reader = PipeReader()
        self.addCleanup(reader.close)
        add_reader(reactor, reader)
        self.assertEqual(reactor._data_plane, {reader})
        reactor.removeReader(reader)


class PluginTests(unittest.TestCase):
    def test_listed(self) -> None:
        """`twistd --reactor twistvpn` finds this module."""
        found = {r.shortName: getattr(r, "moduleName", None) for r in getReactorTypes()}
        self.assertEqual(found.get("twistvpn"), "twistvpn.node.reactor")


class HintTests(unittest.TestCase):
    """A node started on another reactor says how to get the direct dispatch."""

    def started(self, reactor: Any) -> list[str]:
        from twisted.logger import formatEvent, globalLogPublisher

        from twistvpn.node.node_tap import _ReactorHint

        events: list[Any] = []
        observer: Any = events.append  # an ILogObserver: a callable taking the event
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        hint = _ReactorHint(reactor)
        hint.startService()
        hint.stopService()
        return [formatEvent(e) for e in events]

    def test_other_reactor(self) -> None:
        self.assertTrue(any("--reactor twistvpn" in m for m in self.started(MemoryReactor())))

    def test_data_plane_reactor(self) -> None:
        reactor = DataPlaneReactor()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.waker.connectionLost, None)
        self.assertFalse(any("--reactor twistvpn" in m for m in self.started(reactor)))
