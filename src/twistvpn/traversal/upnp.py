"""
UPnP IGD port mapping: find the gateway's Internet Gateway Device with an
SSDP search (UDP, answered from port 1900), read its description for the
WANIPConnection (or WANPPPConnection) control URL, and call
C{GetExternalIPAddress}, C{AddPortMapping} and C{DeletePortMapping} there
with SOAP over HTTP.

The codecs are plain functions; L{IGD} is a plain object that takes its
HTTP requests from outside (L{agent_requester} makes them with
C{twisted.web}'s Agent), so the flow is tested without a network and the
node drives it from L{twistvpn.traversal.portmap.PortMapper}.  Every
answer is checked: malformed SSDP, descriptions and SOAP raise
L{UPnPError}, which the mapper counts and drops.

(The maintained C library, miniupnpc, has a blocking Python module that
needs a compiler to install; this is the small Twisted client the issue
allows instead, tested against the real miniupnpd in the lab.)
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

SSDP_PORT = 1900
SSDP_GROUP = "239.255.255.250"
SEARCH_TARGET = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
SERVICES = ("urn:schemas-upnp-org:service:WANIPConnection:2",
            "urn:schemas-upnp-org:service:WANIPConnection:1",
            "urn:schemas-upnp-org:service:WANPPPConnection:1")
MAX_BODY = 65536  # a description or SOAP answer larger than this is not a router's
HTTP_TIMEOUT = 3.0
CONFLICT = 718  # ConflictInMappingEntry: the external port is another's
ONLY_PERMANENT = 725  # OnlyPermanentLeasesSupported: ask with lease 0
PORT_TRIES = 3

Requester = Callable[[bytes, str, dict[str, str], bytes], "Deferred[tuple[int, bytes]]"]


class UPnPError(ValueError):
    """An SSDP, description or SOAP answer that is not one we can use."""


class SOAPFaultError(UPnPError):
    """The gateway refused an action: its UPnP error code and description."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"UPnP error {code} ({description})")
        self.code = code


def search_request(target: str = SEARCH_TARGET) -> bytes:
    return ("M-SEARCH * HTTP/1.1\r\n"
            f"HOST: {SSDP_GROUP}:{SSDP_PORT}\r\n"
            'MAN: "ssdp:discover"\r\n'
            "MX: 1\r\n"
            f"ST: {target}\r\n\r\n").encode("ascii")


def search_answer(data: bytes, gateway: str) -> str:
    """The description URL from an SSDP answer, which must point at C{gateway}."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise UPnPError("SSDP answer is not ASCII") from None
    lines = text.split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "200":
        raise UPnPError(f"SSDP answer status {lines[0][:40]!r}")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    location = headers.get("location")
    if not location:
        raise UPnPError("SSDP answer without LOCATION")
    check_url(location, gateway)
    return location


def check_url(url: str, gateway: str) -> None:
    """Only plain HTTP on the gateway itself: an answer must not send us elsewhere."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise UPnPError(f"bad URL {url[:80]!r}") from None
    if parts.scheme != "http" or host != gateway or port == 0:
        raise UPnPError(f"URL {url[:80]!r} is not http on the gateway {gateway}")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse(body: bytes) -> ElementTree.Element:
    if len(body) > MAX_BODY:
        raise UPnPError("answer too large")
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise UPnPError("answer with a DTD")  # no entity expansion from a LAN device
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError as e:
        raise UPnPError(f"not XML: {e}") from None


def control_url(description: bytes, location: str, gateway: str) -> tuple[str, str]:
    """The WAN connection service's (control URL, service type), best version first."""
    root = _parse(description)
    base = location
    found: dict[str, str] = {}
    for element in root.iter():
        tag = _local(element.tag)
        if tag == "URLBase" and element.text:
            base = element.text.strip()
        elif tag == "service":
            fields = {_local(child.tag): (child.text or "").strip() for child in element}
            kind, url = fields.get("serviceType", ""), fields.get("controlURL", "")
            if kind in SERVICES and url:
                found.setdefault(kind, url)
    for kind in SERVICES:
        if kind in found:
            url = urljoin(base, found[kind])
            check_url(url, gateway)
            return url, kind
    raise UPnPError("no WANIPConnection or WANPPPConnection service")


def soap_request(service: str, action: str,
                 arguments: list[tuple[str, str]]) -> tuple[dict[str, str], bytes]:
    body = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in arguments)
    envelope = ('<?xml version="1.0"?>\r\n'
                '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
                's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
                f'<s:Body><u:{action} xmlns:u="{service}">{body}</u:{action}>'
                "</s:Body></s:Envelope>\r\n")
    headers = {"Content-Type": 'text/xml; charset="utf-8"',
               "SOAPAction": f'"{service}#{action}"'}
    return headers, envelope.encode("utf-8")


def soap_answer(status: int, body: bytes, action: str) -> dict[str, str]:
    """The answer's out-arguments, or L{SOAPFaultError} with the gateway's error code."""
    root = _parse(body)
    for element in root.iter():
        if _local(element.tag) == "UPnPError":
            fields = {_local(child.tag): (child.text or "").strip() for child in element}
            try:
                code = int(fields.get("errorCode", ""))
            except ValueError:
                raise UPnPError("UPnPError without a numeric errorCode") from None
            raise SOAPFaultError(code, fields.get("errorDescription", "")[:80])
        if _local(element.tag) == f"{action}Response":
            if status != 200:
                raise UPnPError(f"HTTP {status} with an answer")
            return {_local(child.tag): (child.text or "").strip() for child in element}
    raise UPnPError(f"no {action}Response (HTTP {status})")


