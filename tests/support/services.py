"""
The rendezvous service built by its tap on a memory reactor, for tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.support.reactor import FakeReactor as _FakeReactor
from twistvpn.rendezvous.rendezvous_tap import Options, makeService
from twistvpn.rendezvous.service import RendezvousService


def parse_rendezvous(test: SynchronousTestCase, *args: str,
                     hostname: str = "203.0.113.5") -> Options:
    """The rendezvous's options in a fresh data directory, admin HTTP off."""
    tmp = tempfile.mkdtemp(prefix="tvrr")
    test.addCleanup(shutil.rmtree, tmp, True)
    options = Options()
    options.parseOptions(
        ["--data-dir", os.path.join(tmp, "d"), "--hostname", hostname, "--admin-http", "none",
         *args]
    )
    return options


def start_rendezvous(test: SynchronousTestCase,
                     options: Options) -> tuple[RendezvousService, SocketReactor]:
    """The service its tap makes of C{options}, started on a memory reactor."""
    reactor = SocketReactor()

    def close_sockets() -> None:
        for s in reactor.sockets:
            s.close()

    test.addCleanup(close_sockets)
    service = makeService(options, reactor)
    assert isinstance(service, RendezvousService)
    service.startService()
    test.addCleanup(service.stopService)
    return service, reactor


class SocketReactor(_FakeReactor):
    """Its UDP ports have a socket (unbound) whose buffers the relay sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.sockets: list[socket.socket] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 0):
        listening = super().listenUDP(port, protocol, interface, maxPacketSize)
        listening.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sockets.append(listening.socket)
        return listening
