"""
The WireGuard device end to end: two (or three) devices in memory on one
L{Clock}, no sockets, no real time.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.support.wireguard import (
    A_TO_B,
    B_TO_A,
    Network,
    hold,
    ipv4_packet,
    ipv6_packet,
    pair,
)
from twistvpn.interfaces import IPeerDemand, IWireGuardDevice, IWireGuardPeer
from twistvpn.wire import (
    WG_HANDSHAKE_INITIATION,
    WG_HANDSHAKE_RESPONSE,
    WG_TRANSPORT_DATA,
)
from twistvpn.wireguard import keys
from twistvpn.wireguard.device import _Timer
from twistvpn.wireguard.messages import (
    KEEPALIVE_TIMEOUT,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    TRANSPORT_HEADER,
)
from twistvpn.wireguard.noise import NONCE


class InterfaceTests(SynchronousTestCase):
    def test_device_and_peer_provide_interfaces(self) -> None:
        _, a, b = pair()
        verifyObject(IWireGuardDevice, a)
        verifyObject(IWireGuardPeer, a.get_peer(b.public_key))

    def test_peer_management(self) -> None:
        _, a, b = pair()
        peer = a.get_peer(b.public_key)
        self.assertEqual(a.peers(), [peer])
        self.assertEqual(peer.public_key, b.public_key)
        self.assertEqual(peer.allowed_ips, ("10.0.0.2/32", "fd00::2/128"))
        # updating returns the same peer, replaces what was given
        again = a.add_peer(b.public_key, endpoint="b2", allowed_ips=["10.9.0.0/16"])
        self.assertIs(again, peer)
        self.assertEqual(peer.endpoint, "b2")
        self.assertEqual(peer.allowed_ips, ("10.9.0.0/16",))
        a.remove_peer(b.public_key)
        a.remove_peer(b.public_key)  # absent: ignored
        self.assertIsNone(a.get_peer(b.public_key))
        self.assertEqual(a.peers(), [])
        a.send_packet(ipv4_packet("10.0.0.1", "10.9.1.1"))
        self.assertEqual(a.counters["drop_no_route"], 1)

    def test_bad_peer_configuration_refused(self) -> None:
        _, a, b = pair()
        self.assertRaises(ValueError, a.add_peer, b"short")
        self.assertRaises(ValueError, a.add_peer, a.public_key)
        self.assertRaises(ValueError, a.add_peer, b.public_key, preshared_key=b"x")
        self.assertRaises(ValueError, a.add_peer, bytes(32))  # low-order point
        self.assertRaises(ValueError, a.add_peer, b.public_key, allowed_ips=["10.0.0.300/32"])

    def test_cidrs_canonical_and_moved_between_peers(self) -> None:
        network, a, b = pair()
        c = network.add("c", seed=3)
        pc = a.add_peer(c.public_key, allowed_ips=["10.0.0.2/32", "192.168.7.9/24"])
        self.assertEqual(pc.allowed_ips, ("10.0.0.2/32", "192.168.7.0/24"))
        # 10.0.0.2/32 belongs to c now, and no longer to b
        self.assertEqual(a.get_peer(b.public_key).allowed_ips, ("fd00::2/128",))


class HandshakeTests(SynchronousTestCase):
    def test_initiator_first_packet(self) -> None:
        """The first packet triggers a handshake and is delivered after it."""
        network, a, b = pair()
        a.send_packet(A_TO_B)
        self.assertEqual(network.sent_types("a"), [WG_HANDSHAKE_INITIATION])
        network.flush()
        self.assertEqual(network.delivered["b"], [A_TO_B])
        self.assertEqual(network.sent_types("b"), [WG_HANDSHAKE_RESPONSE])
        self.assertEqual(network.sent_types("a"), [WG_HANDSHAKE_INITIATION, WG_TRANSPORT_DATA])
        pa, pb = a.get_peer(b.public_key), b.get_peer(a.public_key)
        self.assertEqual(pa.last_handshake, 0)
        self.assertEqual(pb.last_handshake, 0)
        self.assertEqual(pb.endpoint, "a")  # learnt from the initiation
        self.assertEqual(pa.show()["latest_handshake"], network.devices["a"]._wall_clock())

    def test_both_directions(self) -> None:
        network, a, b = pair()
        a.send_packet(A_TO_B)
        network.flush()
        b.send_packet(B_TO_A)
        network.flush()
        self.assertEqual(network.delivered["a"], [B_TO_A])
        # the responder needed no handshake of its own
        self.assertEqual(network.sent_types("b").count(WG_HANDSHAKE_INITIATION), 0)

    def test_responder_may_initiate(self) -> None:
        """Either side can start, once it knows where the other is."""
        network, a, b = pair()
        b.get_peer(a.public_key).endpoint = "a"
        b.send_packet(B_TO_A)
        network.flush()
        self.assertEqual(network.delivered["a"], [B_TO_A])
        a.send_packet(A_TO_B)
        network.flush()
        self.assertEqual(network.delivered["b"], [A_TO_B])

    def test_ipv6(self) -> None:
        network, a, b = pair()
        packet = ipv6_packet("fd00::1", "fd00::2", b"six" * 7)
        a.send_packet(packet)
        network.flush()
        self.assertEqual(network.delivered["b"], [packet])

    def test_simultaneous_initiation(self) -> None:
        """
        Both start at once, the initiations cross: each answers the other's
        and keeps its own, so both complete without waiting for a retry.
        """
        network, a, b = pair()
        b.get_peer(a.public_key).endpoint = "a"
        a.send_packet(A_TO_B)
        b.send_packet(B_TO_A)
        network.flush()
        self.assertEqual(network.delivered["b"], [A_TO_B])
        self.assertEqual(network.delivered["a"], [B_TO_A])
        network.advance(REKEY_TIMEOUT + 0.334)
        self.assertEqual(a.counters["handshake_retransmit"], 0)
        self.assertEqual(b.counters["handshake_retransmit"], 0)
        a.send_packet(A_TO_B)
        b.send_packet(B_TO_A)
        network.flush()
        self.assertEqual(len(network.delivered["b"]), 2)
        self.assertEqual(len(network.delivered["a"]), 2)

    def test_endpoint_set_while_initiation_waits(self) -> None:
        """
        A packet staged before the peer had an endpoint goes out (handshake
        and all) as soon as one is set, not after REKEY_TIMEOUT.
        """
        network, a, b = pair()
        b.send_packet(B_TO_A)
        self.assertEqual(b.counters["drop_no_endpoint"], 1)
        network.advance(1.0)
        b.get_peer(a.public_key).endpoint = "a"
        network.flush()
        self.assertEqual(network.delivered["a"], [B_TO_A])
        self.assertEqual(b.counters["handshake_retransmit"], 0)

    def test_new_endpoint_resends_lost_initiation(self) -> None:
        """
        An initiation lost on one path (a relay whose other end is not up
        yet) is sent again at once on the next path, once per new endpoint;
        the same endpoint again waits for REKEY_TIMEOUT.
        """
        network, a, b = pair()
        pa = a.get_peer(b.public_key)
        pa.endpoint = ("relay", 1)  # nobody there
        a.send_packet(A_TO_B)
        pa.endpoint = ("relay", 1)
        self.assertEqual(a.counters["handshake_initiation_sent"], 1)
        network.advance(0.5)
        network.drop = lambda src, dst, data: True  # the first try there is lost too
        pa.endpoint = ("other", 2)
        self.assertEqual(a.counters["handshake_initiation_sent"], 2)
        pa.endpoint = ("other", 2)
        a.send_packet(A_TO_B)
        self.assertEqual(a.counters["handshake_initiation_sent"], 2)
        network.drop = lambda src, dst, data: False
        network.advance(0.5)
        pa.endpoint = "b"
        network.flush()
        self.assertEqual(network.delivered["b"], [A_TO_B, A_TO_B])
        self.assertEqual(a.counters["handshake_initiation_sent"], 3)
        self.assertEqual(
            [dst for src, dst, data in network.sent
             if src == "a" and data[0] == WG_HANDSHAKE_INITIATION],
            [("relay", 1), ("other", 2), "b"])

    def test_new_endpoint_keeps_the_attempt_count(self) -> None:
        """Moving the peer does not extend REKEY_ATTEMPT_TIME: staged packets still expire."""
        network, a, b = pair()
        network.drop = lambda src, dst, data: True
        pa = a.get_peer(b.public_key)
        a.send_packet(A_TO_B)
        for i in range(int(REKEY_ATTEMPT_TIME // REKEY_TIMEOUT) + 4):
            network.advance(REKEY_TIMEOUT)
            pa.endpoint = ("path", i)
        network.advance(REKEY_TIMEOUT + 1)
        self.assertEqual(a.counters["drop_handshake_timeout"], 1)

    def test_new_endpoint_with_nothing_pending(self) -> None:
        """No initiation of ours unanswered: moving the peer sends nothing."""
        network, a, b = pair()
        a.send_packet(A_TO_B)
        network.flush()
        sent = len(network.sent)
        a.get_peer(b.public_key).endpoint = ("relay", 1)
        b.get_peer(a.public_key).endpoint = ("relay", 2)
        self.assertEqual(len(network.sent), sent)

    def test_preshared_key(self) -> None:
        network, a, b = pair()
        psk = keys.generate_preshared_key()
        a.add_peer(b.public_key, preshared_key=psk)
        b.add_peer(a.public_key, preshared_key=psk)
        a.send_packet(A_TO_B)
        network.flush()
        self.assertEqual(network.delivered["b"], [A_TO_B])

    def test_preshared_key_mismatch(self) -> None:
        network, a, b = pair()
        a.add_peer(b.public_key, preshared_key=keys.generate_preshared_key())
        a.send_packet(A_TO_B)
        network.flush()
        self.assertEqual(network.delivered["b"], [])
        self.assertEqual(a.counters["drop_handshake_decrypt"], 1)

    def test_unknown_initiator_dropped(self) -> None:
        network, a, b = pair()
        b.remove_peer(a.public_key)
        a.send_packet(A_TO_B)
        network.flush()
        self.assertEqual(b.counters["drop_no_peer"], 1)
        self.assertEqual(network.sent_types("b"), [])

    def test_retransmit_then_give_up(self) -> None:
        """Lost handshakes are retried every REKEY_TIMEOUT for REKEY_ATTEMPT_TIME."""
        network, a, b = pair()
        network.drop = lambda src, dst, data: True
        a.send_packet(A_TO_B)
        network.advance(REKEY_ATTEMPT_TIME + 30)
        initiations = network.sent_types("a").count(WG_HANDSHAKE_INITIATION)
        # as wireguard-go: the first and 19 retries, then it gives up
        self.assertEqual(initiations, 20)
        self.assertEqual(a.counters["drop_handshake_timeout"], 1)
        network.drop = lambda src, dst, data: False
        network.advance(60)
        self.assertEqual(network.sent_types("a").count(WG_HANDSHAKE_INITIATION), initiations)
        # new traffic starts over
        a.send_packet(A_TO_B)
        network.flush()
        self.assertEqual(network.delivered["b"], [A_TO_B])

    def test_replayed_initiation_refused(self) -> None:
        network, a, b = pair()
        a.send_packet(A_TO_B)
        network.flush()
        initiation = network.sent[0][2]
        network.advance(1)
        b.datagram_received(initiation, "a")
        self.assertEqual(b.counters["drop_handshake_replay"], 1)
        self.assertEqual(b.counters["handshake_response_sent"], 1)

    def test_initiation_flood_refused(self) -> None:
        """Two fresh initiations within 20 ms: the second is refused."""
        network, a, b = pair()
        a.send_packet(A_TO_B)
        network.flush()
        peer = a.get_peer(b.public_key)
        peer.last_initiation_sent = -100.0
        network.advance(0.010)
        # make a later timestamp with the same clock reading: a wall clock jump
        a._wall_clock = lambda: 1_800_000_000.0
        peer.send_initiation(False)
        network.flush()
        self.assertEqual(b.counters["drop_handshake_flood"], 1)


class TransportTests(SynchronousTestCase):
    def established(self) -> tuple[Network, object, object]:
        network, a, b = pair()
        a.send_packet(A_TO_B)
        network.flush()
        network.delivered["b"].clear()
        return network, a, b

    def test_round_trip_many(self) -> None:
        network, a, b = self.established()
        packets = [ipv4_packet("10.0.0.1", "10.0.0.2", bytes([i]) * i) for i in range(60)]
        for p in packets:
            a.send_packet(p)
        network.flush()
        self.assertEqual(network.delivered["b"], packets)

    def test_padding(self) -> None:
        """Plaintext is padded to 16 bytes; the receiver strips it."""
        network, a, b = self.established()
        packet = ipv4_packet("10.0.0.1", "10.0.0.2", b"x")  # 21 bytes
        a.send_packet(packet)
        self.assertEqual(len(network.sent[-1][2]), 16 + 32 + 16)
        network.flush()
        self.assertEqual(network.delivered["b"], [packet])

    def test_byte_counters(self) -> None:
        network, a, b = self.established()
        pa, pb = a.get_peer(b.public_key), b.get_peer(a.public_key)
        sent_by_a = sum(len(d) for s, _, d in network.sent if s == "a")
        self.assertEqual(pa.tx_bytes, sent_by_a)
        self.assertEqual(pb.rx_bytes, sent_by_a)
        self.assertEqual(pa.show()["transfer_tx"], sent_by_a)

    def test_allowed_ips_outbound(self) -> None:
        """Longest prefix wins; packets to nobody's prefix are dropped."""
        network, a, b = self.established()
        c = network.add("c", seed=3)
        a.add_peer(c.public_key, endpoint="c", allowed_ips=["10.0.0.0/24"])
        c.add_peer(a.public_key, allowed_ips=["10.0.0.1/32"])
        a.send_packet(ipv4_packet("10.0.0.1", "10.0.0.2"))
        a.send_packet(ipv4_packet("10.0.0.1", "10.0.0.3"))
        a.send_packet(ipv4_packet("10.0.0.1", "10.0.1.3"))
        network.flush()
        self.assertEqual(len(network.delivered["b"]), 1)
        self.assertEqual(len(network.delivered["c"]), 1)
        self.assertEqual(a.counters["drop_no_route"], 1)

    def test_allowed_ips_inbound(self) -> None:
        """A peer may only send from addresses in its AllowedIPs."""
        network, a, b = self.established()
        b.send_packet(ipv4_packet("10.0.0.99", "10.0.0.1"))
        b.send_packet(ipv6_packet("fd00::99", "fd00::1"))
        network.flush()
        self.assertEqual(network.delivered["a"], [])
        self.assertEqual(a.counters["drop_allowed_ips"], 2)
        b.send_packet(ipv6_packet("fd00::2", "fd00::1"))
        network.flush()
        self.assertEqual(len(network.delivered["a"]), 1)

    def test_allowed_ips_change(self) -> None:
        network, a, b = self.established()
        a.get_peer(b.public_key).set_allowed_ips(["10.0.0.0/8"])
        b.send_packet(ipv4_packet("10.0.0.2", "10.0.0.1"))
        b.send_packet(ipv4_packet("10.7.0.2", "10.0.0.1"))
        network.flush()
        self.assertEqual(len(network.delivered["a"]), 2)
        b.send_packet(ipv6_packet("fd00::2", "fd00::1"))
        network.flush()
        self.assertEqual(a.counters["drop_allowed_ips"], 1)

    def test_roaming(self) -> None:
        """An authenticated packet from a new address moves the endpoint there."""
        network, a, b = self.established()
        pb = b.get_peer(a.public_key)
        self.assertEqual(pb.endpoint, "a")
        network.source_of["a"] = "a-roamed"
        network.devices["a-roamed"] = a
        a.send_packet(A_TO_B)
        network.flush()
        self.assertEqual(pb.endpoint, "a-roamed")
        b.send_packet(B_TO_A)
        self.assertEqual(network.sent[-1][1], "a-roamed")

    def test_forged_packet_does_not_roam(self) -> None:
        network, a, b = self.established()
        pb = b.get_peer(a.public_key)
        message = bytearray(network.sent[-1][2])
        message[-1] ^= 1
        b.datagram_received(bytes(message), "attacker")
        self.assertEqual(pb.endpoint, "a")
        self.assertEqual(b.counters["drop_decrypt"], 1)

    def test_endpoint_assignable_and_reset(self) -> None:
        network, a, b = self.established()
        pa = a.get_peer(b.public_key)
        pa.endpoint = ("relay", 1)
        a.send_packet(A_TO_B)
        self.assertEqual(network.sent[-1][1], ("relay", 1))
        pa.reset_endpoint()
        self.assertEqual(pa.endpoint, "b")

    def test_no_endpoint(self) -> None:
        """A peer nobody has told us where to find: counted, nothing sent."""
        network, a, b = pair()
        b.send_packet(B_TO_A)
        self.assertEqual(network.sent, [])
        self.assertEqual(b.counters["drop_no_endpoint"], 1)

    def test_replayed_transport_dropped(self) -> None:
        network, a, b = self.established()
        a.send_packet(A_TO_B)
        message = network.sent[-1][2]
        network.flush()
        b.datagram_received(message, "a")
        self.assertEqual(b.counters["drop_replay"], 1)
        self.assertEqual(network.delivered["b"], [A_TO_B])

    def test_staged_packets_flushed_in_order(self) -> None:
        network, a, b = pair()
        packets = [ipv4_packet("10.0.0.1", "10.0.0.2", bytes([i])) for i in range(5)]
        for p in packets:
            a.send_packet(p)
        self.assertEqual(network.sent_types("a"), [WG_HANDSHAKE_INITIATION])
        network.flush()
        self.assertEqual(network.delivered["b"], packets)

    def test_staged_queue_bounded(self) -> None:
        network, a, b = pair(max_staged_packets=4)
        network.drop = lambda src, dst, data: True
        for i in range(10):
            a.send_packet(ipv4_packet("10.0.0.1", "10.0.0.2", bytes([i])))
        self.assertEqual(len(a.get_peer(b.public_key).staged), 4)
        self.assertEqual(a.counters["drop_staged_overflow"], 6)

    def test_close(self) -> None:
        network, a, b = self.established()
        a.close()
        b.close()
        self.assertEqual(network.clock.getDelayedCalls(), [])
        a.send_packet(A_TO_B)
        self.assertEqual(a.counters["drop_closed"], 1)
        self.assertIsNone(a.get_peer(b.public_key).current)


