"""
Real processes on loopback, for the relay's integration test and benchmark.

C{python -m twistvpn.relay.loopback link-server ...} serves the relay link
(the rendezvous's side) with a fixed membership table;
C{python -m twistvpn.relay.loopback peer ...} is a node that sends or
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

from twistvpn.wireguard import keys

HEADER = struct.Struct("<IQ")  # WireGuard's type 4 (so the forwarder hands it on), sequence
ACK = 0xFFFFFFFFFFFFFFFF  # sequence value marking an acknowledgement
BLOCK = random.Random(20261124).randbytes(1 << 16)


def payload(seq: int, size: int) -> bytes:
    """The bytes datagram C{seq} carries: checkable without keeping a copy."""
    start = (seq * 7919) % (len(BLOCK) - size)
    return BLOCK[start : start + size]


# -- the processes' main programs ----------------------------------------------------


def run_link_server(args: argparse.Namespace) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from twistvpn.relay.link import RelayLinkServerFactory, RelayLinkService
    from twistvpn.relay.policy import MembershipPolicy
    from twistvpn.rendezvous import tls

    policy = MembershipPolicy()
    policy.set_members("lab", [keys.decode_key(k) for k in args.members])
    cert, key = tls.make_self_signed("127.0.0.1")
    server_private = keys.generate_private_key()
    relay_keys = {keys.decode_key(k) for k in args.relay_key}
    service = RelayLinkService(server_private, keys.public_key(server_private), policy,
                               relay_keys.__contains__, lambda relays: _write_json(
                                   args.relays_file, [dict(r) for r in relays]))
    factory = TLSMemoryBIOFactory(tls.server_options(cert, key), False,
                                  RelayLinkServerFactory(service))

    def listening(port: Any) -> None:
        url = f"twistvpn://127.0.0.1:{port.getHost().port}#sha256={tls.fingerprint(cert).hex()}"
        _write_json(args.address_file, {"url": url})

    TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory).addCallback(listening)
    reactor.run()


def run_peer(args: argparse.Namespace) -> None:
    from twisted.internet import reactor

    from twistvpn.node.forwarder import Forwarder
    from twistvpn.relay.client import RelayClient, RelayClientTimings, RelayInfo
    from twistvpn.relay.service import enlarge_socket_buffers
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
    if args.role == "receive":
        handler: Any = Receiver(reactor, forwarder, args)
    else:
        handler = Sender(reactor, forwarder, endpoint, args)
    forwarder.set_wireguard(handler)
    def ready(_: Any = None) -> None:
        _write_json(args.ready_file, {"port": port.getHost().port})
        if args.role == "send":
            handler.start()

    def failed(reason: Any) -> None:
        print(f"no relay: {reason.getErrorMessage()}", file=sys.stderr)
        reactor.stop()

    if args.via == "direct":
        reactor.callWhenRunning(ready)
    else:
        client.open_relay(peer_key).addCallbacks(ready, failed)
    reactor.run()


class Receiver:
    """Takes datagrams in order, checks their bytes, acknowledges cumulatively."""

    def __init__(self, reactor: Any, forwarder: Any, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.forwarder = forwarder
        self.args = args
        self.expected = 0
        self.bad = 0
        self.duplicates = 0
        self.digest = hashlib.sha256()
        self.early: dict[int, bytes] = {}
        self.done = False

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
            self.reactor.callLater(1.0, self.reactor.stop)


class Sender:
    """Go-back-N over whatever path the endpoint names."""

    def __init__(self, reactor: Any, forwarder: Any, endpoint: Any,
                 args: argparse.Namespace) -> None:
        self.reactor = reactor
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
        self.reactor.stop()


def _write_json(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m twistvpn.relay.loopback")
    sub = parser.add_subparsers(dest="command", required=True)
    link = sub.add_parser("link-server")
    link.add_argument("--members", nargs="+", required=True)
    link.add_argument("--relay-key", nargs="+", required=True)
    link.add_argument("--address-file", required=True)
    link.add_argument("--relays-file", required=True)
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
    args = parser.parse_args(argv)
    if args.command == "link-server":
        run_link_server(args)
    else:
        run_peer(args)


# -- the lab: start and stop the processes ----------------------------------------------


class LabError(Exception):
    """A process of the lab failed or did not answer in time."""


class Lab:
    """
    A rendezvous-side link server, a C{twistd -n twistvpn-relay} and peers,
    on loopback in C{directory}.  Every process is stopped by its pid in
    L{close}, which callers run also on failure.
    """

    def __init__(self, directory: str, python: str = sys.executable) -> None:
        self.dir = directory
        self.python = python
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, str] = {}
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
        """The link server, then a real twistd relay that logs in to it."""
        from twistvpn.relay.service import load_or_create_private_key

        relay_private = load_or_create_private_key(os.path.join(self.relay_dir, "relay.key"))
        relay_key = keys.encode_key(keys.public_key(relay_private))
        server = self.spawn([self.python, "-m", "twistvpn.relay.loopback", "link-server",
                             "--members", *self.node_keys.values(), "--relay-key", relay_key,
                             "--address-file", self.path("address.json"),
                             "--relays-file", self.path("relays.json")], "link-server")
        url = self.wait_json("address.json", 30, server)["url"]
        twistd = os.path.join(os.path.dirname(self.python), "twistd")
        self.relay = self.spawn([twistd, "-n", "--pidfile=", "-l", self.path("relay.log"),
                                 "twistvpn-relay", "--rendezvous", url, "--udp-port", "0",
                                 "--tcp", "tcp:0:interface=127.0.0.1",
                                 "--udp-interface", "127.0.0.1", "--public-host", "127.0.0.1",
                                 "--data-dir", self.relay_dir, "--admin", "none",
                                 "--node-rate", "100000", "--global-rate", "100000"],
                                "relay-stdout")
        self.wait_json("relays.json", 30, self.relay)

    def transfer(self, via: str, count: int, size: int = 1200, window: int = 128,
                 timeout: float = 120) -> tuple[dict[str, Any], dict[str, Any]]:
        """Send C{count} datagrams of C{size} bytes; (sender's, receiver's) results."""
        tag = f"{via}-{count}-{size}"
        relays = self.path("relays.json") if via != "direct" else self._no_relays()
        common = ["--via", via, "--relays-file", relays, "--count", str(count),
                  "--size", str(size), "--window", str(window)]
        receiver = self.spawn([self.python, "-m", "twistvpn.relay.loopback", "peer", "receive",
                               "--key-file", self.path("receiver.key"),
                               "--peer", self.node_keys["sender"],
                               "--ready-file", self.path(f"{tag}.receiver-ready.json"),
                               "--result-file", self.path(f"{tag}.received.json"), *common],
                              f"{tag}.receiver")
        port = self.wait_json(f"{tag}.receiver-ready.json", 30, receiver)["port"]
        sender = self.spawn([self.python, "-m", "twistvpn.relay.loopback", "peer", "send",
                             "--key-file", self.path("sender.key"),
                             "--peer", self.node_keys["receiver"], "--peer-port", str(port),
                             "--ready-file", self.path(f"{tag}.sender-ready.json"),
                             "--result-file", self.path(f"{tag}.sent.json"), *common],
                            f"{tag}.sender")
        try:
            sent = self.wait_json(f"{tag}.sent.json", timeout, sender)
            received = self.wait_json(f"{tag}.received.json", 10, receiver)
        finally:
            self.stop(sender)
            self.stop(receiver)
        return sent, received

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
    main()
