"""
twistvpn's plugin package: traversal strategies (L{ITraversalStrategy}).

Like C{twisted/plugins}, it spans every C{twistvpn/plugins} directory on
C{sys.path}, so a user's own strategy module dropped into one is found by
C{twisted.plugin.getPlugins} beside the built-in ones.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # noqa: F821
__all__: list[str] = []
