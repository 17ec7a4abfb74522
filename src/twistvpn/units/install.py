"""
C{twistvpn service install node|rendezvous|relay [--now] [--args 'OPTION ...']}:
write the shipped unit to C{/etc/systemd/system}, its C{ExecStart} pointing
at this installation's C{twistd} (a virtualenv's included) followed by the
options given in C{--args}, then C{systemctl daemon-reload} and C{enable}
(C{--now}: start it too).  C{twistvpn service uninstall NAME} undoes it.

The unit is written atomically; a failing C{systemctl} is one line that
says which command failed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from typing import TextIO

from twistvpn.common.datadir import write_atomically

SERVICES = ("node", "rendezvous", "relay")
UNIT_DIR = "/etc/systemd/system"
SHIPPED_TWISTD = "/usr/bin/twistd"

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


class InstallError(Exception):
    """Why the unit could not be installed, in one line."""


def unit_name(service: str) -> str:
    return f"twistvpn-{service}.service"


def shipped_unit(service: str) -> str:
    """The unit as shipped in the package."""
    return resources.files(__package__).joinpath(unit_name(service)).read_text("utf-8")


def twistd_path() -> str:
    """This installation's twistd: next to the running interpreter."""
    return os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "twistd")


def render(service: str, twistd: str, extra: Sequence[str] = ()) -> str:
    """The unit with C{twistd} in C{ExecStart} and C{extra} options after its own."""
    lines = []
    for line in shipped_unit(service).splitlines():
        if line.startswith("ExecStart="):
            command = shlex.split(line[len("ExecStart="):])
            command[0] = twistd
            # systemd's quoting is close to the shell's for plain words; quote the rest.
            line = "ExecStart=" + " ".join(shlex.quote(w) for w in [*command, *extra])
        lines.append(line)
    return "\n".join(lines) + "\n"


def _run_systemctl(argv: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["systemctl", *argv], capture_output=True, text=True, timeout=60)


def _systemctl(run: Runner, *argv: str) -> None:
    try:
        done = run(argv)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InstallError(f"systemctl {' '.join(argv)}: {e}") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout or "").strip().splitlines()
        raise InstallError(f"systemctl {' '.join(argv)} failed: "
                           f"{why[-1] if why else f'exit status {done.returncode}'}")


def install(service: str, *, now: bool = False, extra: Sequence[str] = (),
            unit_dir: str = UNIT_DIR, twistd: str | None = None,
            run: Runner | None = None) -> str:
    """Write and enable the unit; its path."""
    run = run or _run_systemctl
    twistd = twistd or twistd_path()
    if not os.access(twistd, os.X_OK):
        raise InstallError(f"{twistd} is not an executable twistd (is twistvpn installed?)")
    path = os.path.join(unit_dir, unit_name(service))
    try:
        write_atomically(path, render(service, twistd, extra), mode=0o644)
    except OSError as e:
        raise InstallError(f"cannot write {path}: {e.strerror or e}") from None
    _systemctl(run, "daemon-reload")
    _systemctl(run, "enable", *(["--now"] if now else []), unit_name(service))
    return path


def uninstall(service: str, *, unit_dir: str = UNIT_DIR, run: Runner | None = None) -> str:
    """Stop and disable the unit, and remove it; its path."""
    run = run or _run_systemctl
    path = os.path.join(unit_dir, unit_name(service))
    if not os.path.exists(path):
        raise InstallError(f"{path}: not installed")
    _systemctl(run, "disable", "--now", unit_name(service))
    os.unlink(path)
    _systemctl(run, "daemon-reload")
    return path


def command(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        if args.action == "install":
            try:
                extra = shlex.split(args.args)
            except ValueError as e:
                raise InstallError(f"--args: {e}") from None
            path = install(args.service, now=args.now, extra=extra, unit_dir=args.unit_dir)
            out.write(f"{path}: installed and enabled"
                      + (", started" if args.now else "") + "\n")
            if not args.now:
                out.write(f"start it: systemctl start {unit_name(args.service)}\n")
        else:
            path = uninstall(args.service, unit_dir=args.unit_dir)
            out.write(f"{path}: stopped, disabled and removed\n")
    except InstallError as e:
        err.write(f"twistvpn: {e}\n")
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """service install|uninstall: the systemd units."""
    p = subparsers.add_parser(
        "service", help="install the systemd unit of the node, rendezvous or relay")
    p.add_argument("action", choices=("install", "uninstall"))
    p.add_argument("service", choices=SERVICES)
    p.add_argument("--now", action="store_true", help="start it too")
    p.add_argument("--unit-dir", default=UNIT_DIR, help=f"where units go (default {UNIT_DIR})")
    p.add_argument("--args", default="", metavar="'OPTION ...'",
                   help="options for the service, appended to its ExecStart "
                        "(e.g. --args '--hostname vpn.example.org')")
    p.set_defaults(func=command)
