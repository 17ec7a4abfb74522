"""
A port-mapping gateway for the simulated NAT network: answers PCP (RFC
6887, MAP for UDP) and NAT-PMP (RFC 6886) requests, and UPnP IGD's SSDP
and SOAP (L{IGDServer}, as miniupnpd answers them), and keeps port
forwards through callbacks, which L{twistvpn.testing.natsim} keeps in its
table.
(The lab's real-kernel routers run the real miniupnpd instead:
L{twistvpn.testing.netns.sites.start_miniupnpd}.)
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from xml.etree import ElementTree

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError

GATEWAY_PORT = 5351
LOW_PORT = 1024
HIGH_PORT = 65535
Addr = tuple[str, int]


class Gateway:
    """
    The protocol logic: C{answer(data, src, now)} is the reply (or None:
    silence); forwards are made and removed through C{add} and C{remove}.
    C{protocols}: "pcp", "natpmp", both, or none (a gateway without them).
    """

    def __init__(self, public_ip: str, protocols: tuple[str, ...], *,
                 add: Callable[[int, Addr], None], remove: Callable[[int], None],
                 port_free: Callable[[int], bool], booted: float = 0.0,
                 max_lifetime: int = 86400) -> None:
        self.public_ip = public_ip
        self.protocols = protocols
        self._add = add
        self._remove = remove
        self._port_free = port_free
        self.booted = booted
        self.max_lifetime = max_lifetime  # grants are capped, as miniupnpd's max_lifetime
        self.forwards: dict[int, Addr] = {}
        self.requests: dict[str, int] = {"pcp": 0, "natpmp": 0}

    def answer(self, data: bytes, src: Addr, now: float) -> bytes | None:
        epoch = int(now - self.booted)
        if len(data) >= 2 and data[0] == 0 and "natpmp" in self.protocols:
            self.requests["natpmp"] += 1
            if data[1] == 0:
                return struct.pack(">BBHI4s", 0, 128, 0, epoch,
                                   ipaddress.IPv4Address(self.public_ip).packed)
            if data[1] == 1 and len(data) >= 12:
                internal, suggested, lifetime = struct.unpack(">HHI", data[4:12])
                lifetime = min(lifetime, self.max_lifetime)
                port = self.map(src[0], internal, suggested, lifetime)
                return struct.pack(">BBHIHHI", 0, 129, 0, epoch, internal, port, lifetime)
            return struct.pack(">BBHI", 0, 128 + data[1] % 128, 5, epoch)  # unsupported op
        if len(data) >= 60 and data[0] == 2 and data[1] == 1:
            if "pcp" not in self.protocols:
                if "natpmp" in self.protocols:  # RFC 6887 section 9: NAT-PMP only
                    return struct.pack(">BBHI", 0, 129, 1, epoch)
                return None
            self.requests["pcp"] += 1
            lifetime = min(struct.unpack(">I", data[4:8])[0], self.max_lifetime)
            nonce, protocol = data[24:36], data[36]
            internal, suggested = struct.unpack(">HH", data[40:44])
            port = self.map(src[0], internal, suggested, lifetime)
            external = ipaddress.IPv6Address(f"::ffff:{self.public_ip}").packed
            return (struct.pack(">BBBBII12x", 2, 0x81, 0, 0, lifetime, epoch) + nonce
                    + struct.pack(">B3xHH", protocol, internal, port) + external)
        return None

    def reboot(self, now: float) -> None:
        """A power cycle: every forward gone, the epoch from zero again (RFC 6886 section 3.6)."""
        for port in list(self.forwards):
            del self.forwards[port]
            self._remove(port)
        self.booted = now

    def map(self, host_ip: str, internal: int, suggested: int, lifetime: int) -> int:
        """Forward a port to C{host_ip}:C{internal}: the suggested one if free; 0 deletes."""
        for port, target in list(self.forwards.items()):
            if target == (host_ip, internal):
                if lifetime == 0:
                    del self.forwards[port]
                    self._remove(port)
                    return 0
                return port
        if lifetime == 0:
            return 0
        port = suggested
        if not (LOW_PORT <= port <= HIGH_PORT and self._port_free(port)
                and port not in self.forwards):
            port = next(p for p in range(20000, HIGH_PORT)
                        if self._port_free(p) and p not in self.forwards)
        self.forwards[port] = (host_ip, internal)
        self._add(port, (host_ip, internal))
        return port


# -- UPnP IGD, as miniupnpd answers it -------------------------------------------

IGD_SERVICE = "urn:schemas-upnp-org:service:WANIPConnection:2"
IGD_HTTP_PORT = 5000


def igd_description(service: str = IGD_SERVICE) -> bytes:
    """The shape of miniupnpd's rootDesc.xml (IGD v2), cut to what matters."""
    return f"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
