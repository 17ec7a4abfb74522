"""
The relay's sessions against someone who sees their frames (audit items 1
and 2): the token in every UDP frame proves nothing, so a session moves to
another address only with the session key, and a forged refusal costs a
node a registration, never its path.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase

from tests.support.relay import RELAY_ADDR, World, data_message
from twistvpn.relay import protocol as p
from twistvpn.relay.client import RegistrationState

EVE = ("203.0.113.66", 666)


class Eve(DatagramProtocol):
    """An attacker on the path: sees a frame, sends what she likes."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.received.append(data)


class HijackTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = world = World()
        self.a, self.b = world.registered_pair()
        self.eve = Eve()
        world.net.bind(self.eve, EVE)
        self.session = world.server.session(self.a.key)
        self.token = self.session.token  # seen in any frame a sends

    def eve_sends(self, frame: bytes) -> None:
        self.eve.transport.write(frame, RELAY_ADDR)
        self.world.net.run(0.1)

    def relayed_to_eve(self) -> list[bytes]:
        return [f for f in self.eve.received if f[:2] == p.header(p.RECV)]

    def test_an_observed_token_does_not_move_the_session(self) -> None:
        self.eve_sends(p.header(p.PING) + b"n" * 8 + self.token + b"x" * p.TAG)
        self.assertEqual(self.session.addr, self.a.addr)
        self.assertEqual(self.world.server.counters["drop_bad_ping_tag"], 1)
        self.b.send_to(self.a, data_message(1))
        self.world.net.run(1)
        self.assertEqual(len(self.a.wireguard.received), 1)
        self.assertEqual(self.relayed_to_eve(), [])

    def test_the_old_untagged_ping_is_malformed(self) -> None:
        self.eve_sends(p.header(p.PING) + b"n" * 8 + self.token)
        self.assertEqual(self.session.addr, self.a.addr)
        self.assertEqual(self.world.server.counters["malformed_udp"], 1)

    def test_a_send_from_another_address_is_dropped(self) -> None:
        self.eve_sends(p.send(self.token, self.b.key, data_message(9)))
        self.eve_sends(p.send(self.token, self.b.key, data_message(10)))
        self.assertEqual(self.session.addr, self.a.addr)
        self.assertEqual(self.world.server.counters["drop_udp_unbound_addr"], 2)
        self.world.net.run(1)
        self.assertEqual(self.b.wireguard.received, [])
        # Eve is told to prove the session (she cannot), once a second at most.
        self.assertEqual(self.eve.received, [p.rebind()])

    def test_nat_rebinding_is_followed_with_proof(self) -> None:
        """The node's NAT gives it a new port: one round trip later it is followed."""
        world, a, b = self.world, self.a, self.b
        del world.net.sockets[a.addr]
        a.addr = a.forwarder.transport.addr = ("198.51.100.1", 50001)
        world.net.sockets[a.addr] = a.forwarder
        a.send_to(b, data_message(1))  # dropped: the relay does not know the address
        world.net.run(0.5)
        self.assertEqual(self.session.addr, a.addr)
        self.assertEqual(world.server.counters["udp_rebind"], 1)
        self.assertEqual(a.client.counters["rebind_hints"], 1)
        a.send_to(b, data_message(2))
        b.send_to(a, data_message(3))
        world.net.run(0.5)
        self.assertEqual([d for d, _ in b.wireguard.received], [data_message(2)])
        self.assertEqual([d for d, _ in a.wireguard.received], [data_message(3)])


class ForgedRefusalTests(SynchronousTestCase):
    def test_a_forged_refusal_keeps_the_path(self) -> None:
        world = World()
        a, b = world.registered_pair()
        registration = a.client._links["r1"]
        old_token = registration.token
        # Anyone can send three bytes "from" the relay's address.
        a.forwarder.datagramReceived(p.refused(p.REFUSED_UNKNOWN_SESSION), RELAY_ADDR)
        self.assertEqual(registration.state, RegistrationState.UP_UDP_REGISTERING_UDP)
        self.assertEqual(a.client.path("r1"), "udp")
        a.send_to(b, data_message(1))  # still carried on the old session
        world.net.run(1)
        self.assertEqual([d for d, _ in b.wireguard.received], [data_message(1)])
        self.assertEqual(registration.state, RegistrationState.UP_UDP)
        self.assertNotEqual(registration.token, old_token)
        self.assertEqual(a.client.counters["registration_bad_transition"], 0)
        a.send_to(b, data_message(2))
        world.net.run(1)
        self.assertEqual(len(b.wireguard.received), 2)

    def test_a_forged_rebind_costs_one_ping_a_second(self) -> None:
        world = World()
        a, _ = world.registered_pair()
        for _ in range(50):
            a.forwarder.datagramReceived(p.rebind(), RELAY_ADDR)
        self.assertEqual(a.client.counters["rebind_hints"], 1)
        self.assertEqual(a.client.counters["drop_rebind_hint"], 49)
        world.net.run(1)
        self.assertEqual(world.server.session(a.key).addr, a.addr)
        self.assertEqual(a.client.path("r1"), "udp")
