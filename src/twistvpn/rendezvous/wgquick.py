"""
A stock WireGuard device's configuration as a wg-quick file, the format
every official WireGuard app imports (as a file, or as a QR code on phones).
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

# Where the device made its own key and the rendezvous never had it.
PRIVATE_KEY_PLACEHOLDER = "REPLACE_WITH_THIS_DEVICES_PRIVATE_KEY"
KEEPALIVE = 25  # seconds: keeps the device's NAT mapping, and the relay's tables, alive


def render(config: dict[str, Any], private_key: str | None = None) -> str:
    """
    The wg-quick file for C{config} (the admin API's device config): one
    [Peer] per node, each reached at the relay's address.
    """
    lines = [
        f"# twistvpn device {config['name']} ({config['node_id']}) in network "
        f"{config['network_id']}",
        "[Interface]",
        f"PrivateKey = {private_key or PRIVATE_KEY_PLACEHOLDER}",
        f"Address = {', '.join(config['address'])}",
    ]
    if config.get("dns"):
        lines.append(f"DNS = {', '.join(config['dns'])}")
    for peer in config["peers"]:
        lines += [
            "",
            f"# {peer['name']} ({peer['node_id']})",
            "[Peer]",
            f"PublicKey = {peer['public_key']}",
            f"AllowedIPs = {', '.join(peer['allowed_ips'])}",
            f"Endpoint = {config['endpoint']}",
            f"PersistentKeepalive = {KEEPALIVE}",
        ]
    return "\n".join(lines) + "\n"


def strip(text: str) -> str:
    """
    What C{wg-quick strip} makes of a wg-quick file: the lines C{wg setconf}
    takes (Address, DNS, MTU and the other wg-quick-only keys removed).
    """
    wg_quick_only = {"address", "dns", "mtu", "table", "preup", "postup", "predown",
                     "postdown", "saveconfig"}
    kept = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip().lower()
        if "=" in line and key in wg_quick_only:
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


class QRError(Exception):
    """The QR code cannot be drawn here."""


def qr_code(text: str) -> str:
    """C{text} as a QR code for a terminal, drawn by Debian's qrencode."""
    program = shutil.which("qrencode")
    if program is None:
        raise QRError("qrencode is not installed (apt-get install qrencode)")
    result = subprocess.run([program, "-t", "ansiutf8"], input=text.encode(),
                            capture_output=True, timeout=10, check=False)
    if result.returncode != 0:
        raise QRError(f"qrencode failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout.decode()
