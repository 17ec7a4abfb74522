"""
Pre-auth keys: a node that joins with one is authorized without an admin
(issue 15).  Single use or reusable, expiring, revocable; the secret is
shown once and stored only as a hash; a refused key is reported to the node
with the reason and never logged.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from tests.support.files import write_file
from tests.support.rendezvous import FakeSession, World, new_key
from twistvpn.node import node_tap
from twistvpn.rendezvous.admin import AdminAPI
from twistvpn.rendezvous.controller import Controller, NotFoundError, node_id_of
from twistvpn.rendezvous.files import KEY_PREFIX
from twistvpn.rendezvous.store import open_store


class ControllerKeyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.controller = Controller(open_store(":memory:"), self.clock)
        self.net = self.controller.create_network("lab")["id"]

    def node(self) -> bytes:
        _, public = new_key()
        self.controller.register_node(public, "gpu", FakeSession(public))
        return public

    def join(self, key: str | None) -> tuple[str, str | None]:
        return self.controller.join_with_key(self.node(), self.net, key)

    def test_single_use(self) -> None:
        key = self.controller.create_key(self.net)
        self.assertTrue(key["secret"].startswith(KEY_PREFIX))
        self.assertEqual(self.join(key["secret"]), ("authorized", None))
        status, why = self.join(key["secret"])
        self.assertEqual(status, "pending")
        self.assertIn("used already", why or "")
        [listed] = self.controller.list_keys(self.net)
        self.assertEqual((listed["uses"], listed["valid"]), (1, False))
        self.assertNotIn("secret", listed)
        members = self.controller.list_members(self.net)
        self.assertEqual(sorted(m["authorized"] for m in members), [False, True])
        [authorized] = [m for m in members if m["authorized"]]
        self.assertEqual(authorized["ip"], "100.64.0.1")

    def test_reusable(self) -> None:
        key = self.controller.create_key(self.net, reusable=True)
        self.assertEqual([self.join(key["secret"])[0] for _ in range(3)], ["authorized"] * 3)

    def test_name_prefix(self) -> None:
        """Members a key authorizes are named PREFIX + the node's name in the network."""
        key = self.controller.create_key(self.net, reusable=True, name_prefix="lab-")
        self.join(key["secret"])
        _, public = new_key()
        self.controller.register_node(public, "lab-gpu", FakeSession(public))
        self.controller.join_with_key(public, self.net, key["secret"])
        names = sorted((m["name"], m["node_name"]) for m in self.controller.list_members(self.net))
        self.assertEqual(names, [("lab-gpu", "gpu"), ("lab-gpu", "lab-gpu")])
        self.assertEqual(self.controller.network_map(self.net).members[0].name, "lab-gpu")

    def test_expired_revoked_wrong_other_network(self) -> None:
        expiring = self.controller.create_key(self.net, expires_in=60)
        self.clock.advance(61)
        self.assertIn("expired", self.join(expiring["secret"])[1] or "")
        revoked = self.controller.create_key(self.net)
        self.controller.revoke_key(revoked["id"])
        self.assertIn("revoked", self.join(revoked["secret"])[1] or "")
        self.assertIn("not one of this network's", self.join(KEY_PREFIX + "guess")[1] or "")
        other = self.controller.create_network("other")["id"]
        foreign = self.controller.create_key(other)
        self.assertIn("not one of this network's", self.join(foreign["secret"])[1] or "")
        self.assertEqual(self.controller.counters["keys_refused"], 4)
        self.assertRaises(NotFoundError, self.controller.revoke_key, "nope")

    def test_a_pending_member_authorized_by_a_key(self) -> None:
        public = self.node()
        self.assertEqual(self.controller.join(public, self.net), "pending")
        key = self.controller.create_key(self.net)
        self.assertEqual(self.controller.join(public, self.net, key["secret"]), "authorized")

    def test_only_a_hash_is_stored(self) -> None:
        key = self.controller.create_key(self.net)
        dump = "\n".join(self.controller.store.db.iterdump())
        self.assertNotIn(key["secret"], dump)
        self.assertNotIn(key["secret"][len(KEY_PREFIX):], dump)


