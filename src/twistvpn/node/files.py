"""
What lives in a joined node's data directory, by name, and the local API's
limits: shared by the node and the commands that talk to it, so that
C{twistvpn status} needs none of the node's code.
"""

DEFAULT_DATA_DIR = "/var/lib/twistvpn"
SOCKET_NAME = "node.sock"
SETTINGS_NAME = "node.toml"
MAX_PINGS = 1000
