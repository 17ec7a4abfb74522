"""
AMP basics that the control channel (L{twistvpn.rendezvous.protocol}) and
the relay's link to the rendezvous (L{twistvpn.relay.link}) share: values
longer than one AMP value, a bound on a box's size, and the ping both
sides use to measure the round trip and to notice dead connections.
"""

from __future__ import annotations

from typing import Any

from twisted.protocols import amp

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
