"""twistd plugins for twistvpn: one ServiceMaker per process kind."""

from twisted.application.service import ServiceMaker

twistvpn_node = ServiceMaker(
    "twistvpn node",
    "twistvpn.node.node_tap",
    "A twistvpn node: a TUN device and the WireGuard protocol (static mode: a wg-quick file)",
    "twistvpn-node",
)
twistvpn_rendezvous = ServiceMaker(
    "twistvpn rendezvous",
    "twistvpn.rendezvous.rendezvous_tap",
    "The twistvpn rendezvous: endpoint discovery, network controller, admin API",
    "twistvpn-rendezvous",
)

twistvpn_relay = ServiceMaker(
    "twistvpn relay",
    "twistvpn.relay.relay_tap",
    "A standalone twistvpn relay: carries encrypted WireGuard datagrams over UDP or TLS",
    "twistvpn-relay",
)
