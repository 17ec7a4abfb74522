"""
The admin API: JSON over HTTP, in the shape of ZeroTier's controller API.

Served twice by the rendezvous: on a UNIX socket in the data directory
(mode 0600, in a 0700 directory: the file system is the access control,
so no token), and on a TCP endpoint guarded by a bearer token stored in
the data directory (for remote administration and the web console).

    GET    /api/v1/status
    GET    /api/v1/networks
    POST   /api/v1/networks                      {"name", "subnet"?, "private"?}
    GET    /api/v1/networks/ID
    DELETE /api/v1/networks/ID
    GET    /api/v1/networks/ID/members
    GET    /api/v1/networks/ID/members/NODE
    POST   /api/v1/networks/ID/members/NODE      {"authorized"?, "ip"?, "name"?}
    DELETE /api/v1/networks/ID/members/NODE
    POST   /api/v1/networks/ID                   {"name"?, "domain"?, "private"?}
    POST   /api/v1/web-password                  {"password"}

Errors are {"error": "one line"} with 400, 401, 404, 405, 409 or 413.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Callable
from typing import Any

from twisted.web import resource
from twisted.web.server import Request

from twistvpn.common import jsonin
from twistvpn.common.metrics import bearer_ok
from twistvpn.common.tls import write_private
from twistvpn.interfaces import INetworkController
from twistvpn.rendezvous.audit import AuditLog
from twistvpn.rendezvous.errors import (
    ConflictError,
    ControllerError,
    InvalidArgumentError,
    NotFoundError,
)
from twistvpn.rendezvous.files import TOKEN_FILE
from twistvpn.rendezvous.webpassword import PasswordError, WebPassword
from twistvpn.wireguard.keys import InvalidKey, decode_key

MAX_BODY = 64 * 1024


class HTTPError(Exception):
    """An error answer: status code and a one-line message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


_STATUS = {NotFoundError: 404, ConflictError: 409, InvalidArgumentError: 400}


def load_or_create_token(data_dir: str) -> str:
    """The API's bearer token, created (0600) on first use."""
    path = os.path.join(data_dir, TOKEN_FILE)
    if not os.path.exists(path):
        write_private(path, (secrets.token_urlsafe(32) + "\n").encode("ascii"))
    with open(path, encoding="ascii") as f:
        token = f.read().strip()
    if len(token) < 16:
        raise ValueError(f"{path}: the admin token is too short (16 characters at least)")
    return token