class IGD:
    """
    One gateway's IGD: C{discover(location)} reads its description; then
    C{add(port, lifetime)} maps our UDP port and fires with
    C{(external_ip, external_port, lifetime)}; C{delete()} removes it.
    """

    def __init__(self, request: Requester, *, gateway: str, client_ip: str,
                 internal_port: int, description: str = "twistvpn",
                 choose_port: Callable[[], int] = lambda: random.randint(1024, 65535)) -> None:
        self._request = request
        self.gateway = gateway
        self.client_ip = client_ip
        self.internal_port = internal_port
        self.description = description
        self._choose_port = choose_port
        self.control: tuple[str, str] | None = None  # (URL, service type)
        self.external_port: int | None = None

    def discover(self, location: str) -> Deferred[None]:
        check_url(location, self.gateway)
        d = self._request(b"GET", location, {}, b"")

        def described(answer: tuple[int, bytes]) -> None:
            status, body = answer
            if status != 200:
                raise UPnPError(f"description: HTTP {status}")
            self.control = control_url(body, location, self.gateway)

        return d.addCallback(described)

    def _call(self, action: str, arguments: list[tuple[str, str]]) -> Deferred[dict[str, str]]:
        if self.control is None:
            raise UPnPError("no IGD discovered")
        url, service = self.control
        headers, body = soap_request(service, action, arguments)
        d = self._request(b"POST", url, headers, body)
        return d.addCallback(lambda answer: soap_answer(answer[0], answer[1], action))

    def add(self, port: int, lifetime: int) -> Deferred[tuple[str, int, int]]:
        result: Deferred[tuple[str, int, int]] = Deferred()
        external_ip: list[str] = []

        def address(out: dict[str, str]) -> None:
            try:
                ip = ipaddress.IPv4Address(out.get("NewExternalIPAddress", ""))
            except ValueError:
                raise UPnPError("GetExternalIPAddress: no IPv4 address") from None
            if ip.is_unspecified:
                raise UPnPError("GetExternalIPAddress: 0.0.0.0 (not connected)")
            external_ip.append(str(ip))
            attempt(port, lifetime, 0)

        def attempt(external: int, lease: int, tries: int) -> None:
            d = self._call("AddPortMapping", [
                ("NewRemoteHost", ""), ("NewExternalPort", str(external)),
                ("NewProtocol", "UDP"), ("NewInternalPort", str(self.internal_port)),
                ("NewInternalClient", self.client_ip), ("NewEnabled", "1"),
                ("NewPortMappingDescription", self.description),
                ("NewLeaseDuration", str(lease))])

            def added(_: dict[str, str]) -> None:
                self.external_port = external
                result.callback((external_ip[0], external, lease))

            def refused(failure: Failure) -> Failure | None:
                fault = failure.check(SOAPFaultError) and failure.value
                if isinstance(fault, SOAPFaultError) and tries + 1 < PORT_TRIES:
                    if fault.code == CONFLICT:
                        attempt(self._choose_port(), lease, tries + 1)
                        return None
                    if fault.code == ONLY_PERMANENT and lease:
                        attempt(external, 0, tries + 1)
                        return None
                result.errback(failure)
                return None

            d.addCallbacks(added, refused)

        started = self._call("GetExternalIPAddress", []).addCallback(address)
        started.addErrback(result.errback)
        return result

    def delete(self) -> Deferred[Any] | None:
        if self.external_port is None or self.control is None:
            return None
        port, self.external_port = self.external_port, None
        return self._call("DeletePortMapping", [
            ("NewRemoteHost", ""), ("NewExternalPort", str(port)), ("NewProtocol", "UDP")])


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written at once (no cooperator, no global reactor)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Body(Protocol):
    """Collects a response body up to L{MAX_BODY}, then gives up on it."""

    def __init__(self, status: int, done: Deferred[tuple[int, bytes]]) -> None:
        self.status = status
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_BODY:
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if self.size > MAX_BODY:
            self.done.errback(UPnPError("answer too large"))
        else:
            self.done.callback((self.status, b"".join(self.parts)))


def agent_requester(reactor: Any, timeout: float = HTTP_TIMEOUT) -> Requester:
    """HTTP for L{IGD} through C{twisted.web}'s Agent, each request bounded in time."""
    agent = Agent(reactor, connectTimeout=timeout)
    clock: IReactorTime = reactor

    def request(method: bytes, url: str, headers: dict[str, str],
                body: bytes) -> Deferred[tuple[int, bytes]]:
        producer = BytesProducer(body) if body else None
        header_list = Headers({k.encode(): [v.encode()] for k, v in headers.items()})
        d = agent.request(method, url.encode("ascii"), header_list, producer)

        def read(response: Any) -> Deferred[tuple[int, bytes]]:
            done: Deferred[tuple[int, bytes]] = Deferred()
            response.deliverBody(_Body(response.code, done))
            return done

        answered: Deferred[tuple[int, bytes]] = d.addCallback(read)  # type: ignore[assignment]
        return answered.addTimeout(timeout, clock)

    return request
