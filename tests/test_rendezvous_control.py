"""
The control channel end to end in memory: node clients and the AMP server
over iosim pumps, the controller behind it, one Clock.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.support.logs import LogCatcher
from tests.support.rendezvous import FakeSession, MemoryEndpoint, World, bind_channel, new_key
from twistvpn import __version__
from twistvpn.common import auth
from twistvpn.common.amp import MAX_INBOUND_BOX
from twistvpn.common.ratelimit import TokenBuckets
from twistvpn.interfaces import IControlSession, IRendezvousListener
from twistvpn.rendezvous import client as client_module
from twistvpn.rendezvous import controller as controller_module
from twistvpn.rendezvous.client import (
    LIVENESS_INTERVAL,
    LIVENESS_TIMEOUT,
    NOT_FOUND,
    RECONNECT_JITTER,
    RECONNECT_MAX,
    NotConnectedError,
    RendezvousClient,
    ServerKeyMismatchError,
    reconnect_policy,
)
from twistvpn.rendezvous.controller import InvalidArgumentError, NotFoundError, node_id_of
from twistvpn.rendezvous.netmap import COMPRESS_ABOVE, MapReader, NetworkMap, inflate
from twistvpn.rendezvous.protocol import (
    FAILOVER_SPREAD,
    Challenge,
    Join,
    MapDeltaPush,
    Register,
    RequestMap,
    encoded_push,
)
from twistvpn.rendezvous.server import PING_INTERVAL, PING_TIMEOUT, REGISTER_TIMEOUT
from twistvpn.wireguard.keys import public_key


def result_of(d: defer.Deferred) -> object:
    """The result of a Deferred that has fired, or its failure raised."""
    results: list = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    r = results[0]
    if hasattr(r, "raiseException"):
        r.raiseException()
    return r


class RawClient(amp.AMP):
    """A bare AMP peer, for speaking the protocol wrongly on purpose."""


class Registration(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = World()

    def test_register(self) -> None:
        """A node proves its key and gets the node ID derived from it."""
        client, listener, _ = self.world.node("laptop")
        self.world.settle()
        self.assertEqual(listener.events, [("connected", node_id_of(client.public_key))])
        self.assertEqual(client.udp_ports, [3478, 3479])
        self.assertEqual(client.server_key, public_key(self.world.server_private))
        self.assertEqual(self.world.controller.status()["online"], 1)
        verifyObject(IRendezvousListener, listener)

    def test_server_protocol_is_a_session(self) -> None:
        client, _, endpoint = self.world.node()
        self.world.settle()
        verifyObject(IControlSession, endpoint.pumps[-1].server)

    def _raw(self) -> tuple[RawClient, iosim.IOPump]:
        raw = RawClient()
        server = self.world.server_factory.buildProtocol(None)
        pump = iosim.connect(
            server, iosim.makeFakeServer(server), raw, iosim.makeFakeClient(raw), greet=False
        )
        bind_channel(pump)
        self.world.pumps.append(pump)
        return raw, pump

    def _call(self, raw: RawClient, command: type, **kwargs: object) -> object:
        results: list = []
        raw.callRemote(command, **kwargs).addBoth(results.append)
        self.world.flush()
        return result_of(defer.succeed(None).addCallback(lambda _: results[0]))

    def _register_raw(self, raw: RawClient, private: bytes, challenge: bytes) -> object:
        server_key = public_key(self.world.server_private)
        proof = auth.registration_proof(private, public_key(private), server_key, challenge,
                                        raw.transport.channel_binding)
        return self._call(
            raw,
            Register,
            public_key=public_key(private),
            proof=proof,
            name="n",
            local_endpoints=[],
        )

    def test_replayed_proof_refused(self) -> None:
        """A proof answers one challenge once; a captured proof is useless."""
        private, public = new_key()
        raw, _ = self._raw()
        hello = self._call(raw, Challenge)
        proof = auth.registration_proof(private, public, hello["server_key"], hello["challenge"],
                                        raw.transport.channel_binding)
        args = dict(public_key=public, proof=proof, name="n", local_endpoints=[])
        self.assertEqual(self._call(raw, Register, **args)["node_id"], node_id_of(public))
        # replayed on another connection, after that connection's challenge
        other, _ = self._raw()
        self._call(other, Challenge)
        self.assertRaises(auth.AuthError, self._call, other, Register, **args)
        # and the failed attempt used up that challenge too
        self.assertRaises(auth.AuthError, self._call, other, Register, **args)
        self.assertEqual(self.world.server_factory.counters["auth_failed"], 1)
        self.assertEqual(self.world.server_factory.counters["auth_no_challenge"], 1)

    def test_proof_bound_to_its_connection(self) -> None:
        """
        Audit item 4: a proof made for one connection, relayed by someone in
        the middle onto another (with that connection's own challenge), does
        not verify: it is bound to the channel it was made on.
        """
        private, public = new_key()
        victim, _ = self._raw()
        attacker, _ = self._raw()
        hello = self._call(attacker, Challenge)
        # The victim is made to answer the attacker's challenge on its own channel.
        proof = auth.registration_proof(private, public, hello["server_key"], hello["challenge"],
                                        victim.transport.channel_binding)
        self.assertRaises(auth.AuthError, self._call, attacker, Register, public_key=public,
                          proof=proof, name="n", local_endpoints=[])
        self.assertEqual(self.world.server_factory.counters["auth_failed"], 1)

    def test_unbound_connection_refused(self) -> None:
        """A connection that cannot name itself (no channel) cannot register."""
        private, public = new_key()
        raw = RawClient()
        server = self.world.server_factory.buildProtocol(None)
        pump = iosim.connect(
            server, iosim.makeFakeServer(server), raw, iosim.makeFakeClient(raw), greet=False
        )
        self.world.pumps.append(pump)
        hello = self._call(raw, Challenge)
        proof = auth.registration_proof(private, public, hello["server_key"], hello["challenge"],
                                        b"")
        self.assertRaises(auth.AuthError, self._call, raw, Register, public_key=public,
                          proof=proof, name="n", local_endpoints=[])

    def test_wrong_key_refused(self) -> None:
        """A proof made with another private key does not verify."""
        private, public = new_key()
        impostor, _ = new_key()
        raw, _ = self._raw()
        hello = self._call(raw, Challenge)
        proof = auth.registration_proof(impostor, public, hello["server_key"], hello["challenge"],
                                        raw.transport.channel_binding)
        self.assertRaises(
            auth.AuthError,
            self._call,
            raw,
            Register,
            public_key=public,
            proof=proof,
            name="n",
            local_endpoints=[],
        )
        self.assertFalse(self.world.controller.is_registered(public))

    def test_low_order_key_refused(self) -> None:
        """An all-zero public key (a low-order point) cannot register."""
        raw, _ = self._raw()
        self._call(raw, Challenge)
        self.assertRaises(
            auth.AuthError,
            self._call,
            raw,
            Register,
            public_key=bytes(32),
            proof=bytes(16),
            name="n",
            local_endpoints=[],
        )

    def test_commands_before_register_refused(self) -> None:
        raw, _ = self._raw()
        self.assertRaises(
            InvalidArgumentError, self._call, raw, Join, network_id="0123456789abcdef"
        )

    def test_unregistered_connection_times_out(self) -> None:
        raw, pump = self._raw()
        self.world.clock.advance(REGISTER_TIMEOUT + 1)
        self.world.flush()
        self.assertTrue(pump.clientIO.disconnected)

    def test_registrations_rate_limited_per_address(self) -> None:
        factory = self.world.server_factory
        factory.registration_limits = TokenBuckets(self.world.clock, 1.0, 2.0)
        raws = [self._raw()[0] for _ in range(3)]
        self._call(raws[0], Challenge)
        self._call(raws[1], Challenge)
        self.assertRaises(InvalidArgumentError, self._call, raws[2], Challenge)
        self.assertEqual(factory.counters["registration_rate_limited"], 1)
        self.world.clock.advance(1)
        self._call(raws[2], Challenge)

    def test_dead_connection_dropped(self) -> None:
        """A registered peer that stops answering pings is dropped (offline)."""
        private, public = new_key()
        raw, pump = self._raw()
        hello = self._call(raw, Challenge)
        self._register_raw(raw, private, hello["challenge"])
        self.assertEqual(self.world.controller.status()["online"], 1)
        self.world.clock.advance(0)
        self.world.flush()  # the first ping goes out; RawClient cannot answer it
        self.world.clock.advance(PING_TIMEOUT + 1)
        self.world.flush()
        self.assertTrue(pump.clientIO.disconnected)
        self.assertEqual(self.world.controller.status()["online"], 0)
        self.assertEqual(self.world.server_factory.counters["timeout_ping"], 1)

    def test_server_key_pin(self) -> None:
        """A client told to expect another server key refuses to register."""
        _, wrong = new_key()
        client, listener, _ = self.world.node(server_key=wrong)
        self.world.settle()
        self.assertEqual(listener.of("connected"), [])
        self.assertEqual(client.counters["server_key_mismatch"], 1)
        self.assertFalse(self.world.controller.is_registered(client.public_key))
        self.assertTrue(issubclass(ServerKeyMismatchError, auth.AuthError))

    def test_newer_connection_replaces_older(self) -> None:
        private, _ = new_key()
        first, first_listener, _ = self.world.node(private_key=private)
        self.world.settle()
        second, second_listener, _ = self.world.node(private_key=private)
        self.world.settle()
        self.assertEqual(len(first_listener.of("disconnected")), 1)
        self.assertEqual(self.world.controller.status()["online"], 1)
        first.stopService()
        self.world.settle()
        self.assertEqual(self.world.controller.status()["online"], 1)

    def test_ping_measures_rtt(self) -> None:
        client, _, endpoint = self.world.node()
        self.world.settle()
        server = endpoint.pumps[-1].server
        self.assertEqual(server.rtt, 0.0)
        self.world.clock.advance(PING_INTERVAL)
        self.world.flush()
        self.assertIsNotNone(server.rtt)
        self.assertTrue(client.connected)


class Membership(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = World()
        self.controller = self.world.controller
        self.net = self.controller.create_network("home")["id"]

    def _member(self, name: str, **kwargs: object) -> tuple:
        client, listener, endpoint = self.world.node(name, networks=(self.net,), **kwargs)
        self.world.settle()
        return client, listener, endpoint

    def test_join_is_pending(self) -> None:
        client, listener, _ = self._member("a")
        self.assertEqual(listener.of("join_status"), [("join_status", self.net, "pending")])
        self.assertEqual(listener.maps(), [])
        [member] = self.controller.list_members(self.net)
        self.assertEqual(member["node_id"], client.node_id)
        self.assertFalse(member["authorized"])
        self.assertIsNone(member["ip"])
        self.assertTrue(member["online"])
        self.assertEqual(member["version"], __version__)  # what the node registered with

    def test_join_unknown_network(self) -> None:
        """
        A network the rendezvous does not know is "not found" for that
        network alone: said once in the log, and the other networks (and the
        connection) carry on, across reconnections too.
        """
        log = LogCatcher(self)
        client, listener, endpoint = self.world.node("a")
        self.world.settle()
        d = client.join("ffffffffffffffff")
        self.world.flush()
        self.assertEqual(self.successResultOf(d), NOT_FOUND)
        self.assertEqual(client.status["ffffffffffffffff"], NOT_FOUND)
        self.assertEqual(listener.of("join_status")[-1],
                         ("join_status", "ffffffffffffffff", NOT_FOUND))
        d = client.join("not-an-id")
        self.world.flush()
        self.assertEqual(self.successResultOf(d), NOT_FOUND)
        # The known network works on the same connection, and after a reconnection.
        d = client.join(self.net)
        self.world.flush()
        self.assertEqual(self.successResultOf(d), "pending")
        self.assertTrue(client.connected)
        self.assertEqual(client.counters["join_not_found"], 2)
        self.world.authorize(self.net, client)
        endpoint.drop()
        for _ in range(3):
            self.world.settle(2)  # backoff, reconnect, rejoin, push
        self.assertEqual(len(listener.of("connected")), 2)
        self.assertTrue(client.connected)
        self.assertEqual(client.status, {"ffffffffffffffff": NOT_FOUND,
                                         "not-an-id": NOT_FOUND, self.net: "authorized"})
        self.assertEqual(len(listener.maps()), 2)
        self.assertEqual(len(log.grep("the rendezvous does not know it")), 2)

    def test_authorize_pushes_map(self) -> None:
        """Authorizing sends the node its map (with its IP); peers learn of it."""
        a, la, _ = self._member("a")
        self.world.authorize(self.net, a)
        [netmap] = la.maps()
        self.assertEqual(netmap.network_id, self.net)
        self.assertEqual(netmap.member(a.public_key).ip, "100.64.0.1")
        self.assertEqual(netmap.prefix_length, 24)
        self.assertEqual(la.of("join_status")[-1][2], "pending")
        b, lb, _ = self._member("b")
        self.assertEqual(len(la.maps()), 1, "a pending member changes nobody's map")
        self.world.authorize(self.net, b)
        latest = la.maps()[-1]
        self.assertEqual([m.name for m in latest.members], ["a", "b"])
        self.assertEqual(latest.member(b.public_key).ip, "100.64.0.2")
        self.assertEqual(lb.maps()[-1], a.maps[self.net])
        self.assertEqual([m.name for m in latest.peers(a.public_key)], ["b"])
        self.assertTrue(latest.member(b.public_key).online)

    def test_pending_member_learns_nothing(self) -> None:
        a, la, _ = self._member("a")
        self.world.authorize(self.net, a)
        spy, lspy, _ = self._member("spy")
        a.set_local_endpoints(["192.168.1.2:51820"])
        self.world.settle()
        self.assertEqual(lspy.maps(), [])
        self.assertEqual(spy.maps, {})
        d = spy.request_punch(self.net, a.public_key)
        self.world.flush()
        self.failureResultOf(d, NotFoundError)
        self.assertEqual(lspy.of("punch"), [])

    def test_authorized_member_rejoining_gets_map(self) -> None:
        a, la, endpoint = self._member("a")
        self.world.authorize(self.net, a)
        endpoint.drop()
        for _ in range(3):
            self.world.settle(2)  # backoff, reconnect, rejoin, push
        self.assertEqual(la.of("join_status")[-1], ("join_status", self.net, "authorized"))
        self.assertEqual(len(la.of("connected")), 2)
        self.assertEqual(len(la.maps()), 2)

    def test_reconnect_with_backoff(self) -> None:
        """A refused reconnection is retried later, not in a loop."""
        a, la, endpoint = self._member("a")
        self.world.authorize(self.net, a)
        endpoint.refuse = True
        endpoint.drop()
        self.assertFalse(a.connected)
        self.world.settle(0.1)
        self.assertEqual(len(la.of("connected")), 1)
        endpoint.refuse = False
        for _ in range(10):
            self.world.settle(5)
        self.assertTrue(a.connected)
        self.assertEqual(len(la.of("connected")), 2)

    def test_outage_logged_once(self) -> None:
        """A rendezvous down for a minute is one line, not one per attempt."""
        log = LogCatcher(self)
        a, la, endpoint = self._member("a")
        endpoint.refuse = True
        endpoint.drop()
        for _ in range(12):
            self.world.settle(5)
        self.assertGreater(a.counters["failed_attempts"], 5)
        self.assertEqual(len(log.grep("cannot reach the rendezvous")), 1)
        endpoint.refuse = False
        for _ in range(4):
            self.world.settle(5)
        self.assertTrue(a.connected)
        [back] = log.grep("reached again")
        self.assertIn(f"after {a.counters['failed_attempts']} failed attempt(s)", back)

    def test_back_within_ten_seconds(self) -> None:
        """
        Reliability item 9: after the rendezvous was away for minutes, the
        default policy had grown to about 20 s between attempts; now a node
        is back within 10 s of the rendezvous returning, for any herd: 200
        nodes' waits spread over the jitter rather than all in one instant.
        """
        policy = reconnect_policy(random.Random(7))
        waits = [policy(n) for n in range(200)]
        self.assertTrue(all(1.0 <= w <= RECONNECT_MAX + RECONNECT_JITTER < 10 for w in waits))
        herd = [reconnect_policy(random.Random(seed))(30) for seed in range(200)]
        self.assertGreater(max(herd) - min(herd), 1.0)
        self.assertEqual(len(set(herd)), 200)
        client, listener, endpoint = self.world.node("a")
        self.world.flush()
        self.assertTrue(client.connected)
        endpoint.refuse = True
        endpoint.drop()
        self.world.clock.advance(600)  # away ten minutes: the backoff is at its cap
        endpoint.refuse = False
        back = self.world.clock.seconds()
        for _ in range(100):
            self.world.clock.advance(0.1)
            self.world.flush()
            if client.connected:
                break
        self.assertTrue(client.connected)
        self.assertLess(self.world.clock.seconds() - back, 10.0)

    def test_backoff_grows(self) -> None:
        """Failed attempts are retried ever more slowly, up to a minute."""
        client, listener, endpoint = self.world.node("a", retry_policy=lambda n: min(60.0, 2.0**n))
        endpoint.refuse = True
        endpoint.drop()
        self.world.flush()
        times = []
        for _ in range(600):
            before = client.counters["attempts"]
            self.world.clock.advance(1)
            if client.counters["attempts"] != before:
                times.append(self.world.clock.seconds())
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        self.assertEqual(gaps[:5], [2.0, 4.0, 8.0, 16.0, 32.0])
        self.assertEqual(set(gaps[5:]), {60.0})
        endpoint.refuse = False
        self.world.clock.advance(60)
        self.world.flush()
        self.assertTrue(client.connected)

    def test_offline_peer_is_shown_offline(self) -> None:
        a, la, _ = self._member("a")
        b, lb, endpoint_b = self._member("b")
        self.world.authorize(self.net, a)
        self.world.authorize(self.net, b)
        endpoint_b.refuse = True
        endpoint_b.drop()
        self.world.settle()
        self.assertFalse(la.maps()[-1].member(b.public_key).online)

    def test_deauthorize(self) -> None:
        """The node is told at once; the others drop it from their maps."""
        a, la, _ = self._member("a")
        b, lb, _ = self._member("b")
        self.world.authorize(self.net, a)
        self.world.authorize(self.net, b)
        self.controller.deauthorize(self.net, b.node_id)
        self.world.flush()
        self.assertEqual(lb.of("revoked"), [("revoked", self.net, "deauthorized")])
        self.assertNotIn(self.net, b.maps)
        self.world.settle()
        self.assertIsNone(la.maps()[-1].member(b.public_key))
        self.assertEqual(len(lb.maps()), 1, "no map after deauthorization")
        # authorizing again gives the same address back
        self.world.authorize(self.net, b)
        self.assertEqual(lb.maps()[-1].member(b.public_key).ip, "100.64.0.2")

    def test_delete_member_releases_ip(self) -> None:
        a, la, _ = self._member("a")
        b, lb, _ = self._member("b")
        self.world.authorize(self.net, a)
        self.world.authorize(self.net, b)
        self.controller.delete_member(self.net, a.node_id)
        self.world.settle()
        self.assertEqual(la.of("revoked"), [("revoked", self.net, "deleted")])
        self.assertEqual([m.name for m in lb.maps()[-1].members], ["b"])
        c, lc, _ = self._member("c")
        self.world.authorize(self.net, c)
        self.assertEqual(lc.maps()[-1].member(c.public_key).ip, "100.64.0.1")

    def test_delete_network(self) -> None:
        a, la, _ = self._member("a")
        p, lp, _ = self._member("pending")
        self.world.authorize(self.net, a)
        self.controller.delete_network(self.net)
        self.world.settle()
        self.assertEqual(la.of("revoked"), [("revoked", self.net, "network deleted")])
        self.assertEqual(lp.of("revoked"), [("revoked", self.net, "network deleted")])
        self.assertEqual(self.controller.list_networks(), [])

    def test_public_network(self) -> None:
        net = self.controller.create_network("open", private=False)["id"]
        client, listener, _ = self.world.node("a", networks=(net,))
        self.world.settle()
        self.assertEqual(listener.of("join_status")[-1][2], "authorized")
        self.assertEqual(listener.maps()[-1].member(client.public_key).ip, "100.64.1.1")

    def test_local_endpoints_in_map(self) -> None:
        a, la, _ = self._member("a", local_endpoints=["192.168.1.20:51820"])
        b, lb, _ = self._member("b")
        self.world.authorize(self.net, a)
        self.world.authorize(self.net, b)
        self.assertEqual(
            lb.maps()[-1].member(a.public_key).local_endpoints, ("192.168.1.20:51820",)
        )
        b.set_local_endpoints(["10.1.1.1:1", "[fd00::1]:2"])
        self.world.settle()
        self.assertEqual(
            la.maps()[-1].member(b.public_key).local_endpoints, ("10.1.1.1:1", "[fd00::1]:2")
        )

    def test_told_the_ipv6_discovery_address(self) -> None:
        a, _, _ = self._member("a")
        self.assertIsNone(a.discovery6)
        self.world.server_factory.discovery6 = "2001:db8::10"
        b, _, _ = self._member("b")
        self.assertEqual(b.discovery6, "2001:db8::10")

    def test_endpoints_changed_while_registering(self) -> None:
        """
        Endpoints set after Register went out but before its answer (a port
        mapping made as the node connects) still reach the rendezvous.
        """
        a, _, _ = self.world.node("a", networks=(self.net,), flush=False)
        for _ in range(20):  # one round at a time, until Register is in and not answered
            for pump in self.world.pumps:
                pump.pump()
            registry = self.controller.registry
            if registry.is_registered(a.public_key) and registry.node(a.public_key).online:
                break
        self.assertIsNone(a.node_id)
        a.set_mapped_endpoints(["203.0.113.22:41641"])
        a.set_local_endpoints(["192.168.2.2:41641"])
        self.world.settle()
        node = self.controller.registry.session_node(a.public_key)
        self.assertEqual(node.mapped_endpoints, ("203.0.113.22:41641",))
        self.assertEqual(node.local_endpoints, ("192.168.2.2:41641",))

    def test_bad_local_endpoints_refused(self) -> None:
        a, _, _ = self._member("a")
        for bad in (["nonsense"], ["1.2.3.4:99999"], ["h.example:1"], ["1.1.1.1:1"] * 9):
            d = a.set_local_endpoints(bad)
            self.world.flush()
            self.failureResultOf(d, InvalidArgumentError)
        self.assertTrue(a.connected)

    def test_punch(self) -> None:
        """Both peers are told at once, each with the other's candidates."""
        a, la, ea = self._member("a", local_endpoints=["192.168.1.2:51820"])
        b, lb, eb = self._member("b", local_endpoints=["192.168.7.3:51820"])
        self.world.authorize(self.net, a)
        self.world.authorize(self.net, b)
        self.controller.record_endpoint(b.public_key, ("198.51.100.9", 40000), 0)
        d = a.request_punch(self.net, b.public_key)
        self.world.flush()
        self.assertIsNone(self.successResultOf(d))
        [(_, _, pa)] = la.of("punch")
        [(_, _, pb)] = lb.of("punch")
        self.assertEqual(pa.peer_key, b.public_key)
        self.assertEqual(pa.candidates, ("198.51.100.9:40000", "192.168.7.3:51820"))
        self.assertEqual(pb.peer_key, a.public_key)
        self.assertEqual(pb.candidates, ("192.168.1.2:51820",))
        self.assertEqual(pa.punch_id, pb.punch_id)
        self.assertTrue(0 <= pa.delay <= 0.5)
        # Requests within the second are coalesced into one more, sent when
        # the second is over with the candidates of that moment (b's new
        # endpoint, learned meanwhile).
        a.request_punch(self.net, b.public_key)
        self.controller.record_endpoint(b.public_key, ("198.51.100.9", 40001), 0)
        a.request_punch(self.net, b.public_key)
        self.world.flush()
        self.assertEqual(len(la.of("punch")), 1)
        self.world.settle(1.0)
        self.assertEqual((len(la.of("punch")), len(lb.of("punch"))), (2, 2))
        self.assertEqual(la.of("punch")[1][2].candidates[0], "198.51.100.9:40001")
        self.world.settle(5.0)
        self.assertEqual(len(la.of("punch")), 2)

    def test_punch_offline_peer(self) -> None:
        a, la, _ = self._member("a")
        b, lb, eb = self._member("b")
        self.world.authorize(self.net, a)
        self.world.authorize(self.net, b)
        eb.refuse = True
        eb.drop()
        d = a.request_punch(self.net, b.public_key)
        self.world.flush()
        self.failureResultOf(d, NotFoundError)
        b.stopService()
        self.failureResultOf(b.request_punch(self.net, a.public_key), NotConnectedError)

    def test_changes_arrive_as_deltas(self) -> None:
        """After the first full map, members get only what changed, and the
        client's copy equals the rendezvous's map."""
        a, la, _ = self._member("a")
        b, lb, _ = self._member("b")
        self.world.authorize(self.net, a)
        self.world.authorize(self.net, b)
        before = a.counters["deltas"]
        b.set_local_endpoints(["10.9.9.9:1"])
        self.world.settle()
        self.assertEqual(a.counters["deltas"], before + 1)
        self.assertEqual(a.counters["maps"], 1, "one full map, at authorization")
        self.assertEqual(a.maps[self.net], self.controller.network_map(self.net))
        self.assertEqual(la.maps()[-1], self.controller.network_map(self.net))
        self.assertGreater(self.controller.counters["deltas_pushed"], 0)

    def test_delta_gap_asks_for_the_map(self) -> None:
        a, la, _ = self._member("a")
        b, lb, _ = self._member("b")
        self.world.authorize(self.net, a)
        self.world.authorize(self.net, b)
        # a's copy falls behind (as if a push had been lost)
        a.maps[self.net] = dataclasses.replace(a.maps[self.net], revision=0)
        b.set_local_endpoints(["10.9.9.9:1"])
        self.world.settle()
        self.assertEqual(a.counters["delta_gap"], 1)
        self.assertEqual(self.controller.counters["maps_resent"], 1)
        self.assertEqual(a.maps[self.net], self.controller.network_map(self.net))

    def test_large_map(self) -> None:
        """A map beyond one AMP value (64 KiB) arrives whole."""
        self.net = self.controller.create_network("big", "100.80.0.0/22")["id"]
        for i in range(400):
            private, public = new_key()
            session = FakeSession(public)
            self.controller.register_node(public, f"bulk-{i:03d}-" + "x" * 40, session)
            self.controller.join(public, self.net)
            self.controller.authorize(self.net, node_id_of(public))
        a, la, _ = self._member("a")
        self.world.authorize(self.net, a)
        netmap = la.maps()[-1]
        self.assertEqual(len(netmap.members), 401)
        self.assertGreater(len(netmap.to_json()), 65535)


class RecordingReader(MapReader):
    """A node's reader that keeps the bytes it was given."""

    def __init__(self) -> None:
        self.pushed: list[bytes] = []

    def read_map(self, data: bytes) -> NetworkMap:
        self.pushed.append(data)
        return super().read_map(data)

    def apply_delta(self, base: NetworkMap, data: bytes) -> NetworkMap:
        self.pushed.append(data)
        return super().apply_delta(base, data)


class Compressed(SynchronousTestCase):
    """Big maps and deltas reach nodes compressed; nodes that do not read that get JSON."""

    def setUp(self) -> None:
        self.world = World()
        self.net = self.world.controller.create_network("big", "10.9.0.0/16",
                                                        private=False)["id"]

    def members(self, count: int) -> list[tuple[RendezvousClient, RecordingReader]]:
        nodes = []
        for i in range(count):
            reader = RecordingReader()
            client, _, _ = self.world.node(f"node-with-a-long-name-{i:03d}",
                                           networks=(self.net,), reader=reader)
            nodes.append((client, reader))
        self.world.settle()
        return nodes

    def test_big_pushes_compressed(self) -> None:
        nodes = self.members(30)
        client, reader = nodes[0]
        self.assertEqual(len(client.maps[self.net].members), 30)
        self.assertTrue(all(len(d) for d in reader.pushed))
        big = [d for d in reader.pushed if len(inflate(d)) > COMPRESS_ABOVE]
        self.assertTrue(big)
        self.assertTrue(all(d[:1] != b"{" for d in big))

    def test_json_for_nodes_without_zlib(self) -> None:
        self.patch(client_module, "ZLIB", "something-else")
        nodes = self.members(30)
        client, reader = nodes[0]
        self.assertEqual(len(client.maps[self.net].members), 30)
        self.assertTrue(all(d[:1] == b"{" for d in reader.pushed))


class EncodedPush(SynchronousTestCase):
    """A push is encoded once for all members: the bytes AMP itself would send."""

    def test_same_bytes_as_amp(self) -> None:
        transport = StringTransport()
        protocol = amp.AMP()
        protocol.makeConnection(transport)
        protocol.callRemote(MapDeltaPush, network_id="0123456789abcdef", delta=b"x" * 70000)
        self.assertEqual(encoded_push(MapDeltaPush, network_id="0123456789abcdef",
                                      delta=b"x" * 70000), transport.value())

    def test_only_pushes(self) -> None:
        self.assertRaises(ValueError, encoded_push, RequestMap, network_id="0123456789abcdef")


class BadInput(SynchronousTestCase):
    """Garbage on one connection never harms the others."""

    def setUp(self) -> None:
        self.world = World()
        self.net = self.world.controller.create_network("home")["id"]
        self.good, self.listener, _ = self.world.node("good", networks=(self.net,))
        self.world.settle()
        self.world.authorize(self.net, self.good)

    def _attacker(self) -> iosim.IOPump:
        endpoint = MemoryEndpoint(self.world)
        return endpoint.connect(_NullFactory())

    def _still_served(self) -> None:
        self.world.controller.set_ip(self.net, self.good.node_id, "100.64.0.77")
        self.world.settle()
        self.assertEqual(self.listener.maps()[-1].member(self.good.public_key).ip, "100.64.0.77")

    def _send(self, data: bytes) -> iosim.IOPump:
        protocol = self.successResultOf(self._attacker())
        protocol.transport.write(data)
        self.world.flush()
        return self.world.pumps[-1]

    def test_garbage_bytes(self) -> None:
        pump = self._send(b"\xff" * 300 + b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(pump.serverIO.disconnected)
        self._still_served()

    def test_malformed_box(self) -> None:
        """
        Audit items 5 and 8d: a command lacking arguments (KeyError inside
        AMP), one with a non-ASCII name, and a box with neither command nor
        answer are each answered or ended with one log line and a count,
        never a traceback; an unknown command gets an error.  The service
        goes on.
        """
        box = amp.AmpBox(_command=b"NoSuchThing", _ask=b"1")
        pump = self._send(box.serialize())
        self.assertFalse(pump.serverIO.disconnected)
        self.assertIn(b"_error_code", pump.client.received)
        box = amp.AmpBox(_command=b"Register", _ask=b"2", public_key=b"x")
        pump.client.transport.write(box.serialize())
        self.world.flush()
        self.assertIn(b"BAD_REQUEST", pump.client.received)
        self.assertFalse(pump.serverIO.disconnected)
        box = amp.AmpBox(_command="Régister".encode(), _ask=b"3")
        pump.client.transport.write(box.serialize())
        self.world.flush()
        self.assertFalse(pump.serverIO.disconnected)
        self.assertEqual(self.world.server_factory.counters["bad_request"], 2)
        # Found by the fuzz suite: an unknown command asking no answer logged
        # a traceback per box.
        pump.client.transport.write(amp.AmpBox(_command=b"").serialize() * 3)
        self.world.flush()
        self.assertEqual(self.world.server_factory.counters["bad_request"], 5)
        self.assertEqual(self.flushLoggedErrors(), [])
        pump.client.transport.write(amp.AmpBox(foo=b"bar").serialize())
        self.world.flush()
        self.assertTrue(pump.serverIO.disconnected)
        self.assertEqual(self.world.server_factory.counters["bad_request"], 6)
        self.assertEqual(self.flushLoggedErrors(), [])
        self._still_served()

    def test_oversized_box(self) -> None:
        """AMP bounds each value, not a box's key count: we bound the box."""
        box = amp.AmpBox({b"k%d" % i: b"v" * 60000 for i in range(MAX_INBOUND_BOX // 60000 + 2)})
        pump = self._send(box.serialize())
        self.assertTrue(pump.serverIO.disconnected)
        self.assertEqual(self.world.server_factory.counters["drop_box_too_big"], 1)
        self._still_served()

    def test_oversized_name(self) -> None:
        client, listener, _ = self.world.node("n" * 65)
        self.world.settle()
        self.assertEqual(listener.of("connected"), [])
        self.assertFalse(self.world.controller.is_registered(client.public_key))
        self._still_served()


class _Recorder(amp.AMP):
    def __init__(self) -> None:
        super().__init__()
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class _NullFactory:
    def buildProtocol(self, addr: object) -> _Recorder:
        return _Recorder()


class FailoverTests(SynchronousTestCase):
    """
    A node given several rendezvous instances (one database behind them):
    the next one when its own dies or cannot be reached, spread in time.
    """

    def setUp(self) -> None:
        from twistvpn.rendezvous.server import ControlServerFactory

        self.world = World()
        # Every in-memory client has the same (no) address: no per-address limit.
        self.world.server_factory = ControlServerFactory(
            self.world.controller, self.world.server_private, self.world.clock,
            udp_ports=(3478, 3479), registration_rate=0)

    def client(self, endpoints: list[MemoryEndpoint], seed: int = 0) -> Any:
        from tests.support.rendezvous import RecordingListener
        from twistvpn.wireguard.keys import generate_private_key

        client = RendezvousClient(endpoints, generate_private_key(), "n", RecordingListener(),
                                  clock=self.world.clock, rng=random.Random(seed))
        client.startService()
        self.addCleanup(client.stopService)
        self.world.flush()
        return client

    def until_connected(self, clients: list[Any], limit: float) -> list[float]:
        """When each client was registered again, in 0.05 s steps up to C{limit} seconds."""
        start = self.world.clock.seconds()
        when: dict[int, float] = {}
        for _ in range(int(limit / 0.05)):
            self.world.settle(0.05)
            for i, client in enumerate(clients):
                if client.connected and i not in when:
                    when[i] = self.world.clock.seconds() - start
            if len(when) == len(clients):
                break
        self.assertEqual(len(when), len(clients), f"not all back within {limit} s")
        return [when[i] for i in range(len(clients))]

    def test_first_instance_unreachable(self) -> None:
        one, two = MemoryEndpoint(self.world), MemoryEndpoint(self.world)
        one.refuse = True
        client = self.client([one, two])
        [took] = self.until_connected([client], 5)
        self.assertEqual((client.current, client.where), (1, "the rendezvous"))
        self.assertLessEqual(took, 1.0 + RECONNECT_JITTER + 0.05)

    def test_instance_dies(self) -> None:
        """Its connection drops and it refuses more: the node is on the other within 10 s."""
        one, two = MemoryEndpoint(self.world), MemoryEndpoint(self.world)
        client = self.client([one, two])
        self.until_connected([client], 1)
        self.assertEqual(client.current, 0)
        one.refuse = True
        one.drop()
        self.assertFalse(client.connected)
        [took] = self.until_connected([client], 10)
        self.assertLessEqual(took, FAILOVER_SPREAD + 0.05)
        self.assertEqual((client.current, client.counters["failovers"]), (1, 1))

    def test_silent_instance(self) -> None:
        """An instance that stops answering (its machine died) is left after its timeout."""
        one, two = MemoryEndpoint(self.world), MemoryEndpoint(self.world)
        client = self.client([one, two])
        self.until_connected([client], 1)
        server = one.pumps[-1].serverIO  # says nothing from now on
        server.write = server.writeSequence = lambda data: None
        one.refuse = True
        start = self.world.clock.seconds()
        for _ in range(400):
            if not client.connected:
                break
            self.world.settle(0.05)
        left = self.world.clock.seconds() - start
        self.assertLessEqual(left, LIVENESS_INTERVAL + LIVENESS_TIMEOUT + 0.1)
        [took] = self.until_connected([client], 20)
        self.assertLessEqual(left + took, LIVENESS_INTERVAL + LIVENESS_TIMEOUT + FAILOVER_SPREAD
                             + 0.1)
        self.assertEqual((client.current, client.counters["liveness_timeouts"]), (1, 1))

    def test_busy_instance_kept(self) -> None:
        """
        An instance late with the ping's answer but still sending (a
        survivor busy with a dead one's nodes) is not left: leaving would
        add a reconnection to its load.  Once it says nothing at all for
        the timeout, it is left.
        """
        one, two = MemoryEndpoint(self.world), MemoryEndpoint(self.world)
        client = self.client([one, two])
        self.until_connected([client], 1)
        server = one.pumps[-1].serverIO  # no answers from now on...
        server.write = server.writeSequence = lambda data: None
        protocol = client._protocol
        for _ in range(40):  # ...but bytes arrive every 0.5 s, for 20 s
            protocol.heard = self.world.clock.seconds()
            self.world.settle(0.5)
        self.assertIs(client._protocol, protocol)
        self.assertEqual(client.counters["liveness_timeouts"], 0)
        self.assertGreater(client.counters["liveness_slow"], 0)
        one.refuse = True
        silent_from = self.world.clock.seconds()
        for _ in range(200):
            if client.counters["liveness_timeouts"]:
                break
            self.world.settle(0.1)
        self.assertEqual(client.counters["liveness_timeouts"], 1)
        self.assertLessEqual(self.world.clock.seconds() - silent_from,
                             LIVENESS_INTERVAL + 2 * LIVENESS_TIMEOUT + 0.2)
        self.until_connected([client], 20)
        self.assertEqual(client.current, 1)

    def test_no_thundering_herd(self) -> None:
        """
        The nodes of a dead instance reach the survivor spread over
        FAILOVER_SPREAD seconds: no half-second takes more than a sixth.
        """
        one, two = MemoryEndpoint(self.world), MemoryEndpoint(self.world)
        clients = [self.client([one, two], seed) for seed in range(300)]
        self.until_connected(clients, 1)
        one.refuse = True
        for pump in list(one.pumps):
            pump.serverIO.loseConnection()
        self.world.flush()
        took = self.until_connected(clients, 10)
        self.assertLessEqual(max(took), FAILOVER_SPREAD + 0.05)
        busiest = max(sum(1 for t in took if start <= t < start + 0.5)
                      for start in [i * 0.05 for i in range(100)])
        self.assertLess(busiest, len(clients) / 6)

    def test_spread_follows_the_instance_size(self) -> None:
        """
        An instance says, in its answers to liveness pings, how long its
        nodes should spread a move over: its node count over what a
        survivor registers per second.
        """
        self.patch(controller_module, "FAILOVER_RATE", 30.0)
        one, two = MemoryEndpoint(self.world), MemoryEndpoint(self.world)
        clients = [self.client([one, two], seed) for seed in range(300)]
        self.until_connected(clients, 1)
        self.world.settle(LIVENESS_INTERVAL + 0.5)  # one ping each
        self.assertEqual({c.failover_spread for c in clients}, {10.0})
        one.refuse = True
        for pump in list(one.pumps):
            pump.serverIO.loseConnection()
        self.world.flush()
        took = self.until_connected(clients, 15)
        self.assertLessEqual(max(took), 10.05)
        self.assertGreater(max(took), 8.0)  # not FAILOVER_SPREAD's 5 s
        busiest = max(sum(1 for t in took if start <= t < start + 0.5)
                      for start in [i * 0.05 for i in range(200)])
        self.assertLess(busiest, len(clients) / 12)

    def test_backoff_grows_per_round(self) -> None:
        """Both down: the instances are tried in turn, waits growing once per round."""
        one, two = MemoryEndpoint(self.world), MemoryEndpoint(self.world)
        one.refuse = two.refuse = True
        client = self.client([one, two])
        for _ in range(200):
            self.world.settle(0.1)
        self.assertGreater(client.counters["failed_attempts"], 6)
        self.assertLess(client.counters["failed_attempts"], 30)
        two.refuse = False
        self.until_connected([client], 20)
        self.assertEqual(client.current, 1)
