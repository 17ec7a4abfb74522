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

from typing import Any

from twisted.protocols import amp

from twistvpn.rendezvous.auth import AuthError
from twistvpn.rendezvous.controller import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
)

PROTOCOL_VERSION = 1
# A node's commands are small; a box beyond this is an attack or a bug.
MAX_INBOUND_BOX = 64 * 1024
# A map of a few thousand members, split over several AMP values.
MAX_MAP_BYTES = 16 * 1024 * 1024
_CHUNK = amp.MAX_VALUE_LENGTH

ERRORS: dict[type[Exception], bytes] = {
    AuthError: b"AUTH_FAILED",
    NotFoundError: b"NOT_FOUND",
    ConflictError: b"CONFLICT",
    InvalidArgumentError: b"BAD_REQUEST",
}


class BigBytes(amp.Argument):
    """
    Bytes longer than one AMP value (64 KiB): a network map of many members.
    Stored as C{name} (the number of chunks) and C{name.0}, C{name.1}, ...
    """

    def __init__(self, max_length: int = MAX_MAP_BYTES, optional: bool = False) -> None:
        super().__init__(optional)
        self.max_length = max_length

    def toBox(self, name: bytes, strings: dict, objects: dict, proto: Any) -> None:
        value = objects[name.decode("ascii")]
        if len(value) > self.max_length:
            raise amp.TooLong(False, False, name, value)
        chunks = [value[i : i + _CHUNK] for i in range(0, len(value), _CHUNK)] or [b""]
        strings[name] = str(len(chunks)).encode("ascii")
        for i, chunk in enumerate(chunks):
            strings[name + b"." + str(i).encode("ascii")] = chunk

    def fromBox(self, name: bytes, strings: dict, objects: dict, proto: Any) -> None:
        count = strings.get(name)
        if count is None:
            if self.optional:
                objects[name.decode("ascii")] = None
                return
            raise KeyError(name)
        n = int(count)
        if not 0 < n <= self.max_length // _CHUNK + 1:
            raise ValueError(f"bad chunk count {n}")
        objects[name.decode("ascii")] = b"".join(
            strings[name + b"." + str(i).encode("ascii")] for i in range(n)
        )


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
    ]
    response = [(b"node_id", amp.Unicode()), (b"udp_ports", amp.ListOf(amp.Integer()))]
    errors = ERRORS


class Join(amp.Command):
    """node -> rendezvous: membership of a network; "authorized" or "pending"."""

    arguments = [(b"network_id", amp.Unicode())]
    response = [(b"status", amp.Unicode())]
    errors = ERRORS


class Leave(amp.Command):
    """node -> rendezvous: stop sending this network's map."""

    arguments = [(b"network_id", amp.Unicode())]
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


class Ping(amp.Command):
    """Either way: liveness and round-trip time."""

    arguments = []
    response = []


class BoundedAMP(amp.AMP):
    """
    AMP that drops a peer whose box grows beyond C{max_box} bytes: AMP
    bounds each key and value but not the number of keys in a box.
    """

    max_box = MAX_INBOUND_BOX
    _box_bytes = 0
    # A TCP or TLS transport once connected (it can also abort).
    transport: Any

    def proto_key(self, string: bytes) -> str:
        if not string:
            self._box_bytes = 0
        return super().proto_key(string)

    def proto_value(self, string: bytes) -> str:
        self._box_bytes += len(self._currentKey or b"") + len(string) + 4
        if self._box_bytes > self.max_box:
            self.box_too_big()
            return "done"  # StatefulStringProtocol: lose the connection
        return super().proto_value(string)

    def box_too_big(self) -> None:
        """A box passed the limit; the connection is dropped next."""
