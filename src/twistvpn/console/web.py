"""
The console as a Twisted Web resource: sign-in, networks, a network's
settings and member table, pre-auth keys.  Pages are GET; every change is
a POST with the session's CSRF token that calls the admin API in process
(L{AdminAPI.call}, audited as "console") and answers 303 back to the page,
with an error shown next to the field it is about.

    GET  /                          -> /networks
    GET  /signin   POST /signin     POST /signout
    GET  /networks                  POST /networks (create)
    GET  /networks/ID               POST /networks/ID (name, domain, access)
    GET  /networks/ID/members       the member table's rows (the live table polls it)
    POST /networks/ID/members/NODE  (authorized, ip, name)
    GET|POST /networks/ID/delete, /networks/ID/members/NODE/delete (confirmation)
    GET  /networks/ID/keys          POST /networks/ID/keys, /networks/ID/keys/KEY/revoke
    GET  /networks/ID/devices       POST /networks/ID/devices (name, public key)
    GET  /networks/ID/devices/NODE/config
    GET  /static/console.css, /static/console.js
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import resource
from twisted.web.server import Request
from twisted.web.template import Tag

from twistvpn.console import pages
from twistvpn.console.sessions import Session, Sessions
from twistvpn.rendezvous.admin import AdminAPI

COOKIE = b"twistvpn_console"
MAX_FORM = 16 * 1024
ACTOR = "console"
FLASH_TTL = 30.0  # seconds an error stays next to its field (the table refreshes)
CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
STATIC = {"console.css": b"text/css; charset=utf-8",
          "console.js": b"text/javascript; charset=utf-8"}


class RedirectTo(Exception):  # noqa: N818 (a control-flow signal, not an error)
    def __init__(self, location: str) -> None:
        self.location = location


class RefusedError(Exception):
    """A request the console refuses: status and a line for the person."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Console(resource.Resource):
    """The whole console as one leaf resource over the admin API."""

    isLeaf = True
    log = Logger()

    def __init__(self, api: AdminAPI, sessions: Sessions, clock: IReactorTime) -> None:
        super().__init__()
        self.api = api
        self.sessions = sessions
        self.clock = clock
        self._static = {name: resources.files(__package__).joinpath("static", name).read_bytes()
                        for name in STATIC}

    # -- plumbing -------------------------------------------------------------------------

    def render(self, request: Request) -> bytes:
        for name, value in ((b"content-security-policy", CSP),
                            (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer"),
                            (b"x-frame-options", b"DENY"),
                            (b"cache-control", b"no-store")):
            request.setHeader(name, value)
        path = [p.decode("utf-8", "replace") for p in request.postpath or []]
        if path[-1:] == [""]:
            path = path[:-1]
        method = request.method.decode("ascii", "replace")
        if path[:1] == ["static"] and len(path) == 2 and path[1] in STATIC and method == "GET":
            request.setHeader(b"content-type", STATIC[path[1]])
            return self._static[path[1]]
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        session = self.sessions.get(_cookie(request))
        try:
            if method == "POST":
                form = self._form(request, session)
                body = self._post(request, path, session, form)
            elif method in ("GET", "HEAD"):
                body = self._get(request, path, session)
            else:
                raise RefusedError(405, f"{method} is not allowed here")
        except RedirectTo as r:
            request.setResponseCode(303)
            request.setHeader(b"location", r.location.encode("utf-8"))
            return b""
        except RefusedError as e:
            request.setResponseCode(e.code)
            body = pages.page("RefusedError", session, pages.error(str(e)),
                              pages.tags.p(pages.tags.a("Back to the console", href="/")))
        return pages.render(body) if isinstance(body, Tag) else body

    def _form(self, request: Request, session: Session | None) -> dict[str, str]:
        length = request.getHeader(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_FORM):
            raise RefusedError(413, f"a form is at most {MAX_FORM} bytes")
        form = {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace")
                for k, v in (request.args or {}).items() if v}
        if session is None:
            raise RefusedError(403, "your session has ended (or there was none): sign in again")
        if not session.csrf_ok(form.get("csrf")):
            self.log.warn("console: a form without this session's CSRF token, from {addr}",
                          addr=_address(request))
            raise RefusedError(403, "the form's CSRF token is missing or wrong; reload the page")
        return form

    def _signed_in(self, session: Session | None) -> Session:
        if session is None or not session.signed_in:
            raise RedirectTo("/signin")
        return session

    def _call(self, method: str, path: list[str], body: dict[str, Any] | None = None) -> Any:
        code, result = self.api.call(method, ["api", "v1", *path], body or {}, actor=ACTOR)
        if code >= 400:
            raise ApiError(code, result["error"])
        return result

    def _flash(self, session: Session, where: str, message: str) -> None:
        session.flash[where] = message
        self.clock.callLater(FLASH_TTL, session.flash.pop, where, None)

    # -- GET --------------------------------------------------------------------------------

    def _get(self, request: Request, path: list[str], session: Session | None) -> Any:
        if path == ["signin"]:
            if not self.api_password_set():
                return pages.no_password()
            if session is None:
                session = self.sessions.new()
                _set_cookie(request, session)
            if session.signed_in:
                raise RedirectTo("/networks")
            return pages.signin(session)
        session = self._signed_in(session)
        if path in ([], ["networks"]):
            if path == []:
                raise RedirectTo("/networks")
            return pages.networks(session, self._call("GET", ["networks"]),
                                  session.flash.pop("create", None))
        if path[:1] != ["networks"] or len(path) < 2:
            raise RefusedError(404, "no such page")
        network_id = path[1]
        try:
            net = self._call("GET", ["networks", network_id])
        except ApiError as e:
            request.setResponseCode(e.code)
            return pages.not_found(session, e.message)
        rest = path[2:]
        sort, descending = _sort(request)
        now = self.clock.seconds()
        if rest == []:
            members = self._call("GET", ["networks", net["id"], "members"])
            return pages.network(session, net, members, sort, descending, now)
        if rest == ["members"]:
            members = self._call("GET", ["networks", net["id"], "members"])
            # The live table asks every second: unchanged rows cost a hash, not a render.
            version = pages.rows_version(session, net, members, sort, descending, now)
            request.setHeader(b"x-rows-version", version.encode("ascii"))
            if (request.args or {}).get(b"v", [b""])[0].decode("ascii", "replace") == version:
                request.setResponseCode(204)
                return b""
            return b"".join(pages.render(row) for row in pages.member_rows(
                session, net, members, sort, descending, now))
        if rest == ["delete"]:
            return pages.confirm(
                session, f"Delete {net['name']}?",
                f"Delete network {net['name']} ({net['id']})? Its {net['members']} member(s) "
                "lose it at once, and its pre-auth keys go with it.",
                f"/networks/{net['id']}/delete", f"/networks/{net['id']}", "Delete network")
        if rest == ["keys"]:
            return pages.keys(session, net, self._call("GET", ["networks", net["id"], "keys"]),
                              None, session.flash.pop("keys", None), now)
        if rest == ["devices"]:
            return pages.devices(session, net, self._devices(net["id"]),
                                 session.flash.pop("devices", None))
        if len(rest) == 3 and rest[0] == "devices" and rest[2] == "config":
            try:
                config = self._call("GET", ["networks", net["id"], "devices", rest[1], "config"])
            except ApiError as e:
                request.setResponseCode(e.code)
                return pages.not_found(session, e.message)
            return pages.devices(session, net, self._devices(net["id"]), None, config)
        if len(rest) == 3 and rest[0] == "members" and rest[2] == "delete":
            try:
                member = self._call("GET", ["networks", net["id"], "members", rest[1]])
            except ApiError as e:
                request.setResponseCode(e.code)
                return pages.not_found(session, e.message)
            return pages.confirm(
                session, f"Delete {member['name']}?",
                f"Delete member {member['name']} ({member['node_id']}) of {net['name']}? Its "
                "address is released; if it joins again it is a new pending member.",
                f"/networks/{net['id']}/members/{member['node_id']}/delete",
                f"/networks/{net['id']}", "Delete member")
        raise RefusedError(404, "no such page")

    def _devices(self, network_id: str) -> list[dict[str, Any]]:
        members = self._call("GET", ["networks", network_id, "members"])
        return [m for m in members if m.get("kind") == "device"]

    def api_password_set(self) -> bool:
        return self.sessions.password.is_set

    # -- POST -------------------------------------------------------------------------------

    def _post(self, request: Request, path: list[str], session: Session | None,
              form: dict[str, str]) -> Any:
        assert session is not None  # _form refused the request otherwise
        if path == ["signin"]:
            return self._signin(request, session, form)
        session = self._signed_in(session)
        if path == ["signout"]:
            self.sessions.end(session)
            _set_cookie(request, None)
            raise RedirectTo("/signin")
        if path == ["networks"]:
            body: dict[str, Any] = {"name": form.get("name", ""),
                                    "private": form.get("access") != "public"}
            if form.get("subnet", "").strip():
                body["subnet"] = form["subnet"].strip()
            try:
                created = self._call("POST", ["networks"], body)
            except ApiError as e:
                self._flash(session, "create", e.message)
                raise RedirectTo("/networks") from None
            raise RedirectTo(f"/networks/{created['id']}")
        if path[:1] != ["networks"] or len(path) < 2:
            raise RefusedError(404, "no such page")
        network_id, rest = path[1], path[2:]
        back = f"/networks/{pages.quoted(network_id)}"
        try:
            return self._network_action(session, network_id, rest, form, back)
        except ApiError as e:
            if e.code == 404:
                raise RefusedError(404, e.message) from None
            self._flash(session, "network", e.message)
            raise RedirectTo(back) from None

    def _network_action(self, session: Session, network_id: str, rest: list[str],
                        form: dict[str, str], back: str) -> Any:
        if rest == []:
            self._call("POST", ["networks", network_id], {
                "name": form.get("name", ""), "domain": form.get("domain", ""),
                "private": form.get("access") != "public"})
            raise RedirectTo(back)
        if rest == ["delete"]:
            self._call("DELETE", ["networks", network_id])
            raise RedirectTo("/networks")
        if rest == ["keys"]:
            body: dict[str, Any] = {"reusable": "reusable" in form}
            if form.get("expires_in", "").isdigit():
                body["expires_in"] = int(form["expires_in"])
            if form.get("name_prefix", "").strip():
                body["name_prefix"] = form["name_prefix"].strip()
            try:
                created = self._call("POST", ["networks", network_id, "keys"], body)
            except ApiError as e:
                self._flash(session, "keys", e.message)
                raise RedirectTo(f"{back}/keys") from None
            net = self._call("GET", ["networks", network_id])
            found = self._call("GET", ["networks", network_id, "keys"])
            # Rendered here, not redirected: the secret is never kept anywhere.
            return pages.keys(session, net, found, created["secret"], None,
                              self.clock.seconds())
        if rest == ["devices"]:
            public_key = form.get("public_key", "").strip()
            if not public_key:
                # The browser makes the key pair (console.js); without it, the
                # device's own public key is needed: the server makes none.
                self._flash(session, "devices", "give the device's public key (or let this "
                            "browser make a key pair: it needs JavaScript)")
                raise RedirectTo(f"{back}/devices")
            try:
                added = self._call("POST", ["networks", network_id, "devices"],
                                   {"name": form.get("name", "").strip(),
                                    "public_key": public_key})
            except ApiError as e:
                self._flash(session, "devices", e.message)
                raise RedirectTo(f"{back}/devices") from None
            config = self._call("GET", ["networks", network_id, "devices", added["node_id"],
                                        "config"])
            net = self._call("GET", ["networks", network_id])
            return pages.devices(session, net, self._devices(network_id), None, config)
        if len(rest) == 3 and rest[0] == "keys" and rest[2] == "revoke":
            self._call("DELETE", ["keys", rest[1]])
            raise RedirectTo(f"{back}/keys")
        if len(rest) == 3 and rest[0] == "members" and rest[2] == "delete":
            self._call("DELETE", ["networks", network_id, "members", rest[1]])
            raise RedirectTo(back)
        if len(rest) == 2 and rest[0] == "members":
            return self._member_action(session, network_id, rest[1], form, back)
        raise RefusedError(404, "no such page")

    def _member_action(self, session: Session, network_id: str, node: str,
                       form: dict[str, str], back: str) -> Any:
        """The row's form: Auth?, name and IP in one call (all of it, or none of it)."""
        body: dict[str, Any] = {"authorized": "authorized" in form}
        ip, name = form.get("ip", "").strip(), form.get("name", "").strip()
        if ip != form.get("ip_was", "") and ip:
            body["ip"] = ip
        if name != form.get("name_was", ""):
            body["name"] = name
        sort = form.get("sort", pages.DEFAULT_SORT)
        target = back + (f"?sort={sort}" if sort in pages.COLUMNS else "")
        for field in ("ip", "name"):
            session.flash.pop(f"{field}:{node}", None)
        try:
            self._call("POST", ["networks", network_id, "members", node], body)
        except ApiError as e:
            if e.code == 404:
                raise
            field = "ip" if "ip" in body else "name" if "name" in body else "ip"
            self._flash(session, f"{field}:{node}", e.message)
        raise RedirectTo(target)

    def _signin(self, request: Request, session: Session, form: dict[str, str]) -> Any:
        address = _address(request)
        if not self.api_password_set():
            return pages.no_password()
        if not self.sessions.signin_limits.allow(address):
            self.log.warn("console sign-in from {addr}: refused, too many attempts",
                          addr=address)
            raise RefusedError(429, "too many sign-in attempts from your address: wait a minute")
        if not self.sessions.password.verify(form.get("password", "")):
            self.log.warn("console sign-in from {addr}: wrong password", addr=address)
            request.setResponseCode(403)
            return pages.signin(session, "wrong password")
        self.log.info("console sign-in from {addr}", addr=address)
        signed_in = self.sessions.sign_in(session)
        _set_cookie(request, signed_in)
        raise RedirectTo("/networks")


class ApiError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _cookie(request: Request) -> str | None:
    value = request.getCookie(COOKIE)
    return value.decode("ascii", "replace") if value else None


def _set_cookie(request: Request, session: Session | None) -> None:
    request.addCookie(COOKIE, session.id if session is not None else "", path="/",
                      secure=True, httpOnly=True, sameSite="strict",
                      **({} if session is not None else {"max_age": "0"}))


def _address(request: Request) -> str:
    return str(getattr(request.getClientAddress(), "host", "?"))


def _sort(request: Request) -> tuple[str, bool]:
    args = request.args or {}
    sort = (args.get(b"sort") or [b""])[0].decode("ascii", "replace")
    return (sort if sort in pages.COLUMNS else pages.DEFAULT_SORT,
            (args.get(b"desc") or [b""])[0] == b"1")