class AdminAPI(resource.Resource):
    """The whole API as one leaf resource; C{token} None means no auth."""

    isLeaf = True

    def __init__(
        self,
        controller: INetworkController,
        token: str | None,
        info: Callable[[], dict[str, Any]] = dict,
        audit: AuditLog | None = None,
        web_password: WebPassword | None = None,
    ) -> None:
        super().__init__()
        self._controller = controller
        self._token = token
        self._info = info
        # Who acts through this API: the admin socket's owner, or the token's holder.
        self._actor = "admin-socket" if token is None else "http-token"
        self._audit = audit
        self._web_password = web_password

    def render(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        try:
            self._authenticate(request)
            method = request.method.decode("ascii", "replace")
            path = [p.decode("utf-8", "replace") for p in request.postpath or []]
            if path[-1:] == [""]:
                path = path[:-1]
            body = self._body(request) if method in ("POST", "PUT") else {}
            code, result = self.call(method, path, body, _since(request))
        except HTTPError as e:
            code, result = e.code, {"error": str(e)}
        request.setResponseCode(code)
        return json.dumps(result, indent=1).encode("utf-8") + b"\n"

    def call(self, method: str, path: list[str], body: dict[str, Any],
             since: float | None = None, actor: str | None = None) -> tuple[int, Any]:
        """
        One request, already authenticated: (status, result or {"error"}).
        The web console acts through this too (as C{actor} "console"), so
        each action has one implementation and one audit record.
        """
        try:
            try:
                result = self._route(method, path, body, since)
                created = path == ["api", "v1", "networks"] or path[-1:] == ["keys"]
                code = 201 if method == "POST" and created else 200
            finally:
                if method in ("POST", "PUT", "DELETE"):
                    self._record(method, path, body, sys.exc_info()[1], actor)
        except HTTPError as e:
            return e.code, {"error": str(e)}
        except ControllerError as e:
            return next(c for cls, c in _STATUS.items() if isinstance(e, cls)), {"error": str(e)}
        except PasswordError as e:
            return 400, {"error": str(e)}
        return code, result

    def _record(self, method: str, path: list[str], body: dict[str, Any],
                error: BaseException | None, actor: str | None = None) -> None:
        """An admin action, done or refused, into the audit log (before the answer)."""
        if self._audit is None:
            return
        target = "/" + "/".join(path[2:] if path[:2] == ["api", "v1"] else path)
        result = "ok" if error is None else f"refused: {error}"[:300]
        detail = {k: "(not logged)" if k == "password" else v for k, v in body.items()}
        self._audit.record(actor or self._actor, method, target, result, detail or None)

    def _authenticate(self, request: Request) -> None:
        if not bearer_ok(request, self._token):
            raise HTTPError(401, "a valid bearer token is required")

    def _body(self, request: Request) -> dict[str, Any]:
        length = request.getHeader(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise HTTPError(413, f"the body must be at most {MAX_BODY} bytes")
        data = request.content.read(MAX_BODY + 1) if request.content else b""
        if len(data) > MAX_BODY:
            raise HTTPError(413, f"the body must be at most {MAX_BODY} bytes")
        if not data.strip():
            return {}
        try:
            body = jsonin.loads(data)
        except ValueError as e:
            raise HTTPError(400, f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        return body

    def _route(self, method: str, path: list[str], body: dict[str, Any],
               since: float | None = None) -> Any:
        c = self._controller
        if path[:2] != ["api", "v1"]:
            raise HTTPError(404, "no such resource (the API lives under /api/v1/)")
        rest = path[2:]
        routes: dict[tuple[str, int], Callable[[], Any]] = {}
        if rest == ["status"]:
            routes[("GET", 1)] = lambda: {**self._info(), **c.status()}
        elif rest == ["audit"]:
            routes[("GET", 1)] = lambda: self._read_audit(since)
        elif rest == ["web-password"]:
            routes[("POST", 1)] = lambda: self._set_web_password(body)
        elif rest == ["keys"]:
            routes[("GET", 1)] = c.list_keys
        elif rest[:1] == ["keys"] and len(rest) == 2:
            routes[("DELETE", 2)] = lambda: c.revoke_key(rest[1]) or {"revoked": rest[1]}
        elif rest[:1] == ["networks"] and rest[2:3] == ["keys"] and len(rest) == 3:
            routes[("GET", 3)] = lambda: c.list_keys(rest[1])
            routes[("POST", 3)] = lambda: c.create_key(
                rest[1],
                _field(body, "reusable", bool, False),
                _number(body, "expires_in"),
                _field(body, "name_prefix", str, None),
            )
        elif rest[:1] == ["networks"] and len(rest) == 1:
            routes[("GET", 1)] = c.list_networks
            routes[("POST", 1)] = lambda: c.create_network(
                _field(body, "name", str),
                _field(body, "subnet", str, None),
                _field(body, "private", bool, True),
                _field(body, "force", bool, False),
            )
        elif rest[:1] == ["networks"] and len(rest) == 2:
            routes[("GET", 2)] = lambda: c.get_network(rest[1])
            routes[("POST", 2)] = lambda: c.update_network(
                rest[1], _field(body, "name", str, None), _field(body, "domain", str, None),
                _field(body, "private", bool, None))
            routes[("DELETE", 2)] = lambda: c.delete_network(rest[1]) or {"deleted": rest[1]}
        elif rest[:1] == ["networks"] and rest[2:3] == ["devices"] and len(rest) == 3:
            routes[("POST", 3)] = lambda: c.add_device(
                rest[1], _field(body, "name", str), _public_key(body))
        elif (rest[:1] == ["networks"] and rest[2:3] == ["devices"] and rest[4:] == ["config"]
              and len(rest) == 5):
            routes[("GET", 5)] = lambda: c.device_config(rest[1], rest[3])
        elif rest[:1] == ["networks"] and rest[2:3] == ["members"] and len(rest) == 3:
            routes[("GET", 3)] = lambda: c.list_members(rest[1])
        elif rest[:1] == ["networks"] and rest[2:3] == ["members"] and len(rest) == 4:
            routes[("GET", 4)] = lambda: c.get_member(rest[1], rest[3])
            routes[("POST", 4)] = lambda: self._update_member(rest[1], rest[3], body)
            routes[("DELETE", 4)] = lambda: (
                c.delete_member(rest[1], rest[3]) or {"deleted": rest[3]}
            )
        else:
            raise HTTPError(404, "no such resource")
        handler = routes.get((method, len(rest)))
        if handler is None:
            raise HTTPError(405, f"{method} is not allowed here")
        return handler()

    def _read_audit(self, since: float | None) -> Any:
        if self._audit is None:
            raise HTTPError(404, "this rendezvous keeps no audit log")
        return self._audit.read(since)

    def _set_web_password(self, body: dict[str, Any]) -> Any:
        if self._web_password is None:
            raise HTTPError(404, "this rendezvous has no web console")
        self._web_password.set(_field(body, "password", str))
        return {"web_password": "set; every console session has ended"}

    def _update_member(self, network_id: str, node: str, body: dict[str, Any]) -> Any:
        """Like ZeroTier's member POST: change what the body names."""
        unknown = set(body) - {"authorized", "ip", "name"}
        if unknown:
            raise HTTPError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
        changes: dict[str, Any] = {}
        if "ip" in body:
            changes["ip"] = _field(body, "ip", str)
        if "authorized" in body:
            changes["authorized"] = _field(body, "authorized", bool)
        if "name" in body:
            changes["name"] = _field(body, "name", str)
        return self._controller.update_member(network_id, node, **changes)


_MISSING = object()


def _public_key(body: dict[str, Any]) -> bytes:
    text = _field(body, "public_key", str)
    try:
        return decode_key(text)
    except InvalidKey:
        raise HTTPError(400, "public_key: not a WireGuard public key (32 bytes, base64)") from None


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HTTPError(400, f"the field {name!r} must be a number of seconds")
    return float(value)


def _since(request: Request) -> float | None:
    """The C{since} query argument (seconds since the epoch), or None."""
    values = (getattr(request, "args", None) or {}).get(b"since")
    if not values:
        return None
    try:
        return float(values[0])
    except ValueError:
        raise HTTPError(400, "since must be a number of seconds since the epoch") from None


def _field(body: dict[str, Any], name: str, kind: type, default: Any = _MISSING) -> Any:
    value = body.get(name, default)
    if value is _MISSING:
        raise HTTPError(400, f"the field {name!r} is required")
    if value is not default and not isinstance(value, kind):
        raise HTTPError(400, f"the field {name!r} must be a {kind.__name__}")
    return value
