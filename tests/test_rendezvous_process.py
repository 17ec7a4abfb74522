"""
A real C{twistd twistvpn-rendezvous} process on loopback: the admin CLI
as documented, a node registering over pinned TLS and discovering its
endpoint over UDP, and a SIGKILL followed by a restart that loses nothing.
Every process started here is killed by its pid, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.support.ports import free_tcp_port
from tests.support.rendezvous import RecordingListener
from twistvpn import wire
from twistvpn.node.forwarder import Forwarder
from twistvpn.rendezvous.client import RendezvousClient
from twistvpn.rendezvous.controller import node_id_of
from twistvpn.rendezvous.discovery import DiscoveryClient
from twistvpn.rendezvous.files import STATE_FILE
from twistvpn.rendezvous.service import CONTROL_BACKLOG, with_backlog
from twistvpn.testing.localrun import LocalRendezvous
from twistvpn.wireguard.keys import generate_private_key

CLI = "import sys; from twistvpn.cli import main; sys.exit(main())"


class RealProcess(TestCase):
    timeout = 60

    def setUp(self) -> None:
        # short: the admin socket's path must fit in sockaddr_un
        self.tmp = tempfile.mkdtemp(prefix="tvr")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.data_dir = os.path.join(self.tmp, "data")
        self.control_port = free_tcp_port()
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.rendezvous: LocalRendezvous | None = None

    def start(self) -> dict[str, Any]:
        if self.rendezvous is None:
            log = open(os.path.join(self.tmp, "twistd.log"), "ab")
            self.addCleanup(log.close)
            self.rendezvous = LocalRendezvous(self.data_dir, self.control_port, log)
            self.addCleanup(self.rendezvous.kill)
        return self.rendezvous.start()

    @defer.inlineCallbacks
    def admin(self, *args: str, expect: int = 0) -> Any:
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-c", CLI, "admin", *args], env=self.env
        )
        self.assertEqual(code, expect, (args, out, err))
        if expect:
            self.assertEqual(err.count(b"\n"), 1, err)
            return err.decode()
        return out.decode()

    @defer.inlineCallbacks
    def wait_for(self, predicate: Any, what: str) -> Any:
        deadline = time.monotonic() + 15
        while not predicate():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_admin_and_node(self) -> Any:
        info = self.start()
        d = ("--data-dir", self.data_dir)
        net = (yield self.admin(*d, "network", "create", "office")).strip()
        self.assertEqual(len(net), 16)

        # a node registers over pinned TLS and joins
        listener = RecordingListener()
        private = generate_private_key()
        client = RendezvousClient.from_address(
            reactor, info["url"], private, "proc-node", listener, networks=[net]
        )
        client.startService()
        self.addCleanup(client.stopService)
        yield client.when_connected(fail_after_failures=3)
        yield self.wait_for(lambda: listener.of("join_status"), "the join answer")
        self.assertEqual(listener.of("join_status")[-1][2], "pending")
        node = node_id_of(client.public_key)

        # ...and discovers its endpoint from its data socket
        forwarder = Forwarder()
        port = reactor.listenUDP(0, forwarder, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        discovery = DiscoveryClient(
            forwarder,
            reactor,
            private,
            client.server_key,
            [("127.0.0.1", p) for p in info["udp_ports"]],
            epoch=client.discovery_epoch,
        )
        forwarder.register_handler(wire.DISCOVERY_RESPONSE, discovery)
        result = yield discovery.netcheck()
        mine = ("127.0.0.1", port.getHost().port)
        self.assertEqual(result.mapped, (mine, mine))
        self.assertFalse(result.varies_by_destination)

        table = yield self.admin(*d, "member", "list", net)
        header, rule, row = table.splitlines()
        self.assertEqual(
            header.split(),
            ["NODE", "NAME", "AUTHORIZED", "IP", "LAST", "SEEN", "ENDPOINT", "ONLINE"],
        )
        self.assertEqual(row.split()[:4], [node, "proc-node", "no", "-"])
        self.assertIn(f"127.0.0.1:{mine[1]}", row)
        self.assertEqual(row.split()[-1], "yes")

        out = yield self.admin(*d, "member", "auth", net, node)
        self.assertIn("authorized, IP 100.64.0.1", out)
        yield self.wait_for(lambda: listener.maps(), "the map")
        self.assertEqual(listener.maps()[-1].member(client.public_key).ip, "100.64.0.1")

        err = yield self.admin(*d, "member", "set-ip", net, node, "10.0.0.1", expect=1)
        self.assertIn("not in the network's subnet", err)
        err = yield self.admin(*d, "member", "auth", net, "0123456789", expect=1)
        self.assertIn("unknown node", err)
        err = yield self.admin(*d, "network", "create", "x", "--subnet", "300.1.0.0/24", expect=1)
        self.assertIn("bad subnet", err)

        status = json.loads((yield self.admin(*d, "status")))
        self.assertEqual(status["control"]["channel_keyed"], 1)
        self.assertEqual(status["control"]["channel_failed"], 0)

        url = f"http://127.0.0.1:{info['admin_http_port']}"
        token = os.path.join(self.data_dir, "admin-token")
        listing = yield self.admin("--url", url, "--token-file", token, "network", "list")
        self.assertIn(f"{net}  office", listing)
        err = yield self.admin(
            "--url", url, "--token", "not-the-token", "network", "list", expect=1
        )
        self.assertIn("bearer token", err)
        changed = yield self.admin(*d, "network", "set", net, "--domain", "Office.Example")
        self.assertEqual(changed, f"{net} office: domain office.example\n")
        err = yield self.admin(*d, "network", "set", net, "--domain", "a..b", expect=1)
        self.assertIn("is not a DNS label", err)
        self.assertIn("office.example", (yield self.admin(*d, "network", "list")))

        # kill -9 and restart: nothing lost, and the node comes back by itself
        self.rendezvous.kill(signal.SIGKILL)
        yield self.wait_for(lambda: not client.connected, "the node to notice")
        self.start()
        yield client.when_connected()
        yield self.wait_for(lambda: len(listener.maps()) >= 2, "the map after the restart")
        self.assertEqual(listener.maps()[-1].member(client.public_key).ip, "100.64.0.1")
        table = yield self.admin(*d, "member", "list", net)
        row = table.splitlines()[2].split()
        self.assertEqual(row[:4], [node, "proc-node", "yes", "100.64.0.1"])

        yield self.admin(*d, "member", "deauth", net, node)
        yield self.wait_for(lambda: listener.of("revoked"), "the revocation")
        yield self.admin(*d, "network", "delete", net)
        self.assertEqual((yield self.admin(*d, "network", "list")).splitlines()[2:], [])
        # a clean stop removes the state file (twistd re-raises the signal
        # once it has shut down, so the status is "killed by SIGTERM")
        self.assertEqual(self.rendezvous.kill(signal.SIGTERM), -signal.SIGTERM)
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, STATE_FILE)))


class Backlog(SynchronousTestCase):
    """The control port queues a fail-over's herd instead of dropping its SYNs."""

    def test_added_unless_given(self) -> None:
        self.assertEqual(with_backlog("tcp:8443"), f"tcp:8443:backlog={CONTROL_BACKLOG}")
        self.assertEqual(with_backlog("tcp6:port=8443:interface=\\:\\:1"),
                         f"tcp6:port=8443:interface=\\:\\:1:backlog={CONTROL_BACKLOG}")
        self.assertEqual(with_backlog("tcp:8443:backlog=10"), "tcp:8443:backlog=10")
        self.assertEqual(with_backlog("unix:/run/x.sock"), "unix:/run/x.sock")

    def test_real_listener(self) -> None:
        """The kernel's queue of the listening socket (what ss shows as Send-Q)."""
        if shutil.which("ss") is None:
            raise SkipTest("ss (iproute2) is not installed")
        tmp = tempfile.mkdtemp(prefix="tvb")
        self.addCleanup(shutil.rmtree, tmp, True)
        rendezvous = LocalRendezvous(os.path.join(tmp, "data"), free_tcp_port())
        self.addCleanup(rendezvous.kill)
        rendezvous.start()
        out = subprocess.run(["ss", "-ltnH", f"sport = :{rendezvous.control_port}"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        self.assertEqual(out.split()[2], str(CONTROL_BACKLOG), out)


class PortInUse(TestCase):
    """A port another program holds: one line naming the option, exit 1, no traceback."""

    timeout = 60

    def test_control_port_in_use(self) -> None:
        tmp = tempfile.mkdtemp(prefix="tvr")
        self.addCleanup(shutil.rmtree, tmp, True)
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        self.addCleanup(holder.close)
        port = holder.getsockname()[1]
        script = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
        done = subprocess.run(
            [sys.executable, "-c", script, "-n", "--pidfile=", "twistvpn-rendezvous",
             "--data-dir", os.path.join(tmp, "d"), "--hostname", "127.0.0.1",
             "--control", f"tcp:{port}:interface=127.0.0.1", "--udp-port", "0",
             "--udp-port2", "0", "--no-relay", "--admin-http", "none", "--web", ""],
            capture_output=True, text=True, timeout=50, cwd=tmp)
        self.assertEqual(done.returncode, 1)
        output = done.stdout + done.stderr
        self.assertNotIn("Traceback", output)
        [line] = [line for line in output.splitlines() if "cannot listen" in line]
        self.assertIn(f"cannot listen for --control: Couldn't listen on 127.0.0.1:{port}", line)


class Logs(TestCase):
    """What the rendezvous writes to its log: the ready line without the noise, or JSON."""

    timeout = 60

    def run_rendezvous(self, *extra: str) -> str:
        tmp = tempfile.mkdtemp(prefix="tvr")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "twistd.log")
        with open(path, "ab") as log:
            rendezvous = LocalRendezvous(os.path.join(tmp, "data"), free_tcp_port(), log,
                                         extra_args=extra)
            self.addCleanup(rendezvous.kill)
            rendezvous.start()
            rendezvous.kill(signal.SIGTERM)
        with open(path) as f:
            return f.read()

    def test_no_factory_noise(self) -> None:
        text = self.run_rendezvous()
        self.assertIn("twistvpn rendezvous ready", text)
        self.assertNotIn("Starting factory", text)
        self.assertNotIn("Starting protocol", text)

    def test_json(self) -> None:
        lines = self.run_rendezvous("--log-format", "json").splitlines()
        events = [json.loads(line) for line in lines]  # every line is one JSON object
        ready = [e for e in events if "rendezvous ready" in e.get("log_format", "")]
        self.assertEqual(len(ready), 1)
        self.assertTrue(ready[0]["url"].startswith("twistvpn://127.0.0.1:"))
