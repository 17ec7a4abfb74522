"""
The joined node's local API (line-delimited JSON on a UNIX socket) and the
CLI that reads it (C{twistvpn status}, C{ping}, C{netcheck}), against nodes
of the in-memory mesh.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Any

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.support.joined import Mesh
from twistvpn import cli
from twistvpn.node import local_cli
from twistvpn.node.local_api import LocalAPI, local_api_factory


class Session:
    """One connection to a node's local API, over a StringTransport."""

    def __init__(self, mesh: Mesh, api: LocalAPI) -> None:
        self.mesh = mesh
        self.protocol = local_api_factory(api).buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def ask(self, request: Any, seconds: float = 30.0) -> list[dict[str, Any]]:
        """Send C{request}; run the mesh until the node closes; every line back."""
        raw = request if isinstance(request, bytes) else json.dumps(request).encode()
        self.protocol.dataReceived(raw + b"\n")
        self.mesh.run(seconds, until=lambda: self.transport.disconnecting)
        self.assertClosed()
        return [json.loads(line) for line in self.transport.value().splitlines()]

    def assertClosed(self) -> None:
        assert self.transport.disconnecting, "the node did not close the connection"


class APITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mesh = Mesh(seed=5)
        self.a, self.b, self.c = self.mesh.members("easy", "hard", "hard")
        self.mesh.run(5)
        self.api = LocalAPI(self.a.node)

    def ask(self, request: Any, node: Any = None) -> list[dict[str, Any]]:
        api = self.api if node is None else LocalAPI(node.node)
        return Session(self.mesh, api).ask(request)

    def test_status(self) -> None:
        (answer,) = self.ask({"command": "status"})
        self.assertTrue(answer["ok"])
        status = answer["result"]
        self.assertEqual(status["node_id"], self.a.client.node_id)
        self.assertTrue(status["rendezvous_connected"])
        self.assertEqual(status["public_endpoint"], f"{self.a.host.nat.public_ip}:41641")
        self.assertEqual(status["networks"][self.mesh.network]["ip"], self.a.ip)
        peers = {p["name"]: p for p in status["peers"]}
        self.assertEqual(set(peers), {"beta", "gamma"})
        self.assertEqual(peers["beta"]["ips"], [self.b.ip])
        self.assertEqual(peers["beta"]["path"], self.a.peer(self.b).manager.kind)
        self.assertIn(peers["beta"]["path"], ("direct", "relay"))

    def test_pending_status(self) -> None:
        d = self.mesh.add("delta", self.mesh.internet.add("easy"))
        (answer,) = self.ask({"command": "status"}, node=d)
        status = answer["result"]
        self.assertEqual(status["networks"][self.mesh.network]["status"], "pending")
        self.assertEqual(status["peers"], [])

    def test_ping(self) -> None:
        self.assertTrue(self.mesh.delivered(self.a, self.b, b"x"))
        # The path stays put while it pings (easy x hard: birthday, a few seconds).
        self.assertTrue(self.mesh.run(30, until=lambda: self.a.peer(self.b).manager.kind
                                      == "direct"))
        lines = self.ask({"command": "ping", "peer": "beta", "count": 3})
        pings = [line["ping"] for line in lines[:-1]]
        self.assertEqual([p["seq"] for p in pings], [1, 2, 3])
        for p in pings:
            self.assertEqual(p["peer"], "beta")
            self.assertEqual(p["path"], self.a.peer(self.b).manager.kind)
            self.assertGreater(p["rtt"], 0)
        self.assertEqual(lines[-1], {"ok": True, "result": {
            "peer": "beta", "sent": 3, "received": 3, "direct": pings[-1]["path"] == "direct",
            "path": self.a.peer(self.b).manager.kind}})

    def test_ping_by_ip_and_until_direct(self) -> None:
        lines = self.ask({"command": "ping", "peer": self.b.ip, "count": 10,
                          "until_direct": True})
        result = lines[-1]["result"]
        self.assertTrue(result["direct"])
        self.assertEqual(lines[-2]["ping"]["path"], "direct")
        self.assertEqual(result["sent"], len(lines) - 1)

    def test_ping_relay_until_direct_gives_up(self) -> None:
        # hard x hard: only the relay; -c bounds the attempt.
        self.assertTrue(self.mesh.run(10, until=lambda: self.b.peer(self.c).manager.kind
                                      == "relay"))
        lines = self.ask({"command": "ping", "peer": "gamma", "count": 3,
                          "until_direct": True}, node=self.b)
        self.assertEqual([line["ping"]["path"] for line in lines[:-1]], ["relay"] * 3)
        self.assertEqual(lines[0]["ping"]["endpoint"], "relay:rdv")
        self.assertTrue(all(line["ping"]["rtt"] for line in lines[:-1]))
        self.assertEqual(lines[-1]["result"]["direct"], False)

    def test_ping_unknown_peer(self) -> None:
        self.assertEqual(self.ask({"command": "ping", "peer": "nobody"}),
                         [{"ok": False, "error": "no peer 'nobody'"}])

    def test_ping_timeout(self) -> None:
        # gamma's every socket (the birthday strategy's extra ones too) closes.
        for port in list(self.c.host.ports.values()):
            port.stopListening()
        lines = self.ask({"command": "ping", "peer": "gamma", "count": 2})
        self.assertEqual([line["ping"].get("error") for line in lines[:-1]],
                         ["timeout", "timeout"])
        self.assertEqual(lines[-1]["result"]["received"], 0)

    def test_netcheck(self) -> None:
        (answer,) = self.ask({"command": "netcheck"})
        report = answer["result"]
        self.assertTrue(report["udp"])
        self.assertEqual(report["public_endpoint"], f"{self.a.host.nat.public_ip}:41641")
        self.assertFalse(report["mapping_varies_by_destination"])
        self.assertEqual(len(report["rendezvous"]), 2)
        for entry in report["rendezvous"]:
            self.assertGreater(entry["rtt"], 0)
        (relay,) = report["relays"]
        self.assertEqual(relay["id"], "rdv")
        self.assertGreater(relay["rtt"], 0)

    def test_netcheck_hard_nat(self) -> None:
        (answer,) = self.ask({"command": "netcheck"}, node=self.b)
        self.assertTrue(answer["result"]["mapping_varies_by_destination"])

    def test_bad_requests(self) -> None:
        for request, error in [
            (b"not json", "the request is not JSON"),
            (b"[" * 2000 + b"]" * 2000, "the request is not JSON"),  # audit item 8d
            ([1, 2], "a request is a JSON object"),
            ({"command": "reboot"}, "unknown command 'reboot'"),
            ({"command": "ping"}, "ping needs a peer"),
            ({"command": "ping", "peer": "beta", "count": 0}, "count must be 1 to 1000"),
            ({"command": "ping", "peer": "beta", "count": True}, "count must be 1 to 1000"),
        ]:
            self.assertEqual(self.ask(request), [{"ok": False, "error": error}], request)

    def test_ping_stops_when_the_asker_leaves(self) -> None:
        pings = []
        ping_once = self.a.node.ping_once
        self.patch(self.a.node, "ping_once", lambda *a: pings.append(a) or ping_once(*a))
        session = Session(self.mesh, self.api)
        session.protocol.dataReceived(b'{"command": "ping", "peer": "beta", "count": 100}\n')
        self.mesh.run(2.5)
        self.assertEqual(len(pings), 3)
        session.protocol.connectionLost(None)
        self.mesh.run(10)
        self.assertEqual(len(pings), 4)  # the one under way when it left

    def test_request_too_long(self) -> None:
        session = Session(self.mesh, self.api)
        session.protocol.dataReceived(b"x" * 10000)
        self.assertTrue(session.transport.disconnecting)
        self.assertIn(b"request too long", session.transport.value())