class RestartableTimerTests(SynchronousTestCase):
    """
    L{_Timer} fires at its last deadline, however often it was moved or
    stopped, without making a reactor call per move.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.fired: list[float] = []
        self.timer = _Timer(self.clock, lambda: self.fired.append(self.clock.seconds()))

    def test_moved_later_fires_at_the_new_deadline(self) -> None:
        self.timer.mod(10)
        self.clock.advance(4)
        for _ in range(100):
            self.timer.mod(10)  # every packet pushes it on: no new calls
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertTrue(self.timer.pending)
        self.clock.advance(6)  # the first call fires early and waits on
        self.assertEqual(self.fired, [])
        self.clock.advance(4)
        self.assertEqual(self.fired, [14])
        self.assertFalse(self.timer.pending)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_moved_earlier(self) -> None:
        self.timer.mod(10)
        self.timer.mod(2)
        self.clock.advance(2)
        self.assertEqual(self.fired, [2])

    def test_stopped_does_not_fire(self) -> None:
        self.timer.mod(10)
        self.timer.stop()
        self.assertFalse(self.timer.pending)
        self.clock.advance(10)
        self.assertEqual(self.fired, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # Stopped, then armed again before the old call fired.
        self.timer.mod(10)
        self.clock.advance(5)
        self.timer.stop()
        self.timer.mod(10)
        self.clock.advance(5)
        self.assertEqual(self.fired, [])
        self.clock.advance(5)
        self.assertEqual(self.fired, [25])

    def test_cancel_removes_the_call(self) -> None:
        self.timer.mod(10)
        self.timer.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.fired, [])


class TimerTests(SynchronousTestCase):
    def established(self) -> tuple[Network, object, object]:
        network, a, b = pair()
        a.send_packet(A_TO_B)
        network.flush()
        return network, a, b

    def test_initiator_confirms_with_keepalive(self) -> None:
        """With nothing staged, the initiator confirms the session with a keepalive."""
        network, a, b = pair()
        a.get_peer(b.public_key).send_initiation(False)
        network.flush()
        self.assertEqual(b.counters["keepalive_received"], 1)
        pb = b.get_peer(a.public_key)
        self.assertIsNotNone(pb.current)
        self.assertIsNone(pb.next)

    def test_responder_next_becomes_current_on_data(self) -> None:
        network, a, b = pair()
        network.drop = lambda src, dst, data: src == "a" and data[0] == WG_TRANSPORT_DATA
        a.get_peer(b.public_key).send_initiation(False)
        network.flush()
        pb = b.get_peer(a.public_key)
        self.assertIsNone(pb.current)
        self.assertIsNotNone(pb.next)
        network.drop = lambda src, dst, data: False
        a.send_packet(A_TO_B)
        network.flush()
        self.assertIsNotNone(pb.current)
        self.assertIsNone(pb.next)

    def test_passive_keepalive(self) -> None:
        """Data received and nothing sent back for KEEPALIVE_TIMEOUT: a keepalive."""
        network, a, b = self.established()
        network.advance(KEEPALIVE_TIMEOUT - 0.1)
        self.assertEqual(a.counters["keepalive_received"], 0)
        network.advance(0.2)
        self.assertEqual(a.counters["keepalive_received"], 1)
        # and not again without more data
        network.advance(100)
        self.assertEqual(a.counters["keepalive_received"], 1)

    def test_no_keepalive_when_replying(self) -> None:
        network, a, b = self.established()
        network.advance(1)
        b.send_packet(B_TO_A)
        network.flush()
        network.advance(KEEPALIVE_TIMEOUT)
        self.assertEqual(a.counters["keepalive_received"], 0)

    def test_persistent_keepalive(self) -> None:
        network, a, b = pair()
        a.add_peer(b.public_key, persistent_keepalive=25)
        network.flush()  # adding it sends a keepalive, hence a handshake
        self.assertEqual(b.counters["handshake_response_sent"], 1)
        received = b.counters["keepalive_received"]
        network.advance(101)
        # one every 25 s of silence (b's passive keepalives need data)
        self.assertEqual(b.counters["keepalive_received"] - received, 4)

    def test_persistent_keepalive_only_in_silence(self) -> None:
        """Traffic more often than the interval means no persistent keepalives."""
        network, a, b = pair()
        a.add_peer(b.public_key, persistent_keepalive=25)
        network.flush()
        received = b.counters["keepalive_received"]
        for _ in range(6):
            network.advance(10)
            a.send_packet(A_TO_B)
            network.flush()
        # b's passive keepalives answer a's data; a sends none of its own
        self.assertEqual(b.counters["keepalive_received"], received)
        # b's last passive keepalive reached a at t=70: 25 s after that, one
        network.advance(10 + 24.5)
        self.assertEqual(b.counters["keepalive_received"], received)
        network.advance(1)
        self.assertEqual(b.counters["keepalive_received"], received + 1)

    def test_rekey_after_time(self) -> None:
        """The initiator rekeys when it sends on a session older than REKEY_AFTER_TIME."""
        network, a, b = self.established()
        pa = a.get_peer(b.public_key)
        first = pa.current
        network.advance(REKEY_AFTER_TIME - 1)
        a.send_packet(A_TO_B)
        network.flush()
        self.assertIs(pa.current, first)
        network.advance(2)
        a.send_packet(A_TO_B)
        network.flush()
        self.assertIsNot(pa.current, first)
        self.assertIs(pa.previous, first)
        self.assertEqual(len(network.delivered["b"]), 3)

    def test_responder_does_not_rekey_by_time(self) -> None:
        network, a, b = self.established()
        network.advance(REKEY_AFTER_TIME + 1)
        b.send_packet(B_TO_A)
        network.flush()
        self.assertEqual(b.counters["handshake_initiation_sent"], 0)
        self.assertEqual(network.delivered["a"], [B_TO_A])

    def test_expired_session_not_used(self) -> None:
        """After REJECT_AFTER_TIME a session is dead: sending starts a handshake."""
        network, a, b = self.established()
        pb = b.get_peer(a.public_key)
        network.advance(REJECT_AFTER_TIME)
        b.send_packet(B_TO_A)
        self.assertEqual(network.sent_types("b")[-1], WG_HANDSHAKE_INITIATION)
        network.flush()
        self.assertEqual(b.counters["handshake_initiation_sent"], 1)
        self.assertEqual(network.delivered["a"], [B_TO_A])
        self.assertTrue(pb.current.is_initiator)

    def test_rekey_on_receive_near_expiry(self) -> None:
        """The initiator, receiving on an aging session, rekeys before it dies."""
        network, a, b = self.established()
        network.advance(REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT + 1)
        b.send_packet(B_TO_A)
        network.flush()
        self.assertEqual(a.counters["handshake_initiation_sent"], 2)

    def test_late_packet_on_old_session_does_not_rekey_again(self) -> None:
        network, a, b = self.established()
        network.advance(REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT + 1)
        b.send_packet(B_TO_A)
        held: list[bytes] = []
        network.drop = hold(held)
        b.send_packet(B_TO_A)  # held back
        network.drop = lambda src, dst, data: False
        network.flush()
        self.assertEqual(a.counters["handshake_initiation_sent"], 2)
        self.assertIsNot(a.get_peer(b.public_key).current, None)
        network.advance(REKEY_TIMEOUT + 1)
        a.datagram_received(held[0], "b")  # arrives late, on a's previous session
        self.assertEqual(len(network.delivered["a"]), 2)
        network.flush()
        self.assertEqual(a.counters["handshake_initiation_sent"], 2)

    def test_rekey_after_messages(self) -> None:
        network, a, b = self.established()
        pa = a.get_peer(b.public_key)
        first = pa.current
        # Jump both ends to just before the limit (no one sends 2**60 packets in a test).
        network.advance(REKEY_TIMEOUT + 1)  # at most one handshake per REKEY_TIMEOUT
        first.send_counter = REKEY_AFTER_MESSAGES - 1
        b.get_peer(a.public_key).current.replay.last = REKEY_AFTER_MESSAGES - 2
        a.send_packet(A_TO_B)
        network.flush()
        self.assertIs(pa.current, first)
        a.send_packet(A_TO_B)
        network.flush()
        self.assertIsNot(pa.current, first)
        self.assertEqual(len(network.delivered["b"]), 3)

    def test_reject_after_messages(self) -> None:
        """A session that has used up its counters is never used again."""
        network, a, b = self.established()
        pa = a.get_peer(b.public_key)
        first = pa.current
        network.advance(REKEY_TIMEOUT + 1)
        first.send_counter = REJECT_AFTER_MESSAGES
        a.send_packet(A_TO_B)
        network.flush()
        self.assertIsNot(pa.current, first)
        self.assertEqual(len(network.delivered["b"]), 2)

    def test_receive_counter_limit(self) -> None:
        """An authentic message numbered REJECT_AFTER_MESSAGES or more is refused."""
        network, a, b = self.established()
        session = a.get_peer(b.public_key).current
        for counter in (REJECT_AFTER_MESSAGES, 2**64 - 1):
            message = TRANSPORT_HEADER.pack(4, session.remote_index, counter) + (
                session.send.encrypt(NONCE.pack(counter), A_TO_B + bytes(6), None)
            )
            b.datagram_received(message, "a")
        self.assertEqual(b.counters["drop_replay"], 2)
        self.assertEqual(network.delivered["b"], [A_TO_B])

    def test_keys_zeroed_after_three_reject_times(self) -> None:
        network, a, b = self.established()
        network.advance(REJECT_AFTER_TIME * 3 + 1)
        for device, other in ((a, b), (b, a)):
            peer = device.get_peer(other.public_key)
            self.assertEqual((peer.previous, peer.current, peer.next), (None, None, None))
            self.assertEqual(device._keypairs, {})

    def test_expired_session_refuses_to_receive(self) -> None:
        network, a, b = self.established()
        held: list[bytes] = []
        network.drop = hold(held)
        a.send_packet(A_TO_B)  # delayed past the session's life
        network.advance(REJECT_AFTER_TIME)
        b.datagram_received(held[0], "a")
        self.assertEqual(b.counters["drop_expired"], 1)
        self.assertEqual(network.delivered["b"], [A_TO_B])

    def test_new_handshake_when_peer_silent(self) -> None:
        """Data sent but nothing heard for KEEPALIVE + REKEY_TIMEOUT: a new handshake."""
        network, a, b = self.established()
        network.drop = lambda src, dst, data: src == "b"
        network.advance(1)
        a.send_packet(A_TO_B)
        network.advance(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 0.334)
        self.assertEqual(a.counters["handshake_initiation_sent"], 2)

    def test_previous_session_still_receives(self) -> None:
        """Packets in flight under the old session are accepted after a rekey."""
        network, a, b = self.established()
        network.advance(REKEY_AFTER_TIME - 1)
        held: list[bytes] = []
        network.drop = hold(held)
        b.send_packet(B_TO_A)  # still in flight while a rekeys
        network.drop = lambda src, dst, data: False
        network.advance(2)
        peer = a.get_peer(b.public_key)
        first = peer.current
        peer.send_initiation(False)
        network.flush()
        self.assertIs(peer.previous, first)
        a.datagram_received(held[0], "b")
        self.assertEqual(network.delivered["a"], [B_TO_A])


@implementer(IPeerDemand)
class Demand:
    """Makes a peer when asked, as a node with lazy peers does."""

    def __init__(self, device: Any, key: bytes, allowed: list[str], known: bool = True) -> None:
        self.device, self.key, self.allowed, self.known = device, key, allowed, known
        self.asked: list[bytes] = []

    def _make(self) -> bool:
        if self.known:
            self.device.add_peer(self.key, allowed_ips=self.allowed)
        return self.known

    def peer_for_address(self, destination: bytes) -> bool:
        self.asked.append(destination)
        return self._make()

    def peer_for_key(self, public_key: bytes) -> bool:
        self.asked.append(public_key)
        return public_key == self.key and self._make()

    def key_for_probe_id(self, sender_id: bytes) -> bytes | None:
        return None


class LazyPeers(SynchronousTestCase):
    """A device asks for the peers it meets but has not (a big network's lazy peers)."""

    def test_handshake_from_an_unknown_key(self) -> None:
        network, a, b = pair()
        b.remove_peer(a.public_key)
        b.demand = Demand(b, a.public_key, ["10.0.0.1/32"])
        verifyObject(IPeerDemand, b.demand)
        a.send_packet(A_TO_B)
        network.flush()
        self.assertEqual(network.delivered["b"], [A_TO_B])
        self.assertEqual(b.demand.asked, [a.public_key])
        self.assertEqual(b.get_peer(a.public_key).endpoint, "a")

    def test_packet_to_an_unknown_address(self) -> None:
        network, a, b = pair()
        a.remove_peer(b.public_key)
        a.demand = Demand(a, b.public_key, ["10.0.0.2/32"])
        a.send_packet(A_TO_B)
        self.assertEqual(a.demand.asked, [bytes([10, 0, 0, 2])])
        a.get_peer(b.public_key).endpoint = "b"  # the path the node's manager finds
        a.get_peer(b.public_key).send_staged()
        network.flush()
        self.assertEqual(network.delivered["b"], [A_TO_B])  # the packet that asked

    def test_not_a_member(self) -> None:
        network, a, b = pair()
        b.remove_peer(a.public_key)
        b.demand = Demand(b, a.public_key, ["10.0.0.1/32"], known=False)
        a.send_packet(A_TO_B)
        network.flush()
        self.assertEqual(network.delivered["b"], [])
        self.assertEqual(b.counters["drop_no_peer"], 1)
        a.remove_peer(b.public_key)
        a.demand = Demand(a, b.public_key, [], known=False)
        a.send_packet(A_TO_B)
        self.assertEqual(a.counters["drop_no_route"], 1)
