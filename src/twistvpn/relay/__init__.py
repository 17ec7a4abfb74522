"""
The relay: carries peers' WireGuard datagrams, unchanged and still
encrypted, when no direct path between them can be punched.

L{server.RelayServer} is the relay itself (embedded in the rendezvous or
standalone, L{twistvpn.relay.relay_tap}); L{client.RelayClient} is a node's
side of it; L{policy.MembershipPolicy} says who may reach whom.
"""
