"""
Where the relay learns who may talk to whom: the rendezvous's controller
(in process: L{ControllerMembership}) and the AMP link of a standalone relay,
both ways authenticated, in memory.
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from tests.support.relay import MemoryEndpoint, Node, Rendezvous, World, data_message
from twistvpn.relay.client import RelayInfo
from twistvpn.relay.link import (
    LOGIN_TIMEOUT,
    RelayLink,
    RelayLinkServerProtocol,
)
from twistvpn.testing.memorynet import StreamPump
from twistvpn.wireguard.keys import encode_key, generate_private_key, public_key


class StandaloneRelay:
    def __init__(self, world: World, rendezvous: Rendezvous, authorized: bool = True) -> None:
        self.world = world
        self.private = world.relay_private
        self.key = public_key(self.private)
        if authorized:
            rendezvous.relay_keys.add(self.key)
        self.endpoint = MemoryEndpoint(
            world.clock, lambda: RelayLinkServerProtocol(rendezvous.service, world.clock)
        )
        self.link = RelayLink(world.clock, self.endpoint, self.private, self.key,
                              world.policy, lambda proto: world.relays[0])

    def run(self, seconds: float) -> None:
        for _ in range(int(seconds * 10)):
            self.endpoint.flush()
            self.world.net.run(0.1)
        self.endpoint.flush()


class ControllerMembershipTests(SynchronousTestCase):
    def test_follows_the_controller(self) -> None:
        clock = Clock()
        rendezvous = Rendezvous(clock)
        a, b = (public_key(generate_private_key()) for _ in range(2))
        rendezvous.member(a)
        rendezvous.member(b)
        rendezvous.membership.start()
        policy = rendezvous.membership.policy
        self.assertTrue(policy.may_relay(a, b))
        revoked: list[frozenset[bytes]] = []
        policy.add_revocation_observer(revoked.append)
        rendezvous.controller.deauthorize(rendezvous.network_id, encode_key(b))
        # At once: the controller tells the policy, nothing polls.
        self.assertFalse(policy.may_relay(a, b))
        self.assertFalse(policy.may_register(b))
        self.assertEqual(revoked, [frozenset({a, b})])
        rendezvous.controller.delete_network(rendezvous.network_id)
        self.assertFalse(policy.may_register(a))
        rendezvous.membership.stop()
        # Stopped: no longer told.
        c = public_key(generate_private_key())
        rendezvous.network_id = rendezvous.controller.create_network("again")["id"]
        rendezvous.member(c)
        self.assertFalse(policy.may_register(c))


class EmbeddedRelayTests(SynchronousTestCase):
    def test_deauthorization_through_the_controller(self) -> None:
        world = World()
        rendezvous = Rendezvous(world.clock)
        # The embedded relay uses the controller-backed policy directly.
        world.server.policy.remove_revocation_observer(world.server.revoked)
        world.server.policy = world.policy = rendezvous.membership.policy
        world.server.policy.add_revocation_observer(world.server.revoked)
        a, b = world.node(), world.node()
        rendezvous.member(a.key)
        rendezvous.member(b.key)
        rendezvous.membership.start()
        a.client.relay_endpoint(b.key)
        b.client.relay_endpoint(a.key)
        world.net.run(1)
        a.send_to(b, data_message(1))
        world.net.run(1)
        self.assertEqual(len(b.wireguard.received), 1)
        rendezvous.controller.deauthorize(rendezvous.network_id, encode_key(a.key))
        world.net.run(2.5)
        a.send_to(b, data_message(2))
        b.forwarder.send_datagram(data_message(3), b.wireguard.received[0][1])
        world.net.run(5)
        self.assertEqual(len(b.wireguard.received), 1)
        self.assertEqual(a.wireguard.received, [])
        self.assertIsNone(world.server.session(a.key))
        rendezvous.membership.stop()


class LinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = World()
        self.rendezvous = Rendezvous(self.world.clock)
        self.rendezvous.membership.start()

    def linked(self) -> tuple[Node, Node, StandaloneRelay]:
        """Two members and a standalone relay logged in to the rendezvous."""
        world, rendezvous = self.world, self.rendezvous
        a, b = world.node(), world.node()
        rendezvous.member(a.key)
        rendezvous.member(b.key)
        relay = StandaloneRelay(world, rendezvous)
        relay.link.start()
        relay.run(1)
        return a, b, relay

    def test_login_sync_and_deauthorization(self) -> None:
        world, rendezvous = self.world, self.rendezvous
        a, b, relay = self.linked()
        self.assertTrue(relay.link.synced)
        self.assertEqual(world.policy.networks(),
                         {rendezvous.network_id: frozenset({a.key, b.key})})
        # The relay announced itself, for the network map.
        self.assertEqual([RelayInfo.from_map(r) for r in rendezvous.advertised],
                         world.relays)
        a.client.relay_endpoint(b.key)
        b.client.relay_endpoint(a.key)
        relay.run(1)
        a.send_to(b, data_message(1))
        relay.run(1)
        self.assertEqual(len(b.wireguard.received), 1)

        rendezvous.controller.deauthorize(rendezvous.network_id, encode_key(b.key))
        relay.run(3)  # the controller is polled every 2 s
        self.assertEqual(world.policy.networks(), {rendezvous.network_id: frozenset({a.key})})
        self.assertIsNone(world.server.session(b.key))
        a.send_to(b, data_message(2))
        relay.run(1)
        self.assertEqual(len(b.wireguard.received), 1)
        relay.link.stop()

    def test_devices_reach_standalone_relays(self) -> None:
        """Which members are devices travels over the link (docs/devices.md)."""
        world, rendezvous = self.world, self.rendezvous
        a, b, relay = self.linked()
        self.assertEqual(world.policy.device_reachable(), frozenset())
        phone = public_key(generate_private_key())
        rendezvous.controller.add_device(rendezvous.network_id, "phone", phone)
        relay.run(1)
        self.assertEqual(world.policy.devices(), {rendezvous.network_id: frozenset({phone})})
        self.assertEqual(world.policy.device_reachable(), frozenset({a.key, b.key}))
        rendezvous.controller.deauthorize(rendezvous.network_id, "phone")
        relay.run(1)
        self.assertEqual(world.policy.device_reachable(), frozenset())
        relay.link.stop()

    def test_unauthorized_relay_refused(self) -> None:
        world, rendezvous = self.world, self.rendezvous
        a = world.node()
        rendezvous.member(a.key)
        relay = StandaloneRelay(world, rendezvous, authorized=False)
        relay.link.start()
        relay.run(1)
        self.assertFalse(relay.link.synced)
        self.assertEqual(world.policy.networks(), {})
        self.assertEqual(rendezvous.advertised, ())
        self.assertGreaterEqual(relay.link.counters_login_failed, 1)
        relay.link.stop()
        self.flushLoggedErrors()

    def test_wrong_key_proof_refused(self) -> None:
        """Knowing an authorized relay's public key is not enough."""
        world, rendezvous = self.world, self.rendezvous
        relay = StandaloneRelay(world, rendezvous)
        relay.link.private_key = generate_private_key()
        relay.link.start()
        relay.run(1)
        self.assertFalse(relay.link.synced)
        self.assertEqual(rendezvous.service.connected, {})
        relay.link.stop()
        self.flushLoggedErrors()

    def test_fails_closed_without_rendezvous(self) -> None:
        world = self.world
        a, b, relay = self.linked()
        a.client.relay_endpoint(b.key)
        relay.run(1)
        self.assertIsNotNone(world.server.session(a.key))
        relay.endpoint.refuse = True
        relay.endpoint.servers[0].transport.loseConnection()
        relay.run(relay.link.stale_after - 5)
        self.assertTrue(world.policy.may_relay(a.key, b.key))  # still within grace
        relay.run(10)
        self.assertFalse(world.policy.may_relay(a.key, b.key))
        self.assertIsNone(world.server.session(a.key))
        # The rendezvous comes back: the table is restored.
        relay.endpoint.refuse = False
        relay.run(35)
        self.assertTrue(world.policy.may_relay(a.key, b.key))
        relay.link.stop()

    def test_silent_connection_dropped(self) -> None:
        """A connection to the link that never logs in does not stay."""
        world, rendezvous = self.world, self.rendezvous
        server = RelayLinkServerProtocol(rendezvous.service, world.clock)
        client = amp.AMP()
        pump = StreamPump(client, server)
        world.clock.advance(LOGIN_TIMEOUT + 1)
        pump.flush()
        self.assertTrue(pump.closed)

    def test_announcement_must_match_key(self) -> None:
        world, rendezvous = self.world, self.rendezvous
        relay = StandaloneRelay(world, rendezvous)
        other = RelayInfo("r1", "203.0.113.1", 3478, 443, public_key(generate_private_key()))
        relay.link._announce = lambda proto: other
        relay.link.start()
        relay.run(1)
        self.assertEqual(rendezvous.service.connected, {})
        relay.link.stop()
        self.flushLoggedErrors()


class RelayInfoTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        info = RelayInfo("r", "192.0.2.1", 1, 2, bytes(range(32)), "ab" * 32)
        self.assertEqual(RelayInfo.from_map(json.loads(json.dumps(info.to_map()))), info)

    def test_malformed(self) -> None:
        good = RelayInfo("r", "192.0.2.1", 1, 2, bytes(range(32))).to_map()
        for change in ({"host": "example.com"}, {"port": 0}, {"public_key": "x"},
                       {"tcp_port": "many"}, {"fingerprint": "zz"}):
            with self.assertRaises(ValueError):
                RelayInfo.from_map({**good, **change})
        with self.assertRaises(ValueError):
            RelayInfo.from_map([])
