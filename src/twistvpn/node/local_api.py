"""
The joined node's local API: line-delimited JSON on a UNIX socket in the
node's data directory (mode 0600, so only root or the node's user asks).

One request per connection, one JSON object on one line::

    {"command": "status"}
    {"command": "ping", "peer": "laptop", "count": 5, "until_direct": false}
    {"command": "netcheck"}
    {"command": "join", "network": "8f3a5c0d9e1b2a47", "auth_key": "tvkey-..."}
    {"command": "leave", "network": "8f3a5c0d9e1b2a47"}
    {"command": "networks"}
    {"command": "set", "key": "name", "value": "gpu-server"}

The answer is one line per event and a last line that ends it:
C{{"ping": {...}}} per ping, then C{{"ok": true, "result": {...}}} or
C{{"ok": false, "error": "..."}}.  The node closes the connection after
the last line.  L{LocalAPI} is the logic; L{LocalAPIProtocol} the adapter.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from twistvpn.common import jsonin
from twistvpn.common.metrics import render
from twistvpn.common.services import quiet
from twistvpn.interfaces import INodeControl
from twistvpn.node.files import MAX_PINGS
from twistvpn.node.joined import JoinedNode, PeerNotFoundError
from twistvpn.node.settings import SettingsError, check_network_id
from twistvpn.traversal.manager import DIRECT, LAN

MAX_REQUEST = 4096
CONTROL_COMMANDS = ("join", "leave", "networks", "set")


class RequestError(ValueError):
    """A request the API cannot serve; the message is for the user."""


class LocalAPI:
    """What C{twistvpn status}, C{ping} and C{netcheck} ask the node."""

    def __init__(self, node: JoinedNode, *, control: INodeControl | None = None,
                 ping_interval: float = 1.0, ping_timeout: float = 2.0) -> None:
        self.node = node
        self.control = control
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout

    def handle(self, request: Any, report: Callable[[dict[str, Any]], object]) -> defer.Deferred:
        """
        Serve one request; C{report} gets intermediate events (pings) and
        returns False once nobody is listening any more.
        """
        if not isinstance(request, dict):
            return defer.fail(RequestError("a request is a JSON object"))
        command = request.get("command")
        if command == "status":
            return defer.succeed(self.node.status())
        if command == "netcheck":
            return self.node.netcheck()
        if command == "metrics":
            return defer.succeed(render(self.node.metrics).decode("utf-8"))
        if command in CONTROL_COMMANDS:
            if self.control is None:
                return defer.fail(RequestError(f"{command}: this node takes no changes"))
            return defer.maybeDeferred(self._control, command, request)
        if command == "ping":
            peer = request.get("peer")
            count = request.get("count", 4)
            if not isinstance(peer, str) or not peer:
                return defer.fail(RequestError("ping needs a peer"))
            if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= MAX_PINGS:
                return defer.fail(RequestError(f"count must be 1 to {MAX_PINGS}"))
            return self.ping(peer, count, bool(request.get("until_direct")), report)
        return defer.fail(RequestError(f"unknown command {str(command)[:40]!r}"))

    def _control(self, command: str, request: dict[str, Any]) -> Any:
        control = self.control
        assert control is not None
        if command == "networks":
            return control.networks_status()
        if command == "set":
            key, value = request.get("key"), request.get("value")
            if not isinstance(key, str):
                raise RequestError("set needs a key")
            try:
                applied = control.set_setting(key, value)
            except ValueError as e:
                raise RequestError(str(e)) from None
            return {"key": key, "applied": applied}
        network_id = request.get("network")
        try:
            network_id = check_network_id(network_id)
        except ValueError as e:
            raise RequestError(f"{command}: {e}") from None
        if command == "leave":
            return control.leave(network_id).addCallback(lambda _: {"network": network_id})
        auth_key = request.get("auth_key")
        if auth_key is not None and not isinstance(auth_key, str):
            raise RequestError("auth_key must be a string")
        return control.join(network_id, auth_key).addCallback(
            lambda status: {"network": network_id, "status": status or "joining"})

    @defer.inlineCallbacks
    def ping(self, query: str, count: int, until_direct: bool,
             report: Callable[[dict[str, Any]], object]) -> Any:
        """
        Ping C{query} up to C{count} times, one a C{ping_interval}; with
        C{until_direct}, ask for a punch first and stop at the first answer
        over a LAN or direct path.
        """
        node = self.node
        peer = node.find_peer(query)
        if until_direct and peer.manager.kind not in (LAN, DIRECT):
            node.request_punch(peer)
        received = 0
        direct = False
        for seq in range(1, count + 1):
            started = node.clock.seconds()
            result = yield node.ping_once(query, self.ping_timeout)
            result["seq"] = seq
            if report({"ping": result}) is False:
                break  # the asker went away: stop pinging for nobody
            if result["rtt"] is not None:
                received += 1
                direct = result["path"] in (LAN, DIRECT)
                if until_direct and direct:
                    break
            if seq < count:
                yield deferLater(node.clock, max(0.0, started + self.ping_interval
                                             - node.clock.seconds()))
        return {"peer": peer.name, "sent": seq, "received": received, "direct": direct,
                "path": peer.manager.kind}


class LocalAPIProtocol(LineOnlyReceiver):
    """Thin adapter: one JSON request line in, JSON lines out, then close."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST
    log = Logger()

    def __init__(self, api: LocalAPI) -> None:
        self.api = api
        self.busy = False
        self.gone = False

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.gone = True

    def lineReceived(self, line: bytes) -> None:
        if self.busy:
            return
        self.busy = True
        try:
            request = jsonin.loads(line)
        except ValueError:
            self._finish({"ok": False, "error": "the request is not JSON"})
            return
        d = defer.maybeDeferred(self.api.handle, request, self._send)
        d.addCallbacks(lambda result: self._finish({"ok": True, "result": result}),
                       self._failed)

    def _failed(self, failure: Failure) -> None:
        if failure.check(RequestError, PeerNotFoundError, SettingsError):
            message = str(failure.value)
        else:
            self.log.failure("local API request failed", failure)
            message = f"internal error: {failure.getErrorMessage()}"
        self._finish({"ok": False, "error": message})

    def lineLengthExceeded(self, line: bytes) -> None:
        self._finish({"ok": False, "error": "request too long"})

    def _send(self, message: dict[str, Any]) -> bool:
        """Send one line; False when the connection is gone."""
        if self.transport is None or self.gone:
            return False
        self.sendLine(json.dumps(message).encode("utf-8"))
        return True

    def _finish(self, message: dict[str, Any]) -> None:
        self._send(message)
        if self.transport is not None:
            self.transport.loseConnection()


def local_api_factory(api: LocalAPI) -> Factory:
    """The local API's listening factory: one L{LocalAPIProtocol} per client."""
    return quiet(Factory.forProtocol(functools.partial(LocalAPIProtocol, api)))
