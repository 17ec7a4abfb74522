"""
Measuring what crosses a L{Network}: ping, iperf3, a UDP sender,
iptables packet counters and a byte-exact transfer tool
(C{python -m twistvpn.testing.netns.measure serve|send ...}).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twistvpn.testing.netns.mesh import VpnNode
from twistvpn.testing.netns.namespaces import (
    HarnessError,
    Network,
    Process,
    check_address,
    wait_for,
)

_UDP_SENDER = """
import socket, sys, time
addresses = sys.argv[3:]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    for address in addresses:
        try:
            s.sendto(b"x" * 64, (address, 9))
        except OSError:
            pass  # no route (yet, or any more): keep trying
    time.sleep(float(sys.argv[2]))
"""


def start_udp_sender(network: Network, namespace: str, destinations: Sequence[str],
                     seconds: float, interval: float = 0.05) -> Process:
    """
    A process in C{namespace} sending a small UDP datagram to each of
    C{destinations} every C{interval} s for C{seconds} s, whatever errors
    it meets (unlike ping, which gives up when its route goes).
    """
    for destination in destinations:
        check_address(f"{destination}/32")
    return network.spawn(
        namespace,
        [sys.executable, "-c", _UDP_SENDER, str(seconds), str(interval), *destinations],
        log_name="udp-sender",
    )


def count_packets(network: Network, namespace: str, source: str, chain: str = "INPUT") -> int:
    """
    Packets from C{source} seen so far by a counting rule in C{namespace}:
    C{chain} INPUT (of the filter table: what reaches the host), or
    PREROUTING (of the raw table: all that arrives, before NAT and
    conntrack).  The rule is added on first use.
    """
    check_address(f"{source}/32")
    table = {"INPUT": "filter", "PREROUTING": "raw"}[chain]
    rule = [chain, "-s", source, "-j", "ACCEPT"]
    iptables = ["iptables", "-t", table]
    if network.run(namespace, [*iptables, "-C", *rule], check=False).returncode != 0:
        network.run(namespace, [*iptables, "-I", *rule])
    listing = network.run(namespace, [*iptables, "-n", "-v", "-x", "-L", chain]).stdout
    for line in listing.decode().splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[2] == "ACCEPT" and fields[7] == source:
            return int(fields[0])
    raise HarnessError(f"no {chain} rule for {source} in {namespace}")


def ping(
    network: Network,
    namespace: str,
    destination: str,
    *,
    count: int = 5,
    interval: float = 0.2,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[bytes]:
    """C{ping} from a namespace (check_address keeps it inside the test network)."""
    check_address(destination)
    return network.run(
        namespace,
        ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "2", destination],
        check=False,
        timeout=timeout,
    )


def ping_stats(output: str) -> tuple[float, float | None]:
    """(loss percentage, average RTT in ms or None) from ping's summary."""
    loss = 100.0
    rtt = None
    for line in output.splitlines():
        if "packet loss" in line:
            for part in line.split(","):
                if "packet loss" in part:
                    loss = float(part.strip().split("%")[0])
        if line.startswith(("rtt ", "round-trip")):
            rtt = float(line.split("=")[1].split("/")[1])
    return loss, rtt


def wait_for_ping(
    network: Network, namespace: str, destination: str, timeout: float = 20.0
) -> None:
    """Wait until one ping gets through (the first handshake), bounded."""
    wait_for(
        lambda: ping(network, namespace, destination, count=1, timeout=5).returncode == 0,
        timeout,
        f"{destination} to answer from {namespace}",
        interval=0.2,
    )


def iperf3(
    network: Network,
    server: VpnNode | str,
    client_ns: str,
    address: str,
    *,
    seconds: float = 3,
    udp: bool = False,
    bitrate: str | None = None,
    port: int = 5201,
) -> dict[str, Any]:
    """
    One iperf3 run from C{client_ns} to a server started for it in
    C{server}'s namespace; return iperf3's JSON report.
    """
    import json

    check_address(address)
    server_ns = server.namespace if isinstance(server, VpnNode) else server
    srv = network.spawn(
        server_ns,
        ["iperf3", "-s", "-1", "--forceflush", "-B", address, "-p", str(port)],
        log_name="iperf3-server",
    )
    try:
        wait_for(lambda: "Server listening" in srv.log() or not srv.running(), 10, "iperf3 server")
        argv = [
            "iperf3",
            "-c",
            address,
            "-p",
            str(port),
            "-t",
            str(seconds),
            "-J",
            "--connect-timeout",
            "5000",
        ]
        if udp:
            argv += ["-u", "-b", bitrate or "1G", "-l", "1300"]
        elif bitrate:
            argv += ["-b", bitrate]
        result = network.run(client_ns, argv, check=False, timeout=seconds + 30)
        report: dict[str, Any] = json.loads(result.stdout or b"{}")
        if result.returncode != 0 or "error" in report:
            raise HarnessError(f"iperf3 to {address} failed: {report.get('error', result)}")
        return report
    finally:
        network.stop(srv)


