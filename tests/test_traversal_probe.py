"""
Probes: the shared key, the wire format, and every way a third party might
inject, replay or redirect a path (each dropped and counted).
"""

from __future__ import annotations

import random

from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twistvpn.interfaces import IDatagramHandler, IPeerDemand
from twistvpn.testing.natsim import Internet
from twistvpn.testing.pathsim import SimNode
from twistvpn.traversal import probe
from twistvpn.traversal.probe import BoundEndpoint, ProbeService
from twistvpn.wire import PROBE, PROBE_REPLY
from twistvpn.wireguard.keys import generate_private_key, public_key


class Listener:
    def __init__(self) -> None:
        self.verified: list[tuple[object, float, str]] = []
        self.probed: list[tuple[object, str]] = []

    def path_verified(self, endpoint, rtt, tag):
        self.verified.append((endpoint, rtt, tag))

    def probe_received(self, endpoint, tag):
        self.probed.append((endpoint, tag))


class Sniffer(DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []

    def datagramReceived(self, data, addr):
        self.received.append((data, addr))


class KeyTests(SynchronousTestCase):
    def test_both_sides_derive_the_same_key(self) -> None:
        a, b, c = (generate_private_key() for _ in range(3))
        pa, pb, pc = public_key(a), public_key(b), public_key(c)
        self.assertEqual(probe.probe_key(a, pa, pb), probe.probe_key(b, pb, pa))
        self.assertNotEqual(probe.probe_key(a, pa, pb), probe.probe_key(a, pa, pc))
        self.assertEqual(len(probe.probe_key(a, pa, pb)), 32)

    def test_low_order_point_refused(self) -> None:
        a = generate_private_key()
        self.assertRaises(ValueError, probe.probe_key, a, public_key(a), bytes(32))

    def test_round_trip_encoding(self) -> None:
        key = bytes(range(32))
        data = probe.encode_probe(key, b"s" * 8, b"t" * 8, 12.5, "birthday")
        msg = probe.decode(data)
        self.assertEqual((msg.kind, msg.tag, msg.timestamp), (PROBE, "birthday", 12.5))
        reply = probe.decode(probe.encode_reply(key, b"s" * 8, b"t" * 8, 1.0, ("1.2.3.4", 9)))
        self.assertEqual((reply.kind, reply.observed), (PROBE_REPLY, ("1.2.3.4", 9)))


class ServiceTests(SynchronousTestCase):
    """Two nodes on one simulated internet, plus an attacker host."""

    def setUp(self) -> None:
        self.net = Internet(seed=2)
        rng = random.Random(1)
        self.a = SimNode(self.net.add_public_host(), rng)
        self.b = SimNode(self.net.add_public_host(), rng)
        self.la, self.lb = Listener(), Listener()
        self.a.probes.add_peer(self.b.public_key, self.la)
        self.b.probes.add_peer(self.a.public_key, self.lb)
        self.evil = self.net.add_public_host()
        self.sniffed = Sniffer()
        self.evil_port = self.evil.reactor.listenUDP(666, self.sniffed)
        self.captured: list[tuple[tuple[str, int], tuple[str, int], bytes]] = []
        self.net.tap(lambda src, dst, data: self.captured.append((src, dst, data)))

    def test_interface(self) -> None:
        verifyObject(IDatagramHandler, self.a.probes)

    def test_probe_verifies_path(self) -> None:
        self.a.probes.send_probe(self.b.public_key, self.b.local, "punch")
        self.net.run(1.0)
        self.assertEqual(self.lb.probed, [(self.a.local, "punch")])
        [(endpoint, rtt, tag)] = self.la.verified
        self.assertEqual((endpoint, tag), (self.b.local, "punch"))
        self.assertAlmostEqual(rtt, 0.04)

    def test_unauthenticated_dropped(self) -> None:
        # A probe with B's sender id but a MAC under the wrong key.
        forged = probe.encode_probe(bytes(32), probe.peer_id(self.a.public_key), b"x" * 8,
                                    self.net.clock.seconds(), "punch")
        self.evil_port.write(forged, self.b.local)
        flipped = bytearray(probe.encode_probe(bytes(32), b"\0" * 8, b"y" * 8, 0.0, "p"))
        self.evil_port.write(bytes(flipped), self.b.local)
        self.net.run(1.0)
        self.assertEqual(self.b.probes.counters["drop_unauthenticated"], 1)
        self.assertEqual(self.b.probes.counters["drop_unknown_peer"], 1)
        self.assertEqual(self.lb.probed, [])
        self.assertEqual(self.sniffed.received, [])

    def test_tampered_probe_dropped(self) -> None:
        self.a.probes.send_probe(self.b.public_key, self.b.local, "punch")
        data = bytearray(self.captured[-1][2])
        self.captured.clear()
        data[-20] ^= 1
        self.evil_port.write(bytes(data), self.b.local)
        self.net.run(1.0)
        self.assertEqual(self.b.probes.counters["drop_unauthenticated"], 1)

    def test_replayed_probe_from_elsewhere_is_not_answered(self) -> None:
        self.a.probes.send_probe(self.b.public_key, self.b.local, "punch")
        self.net.run(1.0)
        original = next(d for s, _, d in self.captured if d[0] == PROBE)
        # The attacker replays A's probe from its own address, hoping B
        # will answer it (and treat the attacker's address as A's path).
        self.evil_port.write(original, self.b.local)
        self.net.run(1.0)
        self.assertEqual(self.b.probes.counters["drop_replay"], 1)
        self.assertEqual(len(self.lb.probed), 1)
        self.assertEqual(self.sniffed.received, [])

    def test_stale_probe_dropped(self) -> None:
        self.a.probes.send_probe(self.b.public_key, self.b.local, "punch")
        original = self.captured[-1][2]
        # Held up for five minutes on the way (dropped on arrival), then
        # replayed once more.
        self.net.clock.advance(300)
        self.evil_port.write(original, self.b.local)
        self.net.run(1.0)
        self.assertEqual(self.b.probes.counters["drop_stale"], 2)
        self.assertEqual(self.lb.probed, [])

    def test_redirected_reply_dropped(self) -> None:
        self.a.probes.send_probe(self.b.public_key, self.b.local, "punch")
        self.net.run(0.025)  # the probe reached B; the reply is in flight
        reply = next(d for _, _, d in self.captured if d[0] == PROBE_REPLY)
        # The same reply, arriving from the attacker's address first.
        self.a.probes.datagram_received(reply, (self.evil.ip, 666))
        self.assertEqual(self.a.probes.counters["drop_redirected"], 1)
        self.assertEqual(self.la.verified, [])
        self.net.run(1.0)
        self.assertEqual([e for e, _, _ in self.la.verified], [self.b.local])
        # And once more: the transaction is spent.
        self.a.probes.datagram_received(reply, self.b.local)
        self.assertEqual(self.a.probes.counters["drop_unexpected_reply"], 1)
        self.assertEqual(len(self.la.verified), 1)

    def test_reply_on_wrong_socket_dropped(self) -> None:
        self.a.probes.send_probe(self.b.public_key, self.b.local, "punch")
        self.net.run(0.025)
        reply = next(d for _, _, d in self.captured if d[0] == PROBE_REPLY)
        self.a.probes.datagram_received(reply, BoundEndpoint(1, *self.b.local))
        self.assertEqual(self.a.probes.counters["drop_redirected"], 1)

    def test_malformed_dropped(self) -> None:
        for junk in (b"\xf3", b"\xf3" + b"\0" * 50, b"\xf4\1\2\3" + b"\0" * 60,
                     b"\xf3\0\0\0" + b"\0" * 24 + b"\xff" + b"\0" * 16):
            self.b.forwarder.dispatch(junk, (self.evil.ip, 666))
        self.assertEqual(self.b.probes.counters["drop_malformed"], 4)
        self.assertEqual(self.b.forwarder.counters["drop_handler_error"], 0)

    def test_extra_socket_round_trip(self) -> None:
        sockets = self.a.probes.sockets
        local = sockets.open()
        endpoint = BoundEndpoint(local, *self.b.local)
        self.a.probes.send_probe(self.b.public_key, endpoint, "birthday")
        self.net.run(1.0)
        self.assertEqual([e for e, _, _ in self.la.verified], [endpoint])
        self.assertEqual(self.lb.probed[0][0], (self.a.host.ip, local))
        sockets.retain(local)
        sockets.release(local)
        self.assertEqual(len(sockets), 1)
        sockets.release(local)
        self.assertEqual(len(sockets), 0)
        self.a.forwarder.send_datagram(b"\xfe", endpoint)
        self.assertEqual(sockets.counters["drop_socket_closed"], 1)

    def test_unknown_peer_send_refused(self) -> None:
        self.assertRaises(KeyError, self.a.probes.send_probe, b"k" * 32, self.b.local, "x")


class ProbeServiceAloneTests(SynchronousTestCase):
    def test_pending_expire(self) -> None:
        net = Internet()
        rng = random.Random(0)
        a = SimNode(net.add_public_host(), rng)
        key = public_key(generate_private_key())
        a.probes.add_peer(key, Listener())
        for _ in range(10):
            a.probes.send_probe(key, ("203.0.113.200", 1), "punch")
        self.assertEqual(len(a.probes._pending), 10)
        net.run(a.probes.reply_window + 1)
        a.probes.send_probe(key, ("203.0.113.200", 1), "punch")
        self.assertEqual(len(a.probes._pending), 1)
        self.assertIsInstance(a.probes, ProbeService)


@implementer(IPeerDemand)
class ProbeDemand:
    """Names the one member it knows and makes its peer when asked."""

    def __init__(self, probes: ProbeService, key: bytes, listener: Listener) -> None:
        self.probes, self.key, self.listener = probes, key, listener
        self.made: list[bytes] = []

    def peer_for_address(self, destination: bytes) -> bool:
        return False

    def peer_for_key(self, public_key: bytes) -> bool:
        self.made.append(public_key)
        self.probes.add_peer(public_key, self.listener)
        return True

    def key_for_probe_id(self, sender_id: bytes) -> bytes | None:
        return self.key if sender_id == probe.peer_id(self.key) else None


class LazyPeerTests(ServiceTests):
    """B keeps no peer for A until A's authenticated probe makes it."""

    def setUp(self) -> None:
        super().setUp()
        self.b.probes.remove_peer(self.a.public_key)
        self.demand = ProbeDemand(self.b.probes, self.a.public_key, self.lb)
        self.b.probes.demand = self.demand

    def test_probe_makes_the_peer(self) -> None:
        verifyObject(IPeerDemand, self.demand)
        self.a.probes.send_probe(self.b.public_key, self.b.local, "punch")
        self.net.run(1.0)
        self.assertEqual(self.demand.made, [self.a.public_key])
        self.assertEqual(self.lb.probed, [(self.a.local, "punch")])
        self.assertEqual(len(self.la.verified), 1)
        self.assertEqual(self.b.probes.counters["peer_demanded"], 1)

    def test_forged_probe_makes_nothing(self) -> None:
        forged = probe.encode_probe(bytes(32), probe.peer_id(self.a.public_key), b"x" * 8,
                                    self.net.clock.seconds(), "punch")
        self.evil_port.write(forged, self.b.local)
        stranger = probe.encode_probe(bytes(32), b"\1" * 8, b"y" * 8,
                                      self.net.clock.seconds(), "punch")
        self.evil_port.write(stranger, self.b.local)
        self.net.run(1.0)
        self.assertEqual(self.demand.made, [])
        self.assertEqual(self.b.probes.counters["drop_unauthenticated"], 1)
        self.assertEqual(self.b.probes.counters["drop_unknown_peer"], 1)
        self.assertEqual(self.sniffed.received, [])
