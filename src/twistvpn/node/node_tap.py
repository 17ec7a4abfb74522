"""
C{twistd twistvpn-node}: the node service's options and construction.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from twisted.application import service
from twisted.python import usage

from twistvpn.node.config import (
    ConfigError,
    InsecurePermissionsError,
    load_config,
    read_private_file,
)
from twistvpn.node.service import NodeStartError, StaticNodeService
from twistvpn.node.tun import DEFAULT_NAME, validate_interface_name
from twistvpn.wireguard.keys import InvalidKey, decode_key


class Options(usage.Options):
    synopsis = "--config wg0.conf [--interface NAME]"
    longdesc = (
        "Run a twistvpn node in static mode: the interface and its peers come from a "
        "wg-quick configuration file, so the node interoperates with stock WireGuard."
    )
    optParameters = [
        ["config", "c", None, "wg-quick configuration file ([Interface] and [Peer] sections)."],
        ["interface", "i", DEFAULT_NAME, "Name of the TUN device to create."],
        [
            "control-dir",
            None,
            "/var/run/wireguard",
            "Directory of the read-only control socket <interface>.sock that `wg show` "
            "reads, as wireguard-go's; empty: none.",
        ],
        [
            "private-key-file",
            None,
            None,
            "Read the interface's private key from this file instead of the config's "
            "PrivateKey (as `wg set ... private-key FILE`).",
        ],
    ]

    def postOptions(self) -> None:
        path = self["config"]
        if not path:
            raise usage.UsageError("--config is required (a wg-quick file)")
        try:
            self["interface"] = validate_interface_name(self["interface"])
        except ValueError as e:
            raise usage.UsageError(f"--interface: {e}") from None
        try:
            self["parsed"] = load_config(path)
        except (ConfigError, InsecurePermissionsError) as e:
            raise usage.UsageError(str(e)) from None
        except OSError as e:
            raise usage.UsageError(f"{path}: {e.strerror or e}") from None
        key_file = self["private-key-file"]
        if key_file:
            try:
                key = decode_key(read_private_file(key_file))
            except InsecurePermissionsError as e:
                raise usage.UsageError(str(e)) from None
            except InvalidKey as e:
                raise usage.UsageError(f"{key_file}: {e}") from None
            except (OSError, UnicodeDecodeError) as e:
                raise usage.UsageError(f"{key_file}: {getattr(e, 'strerror', None) or e}") from None
            self["parsed"] = dataclasses.replace(self["parsed"], private_key=key)


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


def makeService(config: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from twistvpn.node.tun import TunDevice
    from twistvpn.wireguard.device import WireGuardDevice

    top = _ExitOnStartError()
    node = StaticNodeService(
        reactor,
        config["parsed"],
        interface_name=config["interface"],
        open_tun=lambda name, mtu: TunDevice(reactor, name, mtu),
        make_device=WireGuardDevice,
        control_socket=(
            os.path.join(config["control-dir"], f"{config['interface']}.sock")
            if config["control-dir"]
            else None
        ),
    )
    node.setName("node")
    node.setServiceParent(top)
    return top
