"""
The rendezvous: endpoint discovery over UDP, the network controller
(networks, members, managed IPs) over an AMP control channel in TLS,
persistence in sqlite and the admin API.

Layers, as in magic-wormhole's mailbox server: plain state objects
(L{controller}, L{database}) below thin protocol adapters (L{server},
L{discovery}, L{admin}); L{client} is the node's side of the same channel.
"""
