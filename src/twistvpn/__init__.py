"""twistvpn: a peer-to-peer mesh VPN on Twisted that speaks the WireGuard protocol."""

from twistvpn import build as _build

__version__ = "0.1.0"

if _build.pure_requested():
    _build.use_pure_python()
elif _build.stale_modules():
    # A checkout whose compiled modules were built before its last edit: the
    # edit is what should run.  All of them, as the compiled ones are one unit.
    import warnings

    warnings.warn(
        "twistvpn: compiled modules older than their source, running the pure-Python "
        "build; run `.venv/bin/pip install -e .` to compile again",
        stacklevel=2,
    )
    _build.use_pure_python()
