"""
UPnP IGD port mapping: the SSDP, description and SOAP codecs against what
miniupnpd sends, the IGD flow (conflicts, lease-less gateways, refusals)
against an in-memory IGD, the mapper driving it on a Clock after PCP and
NAT-PMP stayed silent, and malformed answers dropped and counted.  The
real miniupnpd is in tests/test_integration_nat.py.
"""

from __future__ import annotations

from typing import Any
from xml.etree import ElementTree

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IBodyProducer
from zope.interface.verify import verifyObject

from twistvpn.testing.pmpgateway import (
    IGD_SERVICE,
    IGDServer,
    igd_description,
    soap_fault,
    soap_ok,
)
from twistvpn.testing.stunserver import MAGIC_COOKIE, binding_answer
from twistvpn.traversal import upnp
from twistvpn.traversal.portmap import (
    GATEWAY_PORT,
    NATPMP,
    PCP,
    TRIES,
    UPNP,
    PortMapper,
)
from twistvpn.traversal.upnp import (
    IGD,
    SSDP_GROUP,
    SSDP_PORT,
    BytesProducer,
    SOAPFaultError,
    UPnPError,
)

GATEWAY = "192.168.1.1"
CLIENT = "192.168.1.2"
PUBLIC = "203.0.113.40"
LOCATION = f"http://{GATEWAY}:5000/rootDesc.xml"
SERVICE = IGD_SERVICE

DESCRIPTION = igd_description()
SSDP_ANSWER = IGDServer(GATEWAY, PUBLIC).ssdp_answer(upnp.search_request()) or b""


class CodecTests(SynchronousTestCase):
    def test_search_request(self) -> None:
        text = upnp.search_request().decode()
        self.assertTrue(text.startswith("M-SEARCH * HTTP/1.1\r\n"))
        self.assertIn(f"HOST: {SSDP_GROUP}:{SSDP_PORT}\r\n", text)
        self.assertIn('MAN: "ssdp:discover"\r\n', text)
        self.assertIn("ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n", text)
        self.assertTrue(text.endswith("\r\n\r\n"))

    def test_search_answer(self) -> None:
        self.assertEqual(upnp.search_answer(SSDP_ANSWER, GATEWAY), LOCATION)

    def test_bad_search_answers(self) -> None:
        for data in (b"", b"\xff\xfe", b"NOTIFY * HTTP/1.1\r\n\r\n",
                     b"HTTP/1.1 404 Not Found\r\nLOCATION: " + LOCATION.encode() + b"\r\n\r\n",
                     b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n",
                     SSDP_ANSWER.replace(GATEWAY.encode(), b"198.51.100.9"),
                     SSDP_ANSWER.replace(b"http://", b"https://"),
                     SSDP_ANSWER.replace(b":5000", b":99999")):
            with self.assertRaises(UPnPError, msg=repr(data)):
                upnp.search_answer(data, GATEWAY)

    def test_control_url(self) -> None:
        self.assertEqual(upnp.control_url(DESCRIPTION, LOCATION, GATEWAY),
                         (f"http://{GATEWAY}:5000/ctl/IPConn", SERVICE))

    def test_control_url_base_and_ppp(self) -> None:
        description = DESCRIPTION.replace(SERVICE.encode(),
                                          b"urn:schemas-upnp-org:service:WANPPPConnection:1")
        description = description.replace(
            b"<specVersion>", f"<URLBase>http://{GATEWAY}:6000/</URLBase><specVersion>".encode())
        self.assertEqual(upnp.control_url(description, LOCATION, GATEWAY),
                         (f"http://{GATEWAY}:6000/ctl/IPConn",
                          "urn:schemas-upnp-org:service:WANPPPConnection:1"))

    def test_bad_descriptions(self) -> None:
        elsewhere = DESCRIPTION.replace(b"/ctl/IPConn", b"http://198.51.100.9/ctl")
        for description in (b"not xml", b"<root/>", DESCRIPTION[:200],
                            b'<!DOCTYPE r [<!ENTITY a "aaaa">]><root>&a;</root>',
                            b"<root>" + b" " * upnp.MAX_BODY + b"</root>", elsewhere):
            with self.assertRaises(UPnPError):
                upnp.control_url(description, LOCATION, GATEWAY)

    def test_soap_request(self) -> None:
        headers, body = upnp.soap_request(SERVICE, "AddPortMapping",
                                          [("NewPortMappingDescription", "a<b&c")])
        self.assertEqual(headers["SOAPAction"], f'"{SERVICE}#AddPortMapping"')
        self.assertIn(b"<NewPortMappingDescription>a&lt;b&amp;c</NewPortMappingDescription>",
                      body)
        ElementTree.fromstring(body)  # well-formed

    def test_soap_answers(self) -> None:
        self.assertEqual(
            upnp.soap_answer(200, soap_ok("GetExternalIPAddress", NewExternalIPAddress=PUBLIC),
                             "GetExternalIPAddress"),
            {"NewExternalIPAddress": PUBLIC})
        with self.assertRaises(SOAPFaultError) as caught:
            upnp.soap_answer(500, soap_fault(718, "ConflictInMappingEntry"), "AddPortMapping")
        self.assertEqual(caught.exception.code, 718)
        for status, body in ((200, soap_ok("Other")), (500, soap_ok("AddPortMapping")),
                             (500, soap_fault(0, "x").replace(b">0<", b">zero<")),
                             (200, b"<s:Envelope")):
            with self.assertRaises(UPnPError):
                upnp.soap_answer(status, body, "AddPortMapping")

    def test_body_producer(self) -> None:
        producer = BytesProducer(b"body")
        self.assertTrue(verifyObject(IBodyProducer, producer))
        written: list[bytes] = []

        class Consumer:
            write = written.append

        self.assertIsNone(self.successResultOf(producer.startProducing(Consumer())))
        self.assertEqual((written, producer.length), ([b"body"], 4))

    def test_stun_answer(self) -> None:
        """The lab's STUN responder (for miniupnpd) reports the asker's address."""
        request = bytes.fromhex("00010008") + MAGIC_COOKIE.to_bytes(4, "big") + b"t" * 12
        answer = binding_answer(request + bytes(8), ("203.0.113.21", 40000))
        assert answer is not None
        self.assertEqual(answer[:2], b"\x01\x01")
        self.assertEqual(answer[8:20], b"t" * 12)
        port = int.from_bytes(answer[26:28], "big") ^ (MAGIC_COOKIE >> 16)
        ip = int.from_bytes(answer[28:32], "big") ^ MAGIC_COOKIE
        self.assertEqual((port, ip), (40000, 0xCB007115))
        self.assertIsNone(binding_answer(b"short", ("203.0.113.21", 1)))
        self.assertIsNone(binding_answer(bytes(20), ("203.0.113.21", 1)))


class IGDTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = IGDServer(GATEWAY, PUBLIC)
        self.ports = iter([30001, 30002, 30003])
        self.igd = IGD(self.server.request, gateway=GATEWAY, client_ip=CLIENT, internal_port=41641,
                       choose_port=lambda: next(self.ports))
        self.successResultOf(self.igd.discover(LOCATION))

    def test_add_and_delete(self) -> None:
        self.assertEqual(self.successResultOf(self.igd.add(41641, 7200)),
                         (PUBLIC, 41641, 7200))
        self.assertEqual(self.server.mappings, {41641: (CLIENT, 41641, 7200)})
        self.successResultOf(self.igd.delete())
        self.assertEqual(self.server.mappings, {})
        self.assertIsNone(self.igd.delete())  # nothing left to delete

    def test_conflict_takes_another_port(self) -> None:
        self.server.taken = {41641, 30001}
        self.assertEqual(self.successResultOf(self.igd.add(41641, 7200)), (PUBLIC, 30002, 7200))

    def test_conflicts_everywhere(self) -> None:
        self.server.taken = {41641, 30001, 30002}
        failure = self.failureResultOf(self.igd.add(41641, 7200), SOAPFaultError)
        self.assertEqual(failure.value.code, 718)

    def test_permanent_leases_only(self) -> None:
        self.server.permanent_only = True
        self.assertEqual(self.successResultOf(self.igd.add(41641, 7200)), (PUBLIC, 41641, 0))

    def test_not_connected(self) -> None:
        self.server.external_ip = "0.0.0.0"
        self.failureResultOf(self.igd.add(41641, 7200), UPnPError)
        self.server.external_ip = "not an address"
        self.failureResultOf(self.igd.add(41641, 7200), UPnPError)
        self.assertEqual(self.server.mappings, {})

    def test_discover_elsewhere_refused(self) -> None:
        with self.assertRaises(UPnPError):
            self.igd.discover("http://198.51.100.9/rootDesc.xml")


