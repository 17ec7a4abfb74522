"""The node's reactor for twistd: C{twistd --reactor twistvpn twistvpn-node ...}."""

from twisted.application.reactors import Reactor

twistvpn = Reactor(
    "twistvpn",
    "twistvpn.node.reactor",
    "epoll(4), with the twistvpn data plane's descriptors dispatched directly",
)
