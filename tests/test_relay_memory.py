"""
The relay and its client in memory: a Clock, fake UDP sockets, fake TCP
transports, the real forwarder and (where a handshake matters) the real
WireGuard device.
"""

from __future__ import annotations

import ipaddress
import struct

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.support.relay import NET, Node, World, data_message
from twistvpn.interfaces import IDatagramHandler, IRelayPolicy
from twistvpn.relay import protocol as p
from twistvpn.relay.client import (
    TRANSITIONS,
    RegistrationState,
    RelayEndpoint,
)
from twistvpn.relay.policy import MembershipPolicy
from twistvpn.wireguard.keys import generate_private_key


class InterfaceTests(SynchronousTestCase):
    def test_policy(self) -> None:
        self.assertTrue(verifyObject(IRelayPolicy, MembershipPolicy()))

    def test_client_is_a_handler(self) -> None:
        world = World()
        self.assertTrue(verifyObject(IDatagramHandler, world.node().client))


class RelayedTrafficTests(SynchronousTestCase):
    def exchange(self, world: World, a: Node, b: Node) -> None:
        a.send_to(b, data_message(1))
        world.net.run(5)
        self.assertEqual(b.wireguard.received, [(data_message(1), RelayEndpoint("r1", a.key))])
        # b answers to where the datagram came from, as WireGuard's roaming does.
        b.forwarder.send_datagram(data_message(2), b.wireguard.received[0][1])
        world.net.run(1)
        self.assertEqual(a.wireguard.received, [(data_message(2), RelayEndpoint("r1", b.key))])

    def test_udp(self) -> None:
        world = World()
        a, b = world.pair()
        b.client.relay_endpoint(a.key)  # b registers too, as a node does at start
        world.net.run(1)
        self.exchange(world, a, b)
        self.assertEqual((a.client.path("r1"), b.client.path("r1")), ("udp", "udp"))
        self.assertEqual(world.server.traffic.relayed_packets, 2)
        self.assertEqual(world.server.stats()["sessions_udp"], 2)

    def test_tcp(self) -> None:
        world = World()
        a, b = world.pair(a_blocked=True, b_blocked=True)
        b.client.relay_endpoint(a.key)
        world.net.run(5)
        self.exchange(world, a, b)
        self.assertEqual((a.client.path("r1"), b.client.path("r1")), ("tcp", "tcp"))
        self.assertEqual(world.server.stats()["sessions_tcp"], 2)
        self.assertEqual(world.server.traffic.relayed_packets, 2)

    def test_udp_to_tcp(self) -> None:
        world = World()
        a, b = world.pair(b_blocked=True)
        b.client.relay_endpoint(a.key)
        world.net.run(5)
        self.exchange(world, a, b)
        self.assertEqual((a.client.path("r1"), b.client.path("r1")), ("udp", "tcp"))

    def test_queued_while_registering(self) -> None:
        """Datagrams sent before the relay answered are not lost."""
        world = World()
        a, b = world.pair()
        b.client.relay_endpoint(a.key)
        for n in range(5):
            a.send_to(b, data_message(n))
        world.net.run(1)
        self.assertEqual([d for d, _ in b.wireguard.received],
                         [data_message(n) for n in range(5)])


class WireGuardOverRelayTests(SynchronousTestCase):
    """A real WireGuard handshake and data, relayed."""

    def test_handshake_and_data(self) -> None:
        from twistvpn.wireguard.device import WireGuardDevice

        for blocked in (False, True):
            world = World()
            a, b = world.pair(a_blocked=blocked, b_blocked=blocked)
            delivered: dict[bytes, list[bytes]] = {a.key: [], b.key: []}
            devices = {}
            for node, other, ip in ((a, b, "100.64.0.2/32"), (b, a, "100.64.0.1/32")):
                device = WireGuardDevice(node.private, world.clock, node.forwarder.send_datagram,
                                         delivered[node.key].append)
                node.forwarder.set_wireguard(device)
                device.add_peer(other.key, allowed_ips=[ip],
                                endpoint=node.client.relay_endpoint(other.key))
                devices[node.key] = device
            world.net.run(5)
            packet = ip_packet("100.64.0.1", "100.64.0.2", b"over the relay")
            devices[a.key].send_packet(packet)
            world.net.run(2)
            self.assertEqual(delivered[b.key], [packet])
            reply = ip_packet("100.64.0.2", "100.64.0.1", b"and back")
            devices[b.key].send_packet(reply)
            world.net.run(2)
            self.assertEqual(delivered[a.key], [reply])
            peer = devices[b.key].get_peer(a.key)
            self.assertIsNotNone(peer.last_handshake)
            self.assertEqual(peer.endpoint, RelayEndpoint("r1", a.key))
            self.assertEqual(a.client.path("r1"), "tcp" if blocked else "udp")
            for device in devices.values():
                device.close()


