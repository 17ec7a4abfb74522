"""
C{twistd twistvpn-rendezvous}: options and C{makeService}.

    twistd -n twistvpn-rendezvous --data-dir DIR [--hostname NAME]
        [--control ENDPOINT] [--udp-port 3478] [--udp-port2 3479]
        [--tls-cert FILE --tls-key FILE] [--admin-http ENDPOINT|none]
        [--registration-rate 20]
        [--public-ip IP] [--relay-udp-port 443] [--relay-tcp-port 443] [--no-relay]
        [--relay-link ENDPOINT --relay-key KEY ...]
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from twistvpn.options import OneLineOptions, port
from twistvpn.relay.service import attach_relays
from twistvpn.rendezvous.files import DEFAULT_DATA_DIR
from twistvpn.rendezvous.service import (
    DataDirError,
    RelaySettings,
    RendezvousService,
    prepare_data_dir,
)
from twistvpn.wireguard.keys import InvalidKey, decode_key

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None
    if not 0 <= rate < float("inf"):
        raise ValueError(f"{value} is not a rate (0 or more per second)")
    return rate


_rate.coerceDoc = "Per second; 0 means no limit."  # type: ignore[attr-defined]


class _NoReactor:
    """Stands in for the reactor while endpoint strings are only parsed."""


def check_endpoint(option: str, description: str) -> str:
    """Refuse an endpoint string Twisted cannot parse, or one with its own TLS."""
    kind = description.split(":", 1)[0].lower()
    if kind in ("ssl", "tls", "le", "lets"):
        raise usage.UsageError(
            f"--{option} {description!r}: give a plain endpoint (tcp:PORT); TLS is added"
        )
    try:
        serverFromString(_NoReactor(), description)
    except (ValueError, TypeError, KeyError) as e:
        raise usage.UsageError(f"--{option} {description!r}: {e}") from None
    return description


class Options(OneLineOptions):
    command = "twistvpn-rendezvous"

    synopsis = "[options]"
    optFlags = [
        ["no-relay", None, "Do not run the embedded relay (standalone relays may still link)."],
    ]
    longdesc = (
        "Run the twistvpn rendezvous: endpoint discovery over UDP, the network "
        "controller over TLS, and the admin API (a UNIX socket in the data "
        "directory, and HTTP with a bearer token)."
    )
    optParameters = [
        ["data-dir", "d", DEFAULT_DATA_DIR, "State directory (created mode 0700)."],
        ["database", None, None,
         "A PostgreSQL database (postgresql://USER@HOST/DB) instead of sqlite in the data "
         "directory, which several instances may share."],
        ["hostname", None, None, "The name nodes reach this server by (default: the FQDN)."],
        ["control", None, "tcp:8443", "Endpoint of the control channel (TLS added)."],
        ["udp-port", None, 3478, "UDP port of endpoint discovery.", port("udp-port")],
        ["udp-port2", None, 3479, "Second discovery port (NAT mapping checks).", port("udp-port2")],
        ["udp-interface", None, "", "Address the discovery ports bind to (default: all)."],
        ["udp-interface6", None, "",
         "An IPv6 address the discovery ports also answer on, told to nodes so that those "
         "with global IPv6 learn their IPv6 public endpoint (default: none)."],
        ["tls-cert", None, None, "PEM certificate (chain) instead of a self-signed one."],
        ["tls-key", None, None, "PEM private key of --tls-cert."],
        [
            "registration-rate",
            None,
            20.0,
            "Registrations per second one address may make (bursts of 5 s worth; 0: no limit).",
            _rate,
        ],
        [
            "web",
            None,
            "tcp:8445:interface=127.0.0.1",
            "Endpoint of the web console (HTTPS with the rendezvous's certificate; loopback "
            "by default: reach it with an SSH tunnel), e.g. tcp:8445 for every interface; "
            "'' for none.",
        ],
        [
            "admin-http",
            None,
            "tcp:8444:interface=127.0.0.1",
            "Endpoint of the HTTP admin API (bearer token in DATA-DIR/admin-token), or 'none'.",
        ],
        [
            "public-ip",
            None,
            None,
            "IP address nodes reach the embedded relay at (default: --hostname if an IP).",
        ],
        ["relay-udp-port", None, 443, "UDP port of the embedded relay.", port("relay-udp-port")],
        [
            "relay-tcp-port",
            None,
            443,
            "TCP (TLS) port of the embedded relay.",
            port("relay-tcp-port"),
        ],
        [
            "relay-link",
            None,
            "tcp:8446",
            "Endpoint standalone relays log in to (TLS added); listens only with --relay-key.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["relay-key"] = []

    def opt_relay_key(self, value: str) -> None:
        """Public key of a standalone relay allowed to link (repeatable)."""
        try:
            self["relay-key"].append(decode_key(value))
        except InvalidKey as e:
            raise usage.UsageError(f"--relay-key {value!r}: {e}") from None

    def postOptions(self) -> None:
        self["data-dir"] = os.path.abspath(self["data-dir"])
        if os.path.exists(self["data-dir"]) and not os.path.isdir(self["data-dir"]):
            raise usage.UsageError(f"--data-dir {self['data-dir']}: not a directory")
        if self["hostname"] is None:
            self["hostname"] = socket.getfqdn()
        hostname = self["hostname"]
        try:
            ipaddress.ip_address(hostname)
        except ValueError:
            if not _HOSTNAME.match(hostname):
                raise usage.UsageError(f"--hostname {hostname!r}: not a host name") from None
        if self["udp-port"] == self["udp-port2"] != 0:
            raise usage.UsageError("--udp-port and --udp-port2 must differ")
        if self["udp-interface"]:
            try:
                ipaddress.ip_address(self["udp-interface"])
            except ValueError:
                raise usage.UsageError(
                    f"--udp-interface {self['udp-interface']!r}: not an IP address"
                ) from None
        if self["udp-interface6"]:
            try:
                address = ipaddress.IPv6Address(self["udp-interface6"])
            except ValueError:
                raise usage.UsageError(
                    f"--udp-interface6 {self['udp-interface6']!r}: not an IPv6 address"
                ) from None
            if address.is_unspecified or address.ipv4_mapped is not None:
                raise usage.UsageError(
                    f"--udp-interface6 {self['udp-interface6']!r}: not a unicast IPv6 address")
            if 0 in (self["udp-port"], self["udp-port2"]):
                raise usage.UsageError(
                    "--udp-interface6 needs fixed --udp-port and --udp-port2 (not 0)")
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        for option in ("tls-cert", "tls-key"):
            if self[option] is not None and not os.access(self[option], os.R_OK):
                raise usage.UsageError(f"--{option} {self[option]}: cannot read it")
        check_endpoint("control", self["control"])
        self._check_relay_options()
        if self["web"].strip().lower() in ("", "none"):
            self["web"] = None
        else:
            check_endpoint("web", self["web"])
        if self["admin-http"].lower() == "none":
            self["admin-http"] = None
        else:
            check_endpoint("admin-http", self["admin-http"])


    def _check_relay_options(self) -> None:
        if self["public-ip"] is not None:
            try:
                ipaddress.ip_address(self["public-ip"])
            except ValueError:
                raise usage.UsageError(
                    f"--public-ip {self['public-ip']!r}: not an IP address"
                ) from None
        else:
            try:
                ipaddress.ip_address(self["hostname"])
                self["public-ip"] = self["hostname"]
            except ValueError:
                pass  # the service runs without the embedded relay and says why
        relay_port = self["relay-udp-port"]
        if not self["no-relay"] and relay_port != 0:
            for option in ("udp-port", "udp-port2"):
                if self[option] == relay_port:
                    raise usage.UsageError(
                        f"--relay-udp-port {relay_port}: --{option} uses it already"
                    )
        check_endpoint("relay-link", self["relay-link"])
        database = self["database"]
        if database is not None and not database.startswith(("postgresql://", "postgres://")):
            raise usage.UsageError(f"--database {database!r}: not a postgresql:// URL")


def relay_settings(config: Options) -> RelaySettings:
    """The relay part of the options, as L{RendezvousService} takes it."""
    return RelaySettings(
        embedded=not config["no-relay"],
        public_ip=config["public-ip"],
        udp_port=config["relay-udp-port"],
        tcp_port=config["relay-tcp-port"],
        link=config["relay-link"] if config["relay-key"] else None,
        relay_keys=tuple(config["relay-key"]),
    )


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        data = prepare_data_dir(
            config["data-dir"], config["hostname"], config["tls-cert"], config["tls-key"],
            config["database"],
        )
    except DataDirError as e:
        raise SystemExit(f"twistvpn-rendezvous: {e}") from None
    rendezvous = RendezvousService(
        reactor,
        data,
        config["hostname"],
        control=config["control"],
        udp_ports=(config["udp-port"], config["udp-port2"]),
        udp_interface=config["udp-interface"],
        udp_interface6=config["udp-interface6"],
        admin_http=config["admin-http"],
        registration_rate=config["registration-rate"],
        relays=relay_settings(config),
    )
    settings = rendezvous.relay_settings
    if settings.any:
        rendezvous.relays = attach_relays(
            rendezvous, reactor, rendezvous.controller, data.server_private, data.cert_pem,
            data.key_pem, settings.public_ip, embedded=settings.runs_embedded,
            udp_port=settings.udp_port,
            tcp_port=settings.tcp_port, interface=config["udp-interface"], link=settings.link,
            relay_keys=settings.relay_keys,
        )
    if config["web"] is not None:
        from twistvpn.console.service import console_listener

        rendezvous.attach_console(console_listener(reactor, rendezvous, config["web"]),
                                  config["web"])
    return rendezvous
