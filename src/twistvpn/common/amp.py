"""
AMP basics that the control channel (L{twistvpn.rendezvous.protocol}) and
the relay's link to the rendezvous (L{twistvpn.relay.link}) share: values
longer than one AMP value, a bound on a box's size, and the ping both
sides use to measure the round trip and to notice dead connections.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.protocols import amp


def _peer(protocol: amp.AMP) -> str:
    transport = getattr(protocol, "transport", None)
    peer = transport.getPeer() if transport is not None else None
    host = getattr(peer, "host", None)
    return f"{host}:{getattr(peer, 'port', '?')}" if host else "a peer"

# A node's commands are small; a box beyond this is an attack or a bug.
MAX_INBOUND_BOX = 64 * 1024
# A map of a few thousand members, split over several AMP values.
MAX_MAP_BYTES = 16 * 1024 * 1024
_CHUNK = amp.MAX_VALUE_LENGTH


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


class Ping(amp.Command):
    """
    Either way: liveness and round-trip time.  A rendezvous instance's answer
    to a node also says over how many seconds to spread a move to another
    instance should it die (controller.failover_spread).
    """

    arguments = []
    response = [(b"failover_spread", amp.Float(optional=True))]


BAD_REQUEST = b"BAD_REQUEST"
# What parsing a command's arguments raises on malformed input.
_MALFORMED = (KeyError, ValueError, TypeError, UnicodeDecodeError, OverflowError,
              amp.TooLong)


class BoundedAMP(amp.AMP):
    """
    AMP for peers that may be hostile: it drops a peer whose box grows
    beyond C{max_box} bytes (AMP bounds each key and value but not the
    number of keys in a box), answers a command whose arguments do not
    parse with BAD_REQUEST, and ends a connection that sends a box with
    neither command nor answer: each with one log line and a count
    (L{malformed}), never a traceback.
    """

    log = Logger()
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

    def malformed(self, what: str) -> None:
        """Count and log (once per event, one line) what a peer got wrong."""
        self.log.info("malformed AMP from {peer}: {what}", peer=_peer(self), what=what)

    def locateResponder(self, name: bytes) -> Any:  # noqa: N802 (Twisted's name)
        try:
            responder = super().locateResponder(name)
        except UnicodeDecodeError:
            self.malformed("a command name that is not ASCII")
            return None  # answered as an unknown command
        if responder is None:
            return None

        def checked(box: amp.AmpBox) -> Any:
            try:
                return responder(box)
            except _MALFORMED as e:
                command = name.decode("ascii", "replace")
                self.malformed(f"{command}: {type(e).__name__}: {e}"[:200])
                raise amp.RemoteAmpError(BAD_REQUEST, f"malformed {command}") from None

        return checked

    def unhandledError(self, failure: Any) -> None:  # noqa: N802 (Twisted's name)
        """
        A command that asked for no answer failed: AMP logs the failure
        with its traceback, once per box.  A peer's unknown or malformed
        command is the peer's mistake: one line and a count.
        """
        if failure.check(amp.RemoteAmpError):
            self.malformed(f"a command without an answer failed: {failure.getErrorMessage()}"[:200])
            return
        super().unhandledError(failure)

    def ampBoxReceived(self, box: amp.AmpBox) -> None:  # noqa: N802 (Twisted's name)
        try:
            super().ampBoxReceived(box)
        except amp.NoEmptyBoxes:
            self.malformed("a box with neither command nor answer")
            transport = self.transport
            if transport is not None:
                transport.loseConnection()