def ip_packet(src: str, dst: str, payload: bytes) -> bytes:
    """A minimal IPv4/UDP packet (checksums left zero)."""
    total = 20 + 8 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )
    return header + struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0) + payload


class RegistrationStateTests(SynchronousTestCase):
    """The registration's states are the (registered, registering) pairs that exist."""

    def test_states(self) -> None:
        self.assertIs(RegistrationState((None, "udp")), RegistrationState.REGISTERING_UDP)
        self.assertEqual(RegistrationState.UP_TCP_REGISTERING_UDP.via, "tcp")
        self.assertEqual(RegistrationState.UP_TCP_REGISTERING_UDP.registering, "udp")
        self.assertRaises(ValueError, RegistrationState, ("udp", "tcp"))
        self.assertEqual(set(TRANSITIONS), set(RegistrationState))

    def test_a_move_not_in_the_table_is_counted(self) -> None:
        world = World()
        a, _ = world.registered_pair()
        registration = a.client._links["r1"]
        self.assertEqual(registration.state, RegistrationState.UP_UDP)
        registration._enter("tcp", None)  # UP_UDP -> UP_TCP is no move the client makes
        self.assertEqual(a.client.counters["registration_bad_transition"], 1)
        self.assertEqual(registration.state, RegistrationState.UP_TCP)

    def test_tcp_registration(self) -> None:
        world = World()
        a, _ = world.registered_pair(seconds=5, a_blocked=True)
        self.assertEqual(a.client._links["r1"].state, RegistrationState.UP_TCP)
        self.assertEqual(a.client.counters["registration_bad_transition"], 0)


class FallbackTests(SynchronousTestCase):
    def test_udp_to_tcp_and_back(self) -> None:
        world = World()
        a, b = world.registered_pair()
        self.assertEqual(a.client.path("r1"), "udp")

        # The network starts blocking a's UDP: a notices by itself.
        world.net.udp_blocked.add(a.addr)
        world.net.run(a.client.timings.dead_after + a.client.timings.keepalive + 5)
        self.assertEqual(a.client.path("r1"), "tcp")
        self.assertEqual(world.server.session(a.key).kind, "tcp")
        a.send_to(b, data_message(7))
        world.net.run(1)
        self.assertEqual(b.wireguard.received[-1][0], data_message(7))

        # UDP works again: a moves back, and leaves its TCP connection.
        world.net.udp_blocked.discard(a.addr)
        world.net.run(a.client.timings.udp_retry + a.client.timings.keepalive + 5)
        self.assertEqual(a.client.path("r1"), "udp")
        self.assertEqual(world.server.session(a.key).kind, "udp")
        self.assertEqual(world.server.stats()["tcp_connections"], 0)
        a.send_to(b, data_message(8))
        world.net.run(1)
        self.assertEqual(b.wireguard.received[-1][0], data_message(8))
        self.assertEqual(a.client.counters["registration_bad_transition"], 0)
        self.assertEqual(a.client._links["r1"].state, RegistrationState.UP_UDP)

    def test_relay_restart_noticed_by_data(self) -> None:
        """Data to a relay that forgot us gets a refusal and a new registration at once."""
        world = World()
        a, b = world.registered_pair()
        world.server._end(world.server.session(a.key))
        a.send_to(b, data_message(1))  # lost: the relay no longer knows the token
        world.net.run(0.1)
        self.assertEqual(a.client.counters["relay_forgot"], 1)
        a.send_to(b, data_message(2))  # queued while registering again
        world.net.run(0.5)
        self.assertEqual([d for d, _ in b.wireguard.received], [data_message(2)])
        self.assertEqual(world.server.counters["drop_unknown_token"], 1)

    def test_relay_forgets(self) -> None:
        """A relay that lost our session (restart, idle) is re-registered with."""
        world = World()
        a, b = world.registered_pair()
        world.server._end(world.server.session(a.key))
        world.net.run(a.client.timings.keepalive + 2)
        self.assertEqual(world.server.session(a.key).kind, "udp")
        self.assertEqual(a.client.counters["relay_forgot"], 1)
        a.send_to(b, data_message(3))
        world.net.run(1)
        self.assertEqual(b.wireguard.received[-1][0], data_message(3))


