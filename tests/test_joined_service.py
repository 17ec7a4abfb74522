"""
The joined-mode node service and its twistd options: what it opens on
start, what it removes on stop, the data directory and key, and every
option's one-line error.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import succeed
from twisted.names.test.test_util import MemoryReactor
from twisted.python import usage
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from tests.support.fakes import FakeWireGuardDevice
from tests.support.rendezvous import MemoryEndpoint, World
from twistvpn.common.services import StreamListener
from twistvpn.common.tls import parse_address
from twistvpn.interfaces import INodeControl
from twistvpn.node import node_tap, settings
from twistvpn.node.joined_service import JoinedNodeService, load_or_create_key
from twistvpn.node.local_api import LocalAPI
from twistvpn.node.service import NodeStartError
from twistvpn.rendezvous.client import RendezvousClient
from twistvpn.rendezvous.netmap import Member, NetworkMap, overlay6_prefix
from twistvpn.testing.faketun import FakeTunDevice
from twistvpn.wireguard.keys import generate_private_key, public_key

NETWORK = "8f3a5c0d9e1b2a47"
URL = "twistvpn://rdv.example.org:8443#sha256=" + "ab" * 32


class UNIXPort:
    def __init__(self, reactor: UNIXMemoryReactor, path: str) -> None:
        self.reactor = reactor
        self.path = path
        self.listening = True

    def stopListening(self) -> Any:
        self.listening = False
        return succeed(None)


class UNIXMemoryReactor(MemoryReactor):
    """MemoryReactor with UNIX listening ports (recorded, not opened)."""

    def __init__(self) -> None:
        super().__init__()
        self.unix: list[tuple[str, Any, int, UNIXPort]] = []

    def listenUNIX(self, path: str, factory: Any, backlog: int = 50, mode: int = 0o666,
                   wantPID: int = 0) -> UNIXPort:
        port = UNIXPort(self, path)
        self.unix.append((path, factory, mode, port))
        return port


class FakeClient(Service):
    """Stands in for the RendezvousClient: records how it was made and used."""

    def __init__(self, *args: Any) -> None:
        (self.reactor, self.address, self.private_key, self.node_name, self.listener,
         self.networks, self.local_endpoints, self.auth_keys) = args
        self.server_key = None
        self.udp_ports: list[int] = []
        self.maps: dict[str, NetworkMap] = {}  # the one copy, as the real client's

    def stopService(self) -> Any:
        super().stopService()
        return succeed(None)


def memory_client(world: World) -> Any:
    """The service's client factory, with the real client talking to C{world} in memory."""

    def make_client(reactor: Any, address: Any, private: bytes, name: str, listener: Any,
                    networks: list[str], local_endpoints: list[str],
                    auth_keys: dict[str, str] | None) -> RendezvousClient:
        return RendezvousClient(MemoryEndpoint(world), private, name, listener,
                                clock=reactor, networks=networks,
                                local_endpoints=local_endpoints, auth_keys=auth_keys)

    return make_client


class Harness(unittest.TestCase):
    """A joined node service on a memory reactor, a fake TUN device and device."""

    def setUp(self) -> None:
        self.reactor = UNIXMemoryReactor()
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir, mode=0o700)
        self.private = generate_private_key()
        self.tuns: list[FakeTunDevice] = []
        self.clients: list[FakeClient] = []

    def open_tun(self, name: str, mtu: int) -> FakeTunDevice:
        tun = FakeTunDevice(name, mtu)
        self.tuns.append(tun)
        return tun

    def make_client(self, *args: Any) -> FakeClient:
        client = FakeClient(*args)
        self.clients.append(client)
        return client

    def service(self, **kwargs: Any) -> JoinedNodeService:
        options: dict[str, Any] = dict(
            data_dir=self.data_dir, private_key=self.private, rendezvous=parse_address(URL),
            networks=[NETWORK], name="laptop", interface_name="tvj0",
            open_tun=self.open_tun, make_device=FakeWireGuardDevice,
            make_client=self.make_client, local_addresses=lambda: ["192.168.1.5"],
            resolve=lambda host, port: ("203.0.113.1", port))
        options.update(kwargs)
        return JoinedNodeService(self.reactor, **options)


