"""
Helpers for testing twistvpn and plugins written for it: real networks in
network namespaces (L{twistvpn.testing.netns}) and the simulated NAT network
(C{twistvpn.testing.natsim}).  Shipped with the package so that authors of
traversal strategies can test theirs the way twistvpn tests its own.
"""
