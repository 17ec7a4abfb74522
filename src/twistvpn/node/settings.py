"""
A joined node's settings, kept in its data directory (C{node.toml}), so
that C{twistd twistvpn-node} needs no other argument and C{twistvpn join},
C{leave} and C{set} persist what they change::

    # twistvpn node settings: `twistvpn join`, `leave` and `set` edit this file.
    rendezvous = "twistvpn://203.0.113.10:8443#sha256=9f86d0..."
    networks = ["8f3a5c0d9e1b2a47"]
    name = "gpu-server"
    port = 41641

The file is TOML (read with the standard library's C{tomllib}), flat, with
the node's option names as keys.  Each value is checked by the same
function that checks the command-line option, so a bad value is one line
naming the file, the line and the key.  The file is written whole to a
temporary file (0600), flushed to disk and renamed over the old one: a
crash leaves the old settings or the new, never half of them.

Nothing secret lives here: a pre-auth key waiting to be used is a file of
its own (L{pending_key_path}), removed once the network has authorized
the node.
"""

from __future__ import annotations

import json
import os
import re
import socket
import string
import tomllib
from collections.abc import Callable
from typing import Any

from twistvpn.common.datadir import (
    InsecurePermissionsError,
    check_private_file,
    make_data_dir,
    write_atomically,
)
from twistvpn.common.metrics import is_loopback_endpoint
from twistvpn.common.tls import TLSConfigError, parse_address
from twistvpn.node.files import SETTINGS_NAME

NAME_LENGTH = 64
MAX_NETWORKS = 64
MAX_ANSWER_WAIT_US = 10_000
MAX_SETTINGS_SIZE = 64 * 1024
MAX_RENDEZVOUS = 8

HEADER = "# twistvpn node settings: `twistvpn join`, `leave` and `set` edit this file.\n"


class SettingsError(ValueError):
    """A settings file or value that cannot be used: one line naming it."""


# -- the checks, shared with the command line ------------------------------------------


def check_rendezvous(value: Any) -> str | list[str]:
    """
    A twistvpn://HOST:PORT#sha256=... address, or a list of them: the
    instances of one rendezvous, tried in turn (docs/rendezvous.md).
    """
    if isinstance(value, list) and 0 < len(value) <= MAX_RENDEZVOUS:
        return rendezvous_setting([_check_one_rendezvous(v) for v in value])
    if isinstance(value, list):
        raise ValueError(f"must list 1 to {MAX_RENDEZVOUS} twistvpn://HOST:PORT#sha256=... "
                         "addresses")
    return _check_one_rendezvous(value)


