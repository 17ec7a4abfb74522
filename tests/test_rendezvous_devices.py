"""
Stock WireGuard devices at the rendezvous (issue 18): members of kind
"device" added through the admin API, their wg-quick files, what maps and
the relays' policy learn of them.
"""

from __future__ import annotations

import io
import json
import shutil
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from tests.support.rendezvous import FakeSession, new_key
from twistvpn.relay.policy import ControllerMembership
from twistvpn.rendezvous import wgquick
from twistvpn.rendezvous.admin import AdminAPI
from twistvpn.rendezvous.controller import Controller, node_id_of
from twistvpn.rendezvous.errors import ConflictError, InvalidArgumentError
from twistvpn.rendezvous.store import open_store
from twistvpn.wireguard.keys import encode_key

RELAY = {"id": "embedded", "host": "203.0.113.10", "port": 443, "tcp_port": 443,
         "public_key": encode_key(b"r" * 32), "fingerprint": "sha256:x"}


class DeviceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.controller = Controller(open_store(":memory:"), Clock())
        self.controller.relays = (RELAY,)
        self.net = self.controller.create_network("lab")["id"]
        self.nodes = [self.node(name) for name in ("gpu", "laptop")]
        self.api = AdminAPI(self.controller, None)

    def node(self, name: str) -> bytes:
        _, public = new_key()
        self.controller.register_node(public, name, FakeSession(public))
        self.controller.join(public, self.net)
        self.controller.authorize(self.net, node_id_of(public))
        return public

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        request = DummyRequest([p.encode() for p in path.strip("/").split("/")])
        request.method = method.encode()
        request.content = io.BytesIO(b"" if body is None else json.dumps(body).encode())
        result = self.api.render(request)
        return request.responseCode or 200, json.loads(result)

    def add(self, name: str = "phone") -> tuple[bytes, dict[str, Any]]:
        _, public = new_key()
        code, member = self.call("POST", f"/api/v1/networks/{self.net}/devices",
                                 {"name": name, "public_key": encode_key(public)})
        self.assertEqual(code, 200, member)
        return public, member

    def test_added_authorized_with_an_ip(self) -> None:
        public, member = self.add()
        self.assertEqual((member["kind"], member["authorized"], member["name"]),
                         ("device", True, "phone"))
        self.assertEqual(member["ip"], "100.64.0.3")
        self.assertEqual(self.controller.authorized_devices(), {self.net: frozenset([public])})
        netmap = self.controller.network_map(self.net)
        [device] = [m for m in netmap.members if m.public_key == public]
        self.assertTrue(device.device)
        self.assertTrue(type(device).from_dict(device.to_dict()).device)
        self.assertFalse(any(m.device for m in netmap.members if m.public_key != public))

    def test_config(self) -> None:
        public, member = self.add()
        code, config = self.call("GET", f"/api/v1/networks/{self.net}/devices/phone/config")
        self.assertEqual(code, 200, config)
        self.assertEqual(config["endpoint"], "203.0.113.10:443")
        self.assertEqual(config["address"][0], "100.64.0.3/32")
        self.assertTrue(config["address"][1].startswith("fd"))
        self.assertEqual({p["public_key"] for p in config["peers"]},
                         {encode_key(k) for k in self.nodes})
        self.assertEqual(config["dns"][0], config["peers"][0]["allowed_ips"][0].split("/")[0])
        # By node ID and by key as well as by name.
        for name in (member["node_id"], encode_key(public)):
            self.assertEqual(self.controller.device_config(self.net, name), config)

    def test_config_follows_the_nodes(self) -> None:
        self.add()
        self.controller.deauthorize(self.net, node_id_of(self.nodes[1]))
        config = self.controller.device_config(self.net, "phone")
        self.assertEqual([p["public_key"] for p in config["peers"]], [encode_key(self.nodes[0])])

    def test_refusals(self) -> None:
        public, _ = self.add()
        with self.assertRaises(ConflictError):
            self.controller.add_device(self.net, "tablet", public)  # the key is taken
        with self.assertRaises(ConflictError):
            self.controller.add_device(self.net, "phone", new_key()[1])  # the name is taken
        with self.assertRaises(ConflictError):
            self.controller.add_device(self.net, "gpu", new_key()[1])
        with self.assertRaises(InvalidArgumentError):
            self.controller.device_config(self.net, node_id_of(self.nodes[0]))  # a node
        code, body = self.call("POST", f"/api/v1/networks/{self.net}/devices",
                               {"name": "x", "public_key": "not a key"})
        self.assertEqual(code, 400, body)
        with self.assertRaises(InvalidArgumentError):
            self.controller.register_node(public, "impostor", FakeSession(public))
        self.controller.deauthorize(self.net, "phone")
        with self.assertRaises(ConflictError):
            self.controller.device_config(self.net, "phone")

    def test_no_relay_no_config(self) -> None:
        self.add()
        self.controller.relays = ()
        with self.assertRaises(ConflictError):
            self.controller.device_config(self.net, "phone")

    def test_relay_policy_learns_devices(self) -> None:
        membership = ControllerMembership(self.controller)
        membership.start()
        self.assertEqual(membership.policy.device_reachable(), frozenset())
        public, _ = self.add()
        self.assertEqual(membership.policy.device_reachable(), frozenset(self.nodes))
        self.controller.deauthorize(self.net, "phone")
        self.assertEqual(membership.policy.device_reachable(), frozenset())
        membership.stop()

    def test_deleted_device_leaves_the_map(self) -> None:
        public, _ = self.add()
        self.controller.delete_member(self.net, "phone")
        keys = {m.public_key for m in self.controller.network_map(self.net).members}
        self.assertNotIn(public, keys)
        # Added again with its key, it is the same device.
        again = self.controller.add_device(self.net, "phone", public)
        self.assertEqual(again["node_id"], node_id_of(public))

    def test_one_device_in_two_networks(self) -> None:
        public, _ = self.add()
        other = self.controller.create_network("other")["id"]
        member = self.controller.add_device(other, "phone", public)
        self.assertEqual((member["kind"], member["authorized"]), ("device", True))
        self.assertEqual(set(self.controller.authorized_devices()), {self.net, other})
        with self.assertRaises(ConflictError):
            self.controller.add_device(other, "phone2", public)  # already a member there


