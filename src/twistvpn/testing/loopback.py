"""
Real processes on loopback, for the relay's integration test and benchmark.

C{python -m twistvpn.testing.loopback rendezvous ...} is the rendezvous's
relay side (a real controller, the embedded relay and the relay link, as
L{twistvpn.relay.service.attach_relays} sets them up);
C{python -m twistvpn.testing.loopback peer ...} is a node that sends or
receives a stream of datagrams through a relay (over UDP or TLS) or
directly, with a go-back-N window so that every byte arrives, and checks
each datagram's bytes on arrival.  L{Lab} starts them, and a real
C{twistd -n twistvpn-relay}, and stops every process it started by its pid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from zope.interface import implementer

from twistvpn.interfaces import IControlSession
from twistvpn.rendezvous.store import open_store
from twistvpn.wireguard import keys

HEADER = struct.Struct("<IQ")  # WireGuard's type 4 (so the forwarder hands it on), sequence
ACK = 0xFFFFFFFFFFFFFFFF  # sequence value marking an acknowledgement
BLOCK = random.Random(20261124).randbytes(1 << 16)


def payload(seq: int, size: int) -> bytes:
    """The bytes datagram C{seq} carries: checkable without keeping a copy."""
    start = (seq * 7919) % (len(BLOCK) - size)
    return BLOCK[start : start + size]


# -- the processes' main programs ----------------------------------------------------


@implementer(IControlSession)
class _Session:
    """A control session that ignores pushes: the lab's nodes only use relays."""

    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key
        self.rtt: float | None = None

    def send_map(self, network_id: str, netmap: Any) -> None:
        pass

    def send_map_delta(self, network_id: str, delta: Any) -> None:
        pass

    def send_punch(self, network_id: str, punch: Any) -> None:
        pass

    def send_revoked(self, network_id: str, reason: str) -> None:
        pass

    def close(self, reason: str) -> None:
        pass


def run_rendezvous(reactor: Any, args: argparse.Namespace) -> Deferred[None]:
    """
    The rendezvous's relay side, in a process of its own: a real controller
    (sqlite in the lab's directory) whose network holds the lab's nodes, an
    embedded relay and the link standalone relays log in to, all through
    L{attach_relays}, the call the rendezvous makes.
    """
    from twisted.application.service import MultiService
    from twisted.internet.task import LoopingCall

    from twistvpn.common import tls
    from twistvpn.relay.service import attach_relays
    from twistvpn.rendezvous.controller import Controller

    controller = Controller(open_store(os.path.join(args.data_dir, "rendezvous.sqlite")), reactor)
    network_id = controller.create_network("lab")["id"]
    for text in args.members:
        key = keys.decode_key(text)
        controller.register_node(key, "lab", _Session(key))
        controller.join(key, network_id)
        controller.authorize(network_id, text)
    cert, key_pem = tls.make_self_signed("127.0.0.1")
    top = MultiService()
    relays = attach_relays(top, reactor, controller, keys.generate_private_key(), cert, key_pem,
                           "127.0.0.1", udp_port=0, tcp_port=0, interface="127.0.0.1",
                           link="tcp:0:interface=127.0.0.1",
                           relay_keys=[keys.decode_key(k) for k in args.relay_key])
    top.startService()
    assert relays.link_listener is not None and relays.link_listener.port is not None
    port = relays.link_listener.port.getHost().port  # type: ignore[attr-defined]
    url = f"twistvpn://127.0.0.1:{port}#sha256={tls.fingerprint(cert).hex()}"
    _write_json(args.address_file, {"url": url, "network_id": network_id})
    written: list[Any] = []

    def publish() -> None:
        # What network maps carry: the embedded relay, then linked ones.
        current = [dict(r) for r in controller.relays]
        if current != written:
            written[:] = current
            _write_json(args.relays_file, current)

    LoopingCall(publish).start(0.1)
    if args.deauthorize_on_usr1:
        # As an admin would: the relays hear of it through the controller.
        def deauthorize() -> None:
            controller.deauthorize(network_id, args.deauthorize_on_usr1)

        signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(deauthorize))
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    # Runs until the lab stops the process.
    return Deferred()


