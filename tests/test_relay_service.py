"""
The relay's services and options: embedding in the rendezvous, the
standalone tap, the admin page; and the client's choices (nearest relay,
the path manager's IRelayProvider seam).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.application import service
from twisted.internet.defer import fail
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from tests.support.relay import RELAY_ADDR, Rendezvous, World, data_message
from twistvpn.common import tls
from twistvpn.interfaces import IRelayProvider
from twistvpn.relay import relay_tap
from twistvpn.relay.client import RelayEndpoint, RelayInfo, RelayUnavailableError
from twistvpn.relay.service import StatsResource, attach_relays
from twistvpn.relay.transport import RelayDatagramProtocol
from twistvpn.wireguard.keys import encode_key, generate_private_key, public_key


class FakeUDPPort:
    def __init__(self, port: int) -> None:
        self.port = port
        self.socket = self

    def setsockopt(self, *args: Any) -> None:
        pass

    def getHost(self) -> Any:
        return self

    def stopListening(self) -> None:
        pass


class FakeReactor(MemoryReactorClock):
    """A memory reactor that also listens on UDP."""

    def __init__(self) -> None:
        super().__init__()
        self.udp: list[tuple[int, Any]] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "",
                  maxPacketSize: int = 8192) -> FakeUDPPort:
        self.udp.append((port, protocol))
        return FakeUDPPort(port)


class EmbeddingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.rendezvous = Rendezvous(self.reactor)
        self.server_private = generate_private_key()
        self.cert, self.key = tls.make_self_signed("198.51.100.1")
        self.parent = service.MultiService()

    def attach(self, **kw: Any) -> Any:
        relays = attach_relays(self.parent, self.reactor, self.rendezvous.controller,
                               self.server_private, self.cert, self.key, "198.51.100.1", **kw)
        self.parent.startService()
        self.addCleanup(self.parent.stopService)
        return relays

    def test_embedded_by_default(self) -> None:
        node = public_key(generate_private_key())
        self.rendezvous.member(node)
        relays = self.attach(udp_port=3480, tcp_port=4443)
        self.assertEqual([(port, type(p)) for port, p in self.reactor.udp],
                         [(3480, RelayDatagramProtocol)])
        self.assertEqual([s[0] for s in self.reactor.tcpServers], [4443])
        info = relays.embedded.info
        self.assertEqual((info.host, info.udp_port, info.tcp_port), ("198.51.100.1", 3480, 4443))
        self.assertEqual(info.public_key, public_key(self.server_private))
        self.assertEqual(info.tls_fingerprint, tls.fingerprint(self.cert).hex())
        netmap = self.rendezvous.controller.network_map(self.rendezvous.network_id)
        self.assertEqual([RelayInfo.from_map(r) for r in netmap.relays], [info])
        # The embedded relay's policy reads the controller.
        self.assertTrue(relays.embedded.server.policy.may_register(node))
        self.assertEqual(relays.stats()["embedded"]["relay_id"], "embedded")

    def test_no_relay(self) -> None:
        relays = self.attach(embedded=False, link="tcp:8445")
        self.assertIsNone(relays.embedded)
        self.assertEqual(self.reactor.udp, [])
        self.assertEqual([s[0] for s in self.reactor.tcpServers], [8445])
        self.assertEqual(self.rendezvous.controller.relays, ())

    def test_linked_relays_are_advertised(self) -> None:
        relay_private = generate_private_key()
        relays = self.attach(link="tcp:8445", relay_keys=[public_key(relay_private)],
                             udp_port=3480, tcp_port=4443)
        standalone = RelayInfo("far", "203.0.113.9", 443, 443, public_key(relay_private))

        class Proto:
            pushed: list[Any] = []

            def push_members(self, network_id: str, members: Any) -> None:
                self.pushed.append(network_id)

            def push_synced(self, networks: Any) -> None:
                pass

        proto = Proto()
        relays.link.logged_in(standalone.public_key, proto, standalone)
        self.assertEqual([RelayInfo.from_map(r).relay_id
                          for r in self.rendezvous.controller.relays], ["embedded", "far"])
        self.assertEqual(relays.stats()["standalone"], [standalone.to_map()])
        relays.link.gone(standalone.public_key, proto)
        self.assertEqual(len(self.rendezvous.controller.relays), 1)


class AdminTests(SynchronousTestCase):
    def test_stats_page(self) -> None:
        world = World()
        world.server.udp_received(b"junk", ("198.51.100.7", 1))
        page = StatsResource(world.server).render_GET(DummyRequest([b"stats"]))
        stats = json.loads(page)
        self.assertEqual(stats["counters"]["drop_malformed"], 1)
        self.assertEqual(stats["sessions_udp"], 0)


class OptionsTests(SynchronousTestCase):
    def parse(self, *args: str) -> relay_tap.Options:
        options = relay_tap.Options()
        options.parseOptions(list(args))
        return options

    def test_errors(self) -> None:
        url = "twistvpn://127.0.0.1:8445#sha256=" + "ab" * 32
        cases = [
            ((), "--rendezvous is required"),
            (("--rendezvous", "https://x"), "bad rendezvous address"),
            (("--rendezvous", url, "--udp-port", "99999"), "--udp-port"),
            (("--rendezvous", url, "--tcp", "nonsense:1"), "--tcp"),
            (("--rendezvous", url, "--public-host", "relay.example"), "--public-host"),
            (("--rendezvous", url, "--tls-cert", "/x"), "go together"),
            (("--rendezvous", url, "--node-rate", "-1"), "positive"),
            (("--rendezvous", url, "--data-dir", "/proc/forbidden"), "--data-dir"),
        ]
        for args, message in cases:
            with self.assertRaises(usage.UsageError) as e:
                self.parse(*args)
            self.assertIn(message, str(e.exception))
            self.assertNotIn("\n", str(e.exception))

    def test_several_instances(self) -> None:
        """--rendezvous repeated: the link tries the rendezvous's instances in turn."""
        one = "twistvpn://127.0.0.1:8445#sha256=" + "ab" * 32
        two = "twistvpn://127.0.0.2:8445#sha256=" + "ab" * 32
        options = self.parse("--rendezvous", one, "--rendezvous", two,
                             "--data-dir", tempfile.mkdtemp(), "--admin", "none")
        self.assertEqual([a.host for a in options["rendezvous-addresses"]],
                         ["127.0.0.1", "127.0.0.2"])
        reactor = FakeReactor()
        top = relay_tap.makeService(options, reactor)
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual([c[0] for c in reactor.tcpClients], ["127.0.0.1"])

    def test_make_service(self) -> None:
        data = tempfile.mkdtemp()
        options = self.parse("--rendezvous", "twistvpn://127.0.0.1:8445#sha256=" + "ab" * 32,
                             "--data-dir", data, "--udp-port", "3481", "--tcp", "tcp:4444",
                             "--public-host", "192.0.2.7")
        reactor = FakeReactor()
        top = relay_tap.makeService(options, reactor)
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual([p for p, _ in reactor.udp], [3481])
        self.assertEqual(sorted(s[0] for s in reactor.tcpServers), [4444, 8449])
        self.assertEqual(len(reactor.tcpClients), 1)  # the link to the rendezvous
        admin = dict((s[0], s[1]) for s in reactor.tcpServers)[8449]
        page = admin.resource.getChildWithDefault(b"stats", DummyRequest([b"stats"]))
        stats = json.loads(page.render_GET(DummyRequest([b"stats"])))
        self.assertEqual(stats["rendezvous"]["connected"], False)
        self.assertEqual(stats["public_key"], relay_tap.keys.encode_key(
            relay_tap.keys.public_key(options["private-key"])))
        with open(os.path.join(data, "relay.pub")) as f:
            key = f.read().strip()
        with open(os.path.join(data, "relay.key")) as f:
            self.assertEqual(encode_key(public_key(relay_tap.keys.decode_key(f.read()))), key)
        # Restarting keeps the key.
        again = self.parse("--rendezvous", "twistvpn://127.0.0.1:8445", "--data-dir", data)
        self.assertEqual(encode_key(public_key(again["private-key"])), key)