<specVersion><major>1</major><minor>0</minor></specVersion>
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:2</deviceType>
<serviceList><service>
<serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
<controlURL>/ctl/L3F</controlURL></service></serviceList>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:2</deviceType>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:2</deviceType>
<serviceList><service><serviceType>{service}</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
<controlURL>/ctl/IPConn</controlURL><eventSubURL>/evt/IPConn</eventSubURL>
<SCPDURL>/WANIPCn.xml</SCPDURL></service></serviceList>
</device></deviceList></device></deviceList></device></root>""".encode()


def soap_ok(action: str, **out: str) -> bytes:
    args = "".join(f"<{k}>{v}</{k}>" for k, v in out.items())
    return ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/'
            f'envelope/"><s:Body><u:{action}Response xmlns:u="{IGD_SERVICE}">{args}'
            f"</u:{action}Response></s:Body></s:Envelope>").encode()


def soap_fault(code: int, text: str) -> bytes:
    return ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/'
            'envelope/"><s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError'
            '</faultstring><detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
            f"<errorCode>{code}</errorCode><errorDescription>{text}</errorDescription>"
            "</UPnPError></detail></s:Fault></s:Body></s:Envelope>").encode()


class IGDServer:
    """
    An in-memory UPnP IGD: C{ssdp_answer} for its SSDP port, and
    C{request} is the HTTP requester L{twistvpn.traversal.upnp.IGD} takes.
    Mappings are made and removed through C{add}/C{remove}, as the
    port-mapping gateway's are (natsim keeps them in its table).
    """

    def __init__(self, gateway_ip: str, external_ip: str, *,
                 add: Callable[[int, Addr], None] = lambda port, target: None,
                 remove: Callable[[int], None] = lambda port: None) -> None:
        self.gateway_ip = gateway_ip
        self.external_ip = external_ip
        self._add = add
        self._remove = remove
        self.location = f"http://{gateway_ip}:{IGD_HTTP_PORT}/rootDesc.xml"
        self.mappings: dict[int, tuple[str, int, int]] = {}  # port -> (client, port, lease)
        self.taken: set[int] = set()  # ports another host holds
        self.permanent_only = False
        self.down = False  # its HTTP server refuses connections
        self.calls: list[tuple[str, dict[str, str]]] = []

    def ssdp_answer(self, data: bytes) -> bytes | None:
        if not data.startswith(b"M-SEARCH * HTTP/1.1\r\n"):
            return None
        return ("HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
                "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
                "USN: uuid:d181f21e::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
                "EXT:\r\nSERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
                f"Location: {self.location}\r\n\r\n").encode()

    def request(self, method: bytes, url: str, headers: dict[str, str],
                body: bytes) -> Deferred[tuple[int, bytes]]:
        if self.down:
            return fail(ConnectionRefusedError())
        if method == b"GET" and url == self.location:
            return succeed((200, igd_description()))
        if url != f"http://{self.gateway_ip}:{IGD_HTTP_PORT}/ctl/IPConn":
            return succeed((404, b"Not Found"))
        action = headers.get("SOAPAction", "").strip('"').rpartition("#")[2]
        root = ElementTree.fromstring(body)
        call = next((e for e in root.iter() if e.tag.endswith(action)), None)
        args = {child.tag: child.text or "" for child in call} if call is not None else {}
        self.calls.append((action, args))
        return succeed(self._answer(action, args))

    def _answer(self, action: str, args: dict[str, str]) -> tuple[int, bytes]:
        if action == "GetExternalIPAddress":
            return 200, soap_ok(action, NewExternalIPAddress=self.external_ip)
        if action == "AddPortMapping":
            port, lease = int(args["NewExternalPort"]), int(args["NewLeaseDuration"])
            if self.permanent_only and lease:
                return 500, soap_fault(725, "OnlyPermanentLeasesSupported")
            if port in self.taken:
                return 500, soap_fault(718, "ConflictInMappingEntry")
            target = (args["NewInternalClient"], int(args["NewInternalPort"]))
            self.mappings[port] = (*target, lease)
            self._add(port, target)
            return 200, soap_ok(action)
        if action == "DeletePortMapping":
            port = int(args["NewExternalPort"])
            if self.mappings.pop(port, None) is None:
                return 500, soap_fault(714, "NoSuchEntryInArray")
            self._remove(port)
            return 200, soap_ok(action)
        return 500, soap_fault(401, "Invalid Action")
