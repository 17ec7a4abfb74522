"""
The path to a stock WireGuard device (docs/devices.md): the official app on
a phone or laptop, which speaks plain WireGuard to the relay and nothing of
ours.  It never answers probes, so there is nothing to traverse: it is
reached through the relay only, and WireGuard's own roaming sets its
endpoint (the relay's handle for it) from its authenticated packets.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from twistvpn.interfaces import IPathManager
from twistvpn.traversal.candidates import describe
from twistvpn.traversal.manager import NONE, RELAY


@implementer(IPathManager)
class DevicePath:
    """A path manager with nothing to manage: the device's endpoint is WireGuard's."""

    def __init__(self, wg: Any, peer_key: bytes) -> None:
        self.wg = wg  # IWireGuardPeer
        self.peer_key = peer_key
        self.history: list[Any] = []
        self.rtt = None

    @property
    def endpoint(self) -> Any:
        return self.wg.endpoint

    @property
    def kind(self) -> str:
        return RELAY if self.wg.endpoint is not None else NONE

    def start(self) -> None:
        """Nothing to start: the device makes the first move (its keepalive)."""

    def stop(self) -> None:
        """Nothing to stop."""

    def update_candidates(self, local: Any = None, peer: Any = None) -> None:
        """A device has no candidates of its own: only the relay reaches it."""

    def punch_now(self) -> None:
        """A device does not punch."""

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind, "device": True,
                "endpoint": describe(self.endpoint) if self.endpoint is not None else None,
                "rtt": None, "strategy": None, "paths": [], "attempts": [], "events": []}
