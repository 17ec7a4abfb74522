"""Prometheus metrics from the rendezvous, the relay and the node."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from tests.support.joined import Mesh
from tests.support.relay import World
from tests.support.rendezvous import FakeSession, new_key
from tests.support.services import parse_rendezvous as parse
from tests.support.services import start_rendezvous as start
from twistvpn.common.metrics import (
    Family,
    MetricsResource,
    WithMetrics,
    is_loopback_endpoint,
    render,
)
from twistvpn.relay.service import admin_site
from twistvpn.rendezvous.controller import node_id_of


def samples(text: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, parsed back by prometheus-client: (name, labels) -> value."""
    if isinstance(text, bytes):
        text = text.decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def get(site_resource: Any, path: bytes, token: str | None = None) -> tuple[int, bytes]:
    request = DummyRequest(path.strip(b"/").split(b"/"))
    if token is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
    body = getChildForRequest(site_resource, request).render(request)
    return request.responseCode or 200, body


class RenderTests(SynchronousTestCase):
    def test_format(self) -> None:
        text = render(lambda: [Family("twistvpn_x", "counter", "X.", ("why",)).add(3, "bad")])
        self.assertEqual(samples(text), {("twistvpn_x_total", (("why", "bad"),)): 3.0})

    def test_loopback_endpoints(self) -> None:
        self.assertTrue(is_loopback_endpoint("tcp:8444:interface=127.0.0.1"))
        self.assertTrue(is_loopback_endpoint("tcp:8444:interface=\\:\\:1"))
        self.assertFalse(is_loopback_endpoint("tcp:8444:interface=2001\\:db8\\:\\:1"))
        self.assertFalse(is_loopback_endpoint("tcp:8444"))
        self.assertFalse(is_loopback_endpoint("tcp:8444:interface=203.0.113.5"))

    def test_token(self) -> None:
        resource = MetricsResource(lambda: [], token="secret")
        self.assertEqual(get(resource, b"")[0], 401)
        self.assertEqual(get(resource, b"", token="wrong")[0], 401)
        self.assertEqual(get(resource, b"", token="secret")[0], 200)


class RendezvousMetricsTests(SynchronousTestCase):
    def test_families(self) -> None:
        service, _ = start(self, parse(self, "--public-ip", "203.0.113.5"))
        controller = service.controller
        network = controller.create_network("lab")["id"]
        keys = [new_key()[1] for _ in range(3)]
        for key in keys:
            controller.register_node(key, "n", FakeSession(key))
            controller.join(key, network)
        controller.authorize(network, node_id_of(keys[0]))
        found = samples(render(service.metrics))
        self.assertEqual(found[("twistvpn_rendezvous_nodes", (("state", "online"),))], 3)
        self.assertEqual(found[("twistvpn_rendezvous_members", (("state", "authorized"),))], 1)
        self.assertEqual(found[("twistvpn_rendezvous_members", (("state", "pending"),))], 2)
        self.assertEqual(found[("twistvpn_rendezvous_networks", ())], 1)
        self.assertEqual(found[("twistvpn_rendezvous_events_total", (("event", "joins"),))], 3)
        self.assertIn(("twistvpn_relay_sessions", (("path", "udp"), ("relay", "embedded"))),
                      found)

    def test_map_push_latency(self) -> None:
        """Seconds from a change members see to their maps' push: the coalescing delay."""
        service, reactor = start(self, parse(self))
        controller = service.controller
        network = controller.create_network("lab")["id"]
        key = new_key()[1]
        controller.register_node(key, "n", FakeSession(key))
        controller.join(key, network)
        controller.authorize(network, node_id_of(key))
        for _ in range(10):
            reactor.advance(0.01)
        found = samples(render(service.metrics))
        name = "twistvpn_rendezvous_map_push_latency_seconds"
        self.assertEqual(found[(f"{name}_count", ())], 1)
        self.assertEqual(found[(f"{name}_bucket", (("le", "0.025"),))], 0)
        self.assertEqual(found[(f"{name}_bucket", (("le", "0.05"),))], 1)

    def test_beside_the_admin_api(self) -> None:
        """/metrics next to /api/v1/..., which still routes on its full path."""
        from twistvpn.rendezvous.admin import AdminAPI

        service, _ = start(self, parse(self))
        root = WithMetrics(MetricsResource(service.metrics),
                           AdminAPI(service.controller, None, service.info))
        code, body = get(root, b"/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b"twistvpn_rendezvous_nodes", body)
        code, body = get(root, b"/api/v1/networks")
        self.assertEqual((code, body.strip()), (200, b"[]"))


class RelayMetricsTests(SynchronousTestCase):
    def test_sessions_and_drops(self) -> None:
        world = World()
        world.registered_pair()
        world.server.attach_udp(lambda data, addr: None)
        world.server.udp_received(b"\xf5\x01" + b"t" * 50, ("198.51.100.66", 1))
        code, body = get(admin_site(world.server).resource, b"/metrics")
        self.assertEqual(code, 200)
        found = samples(body)
        sessions = ("twistvpn_relay_sessions", (("path", "udp"), ("relay", "r1")))
        self.assertEqual(found[sessions], 2)
        drops = ("twistvpn_relay_drops_total", (("reason", "unknown_token"), ("relay", "r1")))
        self.assertEqual(found[drops], 1)


class NodeMetricsTests(SynchronousTestCase):
    def test_peers_and_datapath(self) -> None:
        mesh = Mesh(seed=5)
        a, b = mesh.members("easy", "easy")
        mesh.run(10, until=lambda: a.peer(b).manager.kind == "direct")
        found = samples(render(a.node.metrics))
        self.assertEqual(found[("twistvpn_node_rendezvous_connected", ())], 1)
        path = [k for k in found if k[0] == "twistvpn_node_peer_path"]
        self.assertEqual(len(path), 1)
        self.assertIn(("path", "direct"), path[0][1])
        self.assertTrue(any(k[0] == "twistvpn_node_datapath_total" for k in found))
        self.assertTrue(any(k[0] == "twistvpn_node_peer_bytes_total" for k in found))