class Recorder:
    """What the mapper sends, by destination."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def __call__(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


class MapperWithUPnPTests(SynchronousTestCase):
    """The mapper on a Clock: PCP and NAT-PMP silent, then UPnP."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = IGDServer(GATEWAY, PUBLIC)
        self.sent = Recorder()
        self.changes: list[Any] = []
        igd = IGD(self.server.request, gateway=GATEWAY, client_ip=CLIENT, internal_port=41641)
        self.mapper = PortMapper(self.clock, self.sent, gateway=GATEWAY, client_ip=CLIENT,
                                 internal_port=41641, on_change=self.changes.append,
                                 lifetime=600, igd=igd)
        self.mapper.start()
        self.clock.pump([w for _ in (PCP, NATPMP) for w in TRIES])  # both silent

    def search(self) -> None:
        self.mapper.datagram_received(SSDP_ANSWER, (GATEWAY, SSDP_PORT))

    def test_mapped_after_silence(self) -> None:
        searches = [addr for data, addr in self.sent.sent if data.startswith(b"M-SEARCH")]
        self.assertEqual(searches, [(GATEWAY, SSDP_PORT), (SSDP_GROUP, SSDP_PORT)])
        self.search()
        self.assertEqual(self.changes, [(PUBLIC, 41641)])
        self.assertEqual(self.mapper.status(), {
            "gateway": GATEWAY, "offered": {PCP: False, NATPMP: False, UPNP: True},
            "protocol": UPNP, "mapped": f"{PUBLIC}:41641"})
        self.search()  # the SSDP group's copy of the answer
        self.assertEqual(self.mapper.counters["drop_unexpected"], 1)

    def test_renewed_and_deleted(self) -> None:
        self.search()
        before = len(self.sent.sent)
        self.clock.advance(300)  # half the lease: search again, add again
        self.assertEqual(len(self.sent.sent), before + 2)
        self.search()
        adds = [args for action, args in self.server.calls if action == "AddPortMapping"]
        self.assertEqual(len(adds), 2)
        self.assertEqual(self.changes, [(PUBLIC, 41641)])  # no flap
        deleted = self.mapper.stop()
        assert deleted is not None
        self.successResultOf(deleted)
        self.assertEqual(self.server.mappings, {})
        self.assertEqual(self.changes, [(PUBLIC, 41641), None])

    def test_gateway_http_down(self) -> None:
        self.server.down = True
        self.search()
        self.assertEqual(self.changes, [])
        self.assertEqual(self.mapper.counters["upnp_silent"], 1)
        self.assertEqual(self.mapper.counters["gave_up"], 1)

    def test_refused(self) -> None:
        self.server.taken = set(range(1024, 65536))
        self.search()
        self.assertEqual(self.mapper.counters["upnp_refused"], 1)
        self.assertEqual(self.changes, [])

    def test_malformed_answers(self) -> None:
        for data in (b"", b"garbage", SSDP_ANSWER.replace(GATEWAY.encode(), b"198.51.100.9"),
                     b"HTTP/1.1 200 OK\r\n\r\n"):
            self.mapper.datagram_received(data, (GATEWAY, SSDP_PORT))
        self.assertEqual(self.mapper.counters["drop_malformed"], 4)
        self.mapper.datagram_received(SSDP_ANSWER, ("192.168.1.77", SSDP_PORT))
        self.assertEqual(self.mapper.counters["drop_not_gateway"], 1)
        self.assertEqual(self.changes, [])
        self.search()  # still works
        self.assertEqual(self.changes, [(PUBLIC, 41641)])

    def test_without_igd_upnp_not_asked(self) -> None:
        mapper = PortMapper(self.clock, self.sent, gateway=GATEWAY, client_ip=CLIENT,
                            internal_port=41641, protocols=(UPNP,))
        self.assertEqual(mapper.protocols, [])

    def test_gateway_port_unchanged(self) -> None:
        self.assertTrue(all(addr[1] in (GATEWAY_PORT, SSDP_PORT) for _, addr in self.sent.sent))
