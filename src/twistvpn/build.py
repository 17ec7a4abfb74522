"""
Which build of twistvpn runs: the per-packet modules compiled to C
extensions by mypyc, or everything as plain Python (docs/performance.md,
"The compiled build").

The same C{.py} files are the one source of both: C{setup.py} compiles the
modules in L{COMPILED} when a C compiler and Python's headers are there,
and installs them as plain Python otherwise.  A compiled install still
holds the C{.py} files; with C{TWISTVPN_PURE_PYTHON=1} in the environment
it imports those instead, so both builds can be tested and measured from
one install, in one run.

This module imports only the standard library: C{setup.py} reads
L{COMPILED} from it before anything else is installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

# The per-packet path, each module worth compiling on its own measurement
# (docs/performance.md lists what each is worth).
COMPILED: tuple[str, ...] = (
    "twistvpn.wireguard.messages",
    "twistvpn.wireguard.replay",
    "twistvpn.wireguard.allowedips",
    "twistvpn.wireguard.noise",
    "twistvpn.wireguard.cookie",
    "twistvpn.wireguard.device",
    "twistvpn.node.awake",
    "twistvpn.node.offload",
    "twistvpn.node.fastpath",
    "twistvpn.node.tun",
    "twistvpn.node.forwarder",
)

# Set (to anything but "" or "0") to import the .py files of a compiled
# install, or, at install time, to build plain Python only.
PURE_ENV = "TWISTVPN_PURE_PYTHON"


def pure_requested(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether C{environ} asks for plain Python."""
    return environ.get(PURE_ENV, "") not in ("", "0")


def is_compiled(module: ModuleType) -> bool:
    """Whether C{module} was loaded from a C extension."""
    origin = getattr(module, "__file__", None) or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def compiled_modules(names: Sequence[str] = COMPILED) -> list[str]:
    """The modules of C{names} that run compiled in this process."""
    return [name for name in names if is_compiled(importlib.import_module(name))]


def stale_modules(package: str = os.path.dirname(os.path.abspath(__file__))) -> list[str]:
    """
    In a source checkout with compiled modules built in place (C{pip install
    -e}), those whose C{.py} changed since: running them would run old code.
    """
    checkout = os.path.dirname(os.path.dirname(package))
    if not os.path.exists(os.path.join(checkout, "pyproject.toml")):
        return []  # an installed package: its files are the ones it was built from
    stale = []
    for name in COMPILED:
        base = os.path.join(os.path.dirname(package), *name.split("."))
        try:
            source = os.stat(base + ".py").st_mtime
        except OSError:
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            try:
                if os.stat(base + suffix).st_mtime < source:
                    stale.append(name)
            except OSError:
                pass
    return stale


def describe() -> str:
    """One line for C{--version} and the node's start-up log."""
    running = compiled_modules()
    if len(running) == len(COMPILED):
        return f"compiled build (mypyc, {len(running)} modules)"
    if running:
        missing = ", ".join(sorted(set(COMPILED) - set(running)))
        return f"partly compiled build ({len(running)} of {len(COMPILED)}; not: {missing})"
    if pure_requested():
        return f"pure-Python build ({PURE_ENV} is set)"
    if stale_modules():
        return "pure-Python build (the compiled modules are older than their source)"
    return "pure-Python build"


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the C{.py} file of a module of L{COMPILED}, passing over its extension."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED or not path:
            return None
        leaf = fullname.rpartition(".")[2]
        for directory in path:
            source = os.path.join(directory, leaf + ".py")
            if os.path.exists(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def use_pure_python() -> None:
    """Import the modules of L{COMPILED} from their C{.py} files from now on."""
    if not any(isinstance(finder, _SourceFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder())
