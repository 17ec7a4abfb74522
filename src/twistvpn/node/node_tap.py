"""
C{twistd twistvpn-node}: the node service's options and construction.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import string
import sys
from typing import Any

from twisted.application import service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from twistvpn.common.datadir import DataDirError, InsecurePermissionsError
from twistvpn.common.metrics import is_loopback_endpoint, metrics_site
from twistvpn.common.services import StreamListener, quiet
from twistvpn.common.tls import TLSConfigError, parse_address
from twistvpn.interfaces import IDataPlaneReactor
from twistvpn.node.awake import DEFAULT_STAY_AWAKE
from twistvpn.node.config import ConfigError, load_config, read_private_file
from twistvpn.node.fastpath import DEFAULT_ANSWER_WAIT
from twistvpn.node.joined_service import (
    DEFAULT_PORT,
    JoinedNodeService,
    KeyFileError,
    load_or_create_key,
    read_key_file,
)
from twistvpn.node.service import NodeStartError, StaticNodeService
from twistvpn.node.tun import DEFAULT_NAME, validate_interface_name
from twistvpn.options import OneLineOptions, integer
from twistvpn.rendezvous.files import KEY_PREFIX

NAME_LENGTH = 64
MAX_ANSWER_WAIT_US = 10_000


class Options(OneLineOptions):
    command = "twistvpn-node"

    synopsis = (
        "--config wg0.conf [--interface NAME]  |  --data-dir DIR --rendezvous "
        "twistvpn://HOST:PORT#sha256=... --join NETWORK_ID [--join ...] [--name NAME] "
        "[--port 41641]"
    )
    longdesc = (
        "Run a twistvpn node.  Static mode (--config): the interface and its peers come "
        "from a wg-quick configuration file, so the node interoperates with stock "
        "WireGuard.  Joined mode (--data-dir, --rendezvous, --join): the node registers "
        "with a rendezvous and its networks' authorized members become its peers."
    )
    optParameters = [
        ["data-dir", "d", None, "Joined mode: the node's directory (key, local API socket)."],
        ["rendezvous", "r", None, "Joined mode: twistvpn://HOST:PORT#sha256=FINGERPRINT."],
        ["name", None, None, "Joined mode: the name peers and admins see (default: host name)."],
        ["port", None, None, f"Joined mode: UDP port (default {DEFAULT_PORT}; 0: any)."],
        ["config", "c", None, "wg-quick configuration file ([Interface] and [Peer] sections)."],
        ["interface", "i", DEFAULT_NAME, "Name of the TUN device to create."],
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
            str(round(DEFAULT_ANSWER_WAIT * 1e6)),
            "After sending a lone packet, look for its answer this many microseconds "
            "(yielding the CPU between looks) before sleeping in the reactor: lower "
            "latency for request/response traffic; 0: never wait (0 to 10000).",
        ],
        [
            "stay-awake-ms",
            None,
            str(round(DEFAULT_STAY_AWAKE * 1e3)),
            "While packets flow through the tunnel (and for 10 s after), wake at "
            "least this often (milliseconds), so that a packet after a pause finds the "
            "CPU awake: lower latency on virtual machines, for about 100 short "
            "wake-ups a second; 0: never (0 to 1000).",
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

    def opt_join(self, network_id: str) -> None:
        """Joined mode: a network to join (16 hex digits); may be repeated."""
        self["join"].append(network_id)

    opt_j = opt_join

    def postOptions(self) -> None:
        try:
            self["interface"] = validate_interface_name(self["interface"])
        except ValueError as e:
            raise usage.UsageError(f"--interface: {e}") from None
        self["answer-wait-us"] = integer(
            "answer-wait-us", self["answer-wait-us"], 0, MAX_ANSWER_WAIT_US
        )
        self["stay-awake-ms"] = integer("stay-awake-ms", self["stay-awake-ms"], 0, 1000)
        if self["metrics"] is not None and not is_loopback_endpoint(self["metrics"]):
            raise usage.UsageError(
                f"--metrics {self['metrics']}: only on loopback "
                "(tcp:PORT:interface=127.0.0.1); use twistvpn metrics, or a local scraper")
        joined = [o for o in ("data-dir", "rendezvous", "name", "port") if self[o] is not None]
        if self["join"]:
            joined.append("join")
        if self["config"] and joined:
            raise usage.UsageError(
                f"--config (static mode) and --{joined[0]} (joined mode) cannot be combined")
        if joined:
            if self["private-key-file"]:
                raise usage.UsageError(
                    "--private-key-file is for static mode; a joined node keeps its key "
                    "in --data-dir")
            self._joined_options()
            return
        self["mode"] = "static"
        path = self["config"]
        if not path:
            raise usage.UsageError(
                "--config is required (a wg-quick file) in static mode; joined mode "
                "takes --data-dir, --rendezvous and --join instead")
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


    def _joined_options(self) -> None:
        self["mode"] = "joined"
        for option in ("data-dir", "rendezvous"):
            if not self[option]:
                raise usage.UsageError(f"joined mode needs --{option}")
        if not self["join"]:
            raise usage.UsageError("joined mode needs at least one --join NETWORK_ID")
        try:
            self["address"] = parse_address(self["rendezvous"])
        except TLSConfigError as e:
            raise usage.UsageError(f"--rendezvous: {e}") from None
        networks = []
        for network_id in self["join"]:
            if len(network_id) != 16 or any(c not in string.hexdigits for c in network_id):
                raise usage.UsageError(
                    f"--join: {network_id[:40]!r} is not a network ID (16 hex digits)")
            networks.append(network_id.lower())
        self["networks"] = list(dict.fromkeys(networks))
        name = self["name"] if self["name"] is not None else socket.gethostname()[:NAME_LENGTH]
        if not name or len(name) > NAME_LENGTH or not name.isprintable() or name != name.strip():
            raise usage.UsageError(
                f"--name: {name[:80]!r} must be 1 to {NAME_LENGTH} printable characters, "
                "without leading or trailing spaces")
        self["name"] = name
        port = DEFAULT_PORT if self["port"] is None else self["port"]
        self["port"] = integer("port", port, 0, 65535)
        try:
            self["private_key"] = load_or_create_key(self["data-dir"])
        except (KeyFileError, DataDirError) as e:
            raise usage.UsageError(str(e)) from None
        self["auth_key"] = None
        if self["auth-key-file"]:
            try:
                key = read_private_file(self["auth-key-file"]).strip()
            except InsecurePermissionsError as e:
                raise usage.UsageError(f"--auth-key-file: {e}") from None
            except OSError as e:
                raise usage.UsageError(
                    f"--auth-key-file {self['auth-key-file']}: {e.strerror}") from None
            if not key.startswith(KEY_PREFIX) or len(key) > 200 or not key.isprintable():
                raise usage.UsageError(
                    f"--auth-key-file {self['auth-key-file']}: not a pre-auth key "
                    f"(they start with {KEY_PREFIX})")
            self["auth_key"] = key


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
        )

    node: service.Service
    if config["mode"] == "joined":
        from twistvpn.relay.transport import tls_stream_connector

        node = JoinedNodeService(
            reactor,
            data_dir=config["data-dir"],
            private_key=config["private_key"],
            rendezvous=config["address"],
            networks=config["networks"],
            auth_key=config["auth_key"],
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
