"""
The admin API (JSON over HTTP), the twistd options and makeService, and the
C{twistvpn admin} command against the API.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from typing import Any

from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from tests.support.reactor import FakeReactor
from tests.support.rendezvous import FakeSession, new_key
from twistvpn.cli import build_parser
from twistvpn.common import tls
from twistvpn.rendezvous import admin_cli
from twistvpn.rendezvous.admin import MAX_BODY, AdminAPI
from twistvpn.rendezvous.audit import AuditLog
from twistvpn.rendezvous.controller import Controller, node_id_of
from twistvpn.rendezvous.files import ADMIN_SOCKET, STATE_FILE
from twistvpn.rendezvous.rendezvous_tap import Options, makeService
from twistvpn.rendezvous.store import open_store
from twistvpn.rendezvous.webpassword import WebPassword

TOKEN = "s3cret-token-for-tests"






class API(SynchronousTestCase):
    def setUp(self) -> None:
        self.controller = Controller(open_store(":memory:"), Clock())
        self.api = AdminAPI(self.controller, TOKEN, lambda: {"url": "twistvpn://x:1"})

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = TOKEN,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        request = DummyRequest([p.encode() for p in path.strip("/").split("/")])
        request.method = method.encode()
        data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        request.content = io.BytesIO(data)
        if token is not None:
            request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
        result = self.api.render(request)
        return request.responseCode or 200, json.loads(result)

    def member(self, net: str) -> str:
        _, public = new_key()
        self.controller.register_node(public, "n", FakeSession(public))
        self.controller.join(public, net)
        return node_id_of(public)

    def test_token_required(self) -> None:
        for token in (None, "wrong", TOKEN + "x", ""):
            code, body = self.call("GET", "/api/v1/networks", token=token)
            self.assertEqual((code, body), (401, {"error": "a valid bearer token is required"}))

    def test_no_token_on_the_socket(self) -> None:
        self.api = AdminAPI(self.controller, None)
        self.assertEqual(self.call("GET", "/api/v1/networks", token=None), (200, []))

    def test_networks(self) -> None:
        code, network = self.call("POST", "/api/v1/networks", {"name": "home"})
        self.assertEqual(code, 201)
        self.assertEqual(self.call("GET", "/api/v1/networks")[1], [network])
        self.assertEqual(self.call("GET", f"/api/v1/networks/{network['id']}")[1], network)
        code, _ = self.call(
            "POST", "/api/v1/networks", {"name": "lab", "subnet": "10.0.0.0/8", "private": False}
        )
        self.assertEqual(code, 201)
        self.assertEqual(self.call("DELETE", f"/api/v1/networks/{network['id']}")[0], 200)
        self.assertEqual(self.call("GET", f"/api/v1/networks/{network['id']}")[0], 404)
        self.assertEqual(self.call("GET", "/api/v1/status")[1]["networks"], 1)

    def test_network_settings(self) -> None:
        """POST on a network renames it or sets its DNS domain, as `admin network set`."""
        network = self.call("POST", "/api/v1/networks", {"name": "home"})[1]
        path = f"/api/v1/networks/{network['id']}"
        code, changed = self.call("POST", path, {"domain": "home.example"})
        self.assertEqual((code, changed["domain"], changed["name"]), (200, "home.example", "home"))
        code, body = self.call("POST", path, {"domain": "no spaces.example"})
        self.assertEqual(code, 400)
        self.assertIn("is not a DNS label", body["error"])
        self.assertEqual(self.call("GET", path)[1], changed)

    def test_web_password(self) -> None:
        """Set through the API: hashed (scrypt) on disk, never in the audit log."""
        data_dir = self.mktemp()
        os.makedirs(data_dir)
        audit = AuditLog(os.path.join(data_dir, "audit.log"), lambda: 1.0)
        password = WebPassword(os.path.join(data_dir, "web-password"))
        self.api = AdminAPI(self.controller, TOKEN, audit=audit, web_password=password)
        self.assertFalse(password.is_set)
        code, body = self.call("POST", "/api/v1/web-password", {"password": "short"})
        self.assertEqual((code, password.is_set), (400, False))
        self.assertIn("10 to 1024 characters", body["error"])
        code, _ = self.call("POST", "/api/v1/web-password", {"password": "a long passphrase"})
        self.assertEqual((code, password.generation), (200, 1))
        self.assertTrue(password.verify("a long passphrase"))
        self.assertFalse(password.verify("a long passphrasE"))
        with open(os.path.join(data_dir, "web-password")) as f:
            stored = f.read()
        self.assertTrue(stored.startswith("scrypt$32768$8$1$"))
        self.assertNotIn("passphrase", stored)
        records = audit.read()
        self.assertEqual([r["detail"] for r in records],
                         [{"password": "(not logged)"}, {"password": "(not logged)"}])
        self.assertEqual(WebPassword(os.path.join(data_dir, "web-password")).is_set, True)

    def test_members(self) -> None:
        net = self.call("POST", "/api/v1/networks", {"name": "n", "subnet": "10.2.0.0/30"})[1]
        path = f"/api/v1/networks/{net['id']}/members"
        a, b, c = self.member(net["id"]), self.member(net["id"]), self.member(net["id"])
        self.assertEqual(
            [m["node_id"] for m in self.call("GET", path)[1]],
            sorted(
                [a, b, c],
                key=lambda n: [m["node_id"] for m in self.controller.list_members(net["id"])].index(
                    n
                ),
            ),
        )
        code, m = self.call("POST", f"{path}/{a}", {"authorized": True})
        self.assertEqual((code, m["authorized"], m["ip"]), (200, True, "10.2.0.1"))
        code, m = self.call("POST", f"{path}/{b}", {"ip": "10.2.0.1"})
        self.assertEqual(code, 409)
        self.assertIn("already used", m["error"])
        code, m = self.call("POST", f"{path}/{b}", {"ip": "10.3.0.1"})
        self.assertEqual(code, 400)
        code, m = self.call("POST", f"{path}/{b}", {"authorized": True})
        self.assertEqual(m["ip"], "10.2.0.2")
        code, m = self.call("POST", f"{path}/{c}", {"authorized": True})
        self.assertEqual(code, 409)
        self.assertIn("no free address", m["error"])
        self.assertEqual(
            self.call("POST", f"{path}/{a}", {"authorized": False})[1]["authorized"], False
        )
        self.assertEqual(self.call("DELETE", f"{path}/{b}")[0], 200)
        self.assertEqual(self.call("GET", f"{path}/{b}")[0], 404)
        self.assertEqual(self.call("GET", f"{path}/0000000000")[0], 404)

    def test_bad_requests(self) -> None:
        net = self.call("POST", "/api/v1/networks", {"name": "n"})[1]["id"]
        node = self.member(net)
        member = f"/api/v1/networks/{net}/members/{node}"
        cases = [
            ("GET", "/nope", None, None, 404),
            ("GET", "/api/v1/whatever", None, None, 404),
            ("PUT", "/api/v1/networks", None, None, 405),
            ("POST", "/api/v1/networks", None, b"{not json", 400),
            ("POST", "/api/v1/networks", None, b"[1, 2]", 400),
            ("POST", "/api/v1/networks", {}, None, 400),
            ("POST", "/api/v1/networks", {"name": 5}, None, 400),
            ("POST", "/api/v1/networks", {"name": "x", "subnet": "bad"}, None, 400),
            ("POST", "/api/v1/networks", {"name": "x" * 100}, None, 400),
            ("POST", "/api/v1/networks", None, b"{" + b" " * MAX_BODY + b"}", 413),
            # audit item 8d: nested past the recursion limit was a 500
            ("POST", "/api/v1/networks", None, b"[" * 30_000 + b"]" * 30_000, 400),
            ("POST", member, {"authorized": "yes"}, None, 400),
            ("POST", member, {"color": "blue"}, None, 400),
            ("GET", "/api/v1/networks/ffffffffffffffff/members", None, None, 404),
        ]
        for method, path, body, raw, expected in cases:
            code, answer = self.call(method, path, body, raw=raw)
            self.assertEqual(code, expected, (method, path, answer))
            self.assertIsInstance(answer["error"], str)
            self.assertNotIn("\n", answer["error"])
        self.assertEqual(len(self.controller.list_networks()), 1)


class TapOptions(SynchronousTestCase):
    def parse(self, *args: str) -> Options:
        # short: the admin socket's path must fit in sockaddr_un
        tmp = tempfile.mkdtemp(prefix="tvr")
        self.addCleanup(shutil.rmtree, tmp, True)
        options = Options()
        options.parseOptions(
            ["--data-dir", os.path.join(tmp, "data"), "--hostname", "rdv.example", *args]
        )
        return options

    def test_defaults(self) -> None:
        options = self.parse()
        self.assertEqual(options["control"], "tcp:8443")
        self.assertEqual((options["udp-port"], options["udp-port2"]), (3478, 3479))
        self.assertEqual(options["admin-http"], "tcp:8444:interface=127.0.0.1")

    def test_bad_options(self) -> None:
        for args in (
            ["--udp-port", "70000"],
            ["--udp-port", "x"],
            ["--udp-port", "5000", "--udp-port2", "5000"],
            ["--control", "ssl:443"],
            ["--control", "bogus:1"],
            ["--control", "tcp:notaport"],
            ["--admin-http", "nope:1"],
            ["--tls-cert", "/etc/hostname"],
            ["--tls-cert", "/nonexistent", "--tls-key", "/nonexistent"],
            ["--hostname", "bad host!"],
            ["--udp-interface", "eth0"],
            ["--udp-interface6", "203.0.113.10"],
            ["--udp-interface6", "::"],
            ["--udp-interface6", "::ffff:203.0.113.10"],
            ["--udp-interface6", "2001:db8::10", "--udp-port", "0"],
            ["--registration-rate", "-1"],
            ["--registration-rate", "lots"],
        ):
            self.assertRaises(usage.UsageError, self.parse, *args)

    def test_make_service(self) -> None:
        """First start creates the directory, key, certificate, token, database."""
        reactor = FakeReactor()
        options = self.parse("--control", "tcp:9443", "--admin-http", "none")
        service = makeService(options, reactor)
        data_dir = options["data-dir"]
        self.assertEqual(os.stat(data_dir).st_mode & 0o777, 0o700)
        for name in (
            "server.key",
            "tls-cert.pem",
            "tls-key.pem",
            "admin-token",
            "rendezvous.sqlite",
        ):
            self.assertEqual(os.stat(os.path.join(data_dir, name)).st_mode & 0o777, 0o600)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([p[0] for p in reactor.udpPorts.items()], [3478, 3479])
        self.assertEqual(reactor.tcpServers[0][0], 9443)
        self.assertEqual(reactor.unixServers[0][0], os.path.join(data_dir, ADMIN_SOCKET))
        self.assertEqual(reactor.unixServers[0][3], 0o600)
        with open(os.path.join(data_dir, STATE_FILE)) as f:
            state = json.load(f)
        with open(os.path.join(data_dir, "tls-cert.pem"), "rb") as f:
            fingerprint = tls.fingerprint(f.read())
        self.assertEqual(state["url"], f"twistvpn://rdv.example:9443#sha256={fingerprint.hex()}")
        self.assertEqual(state["udp_ports"], [3478, 3479])

    def test_second_start_keeps_identity(self) -> None:
        options = self.parse("--admin-http", "none")
        first = makeService(options, FakeReactor())
        key, fp = first.data.server_private, first.data.fingerprint
        first.data.db.close()
        second = makeService(options, FakeReactor())
        self.addCleanup(second.data.db.close)
        self.assertEqual((second.data.server_private, second.data.fingerprint), (key, fp))

    def test_socket_path_too_long(self) -> None:
        options = self.parse()
        options["data-dir"] = "/tmp/" + "d" * 120
        e = self.assertRaises(SystemExit, makeService, options, FakeReactor())
        self.assertIn("too long", str(e))
        self.assertFalse(os.path.exists(options["data-dir"]))

    def test_bad_data_dir_file(self) -> None:
        options = self.parse()
        os.makedirs(options["data-dir"])
        with open(os.path.join(options["data-dir"], "server.key"), "w") as f:
            f.write("garbage\n")
        e = self.assertRaises(SystemExit, makeService, options, FakeReactor())
        self.assertIn("server.key", str(e))


class CommandLine(SynchronousTestCase):
    """The admin command's parser and its one-line errors (no server here;
    tests.test_rendezvous_process runs it against a real one)."""

    def run_cli(self, *argv: str) -> tuple[int, str]:
        args = build_parser().parse_args(["admin", *argv])
        out = io.StringIO()
        return args.func(args, out), out.getvalue()

    def test_parser(self) -> None:
        args = build_parser().parse_args(
            ["admin", "--data-dir", "/d", "member", "set-ip", "0123456789abcdef", "n", "1.2.3.4"]
        )
        self.assertEqual(
            (args.admin_object, args.admin_action, args.network, args.node, args.ip),
            ("member", "set-ip", "0123456789abcdef", "n", "1.2.3.4"),
        )

    def test_connection_options_before_or_after(self) -> None:
        """--data-dir (and --url, --token...) before the object or after the action."""
        parser = build_parser()
        for argv in (["admin", "--data-dir", "/d", "network", "list"],
                     ["admin", "network", "list", "--data-dir", "/d"],
                     ["admin", "member", "auth", "0123456789abcdef", "n", "--data-dir", "/d"],
                     ["admin", "audit", "--since", "1h", "--data-dir", "/d"],
                     ["admin", "status", "--data-dir", "/d"]):
            self.assertEqual(parser.parse_args(argv).data_dir, "/d", argv)
        args = parser.parse_args(["admin", "network", "list", "--url", "http://h:1",
                                  "--token", "t"])
        self.assertEqual((args.data_dir, args.url, args.token), (None, "http://h:1", "t"))
        self.assertIsNone(parser.parse_args(["admin", "network", "list"]).data_dir)

    def test_web_password_from_stdin(self) -> None:
        self.assertEqual(admin_cli._read_password(io.StringIO("a long passphrase\n")),
                         "a long passphrase")
        with self.assertRaises(admin_cli.AdminError):
            admin_cli._read_password(io.StringIO(""))

    def test_no_server(self) -> None:
        code, out = self.run_cli("--data-dir", self.mktemp(), "network", "list")
        self.assertEqual((code, out), (1, ""))

    def test_option_conflicts(self) -> None:
        for argv in (
            ["--data-dir", "/d", "--url", "http://h:1", "network", "list"],
            ["--token", "t", "network", "list"],
            ["--url", "ftp://h", "--token", "t", "network", "list"],
        ):
            self.assertEqual(self.run_cli(*argv)[0], 1)
