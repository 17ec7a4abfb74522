"""
TUN devices: the kernel's side of the VPN.

L{TunDevice} is the real thing (python-pytun for the file descriptor,
pyroute2 for addresses and routes, registered with the reactor as a
reader); L{twistvpn.testing.faketun.FakeTunDevice} keeps everything in
memory for tests.  Both implement L{ITunDevice}, so the node service never
knows which it has.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Final

from mypy_extensions import mypyc_attr
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import classImplements

from twistvpn.interfaces import IWindowedTunDevice
from twistvpn.node.awake import DEFAULT_STAY_AWAKE, StayAwake
from twistvpn.node.fastpath import DEFAULT_ANSWER_WAIT, BatchWindow, Readiness, hold
from twistvpn.node.offload import (
    MAX_IP_PACKET,
    PLAIN,
    TUN_OFFLOADS,
    TUNSETOFFLOAD,
    VNET_F_NEEDS_CSUM,
    VNET_GSO_NONE,
    VNET_GSO_TCPV4,
    VNET_GSO_TCPV6,
    VNET_HEADER,
    VNET_HEADER_SIZE,
    coalesce,
    complete_read,
    segment,
    tso_pays,
)
from twistvpn.node.reactor import add_reader

DEFAULT_MTU = 1420
IFA_F_NODAD = 0x02  # linux/if_addr.h
DEFAULT_NAME = "twvpn0"
# How many packets one reactor wake-up may read before yielding to the
# other descriptors (the UDP socket above all).
READ_BATCH: Final = 64
# Linux interface names are at most IFNAMSIZ - 1 characters.
MAX_NAME_LENGTH = 15

Receiver = Callable[[bytes], None]


_log: Final = Logger(namespace=__name__)  # named: a compiled module has no frame to infer it from


@mypyc_attr(native_class=False)  # mypyc cannot compile OSError subclasses
class TunError(OSError):
    """The TUN device could not be created; the message says why."""


def _explain(name: str, error: OSError) -> str:
    hints = {
        errno.EPERM: "creating TUN devices needs root (or CAP_NET_ADMIN)",
        errno.EACCES: "creating TUN devices needs root (or CAP_NET_ADMIN)",
        errno.ENOENT: "/dev/net/tun is missing (modprobe tun)",
        errno.ENODEV: "/dev/net/tun is missing (modprobe tun)",
        errno.EINVAL: "is the name taken by a device that is not a TUN device?",
        errno.EBUSY: "another process holds a TUN device of that name",
    }
    hint = hints.get(error.errno or 0)
    detail = error.strerror or str(error)
    return f"cannot create TUN device {name}: {detail}" + (f" ({hint})" if hint else "")


def validate_interface_name(name: str) -> str:
    """
    Return C{name} if the kernel would take it as an interface name, raise
    ValueError saying why not otherwise.
    """
    if not name or len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"interface name must be 1 to {MAX_NAME_LENGTH} characters")
    if name in (".", "..") or any(c in name for c in "/:% ") or not name.isprintable():
        raise ValueError(f"interface name {name!r} has characters the kernel refuses")
    return name


def parse_interface_address(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """An interface address in CIDR form; a bare address gets a host prefix."""
    return ipaddress.ip_interface(text.strip())


# The lab's and the tests' fake device (twistvpn.testing.faketun) is
# interpreted and inherits from it.
@mypyc_attr(allow_interpreted_subclasses=True)
class TunBase:
    """The bookkeeping the real and the fake device share."""

    def __init__(self, name: str, mtu: int) -> None:
        self.name = validate_interface_name(name)
        if not 68 <= mtu <= 65535:
            raise ValueError(f"MTU {mtu} is outside 68..65535")
        self.mtu = mtu
        self.addresses: tuple[str, ...] = ()
        self.routes: list[str] = []
        self.sources: dict[str, str | None] = {}  # route -> its source address
        self.counters: Counter[str] = Counter()
        self._receiver: Receiver | None = None

    def _deliver(self, packet: bytes) -> None:
        receiver = self._receiver
        if receiver is None:
            self.counters["drop_not_reading"] += 1
            return
        self.counters["rx_packets"] += 1
        receiver(packet)

    @staticmethod
    def _normalise_route(cidr: str) -> str:
        return str(ipaddress.ip_network(cidr, strict=False))


class TunDevice(TunBase):
    """
    A kernel TUN device (IFF_TUN | IFF_NO_PI), read without blocking from
    the reactor.

    With C{offload} (the default) the device also has a virtio-net header
    (IFF_VNET_HDR): packets written in one reactor iteration are written
    at its end, runs of TCP segments joined into one
    (L{twistvpn.node.offload.coalesce}), so that the kernel's TCP stack
    takes them in one pass.  With C{tso} (the default where
    L{twistvpn.node.offload} runs compiled) the kernel is also asked for
    TSO and checksum offload (TUNSETOFFLOAD): it hands over TCP packets of
    up to 64 KiB, cut here into the segments it would have sent
    (L{twistvpn.node.offload.segment}), and leaves checksums to us.

    The device exists from construction until L{close}; it is not
    persistent, so the kernel also removes it (and its routes) if the
    process dies.
    """

    def __init__(
        self,
        reactor: Any,  # IReactorFDSet
        name: str = DEFAULT_NAME,
        mtu: int = DEFAULT_MTU,
        iproute: Any = None,
        offload: bool = True,
        read_after_write: bool = True,
        answer_wait: float = DEFAULT_ANSWER_WAIT,
        stay_awake: float = DEFAULT_STAY_AWAKE,
        tso: bool | None = None,
    ) -> None:
        import pytun  # only the real device needs the C extension

        super().__init__(name, mtu)
        self._reactor = reactor
        flags = pytun.IFF_TUN | pytun.IFF_NO_PI
        try:
            self._tun = pytun.TunTapDevice(
                name=name, flags=flags | (pytun.IFF_VNET_HDR if offload else 0)
            )
        except OSError as e:
            raise TunError(_explain(name, e)) from e
        self.offload = offload
        self.tso = False
        if offload and (tso_pays() if tso is None else tso):
            try:
                fcntl.ioctl(self._tun.fileno(), TUNSETOFFLOAD, TUN_OFFLOADS)
            except OSError as e:
                _log.warn("{name}: no TSO ({error}); reading plain packets",
                          name=name, error=e)
            else:
                self.tso = True
        # Read at once after writing a batch (see flush).
        self.read_after_write = read_after_write
        # Seconds to wait for the answer after sending a lone packet
        # (fastpath.AnswerWait; 0: never), and the wait itself, which the
        # node service makes once the socket the answer comes on exists.
        self.answer_wait = answer_wait
        # While packets flow, wake the reactor at least this often (seconds;
        # 0: never), while reading (twistvpn.node.awake).
        self._awake = StayAwake(reactor, self.traffic, stay_awake) if stay_awake else None
        self.after_lone_read: Callable[[], object] | None = None
        # Held while a batch is read (the UDP sender's, so that what the
        # batch encrypted is sent when it ends).
        self.read_batch_window: BatchWindow | None = None
        # When packets written are flushed.
        self.window = BatchWindow(reactor, self.flush)
        self._pending: list[bytes] = []
        self.name = self._tun.name
        self._log_prefix = f"TunDevice({self.name})"
        self._fd = self._tun.fileno()
        os.set_blocking(self._fd, False)
        self._readiness = Readiness(self._fd)
        self._poll = self._readiness.poll  # poll(0): non-empty when a packet is queued
        # Room for a packet bigger than the MTU, so that one is read whole
        # and can be counted rather than split.
        self._read_size = (
            MAX_IP_PACKET + VNET_HEADER_SIZE if self.tso
            else max(mtu, 1500) + 64 + (VNET_HEADER_SIZE if offload else 0)
        )
        if iproute is None:
            from pyroute2 import IPRoute

            iproute = IPRoute()
        self._ipr = iproute
        try:
            self._index: int = self._ipr.link_lookup(ifname=self.name)[0]
            self._ipr.link("set", index=self._index, mtu=mtu)
        except Exception:
            self._readiness.close()
            self._tun.close()
            self._ipr.close()
            raise
        self._reading = False
        self._in_read = False
        self._closed = False

    # -- IReadDescriptor --------------------------------------------------------

    def fileno(self) -> int:
        return -1 if self._closed else self._fd

    def logPrefix(self) -> str:
        return self._log_prefix

    def doRead(self) -> None:
        """
        Read a batch, then, if it was one packet, look for its answer
        (L{after_lone_read}).

        The first packet is delivered at once, with the sender's window
        marked lone, so it is sent before anything else happens; then the
        device looks whether more are queued: if not (an idle flow), the
        read that would fail is spared; if so, the window is held until the
        batch ends, so that what the rest encrypted goes out together.  One
        function on purpose: after an idle spell every Python call on this
        path costs microseconds.
        """
        receiver = self._receiver
        if receiver is None:
            return
        window = self.read_batch_window
        fd = self._fd
        size = self._read_size
        offload = self.offload
        counters = self.counters
        delivered = 0
        held = False
        self._in_read = True
        try:
            for _ in range(READ_BATCH):
                try:
                    packet = os.read(fd, size)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno == errno.EINTR:
                        continue
                    counters["read_error"] += 1
                    _log.warn("reading {name} failed: {error}", name=self.name, error=e)
                    break
                if not packet:
                    break
                if offload:
                    if len(packet) <= VNET_HEADER_SIZE:
                        counters["drop_offload"] += 1
                        continue
                    if packet[1] != VNET_GSO_NONE:
                        # A TSO packet (without TSO the kernel sends none).
                        segments = self._segmented(packet) if self.tso else None
                        if segments is None:
                            counters["drop_offload"] += 1
                            continue
                        # Bulk: held from the first segment, as a GRO buffer.
                        counters["rx_tso"] += 1
                        if not held:
                            held = hold(window)
                        delivered += self._deliver_segments(segments, receiver)
                        if self._receiver is not receiver or delivered >= READ_BATCH:
                            break
                        continue
                    if packet[0] & VNET_F_NEEDS_CSUM:
                        # A checksum left to us (with TSO only).
                        done = complete_read(packet) if self.tso else None
                        if done is None:
                            counters["drop_offload"] += 1
                            continue
                        packet = done
                    else:
                        packet = packet[VNET_HEADER_SIZE:]
                first = not delivered
                if first and window is not None:
                    window.lone += 1
                delivered += 1
                try:
                    self._hand_on(receiver, packet)
                finally:
                    if first and window is not None:
                        window.lone -= 1
                if self._receiver is not receiver:
                    break  # stopped (or replaced) by what the packet set off
                if first:
                    if not self._poll(0):
                        break  # the only one: spare the read that would fail
                    held = hold(window)
        finally:
            self._in_read = False
            if held:
                window.release()  # type: ignore[union-attr]
        if delivered == 1 and self.after_lone_read is not None:
            self.after_lone_read()  # a lone packet sent: look for its answer
        awake = self._awake
        if awake is not None and delivered and awake.idle:
            awake.poke()  # traffic after a quiet spell

    def _segmented(self, data: bytes) -> list[bytes] | None:
        """The segments of a TSO read (virtio-net header, packet); None if malformed."""
        flags, gso, _, size, start, _ = VNET_HEADER.unpack_from(data)
        if (gso == VNET_GSO_TCPV4 or gso == VNET_GSO_TCPV6) and flags & VNET_F_NEEDS_CSUM:
            return segment(data, start, size, VNET_HEADER_SIZE)
        return None

    def _hand_on(self, receiver: Receiver, packet: bytes) -> None:
        """One packet read, counted; what the receiver raises is logged, not raised."""
        self.counters["rx_packets"] += 1
        try:
            receiver(packet)
        except Exception:
            self.counters["drop_receiver_error"] += 1
            _log.failure("packet receiver raised")

    def _deliver_segments(self, segments: list[bytes], receiver: Receiver) -> int:
        """Hand on the segments of one read; how many were handed on."""
        count = 0
        for packet in segments:
            count += 1
            self._hand_on(receiver, packet)
            if self._receiver is not receiver:
                break
        return count

    def connectionLost(self, reason: Failure) -> None:
        self._reading = False

    # -- ITunDevice ---------------------------------------------------------------

    def start_reading(self, receiver: Receiver) -> None:
        self._receiver = receiver
        if not self._reading and not self._closed:
            self._reading = True
            add_reader(self._reactor, self)
            if self._awake is not None:
                self._awake.start()

    def stop_reading(self) -> None:
        if self._reading:
            self._reactor.removeReader(self)
            self._reading = False
            if self._awake is not None:
                self._awake.stop()
        self._receiver = None

    def traffic(self) -> int:
        """Packets read and written so far: what keeps the reactor awake."""
        counters = self.counters
        return counters["rx_packets"] + counters["tx_packets"]

    def write(self, packet: bytes) -> None:
        if self._closed:
            self.counters["drop_closed"] += 1
            return
        if not self.offload:
            self._write(packet)
            return
        pending = self._pending
        pending.append(packet)
        window = self.window
        if window.lone and not window.held:
            self.flush()  # the answer to a lone datagram: written at once
        elif len(pending) == 1:
            window.opened()

    def flush(self) -> None:
        """
        Write what this reactor iteration delivered, TCP segments joined;
        then read what the writes made the kernel answer.

        The kernel answers an ICMP echo request and acknowledges TCP
        segments in the write itself, so the answer is in the device's queue
        when the write returns: reading it now sends it on in the same
        wake-up, with warm caches, instead of after another trip through the
        reactor (about 40 µs of an idle round trip).
        """
        pending = self._pending
        if not pending or self._closed:
            return
        self._pending = []
        self.counters["tx_packets"] += len(pending)
        if len(pending) == 1:
            self._write(PLAIN + pending[0])  # nothing to join
        else:
            for data in coalesce(pending):
                self._write(data)
        if self.read_after_write and self._reading and not self._in_read and self._poll(0):
            self.counters["read_after_write"] += 1
            self.doRead()
        awake = self._awake
        if awake is not None and awake.idle:
            awake.poke()  # traffic after a quiet spell

    def _write(self, data: bytes) -> None:
        try:
            os.write(self._fd, data)
        except BlockingIOError:
            self.counters["drop_tun_full"] += 1
        except OSError as e:
            # EINVAL for a packet the kernel cannot parse: count, carry on.
            self.counters["drop_write_error"] += 1
            _log.debug("writing to {name} failed: {error}", name=self.name, error=e)
        else:
            if not self.offload:
                self.counters["tx_packets"] += 1

    def set_addresses(self, addresses: Iterable[str]) -> None:
        # New ones first, then the old ones go: removing a device's last
        # IPv4 address makes the kernel drop every route through it.
        wanted = [parse_interface_address(a) for a in addresses]
        have = [parse_interface_address(a) for a in self.addresses]
        for iface in wanted:
            if iface not in have:
                # IPv6 without duplicate address detection: a tentative
                # address cannot be a route's source (EINVAL), and our
                # overlay addresses are ours by construction.
                extra = {"flags": IFA_F_NODAD} if iface.version == 6 else {}
                self._ipr.addr(
                    "add",
                    index=self._index,
                    address=str(iface.ip),
                    prefixlen=iface.network.prefixlen,
                    **extra,
                )
        for iface in have:
            if iface not in wanted:
                self._ignore_missing(
                    self._ipr.addr,
                    "del",
                    index=self._index,
                    address=str(iface.ip),
                    prefixlen=iface.network.prefixlen,
                )
        self.addresses = tuple(str(i) for i in wanted)
        self._ipr.link("set", index=self._index, state="up")

    def add_route(self, cidr: str, source: str | None = None) -> None:
        route = self._normalise_route(cidr)
        if self.sources.get(route, "") == source:
            return
        if source is None:
            self._ipr.route("replace", dst=route, oif=self._index)
        else:
            self._ipr.route("replace", dst=route, oif=self._index, prefsrc=source)
        self.sources[route] = source
        if route not in self.routes:
            self.routes.append(route)

    def remove_route(self, cidr: str) -> None:
        route = self._normalise_route(cidr)
        if route in self.routes:
            self.routes.remove(route)
        self.sources.pop(route, None)
        if not self._closed:
            self._ignore_missing(self._ipr.route, "del", dst=route, oif=self._index)

    def close(self) -> None:
        if self._closed:
            return
        self.stop_reading()
        self.flush()
        self.window.cancel()
        for route in list(self.routes):
            self.remove_route(route)
        self._ignore_missing(self._ipr.link, "del", index=self._index)
        self._closed = True
        self._readiness.close()
        self._tun.close()
        self._ipr.close()

    @staticmethod
    def _ignore_missing(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run a netlink request whose target may already be gone."""
        from pyroute2 import NetlinkError

        try:
            call(*args, **kwargs)
        except NetlinkError as e:
            if e.code not in (errno.ESRCH, errno.ENOENT, errno.ENODEV, errno.EADDRNOTAVAIL):
                raise


# Not @implementer: a class decorator would keep the compiled build from
# compiling the device as a native class (docs/performance.md).
classImplements(TunDevice, IWindowedTunDevice, IReadDescriptor)
