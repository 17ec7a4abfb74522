"""
Stock WireGuard devices through the relay (twistvpn.relay.devices): mac1
routing, the index tables, rebinding, bounds, expiry and malformed input,
with real WireGuard devices (ours, speaking the same protocol as the
official apps) on both ends of a L{DeviceRouter}.
"""

from __future__ import annotations

import random
import struct
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.wireguard import WALL_EPOCH, ipv4_packet
from twistvpn.relay.devices import DeviceLimits, DeviceRouter
from twistvpn.wireguard import keys
from twistvpn.wireguard.device import WireGuardDevice

DEVICE_ADDR = ("198.51.100.9", 51820)
MOVED_ADDR = ("198.51.100.9", 40001)


class Handle:
    """How a node's WireGuard device sees a device: a relay endpoint."""

    def __init__(self, handle: bytes) -> None:
        self.handle = handle

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Handle) and other.handle == self.handle

    def __hash__(self) -> int:
        return hash(self.handle)


class World:
    """
    A device (the app) and nodes, all real WireGuard devices; the device's
    datagrams go to the router at C{RELAY}, nodes' through their sessions.
    """

    RELAY = ("203.0.113.10", 443)

    def __init__(self, nodes: int = 1, limits: DeviceLimits | None = None) -> None:
        self.clock = Clock()
        self.router = DeviceRouter(limits, secret=b"s" * 32)
        self.addr = DEVICE_ADDR
        self.to_device: list[bytes] = []
        self.delivered: dict[str, list[bytes]] = {}
        rng = random.Random(7)
        self.device_key = keys.clamp(rng.randbytes(32))
        self.device = self._wg("device", self.device_key, self._device_sent)
        self.nodes: dict[bytes, WireGuardDevice] = {}
        self.node_ips: dict[bytes, str] = {}
        for i in range(nodes):
            private = keys.clamp(rng.randbytes(32))
            public = keys.public_key(private)
            node = self._wg(f"node{i}", private, self._node_sent(public))
            node.add_peer(keys.public_key(self.device_key), allowed_ips=["100.64.0.100/32"])
            self.nodes[public] = node
            self.node_ips[public] = f"100.64.0.{i + 1}"
            self.device.add_peer(public, allowed_ips=[f"100.64.0.{i + 1}/32"],
                                 endpoint=self.RELAY)
        self.router.set_reachable(self.nodes)

    def _wg(self, name: str, private: bytes, send: Any) -> WireGuardDevice:
        self.delivered[name] = []
        clock = self.clock
        return WireGuardDevice(private, clock, send, self.delivered[name].append,
                               random=random.Random(name).randbytes,
                               wall_clock=lambda: WALL_EPOCH + clock.seconds())

    def _device_sent(self, data: bytes, endpoint: Any) -> None:
        route = self.router.from_device(data, self.addr, self.clock.seconds())
        if route is not None:
            node_key, handle = route
            self.clock.callLater(0, self.nodes[node_key].datagram_received, data,
                                 Handle(handle))

    def _node_sent(self, node_key: bytes) -> Any:
        def sent(data: bytes, endpoint: Any) -> None:
            addr = self.router.from_node(node_key, endpoint.handle, data, self.clock.seconds())
            if addr is not None:
                self.to_device.append(data)
                self.clock.callLater(0, self.device.datagram_received, data, self.RELAY)
        return sent

    def ping(self, node_key: bytes, payload: bytes = b"hello") -> None:
        self.device.send_packet(ipv4_packet("100.64.0.100", self.node_ips[node_key], payload))
        for _ in range(10):
            self.clock.advance(0)

    def node_got(self, index: int) -> list[bytes]:
        return self.delivered[f"node{index}"]


