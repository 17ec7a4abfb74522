"""
An in-memory internet for relay tests: UDP sockets whose datagrams arrive
after a latency on a L{Clock}, a switch that blocks UDP for chosen
addresses (a network that only lets TCP out), and TCP connections between a
relay and its clients made of L{StringTransport}s that a L{StreamPump}
moves bytes between.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twistvpn.relay.server import RelayServer
from twistvpn.relay.transport import RelayClientStreamProtocol, relay_stream_factory

Addr = tuple[str, int]


class MemoryUDPTransport:
    """The transport of one bound DatagramProtocol."""

    def __init__(self, internet: MemoryInternet, addr: Addr) -> None:
        self.internet = internet
        self.addr = addr

    def write(self, data: bytes, addr: Addr) -> None:
        self.internet.send(data, self.addr, addr)

    def getHost(self) -> Addr:
        return self.addr


class StreamPump:
    """
    One TCP connection in memory: each side writes to a L{StringTransport};
    L{pump} hands what one side wrote to the other, and a side that lost its
    connection takes the other with it once its bytes are through.
    """

    def __init__(self, client: IProtocol, server: IProtocol) -> None:
        self.client = client
        self.server = server
        self.client_transport = StringTransport()
        self.server_transport = StringTransport()
        self.closed = False
        server.makeConnection(self.server_transport)
        client.makeConnection(self.client_transport)

    def flush(self, limit: int = 100) -> None:
        """Pump until nothing moves (at most C{limit} rounds)."""
        for _ in range(limit):
            if not self.pump():
                return

    def pump(self) -> bool:
        """Move what each side wrote; C{True} if any byte moved."""
        if self.closed:
            return False
        moved = False
        for transport, receiver in ((self.client_transport, self.server),
                                    (self.server_transport, self.client)):
            data = transport.value()
            if data:
                transport.clear()
                receiver.dataReceived(data)
                moved = True
        if self.client_transport.disconnecting or self.server_transport.disconnecting:
            self.closed = True
            reason = Failure(ConnectionDone())
            self.server.connectionLost(reason)
            self.client.connectionLost(reason)
            moved = True
        return moved


class MemoryInternet:
    """Delivers datagrams between bound protocols; UDP can be blocked per address."""

    def __init__(self, clock: Clock, latency: float = 0.005) -> None:
        self.clock = clock
        self.latency = latency
        self.sockets: dict[Addr, Any] = {}
        self.udp_blocked: set[Addr] = set()
        self.pumps: list[StreamPump] = []
        self.extra_latency: dict[Addr, float] = {}  # added to datagrams to or from
        self.path_latency: dict[frozenset[Addr], float] = {}  # added between two addresses
        self.sent = 0
        self.lost = 0

    def bind(self, protocol: Any, addr: Addr) -> None:
        self.sockets[addr] = protocol
        protocol.makeConnection(MemoryUDPTransport(self, addr))

    def send(self, data: bytes, src: Addr, dst: Addr) -> None:
        self.sent += 1
        if src in self.udp_blocked or dst in self.udp_blocked:
            self.lost += 1
            return
        latency = (self.latency + self.extra_latency.get(src, 0.0)
                   + self.extra_latency.get(dst, 0.0)
                   + self.path_latency.get(frozenset((src, dst)), 0.0))
        self.clock.callLater(latency, self._deliver, data, src, dst)

    def _deliver(self, data: bytes, src: Addr, dst: Addr) -> None:
        protocol = self.sockets.get(dst)
        if protocol is None:
            self.lost += 1
            return
        protocol.datagramReceived(data, src)

    def stream_connector(self, server: RelayServer) -> Any:
        """A C{connect_stream} for a RelayClient, connecting to C{server}."""
        factory = relay_stream_factory(server)

        def connect(info: Any, receiver: Any) -> Deferred[Any]:
            server_proto = factory.buildProtocol(None)
            assert server_proto is not None
            client_proto = RelayClientStreamProtocol(receiver, tls=False)
            pump = StreamPump(client_proto, server_proto)
            self.pumps.append(pump)
            return client_proto.ready

        return connect

    def run(self, seconds: float, step: float = 0.005) -> None:
        """Let C{seconds} of simulated time pass, moving every byte."""
        steps = max(1, round(seconds / step))
        for _ in range(steps):
            self.flush()
            self.clock.advance(step)
        self.flush()

    def flush(self) -> None:
        for _ in range(100):
            moved = False
            for pump in list(self.pumps):
                if pump.pump():
                    moved = True
                if pump.closed:
                    self.pumps.remove(pump)
            if not moved:
                return
