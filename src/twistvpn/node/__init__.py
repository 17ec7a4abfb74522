"""The node: a TUN device, one UDP socket, and the WireGuard state between them."""
