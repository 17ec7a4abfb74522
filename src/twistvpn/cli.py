"""
The C{twistvpn} command.

Subcommands come from the modules in L{COMMANDS}, each exposing
C{register(subparsers)} that adds its parsers and sets C{func} (called with
the parsed arguments, returning an exit status) as their default.  Adding a
command to twistvpn is adding its name and module to that table.  A run
imports only the module of the command it was given (all of them only for
the overall help), so C{twistvpn genkey} loads no server, relay or lab.
"""

from __future__ import annotations

import argparse
import importlib
import os
import stat
import sys
from typing import Any, TextIO

from twistvpn import __version__, build
from twistvpn.wireguard.keys import (
    InvalidKey,
    decode_key,
    encode_key,
    generate_preshared_key,
    generate_private_key,
    public_key,
)

COMMANDS: dict[str, str] = {
    "genkey": "twistvpn.cli",
    "pubkey": "twistvpn.cli",
    "genpsk": "twistvpn.cli",
    "lab": "twistvpn.testing.lab",
    "admin": "twistvpn.rendezvous.admin_cli",
    "status": "twistvpn.node.local_cli",
    "ping": "twistvpn.node.local_cli",
    "netcheck": "twistvpn.node.local_cli",
    "metrics": "twistvpn.node.local_cli",
    "join": "twistvpn.node.local_cli",
    "leave": "twistvpn.node.local_cli",
    "networks": "twistvpn.node.local_cli",
    "set": "twistvpn.node.local_cli",
    "service": "twistvpn.units.install",
}
COMMAND_MODULES: list[str] = list(dict.fromkeys(COMMANDS.values()))


def modules_for(argv: list[str]) -> list[str]:
    """The command modules a run with C{argv} needs: the named command's, else all."""
    words = [word for word in argv if not word.startswith("-")]
    if words and words[0] in COMMANDS and argv[0] == words[0]:
        return [COMMANDS[words[0]]]
    return COMMAND_MODULES


def _warn_if_world_accessible(out: TextIO, err: TextIO) -> None:
    """As C{wg genkey}: a secret written to a file others can read is a leak."""
    try:
        mode = os.fstat(out.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return
    if stat.S_ISREG(mode) and mode & stat.S_IRWXO:
        err.write(
            "Warning: writing to world accessible file.\n"
            "Consider setting the umask to 077 and trying again.\n"
        )


def genkey(args: argparse.Namespace) -> int:
    _warn_if_world_accessible(sys.stdout, sys.stderr)
    sys.stdout.write(encode_key(generate_private_key()) + "\n")
    return 0


def genpsk(args: argparse.Namespace) -> int:
    _warn_if_world_accessible(sys.stdout, sys.stderr)
    sys.stdout.write(encode_key(generate_preshared_key()) + "\n")
    return 0


def pubkey(args: argparse.Namespace) -> int:
    # wg reads at most one key and tolerates trailing whitespace only.
    text = sys.stdin.read(4096)
    try:
        private = decode_key(text)
    except InvalidKey:
        sys.stderr.write("twistvpn pubkey: unable to read private key from stdin\n")
        return 1
    sys.stdout.write(encode_key(public_key(private)) + "\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The key commands, byte-compatible with C{wg genkey/pubkey/genpsk}."""
    p = subparsers.add_parser("genkey", help="print a new private key (as `wg genkey`)")
    p.set_defaults(func=genkey)
    p = subparsers.add_parser(
        "pubkey", help="read a private key on stdin, print its public key (as `wg pubkey`)"
    )
    p.set_defaults(func=pubkey)
    p = subparsers.add_parser("genpsk", help="print a new preshared key (as `wg genpsk`)")
    p.set_defaults(func=genpsk)


class _Version(argparse.Action):
    """C{--version}, with the build: which one is known only by importing it."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(f"twistvpn {__version__}, {build.describe()}")
        parser.exit()


def build_parser(modules: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twistvpn",
        description="twistvpn: a peer-to-peer mesh VPN on Twisted that speaks WireGuard. "
        "Run a node with `twistd -n twistvpn-node --config wg0.conf`.",
    )
    parser.add_argument(
        "--version", action=_Version, nargs=0, help="print the version and which build runs"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES if modules is None else modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(modules_for(argv))
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
