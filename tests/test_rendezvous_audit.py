"""The rendezvous's audit log: every admin action, who did it, and how it ended."""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from tests.support.rendezvous import FakeSession, new_key
from twistvpn.rendezvous.admin import AdminAPI
from twistvpn.rendezvous.admin_cli import duration
from twistvpn.rendezvous.audit import AuditLog
from twistvpn.rendezvous.controller import Controller, node_id_of
from twistvpn.rendezvous.store import open_store

TOKEN = "t" * 43


class AuditLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        os.makedirs(self.mktemp_dir())
        self.clock = Clock()
        self.clock.advance(1000)
        self.log = AuditLog(self.path, self.clock.seconds)
        self.addCleanup(self.log.close)

    def mktemp_dir(self) -> str:
        directory = self.mktemp()
        self.path = os.path.join(directory, "audit.log")
        return directory

    def test_append_and_read(self) -> None:
        self.log.record("admin-socket", "POST", "/networks", "ok", {"name": "home"})
        self.clock.advance(10)
        self.log.record("http-token", "DELETE", "/networks/x", "refused: unknown network x")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        everything = self.log.read()
        self.assertEqual([e["actor"] for e in everything], ["admin-socket", "http-token"])
        self.assertEqual(everything[0]["detail"], {"name": "home"})
        self.assertEqual([e["time"] for e in self.log.read(since=1005)], [1010])

    def test_a_line_cut_by_a_crash_is_skipped(self) -> None:
        self.log.record("admin-socket", "POST", "/networks", "ok")
        with open(self.path, "a") as f:
            f.write('{"time": 1000, "act')  # the rendezvous dies mid-write
        self.log.close()
        self.log = AuditLog(self.path, self.clock.seconds)  # and starts again
        self.log.record("admin-socket", "POST", "/networks", "ok")
        self.assertEqual(len(self.log.read()), 2)


class AdminAuditTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        clock = Clock()
        clock.advance(5000)
        self.audit = AuditLog(os.path.join(directory, "audit.log"), clock.seconds)
        self.addCleanup(self.audit.close)
        self.controller = Controller(open_store(":memory:"), clock)
        self.api = AdminAPI(self.controller, TOKEN, dict, self.audit)

    def call(self, method: str, path: str, body: Any = None,
             args: dict[bytes, list[bytes]] | None = None) -> tuple[int, Any]:
        request = DummyRequest([p.encode() for p in path.strip("/").split("/")])
        request.method = method.encode()
        request.args = args or {}
        request.content = io.BytesIO(b"" if body is None else json.dumps(body).encode())
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {TOKEN}".encode()])
        result = self.api.render(request)
        return request.responseCode or 200, json.loads(result)

    def test_changes_recorded_reads_not(self) -> None:
        _, network = self.call("POST", "/api/v1/networks", {"name": "lab"})
        _, public = new_key()
        self.controller.register_node(public, "gpu", FakeSession(public))
        self.controller.join(public, network["id"])
        member = f"/api/v1/networks/{network['id']}/members/{node_id_of(public)}"
        self.call("POST", member, {"authorized": True})
        self.call("POST", member, {"ip": "8.8.8.8"})  # refused: not in the subnet
        self.call("GET", "/api/v1/networks")
        self.call("GET", member)
        entries = self.audit.read()
        self.assertEqual([(e["actor"], e["action"]) for e in entries], [("http-token", "POST")] * 3)
        self.assertEqual(entries[0]["object"], "/networks")
        self.assertEqual(entries[1]["object"], f"/networks/{network['id']}/members/"
                                               f"{node_id_of(public)}")
        self.assertEqual(entries[1]["detail"], {"authorized": True})
        self.assertEqual([e["result"][:7] for e in entries], ["ok", "ok", "refused"])
        code, listed = self.call("GET", "/api/v1/audit")
        self.assertEqual((code, listed), (200, entries))
        self.assertEqual(self.call("GET", "/api/v1/audit", args={b"since": [b"6000"]}),
                         (200, []))
        self.assertEqual(self.call("GET", "/api/v1/audit", args={b"since": [b"soon"]})[0], 400)

    def test_durations(self) -> None:
        self.assertEqual([duration(t) for t in ("90", "90s", "15m", "2h", "7d")],
                         [90, 90, 900, 7200, 604800])
        for bad in ("", "h", "1.5h", "-1m", "\u00b9h"):
            self.assertRaises(argparse.ArgumentTypeError, duration, bad)
