"""
C{twistd twistvpn-node}: the node service's options and construction.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from twisted.application import service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from twistvpn.common.datadir import DataDirError, InsecurePermissionsError
from twistvpn.common.metrics import is_loopback_endpoint, metrics_site
from twistvpn.common.services import StreamListener, quiet
from twistvpn.common.tls import parse_address
from twistvpn.interfaces import IDataPlaneReactor
from twistvpn.node import settings
from twistvpn.node.awake import DEFAULT_STAY_AWAKE
from twistvpn.node.config import ConfigError, load_config
from twistvpn.node.fastpath import DEFAULT_ANSWER_WAIT
from twistvpn.node.files import DEFAULT_DATA_DIR, SETTINGS_NAME
from twistvpn.node.joined_service import (
    DEFAULT_PORT,
    JoinedNodeService,
    KeyFileError,
    load_or_create_key,
    read_key_file,
)
from twistvpn.node.names import DEFAULT_DNS_PORT
from twistvpn.node.service import NodeStartError, StaticNodeService
from twistvpn.node.tun import DEFAULT_NAME
from twistvpn.options import OneLineOptions


class Options(OneLineOptions):
    command = "twistvpn-node"

    synopsis = (
        "[--data-dir DIR] [--rendezvous twistvpn://HOST:PORT#sha256=...] [--join NETWORK_ID] "
        "[--name NAME] [--port 41641]  |  --config wg0.conf [--interface NAME]"
    )
    longdesc = (
        "Run a twistvpn node.  Joined mode (the default): the node registers with a "
        "rendezvous and its networks' authorized members become its peers; its settings "
        f"come from DIR/{SETTINGS_NAME} (written by `twistvpn join`), and options given "
        "here override them for this run.  Static mode (--config): the interface and its "
        "peers come from a wg-quick configuration file, so the node interoperates with "
        "stock WireGuard."
    )
    optParameters = [
        ["data-dir", "d", None,
         f"Joined mode: the node's directory (key, settings, local API socket; default "
         f"{DEFAULT_DATA_DIR})."],
        ["name", None, None, "Joined mode: the name peers and admins see (default: host name)."],
        ["port", None, None, f"Joined mode: UDP port (default {DEFAULT_PORT}; 0: any)."],
        ["config", "c", None, "wg-quick configuration file ([Interface] and [Peer] sections)."],
        ["interface", "i", None, f"Name of the TUN device to create (default {DEFAULT_NAME})."],
        ["dns-port", None, None,
         "Joined mode: answer the networks' names (NAME.DOMAIN) on this port of the "
         "node's overlay addresses, and tell systemd-resolved (default 53; 0: no names)."],
        ["system-dns", None, None,
         "Joined mode: auto (default): send the networks' domains to the node's name "
         "server through systemd-resolved where it runs; off: leave the system's DNS alone."],
        ["port-mapping", None, None,
         "Joined mode: ask the LAN's gateway to forward a public port to ours, so that "
         "peers reach us even behind a hard NAT: auto (PCP, then NAT-PMP, then UPnP IGD; "
         "the default), pcp, natpmp, upnp or off."],
        ["metrics", None, None,
         "Joined mode: serve Prometheus metrics on this endpoint, at /metrics (loopback "
         "only: it has no token), e.g. tcp:9586:interface=127.0.0.1."],
        [
            "control-dir",
            None,
            "/var/run/wireguard",
            "Directory of the read-only control socket <interface>.sock that `wg show` "
            "reads, as wireguard-go's; empty: none.",
        ],
        [
            "answer-wait-us",
            None,
            None,
            "After sending a lone packet, look for its answer this many microseconds "
            "(yielding the CPU between looks) before sleeping in the reactor: lower "
            "latency for request/response traffic; 0: never wait (0 to 10000; default "
            f"{round(DEFAULT_ANSWER_WAIT * 1e6)}).",
        ],
        [
            "stay-awake-ms",
            None,
            None,
            "While packets flow through the tunnel (and for 10 s after), wake at "
            "least this often (milliseconds), so that a packet after a pause finds the "
            "CPU awake: lower latency on virtual machines, for about 100 short "
            f"wake-ups a second; 0: never (0 to 1000; default {round(DEFAULT_STAY_AWAKE * 1e3)}).",
        ],
        [
            "tso",
            None,
            None,
            "Ask the kernel to hand over TCP packets of up to 64 KiB and cut them into "
            "segments here (TSO), one read for some 45 segments: auto (default: where the "
            "build is compiled, see twistvpn --version), on or off.",
        ],
        [
            "private-key-file",
            None,
            None,
            "Read the interface's private key from this file instead of the config's "
            "PrivateKey (as `wg set ... private-key FILE`).",
        ],
        [
            "auth-key-file",
            None,
            None,
            "Joined mode: a pre-auth key (twistvpn admin key create) in a file only its "
            "owner may read: the networks joined are authorized without an admin.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["join"] = []
        self["rendezvous"] = None

    def opt_join(self, network_id: str) -> None:
        """Joined mode: a network to join (16 hex digits); may be repeated."""
        self["join"].append(network_id)

    opt_j = opt_join

    def opt_rendezvous(self, url: str) -> None:
        """
        Joined mode: twistvpn://HOST:PORT#sha256=FINGERPRINT; repeated for
        the instances of one rendezvous (failed over in turn).
        """
        given = self["rendezvous"]
        self["rendezvous"] = url if given is None else [*settings.rendezvous_urls(given), url]

    opt_r = opt_rendezvous

    def postOptions(self) -> None:
        if self["metrics"] is not None and not is_loopback_endpoint(self["metrics"]):
            raise usage.UsageError(
                f"--metrics {self['metrics']}: only on loopback "
                "(tcp:PORT:interface=127.0.0.1); use twistvpn metrics, or a local scraper")
        if not self["config"]:
            self._joined_options()
            return
        joined = [o for o in ("data-dir", "rendezvous", "name", "port", "metrics", "dns-port",
                              "system-dns", "port-mapping",
                              "auth-key-file") if self[o] is not None]
        if self["join"]:
            joined.append("join")
        if joined:
            raise usage.UsageError(
                f"--config (static mode) and --{joined[0]} (joined mode) cannot be combined")
        self["mode"] = "static"
        self._apply_defaults()
        path = self["config"]
        try:
            self["parsed"] = load_config(path)
        except (ConfigError, InsecurePermissionsError) as e:
            raise usage.UsageError(str(e)) from None
        except OSError as e:
            raise usage.UsageError(f"{path}: {e.strerror or e}") from None
        key_file = self["private-key-file"]
        if key_file:
            try:
                key = read_key_file(key_file)
            except KeyFileError as e:
                raise usage.UsageError(str(e)) from None
            self["parsed"] = dataclasses.replace(self["parsed"], private_key=key)

    def _apply_defaults(self) -> None:
        defaults = {"interface": DEFAULT_NAME, "dns-port": DEFAULT_DNS_PORT,
                    "system-dns": "auto", "port-mapping": "auto",
                    "answer-wait-us": round(DEFAULT_ANSWER_WAIT * 1e6),
                    "stay-awake-ms": round(DEFAULT_STAY_AWAKE * 1e3), "tso": "auto"}
        for key, value in defaults.items():
            if self[key] is None:
                self[key] = value
        for key in ("interface", "answer-wait-us", "stay-awake-ms", "dns-port", "system-dns",
                    "port-mapping", "tso"):
            self._check(key)

    def _check(self, key: str) -> None:
        try:
            self[key] = settings.CHECKS[key](self[key])
        except ValueError as e:
            raise usage.UsageError(f"--{key}: {e}") from None

    def _joined_options(self) -> None:
        self["mode"] = "joined"
        if self["private-key-file"]:
            raise usage.UsageError(
                "--private-key-file is for static mode; a joined node keeps its key "
                "in --data-dir")
        if self["data-dir"] is None:
            self["data-dir"] = DEFAULT_DATA_DIR
        data_dir = self["data-dir"]
        try:
            saved = settings.load(data_dir)
        except settings.SettingsError as e:
            raise usage.UsageError(str(e)) from None
        given = {key for key in settings.CHECKS if key in self and self[key] is not None}
        for key in given:
            self._check(key)
        if self["join"]:
            try:
                self["networks"] = settings.check_networks(self["join"])
            except ValueError as e:
                raise usage.UsageError(f"--join: {e}") from None
        else:
            self["networks"] = saved.get("networks", [])
        for key, value in saved.items():
            if key != "networks" and key not in given:
                self[key] = value
        self._apply_defaults()
        if not self["rendezvous"]:
            raise usage.UsageError(
                f"no rendezvous: give --rendezvous, or run `twistvpn join NETWORK_ID "
                f"--rendezvous URL --data-dir {data_dir}` once")
        self["address"] = [parse_address(u) for u in settings.rendezvous_urls(self["rendezvous"])]
        if self["name"] is None:
            self["name"] = settings.check_name(settings.default_name())
        self["port"] = DEFAULT_PORT if self["port"] is None else self["port"]
        try:
            self["private_key"] = load_or_create_key(data_dir)
        except (KeyFileError, DataDirError) as e:
            raise usage.UsageError(str(e)) from None
        self["auth_key"] = None
        if self["auth-key-file"]:
            try:
                self["auth_key"] = settings.read_auth_key_file(self["auth-key-file"])
            except settings.SettingsError as e:
                raise usage.UsageError(f"--auth-key-file: {e}") from None


class _ExitOnStartError(service.MultiService):
    """
    Under twistd, a node that cannot start says why in one line and exits
    non-zero, rather than a traceback.
    """

    def startService(self) -> None:
        try:
            super().startService()
        except NodeStartError as e:
            sys.stderr.write(f"{e}\n")
            raise SystemExit(1) from None


class _ReactorHint(service.Service):
    """A node on another reactor than twistvpn's says, once, what it misses."""

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        if not IDataPlaneReactor.providedBy(self._reactor):
            self.log.info(
                "running on {reactor}; `twistd --reactor twistvpn twistvpn-node ...` "
                "dispatches the data plane directly (lower latency when idle)",
                reactor=type(self._reactor).__name__,
            )


