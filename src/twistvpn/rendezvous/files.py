"""
What lives in a rendezvous's data directory, by name: the one place the
server and the commands that talk to it agree on, so that
C{twistvpn admin} needs none of the server's code to find its socket.
"""

DEFAULT_DATA_DIR = "/var/lib/twistvpn-rendezvous"
ADMIN_SOCKET = "admin.sock"
STATE_FILE = "rendezvous.json"
TOKEN_FILE = "admin-token"
AUDIT_FILE = "audit.log"
# What a pre-auth key's secret starts with, so a person can tell it from a node key.
KEY_PREFIX = "tvkey-"
WEB_PASSWORD_FILE = "web-password"
