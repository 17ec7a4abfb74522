"""twistvpn: a peer-to-peer mesh VPN on Twisted that speaks the WireGuard protocol."""

__version__ = "0.1.0"
