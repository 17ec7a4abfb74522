"""
The relay under abuse: floods stay within the queue and rate bounds, idle
and silent connections are closed, garbage is dropped and counted and ends
only the connection it came on.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.relay import NET, RELAY_ADDR, World, data_message
from twistvpn.relay import protocol as p
from twistvpn.relay.policy import MembershipPolicy
from twistvpn.relay.server import RelayLimits, RelayServer
from twistvpn.relay.transport import relay_stream_factory
from twistvpn.testing.memorynet import StreamPump
from twistvpn.wireguard.keys import generate_private_key, public_key


class FloodTests(SynchronousTestCase):
    def test_node_rate_limit(self) -> None:
        limits = RelayLimits(node_rate=100_000, node_burst=20_000)
        world = World(limits)
        a, b = world.registered_pair()
        message = data_message(0, size=984)  # 1000 bytes, 1042 framed
        for _tenth in range(30):  # 3000 frames over three seconds
            for _ in range(100):
                a.send_to(b, message)
            world.net.run(0.1)
        # A burst plus 100 kB/s for about three seconds, not 3 MB.
        delivered = len(b.wireguard.received) * 1042
        self.assertLessEqual(delivered, 20_000 + 100_000 * 3.1)
        self.assertGreaterEqual(delivered, 100_000 * 2)
        self.assertEqual(world.server.counters["drop_rate_node"],
                         3000 - len(b.wireguard.received))

    def test_global_rate_limit(self) -> None:
        limits = RelayLimits(global_rate=50_000, global_burst=10_000)
        world = World(limits)
        nodes = [world.node() for _ in range(3)]
        world.policy.set_members(NET, [n.key for n in nodes])
        for n in nodes:
            n.client.relay_endpoint(nodes[0].key)
        world.net.run(1)
        message = data_message(0, size=984)
        for sender in nodes[1:]:
            for _ in range(500):
                sender.send_to(nodes[0], message)
        world.net.run(1)
        delivered = len(nodes[0].wireguard.received) * 1042
        self.assertLessEqual(delivered, 10_000 + 50_000 * 1.1)
        self.assertGreater(world.server.counters["drop_rate_global"], 900)

    def test_tcp_queue_bound(self) -> None:
        """A receiver that cannot keep up gets a bounded queue, then drops."""
        limits = RelayLimits(queue_frames=50, queue_bytes=1 << 20)
        world = World(limits)
        a, b = world.registered_pair(5, b_blocked=True)
        connection = world.server.session(b.key).connection
        connection.pause()  # b's socket buffer is full
        for n in range(500):
            a.send_to(b, data_message(n))
        world.net.run(1)
        self.assertEqual(len(connection.queue), 50)
        self.assertEqual(world.server.counters["drop_queue_full"], 450)
        connection.resume()
        world.net.run(1)
        self.assertEqual([d for d, _ in b.wireguard.received],
                         [data_message(n) for n in range(50)])
        self.assertEqual(connection.queued_bytes, 0)

    def test_pending_authorization_bound(self) -> None:
        """Frames waiting for a slow policy answer are bounded too."""
        world = World(RelayLimits(pending_frames=8))
        a, b = world.pair()
        answers: list[Deferred[bool]] = []
        world.policy.may_relay = lambda src, dst: answers.append(Deferred()) or answers[-1]
        b.client.relay_endpoint(a.key)
        a.client.relay_endpoint(b.key)
        world.net.run(1)
        for n in range(20):
            a.send_to(b, data_message(n))
        world.net.run(1)
        self.assertEqual(len(answers), 1)  # asked once, not per packet
        self.assertEqual(world.server.counters["drop_pending_full"], 12)
        answers[0].callback(True)
        world.net.run(1)
        self.assertEqual(len(b.wireguard.received), 8)

    def test_client_queue_bound(self) -> None:
        world = World()
        a, b = world.pair()
        for n in range(200):
            a.send_to(b, data_message(n))
        self.assertEqual(a.client.counters["drop_queue_full"], 200 - a.client.timings.queue_frames)


class IdleTests(SynchronousTestCase):
    def test_idle_session_closed(self) -> None:
        world = World()
        a, b = world.pair()
        a.client.relay_endpoint(b.key)
        world.net.run(1)
        world.net.udp_blocked.add(a.addr)  # gone without a word: no BYE, no keepalives
        a.client.stop()
        world.net.run(world.server.limits.idle_timeout + 5)
        self.assertIsNone(world.server.session(a.key))
        self.assertEqual(world.server.counters["closed_idle"], 1)

    def test_keepalives_keep_session(self) -> None:
        world = World()
        a, b = world.pair(a_blocked=True)
        a.client.relay_endpoint(b.key)
        world.net.run(world.server.limits.idle_timeout * 3)
        self.assertEqual(world.server.session(a.key).kind, "tcp")
        self.assertEqual(world.server.counters["closed_idle"], 0)

    def test_unauthenticated_tcp_closed(self) -> None:
        world = World()
        server_proto, pump = connect_raw(world)
        world.net.run(world.server.limits.auth_timeout + 5)
        self.assertTrue(pump.server_transport.disconnecting)
        self.assertEqual(world.server.counters["closed_unauthenticated"], 1)


def connect_raw(world: World) -> tuple[Protocol, StreamPump]:
    """A TCP connection to the relay with a client that speaks raw bytes."""
    server_proto = relay_stream_factory(world.server).buildProtocol(None)
    client_proto = Protocol()
    pump = StreamPump(client_proto, server_proto)
    world.net.pumps.append(pump)
    return client_proto, pump


class GarbageTests(SynchronousTestCase):
    def test_udp_garbage(self) -> None:
        world = World()
        a, b = world.registered_pair()
        junk = [b"", b"\xf5", b"\xf5\x99junk", b"\x00" * 40, p.welcome(b"x" * 8),
                p.header(p.AUTH) + b"short", os.urandom(1500)]
        for frame in junk:
            world.server.udp_received(frame, ("198.51.100.200", 1))
        self.assertGreaterEqual(world.server.counters["malformed_udp"], 5)
        a.send_to(b, data_message(1))
        world.net.run(1)
        self.assertEqual(len(b.wireguard.received), 1)

    def test_tcp_garbage_closes_that_connection_only(self) -> None:
        world = World()
        a, b = world.registered_pair(5, a_blocked=True, b_blocked=True)
        for garbage in (b"\x00\x00", p.frame_for_stream(b"\xf5\x77"), p.frame_for_stream(b"x")):
            client, pump = connect_raw(world)
            client.transport.write(garbage)
            world.net.run(0.1)
            self.assertTrue(pump.closed)
        self.assertEqual(world.server.counters["malformed_tcp"], 3)
        a.send_to(b, data_message(1))
        world.net.run(1)
        self.assertEqual(len(b.wireguard.received), 1)
        self.assertEqual(world.server.stats()["tcp_connections"], 2)

    def test_send_with_another_token_on_tcp(self) -> None:
        world = World()
        a, b = world.registered_pair(5, a_blocked=True)
        link = a.client._links["r1"]
        link.stream.connection.write_frame(p.send(b"\x00" * 8, b.key, data_message(1)))
        world.net.run(1)
        self.assertEqual(world.server.counters["malformed_tcp"], 1)
        self.assertEqual(b.wireguard.received, [])

    def test_unknown_token_udp(self) -> None:
        world = World()
        world.server.udp_received(p.send(b"\x01" * 8, b"\x02" * 32, b"x"), ("198.51.100.9", 9))
        self.assertEqual(world.server.counters["drop_unknown_token"], 1)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_any_datagram_is_safe(self, data: bytes) -> None:
        server = _bare_server()
        server.udp_received(data, ("198.51.100.1", 1))
        server.udp_received(b"\xf5" + data, ("198.51.100.1", 1))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=80), max_size=8))
    def test_any_stream_is_safe(self, chunks: list[bytes]) -> None:
        server = _bare_server()
        closed: list[bool] = []
        connection = server.stream_opened(lambda data: None, lambda: closed.append(True))
        decoder = p.StreamDecoder()
        for chunk in chunks:
            try:
                frames = decoder.feed(chunk)
            except p.MalformedFrameError:
                connection.stream_malformed()
                break
            for frame in frames:
                connection.frame_received(frame)
                if connection.closed:
                    break
        self.assertEqual(bool(closed), connection.closed)


def _bare_server() -> RelayServer:
    private = generate_private_key()
    server = RelayServer(Clock(), private, public_key(private), MembershipPolicy())
    server.attach_udp(lambda data, addr: None)
    return server


class SessionEndTests(SynchronousTestCase):
    def test_bye_ends_udp_session(self) -> None:
        world = World()
        a, b = world.registered_pair()
        a.client.stop()  # says BYE
        world.net.run(0.1)
        self.assertIsNone(world.server.session(a.key))
        self.assertIsNotNone(world.server.session(b.key))

    def test_bye_only_from_the_session(self) -> None:
        """Audit item 8d: a BYE with an unknown token was dropped uncounted."""
        world = World()
        a, _ = world.registered_pair()
        world.server.attach_udp(lambda data, addr: None)
        world.server.udp_received(p.bye(b"t" * 8), ("198.51.100.66", 1))
        token = world.server.session(a.key).token
        world.server.udp_received(p.bye(token), ("198.51.100.66", 1))  # seen, replayed
        self.assertEqual(world.server.counters["drop_bye_unknown"], 2)
        self.assertIsNotNone(world.server.session(a.key))

    def test_newer_registration_replaces_older(self) -> None:
        """The same node registering again (new socket, other path) wins."""
        world = World()
        a, b = world.registered_pair(5, a_blocked=True)
        old = world.server.session(a.key)
        self.assertEqual(old.kind, "tcp")
        world.net.udp_blocked.discard(a.addr)
        a.client._links["r1"].start_udp()
        world.net.run(1)
        self.assertEqual(world.server.session(a.key).kind, "udp")
        self.assertTrue(old.connection.closed)
        self.assertEqual(a.client.path("r1"), "udp")

    def test_ping_with_stale_token(self) -> None:
        world = World()
        replies: list[bytes] = []
        world.server.attach_udp(lambda data, addr: replies.append(data))
        world.server.udp_received(p.ping(b"n" * 8, b"t" * 8), ("198.51.100.3", 3))
        self.assertEqual(replies, [p.pong(b"n" * 8, False)])


class ClientGarbageTests(SynchronousTestCase):
    def test_garbage_from_the_relay_address(self) -> None:
        world = World()
        a, b = world.registered_pair()
        for junk in (b"\xf5", b"\xf5\x77xx", p.recv(b"k" * 32, b"")[:-1], b"\xf5\x11short"):
            a.forwarder.datagramReceived(junk, RELAY_ADDR)
        self.assertEqual(a.client.counters["drop_malformed"], 4)
        a.forwarder.datagramReceived(p.welcome(b"t" * 8), ("198.51.100.250", 1))
        self.assertEqual(a.client.counters["drop_unknown_relay"], 1)
        b.send_to(a, data_message(1))
        world.net.run(1)
        self.assertEqual(len(a.wireguard.received), 1)

    def test_garbage_on_tcp_ends_that_stream(self) -> None:
        world = World()
        a, b = world.registered_pair(5, a_blocked=True)
        link = a.client._links["r1"]
        stream = link.stream
        stream.frame_received(b"\xf5\x99")
        self.assertTrue(stream.dead)
        self.assertEqual(a.client.counters["drop_malformed"], 1)
        world.net.run(10)  # registers again, over TCP since UDP is still blocked
        self.assertEqual(a.client.path("r1"), "tcp")
        b.send_to(a, data_message(2))
        world.net.run(1)
        self.assertEqual(a.wireguard.received[-1][0], data_message(2))


class ClientCountsTests(SynchronousTestCase):
    def test_unexpected_frames_counted(self) -> None:
        """Audit item 8d: challenges and welcomes while not registering were dropped uncounted."""
        world = World()
        a, _ = world.registered_pair()
        for frame in (p.challenge(b"c" * p.CHALLENGE_LENGTH), p.welcome(b"w" * 8),
                      p.refused(p.REFUSED_FULL)):
            a.forwarder.datagramReceived(frame, RELAY_ADDR)
        counters = a.client.counters
        self.assertEqual((counters["drop_unexpected_challenge"],
                          counters["drop_unexpected_welcome"],
                          counters["drop_unexpected_refused"]), (1, 1, 1))
        self.assertEqual(a.client.path("r1"), "udp")


class RegistrationFloodTests(SynchronousTestCase):
    def test_one_source_cannot_spend_everyones_registrations(self) -> None:
        """
        Audit item 8c: 2,500 junk proofs from one address, each on a
        challenge it asked for itself, locked out a legitimate member; now
        that address spends its own budget only.
        """
        world = World()
        node = generate_private_key()
        key = public_key(node)
        world.policy.set_members(NET, [key])
        relay_key = world.relays[0].public_key
        replies: list[tuple[bytes, Any]] = []
        world.server.attach_udp(lambda data, addr: replies.append((data, addr)))
        flooder = ("198.51.100.66", 666)
        for _ in range(2500):
            world.server.udp_received(p.hello(key), flooder)
            challenge = replies[-1][0][2:]
            world.server.udp_received(p.auth(key, challenge, b"junk" * 4), flooder)
        self.assertEqual(world.server.counters["drop_bad_proof"], 20)  # its burst
        self.assertEqual(world.server.counters["drop_rate_auth_source"], 2480)
        member = ("198.51.100.7", 7)
        world.server.udp_received(p.hello(key), member)
        challenge = replies[-1][0][2:]
        world.server.udp_received(
            p.auth(key, challenge, p.proof(node, relay_key, relay_key, key, challenge)), member)
        self.assertEqual(world.server.counters["registrations"], 1)

    def test_registrations_are_rate_limited(self) -> None:
        """Each registration costs a Diffie-Hellman: a flood of them is bounded."""
        world = World(RelayLimits(auth_rate=5))
        node = generate_private_key()
        key = public_key(node)
        world.policy.set_members(NET, [key])
        relay_key = world.relays[0].public_key
        replies: list[bytes] = []
        world.server.attach_udp(lambda data, addr: replies.append(data))
        for n in range(50):
            addr = ("198.51.100.50", 1000 + n)
            world.server.udp_received(p.hello(key), addr)
            challenge = replies[-1][2:]
            world.server.udp_received(
                p.auth(key, challenge, p.proof(node, relay_key, relay_key, key, challenge)), addr)
        self.assertEqual(world.server.counters["registrations"], 10)  # the relay's burst
        # The source's own burst (20) is spent first; the relay's (10) is what passes.
        self.assertEqual(world.server.counters["drop_rate_auth"], 10)
        self.assertEqual(world.server.counters["drop_rate_auth_source"], 30)
        world.clock.advance(1)
        world.server.udp_received(p.hello(key), ("198.51.100.51", 1))
        challenge = replies[-1][2:]
        world.server.udp_received(
            p.auth(key, challenge, p.proof(node, relay_key, relay_key, key, challenge)),
            ("198.51.100.51", 1))
        self.assertEqual(world.server.counters["registrations"], 11)