class ServiceTests(Harness):

    def test_start_opens_everything(self) -> None:
        node = self.service()
        node.startService()
        (tun,) = self.tuns
        self.assertEqual(tun.name, "tvj0")
        self.assertEqual(list(self.reactor.udpPorts), [41641])
        ((path, _, mode, _),) = self.reactor.unix
        self.assertEqual(path, os.path.join(self.data_dir, "node.sock"))
        self.assertEqual(mode, 0o600)
        (client,) = self.clients
        self.assertTrue(client.running)
        self.assertEqual(client.networks, [NETWORK])
        self.assertEqual(client.node_name, "laptop")
        self.assertEqual(client.local_endpoints, ["192.168.1.5:41641"])
        self.assertIs(client.listener, node.node)
        self.assertIs(node.node.client, client)
        self.assertEqual(node.node.discovery_host, "203.0.113.1")

    def test_overlay_that_covers_the_underlay_is_not_routed(self) -> None:
        """
        Audit item 7: a network on the member's own LAN prefix, or covering
        the rendezvous, is not routed through the tunnel (the member keeps
        its LAN and its path to the rendezvous), said in the log and status.
        """
        node = self.service()
        node.startService()
        (tun,) = self.tuns
        me = public_key(self.private)
        maps = {
            "0000000000000001": ("192.168.0.0/16", "192.168.200.1", "this host's address"),
            "0000000000000002": ("203.0.113.0/24", "203.0.113.200", "the rendezvous"),
            NETWORK: ("100.64.0.0/24", "100.64.0.1", None),
        }
        for network_id, (subnet, ip, _) in maps.items():
            members = (Member("aaaaaaaaaa", me, "laptop", ip),)
            netmap = NetworkMap(network_id, "n", subnet, 1, members)
            self.clients[0].maps[network_id] = netmap
            node.node.map_received(network_id, netmap)
        self.assertEqual(tun.routes4, ["100.64.0.0/24"])
        self.assertEqual(tun.addresses4, ("100.64.0.1/32",))
        networks = node.node.status()["networks"]
        for network_id, (subnet, _, what) in maps.items():
            refused = networks[network_id]["route_refused"]
            if what is None:
                self.assertIsNone(refused)
            else:
                self.assertIn(subnet, refused)
                self.assertIn(what, refused)
        node.stopService()

    def test_stop_removes_device_and_routes(self) -> None:
        node = self.service()
        node.startService()
        me = public_key(self.private)
        peer = public_key(generate_private_key())
        netmap = NetworkMap(NETWORK, "home", "100.64.0.0/24", 1, (
            Member("aaaaaaaaaa", me, "laptop", "100.64.0.1"),
            Member("bbbbbbbbbb", peer, "desk", "100.64.0.2", endpoints=("203.0.113.9:41641",)),
        ))
        self.clients[0].maps[NETWORK] = netmap
        node.node.map_received(NETWORK, netmap)
        (tun,) = self.tuns
        self.assertEqual(tun.addresses4, ("100.64.0.1/32",))
        self.assertEqual(tun.routes4, ["100.64.0.0/24"])
        self.assertIn(f"public_key={peer.hex()}\nprotocol_version=1", node.describe())
        d = node.stopService()
        self.successResultOf(d)
        self.assertTrue(tun.closed)
        self.assertEqual(tun.routes4, [])
        self.assertFalse(self.clients[0].running)
        self.assertFalse(self.reactor.unix[0][3].listening)
        self.assertIsNone(node.node)
        self.assertEqual([c for c in self.reactor.getDelayedCalls() if c.active()], [])

    def test_port_choice(self) -> None:
        self.service(port=51900).startService()
        self.assertEqual(list(self.reactor.udpPorts), [51900])

    def test_start_failure_is_one_line_and_leaves_nothing(self) -> None:
        def broken_tun(name: str, mtu: int) -> Any:
            raise OSError("cannot create TUN device tvj0: Operation not permitted")

        node = self.service(open_tun=broken_tun)
        with self.assertRaises(NodeStartError) as caught:
            node.startService()
        self.assertEqual(str(caught.exception), "twistvpn node cannot start: cannot create "
                         "TUN device tvj0: Operation not permitted")
        self.assertEqual(self.reactor.udpPorts, {})
        self.assertEqual(self.clients, [])

    def test_with_a_real_rendezvous_client(self) -> None:
        """The service's node registers and joins through the real client."""
        world = World(clock=self.reactor)
        world.controller.create_network("home")
        network = world.controller.list_networks()[0]["id"]

        node = self.service(make_client=memory_client(world), networks=[network])
        node.startService()
        world.settle()
        self.assertEqual(node.node.join_answers, {network: "pending"})
        (member,) = world.controller.list_members(network)
        world.controller.authorize(network, member["node_id"])
        world.settle()
        self.assertEqual(self.tuns[0].routes4, [world.controller.get_network(network)["subnet"]])
        stopped = node.stopService()
        world.settle()
        self.successResultOf(stopped)
        self.assertFalse(world.controller.get_member(network, member["node_id"])["online"])


