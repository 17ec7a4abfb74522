"""
C{twistd twistvpn-rendezvous}: options and C{makeService}.

    twistd -n twistvpn-rendezvous --data-dir DIR [--hostname NAME]
        [--control ENDPOINT] [--udp-port 3478] [--udp-port2 3479]
        [--tls-cert FILE --tls-key FILE] [--admin-http ENDPOINT|none]
        [--registration-rate 20]
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

from twistvpn.rendezvous.service import DataDirError, RendezvousService, prepare_data_dir

DEFAULT_DATA_DIR = "/var/lib/twistvpn-rendezvous"
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a port number (0 to 65535; 0 picks a free one)")
    return port


_port.coerceDoc = "A UDP port, 0 to 65535."  # type: ignore[attr-defined]


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


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the twistvpn rendezvous: endpoint discovery over UDP, the network "
        "controller over TLS, and the admin API (a UNIX socket in the data "
        "directory, and HTTP with a bearer token)."
    )
    optParameters = [
        ["data-dir", "d", DEFAULT_DATA_DIR, "State directory (created mode 0700)."],
        ["hostname", None, None, "The name nodes reach this server by (default: the FQDN)."],
        ["control", None, "tcp:8443", "Endpoint of the control channel (TLS added)."],
        ["udp-port", None, 3478, "UDP port of endpoint discovery.", _port],
        ["udp-port2", None, 3479, "Second discovery port (NAT mapping checks).", _port],
        ["udp-interface", None, "", "Address the discovery ports bind to (default: all)."],
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
            "admin-http",
            None,
            "tcp:8444:interface=127.0.0.1",
            "Endpoint of the HTTP admin API (bearer token in DATA-DIR/admin-token), or 'none'.",
        ],
    ]

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
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        for option in ("tls-cert", "tls-key"):
            if self[option] is not None and not os.access(self[option], os.R_OK):
                raise usage.UsageError(f"--{option} {self[option]}: cannot read it")
        check_endpoint("control", self["control"])
        if self["admin-http"].lower() == "none":
            self["admin-http"] = None
        else:
            check_endpoint("admin-http", self["admin-http"])


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        data = prepare_data_dir(
            config["data-dir"], config["hostname"], config["tls-cert"], config["tls-key"]
        )
    except DataDirError as e:
        raise SystemExit(f"twistvpn-rendezvous: {e}") from None
    return RendezvousService(
        reactor,
        data,
        config["hostname"],
        control=config["control"],
        udp_ports=(config["udp-port"], config["udp-port2"]),
        udp_interface=config["udp-interface"],
        admin_http=config["admin-http"],
        registration_rate=config["registration-rate"],
    )
