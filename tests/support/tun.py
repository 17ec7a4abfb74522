"""
Stand-ins for the kernel under L{twistvpn.node.tun.TunDevice}: pyroute2's
IPRoute and python-pytun's device, patched in for one test.
"""

from __future__ import annotations

import os

from twisted.trial import unittest


class FakeIPRoute:
    """Records netlink requests instead of making them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, object]]] = []

    def link_lookup(self, ifname: str) -> list[int]:
        return [7]

    def _record(self, kind: str, command: str, **kwargs: object) -> None:
        self.calls.append((kind, command, kwargs))

    def link(self, command: str, **kwargs: object) -> None:
        self._record("link", command, **kwargs)

    def addr(self, command: str, **kwargs: object) -> None:
        self._record("addr", command, **kwargs)

    def route(self, command: str, **kwargs: object) -> None:
        self._record("route", command, **kwargs)

    def close(self) -> None:
        self.calls.append(("close", "", {}))


class FakePytunDevice:
    """Stands in for pytun.TunTapDevice with a pipe as the file descriptor."""

    def __init__(self, name: str, flags: int) -> None:
        self.name = name
        self.flags = flags
        self.fd, self.kernel_side = os.pipe()  # we read .fd, the "kernel" writes
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.kernel_side)
        self.closed = True


def patch_pytun(test: unittest.TestCase, offload: bool) -> list[FakePytunDevice]:
    """
    Make pytun create L{FakePytunDevice}s (checking the flags asked for,
    IFF_VNET_HDR with C{offload}); return the list they are added to.
    """
    try:
        import pytun
    except ImportError:
        raise unittest.SkipTest("python-pytun is not installed") from None
    made: list[FakePytunDevice] = []
    expected = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if offload else 0)

    def make(name: str, flags: int) -> FakePytunDevice:
        test.assertEqual(flags, expected)
        device = FakePytunDevice(name, flags)
        made.append(device)
        return device

    test.patch(pytun, "TunTapDevice", make)
    return made