def makeService(config: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from twistvpn.node.tun import TunDevice
    from twistvpn.wireguard.device import WireGuardDevice

    top = _ExitOnStartError()
    _ReactorHint(reactor).setServiceParent(top)
    control_socket = (
        os.path.join(config["control-dir"], f"{config['interface']}.sock")
        if config["control-dir"]
        else None
    )

    def open_tun(name: str, mtu: int) -> TunDevice:
        return TunDevice(
            reactor,
            name,
            mtu,
            answer_wait=config["answer-wait-us"] / 1e6,
            stay_awake=config["stay-awake-ms"] / 1e3,
            tso={"on": True, "off": False}.get(config["tso"]),
        )

    node: service.Service
    if config["mode"] == "joined":
        from twisted.internet.utils import getProcessOutputAndValue

        from twistvpn.node.names import NameService, ResolvedLink
        from twistvpn.relay.transport import tls_stream_connector

        names = None
        if config["dns-port"]:
            def run(argv: list[str]) -> Any:
                return getProcessOutputAndValue(argv[0], argv[1:], env=os.environ,
                                                reactor=reactor)

            resolved = ResolvedLink(run) if config["system-dns"] == "auto" else None
            names = NameService(reactor, config["interface"], port=config["dns-port"],
                                resolved=resolved)
        node = JoinedNodeService(
            reactor,
            data_dir=config["data-dir"],
            private_key=config["private_key"],
            rendezvous=config["address"],
            networks=config["networks"],
            auth_key=config["auth_key"],
            names=names,
            port_mapping=config["port-mapping"],
            name=config["name"],
            port=config["port"],
            interface_name=config["interface"],
            open_tun=open_tun,
            make_device=WireGuardDevice,
            connect_stream=tls_stream_connector(reactor),
            control_socket=control_socket,
        )
    else:
        node = StaticNodeService(
            reactor,
            config["parsed"],
            interface_name=config["interface"],
            open_tun=open_tun,
            make_device=WireGuardDevice,
            control_socket=control_socket,
        )
    node.setName("node")
    node.setServiceParent(top)
    if config["metrics"] is not None and isinstance(node, JoinedNodeService):
        joined = node

        def families() -> Any:
            return joined.node.metrics() if joined.node is not None else []

        StreamListener(serverFromString(reactor, config["metrics"]),
                       quiet(metrics_site(families))).setServiceParent(top)
    return top
