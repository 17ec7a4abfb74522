"""
The node's UDP fast path: fewer system calls and less Python per packet.

Two pieces, both thin adapters over a plain socket:

- L{DatagramBatcher} sends on the socket directly (no per-call address
  validation, as Twisted's C{Port.write} does) and groups consecutive
  datagrams to one address into one UDP GSO send (the C{UDP_SEGMENT}
  socket option): the kernel splits the buffer into datagrams, so one
  system call and one trip through the stack carry up to
  L{MAX_SEGMENTS} packets.  What it groups is sent when the batch of
  reads that produced it ends (L{BatchWindow}); the first packet of a
  wake-up is sent at once, before the reader looks for more.
- L{GROPort} is Twisted's UDP port with a receive loop that asks the
  kernel for coalesced datagrams (the C{UDP_GRO} socket option): a GSO
  burst from a peer arrives as one buffer plus its segment size, and is
  split here into the datagrams the peer sent.

Where the kernel refuses GSO (no C{UDP_SEGMENT}, a device without
checksum offload) the batcher falls back to one send per datagram, for
good; where it refuses GRO the port reads one datagram per call, as
Twisted's does.  Datagrams and their order on the wire are the same
either way.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Final

import twisted.internet.udp as udp  # this spelling: mypyc needs the module imported
from twisted.python import log
from zope.interface import implementer

from twistvpn.common.hoplimit import send_hop_limited
from twistvpn.interfaces import IReadinessPort
from twistvpn.node.reactor import add_reader

# linux/udp.h; Python's socket module does not export them.
SOL_UDP: Final = 17
UDP_SEGMENT: Final = 103
UDP_GRO: Final = 104
# The kernel refuses more segments than this in one GSO send (UDP_MAX_SEGMENTS).
MAX_SEGMENTS = 64
# A GSO send is one UDP datagram to the stack: its payload must fit 16 bits
# (IPv4 header and UDP header included).
MAX_GSO_BYTES = 65535 - 20 - 8 - 40
# A coalesced receive is at most one IP packet's worth of payload.
GRO_BUFFER: Final = 65535
# How long a node waits for the answer to a lone packet it sent before
# going back to the reactor (L{AnswerWait}), and how many looks it takes.
DEFAULT_ANSWER_WAIT = 200e-6
MAX_ANSWER_LOOKS = 1000
# Errors meaning "this socket or route cannot do GSO at all".
_GSO_UNSUPPORTED: Final = (errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP)
_ANCILLARY_SPACE: Final = socket.CMSG_SPACE(4)


def segments(data: bytes | memoryview, size: int) -> Iterator[bytes]:
    """Split a coalesced receive into the datagrams it holds (the last may be shorter)."""
    view = memoryview(data)
    for offset in range(0, len(view), size):
        yield view[offset : offset + size].tobytes()


def gro_segment_size(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The segment size the kernel reported with a coalesced receive, or 0."""
    for level, kind, value in ancillary:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            return int.from_bytes(value[:4], sys.byteorder)
    return 0


class BatchWindow:
    """
    When what a reader's reads set off (datagrams to send, packets to
    write) goes out:

    - while a reader reads a batch (it L{hold}s the window of whoever its
      reads feed): when the outermost hold is released, together;
    - while a reader delivers the first item of a wake-up (L{lone}): at
      once, so that it is on its way before the reader looks for more (or
      for the answer), and without the bookkeeping of a batch;
    - otherwise (a timer's keepalive, a relay's delivery): at the end of
      the reactor iteration.
    """

    def __init__(self, clock: Any, flush: Callable[[], None]) -> None:
        self._clock = clock  # IReactorTime
        self._flush = flush
        # Sinks read these two on every item: plain attributes.
        self.held = 0
        self.lone = 0
        self._call: Any = None

    def hold(self) -> None:
        self.held += 1

    def release(self) -> None:
        self.held -= 1
        if not self.held:
            self._flush()

    def opened(self) -> None:
        """Something was queued: make sure it is flushed."""
        if not self.held and self._call is None:
            self._call = self._clock.callLater(0, self._fire)

    def _fire(self) -> None:
        self._call = None
        self._flush()

    def cancel(self) -> None:
        """Forget the scheduled flush (the owner is closing)."""
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None


def hold(window: BatchWindow | None) -> bool:
    """
    A reader found more behind its first item: hold C{window} until the
    batch ends, so that what the rest sets off goes out together; True if
    there was a window to hold.
    """
    if window is None:
        return False
    window.hold()
    return True


