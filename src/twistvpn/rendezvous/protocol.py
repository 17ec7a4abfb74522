"""
The control channel's AMP commands, shared by the rendezvous
(L{twistvpn.rendezvous.server}) and the node (L{twistvpn.rendezvous.client}).

A connection goes: the node asks for a L{Challenge}, answers it in
L{Register} (proof of possession of its static key), then sends a L{Join}
per network.  The rendezvous pushes L{NetworkMapPush}, L{PunchPush} and
L{RevokedPush} without waiting for answers, and L{Ping}s to measure the
round trip and to notice dead connections.
"""

from __future__ import annotations

from twisted.protocols import amp

from twistvpn.common.amp import BigBytes
from twistvpn.common.auth import AuthError
from twistvpn.rendezvous.errors import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
)

PROTOCOL_VERSION = 1
# With several rendezvous instances, a node whose instance went away moves
# to the next one after a random wait of up to its spread, so that a dead
# instance's nodes reach the survivors spread out, not in one instant.  An
# instance's answers to liveness pings say how long (its node count over
# what the survivors register), FAILOVER_SPREAD to FAILOVER_SPREAD_MAX
# seconds; FAILOVER_SPREAD before the first answer.
FAILOVER_SPREAD = 5.0
FAILOVER_SPREAD_MAX = 120.0

ERRORS: dict[type[Exception], bytes] = {
    AuthError: b"AUTH_FAILED",
    NotFoundError: b"NOT_FOUND",
    ConflictError: b"CONFLICT",
    InvalidArgumentError: b"BAD_REQUEST",
}


class Challenge(amp.Command):
    """node -> rendezvous: a fresh single-use challenge, and the server's key."""

    arguments = []
    response = [
        (b"challenge", amp.String()),
        (b"server_key", amp.String()),
        (b"protocol", amp.Integer()),
    ]
    errors = ERRORS


class Register(amp.Command):
    """node -> rendezvous: who I am, proven by a MAC over the challenge."""

    arguments = [
        (b"public_key", amp.String()),
        (b"proof", amp.String()),
        (b"name", amp.Unicode()),
        (b"local_endpoints", amp.ListOf(amp.Unicode())),
        # The node's twistvpn version, for admins (the console's member table).
        (b"version", amp.Unicode(optional=True)),
        # Addresses its gateway forwards to it (PCP, NAT-PMP): reachable by any peer.
        (b"mapped_endpoints", amp.ListOf(amp.Unicode(), optional=True)),
        # What else the node reads: "zlib", maps and deltas compressed
        # (netmap.compress).  Older rendezvous ignore it, older nodes omit it.
        (b"accepts", amp.ListOf(amp.Unicode(), optional=True)),
    ]
    response = [
        (b"node_id", amp.Unicode()),
        (b"udp_ports", amp.ListOf(amp.Integer())),
        # Discovery requests carry it: those made for an earlier process are replays.
        (b"discovery_epoch", amp.String()),
        # The IPv6 address the discovery ports also answer on (nodes with
        # global IPv6 learn their IPv6 public endpoint there), if any.
        (b"discovery6", amp.Unicode(optional=True)),
    ]
    errors = ERRORS


class Join(amp.Command):
    """node -> rendezvous: membership of a network; "authorized" or "pending"."""

    arguments = [
        (b"network_id", amp.Unicode()),
        # A pre-auth key: authorized at once, without an admin.
        (b"auth_key", amp.Unicode(optional=True)),
    ]
    response = [
        (b"status", amp.Unicode()),
        # Why the key did not authorize (expired, revoked, used, wrong).
        (b"key_refused", amp.Unicode(optional=True)),
    ]
    errors = ERRORS


class Leave(amp.Command):
    """node -> rendezvous: stop sending this network's map."""

    arguments = [(b"network_id", amp.Unicode())]
    response = []
    errors = ERRORS


class SetName(amp.Command):
    """node -> rendezvous: call me this from now on."""

    arguments = [(b"name", amp.Unicode())]
    response = []
    errors = ERRORS


class SetMappedEndpoints(amp.Command):
    """node -> rendezvous: my gateway now forwards these public addresses to me."""

    arguments = [(b"endpoints", amp.ListOf(amp.Unicode()))]
    response = []
    errors = ERRORS


class SetLocalEndpoints(amp.Command):
    """node -> rendezvous: my LAN addresses changed."""

    arguments = [(b"endpoints", amp.ListOf(amp.Unicode()))]
    response = []
    errors = ERRORS


class RequestPunch(amp.Command):
    """node -> rendezvous: coordinate traversal with this peer."""

    arguments = [(b"network_id", amp.Unicode()), (b"peer_key", amp.String())]
    response = []
    errors = ERRORS


class NetworkMapPush(amp.Command):
    """rendezvous -> node: the network's current map (JSON, see netmap)."""

    arguments = [(b"network_id", amp.Unicode()), (b"netmap", BigBytes())]
    requiresAnswer = False


class MapDeltaPush(amp.Command):
    """rendezvous -> node: the change since the last map (JSON, see netmap)."""

    arguments = [(b"network_id", amp.Unicode()), (b"delta", BigBytes())]
    requiresAnswer = False


class RequestMap(amp.Command):
    """node -> rendezvous: send the full map again (a delta did not apply)."""

    arguments = [(b"network_id", amp.Unicode())]
    response = []
    errors = ERRORS


class PunchPush(amp.Command):
    """rendezvous -> node: start traversal towards a peer in C{delay} seconds."""

    arguments = [
        (b"network_id", amp.Unicode()),
        (b"peer_key", amp.String()),
        (b"candidates", amp.ListOf(amp.Unicode())),
        (b"delay", amp.Float()),
        (b"punch_id", amp.Unicode()),
    ]
    requiresAnswer = False


class RevokedPush(amp.Command):
    """rendezvous -> node: you are no longer an authorized member."""

    arguments = [(b"network_id", amp.Unicode()), (b"reason", amp.Unicode())]
    requiresAnswer = False


def encoded_push(command: type[amp.Command], **arguments: object) -> bytes:
    """
    The AMP box of a push (a command that wants no answer) as bytes: the
    same for every node a push goes to, so a push to the thousands of
    members of a network is encoded once, not once per member.
    """
    if command.requiresAnswer:
        raise ValueError(f"{command.__name__} wants an answer: its boxes differ by their tag")
    box = command.makeArguments(arguments, None)
    box[amp.COMMAND] = command.commandName
    return box.serialize()