class RunTimeChanges(Harness):
    """
    `twistvpn join`, `leave`, `networks` and `set` through the local API:
    applied to the running node at once, and saved for its next start.
    """

    def setUp(self) -> None:
        super().setUp()
        self.world = World(clock=self.reactor)

    def start(self, networks: list[str]) -> tuple[JoinedNodeService, World, LocalAPI]:
        world = self.world

        node = self.service(make_client=memory_client(world), networks=networks)
        node.startService()

        def stop() -> None:
            stopped = node.stopService()
            world.settle()
            self.successResultOf(stopped)

        self.addCleanup(stop)
        world.settle()
        return node, world, LocalAPI(node.node, control=node)

    def ask(self, api: LocalAPI, **request: Any) -> Any:
        d = api.handle(request, lambda event: True)
        self.world.settle()
        return self.successResultOf(d)

    def refused(self, api: LocalAPI, **request: Any) -> str:
        d = api.handle(request, lambda event: True)
        self.world.settle()
        return str(self.failureResultOf(d, ValueError).value)

    def network(self, name: str, subnet: str) -> str:
        return self.world.controller.create_network(name, subnet)["id"]

    def test_interface(self) -> None:
        verifyObject(INodeControl, self.service())

    def test_join_a_third_network_then_leave_the_first(self) -> None:
        node, world, api = self.start([])
        first, second, third = (self.network("one", "100.64.1.0/24"),
                                self.network("two", "100.64.2.0/24"),
                                self.network("three", "100.64.3.0/24"))
        for network_id in (first, second):
            self.assertEqual(self.ask(api, command="join", network=network_id),
                             {"network": network_id, "status": "pending"})
        node_id = node.node.node_id
        for network_id in (first, second):
            world.controller.authorize(network_id, node_id)
        world.settle()
        tun = self.tuns[0]
        self.assertEqual(sorted(tun.routes4), ["100.64.1.0/24", "100.64.2.0/24"])
        # A third at run time: the other two keep their addresses and routes.
        self.ask(api, command="join", network=third)
        world.controller.authorize(third, node_id)
        world.settle()
        self.assertEqual(sorted(tun.routes4), ["100.64.1.0/24", "100.64.2.0/24",
                                              "100.64.3.0/24"])
        self.assertEqual(len(tun.addresses4), 3)
        # Leaving the first: its route and address go at once; the rendezvous is told.
        self.assertEqual(self.ask(api, command="leave", network=first), {"network": first})
        self.assertEqual(sorted(tun.routes4), ["100.64.2.0/24", "100.64.3.0/24"])
        self.assertFalse(any(a.startswith("100.64.1.") for a in tun.addresses4))
        rows = {row["id"]: row for row in self.ask(api, command="networks")}
        self.assertEqual(sorted(rows), sorted([second, third]))
        self.assertEqual(rows[second]["status"], "authorized")
        self.assertEqual(rows[second]["name"], "two")
        self.assertTrue(rows[second]["ip"].startswith("100.64.2."))
        # Each network's route leaves from our address in that network.
        self.assertEqual({r: s for r, s in tun.sources.items() if ":" not in r},
                         {"100.64.2.0/24": rows[second]["ip"],
                          "100.64.3.0/24": rows[third]["ip"]})
        # And IPv6: each network's ULA prefix, from our address in it.
        self.assertEqual({r: tun.sources[r] for r in tun.routes6},
                         {overlay6_prefix(n): rows[n]["ip6"] for n in (second, third)})
        self.assertEqual(sorted(tun.addresses6),
                         sorted(f"{rows[n]['ip6']}/128" for n in (second, third)))
        # Saved for the next start, with the rendezvous this node was started with.
        saved = settings.load(self.data_dir)
        self.assertEqual(saved["networks"], [second, third])
        self.assertEqual(saved["rendezvous"], URL)

    def test_unknown_network_alone_fails(self) -> None:
        known = self.network("one", "100.64.1.0/24")
        node, world, api = self.start([known, "ffffffffffffffff"])
        world.controller.authorize(known, node.node.node_id)
        world.settle()
        rows = {row["id"]: row["status"] for row in self.ask(api, command="networks")}
        self.assertEqual(rows, {known: "authorized", "ffffffffffffffff": "not found"})
        self.assertEqual(self.tuns[0].routes4, ["100.64.1.0/24"])
        self.assertTrue(node.client.connected)

    def test_join_with_a_key_keeps_it_until_authorized(self) -> None:
        node, world, api = self.start([])
        network_id = self.network("lab", "100.64.9.0/24")
        secret = world.controller.create_key(network_id)["secret"]
        key_path = settings.pending_key_path(self.data_dir, network_id)
        self.assertEqual(self.ask(api, command="join", network=network_id, auth_key=secret),
                         {"network": network_id, "status": "authorized"})
        world.settle()
        self.assertFalse(os.path.exists(key_path))  # spent: not kept
        self.assertEqual(self.tuns[0].routes4, ["100.64.9.0/24"])

    def test_set_name_at_once(self) -> None:
        network_id = self.network("one", "100.64.1.0/24")
        node, world, api = self.start([network_id])
        self.assertEqual(self.ask(api, command="set", key="name", value="gpu-server"),
                         {"key": "name", "applied": True})
        [member] = world.controller.list_members(network_id)
        self.assertEqual(member["name"], "gpu-server")
        self.assertEqual(settings.load(self.data_dir)["name"], "gpu-server")
        # The others wait for the next start, and say so.
        self.assertEqual(self.ask(api, command="set", key="port", value=51000),
                         {"key": "port", "applied": False})
        self.assertEqual(settings.load(self.data_dir)["port"], 51000)

    def test_bad_requests(self) -> None:
        node, world, api = self.start([])
        self.assertIn("is not a network ID", self.refused(api, command="join", network="xyz"))
        self.assertIn("port: 70000 is out of range",
                      self.refused(api, command="set", key="port", value=70000))
        self.assertIn("colour: not a setting",
                      self.refused(api, command="set", key="colour", value="blue"))
        self.assertEqual(settings.load(self.data_dir), {})  # nothing half-written


