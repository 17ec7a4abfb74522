"""
What the integration tests need of the machine, as skip reasons.
"""

from __future__ import annotations

from twistvpn.testing import netns


def joined_mode_missing() -> str | None:
    """Why these tests cannot run here, or None."""
    missing = netns.missing_requirements("iptables", "ping")
    if missing:
        return missing
    from twistvpn.node import node_tap

    if "join" not in node_tap.Options().synonyms:
        return "the node has no joined mode (twistvpn-node --join)"
    return None