def _check_one_rendezvous(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a twistvpn://HOST:PORT#sha256=... address")
    try:
        parse_address(value)
    except TLSConfigError as e:
        raise ValueError(str(e)) from None
    return value.strip()


def rendezvous_setting(urls: list[str]) -> str | list[str]:
    """As the file keeps it: one address as a string, several as a list, each once."""
    unique = list(dict.fromkeys(urls))
    return unique[0] if len(unique) == 1 else unique


def rendezvous_urls(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def check_network_id(value: Any) -> str:
    """A network ID: 16 hex digits, lower-cased."""
    if (not isinstance(value, str) or len(value) != 16
            or any(c not in string.hexdigits for c in value)):
        raise ValueError(f"{str(value)[:40]!r} is not a network ID (16 hex digits)")
    return value.lower()


def check_networks(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_NETWORKS:
        raise ValueError(f"must be a list of at most {MAX_NETWORKS} network IDs")
    return list(dict.fromkeys(check_network_id(v) for v in value))


def check_name(value: Any) -> str:
    if (not isinstance(value, str) or not value or len(value) > NAME_LENGTH
            or not value.isprintable() or value != value.strip()):
        raise ValueError(f"{str(value)[:80]!r} must be 1 to {NAME_LENGTH} printable "
                         "characters, without leading or trailing spaces")
    return value


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{str(value)[:40]!r} is not a number") from None
        if not low <= number <= high:
            raise ValueError(f"{number} is out of range ({low} to {high})")
        return number

    return check


def check_interface(value: Any) -> str:
    from twistvpn.node.tun import validate_interface_name

    if not isinstance(value, str):
        raise ValueError("must be an interface name")
    return validate_interface_name(value)


def check_metrics(value: Any) -> str:
    if not isinstance(value, str) or not is_loopback_endpoint(value):
        raise ValueError(f"{str(value)[:80]}: only on loopback (tcp:PORT:interface=127.0.0.1); "
                         "use twistvpn metrics, or a local scraper")
    return value


def check_system_dns(value: Any) -> str:
    if value not in ("auto", "off"):
        raise ValueError(f"{str(value)[:40]!r} is not auto (tell systemd-resolved where "
                         "it runs) or off")
    return str(value)


def check_port_mapping(value: Any) -> str:
    if value not in ("auto", "pcp", "natpmp", "upnp", "off"):
        raise ValueError(f"{str(value)[:40]!r} is not auto, pcp, natpmp, upnp or off")
    return str(value)


def check_tso(value: Any) -> str:
    if value not in ("auto", "on", "off"):
        raise ValueError(f"{str(value)[:40]!r} is not auto (where the build is compiled), "
                         "on or off")
    return str(value)


# Every key the file may hold, with its check; the node's option of the same name.
CHECKS: dict[str, Callable[[Any], Any]] = {
    "rendezvous": check_rendezvous,
    "networks": check_networks,
    "name": check_name,
    "port": _integer(0, 65535),
    "interface": check_interface,
    "metrics": check_metrics,
    "dns-port": _integer(0, 65535),
    "system-dns": check_system_dns,
    "port-mapping": check_port_mapping,
    "answer-wait-us": _integer(0, MAX_ANSWER_WAIT_US),
    "stay-awake-ms": _integer(0, 1000),
    "tso": check_tso,
}
# What `twistvpn set` may change, and whether the running node applies it at once.
SETTABLE: dict[str, bool] = {
    "name": True,
    "rendezvous": False,
    "port": False,
    "interface": False,
    "metrics": False,
    "dns-port": False,
    "system-dns": False,
    "port-mapping": False,
    "answer-wait-us": False,
    "stay-awake-ms": False,
    "tso": False,
}


def default_name() -> str:
    return socket.gethostname()[:NAME_LENGTH] or "node"


# -- the file ---------------------------------------------------------------------------


def settings_path(data_dir: str) -> str:
    return os.path.join(data_dir, SETTINGS_NAME)


def _line_of(text: str, key: str) -> int:
    pattern = re.compile(rf'^[ \t]*("{re.escape(key)}"|{re.escape(key)})\s*=', re.MULTILINE)
    found = pattern.search(text)
    return text.count("\n", 0, found.start()) + 1 if found else 1


def load(data_dir: str) -> dict[str, Any]:
    """
    The settings in C{data_dir}, checked (an empty dict when there is no
    file yet); a L{SettingsError} naming file, line and key otherwise.
    """
    path = settings_path(data_dir)
    try:
        check_private_file(path)
        with open(path, "rb") as f:
            data = f.read(MAX_SETTINGS_SIZE + 1)
    except FileNotFoundError:
        return {}
    except InsecurePermissionsError as e:
        raise SettingsError(str(e).replace("a private key", "the node's settings")) from None
    except OSError as e:
        raise SettingsError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_SETTINGS_SIZE:
        raise SettingsError(f"{path}: larger than {MAX_SETTINGS_SIZE} bytes")
    try:
        text = data.decode("utf-8")
        raw = tomllib.loads(text)
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        # "Invalid value (at line 3, column 8)" -> "path:3: invalid value"
        where = re.search(r"\(at line (\d+), column \d+\)", str(e))
        line = where.group(1) if where else "1"
        why = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(e))
        raise SettingsError(f"{path}:{line}: {why[:1].lower()}{why[1:]}") from None
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        check = CHECKS.get(key)
        if check is None:
            raise SettingsError(f"{path}:{_line_of(text, key)}: {key}: unknown setting "
                                f"(known: {', '.join(CHECKS)})")
        try:
            settings[key] = check(value)
        except ValueError as e:
            raise SettingsError(f"{path}:{_line_of(text, key)}: {key}: {e}") from None
    return settings


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # A JSON string with non-ASCII escaped is a TOML basic string.
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to the settings")


def dumps(settings: dict[str, Any]) -> str:
    lines = [HEADER]
    for key in CHECKS:  # a stable order, the file's keys only
        if key in settings and settings[key] is not None:
            lines.append(f"{key} = {_toml_value(settings[key])}\n")
    return "".join(lines)


def save(data_dir: str, settings: dict[str, Any]) -> None:
    """Write C{settings} (checked) to C{data_dir}, atomically, readable by root only."""
    for key, value in settings.items():
        if key not in CHECKS:
            raise SettingsError(f"{key}: unknown setting")
        try:
            CHECKS[key](value)
        except ValueError as e:
            raise SettingsError(f"{key}: {e}") from None
    make_data_dir(data_dir)
    path = settings_path(data_dir)
    try:
        write_atomically(path, dumps(settings))
    except OSError as e:
        raise SettingsError(f"cannot write {path}: {e.strerror or e}") from None


def update(data_dir: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Load, C{change} in place, save; the new settings."""
    settings = load(data_dir)
    change(settings)
    save(data_dir, settings)
    return settings


def add_network(settings: dict[str, Any], network_id: str) -> None:
    networks = settings.setdefault("networks", [])
    if network_id not in networks:
        networks.append(network_id)


def remove_network(settings: dict[str, Any], network_id: str) -> None:
    settings["networks"] = [n for n in settings.get("networks", []) if n != network_id]


# -- a pre-auth key waiting for its network --------------------------------------------


def pending_key_path(data_dir: str, network_id: str) -> str:
    return os.path.join(data_dir, f"auth-key-{network_id}")


def store_pending_key(data_dir: str, network_id: str, key: str) -> None:
    """Keep C{key} (0600) until C{network_id} authorizes the node."""
    make_data_dir(data_dir)
    write_atomically(pending_key_path(data_dir, network_id), key + "\n")


def pending_keys(data_dir: str, networks: list[str]) -> dict[str, str]:
    """The pre-auth keys still waiting, by network."""
    keys = {}
    for network_id in networks:
        path = pending_key_path(data_dir, network_id)
        try:
            check_private_file(path)
            with open(path, encoding="utf-8") as f:
                keys[network_id] = f.read(512).strip()
        except (OSError, ValueError):
            continue
    return keys


def drop_pending_key(data_dir: str, network_id: str) -> None:
    try:
        os.unlink(pending_key_path(data_dir, network_id))
    except FileNotFoundError:
        pass


def read_auth_key_file(path: str) -> str:
    """A pre-auth key from a file only its owner may read; a one-line error naming it."""
    from twistvpn.rendezvous.files import KEY_PREFIX

    try:
        check_private_file(path)
        with open(path, encoding="utf-8") as f:
            key = f.read(512).strip()
    except InsecurePermissionsError as e:
        raise SettingsError(str(e).replace("a private key", "a pre-auth key")) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    if not key.startswith(KEY_PREFIX) or len(key) > 200 or not key.isprintable():
        raise SettingsError(f"{path}: not a pre-auth key (they start with {KEY_PREFIX})")
    return key
