"""
WireGuard's cookies: mac1 always, mac2 and cookie replies under load.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.wireguard import A_TO_B, hold, pair
from twistvpn.wire import WG_COOKIE_REPLY, WG_HANDSHAKE_INITIATION, WG_HANDSHAKE_RESPONSE
from twistvpn.wireguard import keys
from twistvpn.wireguard.cookie import CookieChecker, CookieGenerator
from twistvpn.wireguard.messages import (
    COOKIE_REFRESH_TIME,
    COOKIE_REPLY_SIZE,
    INITIATION_MAC1,
    REKEY_TIMEOUT,
)


class CookieReplyTests(SynchronousTestCase):
    def test_cookie_round_trip_under_load(self) -> None:
        """
        Under load the responder answers a bare initiation with a cookie; the
        initiator retries with mac2 and the handshake completes.
        """
        load = [True]
        network, a, b = pair()
        b._under_load_predicate = lambda: load[0]
        a.send_packet(A_TO_B)
        network.flush()
        self.assertEqual(b.counters["cookie_sent"], 1)
        self.assertEqual(network.sent_types("b"), [WG_COOKIE_REPLY])
        self.assertEqual(len(network.sent[-1][2]), COOKIE_REPLY_SIZE)
        self.assertEqual(a.counters["cookie_received"], 1)
        self.assertEqual(b.counters["handshake_response_sent"], 0)
        first_initiation = network.sent[0][2]
        self.assertEqual(first_initiation[-16:], bytes(16))  # no mac2 yet
        # the retry carries mac2, which the loaded responder accepts
        network.advance(REKEY_TIMEOUT + 0.334)
        retry = [d for s, _, d in network.sent if s == "a" and d[0] == WG_HANDSHAKE_INITIATION][1]
        self.assertNotEqual(retry[-16:], bytes(16))
        self.assertEqual(b.counters["cookie_sent"], 1)
        self.assertEqual(b.counters["handshake_response_sent"], 1)
        self.assertEqual(network.delivered["b"], [A_TO_B])

    def test_not_under_load_no_mac2_needed(self) -> None:
        network, a, b = pair()
        b._under_load_predicate = lambda: False
        a.send_packet(A_TO_B)
        network.flush()
        self.assertEqual(b.counters["cookie_sent"], 0)
        self.assertEqual(network.delivered["b"], [A_TO_B])

    def test_response_checked_under_load_too(self) -> None:
        """An initiator under load asks the responder for a cookie as well."""
        network, a, b = pair()
        a._under_load_predicate = lambda: True
        a.send_packet(A_TO_B)
        network.flush()
        self.assertEqual(network.sent_types("b"), [WG_HANDSHAKE_RESPONSE])
        self.assertEqual(a.counters["cookie_sent"], 1)
        self.assertEqual(b.counters["cookie_received"], 1)
        self.assertIsNotNone(b.get_peer(a.public_key).cookies.cookie)

    def test_load_detected_from_handshake_rate(self) -> None:
        """More than the threshold of handshake messages in a second means load."""
        network, a, b = pair(handshakes_under_load=5)
        initiation = []
        network.drop = hold(initiation)
        a.send_packet(A_TO_B)
        message = initiation[0]
        self.assertFalse(b.under_load())
        for _ in range(5):
            b.datagram_received(message, "a")
        self.assertFalse(b.under_load())
        b.datagram_received(message, "a")
        self.assertTrue(b.under_load())
        self.assertEqual(b.counters["cookie_sent"], 1)
        # load persists a second after it stops
        network.advance(0.9)
        self.assertTrue(b.under_load())
        network.advance(0.2)
        self.assertFalse(b.under_load())

    def test_slow_handshakes_are_not_load(self) -> None:
        network, a, b = pair(handshakes_under_load=5)
        initiation = []
        network.drop = hold(initiation)
        a.send_packet(A_TO_B)
        for _ in range(20):
            b.datagram_received(initiation[0], "a")
            network.advance(0.25)
        self.assertFalse(b.under_load())
        self.assertEqual(b.counters["cookie_sent"], 0)

    def test_bad_mac1_dropped_without_cookie(self) -> None:
        network, a, b = pair()
        b._under_load_predicate = lambda: True
        initiation = []
        network.drop = hold(initiation)
        a.send_packet(A_TO_B)
        forged = bytearray(initiation[0])
        forged[INITIATION_MAC1] ^= 1
        b.datagram_received(bytes(forged), "a")
        self.assertEqual(b.counters["drop_mac1"], 1)
        self.assertEqual(b.counters["cookie_sent"], 0)

    def test_mac1_keyed_to_receiver(self) -> None:
        """An initiation meant for another key fails mac1 before any DH."""
        network, a, b = pair()
        c = network.add("c", seed=3)
        c.add_peer(a.public_key)
        initiation = []
        network.drop = hold(initiation)
        a.send_packet(A_TO_B)
        c.datagram_received(initiation[0], "a")
        self.assertEqual(c.counters["drop_mac1"], 1)

    def test_unexpected_and_forged_cookie_replies(self) -> None:
        network, a, b = pair()
        b._under_load_predicate = lambda: True
        replies = []
        network.drop = hold(replies, "b")
        a.send_packet(A_TO_B)
        network.flush()
        reply = replies[0]
        forged = bytearray(reply)
        forged[-1] ^= 1
        a.datagram_received(bytes(forged), "b")
        self.assertEqual(a.counters["drop_cookie"], 1)
        unknown = bytearray(reply)
        unknown[4:8] = b"\xff\xff\xff\xff"
        a.datagram_received(bytes(unknown), "b")
        self.assertEqual(a.counters["drop_no_session"], 1)
        a.datagram_received(reply, "b")
        self.assertEqual(a.counters["cookie_received"], 1)


class CookieUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.responder = keys.generate_private_key()
        public = keys.public_key(self.responder)
        self.checker = CookieChecker(public, self.clock, __import__("os").urandom)
        self.generator = CookieGenerator(public, self.clock)
        self.body = b"\x01\0\0\0" + bytes(range(112))

    def reply_to(self, message: bytes, addr: object) -> None:
        reply = self.checker.make_reply(message, INITIATION_MAC1, 7, addr)
        self.assertTrue(self.generator.consume_reply(reply[8:32], reply[32:]))

    def test_mac1_and_mac2(self) -> None:
        message = self.generator.add_macs(self.body)
        self.assertTrue(self.checker.check_mac1(message, INITIATION_MAC1))
        self.assertFalse(self.checker.check_mac2(message, INITIATION_MAC1, ("h", 1)))
        self.reply_to(message, ("h", 1))
        message = self.generator.add_macs(self.body)
        self.assertTrue(self.checker.check_mac2(message, INITIATION_MAC1, ("h", 1)))
        # the cookie is bound to the address it was given to
        self.assertFalse(self.checker.check_mac2(message, INITIATION_MAC1, ("h", 2)))

    def test_secret_rotates(self) -> None:
        message = self.generator.add_macs(self.body)
        self.reply_to(message, ("h", 1))
        self.clock.advance(COOKIE_REFRESH_TIME - REKEY_TIMEOUT - 1)
        message = self.generator.add_macs(self.body)
        self.assertTrue(self.checker.check_mac2(message, INITIATION_MAC1, ("h", 1)))
        self.clock.advance(REKEY_TIMEOUT + 2)
        self.assertFalse(self.checker.check_mac2(message, INITIATION_MAC1, ("h", 1)))

    def test_initiator_stops_using_old_cookie(self) -> None:
        self.reply_to(self.generator.add_macs(self.body), ("h", 1))
        self.clock.advance(COOKIE_REFRESH_TIME)
        self.assertEqual(self.generator.add_macs(self.body)[-16:], bytes(16))

    def test_reply_needs_our_last_mac1(self) -> None:
        """A cookie reply is only accepted for the message we last sent."""
        fresh = CookieGenerator(keys.public_key(self.responder), self.clock)
        reply = self.checker.make_reply(
            self.generator.add_macs(self.body), INITIATION_MAC1, 7, ("h", 1)
        )
        self.assertFalse(fresh.consume_reply(reply[8:32], reply[32:]))
        fresh.add_macs(b"\x01\0\0\0" + bytes(112))  # a different message
        self.assertFalse(fresh.consume_reply(reply[8:32], reply[32:]))
