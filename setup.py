"""
Builds twistvpn, compiling its per-packet modules (twistvpn.build.COMPILED)
to C extensions with mypyc when it can: a C compiler and Python's headers
are there, and TWISTVPN_PURE_PYTHON is not set.  Otherwise, or when
compiling fails, it installs the same package as plain Python, which
behaves the same (docs/performance.md, "The compiled build").
"""

from __future__ import annotations

import atexit
import os
import runpy
import shlex
import shutil
import sys
import sysconfig
import tempfile
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = runpy.run_path(os.path.join(HERE, "src", "twistvpn", "build.py"))


def _say(message: str) -> None:
    print(f"twistvpn: {message}", file=sys.stderr)


def _why_not_compile() -> str | None:
    """Why the modules cannot be compiled here, or None when they can."""
    if BUILD["pure_requested"]():
        return f"{BUILD['PURE_ENV']} is set"
    if sys.implementation.name != "cpython":
        return f"mypyc compiles for CPython, this is {sys.implementation.name}"
    compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler}; Debian: build-essential)"
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not os.path.exists(headers):
        return f"no Python headers ({headers}; Debian: python3-dev)"
    return None


def _extensions() -> list[Any]:
    why_not = _why_not_compile()
    if why_not is None:
        try:
            from mypyc.build import mypycify
        except ImportError:
            why_not = "mypyc is not installed"
    if why_not is not None:
        _say(f"installing the pure-Python build: {why_not}")
        return []
    # TWISTVPN_COMPILE: a comma-separated subset, for measuring what each
    # module is worth (bench/datapath.py --worth).
    only = os.environ.get("TWISTVPN_COMPILE")
    names = [n for n in BUILD["COMPILED"] if only is None or n in only.split(",")]
    sources = [os.path.join("src", *name.split(".")) + ".py" for name in names]
    try:
        # Twisted is among the build requirements (pyproject.toml): mypyc
        # must see the Twisted classes ours inherit from, or it compiles
        # them as classes with no base.
        return list(mypycify(sources, opt_level="3"))
    except (Exception, SystemExit) as e:  # mypyc exits on a type error
        _say(f"installing the pure-Python build: mypyc failed ({e!r})")
        return []


class OptionalBuildExt(build_ext):
    """Compiles the extensions; on failure leaves none behind, so Python is used."""

    def run(self) -> None:
        try:
            super().run()
            for extension in self.extensions:
                # An extension whose C is unchanged is not built again; its
                # time says it is as new as its source (twistvpn.build.stale_modules).
                path = self.get_ext_fullpath(extension.name)
                if os.path.exists(path):
                    os.utime(path)
        except Exception as e:
            _say(f"compiling failed, installing the pure-Python build: {e}")
            for extension in self.extensions:
                path = self.get_ext_fullpath(extension.name)
                if os.path.exists(path):
                    os.remove(path)
            self.extensions = []


# A fresh build directory each time: setuptools packs everything under
# build/lib into the wheel, so extensions of an earlier build (compiled,
# or with another TWISTVPN_COMPILE) would land in a pure-Python one.
_build_base = tempfile.mkdtemp(prefix="twistvpn-build-")
atexit.register(shutil.rmtree, _build_base, ignore_errors=True)

setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    options={"build": {"build_base": _build_base}},
)
