"""
The web console's resources, in memory through Twisted's HTTP stack on a
Clock: sign-in, sessions and their expiry, CSRF, rate limits, the pages
and every action (through the admin API, audited as "console").
"""

from __future__ import annotations

import os
import re
from html import unescape

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.rendezvous import FakeSession, new_key
from twistvpn.console import pages
from twistvpn.console.sessions import ABSOLUTE, IDLE, SIGNIN_BURST, Sessions
from twistvpn.console.web import COOKIE, Console
from twistvpn.rendezvous.admin import AdminAPI
from twistvpn.rendezvous.audit import AuditLog
from twistvpn.rendezvous.controller import Controller, node_id_of
from twistvpn.rendezvous.store import open_store
from twistvpn.rendezvous.webpassword import WebPassword
from twistvpn.testing.webclient import Response, WebClient

PASSWORD = "correct horse battery"


def csrf_of(response: Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', response.body)
    assert found is not None, response.body[:500]
    return unescape(found.group(1))


class ConsoleTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        data_dir = self.mktemp()
        os.makedirs(data_dir)
        self.controller = Controller(open_store(":memory:"), self.clock)
        self.audit = AuditLog(os.path.join(data_dir, "audit.log"), self.clock.seconds)
        self.password = WebPassword(os.path.join(data_dir, "web-password"))
        self.api = AdminAPI(self.controller, None, audit=self.audit, web_password=self.password)
        self.sessions = Sessions(self.clock, self.password)
        self.console = Console(self.api, self.sessions, self.clock)
        self.browser = WebClient(self.console, self.clock)

    def set_password(self) -> None:
        self.assertEqual(self.api.call("POST", ["api", "v1", "web-password"],
                                       {"password": PASSWORD})[0], 200)

    def sign_in(self, browser: WebClient | None = None) -> str:
        """Sign in; the session's CSRF token."""
        browser = browser or self.browser
        page = browser.get("/signin")
        answer = browser.post("/signin", {"password": PASSWORD, "csrf": csrf_of(page)})
        self.assertEqual((answer.code, answer.location), (303, "/networks"))
        return csrf_of(browser.get("/networks"))

    def member(self, network_id: str, name: str) -> str:
        _, public = new_key()
        self.controller.register_node(public, name, FakeSession(public))
        self.controller.join(public, network_id)
        return node_id_of(public)


class SignInTests(ConsoleTestCase):
    def test_no_password_set(self) -> None:
        """The console says how to set one and shows nothing else."""
        page = self.browser.get("/signin")
        self.assertIn("twistvpn admin web-password", page.body)
        self.assertNotIn('name="password"', page.body)
        self.assertEqual(self.browser.get("/networks").location, "/signin")

    def test_sign_in_and_out(self) -> None:
        self.set_password()
        page = self.browser.get("/signin")
        self.assertIn('<input type="password" name="password"', page.body)
        [cookie] = page.cookies
        for flag in ("httponly", "secure", "samesite=strict", "path=/"):
            self.assertIn(flag, cookie.lower())
        anonymous = self.browser.cookies[COOKIE.decode()]
        wrong = self.browser.post("/signin", {"password": "not it at all", "csrf": csrf_of(page)})
        self.assertEqual(wrong.code, 403)
        self.assertIn("wrong password", wrong.body)
        csrf = self.sign_in()
        # A new session ID on sign-in: no fixation.
        self.assertNotEqual(self.browser.cookies[COOKIE.decode()], anonymous)
        self.assertEqual(self.browser.get("/networks").code, 200)
        out = self.browser.post("/signout", {"csrf": csrf})
        self.assertEqual(out.location, "/signin")
        self.assertEqual(self.browser.get("/networks").location, "/signin")

    def test_headers(self) -> None:
        self.set_password()
        self.sign_in()
        page = self.browser.get("/networks")
        csp = page.header("content-security-policy") or ""
        self.assertIn("script-src 'self'", csp)
        self.assertNotIn("unsafe-inline", csp)
        self.assertEqual(page.header("cache-control"), "no-store")
        self.assertEqual(page.header("x-frame-options"), "DENY")
        script = self.browser.get("/static/console.js")
        self.assertEqual(script.header("content-type"), "text/javascript; charset=utf-8")
        self.assertIn("liveTable", script.body)
        self.assertNotIn("<script>", page.body)  # no inline script
        self.assertNotIn("style=", page.body)  # no inline style

    def test_rate_limited_per_address(self) -> None:
        self.set_password()
        page = self.browser.get("/signin")
        codes = [self.browser.post("/signin", {"password": f"wrong guess {i}",
                                               "csrf": csrf_of(page)}).code
                 for i in range(20)]
        self.assertEqual(codes, [403] * SIGNIN_BURST + [429] * (20 - SIGNIN_BURST))
        # Even the right password waits its turn...
        right = self.browser.post("/signin", {"password": PASSWORD, "csrf": csrf_of(page)})
        self.assertEqual(right.code, 429)
        # ...another address does not,
        other = WebClient(self.console, self.clock, address="198.51.100.7")
        self.sign_in(other)
        # and a minute later this one may try again.
        self.clock.advance(61)
        self.sign_in()

    def test_sessions_expire(self) -> None:
        self.set_password()
        self.sign_in()
        self.clock.advance(IDLE - 10)
        self.assertEqual(self.browser.get("/networks").code, 200)  # touched: idle restarts
        self.clock.advance(IDLE + 1)
        self.assertEqual(self.browser.get("/networks").location, "/signin")
        self.sign_in()
        for _ in range(int(ABSOLUTE // (IDLE / 2)) + 1):  # busy all along
            self.clock.advance(IDLE / 2)
            if self.browser.get("/networks").code != 200:
                break
        self.assertEqual(self.browser.get("/networks").location, "/signin")
        self.assertLessEqual(self.clock.seconds() - 1_700_000_000, IDLE * 2 + ABSOLUTE + 60)

    def test_password_change_ends_sessions(self) -> None:
        self.set_password()
        self.sign_in()
        self.api.call("POST", ["api", "v1", "web-password"], {"password": "another passphrase"})
        self.assertEqual(self.browser.get("/networks").location, "/signin")

    def test_refused_without_session_or_csrf(self) -> None:
        """No cookie, a forged or missing CSRF token: 403, and nothing changes."""
        self.set_password()
        csrf = self.sign_in()
        for form in ({"name": "evil"}, {"name": "evil", "csrf": "forged" + csrf[6:]}):
            answer = self.browser.post("/networks", form)
            self.assertEqual(answer.code, 403)
            self.assertIn("CSRF", answer.body)
        stranger = WebClient(self.console, self.clock)
        answer = stranger.post("/networks", {"name": "evil", "csrf": csrf})
        self.assertEqual(answer.code, 403)
        self.assertIn("sign in again", answer.body)
        self.assertEqual(self.controller.list_networks(), [])

    def test_oversized_form(self) -> None:
        self.set_password()
        csrf = self.sign_in()
        answer = self.browser.post("/networks", {"name": "x" * 20_000, "csrf": csrf})
        self.assertEqual(answer.code, 413)
        self.assertEqual(self.controller.list_networks(), [])


class PageTests(ConsoleTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.set_password()
        self.csrf = self.sign_in()

    def test_networks(self) -> None:
        created = self.browser.post("/networks", {"name": "lab", "access": "private",
                                                  "csrf": self.csrf})
        network_id = created.location.rsplit("/", 1)[1]  # type: ignore[union-attr]
        self.assertEqual(self.controller.get_network(network_id)["name"], "lab")
        page = self.browser.get("/networks")
        self.assertIn(f'<tr data-network-id="{network_id}">', page.body)
        # A bad subnet: the API's message on the page, nothing created.
        bad = self.browser.post("/networks", {"name": "x", "subnet": "8.8.8.0/24",
                                              "csrf": self.csrf})
        self.assertEqual(bad.location, "/networks")
        self.assertIn("private", self.browser.get("/networks").body)
        self.assertEqual(len(self.controller.list_networks()), 1)
        # Settings: rename, access, domain.
        self.browser.post(f"/networks/{network_id}", {
            "name": "the lab", "access": "public", "domain": "lab.example", "csrf": self.csrf})
        network = self.controller.get_network(network_id)
        self.assertEqual((network["name"], network["private"], network["domain"]),
                         ("the lab", False, "lab.example"))
        # Delete: a confirmation that names the network, then gone.
        confirm = self.browser.get(f"/networks/{network_id}/delete")
        self.assertIn(f"Delete network the lab ({network_id})?", confirm.body)
        self.assertEqual(self.browser.post(f"/networks/{network_id}/delete",
                                           {"csrf": self.csrf}).location, "/networks")
        self.assertEqual(self.controller.list_networks(), [])
        self.assertEqual(self.browser.get(f"/networks/{network_id}").code, 404)

    def test_member_table(self) -> None:
        network_id = self.controller.create_network("lab", "100.64.7.0/29")["id"]
        a, b, c = (self.member(network_id, name) for name in ("alpha", "bravo", "charlie"))
        self.controller.authorize(network_id, a)
        self.controller.authorize(network_id, b)
        page = self.browser.get(f"/networks/{network_id}")
        self.assertEqual(page.code, 200)
        rows = re.findall(r'<tr data-node-id="(\w+)"( class="pending")?>', page.body)
        # Pending first, and marked so.
        self.assertEqual(rows, [(c, ' class="pending"'), (a, ""), (b, "")])
        self.assertIn("1 pending", page.body)
        row_c = page.body[page.body.index(f'data-node-id="{c}"'):]
        self.assertIn('<input type="checkbox" name="authorized"', row_c)
        self.assertIn('name="ip"', row_c)

        def save(node: str, **fields: str) -> Response:
            current = self.controller.get_member(network_id, node)
            form = {"csrf": self.csrf, "ip": current["ip"] or "", "ip_was": current["ip"] or "",
                    "name": current["name"], "name_was": current["name"]}
            if current["authorized"]:
                form["authorized"] = "on"
            form.update(fields)
            return self.browser.post(f"/networks/{network_id}/members/{node}", form)

        # Auth? ticked: authorized, with the next free IP.
        self.assertEqual(save(c, authorized="on").location, f"/networks/{network_id}?sort=ip")
        self.assertEqual(self.controller.get_member(network_id, c)["ip"], "100.64.7.3")
        # A used IP: the same message as the CLI, next to the field; nothing changed.
        used = self.controller.get_member(network_id, a)["ip"]
        save(c, ip=used, name="renamed too")
        member = self.controller.get_member(network_id, c)
        self.assertEqual((member["ip"], member["name"]), ("100.64.7.3", "charlie"))
        rows = self.browser.get(f"/networks/{network_id}/members").body
        row_c = rows[rows.index(f'data-node-id="{c}"'):]
        self.assertIn(f"{used} is already used by node {a}", unescape(row_c.split("</tr>")[0]))
        # The error stays while the table refreshes, then goes.
        self.clock.advance(31)
        self.assertNotIn("already used", self.browser.get(f"/networks/{network_id}").body)
        # A free one: moved; a name: renamed.
        save(c, ip="100.64.7.6", name="Charlie's box")
        member = self.controller.get_member(network_id, c)
        self.assertEqual((member["ip"], member["name"]), ("100.64.7.6", "Charlie's box"))
        # Unticked: deauthorized (its IP kept for later).
        form = {"csrf": self.csrf, "ip": "100.64.7.6", "ip_was": "100.64.7.6",
                "name": "Charlie's box", "name_was": "Charlie's box"}
        self.browser.post(f"/networks/{network_id}/members/{c}", form)
        self.assertFalse(self.controller.get_member(network_id, c)["authorized"])
        # Delete, after a confirmation.
        self.assertIn("Delete member alpha", self.browser.get(
            f"/networks/{network_id}/members/{a}/delete").body)
        self.browser.post(f"/networks/{network_id}/members/{a}/delete", {"csrf": self.csrf})
        self.assertEqual(len(self.controller.list_members(network_id)), 2)
        # Every action in the audit log, as the console.
        actions = [(r["actor"], r["action"], r["result"]) for r in self.audit.read()
                   if r["object"].startswith("/networks")]
        self.assertEqual({a[0] for a in actions}, {"console"})
        self.assertIn(("console", "POST", f"refused: {used} is already used by node {a}"),
                      actions)

    def test_sorting(self) -> None:
        network_id = self.controller.create_network("lab")["id"]
        nodes = {name: self.member(network_id, name) for name in ("bravo", "alpha", "charlie")}
        for node in nodes.values():
            self.controller.authorize(network_id, node)
        by_name = re.findall(r'data-node-id="(\w+)"',
                             self.browser.get(f"/networks/{network_id}?sort=name").body)
        self.assertEqual(by_name, [nodes["alpha"], nodes["bravo"], nodes["charlie"]])
        descending = re.findall(r'data-node-id="(\w+)"', self.browser.get(
            f"/networks/{network_id}/members?sort=name&desc=1").body)
        self.assertEqual(descending, by_name[::-1])
        self.assertEqual(pages.sort_members([], "nonsense", False), [])

    def test_live_rows(self) -> None:
        """The table's source: a member that joins is in the next poll's rows."""
        network_id = self.controller.create_network("lab")["id"]
        page = self.browser.get(f"/networks/{network_id}")
        self.assertIn(f'data-src="/networks/{network_id}/members?sort=ip"', page.body)
        self.assertNotIn("data-node-id", self.browser.get(f"/networks/{network_id}/members").body)
        node = self.member(network_id, "newcomer")
        rows = self.browser.get(f"/networks/{network_id}/members?sort=ip")
        self.assertIn(f'<tr data-node-id="{node}" class="pending">', rows.body)
        self.assertEqual(rows.header("cache-control"), "no-store")
        # Nothing changed since: no rows, only "the same".
        version = rows.header("x-rows-version")
        same = self.browser.get(f"/networks/{network_id}/members?sort=ip&v={version}")
        self.assertEqual((same.code, same.body), (204, ""))
        self.controller.authorize(network_id, node)
        changed = self.browser.get(f"/networks/{network_id}/members?sort=ip&v={version}")
        self.assertEqual(changed.code, 200)
        self.assertNotEqual(changed.header("x-rows-version"), version)

    def test_keys(self) -> None:
        network_id = self.controller.create_network("lab")["id"]
        page = self.browser.post(f"/networks/{network_id}/keys", {
            "reusable": "on", "expires_in": "86400", "name_prefix": "ci-", "csrf": self.csrf})
        self.assertEqual(page.code, 200)
        secret = re.search(r'<pre class="secret">([^<]+)</pre>', page.body)
        assert secret is not None
        [key] = self.controller.list_keys(network_id)
        self.assertEqual((key["reusable"], key["name_prefix"]), (True, "ci-"))
        listing = self.browser.get(f"/networks/{network_id}/keys").body
        self.assertNotIn(secret.group(1), listing)  # shown once
        self.assertIn(f'data-key-id="{key["id"]}"', listing)
        self.browser.post(f"/networks/{network_id}/keys/{key['id']}/revoke", {"csrf": self.csrf})
        self.assertTrue(self.controller.list_keys(network_id)[0]["revoked"])
        self.assertNotIn(secret.group(1), self.audit.path and open(self.audit.path).read())

    def test_unknown_things(self) -> None:
        self.assertEqual(self.browser.get("/networks/ffffffffffffffff").code, 404)
        self.assertEqual(self.browser.get("/nowhere").code, 404)
        network_id = self.controller.create_network("lab")["id"]
        self.assertEqual(self.browser.get(f"/networks/{network_id}/members/0000000000/delete")
                         .code, 404)
        answer = self.browser.post(f"/networks/{network_id}/members/0000000000",
                                   {"csrf": self.csrf, "authorized": "on"})
        self.assertEqual(answer.code, 404)
        self.assertIn("unknown node", answer.body)
        self.assertEqual(self.browser.request("PUT", "/networks").code, 405)