class WgQuickTests(SynchronousTestCase):
    CONFIG = {"network_id": "8056c2e21c000001", "name": "phone", "node_id": "0123456789",
              "public_key": "x", "address": ["100.64.0.3/32", "fd80::3/128"],
              "dns": ["100.64.0.1", "lab.twistvpn.internal"], "endpoint": "203.0.113.10:443",
              "peers": [{"name": "gpu", "node_id": "abcdef0123", "public_key": "K" * 43 + "=",
                         "allowed_ips": ["100.64.0.1/32", "fd80::1/128"]}]}

    def test_render(self) -> None:
        text = wgquick.render(self.CONFIG, "P" * 43 + "=")
        self.assertIn("[Interface]\nPrivateKey = " + "P" * 43 + "=\n", text)
        self.assertIn("Address = 100.64.0.3/32, fd80::3/128\n", text)
        self.assertIn("DNS = 100.64.0.1, lab.twistvpn.internal\n", text)
        self.assertIn("[Peer]\nPublicKey = " + "K" * 43 + "=\nAllowedIPs = 100.64.0.1/32, "
                      "fd80::1/128\nEndpoint = 203.0.113.10:443\nPersistentKeepalive = 25\n",
                      text)
        self.assertIn(wgquick.PRIVATE_KEY_PLACEHOLDER, wgquick.render(self.CONFIG))

    def test_strip_keeps_what_wg_takes(self) -> None:
        stripped = wgquick.strip(wgquick.render(self.CONFIG, "P" * 43 + "="))
        self.assertNotIn("Address", stripped)
        self.assertNotIn("DNS", stripped)
        self.assertIn("PrivateKey", stripped)
        self.assertIn("Endpoint = 203.0.113.10:443", stripped)
        # The real wg setconf takes it: tests/test_integration_devices.py.

    def test_qr_code(self) -> None:
        if shutil.which("qrencode") is None:
            raise self.skipTest("qrencode is not installed (scripts/bootstrap.sh installs it)")
        code = wgquick.qr_code(wgquick.render(self.CONFIG))
        self.assertGreater(code.count("\n"), 20)
        self.assertIn("\u2588", code)