class SettingsFileTests(unittest.TestCase):
    def test_round_trip_root_only(self) -> None:
        data_dir = self.mktemp()
        saved = {"rendezvous": URL, "networks": [NETWORK], "name": 'quote " and ü',
                 "port": 41641}
        settings.save(data_dir, saved)
        path = settings.settings_path(data_dir)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(settings.load(data_dir), saved)
        self.assertEqual(os.listdir(data_dir), ["node.toml"])

    def test_failed_write_keeps_the_old_file(self) -> None:
        data_dir = self.mktemp()
        settings.save(data_dir, {"name": "before"})
        with self.assertRaises(settings.SettingsError):
            settings.save(data_dir, {"name": "after", "port": 70000})
        self.patch(settings.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
        with self.assertRaises(settings.SettingsError) as caught:
            settings.save(data_dir, {"name": "after"})
        self.assertIn("cannot write", str(caught.exception))
        self.assertEqual(settings.load(data_dir), {"name": "before"})
        self.assertEqual(os.listdir(data_dir), ["node.toml"])  # no temporary left


class DataDirTests(unittest.TestCase):
    def test_first_start_creates_dir_and_key(self) -> None:
        data_dir = os.path.join(self.mktemp(), "state")
        key = load_or_create_key(data_dir)
        self.assertEqual(stat.S_IMODE(os.stat(data_dir).st_mode), 0o700)
        path = os.path.join(data_dir, "node.key")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(load_or_create_key(data_dir), key)

    def test_key_readable_by_others_refused(self) -> None:
        data_dir = self.mktemp()
        load_or_create_key(data_dir)
        os.chmod(os.path.join(data_dir, "node.key"), 0o644)
        with self.assertRaises(ValueError) as caught:
            load_or_create_key(data_dir)
        self.assertIn("permissions 0644 are too open", str(caught.exception))

    def test_garbage_key_refused(self) -> None:
        data_dir = self.mktemp()
        os.makedirs(data_dir)
        path = os.path.join(data_dir, "node.key")
        with open(path, "w") as f:
            f.write("not a key\n")
        os.chmod(path, 0o600)
        with self.assertRaises(ValueError) as caught:
            load_or_create_key(data_dir)
        self.assertTrue(str(caught.exception).startswith(path + ": "))


class OptionsTests(unittest.TestCase):
    def parse(self, *argv: str) -> node_tap.Options:
        options = node_tap.Options()
        options.parseOptions(list(argv))
        return options

    def joined(self, *extra: str) -> list[str]:
        self.data_dir = self.mktemp()
        return ["--data-dir", self.data_dir, "--rendezvous", URL, "--join", NETWORK, *extra]

    def assertUsageError(self, argv: list[str], fragment: str) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(*argv)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertIn(fragment, message)

    def test_good(self) -> None:
        other = "0123456789ABCDEF"
        options = self.parse(*self.joined("--join", other, "--join", NETWORK,
                                          "--name", "laptop", "--port", "51900"))
        self.assertEqual(options["mode"], "joined")
        self.assertEqual(options["networks"], [NETWORK, other.lower()])
        self.assertEqual(options["name"], "laptop")
        self.assertEqual(options["port"], 51900)
        self.assertEqual(options["address"][0].port, 8443)
        self.assertEqual(len(options["private_key"]), 32)
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, "node.key")))

    def test_defaults(self) -> None:
        options = self.parse(*self.joined())
        self.assertEqual(options["port"], 41641)
        self.assertTrue(options["name"])

    def test_bad_values(self) -> None:
        for extra, fragment in [
            (["--port", "70000"], "--port: 70000 is out of range (0 to 65535)"),
            (["--port", "x"], "--port: 'x' is not a number"),
            (["--name", "a" * 65], "--name: "),
            (["--name", "tab\there"], "printable characters"),
            (["--name", " pad"], "without leading or trailing spaces"),
            (["--join", "8f3a5c0d9e1b2a4"], "'8f3a5c0d9e1b2a4' is not a network ID (16 hex"),
            (["--join", "8f3a5c0d9e1b2a4z"], "is not a network ID"),
        ]:
            self.assertUsageError(self.joined(*extra), fragment)

    def test_bad_rendezvous(self) -> None:
        argv = ["--data-dir", self.mktemp(), "--rendezvous", "https://x:1", "--join", NETWORK]
        self.assertUsageError(argv, "--rendezvous: bad rendezvous address")

    def test_several_instances(self) -> None:
        """
        --rendezvous repeated: the instances of one rendezvous, in order,
        each once; in the settings file, a list.
        """
        second = URL.replace("rdv.", "rdv2.")
        options = self.parse(*self.joined("--rendezvous", second, "--rendezvous", URL))
        self.assertEqual([a.host for a in options["address"]],
                         ["rdv.example.org", "rdv2.example.org"])
        self.write_settings(f'rendezvous = ["{URL}", "{second}"]\n')
        options = self.parse("--data-dir", self.data_dir)
        self.assertEqual(len(options["address"]), 2)
        self.write_settings('rendezvous = []\n')
        self.assertUsageError(["--data-dir", self.data_dir],
                              "rendezvous: must list 1 to 8 twistvpn://")
        self.write_settings(f'rendezvous = ["{URL}", "https://x"]\n')
        self.assertUsageError(["--data-dir", self.data_dir],
                              "rendezvous: bad rendezvous address")

    def test_missing(self) -> None:
        data_dir = self.mktemp()
        self.assertUsageError(["--data-dir", data_dir, "--join", NETWORK],
                              "no rendezvous: give --rendezvous, or run `twistvpn join "
                              f"NETWORK_ID --rendezvous URL --data-dir {data_dir}` once")
        # No network is a node waiting for `twistvpn join`, not an error.
        options = self.parse("--data-dir", self.mktemp(), "--rendezvous", URL)
        self.assertEqual(options["networks"], [])

    def write_settings(self, text: str) -> str:
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir, mode=0o700)
        path = os.path.join(self.data_dir, "node.toml")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(text)
        return path

    def test_settings_file_is_the_command_line(self) -> None:
        """`twistd twistvpn-node --data-dir DIR` is the whole command line."""
        self.write_settings(f'rendezvous = "{URL}"\nnetworks = ["{NETWORK.upper()}"]\n'
                            'name = "gpu-server"\nport = 51999\ninterface = "tv1"\n'
                            'stay-awake-ms = 0\n')
        options = self.parse("--data-dir", self.data_dir)
        self.assertEqual((options["mode"], options["networks"], options["name"],
                          options["port"], options["interface"], options["stay-awake-ms"]),
                         ("joined", [NETWORK], "gpu-server", 51999, "tv1", 0))
        self.assertEqual(options["address"][0].port, 8443)

    def test_command_line_overrides_the_file(self) -> None:
        other = "0123456789abcdef"
        self.write_settings(f'rendezvous = "{URL}"\nnetworks = ["{NETWORK}"]\n'
                            'name = "gpu-server"\nport = 51999\n')
        options = self.parse("--data-dir", self.data_dir, "--name", "laptop", "--join", other)
        self.assertEqual((options["networks"], options["name"], options["port"]),
                         ([other], "laptop", 51999))

    def test_malformed_settings(self) -> None:
        """One line naming the file, the line and the key."""
        for text, line, fragment in [
            ('name = "a"\nport = 70000\n', 2, "port: 70000 is out of range (0 to 65535)"),
            ('name = "a"\n\nnetworks = ["xyz"]\n', 3, "networks: 'xyz' is not a network ID"),
            ('colour = "blue"\n', 1, "colour: unknown setting (known: rendezvous, networks"),
            ('name = "a"\nport = \n', 2, "invalid value"),
            ('rendezvous = "https://x"\n', 1, "rendezvous: bad rendezvous address"),
            ('name = 5\n', 1, "name: '5' must be 1 to 64 printable"),
        ]:
            path = self.write_settings(text)
            self.assertUsageError(["--data-dir", self.data_dir], f"{path}:{line}: {fragment}")

    def test_settings_readable_by_root_only(self) -> None:
        path = self.write_settings(f'rendezvous = "{URL}"\n')
        os.chmod(path, 0o644)
        self.assertUsageError(["--data-dir", self.data_dir], "permissions 0644 are too open")

    def test_modes_exclusive(self) -> None:
        self.assertUsageError(["--config", "wg0.conf", "--join", NETWORK],
                              "--config (static mode) and --join (joined mode) cannot be "
                              "combined")

    def test_private_key_file_is_static(self) -> None:
        self.assertUsageError(self.joined("--private-key-file", "k"),
                              "--private-key-file is for static mode")

    def test_insecure_key(self) -> None:
        argv = self.joined()
        self.parse(*argv)
        os.chmod(os.path.join(self.data_dir, "node.key"), 0o640)
        self.assertUsageError(argv, "are too open")

    def test_make_service(self) -> None:
        options = self.parse(*self.joined("--interface", "tvj1"))
        top = node_tap.makeService(options, reactor=UNIXMemoryReactor())
        node = top.getServiceNamed("node")
        self.assertIsInstance(node, JoinedNodeService)
        self.assertEqual(node.networks, [NETWORK])
        self.assertEqual(node.data_dir, self.data_dir)
        self.assertEqual([s for s in top if isinstance(s, StreamListener)], [],
                         "no metrics listener unless asked")

    def test_metrics_endpoint(self) -> None:
        """--metrics: Prometheus's /metrics, on loopback only (it has no token)."""
        self.assertUsageError(self.joined("--metrics", "tcp:9586"), "only on loopback")
        self.assertUsageError(self.joined("--metrics", "tcp:9586:interface=203.0.113.9"),
                              "only on loopback")
        options = self.parse(*self.joined("--metrics", "tcp:9586:interface=127.0.0.1"))
        top = node_tap.makeService(options, reactor=UNIXMemoryReactor())
        listeners = [s for s in top if isinstance(s, StreamListener)]
        self.assertEqual(len(listeners), 1)
