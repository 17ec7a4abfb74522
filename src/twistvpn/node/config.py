"""
wg-quick configuration files, the static mode's one input.

The format is wg-quick's: an C{[Interface]} section and C{[Peer]} sections of
C{Key = Value} lines, keys matched without regard to case, C{#} starting a
comment.  Anything we cannot honour is an error that names the file, the line
and the key, so a typo never silently turns into a different network.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twistvpn.common.datadir import check_private_file
from twistvpn.options import is_decimal
from twistvpn.wireguard.keys import InvalidKey, decode_key

# wg-quick keys that make sense for wg-quick's shell hooks or its routing
# tables but that twistvpn does not implement; named apart from typos so the
# error says what to do.
UNSUPPORTED_KEYS = frozenset(
    {"dns", "table", "preup", "postup", "predown", "postdown", "saveconfig", "fwmark"}
)


class ConfigError(ValueError):
    """A configuration file is malformed; the message is one line."""

    def __init__(self, path: str, line: int | None, key: str | None, reason: str) -> None:
        self.path = path
        self.line = line
        self.key = key
        self.reason = reason
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {key}: {reason}" if key else f"{where}: {reason}")


@dataclass(frozen=True)
class PeerConfig:
    public_key: bytes
    preshared_key: bytes | None = None
    # (host, port); host is an IP literal or a name resolved at start-up.
    endpoint: tuple[str, int] | None = None
    allowed_ips: tuple[str, ...] = ()
    persistent_keepalive: int = 0
    # Where the Endpoint was written ("wg0.conf:12"), for an error at start-up.
    endpoint_source: str | None = None


@dataclass(frozen=True)
class InterfaceConfig:
    private_key: bytes
    addresses: tuple[str, ...] = ()
    listen_port: int | None = None
    mtu: int | None = None
    peers: tuple[PeerConfig, ...] = field(default=())


def read_private_file(path: str | os.PathLike[str]) -> str:
    """The text of a secret file, after checking its permissions."""
    check_private_file(path)
    return Path(path).read_text(encoding="utf-8")


def parse_endpoint(text: str) -> tuple[str, int]:
    """C{host:port} or C{[v6]:port} into (host, port)."""
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close == -1 or text[close + 1 : close + 2] != ":":
            raise ValueError("IPv6 endpoints are written [address]:port")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError("an endpoint is host:port")
        if ":" in host:
            raise ValueError("IPv6 endpoints are written [address]:port")
    return host, parse_port(port_text)


def parse_port(text: str) -> int:
    if not is_decimal(text.strip()):
        raise ValueError(f"{text!r} is not a port number")
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0..65535")
    return port


def _parse_int(text: str, low: int, high: int) -> int:
    if not is_decimal(text.strip()):
        raise ValueError(f"{text!r} is not a whole number")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{value} is outside {low}..{high}")
    return value


def _parse_list(text: str, parse_one) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise ValueError("empty item in comma-separated list")
    return [parse_one(item) for item in items]


def _address(text: str) -> str:
    return str(ipaddress.ip_interface(text))


def _network(text: str) -> str:
    return str(ipaddress.ip_network(text, strict=False))


def _key(text: str) -> bytes:
    try:
        return decode_key(text)
    except InvalidKey as e:
        raise ValueError(str(e)) from None


def _keepalive(text: str) -> int:
    return 0 if text.strip().lower() == "off" else _parse_int(text, 0, 65535)


# Each section's keys: lower-case name -> (canonical name, parser, repeatable).
_INTERFACE_KEYS = {
    "privatekey": ("PrivateKey", _key, False),
    "address": ("Address", lambda v: _parse_list(v, _address), True),
    "listenport": ("ListenPort", parse_port, False),
    "mtu": ("MTU", lambda v: _parse_int(v, 576, 65535), False),
}
_PEER_KEYS = {
    "publickey": ("PublicKey", _key, False),
    "presharedkey": ("PresharedKey", _key, False),
    "endpoint": ("Endpoint", parse_endpoint, False),
    "allowedips": ("AllowedIPs", lambda v: _parse_list(v, _network), True),
    "persistentkeepalive": ("PersistentKeepalive", _keepalive, False),
}


def parse_config(text: str, path: str = "<config>") -> InterfaceConfig:
    """Parse wg-quick text; raise L{ConfigError} at the first problem."""
    sections: list[tuple[str, int, dict[str, Any]]] = []
    current: dict[str, Any] | None = None
    keys: dict[str, tuple[str, Any, bool]] = {}
    seen_interface = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            name = line.strip("[]").strip().lower()
            if not line.endswith("]") or name not in ("interface", "peer"):
                raise ConfigError(path, number, None, f"unknown section {line}")
            if name == "interface":
                if seen_interface:
                    raise ConfigError(path, number, None, "a second [Interface] section")
                seen_interface = True
                keys = _INTERFACE_KEYS
            else:
                keys = _PEER_KEYS
            current = {}
            sections.append((name, number, current))
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(path, number, None, f"expected Key = Value, got {line!r}")
        if current is None:
            raise ConfigError(path, number, key, "outside any [Interface] or [Peer] section")
        spec = keys.get(key.lower())
        if spec is None:
            if key.lower() in UNSUPPORTED_KEYS:
                raise ConfigError(path, number, key, "a wg-quick key twistvpn does not support")
            raise ConfigError(path, number, key, "unknown key")
        canonical, parse, repeatable = spec
        if canonical in current and not repeatable:
            raise ConfigError(path, number, key, "given twice in one section")
        if not value:
            raise ConfigError(path, number, key, "empty value")
        try:
            parsed = parse(value)
        except ValueError as e:
            raise ConfigError(path, number, key, str(e)) from None
        if repeatable:
            current.setdefault(canonical, []).extend(parsed)
        else:
            current[canonical] = parsed
        current.setdefault("_lines", {})[canonical] = number
    return _assemble(sections, path)


def _assemble(sections: list[tuple[str, int, dict[str, Any]]], path: str) -> InterfaceConfig:
    interfaces = [s for s in sections if s[0] == "interface"]
    if not interfaces:
        raise ConfigError(path, None, None, "no [Interface] section")
    _, line, values = interfaces[0]
    if "PrivateKey" not in values:
        raise ConfigError(path, line, "PrivateKey", "missing from [Interface]")
    peers: list[PeerConfig] = []
    public_keys: set[bytes] = set()
    for kind, line, peer in sections:
        if kind != "peer":
            continue
        if "PublicKey" not in peer:
            raise ConfigError(path, line, "PublicKey", "missing from [Peer]")
        public_key = peer["PublicKey"]
        assert isinstance(public_key, bytes)
        if public_key in public_keys:
            number = peer["_lines"]["PublicKey"]
            raise ConfigError(path, number, "PublicKey", "the same peer appears twice")
        public_keys.add(public_key)
        peers.append(
            PeerConfig(
                public_key=public_key,
                preshared_key=peer.get("PresharedKey"),
                endpoint=peer.get("Endpoint"),
                allowed_ips=tuple(peer.get("AllowedIPs", ())),
                persistent_keepalive=peer.get("PersistentKeepalive", 0),
                endpoint_source=(f"{path}:{peer['_lines']['Endpoint']}"
                                 if "Endpoint" in peer else None),
            )
        )
    return InterfaceConfig(
        private_key=values["PrivateKey"],
        addresses=tuple(values.get("Address", ())),
        listen_port=values.get("ListenPort"),
        mtu=values.get("MTU"),
        peers=tuple(peers),
    )


def load_config(path: str) -> InterfaceConfig:
    """
    Read and parse a wg-quick file, refusing it when others could read it.
    Raises L{ConfigError}, L{InsecurePermissionsError} or OSError.
    """
    return parse_config(read_private_file(path), path)
