"""
UDP endpoint discovery: the server with a fake transport, the node's client
on a real Forwarder, and both through the simulated NAT network.
"""

from __future__ import annotations

import struct

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.support.rendezvous import FakeSession, new_key
from twistvpn import wire
from twistvpn.common import auth
from twistvpn.interfaces import IDatagramHandler, INetworkController
from twistvpn.node.forwarder import Forwarder
from twistvpn.rendezvous.controller import Controller
from twistvpn.rendezvous.discovery import (
    REQUEST_LENGTH,
    DiscoveryClient,
    DiscoveryError,
    DiscoveryProtocol,
    DiscoveryServer,
    DiscoveryState,
    decode_response,
    encode_request,
    encode_response,
)
from twistvpn.rendezvous.store import open_store
from twistvpn.testing.natsim import Internet

NOW = 1_700_000_000.0
NODE_ADDR = ("198.51.100.7", 40123)


class ServerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.controller = Controller(open_store(":memory:"), self.clock)
        self.server_private, self.server_public = new_key()
        self.state = DiscoveryState(self.controller, self.server_private, self.clock)
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.servers = [
            DiscoveryServer(self.state, which, lambda d, a: self.sent.append((d, a)))
            for which in (0, 1)
        ]
        self.node_private, self.node_public = new_key()
        self.controller.register_node(self.node_public, "n", FakeSession(self.node_public))
        self.key = auth.shared_key(self.node_private, self.server_public)
        self.ts = int(NOW * 1000)

    def request(self, nonce: bytes = b"12345678", private: bytes | None = None) -> bytes:
        self.ts += 1
        return encode_request(private or self.node_private, self.server_public, self.ts, nonce,
                              self.state.epoch)

    def counters(self) -> dict[str, int]:
        return dict(self.state.counters)

    def test_interfaces(self) -> None:
        verifyObject(IDatagramHandler, self.servers[0])
        verifyObject(INetworkController, self.controller)

    def test_answers_observed_address(self) -> None:
        """The answer names the source address, XOR-ed; the endpoint is recorded."""
        self.servers[0].datagram_received(self.request(), NODE_ADDR)
        [(data, addr)] = self.sent
        self.assertEqual(addr, NODE_ADDR)
        self.assertLess(len(data), REQUEST_LENGTH, "no amplification")
        self.assertNotIn(struct.pack("!H", NODE_ADDR[1]), data[12:15])
        self.assertEqual(decode_response(self.key, data), (0, b"12345678", NODE_ADDR))
        node = self.controller.registry.node(self.node_public)
        self.assertEqual(node.endpoints, ["198.51.100.7:40123", None])
        self.servers[1].datagram_received(self.request(), ("198.51.100.7", 40999))
        self.assertEqual(decode_response(self.key, self.sent[-1][0])[0], 1)
        self.assertEqual(node.endpoints, ["198.51.100.7:40123", "198.51.100.7:40999"])

    def test_ipv6(self) -> None:
        self.servers[0].datagram_received(self.request(), ("2001:db8::5", 5555, 0, 0))
        self.assertEqual(decode_response(self.key, self.sent[-1][0])[2], ("2001:db8::5", 5555))

    def test_ipv6_port_answers_without_recording(self) -> None:
        """
        The ports on --udp-interface6 tell a node its IPv6 endpoint; the
        recorded endpoints stay the IPv4 ones its peers punch.
        """
        sent: list[tuple[bytes, tuple[str, int]]] = []
        server6 = DiscoveryServer(self.state, 0, lambda d, a: sent.append((d, a)), record=False)
        self.servers[0].datagram_received(self.request(), NODE_ADDR)
        server6.datagram_received(self.request(), ("2001:db8:a::2", 41641, 0, 0))
        self.assertEqual(decode_response(self.key, sent[-1][0])[2], ("2001:db8:a::2", 41641))
        node = self.controller.registry.node(self.node_public)
        self.assertEqual(node.endpoints, ["198.51.100.7:40123", None])

    def test_dual_stack_socket(self) -> None:
        """An IPv4 node seen through an IPv6 socket is recorded as IPv4."""
        self.servers[0].datagram_received(self.request(), ("::ffff:198.51.100.7", 9, 0, 0))
        self.assertEqual(decode_response(self.key, self.sent[-1][0])[2], ("198.51.100.7", 9))
        self.assertEqual(self.sent[-1][1], ("::ffff:198.51.100.7", 9, 0, 0))
        node = self.controller.registry.node(self.node_public)
        self.assertEqual(node.endpoints[0], "198.51.100.7:9")

    def test_garbage_dropped(self) -> None:
        good = self.request()
        for data in (
            b"",
            b"\xf1",
            b"\x00" * REQUEST_LENGTH,
            good[:-1],
            good + b"x",
            b"\xf1\x01" + good[2:],
            bytes(range(256)),
        ):
            self.servers[0].datagram_received(data, NODE_ADDR)
        self.assertEqual(self.sent, [])
        self.assertEqual(self.counters(), {"drop_malformed": 7})

    def test_bad_mac_dropped(self) -> None:
        data = bytearray(self.request())
        data[-1] ^= 1
        self.servers[0].datagram_received(bytes(data), NODE_ADDR)
        _, other_public = new_key()
        self.controller.register_node(other_public, "o", FakeSession(other_public))
        forged = bytearray(self.request())
        forged[4:36] = other_public  # claims another node's key
        self.servers[0].datagram_received(bytes(forged), NODE_ADDR)
        self.assertEqual(self.sent, [])
        self.assertEqual(self.counters(), {"drop_bad_mac": 2})
        self.assertEqual(self.controller.registry.node(other_public).endpoints, [None, None])

    def test_unknown_node_dropped(self) -> None:
        stranger, _ = new_key()
        self.servers[0].datagram_received(self.request(private=stranger), NODE_ADDR)
        self.assertEqual(self.counters(), {"drop_unknown_node": 1})

    def test_replay_dropped(self) -> None:
        """A captured request replayed from elsewhere cannot move the endpoint."""
        data = self.request()
        self.servers[0].datagram_received(data, NODE_ADDR)
        self.servers[0].datagram_received(data, ("203.0.113.66", 1))
        self.servers[1].datagram_received(data, ("203.0.113.66", 1))
        self.assertEqual(len(self.sent), 1)
        self.assertEqual(self.counters()["drop_replay"], 2)
        node = self.controller.registry.node(self.node_public)
        self.assertEqual(node.endpoints[0], "198.51.100.7:40123")

    def test_stale_first_request_dropped(self) -> None:
        old = encode_request(
            self.node_private, self.server_public, int((NOW - 3600) * 1000), b"abcdefgh",
            self.state.epoch,
        )
        self.servers[0].datagram_received(old, NODE_ADDR)
        self.assertEqual(self.counters(), {"drop_stale": 1})

    def test_replay_after_a_restart_dropped(self) -> None:
        """
        Audit item 3: a request captured 60 s before the rendezvous restarts,
        replayed after it (the timestamps seen are forgotten), is refused:
        it carries the old process's epoch.
        """
        data = self.request()
        self.servers[0].datagram_received(data, NODE_ADDR)
        self.clock.advance(60)
        restarted = DiscoveryState(self.controller, self.server_private, self.clock)
        self.assertNotEqual(restarted.epoch, self.state.epoch)
        sent: list[tuple[bytes, tuple[str, int]]] = []
        server = DiscoveryServer(restarted, 0, lambda d, a: sent.append((d, a)))
        server.datagram_received(data, ("203.0.113.66", 1))
        self.assertEqual(sent, [])
        self.assertEqual(dict(restarted.counters), {"drop_wrong_epoch": 1})
        node = self.controller.registry.node(self.node_public)
        self.assertEqual(node.endpoints[0], "198.51.100.7:40123")
        # The node, told the new epoch when it registers again, is answered.
        fresh = encode_request(self.node_private, self.server_public, self.ts + 60_000,
                               b"87654321", restarted.epoch)
        server.datagram_received(fresh, NODE_ADDR)
        self.assertEqual(len(sent), 1)

    def test_rate_limited_per_source(self) -> None:
        for _ in range(30):
            self.servers[0].datagram_received(self.request(), NODE_ADDR)
        self.assertEqual(len(self.sent), 20)
        self.assertEqual(self.counters()["drop_rate_limited"], 10)
        # another source is not affected
        self.servers[0].datagram_received(self.request(), ("198.51.100.8", 1))
        self.assertEqual(len(self.sent), 21)
        # tokens come back with time
        self.clock.advance(1)
        self.servers[0].datagram_received(self.request(), NODE_ADDR)
        self.assertEqual(len(self.sent), 22)

    def test_endpoint_change_pushes_map(self) -> None:
        net = self.controller.create_network("n", private=False)["id"]
        session = self.controller.registry.node(self.node_public).session
        self.controller.join(self.node_public, net)
        self.clock.advance(1)
        before = len(session.maps)
        self.servers[0].datagram_received(self.request(), NODE_ADDR)
        self.clock.advance(1)
        self.assertEqual(len(session.maps), before + 1)
        [member] = session.maps[-1][1].members
        self.assertEqual(member.endpoints, ("198.51.100.7:40123",))
        # the same address again changes nothing
        self.servers[0].datagram_received(self.request(), NODE_ADDR)
        self.clock.advance(1)
        self.assertEqual(len(session.maps), before + 1)


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, object]] = []

    def send_datagram(self, data: bytes, addr: object) -> None:
        self.sent.append((data, addr))

    def register_handler(self, message_type: int, handler: object) -> None:
        pass


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.server_private, self.server_public = new_key()
        self.node_private, self.node_public = new_key()
        self.sender = _Recorder()
        self.servers = [("203.0.113.10", 3478), ("203.0.113.10", 3479)]
        self.client = DiscoveryClient(
            self.sender, self.clock, self.node_private, self.server_public, self.servers,
            epoch=b"e" * 8,
        )

    def test_interface(self) -> None:
        verifyObject(IDatagramHandler, self.client)

    def test_retries_then_fails(self) -> None:
        d = self.client.query(0)
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.failureResultOf(d, DiscoveryError)
        self.assertEqual(len(self.sender.sent), 3)
        stamps = [struct.unpack_from("!Q", data, 36)[0] for data, _ in self.sender.sent]
        self.assertEqual(stamps, sorted(set(stamps)), "timestamps strictly increase")

    def test_forged_and_unexpected_answers_dropped(self) -> None:
        d = self.client.query(0)
        data, _ = self.sender.sent[-1]
        nonce = data[44:52]
        wrong_key = auth.shared_key(new_key()[0], self.node_public)
        self.client.datagram_received(
            encode_response(wrong_key, 0, nonce, ("1.2.3.4", 5)), self.servers[0]
        )
        right_key = auth.shared_key(self.server_private, self.node_public)
        good = encode_response(right_key, 0, nonce, ("198.51.100.1", 7))
        self.client.datagram_received(good, ("203.0.113.99", 3478))
        self.client.datagram_received(b"\xf2garbage", self.servers[0])
        self.assertNoResult(d)
        self.client.datagram_received(good, self.servers[0])
        self.assertEqual(self.successResultOf(d), ("198.51.100.1", 7))
        self.client.datagram_received(good, self.servers[0])
        self.assertEqual(
            dict(self.client.counters),
            {
                "requests": 1,
                "responses": 1,
                "drop_malformed": 2,
                "drop_unknown_source": 1,
                "drop_unexpected": 1,
            },
        )

    def test_netcheck_never_fails(self) -> None:
        d = self.client.netcheck()
        self.clock.pump([1] * 4)
        result = self.successResultOf(d)
        self.assertEqual(result.mapped, (None, None))
        self.assertIsNone(result.endpoint)
        self.assertIsNone(result.varies_by_destination)

    def test_stop(self) -> None:
        results = []
        self.client.start(25, results.append)
        self.client.stop()
        self.clock.advance(100)
        self.assertEqual(results, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ThroughNATs(SynchronousTestCase):
    """The real forwarder and discovery code over the simulated internet."""

    def setUp(self) -> None:
        self.net = Internet(seed=3)
        self.clock = self.net.clock
        self.clock.advance(NOW)
        self.server_private, self.server_public = new_key()
        rendezvous = self.net.add_public_host("203.0.113.10")
        self.controller = Controller(open_store(":memory:"), self.clock)
        self.state = DiscoveryState(self.controller, self.server_private, self.clock)
        for which, port in enumerate((3478, 3479)):
            rendezvous.reactor.listenUDP(port, DiscoveryProtocol(self.state, which))

    def _node(self, preset: str) -> tuple[DiscoveryClient, bytes, object]:
        host = self.net.add(preset)
        private, public = new_key()
        self.controller.register_node(public, preset, FakeSession(public))
        forwarder = Forwarder()
        host.reactor.listenUDP(51820, forwarder)
        client = DiscoveryClient(
            forwarder,
            host.reactor,
            private,
            self.server_public,
            [("203.0.113.10", 3478), ("203.0.113.10", 3479)],
            epoch=self.state.epoch,
        )
        forwarder.register_handler(wire.DISCOVERY_RESPONSE, client)
        return client, public, host

    def _netcheck(self, client: DiscoveryClient) -> object:
        d = client.netcheck()
        self.net.run(5.0)
        return self.successResultOf(d)

    def test_easy_nat(self) -> None:
        """An endpoint-independent mapping looks the same from both ports."""
        client, public, host = self._node("easy")
        result = self._netcheck(client)
        self.assertEqual(result.mapped[0], result.mapped[1])
        self.assertFalse(result.varies_by_destination)
        self.assertEqual(result.endpoint[0], host.nat.public_ip)
        node = self.controller.registry.node(public)
        self.assertEqual(node.endpoints[0], f"{result.endpoint[0]}:{result.endpoint[1]}")

    def test_hard_nat(self) -> None:
        """An endpoint-dependent mapping shows two ports; the map says so."""
        client, public, _ = self._node("hard")
        result = self._netcheck(client)
        self.assertTrue(result.varies_by_destination)
        net = self.controller.create_network("n", private=False)["id"]
        self.controller.join(public, net)
        [member] = self.controller.network_map(net).members
        self.assertTrue(member.nat_varies)

    def test_udp_blocked(self) -> None:
        client, _, _ = self._node("udpblock")
        result = self._netcheck(client)
        self.assertEqual(result.mapped, (None, None))
        self.assertEqual(client.counters["timeouts"], 2)

    def test_periodic_refresh(self) -> None:
        """start() keeps asking, so the NAT mapping stays open."""
        client, _, _ = self._node("easy")
        results: list = []
        client.start(25.0, results.append)
        self.net.run(80.0)
        client.stop()
        self.assertEqual(len(results), 4)
        self.assertTrue(all(r.endpoint == results[0].endpoint for r in results))