def run_peer(reactor: Any, args: argparse.Namespace) -> Deferred[None]:
    from twistvpn.common.services import enlarge_socket_buffers
    from twistvpn.node.forwarder import Forwarder
    from twistvpn.relay.client import RelayClient, RelayClientTimings, RelayInfo
    from twistvpn.relay.transport import tls_stream_connector

    private = keys.decode_key(open(args.key_file).read())
    forwarder = Forwarder()
    port = reactor.listenUDP(0, forwarder, interface="127.0.0.1", maxPacketSize=65535)
    enlarge_socket_buffers(port.socket)
    timings = RelayClientTimings()
    if args.via == "tcp":
        timings = RelayClientTimings(udp_attempts=0, udp_retry=float("inf"))
    client = RelayClient(reactor, forwarder, private, tls_stream_connector(reactor), timings)
    relays = [RelayInfo.from_map(r) for r in json.load(open(args.relays_file))]
    client.set_relays(relays)
    client.start()
    peer_key = keys.decode_key(args.peer)
    if args.via == "direct":
        endpoint: Any = ("127.0.0.1", int(args.peer_port or 0))
    else:
        endpoint = client.relay_endpoint(peer_key)
    done: Deferred[None] = Deferred()
    if args.role == "receive":
        handler: Any = Receiver(reactor, forwarder, args, done)
    else:
        handler = Sender(reactor, forwarder, endpoint, args, done)
    forwarder.set_wireguard(handler)
    def ready(_: Any = None) -> None:
        _write_json(args.ready_file, {"port": port.getHost().port})
        if args.role == "send":
            handler.start()

    def failed(reason: Any) -> None:
        print(f"no relay: {reason.getErrorMessage()}", file=sys.stderr)
        done.callback(None)

    if args.via == "direct":
        reactor.callWhenRunning(ready)
    else:
        client.open_relay(peer_key).addCallbacks(ready, failed)
    return done


class Receiver:
    """Takes datagrams in order, checks their bytes, acknowledges cumulatively."""

    def __init__(self, reactor: Any, forwarder: Any, args: argparse.Namespace,
                 done: Deferred[None]) -> None:
        self.reactor = reactor
        self.finished = done
        self.forwarder = forwarder
        self.args = args
        self.expected = 0
        self.bad = 0
        self.duplicates = 0
        self.digest = hashlib.sha256()
        self.early: dict[int, bytes] = {}
        self.done = False
        if args.progress_file:
            from twisted.internet.task import LoopingCall

            self.progress = LoopingCall(
                lambda: _write_json(args.progress_file, {"datagrams": self.expected}))
            self.progress.clock = reactor
            self.progress.start(0.2)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        seq = HEADER.unpack_from(data)[1]
        body = data[HEADER.size :]
        if body != payload(seq, len(body)) or len(body) != self.args.size:
            self.bad += 1
            return
        if seq < self.expected:
            self.duplicates += 1
        elif seq < self.expected + 4 * self.args.window:
            self.early[seq] = body
            while self.expected in self.early:
                self.digest.update(self.early.pop(self.expected))
                self.expected += 1
        self.forwarder.send_datagram(HEADER.pack(4, ACK) + struct.pack("<Q", self.expected), addr)
        if self.expected == self.args.count and not self.done:
            self.done = True
            _write_json(self.args.result_file, {
                "datagrams": self.expected, "bytes": self.expected * self.args.size,
                "sha256": self.digest.hexdigest(), "bad": self.bad,
                "duplicates": self.duplicates,
            })
            # Let the last acknowledgements out before leaving.
            self.reactor.callLater(1.0, self.finished.callback, None)


class Sender:
    """Go-back-N over whatever path the endpoint names."""

    def __init__(self, reactor: Any, forwarder: Any, endpoint: Any,
                 args: argparse.Namespace, done: Deferred[None]) -> None:
        self.reactor = reactor
        self.finished = done
        self.forwarder = forwarder
        self.endpoint = endpoint
        self.args = args
        self.base = 0
        self.next = 0
        self.retransmits = 0
        self.started = 0.0
        self.last_progress = 0.0
        self.timer: Any = None

    def start(self) -> None:
        self.started = self.last_progress = time.monotonic()
        self.fill()
        self.timer = self.reactor.callLater(0.05, self.check)

    def fill(self) -> None:
        args = self.args
        while self.next < args.count and self.next < self.base + args.window:
            self.forwarder.send_datagram(
                HEADER.pack(4, self.next) + payload(self.next, args.size), self.endpoint
            )
            self.next += 1

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if HEADER.unpack_from(data)[1] != ACK:
            return
        (acked,) = struct.unpack_from("<Q", data, HEADER.size)
        if acked > self.base:
            self.base = acked
            self.last_progress = time.monotonic()
            if self.base >= self.args.count:
                self.finish()
                return
            self.fill()

    def check(self) -> None:
        if time.monotonic() - self.last_progress > self.args.rto:
            self.retransmits += self.next - self.base
            self.next = self.base
            self.last_progress = time.monotonic()
            self.fill()
        self.timer = self.reactor.callLater(0.05, self.check)

    def finish(self) -> None:
        seconds = time.monotonic() - self.started
        self.timer.cancel()
        total = self.args.count * self.args.size
        _write_json(self.args.result_file, {
            "bytes": total, "seconds": seconds, "mbit_per_s": total * 8 / seconds / 1e6,
            "retransmits": self.retransmits,
        })
        self.finished.callback(None)