class CLITests(SynchronousTestCase):
    """The commands, with the node's real answers fed to them."""

    def setUp(self) -> None:
        self.mesh = Mesh(seed=6)
        self.a, self.b = self.mesh.members("easy", "easy")
        self.mesh.run(5)
        self.requests: list[tuple[str, Any]] = []

        def request(path: str, message: Any, timeout: float = 30.0) -> Any:
            self.requests.append((path, message))
            return iter(Session(self.mesh, LocalAPI(self.a.node)).ask(message))

        self.patch(local_cli, "request", request)

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        args = cli.build_parser().parse_args(list(argv))
        out, err = io.StringIO(), io.StringIO()
        code = args.func(args, out, err)
        return code, out.getvalue(), err.getvalue()

    def test_registered(self) -> None:
        parser = cli.build_parser()
        for command in ("status", "ping", "netcheck"):
            self.assertIn(command, parser.format_help())

    def test_metrics(self) -> None:
        """twistvpn metrics: the node's Prometheus text, through its local API."""
        code, out, _ = self.run_cli("metrics", "--data-dir", "/srv/tv")
        self.assertEqual(code, 0)
        self.assertEqual(self.requests[0], ("/srv/tv/node.sock", {"command": "metrics"}))
        self.assertIn("# TYPE twistvpn_node_peer_path gauge", out)
        self.assertIn("twistvpn_node_datapath_total{", out)

    def test_status_table(self) -> None:
        code, out, _ = self.run_cli("status", "--data-dir", "/srv/tv")
        self.assertEqual(code, 0)
        self.assertEqual(self.requests[0], ("/srv/tv/node.sock", {"command": "status"}))
        lines = out.splitlines()
        self.assertIn(f"node {self.a.client.node_id}", lines[0])
        self.assertEqual(lines[2], "rendezvous connected")
        self.assertIn(f"ip {self.a.ip}", lines[3])
        domain = lines[3].rpartition("names *.")[2]
        self.assertTrue(domain.endswith(".twistvpn.internal"), lines[3])
        header = lines[5].split()
        self.assertEqual(header, ["NAME", "DNS", "IP", "PATH", "ENDPOINT", "RTT", "HANDSHAKE",
                                  "IN", "OUT"])
        row = lines[7].split()
        self.assertEqual(row[:5], ["beta", f"beta.{domain}", self.b.ip, "direct",
                                   f"{self.b.host.nat.public_ip}:41641"])
        self.assertTrue(row[5].endswith("ms"))

    def test_status_json(self) -> None:
        code, out, _ = self.run_cli("status", "--json", "--socket", "/run/x.sock")
        self.assertEqual(code, 0)
        self.assertEqual(self.requests[0][0], "/run/x.sock")
        self.assertEqual(json.loads(out)["peers"][0]["name"], "beta")

    def test_ping_output(self) -> None:
        code, out, _ = self.run_cli("ping", "beta", "-c", "2")
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertEqual(len(lines), 3)
        for line in lines[:2]:
            self.assertRegex(line, rf"^pong from beta \({self.b.ip}\) via direct "
                                   r"[0-9.]+:41641 in [0-9.]+ms$")
        self.assertEqual(lines[2], "2 sent, 2 received, path direct")

    def test_ping_until_direct_summary(self) -> None:
        code, out, _ = self.run_cli("ping", "beta", "--until-direct")
        self.assertEqual(code, 0)
        self.assertTrue(out.endswith(" received, path direct\n"), out)
        self.assertEqual(self.requests[-1][1]["count"], 10)
        summary = local_cli.render_ping_summary(
            {"sent": 3, "received": 3, "direct": False, "path": "relay"}, True)
        self.assertEqual(summary, "3 sent, 3 received, path relay\n"
                                  "no direct path yet (the path is relay)\n")

    def test_ping_json(self) -> None:
        code, out, _ = self.run_cli("ping", "beta", "-c", "1", "--json")
        self.assertEqual(code, 0)
        first, last = (json.loads(line) for line in out.splitlines())
        self.assertEqual(first["ping"]["path"], "direct")
        self.assertEqual(last["result"]["received"], 1)

    def test_ping_unknown_peer(self) -> None:
        code, out, err = self.run_cli("ping", "nobody")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "twistvpn: no peer 'nobody'\n")

    def test_ping_count_validated(self) -> None:
        self.patch(sys, "stderr", io.StringIO())
        with self.assertRaises(SystemExit):
            cli.build_parser().parse_args(["ping", "beta", "-c", "0"])

    def test_netcheck(self) -> None:
        code, out, _ = self.run_cli("netcheck")
        self.assertEqual(code, 0)
        self.assertIn("  UDP: yes\n", out)
        self.assertIn(f"  public endpoint: {self.a.host.nat.public_ip}:41641\n", out)
        self.assertIn("  mapping varies by destination: no\n", out)
        self.assertRegex(out, r"    rdv [0-9.]+:3480: [0-9.]+ms over udp\n")
        code, out, _ = self.run_cli("netcheck", "--json")
        self.assertEqual(json.loads(out)["udp"], True)

    def test_node_not_running(self) -> None:
        self.patch(local_cli, "request", _unpatched_request)
        args = argparse.Namespace(socket="/nonexistent/node.sock", data_dir="/x", json=False)
        err = io.StringIO()
        self.assertEqual(local_cli.status(args, io.StringIO(), err), 1)
        self.assertIn("cannot reach the node at /nonexistent/node.sock", err.getvalue())

    def test_error_answer(self) -> None:
        self.patch(local_cli, "request",
                   lambda path, message: iter([{"ok": False, "error": "boom"}]))
        with self.assertRaises(local_cli.LocalAPIError):
            local_cli.call("/x", {"command": "status"})
        self.patch(local_cli, "request", lambda path, message: iter([]))
        with self.assertRaises(local_cli.LocalAPIError):
            local_cli.call("/x", {"command": "status"})


_unpatched_request = local_cli.request


class Rendering(SynchronousTestCase):
    def test_units(self) -> None:
        self.assertEqual(local_cli.size(100), "100B")
        self.assertEqual(local_cli.size(2048), "2.0KiB")
        self.assertEqual(local_cli.ago(None), "never")
        self.assertEqual(local_cli.ago(5.2), "5s ago")
        self.assertEqual(local_cli.ago(600), "10m ago")
        self.assertEqual(local_cli.ms(None), "-")
        self.assertEqual(local_cli.ms(0.0123), "12.3ms")