class RoutingTests(SynchronousTestCase):
    def test_handshake_and_data_reach_the_right_node(self) -> None:
        world = World(nodes=3)
        second = list(world.nodes)[1]
        world.ping(second)
        self.assertEqual(len(world.node_got(1)), 1)
        self.assertEqual(world.node_got(0) + world.node_got(2), [])
        self.assertEqual(world.router.counters["device_initiations"], 1)
        # The node's response taught the router its index; data follows it.
        world.ping(second, b"again")
        self.assertEqual(len(world.node_got(1)), 2)

    def test_node_answers_reach_the_device(self) -> None:
        world = World()
        node_key = next(iter(world.nodes))
        world.ping(node_key)
        node = world.nodes[node_key]
        node.send_packet(ipv4_packet("100.64.0.1", "100.64.0.100", b"back"))
        world.clock.advance(0)
        self.assertEqual(len(world.delivered["device"]), 1)

    def test_no_node_matches(self) -> None:
        world = World(nodes=2)
        world.router.set_reachable([])  # the nodes of networks with devices: none now
        world.ping(next(iter(world.nodes)))
        self.assertEqual(world.router.counters["device_drop_no_node"], 1)
        self.assertEqual(world.node_got(0), [])

    def test_two_networks(self) -> None:
        """Nodes of two networks: each initiation finds its own responder."""
        world = World(nodes=2)
        first, second = world.nodes
        world.ping(first)
        world.ping(second)
        self.assertEqual((len(world.node_got(0)), len(world.node_got(1))), (1, 1))

    def test_handles_answer_only_their_node(self) -> None:
        world = World(nodes=2)
        first, second = world.nodes
        world.ping(first)
        [response] = world.to_device[:1]
        handle = next(iter(world.router._handles))
        self.assertIsNone(world.router.from_node(second, handle, response, 0.0))
        self.assertEqual(world.router.counters["device_drop_not_yours"], 1)
        self.assertTrue(world.router.is_handle(handle))
        self.assertFalse(world.router.is_handle(second))


class IndexTableTests(SynchronousTestCase):
    def test_rebinding_follows_transport_data(self) -> None:
        world = World()
        node_key = next(iter(world.nodes))
        world.ping(node_key)
        world.addr = MOVED_ADDR  # the device's NAT moved it
        world.ping(node_key, b"from the new address")
        self.assertEqual(len(world.node_got(0)), 2)
        self.assertEqual(world.router.counters["device_rebound"], 1)
        # The node's answers go to where the device is now.
        handle = next(iter(world.router._handles))
        keepalive = world.to_device[-1]
        self.assertEqual(world.router.from_node(node_key, handle, keepalive, 1.0), MOVED_ADDR)

    def test_cookie_replies_both_ways(self) -> None:
        """
        Under load a node answers an initiation with a cookie reply (WireGuard's
        DoS defence): it reaches the device, and the device's own cookie reply
        (to a node's initiation) reaches the node by the node's index.
        """
        world = World()
        node_key = next(iter(world.nodes))
        world.ping(node_key)
        handle = next(iter(world.router._handles))
        cookie = struct.pack("<II", 3, 0x77) + bytes(56)
        self.assertEqual(world.router.from_node(node_key, handle, cookie, 1.0), DEVICE_ADDR)
        initiation = struct.pack("<II", 1, 0x4242) + bytes(140)
        world.router.from_node(node_key, handle, initiation, 1.0)
        answer = struct.pack("<II", 3, 0x4242) + bytes(56)
        self.assertEqual(world.router.from_device(answer, DEVICE_ADDR, 1.0), (node_key, handle))

    def test_unknown_index_dropped(self) -> None:
        world = World()
        stray = struct.pack("<IIQ", 4, 12345, 0) + bytes(16)
        self.assertIsNone(world.router.from_device(stray, DEVICE_ADDR, 0.0))
        self.assertEqual(world.router.counters["device_drop_unknown_index"], 1)

    def test_flows_expire_with_reject_after_time(self) -> None:
        world = World(limits=DeviceLimits(lifetime=180.0))
        node_key = next(iter(world.nodes))
        world.ping(node_key)
        self.assertEqual(len(world.router), 1)
        world.router.sweep(world.clock.seconds() + 181.0)
        self.assertEqual(len(world.router), 0)
        self.assertEqual(world.router.counters["device_expired"], 1)

    def test_tables_are_bounded(self) -> None:
        router = DeviceRouter(DeviceLimits(max_flows=4, max_handles=3), secret=b"x" * 32)
        node = b"n" * 32
        router.set_reachable([node])
        handles = [router._handle(node, ("198.51.100.1", 1000 + i), 0.0) for i in range(5)]
        self.assertEqual(len(router._handles), 3)
        self.assertEqual(router.counters["device_handle_evicted"], 2)
        response = bytearray(92)
        response[0] = 2
        for i in range(6):
            struct.pack_into("<I", response, 4, 1000 + i)
            router.from_node(node, handles[-1], bytes(response), 0.0)
        self.assertEqual(len(router), 4)
        self.assertEqual(router.counters["device_index_evicted"], 2)

    def test_node_gone_forgets_its_devices(self) -> None:
        world = World()
        node_key = next(iter(world.nodes))
        world.ping(node_key)
        world.router.forget_node(node_key)
        self.assertEqual((len(world.router), len(world.router._handles)), (0, 0))