def tcp_throughput_bps(report: dict[str, Any]) -> float:
    """Receiver-side bits per second of an iperf3 TCP report."""
    return float(report["end"]["sum_received"]["bits_per_second"])


def udp_result(report: dict[str, Any]) -> tuple[float, float]:
    """(receiver bits per second, loss percentage) of an iperf3 UDP report."""
    end = report["end"]
    total = end.get("sum_received") or end["sum"]
    return float(total["bits_per_second"]), float(end["sum"].get("lost_percent", 0.0))


CHUNK = 64 * 1024


def _serve(host: str, port: int) -> int:
    """Accept one connection, hash everything it sends, report progress."""
    import hashlib
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, port), family=family) as listener:
        print("listening", flush=True)
        listener.settimeout(60)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(60)
            digest = hashlib.sha256()
            total = 0
            reported = 0
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    break
                digest.update(data)
                total += len(data)
                if total - reported >= 256 * 1024:
                    reported = total
                    print(f"received {total}", flush=True)
            print(f"done {total} {digest.hexdigest()}", flush=True)
    return 0


def _send(host: str, port: int, size: int, rate: float) -> int:
    """Send C{size} random bytes at about C{rate} bytes/s (0: flat out)."""
    import hashlib
    import socket

    digest = hashlib.sha256()
    sent = 0
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=60) as conn:
        while sent < size:
            chunk = os.urandom(min(CHUNK, size - sent))
            conn.sendall(chunk)
            digest.update(chunk)
            sent += len(chunk)
            if rate:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(60)
        while conn.recv(CHUNK):  # until the server has read everything
            pass
    print(f"sent {sent} {digest.hexdigest()}", flush=True)
    return 0


def _main(argv: Sequence[str]) -> int:
    if len(argv) == 3 and argv[0] == "serve":
        return _serve(argv[1], int(argv[2]))
    if len(argv) == 5 and argv[0] == "send":
        return _send(argv[1], int(argv[2]), int(argv[3]), float(argv[4]))
    sys.stderr.write("usage: netns serve HOST PORT | send HOST PORT BYTES RATE\n")
    return 2


@dataclass
class Transfer:
    """A running byte-exact transfer between two namespaces."""

    server: Process
    client: Process

    def received(self) -> int:
        """Bytes the server has reported so far."""
        lines = [ln for ln in self.server.log().splitlines() if ln.startswith(("received", "done"))]
        return int(lines[-1].split()[1]) if lines else 0

    def wait(self, timeout: float) -> tuple[str, str]:
        """Wait for both ends; return (sent line, done line)."""
        for process in (self.client, self.server):
            try:
                process.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                raise HarnessError(
                    f"transfer did not finish in {timeout}s: {self.server.log()[-500:]}"
                ) from None
        sent = [ln for ln in self.client.log().splitlines() if ln.startswith("sent ")]
        done = [ln for ln in self.server.log().splitlines() if ln.startswith("done ")]
        if not sent or not done:
            raise HarnessError(
                f"transfer failed:\nclient: {self.client.log()[-800:]}\n"
                f"server: {self.server.log()[-800:]}"
            )
        return sent[-1], done[-1]


def start_transfer(
    network: Network,
    server_ns: str,
    client_ns: str,
    address: str,
    size: int,
    *,
    rate: float = 0,
    port: int = 7001,
) -> Transfer:
    """Send C{size} random bytes from C{client_ns} to C{address} in C{server_ns}."""
    check_address(address)
    tool = [sys.executable, "-m", "twistvpn.testing.netns.measure"]
    server = network.spawn(
        server_ns, [*tool, "serve", address, str(port)], log_name="transfer-server"
    )
    wait_for(lambda: "listening" in server.log() or not server.running(), 10, "transfer server")
    client = network.spawn(
        client_ns,
        [*tool, "send", address, str(port), str(size), str(rate)],
        log_name="transfer-client",
    )
    return Transfer(server, client)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


def dig(network: Network, namespace: str, server: str, name: str,
        rtype: str = "A") -> tuple[str, list[str]]:
    """
    C{dig @SERVER NAME RTYPE} from C{namespace} (one try, 2 s): the answer's
    status (NOERROR, NXDOMAIN, REFUSED...) and its records' data.
    """
    check_address(server)
    result = network.command(
        ["ip", "netns", "exec", namespace, "dig", "+tries=1", "+time=2", "+norecurse",
         "+nocmd", "+noquestion", "+nostats", "+noauthority", "+noadditional",
         f"@{server}", name, rtype], check=False, timeout=10)
    text = result.stdout.decode("utf-8", "replace")
    status = re.search(r"status: (\w+)", text)
    if status is None:
        raise HarnessError(f"dig @{server} {name}: no answer\n{text[-500:]}")
    answers = [line.split()[-1] for line in text.splitlines()
               if line.strip() and not line.startswith(";")]
    return status.group(1), answers