class AuthorizationTests(SynchronousTestCase):
    def test_unauthorized_pair(self) -> None:
        world = World()
        a, b = world.node(), world.node()
        world.policy.set_members(NET, [a.key])
        world.policy.set_members("other", [b.key])
        b.client.relay_endpoint(a.key)
        a.send_to(b, data_message(1))
        world.net.run(2)
        self.assertEqual(b.wireguard.received, [])
        self.assertEqual(world.server.counters["drop_not_authorized"], 1)
        # The refusal is cached briefly, not asked again per packet.
        a.send_to(b, data_message(2))
        world.net.run(1)
        self.assertEqual(world.server.counters["drop_not_authorized"], 2)

    def test_unknown_node_refused(self) -> None:
        world = World()
        a = world.node()
        a.client.relay_endpoint(a.key)
        world.net.run(2)
        self.assertIsNone(world.server.session(a.key))
        self.assertEqual(world.server.counters["drop_register_not_authorized"], 1)
        self.assertEqual(a.client.counters["refused"], 1)

    def test_bad_proof(self) -> None:
        world = World()
        a = world.node()
        world.policy.set_members(NET, [a.key])
        impostor = generate_private_key()
        addr = ("198.51.100.99", 9)
        replies: list[bytes] = []
        world.server.attach_udp(lambda data, to: replies.append(data))
        world.server.udp_received(p.hello(a.key), addr)
        challenge = replies[-1][2:]
        proof = p.proof(impostor, world.relays[0].public_key, world.relays[0].public_key,
                        a.key, challenge)
        world.server.udp_received(p.auth(a.key, challenge, proof), addr)
        self.assertEqual(replies[-1], p.refused(p.REFUSED_BAD_PROOF))
        self.assertIsNone(world.server.session(a.key))

    def test_deauthorization_stops_relaying(self) -> None:
        world = World()
        a, b = world.pair()
        c = world.node()
        world.policy.set_members("n2", [b.key, c.key])
        for node in (a, b, c):
            node.client.relay_endpoint(a.key)
        world.net.run(1)
        a.send_to(b, data_message(1))
        c.send_to(b, data_message(1))
        world.net.run(1)
        self.assertEqual(len(b.wireguard.received), 2)

        world.policy.set_members(NET, [b.key])  # a is deauthorized
        world.net.run(0.1)
        self.assertIsNone(world.server.session(a.key))
        a.send_to(b, data_message(2))
        c.send_to(b, data_message(2))
        b.forwarder.send_datagram(data_message(3), RelayEndpoint("r1", a.key))
        world.net.run(5)
        # c and b still share n2; nothing passes between a and b.
        self.assertEqual([addr.peer_key for _, addr in b.wireguard.received[2:]], [c.key])
        self.assertEqual([d for d, _ in a.wireguard.received], [])

    def test_pair_revoked_while_both_stay_members(self) -> None:
        """Cached permissions go the moment the shared network does."""
        world = World()
        a, b = world.pair()
        world.policy.set_members("a-only", [a.key])
        world.policy.set_members("b-only", [b.key])
        b.client.relay_endpoint(a.key)
        a.send_to(b, data_message(1))
        world.net.run(1)
        self.assertEqual(len(b.wireguard.received), 1)
        world.policy.forget_network(NET)
        a.send_to(b, data_message(2))
        world.net.run(1)
        self.assertEqual(len(b.wireguard.received), 1)
        self.assertIsNotNone(world.server.session(a.key))
        self.assertEqual(world.server.counters["drop_not_authorized"], 1)