class ChoiceTests(SynchronousTestCase):
    def test_nearest_relay_is_home(self) -> None:
        world = World()
        far = World()  # a second relay, farther away, on the same internet
        far_addr = ("203.0.113.2", 3478)
        world.net.bind(RelayDatagramProtocol(far.server), far_addr)
        far.server.clock = world.clock
        world.net.extra_latency[far_addr] = 0.05
        world.relays = [RelayInfo("far", far_addr[0], far_addr[1], 443,
                                  far.relays[0].public_key), *world.relays]
        node = world.node()
        self.assertEqual(node.client.home_relay, "far")  # first listed, before any answer
        world.net.run(1)
        self.assertEqual(node.client.home_relay, "r1")
        self.assertLess(node.client.rtt["r1"], node.client.rtt["far"])
        self.assertEqual(node.client.relay_endpoint(b"k" * 32), RelayEndpoint("r1", b"k" * 32))
        # The peer's home relay wins when the caller knows it.
        self.assertEqual(node.client.relay_endpoint(b"k" * 32, "far"),
                         RelayEndpoint("far", b"k" * 32))

    def test_peers_with_different_home_relays(self) -> None:
        """
        Each node sends through the relay nearest to it; the other is
        registered there too, so the datagram arrives, and the answer goes
        back the way it came.
        """
        world = World()
        second = World()
        addr2 = ("203.0.113.2", 3478)
        world.net.bind(RelayDatagramProtocol(second.server), addr2)
        world.relays = [*world.relays, RelayInfo("r2", addr2[0], addr2[1], 443,
                                                  second.relays[0].public_key)]
        second.server.policy = world.policy
        world.policy.add_revocation_observer(second.server.revoked)
        a, b = world.pair()
        world.net.path_latency[frozenset((a.addr, addr2))] = 0.05  # a is far from r2
        world.net.path_latency[frozenset((b.addr, RELAY_ADDR))] = 0.05  # b is far from r1
        world.net.run(2)
        self.assertEqual((a.client.home_relay, b.client.home_relay), ("r1", "r2"))
        self.assertEqual(a.client.path("r2"), "udp")  # registered with both
        a.send_to(b, data_message(1))
        world.net.run(1)
        self.assertEqual(b.wireguard.received, [(data_message(1), RelayEndpoint("r1", a.key))])
        b.forwarder.send_datagram(data_message(2), b.wireguard.received[0][1])
        b.send_to(a, data_message(3))
        world.net.run(1)
        # (the one through b's nearer relay comes first)
        self.assertEqual(a.wireguard.received, [(data_message(3), RelayEndpoint("r2", b.key)),
                                                (data_message(2), RelayEndpoint("r1", b.key))])

    def test_relay_provider(self) -> None:
        world = World()
        a, b = world.pair()
        self.assertTrue(verifyObject(IRelayProvider, a.client))
        opened: list[Any] = []
        a.client.open_relay(b.key).addCallback(opened.append)
        self.assertEqual(opened, [])
        world.net.run(1)
        self.assertEqual(opened, [RelayEndpoint("r1", b.key)])
        a.client.close_relay(b.key)
        a.client.close_relay(b"unknown" * 4)

    def test_relay_provider_fails_without_relay(self) -> None:
        world = World()
        world.relays = []
        node = world.node()
        self.failureResultOf(node.client.open_relay(b"k" * 32), RelayUnavailableError)

    def test_relay_provider_fails_when_unreachable(self) -> None:
        world = World()
        a, b = world.pair(a_blocked=True)
        a.client.connect_stream = lambda info, receiver: fail(ConnectionRefusedError())
        d = a.client.open_relay(b.key)
        world.net.run(5)
        self.failureResultOf(d, RelayUnavailableError)
        self.assertEqual(a.client.counters["tcp_connect_failures"], 1)






class BackoffTests(SynchronousTestCase):
    def test_unreachable_relay_is_retried_less_and_less(self) -> None:
        world = World()
        a, b = world.pair(a_blocked=True)
        attempts: list[float] = []

        def refuse(info: Any, receiver: Any) -> Any:
            attempts.append(world.clock.seconds())
            return fail(ConnectionRefusedError())

        a.client.connect_stream = refuse
        a.client.relay_endpoint(b.key)
        world.net.run(400)
        gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:], strict=False)]
        self.assertGreater(len(gaps), 4)
        self.assertEqual(gaps, sorted(gaps))  # never more often than before
        self.assertLessEqual(max(gaps), 60 + 3 + 1)  # capped (plus the UDP tries)
