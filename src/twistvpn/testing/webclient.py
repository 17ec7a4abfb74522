"""
A twisted.web resource driven in memory through the real HTTP stack (a
C{Site} and its C{HTTPChannel} over a C{StringTransport}, on a C{Clock}),
with a cookie jar: what a browser sends, what the server answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlencode

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Site


@dataclass
class Response:
    code: int
    headers: dict[str, list[str]]
    body: str
    cookies: list[str] = field(default_factory=list)  # Set-Cookie lines

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def location(self) -> str | None:
        return self.header("location")


class WebClient:
    """One browser: its cookies, its address."""

    def __init__(self, resource: Resource, clock: Clock, address: str = "127.0.0.1") -> None:
        self.site = Site(resource, reactor=clock)
        self.clock = clock
        self.address = address
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict[str, str] | None = None,
                raw_body: bytes | None = None, headers: dict[str, str] | None = None) -> Response:
        peer = IPv4Address("TCP", self.address, 40000)
        channel: Any = self.site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        channel.makeConnection(transport)
        body = raw_body if raw_body is not None else (
            urlencode(form).encode() if form is not None else b"")
        lines = [f"{method} {path} HTTP/1.1", "Host: console.test", "Connection: close",
                 f"Content-Length: {len(body)}"]
        if form is not None:
            lines.append("Content-Type: application/x-www-form-urlencoded")
        if self.cookies:
            lines.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        response = _parse(transport.value())
        channel.connectionLost(None)
        for line in response.cookies:
            cookie = SimpleCookie()
            cookie.load(line)
            for name, morsel in cookie.items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return response

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post(self, path: str, form: dict[str, str]) -> Response:
        return self.request("POST", path, form)


def _parse(data: bytes) -> Response:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *header_lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if "chunked" in (headers.get("transfer-encoding") or [""])[0]:
        decoded, rest = b"", body
        while rest:
            size_text, _, rest = rest.partition(b"\r\n")
            size = int(size_text, 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2:]
        body = decoded
    return Response(int(status.split()[1]), headers, body.decode("utf-8", "replace"),
                    headers.get("set-cookie", []))
