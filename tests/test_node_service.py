"""Tests for the static-mode node service and its twistd options."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import address
from twisted.internet.task import Clock
from twisted.names.test.test_util import MemoryReactor
from twisted.python import usage
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.support.fakes import FakeWireGuardDevice
from tests.support.files import write_file
from tests.support.node import CONFIG, PEER1, PEER2, PRIVATE, PSK, FakeNode
from twistvpn.interfaces import (
    IBatchReader,
    IReadinessPort,
    IWindowedTunDevice,
    IWireGuardDevice,
    IWireGuardPeer,
)
from twistvpn.node import datapath as datapath_module
from twistvpn.node import node_tap
from twistvpn.node.config import parse_config
from twistvpn.node.datapath import DataPath
from twistvpn.node.fastpath import AnswerWait, BatchWindow
from twistvpn.node.service import (
    NodeStartError,
    StaticNodeService,
    resolve_endpoint,
    routed_prefixes,
)
from twistvpn.testing.faketun import FakeTunDevice
from twistvpn.wireguard.keys import encode_key


class StaticNodeServiceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        self.tuns: list[FakeTunDevice] = []
        self.devices: list[FakeWireGuardDevice] = []
        self.service = self.make_service(parse_config(CONFIG, "wg0.conf"))

    def make_service(self, config: Any, **kwargs: Any) -> StaticNodeService:
        node = FakeNode(self.reactor, config, **kwargs)
        # Share the lists, so tests see what any service of theirs made.
        node.tuns, node.devices = self.tuns, self.devices
        return node.service

    def test_fakes(self) -> None:
        device = FakeWireGuardDevice(PRIVATE, self.reactor, None, None)
        verifyObject(IWireGuardDevice, device)
        verifyObject(IWireGuardPeer, device.add_peer(PEER1))

    def test_start(self) -> None:
        self.service.startService()
        [tun] = self.tuns
        [device] = self.devices
        self.assertEqual((tun.name, tun.mtu, tun.addresses), ("tvtest0", 1380, ("100.64.0.1/24",)))
        # Default routes would swallow the tunnel's own traffic: left out, with a warning.
        self.assertEqual(tun.routes, ["100.64.0.2/32", "100.64.8.0/24", "100.64.0.3/32"])
        self.assertEqual(device.clock, self.reactor)
        self.assertEqual(
            device.added,
            [
                dict(
                    public_key=PEER1,
                    preshared_key=PSK,
                    endpoint=("203.0.113.2", 51820),
                    allowed_ips=("100.64.0.2/32", "100.64.8.0/24"),
                    persistent_keepalive=25,
                ),
                dict(
                    public_key=PEER2,
                    preshared_key=None,
                    endpoint=None,
                    allowed_ips=("100.64.0.3/32", "0.0.0.0/0"),
                    persistent_keepalive=0,
                ),
            ],
        )
        self.assertEqual(list(self.reactor.udpPorts), [51820])
        self.assertEqual(self.service.listening_port, 51820)

    def test_wiring(self) -> None:
        """TUN -> device.send_packet, socket -> device, device -> socket and TUN."""
        self.service.startService()
        [tun] = self.tuns
        [device] = self.devices
        port = self.reactor.udpPorts[51820]
        tun.inject(b"\x45outbound")
        self.assertEqual(device.packets, [b"\x45outbound"])
        self.service.forwarder.datagramReceived(b"\x01\x00\x00\x00init", ("203.0.113.2", 51820))
        self.assertEqual(device.datagrams, [(b"\x01\x00\x00\x00init", ("203.0.113.2", 51820))])
        device.send_datagram(b"\x02reply", ("203.0.113.2", 51820))
        self.assertEqual(port._sentPackets, [(b"\x02reply", ("203.0.113.2", 51820))])
        device.deliver_packet(b"\x45inbound")
        self.assertEqual(tun.written, [b"\x45inbound"])

    def test_stop_removes_everything(self) -> None:
        self.service.startService()
        [tun] = self.tuns
        [device] = self.devices
        port = self.reactor.udpPorts[51820]
        stopped: list[bool] = []
        self.patch(port, "stopListening", lambda: stopped.append(True))
        self.service.stopService()
        self.assertTrue(tun.closed)
        self.assertEqual(tun.routes, [])
        self.assertTrue(device.closed)
        self.assertEqual(stopped, [True])
        self.assertFalse(self.service.running)

    def test_failed_start_cleans_up(self) -> None:
        def refuse(*args: Any, **kwargs: Any) -> None:
            raise OSError("address in use")

        self.patch(self.reactor, "listenUDP", refuse)
        error = self.assertRaises(NodeStartError, self.service.startService)
        self.assertEqual(str(error), "twistvpn node cannot start: address in use")
        self.assertTrue(self.tuns[0].closed)
        self.assertTrue(self.devices[0].closed)

    def test_bad_endpoint_name_creates_nothing(self) -> None:
        def unresolvable(host: str, port: int) -> tuple[str, int]:
            raise OSError("no such host")

        config = parse_config(CONFIG.replace("203.0.113.2", "nowhere.invalid"), "wg0.conf")
        service = self.make_service(config, resolve=unresolvable)
        self.assertRaises(NodeStartError, service.startService)
        self.assertEqual(self.tuns, [])

    def test_resolve_literal(self) -> None:
        self.assertEqual(resolve_endpoint("203.0.113.5", 1), ("203.0.113.5", 1))
        self.assertEqual(resolve_endpoint("2001:db8::5", 1), ("2001:db8::5", 1))

    def test_routed_prefixes(self) -> None:
        config = parse_config(CONFIG + "AllowedIPs = ::/0\n", "wg0.conf")
        self.assertEqual(
            routed_prefixes(config.peers),
            (["100.64.0.2/32", "100.64.8.0/24", "100.64.0.3/32"], ["0.0.0.0/0", "::/0"]),
        )


class UnresolvableEndpointTests(unittest.TestCase):
    def test_names_file_line_and_host(self) -> None:
        """An Endpoint whose name does not resolve: file, line and host, in one line."""
        text = CONFIG.replace("Endpoint = 203.0.113.2:51820",
                              "Endpoint = vpn.example.invalid:51820")

        def resolve(host: str, port: int) -> tuple[str, int]:
            raise socket.gaierror(-2, "Name or service not known")

        node = StaticNodeService(
            MemoryReactor(), parse_config(text, "wg0.conf"), interface_name="tvtest0",
            open_tun=lambda name, mtu: FakeTunDevice(name, mtu), make_device=FakeWireGuardDevice,
            resolve=resolve)
        e = self.assertRaises(NodeStartError, node.startService)
        line = text.splitlines().index("Endpoint = vpn.example.invalid:51820") + 1
        self.assertEqual(str(e), f"twistvpn node cannot start: wg0.conf:{line}: Endpoint: "
                                 "cannot resolve 'vpn.example.invalid': Name or service not known")


class FirstHandshakeTests(unittest.TestCase):
    def test_keepalive_peer_handshakes_at_once(self) -> None:
        """
        Reliability item 8: with PersistentKeepalive, the start-up keepalive
        was sent before the socket was bound (lost), so the first handshake
        waited for WireGuard's 5 s retry.  The data path binds first.
        """
        from twistvpn.wireguard.device import WireGuardDevice

        reactor = MemoryReactor()
        node = StaticNodeService(
            reactor, parse_config(CONFIG, "wg0.conf"), interface_name="tvtest0",
            open_tun=lambda name, mtu: FakeTunDevice(name, mtu), make_device=WireGuardDevice)
        node.startService()
        self.addCleanup(node.stopService)
        sent = reactor.udpPorts[51820]._sentPackets
        initiations = [(data, addr) for data, addr in sent if data[0] == 1]
        self.assertEqual(len(initiations), 1, sent)
        self.assertEqual(initiations[0][1], ("203.0.113.2", 51820))
        self.assertEqual(node.forwarder.counters["drop_not_listening"], 0)


class OptionsTests(unittest.TestCase):
    def write(self, text: str = CONFIG, mode: int = 0o600) -> str:
        return write_file(self, text, mode)

    def parse(self, *argv: str) -> node_tap.Options:
        options = node_tap.Options()
        options.parseOptions(list(argv))
        return options

    def assertUsageError(self, argv: list[str], *fragments: str) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(*argv)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_good(self) -> None:
        options = self.parse("--config", self.write(), "--interface", "tvx1")
        self.assertEqual(options["interface"], "tvx1")
        self.assertEqual(options["parsed"].listen_port, 51820)

    def test_default_interface(self) -> None:
        self.assertEqual(self.parse("-c", self.write())["interface"], "twvpn0")

    def test_config_required(self) -> None:
        # Without --config, a node is a joined node: it needs a rendezvous.
        self.assertUsageError(["--data-dir", self.mktemp()], "no rendezvous: give --rendezvous")

    def test_missing_file(self) -> None:
        self.assertUsageError(
            ["--config", "/nonexistent/wg0.conf"], "/nonexistent/wg0.conf", "No such file"
        )

    def test_bad_interface(self) -> None:
        self.assertUsageError(["--config", self.write(), "--interface", "x" * 16], "--interface")

    def test_malformed_config(self) -> None:
        path = self.write(CONFIG.replace("MTU", "Mtux"))
        self.assertUsageError(["--config", path], f"{path}:5: Mtux: unknown key")

    def test_insecure_config(self) -> None:
        path = self.write(mode=0o644)
        self.assertUsageError(["--config", path], path, "too open")

    def test_private_key_file(self) -> None:
        key = bytes([9] * 32)
        key_path = self.write(encode_key(key) + "\n")
        options = self.parse("--config", self.write(), "--private-key-file", key_path)
        self.assertEqual(options["parsed"].private_key, key)

    def test_private_key_file_refused(self) -> None:
        key_path = self.write(encode_key(bytes([9] * 32)), mode=0o640)
        self.assertUsageError(
            ["--config", self.write(), "--private-key-file", key_path], "too open"
        )
        bad = self.write("garbage")
        self.assertUsageError(["--config", self.write(), "--private-key-file", bad], bad)

    def test_make_service(self) -> None:
        """makeService builds the node on a MultiService without touching the system."""
        try:
            from twistvpn.wireguard.device import WireGuardDevice  # noqa: F401
        except ImportError:
            raise unittest.SkipTest("twistvpn.wireguard.device is not there yet") from None
        options = self.parse("--config", self.write(), "--interface", "tvx2")
        top = node_tap.makeService(options, reactor=MemoryReactor())
        node = top.getServiceNamed("node")
        self.assertIsInstance(node, StaticNodeService)
        self.assertFalse(node.running)
        self.assertEqual(node._control_socket, "/var/run/wireguard/tvx2.sock")
        options = self.parse("--config", self.write(), "--control-dir", "")
        node = node_tap.makeService(options, reactor=MemoryReactor()).getServiceNamed("node")
        self.assertIsNone(node._control_socket)


class RecordingSocket(socket.socket):
    """A real (unbound) UDP socket whose sends are recorded, never made."""

    def __init__(self) -> None:
        super().__init__(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: Any, addr: Any) -> int:  # type: ignore[override]
        self.sent.append((bytes(data), addr))
        return len(data)

    def sendmsg(self, buffers: Any, ancillary: Any = (), flags: int = 0, addr: Any = None) -> int:  # type: ignore[override]
        self.sent.append((b"".join(buffers), addr))
        return sum(len(b) for b in buffers)


@implementer(IBatchReader)
class FakeGROPort:
    """What L{listen_udp} returns on a real reactor, as far as the data path looks."""

    def __init__(self, port: int, protocol: Any) -> None:
        self.port = port
        self.protocol = protocol
        self.socket = RecordingSocket()
        self.read_batch_window: Any = None
        self.stopped = False

    def getHost(self) -> Any:
        return address.IPv6Address("UDP", "::", self.port)

    def stopListening(self) -> None:
        self.stopped = True
        self.socket.close()


@implementer(IWindowedTunDevice)
class WindowedTun(FakeTunDevice):
    """An in-memory TUN device with the real one's batch windows."""

    def __init__(self, name: str, mtu: int, clock: Any) -> None:
        super().__init__(name, mtu)
        self.read_batch_window: Any = None
        self.window = BatchWindow(clock, lambda: None)
        self.answer_wait = 0.0
        self.after_lone_read = None