class DatagramBatcher:
    """
    Sends datagrams on a UDP socket, a run of datagrams of one size to one
    address at a time as one GSO send.

    A run ends at a datagram to another address, a longer datagram, after
    a shorter one (GSO lets only the last segment be short), at
    L{MAX_SEGMENTS} datagrams or L{MAX_GSO_BYTES} bytes, and at the end of
    the reactor iteration.
    """

    def __init__(
        self,
        sock: Any,  # a socket.socket, or a fake with sendto/sendmsg
        clock: Any,  # IReactorTime
        counters: Counter[str],
        *,
        gso: bool = True,
        max_segments: int = MAX_SEGMENTS,
        max_bytes: int = MAX_GSO_BYTES,
    ) -> None:
        self._sock = sock
        self.counters = counters
        self.gso = gso
        self._max_segments = max_segments
        self._max_bytes = max_bytes
        self._parts: list[bytes] = []
        self._addr: Any = None
        self._size = 0
        self._bytes = 0
        self._short = False
        self.window = BatchWindow(clock, self.flush)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send C{data} to C{addr} (in the socket's address family) soon."""
        window = self.window
        if not self.gso or (window.lone and not window.held):
            if self._parts:
                self.flush()  # keep the order on the wire
            self._send_one(data, addr)
            return
        parts = self._parts
        length = len(data)
        if parts and (
            self._short
            or length > self._size
            or addr != self._addr
            or len(parts) >= self._max_segments
            or self._bytes + length > self._max_bytes
        ):
            self.flush()
            parts = self._parts
        if not parts:
            self._addr = addr
            self._size = length
            self.window.opened()
        elif length < self._size:
            self._short = True
        parts.append(data)
        self._bytes += length

    def flush(self) -> None:
        """Send the run gathered so far."""
        parts = self._parts
        if not parts:
            return
        count = len(parts)
        addr = self._addr
        size = self._size
        # Reset before sending: send() may be re-entered from a fallback.
        self._parts = []
        self._bytes = 0
        self._short = False
        if count == 1:
            self._send_one(parts[0], addr)
            return
        try:
            self._sock.sendmsg(
                [b"".join(parts)],
                [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))],
                0,
                addr,
            )
        except BlockingIOError:
            self.counters["drop_send_error"] += count
            return
        except OSError as e:
            if e.errno in _GSO_UNSUPPORTED:
                # For good: the socket or its route cannot segment.
                self.gso = False
                self.counters["gso_disabled"] += 1
            else:
                # EINVAL when a segment exceeds the route's MTU: send these
                # one by one, so that the kernel fragments them as it would.
                self.counters["gso_fallback"] += 1
            for part in parts:
                self._send_one(part, addr)
            return
        self.counters["gso_sends"] += 1
        self.counters["gso_datagrams"] += count

    def _send_one(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self._sock.sendto(data, addr)
        except OSError:
            # ENETUNREACH, EPERM from a firewall, a full buffer: the packet is
            # lost as it would be on the wire; WireGuard retransmits.
            self.counters["drop_send_error"] += 1

    def send_hop_limited(self, data: bytes, addr: tuple[str, int], hops: int) -> None:
        """Send C{data} now, after what is pending, with a hop limit (an opener)."""
        self.flush()
        try:
            send_hop_limited(self._sock, data, addr, hops)
        except OSError:
            self.counters["drop_send_error"] += 1

    def close(self) -> None:
        """Send what is pending and stop the scheduled flush."""
        self.flush()
        self.window.cancel()


class Readiness:
    """
    Whether a descriptor has something to read, asked without reading: a
    non-blocking read that finds nothing raises an exception, which costs
    tens of microseconds when Python's caches are cold (an idle flow's
    packets come one per wake-up), where an epoll with no wait returns an
    empty list.
    """

    def __init__(self, fd: int) -> None:
        self._epoll = select.epoll()
        self._epoll.register(fd, select.EPOLLIN)
        # C{poll(0)} is a non-empty list when readable: the data path calls
        # the epoll's own method, no Python frame in between.
        self.poll: Callable[[float], list[tuple[int, int]]] = self._epoll.poll

    def close(self) -> None:
        self._epoll.close()


class AnswerWait:
    """
    After a wake-up that sent one packet read from the TUN device (a ping,
    a query, a keystroke: something that expects an answer within a round
    trip), look for the answer for up to C{budget} seconds before going back
    to the reactor, giving the CPU away between looks.

    The answer is then handled by the process that is already running, with
    warm caches, instead of after a sleep in epoll, a wake-up and Twisted's
    dispatch, which cost 100-odd microseconds when the path has been idle.
    Giving the CPU away (C{sched_yield}) between looks is what makes it pay
    on a machine with few cores: the other end, the application and the
    kernel's softirqs run in between; spinning without it made round trips
    slower.  Bounded by time and by L{MAX_ANSWER_LOOKS}; a batch of more
    than one packet (bulk traffic) never waits.
    """

    def __init__(
        self,
        budget: float,
        poll: Callable[[float], list[Any]],
        read: Callable[[], None],
        counters: Counter[str],
        *,
        timer: Callable[[], float] = time.perf_counter,
        pause: Callable[[], None] = os.sched_yield,
        max_looks: int = MAX_ANSWER_LOOKS,
    ) -> None:
        self.budget = budget
        self._poll = poll  # poll(0): non-empty when the answer is there (Readiness.poll)
        self._read = read
        self.counters = counters
        self._timer = timer
        self._pause = pause
        self._max_looks = max_looks
        self._waiting = False

    def __call__(self) -> bool:
        """Wait for the answer; True if it came (and was read)."""
        if self._waiting:
            return False  # called again from what the answer set off
        self._waiting = True
        try:
            poll = self._poll
            timer = self._timer
            deadline = timer() + self.budget
            for _ in range(self._max_looks):
                if poll(0):
                    self.counters["answer_wait_hit"] += 1
                    self._read()
                    return True
                if timer() >= deadline:
                    break
                self._pause()
            self.counters["answer_wait_miss"] += 1
            return False
        finally:
            self._waiting = False


def enable_gro(sock: socket.socket) -> bool:
    """Ask the kernel to coalesce received datagrams; False if it cannot."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


@implementer(IReadinessPort)
class GROPort(udp.Port):
    """
    Twisted's UDP port, reading coalesced datagrams (UDP GRO) and handing
    each datagram in them to the protocol with the sender's address.
    """

    gro = False
    # Held while a batch is read (the TUN device's, so that the packets the
    # batch decrypted are written when it ends).
    read_batch_window: BatchWindow | None = None

    # Whether a datagram is queued, asked without reading (while listening).
    readiness: Readiness | None = None

    def startListening(self) -> None:
        super().startListening()
        self.gro = enable_gro(self.socket)
        self.readiness = Readiness(self.socket.fileno())

    def connectionLost(self, reason: Any = None) -> None:
        if self.readiness is not None:
            self.readiness.close()
            self.readiness = None
        super().connectionLost(reason)

    def startReading(self) -> None:
        add_reader(self.reactor, self)

    def doRead(self) -> None:
        """
        Read datagrams until none is queued (or L{maxThroughput} bytes).

        As the TUN device's reads do, the first datagram is handed on at
        once, with the TUN device's window marked lone (what it decrypts is
        written at once); only then does the port look whether more are
        queued, and if so holds the window until the batch ends.  A
        coalesced burst is held from its first datagram.  One function on
        purpose: after an idle spell every Python call on this path costs
        microseconds.
        """
        sock = self.socket
        receive = self.protocol.datagramReceived
        trim = self.addressFamily == socket.AF_INET6
        readiness = self.readiness
        if readiness is None:
            return  # not listening
        poll = readiness.poll
        window = self.read_batch_window
        held = False
        read = 0
        try:
            while read < self.maxThroughput:
                try:
                    data, ancillary, _, addr = sock.recvmsg(GRO_BUFFER, _ANCILLARY_SPACE)
                except OSError as se:
                    no = se.args[0]
                    if no in udp._sockErrReadIgnore or no in udp._sockErrReadRefuse:
                        return
                    raise
                if trim:
                    addr = addr[:2]  # drop flow info and scope id, as Twisted does
                size = gro_segment_size(ancillary) if ancillary else 0
                if size >= len(data):
                    size = 0  # one datagram
                lone = not read and not size
                if lone:
                    if window is not None:
                        window.lone += 1
                elif not read:
                    held = hold(window)  # a coalesced burst
                read += len(data)
                try:
                    if size:
                        for offset in range(0, len(data), size):
                            receive(data[offset : offset + size], addr)
                    else:
                        receive(data, addr)
                except BaseException:
                    log.err()
                finally:
                    if lone and window is not None:
                        window.lone -= 1
                if not poll(0):
                    return  # nothing more: spare the read that would fail
                if lone:
                    held = hold(window)  # more behind it: a batch after all
        finally:
            if held:
                window.release()  # type: ignore[union-attr]


def listen_udp(reactor: Any, port: int, protocol: Any, interface: str) -> Any:
    """
    Listen with L{GROPort} on a real reactor, with the reactor's own
    C{listenUDP} on anything else (an in-memory reactor in tests).
    """
    from twisted.internet.posixbase import PosixReactorBase

    if isinstance(reactor, PosixReactorBase):
        listening = GROPort(port, protocol, interface, GRO_BUFFER, reactor)
        listening.startListening()
        return listening
    return reactor.listenUDP(port, protocol, interface=interface)