class MalformedTests(SynchronousTestCase):
    def test_truncated_and_bad_datagrams_counted(self) -> None:
        router = DeviceRouter(secret=b"y" * 32)
        router.set_reachable([b"n" * 32])
        samples = [b"", b"\x01", b"\x01\x00\x00", bytes([1, 0, 0, 0]) + bytes(100),
                   bytes([1, 0, 0, 0]) + bytes(200), bytes([2, 0, 0, 0]) + bytes(10),
                   bytes([3, 0, 0, 0]) + bytes(10), bytes([4, 0, 0, 0]) + bytes(8),
                   bytes([1, 1, 0, 0]) + bytes(144), bytes([9, 0, 0, 0]) + bytes(40)]
        for sample in samples:
            self.assertIsNone(router.from_device(sample, DEVICE_ADDR, 0.0))
        self.assertEqual(router.counters["device_drop_malformed"], len(samples))
        for sample in samples:
            self.assertIsNone(router.from_node(b"n" * 32, b"h" * 32, sample, 0.0))
        self.assertEqual(router.counters["device_drop_unknown_handle"], len(samples))

    def test_random_bytes_never_raise(self) -> None:
        router = DeviceRouter(secret=b"z" * 32)
        node = b"n" * 32
        router.set_reachable([node])
        handle = router._handle(node, DEVICE_ADDR, 0.0)
        rng = random.Random(3)
        for _ in range(2000):
            data = bytes([rng.choice([1, 2, 3, 4, 7])]) + rng.randbytes(rng.randrange(0, 200))
            router.from_device(data, DEVICE_ADDR, 0.0)
            router.from_node(node, handle, data, 0.0)


class PolicyTests(SynchronousTestCase):
    def test_device_reachable_follows_memberships(self) -> None:
        from twistvpn.relay.policy import MembershipPolicy

        policy = MembershipPolicy()
        a, b, c, phone = b"a" * 32, b"b" * 32, b"c" * 32, b"p" * 32
        policy.set_members("net1", [a, b, phone])
        policy.set_members("net2", [c])
        self.assertEqual(policy.device_reachable(), frozenset())
        policy.set_devices("net1", [phone])
        self.assertEqual(policy.device_reachable(), {a, b})
        policy.set_members("net1", [a, phone])  # b deauthorized
        self.assertEqual(policy.device_reachable(), {a})
        policy.set_members("net1", [a])  # the phone deauthorized: no device left
        self.assertEqual(policy.device_reachable(), frozenset())
        policy.replace_all({"net1": [a, phone], "net2": [c]}, {"net2": []})
        self.assertEqual(policy.device_reachable(), frozenset())