class FastPathWiringTests(unittest.TestCase):
    def test_fast_path(self) -> None:
        """On a real socket: sends go through the GSO batcher; reads hold the right windows."""
        clock = Clock()
        ports: list[FakeGROPort] = []

        def listen(reactor: Any, port: int, protocol: Any, interface: str) -> FakeGROPort:
            ports.append(FakeGROPort(port, protocol))
            return ports[-1]

        self.patch(datapath_module, "listen_udp", listen)
        tuns: list[WindowedTun] = []
        devices: list[FakeWireGuardDevice] = []

        def open_tun(name: str, mtu: int) -> WindowedTun:
            tuns.append(WindowedTun(name, mtu, clock))
            return tuns[-1]

        def make_device(*args: Any) -> FakeWireGuardDevice:
            devices.append(FakeWireGuardDevice(*args))
            return devices[-1]

        node = StaticNodeService(
            clock,
            parse_config(CONFIG, "wg0.conf"),
            interface_name="tvtest0",
            open_tun=open_tun,
            make_device=make_device,
        )
        node.startService()
        [port], [tun], [device] = ports, tuns, devices
        batcher = node.datapath.batcher
        assert batcher is not None
        self.assertIs(tun.read_batch_window, batcher.window)
        self.assertIs(port.read_batch_window, tun.window)
        device.send_datagram(b"\x04" * 40, ("203.0.113.2", 51820))
        device.send_datagram(b"\x04" * 40, ("203.0.113.2", 51820))
        self.assertEqual(port.socket.sent, [])
        clock.advance(0)
        # One GSO send, to the IPv4 endpoint mapped for the dual-stack socket.
        self.assertEqual(port.socket.sent, [(b"\x04" * 80, ("::ffff:203.0.113.2", 51820))])
        device.send_datagram(b"\x04last", ("203.0.113.2", 51820))
        node.stopService()
        self.assertEqual(port.socket.sent[-1], (b"\x04last", ("::ffff:203.0.113.2", 51820)))
        self.assertTrue(port.stopped)

    def test_answer_wait_wired_through_the_port_readiness(self) -> None:
        """A windowed TUN device and a port that can be asked get an answer wait."""
        clock = Clock()
        ports: list[ReadinessPort] = []

        def listen(reactor: Any, port: int, protocol: Any, interface: str) -> ReadinessPort:
            ports.append(ReadinessPort(port, protocol))
            return ports[-1]

        self.patch(datapath_module, "listen_udp", listen)
        tun = WindowedTun("tvtest0", 1420, clock)
        tun.answer_wait = 200e-6
        datapath = DataPath(clock, PRIVATE, interface_name="tvtest0", mtu=1420,
                            open_tun=lambda name, mtu: tun, make_device=FakeWireGuardDevice)
        datapath.open(0)
        [port] = ports
        wait = tun.after_lone_read
        self.assertIsInstance(wait, AnswerWait)
        self.assertEqual(wait.budget, 200e-6)
        self.assertEqual(port.reads, 0)
        port.queued = True  # the answer is there at the first look
        self.assertTrue(wait())
        self.assertEqual(port.reads, 1)
        self.assertEqual(tun.counters["answer_wait_hit"], 1)
        datapath.close()
        self.assertTrue(tun.closed)

    def test_plain_parts_stay_unwired(self) -> None:
        """An in-memory TUN device provides no windows: nothing is wired, packets flow."""
        reactor = MemoryReactor()
        tun = FakeTunDevice("tvtest0", 1420)
        datapath = DataPath(reactor, PRIVATE, interface_name="tvtest0", mtu=1420,
                            open_tun=lambda name, mtu: tun, make_device=FakeWireGuardDevice)
        datapath.open(51820)
        self.assertIsNone(datapath.batcher)
        self.assertFalse(hasattr(tun, "after_lone_read"))
        datapath.start_reading()
        tun.inject(b"\x45packet")
        self.assertEqual(datapath.device.packets, [b"\x45packet"])
        datapath.close()


class _Readiness:
    def __init__(self, port: ReadinessPort) -> None:
        self.port = port

    def poll(self, timeout: float) -> list[Any]:
        return [1] if self.port.queued else []


@implementer(IReadinessPort)
class ReadinessPort(FakeGROPort):
    """A port that says whether a datagram is queued, and counts its reads."""

    def __init__(self, port: int, protocol: Any) -> None:
        super().__init__(port, protocol)
        self.readiness = _Readiness(self)
        self.queued = False
        self.reads = 0

    def doRead(self) -> None:
        self.reads += 1
        self.queued = False
