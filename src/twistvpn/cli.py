"""The twistvpn command (placeholder until the node helper fills it)."""
