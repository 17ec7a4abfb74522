"""
Malformed, truncated, forged and random datagrams: dropped and counted,
never raising, never disturbing a working session.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.support.wireguard import A_TO_B, B_TO_A, hold, pair
from twistvpn.wire import (
    WG_COOKIE_REPLY,
    WG_HANDSHAKE_INITIATION,
    WG_HANDSHAKE_RESPONSE,
    WG_TRANSPORT_DATA,
)
from twistvpn.wireguard.messages import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    RESPONSE_SIZE,
)

SIZES = {
    WG_HANDSHAKE_INITIATION: INITIATION_SIZE,
    WG_HANDSHAKE_RESPONSE: RESPONSE_SIZE,
    WG_COOKIE_REPLY: COOKIE_REPLY_SIZE,
    WG_TRANSPORT_DATA: 32,
}


def established():
    network, a, b = pair()
    a.send_packet(A_TO_B)
    network.flush()
    return network, a, b


def drops(device) -> int:
    return sum(v for k, v in device.counters.items() if k.startswith("drop_"))


class MalformedTests(SynchronousTestCase):
    def test_wrong_sizes_and_types(self) -> None:
        network, a, b = established()
        cases = [
            b"",
            b"\x01",
            b"\x04\0\0",
            b"\x05\0\0\0" + bytes(60),  # not a WireGuard type
            b"\x01\0\0\x01" + bytes(INITIATION_SIZE - 4),  # reserved bytes set
            b"\x01\0\0\0" + bytes(INITIATION_SIZE - 5),  # one short
            b"\x02\0\0\0" + bytes(RESPONSE_SIZE),  # one long
            b"\x03\0\0\0" + bytes(10),
            b"\x04\0\0\0" + bytes(27),  # shorter than a keepalive
        ]
        for data in cases:
            b.datagram_received(data, "x")
        self.assertEqual(b.counters["drop_malformed"], len(cases))
        self.assertEqual(b.counters["drop_error"], 0)

    def test_truncated_real_messages(self) -> None:
        """Every prefix of every real message is dropped quietly."""
        network, a, b = pair()
        a.send_packet(A_TO_B)
        network.flush()
        b.send_packet(B_TO_A)
        network.flush()
        fresh_network, fresh_a, fresh_b = pair()
        for src, _, data in network.sent:
            target = fresh_b if src == "a" else fresh_a
            for cut in range(len(data)):
                target.datagram_received(data[:cut], src)
        for device in (fresh_a, fresh_b):
            self.assertEqual(device.counters["drop_error"], 0)
            self.assertEqual(fresh_network.sent, [])

    def test_forged_transport(self) -> None:
        network, a, b = established()
        a.send_packet(A_TO_B)
        message = bytearray(network.sent[-1][2])
        for position in (5, 9, 20, len(message) - 1):  # index, counter, body, tag
            forged = bytearray(message)
            forged[position] ^= 0x40
            b.datagram_received(bytes(forged), "evil")
        self.assertEqual(b.counters["drop_no_session"], 1)
        self.assertEqual(b.counters["drop_decrypt"], 3)
        network.flush()
        self.assertEqual(network.delivered["b"], [A_TO_B, A_TO_B])
        self.assertEqual(b.get_peer(a.public_key).endpoint, "a")

    def test_forged_handshakes(self) -> None:
        """Bit flips anywhere in a handshake message fail mac1 or decryption."""
        network, a, b = pair()
        held = []
        network.drop = hold(held)
        a.send_packet(A_TO_B)
        initiation = held[0]
        for position in range(0, INITIATION_SIZE - 16):  # all but mac2
            forged = bytearray(initiation)
            forged[position] ^= 1
            b.datagram_received(bytes(forged), "evil")
        self.assertEqual(b.counters["handshake_response_sent"], 0)
        self.assertEqual(b.counters["drop_error"], 0)
        self.assertGreater(b.counters["drop_mac1"] + b.counters["drop_malformed"], 0)

    def test_response_to_nobody(self) -> None:
        network, a, b = pair()
        held = []
        network.drop = hold(held, "b")
        a.send_packet(A_TO_B)
        network.flush()
        response = held[0]
        a.datagram_received(response, "b")
        a.datagram_received(response, "b")  # replayed: the handshake is gone
        self.assertEqual(a.counters["handshake_complete"], 1)
        self.assertEqual(a.counters["drop_no_session"], 1)

    def test_inner_packet_garbage(self) -> None:
        """Decrypted garbage (not IPv4/IPv6, or lying about its length) is dropped."""
        network, a, b = established()
        peer = a.get_peer(b.public_key)
        for inner in (b"\x00" * 40, b"\x45" + b"\0" * 5, b"\x45\0\xff\xff" + bytes(30)):
            peer.encrypt_and_send(peer.current, inner, network.clock.seconds())
        network.flush()
        self.assertEqual(b.counters["drop_malformed_inner"], 3)
        self.assertEqual(b.counters["drop_error"], 0)

    def test_outbound_garbage(self) -> None:
        network, a, b = established()
        for packet in (b"", b"\x45", b"\x60" + bytes(10), b"\x10" + bytes(60)):
            a.send_packet(packet)
        self.assertEqual(a.counters["drop_malformed_outbound"], 4)

    def test_send_datagram_failure_does_not_escape(self) -> None:
        network, a, b = pair()

        def broken(data, endpoint):
            raise OSError("no route")

        a._send_datagram = broken
        a.send_packet(A_TO_B)  # must not raise
        self.assertEqual(a.counters["drop_error"], 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_random_bytes(self, data: bytes) -> None:
        network, a, b = established()
        before = drops(b)
        b.datagram_received(data, "fuzz")
        self.assertEqual(b.counters["drop_error"], 0)
        self.assertEqual(drops(b), before + 1)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(sorted(SIZES)), st.data())
    def test_random_bodies_with_valid_headers(self, kind: int, data) -> None:
        network, a, b = established()
        size = SIZES[kind]
        if kind == WG_TRANSPORT_DATA:
            size = data.draw(st.integers(32, 200))
        body = data.draw(st.binary(min_size=size - 4, max_size=size - 4))
        if kind == WG_TRANSPORT_DATA and data.draw(st.booleans()):
            # aim at the live session's index so decryption is attempted
            index = b.get_peer(a.public_key).current.local_index
            body = struct.pack("<I", index) + body[4:]
        before = drops(b)
        b.datagram_received(bytes([kind, 0, 0, 0]) + body, "fuzz")
        self.assertEqual(b.counters["drop_error"], 0)
        self.assertEqual(drops(b), before + 1)
        # the real session is untouched
        a.send_packet(A_TO_B)
        network.flush()
        self.assertEqual(network.delivered["b"][-1], A_TO_B)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=100), st.sampled_from([b"", b"\x45", b"\x60"]))
    def test_random_outbound_packets(self, data: bytes, prefix: bytes) -> None:
        network, a, b = established()
        a.send_packet(prefix + data)
        network.flush()
        self.assertEqual(a.counters["drop_error"] + b.counters["drop_error"], 0)
