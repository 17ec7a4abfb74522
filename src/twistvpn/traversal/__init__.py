"""
NAT traversal: the path manager, the context strategies run in, and the
authenticated probes that verify a path.  See docs/traversal.md.

The strategies themselves are plugins (L{twistvpn.plugins}); L{load_strategies}
finds the built-in ones and any a user dropped into a C{twistvpn/plugins}
directory on C{sys.path}.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.plugin import getPlugins

from twistvpn.interfaces import ITraversalStrategy
from twistvpn.traversal.candidates import Strategy

log = Logger()


def load_strategies() -> list[Strategy]:
    """Every strategy plugin, one per name (the first found wins), by name."""
    import twistvpn.plugins

    found: dict[str, Strategy] = {}
    for strategy in getPlugins(ITraversalStrategy, twistvpn.plugins):
        if strategy.name in found:
            log.warn("two traversal strategies are named {name}; keeping the first",
                     name=strategy.name)
            continue
        found[strategy.name] = strategy
    return [found[name] for name in sorted(found)]