def _write_json(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def main(reactor: Any, argv: list[str] | None = None) -> Deferred[None]:
    parser = argparse.ArgumentParser(prog="python -m twistvpn.testing.loopback")
    sub = parser.add_subparsers(dest="command", required=True)
    link = sub.add_parser("rendezvous")
    link.add_argument("--members", nargs="+", required=True)
    link.add_argument("--relay-key", nargs="+", required=True)
    link.add_argument("--data-dir", required=True)
    link.add_argument("--address-file", required=True)
    link.add_argument("--relays-file", required=True)
    link.add_argument("--deauthorize-on-usr1", default=None, metavar="KEY")
    peer = sub.add_parser("peer")
    peer.add_argument("role", choices=("send", "receive"))
    peer.add_argument("--via", choices=("udp", "tcp", "direct"), required=True)
    peer.add_argument("--key-file", required=True)
    peer.add_argument("--peer", required=True)
    peer.add_argument("--peer-port", default=None)
    peer.add_argument("--relays-file", required=True)
    peer.add_argument("--ready-file", required=True)
    peer.add_argument("--result-file", required=True)
    peer.add_argument("--count", type=int, default=1000)
    peer.add_argument("--size", type=int, default=1200)
    peer.add_argument("--window", type=int, default=128)
    peer.add_argument("--rto", type=float, default=0.3)
    peer.add_argument("--progress-file", default=None)
    args = parser.parse_args(argv)
    if args.command == "rendezvous":
        return run_rendezvous(reactor, args)
    return run_peer(reactor, args)


# -- the lab: start and stop the processes ----------------------------------------------


class LabError(Exception):
    """A process of the lab failed or did not answer in time."""


class Lab:
    """
    The rendezvous's relay side, a C{twistd -n twistvpn-relay} and peers,
    on loopback in C{directory}.  Every process is stopped by its pid in
    L{close}, which callers run also on failure.
    """

    def __init__(self, directory: str, python: str = sys.executable) -> None:
        self.dir = directory
        self.python = python
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, str] = {}
        self.transfers = 0
        self.node_keys = {}
        for name in ("sender", "receiver"):
            private = keys.generate_private_key()
            path = self.path(f"{name}.key")
            with open(path, "w") as f:
                f.write(keys.encode_key(private))
            self.node_keys[name] = keys.encode_key(keys.public_key(private))
        self.relay_dir = self.path("relay")
        os.makedirs(self.relay_dir, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.path(name + ".log"), "wb")
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        log.close()
        self.processes.append(process)
        self.logs[process.pid] = self.path(name + ".log")
        return process

    def wait_json(self, name: str, timeout: float, process: Any = None) -> Any:
        path = self.path(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(path):
                with open(path) as f:
                    return json.load(f)
            if process is not None and process.poll() is not None:
                raise LabError(f"{process.args[:4]} exited with {process.returncode}: "
                               + self.tail(process))
            time.sleep(0.05)
        raise LabError(f"no {name} after {timeout}s")

    def tail(self, process: Any) -> str:
        """The end of a process's output, for error messages."""
        try:
            with open(self.logs[process.pid], "rb") as f:
                return f.read()[-2000:].decode("utf-8", "replace")
        except (KeyError, OSError):
            return ""

    def start_relay(self) -> None:
        """
        The rendezvous's relay side (embedded relay and link), then a real
        twistd relay that logs in to it; C{relays.json} then lists both.
        """
        from twistvpn.common.datadir import load_or_create_key

        relay_private = load_or_create_key(os.path.join(self.relay_dir, "relay.key"))
        relay_key = keys.encode_key(keys.public_key(relay_private))
        self.rendezvous = self.spawn(
            [self.python, "-m", "twistvpn.testing.loopback", "rendezvous",
             "--members", *self.node_keys.values(), "--relay-key", relay_key,
             "--data-dir", self.dir, "--address-file", self.path("address.json"),
             "--relays-file", self.path("relays.json"),
             "--deauthorize-on-usr1", self.node_keys["receiver"]], "rendezvous")
        url = self.wait_json("address.json", 30, self.rendezvous)["url"]
        twistd = os.path.join(os.path.dirname(self.python), "twistd")
        self.relay = self.spawn([twistd, "-n", "--pidfile=", "-l", self.path("relay.log"),
                                 "twistvpn-relay", "--rendezvous", url, "--udp-port", "0",
                                 "--tcp", "tcp:0:interface=127.0.0.1",
                                 "--udp-interface", "127.0.0.1", "--public-host", "127.0.0.1",
                                 "--data-dir", self.relay_dir, "--admin", "none",
                                 "--node-rate", "100000", "--global-rate", "100000"],
                                "relay-stdout")
        deadline = time.monotonic() + 30
        while len(self.relays()) < 2:
            if time.monotonic() > deadline or self.relay.poll() is not None:
                raise LabError("the standalone relay did not log in: " + self.tail(self.relay))
            time.sleep(0.05)
        for i, relay in enumerate(self.relays()):
            name = "embedded" if i == 0 else "standalone"
            _write_json(self.path(f"relays-{name}.json"), [relay])

    def relays(self) -> list[dict[str, Any]]:
        """The relays the rendezvous advertises now."""
        try:
            with open(self.path("relays.json")) as f:
                return list(json.load(f))
        except (OSError, ValueError):
            return []

    def transfer(self, via: str, count: int, size: int = 1200, window: int = 128,
                 timeout: float = 120, relay: str = "standalone",
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
        """
        Send C{count} datagrams of C{size} bytes (C{via} "udp" or "tcp"
        through the C{relay} "standalone" or "embedded", or "direct");
        return the sender's and the receiver's results.
        """
        tag, sender, receiver = self.start_transfer(via, count, size, window, relay)
        try:
            sent = self.wait_json(f"{tag}.sent.json", timeout, sender)
            received = self.wait_json(f"{tag}.received.json", 10, receiver)
        finally:
            self.stop(sender)
            self.stop(receiver)
        return sent, received

    def start_transfer(self, via: str, count: int, size: int = 1200, window: int = 128,
                       relay: str = "standalone",
                       ) -> tuple[str, subprocess.Popen[bytes], subprocess.Popen[bytes]]:
        """Start a receiver, then a sender; the receiver reports progress."""
        self.transfers += 1  # each transfer its own files: no stale result is read
        tag = f"{self.transfers}-{via}-{relay}-{count}-{size}"
        relays = self.path(f"relays-{relay}.json") if via != "direct" else self._no_relays()
        common = ["--via", via, "--relays-file", relays, "--count", str(count),
                  "--size", str(size), "--window", str(window)]
        receiver = self.spawn([self.python, "-m", "twistvpn.testing.loopback", "peer", "receive",
                               "--key-file", self.path("receiver.key"),
                               "--peer", self.node_keys["sender"],
                               "--ready-file", self.path(f"{tag}.receiver-ready.json"),
                               "--progress-file", self.path(f"{tag}.progress.json"),
                               "--result-file", self.path(f"{tag}.received.json"), *common],
                              f"{tag}.receiver")
        port = self.wait_json(f"{tag}.receiver-ready.json", 30, receiver)["port"]
        sender = self.spawn([self.python, "-m", "twistvpn.testing.loopback", "peer", "send",
                             "--key-file", self.path("sender.key"),
                             "--peer", self.node_keys["receiver"], "--peer-port", str(port),
                             "--ready-file", self.path(f"{tag}.sender-ready.json"),
                             "--result-file", self.path(f"{tag}.sent.json"), *common],
                            f"{tag}.sender")
        return tag, sender, receiver

    def progress(self, tag: str) -> int:
        """Datagrams the receiver of transfer C{tag} has taken in order so far."""
        try:
            with open(self.path(f"{tag}.progress.json")) as f:
                return int(json.load(f)["datagrams"])
        except (OSError, ValueError, KeyError):
            return 0

    def deauthorize_receiver(self) -> None:
        """Have the rendezvous deauthorize the receiving node, as an admin would."""
        os.kill(self.rendezvous.pid, signal.SIGUSR1)

    def _no_relays(self) -> str:
        path = self.path("no-relays.json")
        _write_json(path, [])
        return path

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)

    def close(self) -> None:
        for process in reversed(self.processes):
            self.stop(process)


def expected_digest(count: int, size: int) -> str:
    """The SHA-256 of the stream a complete transfer delivers."""
    digest = hashlib.sha256()
    for seq in range(count):
        digest.update(payload(seq, size))
    return digest.hexdigest()


if __name__ == "__main__":
    react(main, [sys.argv[1:]])
