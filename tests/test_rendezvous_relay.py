"""
The relay embedded in the rendezvous: its options, the services
C{makeService} hangs on the rendezvous, what the network maps and the admin
status say about relays, and revocation reaching the relay at the admin's
request rather than at its next poll.  One real process on loopback checks
the whole of it through C{twistvpn admin status}.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from tests.support.rendezvous import FakeSession, RecordingObserver, new_key
from tests.support.services import parse_rendezvous as parse
from tests.support.services import start_rendezvous as start
from twistvpn.rendezvous.admin import AdminAPI
from twistvpn.rendezvous.controller import node_id_of
from twistvpn.testing.localrun import LocalRendezvous
from twistvpn.wireguard.keys import encode_key


class RelayOptions(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = parse(self)
        self.assertFalse(options["no-relay"])
        self.assertEqual(options["public-ip"], "203.0.113.5")  # from --hostname
        self.assertEqual((options["relay-udp-port"], options["relay-tcp-port"]), (443, 443))
        self.assertEqual(options["relay-key"], [])

    def test_hostname_is_not_an_ip(self) -> None:
        self.assertIsNone(parse(self, hostname="rdv.example")["public-ip"])
        options = parse(self, "--public-ip", "198.51.100.9", hostname="rdv.example")
        self.assertEqual(options["public-ip"], "198.51.100.9")

    def test_relay_keys(self) -> None:
        keys = [new_key()[1], new_key()[1]]
        options = parse(self, *[a for k in keys for a in ("--relay-key", encode_key(k))])
        self.assertEqual(options["relay-key"], keys)

    def test_bad_options(self) -> None:
        for args in (
            ["--public-ip", "rdv.example"],
            ["--relay-key", "not-a-key"],
            ["--relay-udp-port", "3478"],
            ["--relay-udp-port", "3479"],
            ["--relay-tcp-port", "99999"],
            ["--relay-link", "ssl:8445"],
            ["--relay-link", "bogus:1"],
        ):
            e = self.assertRaises(usage.UsageError, parse, self, *args)
            self.assertNotIn("\n", str(e))
        # without the embedded relay its port may be anything
        parse(self, "--no-relay", "--relay-udp-port", "3478")


class Embedding(SynchronousTestCase):
    def test_embedded_by_default(self) -> None:
        service, reactor = start(self, parse(self, "--relay-udp-port", "5443",
                                             "--relay-tcp-port", "5444"))
        self.assertIn(5443, reactor.udpPorts)  # next to the discovery ports
        self.assertIn(5444, [p[0] for p in reactor.tcpServers])
        (entry,) = service.controller.relays
        self.assertEqual((entry["host"], entry["port"], entry["tcp_port"]),
                         ("203.0.113.5", 5443, 5444))
        self.assertEqual(entry["fingerprint"], service.data.fingerprint.hex())
        status = service.info()["relays"]
        self.assertEqual(status["advertised"], [entry])
        self.assertEqual(status["embedded"]["counters"]["relayed_packets"], 0)
        self.assertEqual(status["standalone"], [])
        json.dumps(status)  # the admin API serves it

    def test_no_relay(self) -> None:
        service, reactor = start(self, parse(self, "--no-relay"))
        self.assertEqual(sorted(reactor.udpPorts), [3478, 3479])
        self.assertEqual(service.controller.relays, ())
        self.assertIsNone(service.relays)
        status = service.info()["relays"]
        self.assertEqual((status["embedded"], status["embedded_off"]), (None, "--no-relay"))

    def test_no_public_ip(self) -> None:
        """Without an address to advertise, no relay runs and the status says why."""
        service, reactor = start(self, parse(self, hostname="rdv.example"))
        self.assertEqual(sorted(reactor.udpPorts), [3478, 3479])
        self.assertEqual(service.controller.relays, ())
        self.assertIn("--public-ip", service.info()["relays"]["embedded_off"])

    def test_link_listens_only_with_relay_keys(self) -> None:
        service, reactor = start(self, parse(self, "--relay-link", "tcp:7445"))
        self.assertNotIn(7445, [p[0] for p in reactor.tcpServers])
        key = encode_key(new_key()[1])
        service, reactor = start(
            self, parse(self, "--no-relay", "--relay-link", "tcp:7445", "--relay-key", key)
        )
        self.assertIn(7445, [p[0] for p in reactor.tcpServers])
        self.assertIsNone(service.relays.embedded if service.relays else "no relays")
        status = service.info()["relays"]
        self.assertEqual((status["embedded_off"], status["standalone"]), ("--no-relay", []))


class Revocation(SynchronousTestCase):
    """An admin's change reaches the relay's table in the same request."""

    def call(self, api: AdminAPI, method: str, path: str, body: Any = None) -> Any:
        request = DummyRequest([p.encode() for p in path.strip("/").split("/")])
        request.method = method.encode()
        request.content = io.BytesIO(b"" if body is None else json.dumps(body).encode())
        result = json.loads(api.render(request))
        self.assertLess(request.responseCode or 200, 400, result)
        return result

    def test_deauthorize_is_immediate(self) -> None:
        service, reactor = start(self, parse(self))
        assert service.relays is not None
        policy = service.relays.membership.policy
        api = AdminAPI(service.controller, None, service.info)
        network = self.call(api, "POST", "/api/v1/networks", {"name": "lab"})["id"]
        keys = [new_key()[1] for _ in range(2)]
        for key in keys:
            service.controller.register_node(key, "n", FakeSession(key))
            service.controller.join(key, network)
            self.call(api, "POST", f"/api/v1/networks/{network}/members/{node_id_of(key)}",
                      {"authorized": True})
        # no clock advance: the poller has not run since the start
        self.assertTrue(policy.may_relay(keys[0], keys[1]))
        revoked: list[frozenset[bytes]] = []
        policy.add_revocation_observer(revoked.append)
        self.call(api, "POST", f"/api/v1/networks/{network}/members/{node_id_of(keys[1])}",
                  {"authorized": False})
        self.assertFalse(policy.may_relay(keys[0], keys[1]))
        self.assertFalse(policy.may_register(keys[1]))
        self.assertEqual(len(revoked), 1)
        self.call(api, "DELETE", f"/api/v1/networks/{network}")
        self.assertFalse(policy.may_register(keys[0]))

    def test_observers_hear_changes_not_reads(self) -> None:
        service, reactor = start(self, parse(self, "--no-relay"))
        heard = RecordingObserver()
        service.controller.add_membership_observer(heard)
        api = AdminAPI(service.controller, None, service.info)
        network = self.call(api, "POST", "/api/v1/networks", {"name": "x"})["id"]
        key = new_key()[1]
        service.controller.register_node(key, "n", FakeSession(key))
        service.controller.join(key, network)
        self.call(api, "GET", "/api/v1/networks")
        self.call(api, "GET", f"/api/v1/networks/{network}/members")
        self.call(api, "GET", "/api/v1/status")
        self.assertEqual(heard.events, [])
        self.call(api, "POST", f"/api/v1/networks/{network}/members/{node_id_of(key)}",
                  {"authorized": True})
        self.assertEqual(heard.events, [("members", network, frozenset({key}), frozenset())])


class RealProcess(SynchronousTestCase):
    """C{twistd twistvpn-rendezvous} on loopback: the embedded relay listens
    and C{twistvpn admin status} reports it."""

    def test_admin_status_shows_the_relay(self) -> None:
        tmp = tempfile.mkdtemp(prefix="tvrr")
        self.addCleanup(shutil.rmtree, tmp, True)
        data_dir = os.path.join(tmp, "d")
        with open(os.path.join(tmp, "twistd.log"), "ab") as log:
            rendezvous = LocalRendezvous(data_dir, 0, log)
            self.addCleanup(rendezvous.kill)
            info = rendezvous.start()
            result = subprocess.run(
                [sys.executable, "-m", "twistvpn", "admin", "--data-dir", data_dir, "status"],
                capture_output=True, timeout=30, check=False,
                env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        status = json.loads(result.stdout)
        (advertised,) = status["relays"]["advertised"]
        self.assertEqual(advertised["host"], "127.0.0.1")
        self.assertNotEqual(advertised["port"], 0)  # the bound port, not the requested 0
        self.assertNotEqual(advertised["tcp_port"], 0)
        self.assertEqual(advertised["public_key"], info["server_key"])
        self.assertIn("relayed_packets", status["relays"]["embedded"]["counters"])