class ServerTests(SynchronousTestCase):
    """The relay server: a device's plain datagrams in, RECV frames to the node."""

    def test_device_to_registered_node_and_back(self) -> None:
        from twisted.internet.protocol import DatagramProtocol

        from tests.support.relay import NET, RELAY_ADDR
        from tests.support.relay import World as RelayWorld
        from twistvpn.relay.client import RelayEndpoint

        world = RelayWorld()
        node, other = world.registered_pair()
        phone_private = keys.clamp(random.Random(1).randbytes(32))
        phone_key = keys.public_key(phone_private)
        world.policy.set_members(NET, [node.key, other.key, phone_key])
        world.policy.set_devices(NET, [phone_key])
        world.server.refresh_devices()

        class Phone(DatagramProtocol):
            received: list[bytes] = []

            def datagramReceived(self, data: bytes, addr: Any) -> None:
                self.received.append(data)

        phone_addr = ("198.51.100.77", 51820)
        phone = Phone()
        world.net.bind(phone, phone_addr)
        sent: list[bytes] = []
        app = WireGuardDevice(phone_private, world.clock, lambda d, e: sent.append(d),
                              lambda p: None, random=random.Random(2).randbytes)
        app.add_peer(node.key, allowed_ips=["100.64.0.1/32"], endpoint=RELAY_ADDR)
        app.send_packet(ipv4_packet("100.64.0.100", "100.64.0.1"))
        [initiation] = sent
        phone.transport.write(initiation, RELAY_ADDR)
        world.net.run(0.1)
        data, endpoint = node.wireguard.received[-1]
        self.assertEqual(data, initiation)
        self.assertIsInstance(endpoint, RelayEndpoint)
        handle = endpoint.peer_key
        self.assertNotIn(handle, (phone_key, node.key, other.key))
        # The node answers the handle (a response: its sender index is learned).
        response = bytearray(92)
        response[0] = 2
        struct.pack_into("<II", response, 4, 0xBEEF, 0x1234)
        node.forwarder.send_datagram(bytes(response), endpoint)
        world.net.run(0.1)
        self.assertEqual(Phone.received, [bytes(response)])
        # Transport data with the node's index goes to the node.
        phone.transport.write(struct.pack("<IIQ", 4, 0xBEEF, 0) + bytes(16), RELAY_ADDR)
        world.net.run(0.1)
        self.assertEqual(node.wireguard.received[-1][0][:4], b"\x04\x00\x00\x00")
        # The other node may not use the handle.
        other.forwarder.send_datagram(bytes(response), RelayEndpoint("r1", handle))
        world.net.run(0.1)
        self.assertEqual(len(Phone.received), 1)
        self.assertEqual(world.server.stats()["counters"]["device_drop_not_yours"], 1)

    def test_initiation_flood_limited_per_source(self) -> None:
        from tests.support.relay import World as RelayWorld

        world = RelayWorld()
        for _ in range(50):
            world.server.udp_received(bytes([1, 0, 0, 0]) + bytes(144), ("198.51.100.5", 1))
        counters = world.server.stats()["counters"]
        self.assertEqual(counters["drop_rate_device_source"], 30)
        self.assertEqual(counters["device_drop_no_node"], 20)

    def test_device_bytes_meet_the_node_budget(self) -> None:
        """A device's datagrams are held to the byte rate a node's session has."""
        from tests.support.relay import World as RelayWorld
        from twistvpn.relay.server import RelayLimits

        world = RelayWorld(RelayLimits(node_rate=1000.0, node_burst=1000.0))
        for _ in range(10):
            world.server.udp_received(struct.pack("<IIQ", 4, 1, 0) + bytes(184),
                                      ("198.51.100.6", 1))
        counters = world.server.stats()["counters"]
        self.assertEqual(counters["drop_rate_device"], 5)
        self.assertEqual(counters["device_drop_unknown_index"], 5)
