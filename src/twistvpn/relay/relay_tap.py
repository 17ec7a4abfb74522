"""
C{twistd twistvpn-relay}: a standalone relay, told who may talk to whom by
the rendezvous over the relay link.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from twisted.application import service
from twisted.internet.endpoints import HostnameEndpoint, serverFromString, wrapClientTLS
from twisted.logger import Logger
from twisted.python import usage

from twistvpn.common import tls
from twistvpn.common.datadir import DataDirError, open_data_dir
from twistvpn.common.endpoints import FailoverEndpoint
from twistvpn.common.services import StartStopService, StreamListener
from twistvpn.options import OneLineOptions, port
from twistvpn.relay.client import RelayInfo
from twistvpn.relay.link import RelayLink
from twistvpn.relay.policy import MembershipPolicy
from twistvpn.relay.server import RelayLimits, RelayServer
from twistvpn.relay.service import (
    admin_site,
    bound_info,
    load_or_create_tls,
    relay_services,
)
from twistvpn.wireguard import keys

log = Logger()
MBIT = 1_000_000 / 8
KEY_FILE = "relay.key"


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"{value} is not a positive number")
    return number


class Options(OneLineOptions):
    command = "twistvpn-relay"

    synopsis = "--rendezvous twistvpn://HOST:PORT#sha256=FINGERPRINT [options]"
    longdesc = (
        "Run a standalone twistvpn relay. It carries nodes' encrypted WireGuard datagrams "
        "over UDP, or TLS on TCP when UDP does not get through, between nodes that share an "
        "authorized network; the rendezvous tells it who they are. The rendezvous must list "
        "this relay's public key (logged at start, and in DATA_DIR/relay.pub) as a relay."
    )
    optParameters = [
        ["udp-port", None, 443, "UDP port for relay frames.", port("udp-port")],
        ["udp-interface", None, "", "Address to bind the UDP port to (default: all)."],
        ["tcp", None, "tcp:443", "Server endpoint for TLS over TCP (fallback when UDP fails)."],
        ["public-host", None, None,
         "IP address nodes reach this relay at (default: the address used towards the "
         "rendezvous)."],
        ["relay-id", None, None, "Name of the relay in network maps (default: from its key)."],
        ["data-dir", "d", "/var/lib/twistvpn-relay",
         "Directory for the relay's key and self-signed certificate."],
        ["tls-cert", None, None, "PEM certificate (chain) for TLS (default: self-signed)."],
        ["tls-key", None, None, "PEM private key of --tls-cert."],
        ["node-rate", None, 100.0, "Per-node rate limit in Mbit/s.", _positive],
        ["global-rate", None, 1000.0, "Whole-relay rate limit in Mbit/s.", _positive],
        ["idle-timeout", None, 90.0, "Close sessions silent for this many seconds.", _positive],
        ["admin", None, "tcp:8449:interface=127.0.0.1",
         "Server endpoint for the admin page (GET /stats), or 'none'."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["rendezvous"] = []

    def opt_rendezvous(self, url: str) -> None:
        """
        The rendezvous: twistvpn://HOST:PORT#sha256=FINGERPRINT; repeated for
        the instances of one rendezvous (failed over in turn).
        """
        self["rendezvous"].append(url)

    opt_r = opt_rendezvous

    def postOptions(self) -> None:
        if not self["rendezvous"]:
            raise usage.UsageError("--rendezvous is required (twistvpn://HOST:PORT#sha256=...)")
        try:
            self["rendezvous-addresses"] = [tls.parse_address(u) for u in self["rendezvous"]]
        except tls.TLSConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["public-host"] is not None:
            try:
                self["public-host"] = str(ipaddress.ip_address(self["public-host"]))
            except ValueError:
                raise usage.UsageError(
                    f"--public-host: {self['public-host']!r} is not an IP address"
                ) from None
        for name in ("tcp", "admin"):
            if name == "admin" and self[name] == "none":
                continue
            try:
                serverFromString(None, self[name])  # parse only
            except (ValueError, TypeError, KeyError) as e:
                raise usage.UsageError(f"--{name}: bad endpoint {self[name]!r}: {e}") from None
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["tls-cert"]:
            try:
                with open(self["tls-cert"], "rb") as c, open(self["tls-key"], "rb") as k:
                    self["tls-pems"] = (c.read(), k.read())
                tls.server_options(*self["tls-pems"])
            except OSError as e:
                raise usage.UsageError(f"{e.filename}: {e.strerror}") from None
            except tls.TLSConfigError as e:
                raise usage.UsageError(str(e)) from None
        data_dir = self["data-dir"]
        try:
            self["private-key"] = open_data_dir(data_dir, KEY_FILE)
            if not self["tls-cert"]:
                self["tls-pems"] = load_or_create_tls(data_dir, self["public-host"] or "relay")
        except DataDirError as e:
            raise usage.UsageError(f"--data-dir: {e}") from None
        except OSError as e:
            raise usage.UsageError(f"--data-dir: {e.filename or data_dir}: {e.strerror}") from None


def makeService(config: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    private = config["private-key"]
    public = keys.public_key(private)
    relay_id = config["relay-id"] or "relay-" + public.hex()[:10]
    cert_pem, key_pem = config["tls-pems"]
    limits = RelayLimits(node_rate=config["node-rate"] * MBIT,
                         global_rate=config["global-rate"] * MBIT,
                         idle_timeout=config["idle-timeout"])
    policy = MembershipPolicy()
    relay = RelayServer(reactor, private, public, policy, limits, relay_id=relay_id)
    top = relay_services(reactor, relay, config["udp-port"], config["tcp"],
                         tls.server_options(cert_pem, key_pem), config["udp-interface"])
    fingerprint = tls.fingerprint(cert_pem).hex()

    def announce(link_protocol: Any) -> RelayInfo:
        host = config["public-host"] or link_protocol.transport.getHost().host
        return bound_info(top, relay_id, host, public, fingerprint)

    endpoint = FailoverEndpoint([
        wrapClientTLS(tls.client_creator(address),
                      HostnameEndpoint(reactor, address.host, address.port))
        for address in config["rendezvous-addresses"]])
    link = RelayLink(reactor, endpoint, private, public, policy, announce)
    StartStopService(link).setServiceParent(top)
    if config["admin"] != "none":
        def link_state() -> dict[str, Any]:
            return {"rendezvous": {"url": config["rendezvous"][endpoint.current],
                                   "connected": link.protocol is not None,
                                   "synced": link.synced,
                                   "networks": len(policy.networks())}}

        StreamListener(serverFromString(reactor, config["admin"]),
                            admin_site(relay, link_state)).setServiceParent(top)
    pub_path = os.path.join(config["data-dir"], "relay.pub")
    with open(pub_path, "w") as f:
        f.write(keys.encode_key(public) + "\n")
    log.info("relay {relay_id}: public key {key} (the rendezvous must list it as a relay)",
             relay_id=relay_id, key=keys.encode_key(public))
    return top