class NodeJoinsWithAKey(SynchronousTestCase):
    def test_authorized_without_an_admin_and_never_logged(self) -> None:
        world = World()
        net = world.controller.create_network("lab")["id"]
        key = world.controller.create_key(net)["secret"]
        logged: list[str] = []
        from twisted.logger import formatEvent, globalLogPublisher

        def observe(event: dict[str, Any]) -> None:
            logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        a, la, _ = world.node("a", networks=(net,), auth_keys={net: key})
        world.settle()
        self.assertEqual(la.of("join_status")[-1][2], "authorized")
        self.assertEqual(a.auth_keys, {}, "dropped once authorized")
        self.assertTrue(la.maps())
        b, lb, _ = world.node("b", networks=(net,), auth_keys={net: key})
        world.settle()
        self.assertEqual(lb.of("join_status")[-1][2], "pending")
        self.assertEqual(b.counters["auth_key_refused"], 1)
        text = "\n".join(logged)
        self.assertIn("used already", text)
        self.assertNotIn(key, text)
        self.assertNotIn(key[len(KEY_PREFIX):], text)


class AdminKeyTests(SynchronousTestCase):
    def call(self, api: AdminAPI, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        request = DummyRequest([p.encode() for p in path.strip("/").split("/")])
        request.method = method.encode()
        request.content = io.BytesIO(b"" if body is None else json.dumps(body).encode())
        answer = api.render(request)
        return request.responseCode or 200, json.loads(answer)

    def test_create_list_revoke(self) -> None:
        controller = Controller(open_store(":memory:"), Clock())
        api = AdminAPI(controller, None)
        net = controller.create_network("lab")["id"]
        code, key = self.call(api, "POST", f"/api/v1/networks/{net}/keys",
                              {"reusable": True, "expires_in": 3600})
        self.assertEqual(code, 201)
        self.assertTrue(key["secret"].startswith(KEY_PREFIX))
        self.assertEqual(key["expires"], 3600)
        code, listed = self.call(api, "GET", "/api/v1/keys")
        self.assertEqual((code, [k["id"] for k in listed]), (200, [key["id"]]))
        self.assertNotIn("secret", listed[0])
        self.assertEqual(self.call(api, "DELETE", f"/api/v1/keys/{key['id']}")[0], 200)
        self.assertTrue(self.call(api, "GET", f"/api/v1/networks/{net}/keys")[1][0]["revoked"])
        self.assertEqual(self.call(api, "POST", f"/api/v1/networks/{net}/keys",
                                   {"expires_in": "soon"})[0], 400)
        _, public = new_key()
        controller.register_node(public, "n", FakeSession(public))
        self.assertEqual(node_id_of(public), controller.registry.node(public).node_id)


class NodeOptionTests(SynchronousTestCase):
    def write(self, text: str, mode: int = 0o600) -> str:
        return write_file(self, text, mode)

    def parse(self, *extra: str) -> usage.Options:
        options = node_tap.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--rendezvous",
                              "twistvpn://203.0.113.1:8443#sha256=" + "ab" * 32,
                              "--join", "0123456789abcdef", *extra])
        return options

    def test_auth_key_file(self) -> None:
        good = KEY_PREFIX + "x" * 43
        self.assertEqual(self.parse("--auth-key-file", self.write(good + "\n"))["auth_key"], good)
        self.assertIsNone(self.parse()["auth_key"])
        e = self.assertRaises(usage.UsageError, self.parse, "--auth-key-file",
                              self.write(good, 0o644))
        self.assertIn("too open", str(e))
        e = self.assertRaises(usage.UsageError, self.parse, "--auth-key-file",
                              self.write("not a key"))
        self.assertIn("not a pre-auth key", str(e))
