"""
What the rendezvous, the relay and the node share, below all three: proof
of possession of a key (L{auth}), TLS pinning and loading (L{tls}), AMP
basics (L{amp}), rate limits (L{ratelimit}) and listening services with
socket sizing (L{services}).  Imports run one way: wireguard, then common,
then traversal and rendezvous, then relay, then node.
"""
