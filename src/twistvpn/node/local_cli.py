"""
C{twistvpn status}, C{twistvpn ping} and C{twistvpn netcheck}: ask a
joined node through its local API (L{twistvpn.node.local_api}).

    twistvpn status [--json] [--data-dir DIR | --socket PATH]
    twistvpn ping PEER [-c N] [--until-direct] [--json] [...]
    twistvpn netcheck [--json] [...]
    twistvpn join NETWORK_ID [--rendezvous URL] [--auth-key-file F] [...]
    twistvpn leave NETWORK_ID [...]
    twistvpn networks [--json] [...]
    twistvpn set KEY VALUE [...]

On a stopped node, join, leave, networks and set read and edit the
settings file in its data directory (L{twistvpn.node.settings}) instead.

A plain blocking client: one request, JSON lines back until the last.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from twistvpn.node.files import DEFAULT_DATA_DIR, MAX_PINGS, SOCKET_NAME
from twistvpn.table import columns

# A ping run lasts up to count x (interval + timeout); the socket waits per line.
LINE_TIMEOUT = 30.0


class LocalAPIError(Exception):
    """What went wrong, in one line."""


def socket_path(args: argparse.Namespace) -> str:
    return args.socket or os.path.join(args.data_dir, SOCKET_NAME)


def request(path: str, message: dict[str, Any], timeout: float = LINE_TIMEOUT) -> Iterator[Any]:
    """Send C{message}; yield every line of the answer, parsed, the last included."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as e:
            raise LocalAPIError(
                f"cannot reach the node at {path}: {e.strerror or e} "
                "(is `twistd twistvpn-node --data-dir ...` running, and are you root?)"
            ) from None
        sock.sendall(json.dumps(message).encode("utf-8") + b"\n")
        with sock.makefile("rb") as lines:
            for line in lines:
                try:
                    yield json.loads(line)
                except ValueError:
                    raise LocalAPIError("the node sent something that is not JSON") from None
    except TimeoutError:
        raise LocalAPIError(f"the node at {path} did not answer in {timeout:.0f} s") from None
    finally:
        sock.close()


def call(path: str, message: dict[str, Any],
         on_event: Callable[[dict[str, Any]], None] = lambda e: None) -> Any:
    """The result of C{message}; events before it go to C{on_event}."""
    for answer in request(path, message):
        if "ok" not in answer:
            on_event(answer)
            continue
        if not answer["ok"]:
            raise LocalAPIError(str(answer.get("error", "the node refused the request")))
        return answer["result"]
    raise LocalAPIError("the node closed the connection without an answer")


# -- rendering -------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}ms"


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def render_status(status: dict[str, Any]) -> str:
    lines = [
        f"node {status['node_id'] or '(not registered yet)'}  key {status['public_key']}",
        f"interface {status['interface']}  addresses {', '.join(status['addresses']) or 'none'}"
        f"  port {status['listen_port']}  public endpoint {status['public_endpoint'] or '-'}",
        "rendezvous " + ("connected" if status["rendezvous_connected"] else "disconnected"
                         " (reconnecting; tunnels stay up)"),
    ]
    for network_id, net in status["networks"].items():
        detail = net["status"]
        if net["ip"]:
            detail += f", ip {net['ip']} in {net['subnet']} ({net['name']})"
        if net.get("domain"):
            detail += f", names *.{net['domain']}"
        if net.get("route_refused"):
            detail += f"; not routed: {net['route_refused']}"
        lines.append(f"network {network_id}: {detail}")
    text = "\n".join(lines) + "\n\n"
    rows = [
        [
            peer["name"],
            peer.get("dns_name") or "-",
            ",".join(peer["ips"]),
            peer["path"] if peer["online"] or peer["path"] != "none" else "offline",
            peer["endpoint"] or "-",
            ms(peer["rtt"]),
            ago(peer["last_handshake_ago"]),
            size(peer["rx_bytes"]),
            size(peer["tx_bytes"]),
        ]
        for peer in status["peers"]
    ]
    if not rows:
        return text + "no peers\n"
    header = ["NAME", "DNS", "IP", "PATH", "ENDPOINT", "RTT", "HANDSHAKE", "IN", "OUT"]
    return text + columns(header, rows)


def render_ping(event: dict[str, Any]) -> str:
    ping = event["ping"]
    if ping["rtt"] is None:
        return (f"{ping['error']} from {ping['peer']} ({ping['ip']}) "
                f"via {ping['path']} {ping['endpoint'] or '-'}\n")
    return (f"pong from {ping['peer']} ({ping['ip']}) via {ping['path']} "
            f"{ping['endpoint']} in {ms(ping['rtt'])}\n")


def render_ping_summary(result: dict[str, Any], until_direct: bool) -> str:
    line = f"{result['sent']} sent, {result['received']} received, path {result['path']}\n"
    if until_direct and not result["direct"]:
        line += f"no direct path yet (the path is {result['path']})\n"
    return line


def render_netcheck(report: dict[str, Any]) -> str:
    varies = report["mapping_varies_by_destination"]
    lines = [
        "report:",
        f"  UDP: {'yes' if report['udp'] else 'no'}",
        f"  public endpoint: {report['public_endpoint'] or '-'}",
        f"  IPv6 public endpoint: {report.get('public_endpoint6') or '-'}",
        "  mapping varies by destination: "
        + ("unknown" if varies is None else "yes" if varies else "no"),
        "  rendezvous:",
    ]
    for entry in report["rendezvous"]:
        lines.append(f"    {entry['server']}: {ms(entry['rtt'])}"
                     + (f" (sees {entry['mapped']})" if entry["mapped"] else " (no answer)"))
    mapping = report.get("port_mapping")
    if mapping is None:
        lines.append("  port mapping: off")
    else:
        offered = ", ".join(f"{name} {'yes' if said else 'no' if said is False else '?'}"
                            for name, said in mapping["offered"].items())
        lines.append(f"  port mapping: gateway {mapping['gateway']} ({offered}); "
                     f"mapped {mapping['mapped'] or '-'}"
                     + (f" by {mapping['protocol']}" if mapping["mapped"] else ""))
    lines.append("  relays:" if report["relays"] else "  relays: none advertised")
    for relay in report["relays"]:
        lines.append(f"    {relay['id']} {relay['address']}: {ms(relay['rtt'])}"
                     + (f" over {relay['path']}" if relay["path"] else ""))
    return "\n".join(lines) + "\n"


# -- commands --------------------------------------------------------------------


def _run(action: Callable[[], int], err: TextIO) -> int:
    try:
        return action()
    except LocalAPIError as e:
        err.write(f"twistvpn: {e}\n")
        return 1


def status(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    def run() -> int:
        result = call(socket_path(args), {"command": "status"})
        out.write(json.dumps(result, indent=2) + "\n" if args.json else render_status(result))
        return 0

    return _run(run, err)


def ping(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    def event(e: dict[str, Any]) -> None:
        out.write(json.dumps(e) + "\n" if args.json else render_ping(e))
        out.flush()

    count = args.count if args.count is not None else (10 if args.until_direct else 4)

    def run() -> int:
        result = call(socket_path(args), {"command": "ping", "peer": args.peer,
                                          "count": count,
                                          "until_direct": args.until_direct}, event)
        out.write(json.dumps({"result": result}) + "\n" if args.json
                  else render_ping_summary(result, args.until_direct))
        if args.until_direct:
            return 0 if result["direct"] else 1
        return 0 if result["received"] else 1

    return _run(run, err)


def netcheck(args: argparse.Namespace, out: TextIO = sys.stdout,
             err: TextIO = sys.stderr) -> int:
    def run() -> int:
        result = call(socket_path(args), {"command": "netcheck"})
        out.write(json.dumps(result, indent=2) + "\n" if args.json else render_netcheck(result))
        return 0

    return _run(run, err)


def metrics(args: argparse.Namespace, out: TextIO = sys.stdout,
            err: TextIO = sys.stderr) -> int:
    def run() -> int:
        out.write(call(socket_path(args), {"command": "metrics"}))
        return 0

    return _run(run, err)


# -- join, leave, networks, set: the running node at once, or its settings file ----------


class NodeNotRunningError(LocalAPIError):
    """Nothing listens on the node's socket: the node is stopped."""


def call_if_running(path: str, message: dict[str, Any]) -> Any:
    """L{call}, or L{NodeNotRunningError} when no node listens at C{path}."""
    if not os.path.exists(path):
        raise NodeNotRunningError(path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        raise NodeNotRunningError(path) from None
    except OSError:
        pass  # permissions and the like: call() says so
    finally:
        probe.close()
    return call(path, message)


def _settings_error(action: Callable[[], int], err: TextIO) -> int:
    """L{_run}, with a bad value or settings file (ValueError) as one line too."""
    try:
        return _run(action, err)
    except ValueError as e:
        err.write(f"twistvpn: {e}\n")
        return 1


STOPPED_HINT = ("the node is not running: saved for its next start "
                "(systemctl start twistvpn-node, or twistd -n twistvpn-node --data-dir {dir})\n")


def join(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    from twistvpn.node import settings

    def run() -> int:
        network_id = settings.check_network_id(args.network)
        key = settings.read_auth_key_file(args.auth_key_file) if args.auth_key_file else None
        rendezvous = (settings.check_rendezvous(
            args.rendezvous[0] if len(args.rendezvous) == 1 else args.rendezvous)
            if args.rendezvous else None)
        message: dict[str, Any] = {"command": "join", "network": network_id}
        if key is not None:
            message["auth_key"] = key
        try:
            result = call_if_running(socket_path(args), message)
        except NodeNotRunningError:
            def change(saved: dict[str, Any]) -> None:
                if rendezvous is not None:
                    saved["rendezvous"] = rendezvous
                if not saved.get("rendezvous"):
                    raise LocalAPIError(
                        "the first join needs --rendezvous twistvpn://HOST:PORT#sha256=... "
                        "(the rendezvous's start-up line prints it)")
                settings.add_network(saved, network_id)

            settings.update(args.data_dir, change)  # one write, or none
            if key is not None:
                settings.store_pending_key(args.data_dir, network_id, key)
            out.write(f"{network_id}: joined\n" + STOPPED_HINT.format(dir=args.data_dir))
            return 0
        if rendezvous is not None:
            settings.update(args.data_dir, lambda saved: saved.update(rendezvous=rendezvous))
            out.write("the rendezvous is saved; the running node uses it from its next start\n")
        out.write(f"{network_id}: {result['status']}\n")
        if result["status"] == "pending":
            out.write("waiting for an admin to authorize this node "
                      "(twistvpn admin member auth on the rendezvous)\n")
        return 0

    return _settings_error(run, err)


def leave(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    from twistvpn.node import settings

    def run() -> int:
        network_id = settings.check_network_id(args.network)
        try:
            call_if_running(socket_path(args), {"command": "leave", "network": network_id})
        except NodeNotRunningError:
            if network_id not in settings.load(args.data_dir).get("networks", []):
                raise LocalAPIError(f"{network_id}: not a network of this node") from None
            settings.update(args.data_dir, lambda s: settings.remove_network(s, network_id))
            settings.drop_pending_key(args.data_dir, network_id)
            out.write(f"{network_id}: left\n" + STOPPED_HINT.format(dir=args.data_dir))
            return 0
        out.write(f"{network_id}: left\n")
        return 0

    return _settings_error(run, err)


def render_networks(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no networks (twistvpn join NETWORK_ID)\n"
    header = ["NETWORK", "NAME", "STATUS", "IP", "DOMAIN"]
    return columns(header, [[r["id"], r["name"] or "-", r["status"], r["ip"] or "-",
                             r.get("domain") or "-"] for r in rows])


def networks(args: argparse.Namespace, out: TextIO = sys.stdout,
             err: TextIO = sys.stderr) -> int:
    from twistvpn.node import settings

    def run() -> int:
        try:
            rows = call_if_running(socket_path(args), {"command": "networks"})
        except NodeNotRunningError:
            rows = [{"id": n, "name": None, "status": "stopped", "ip": None}
                    for n in settings.load(args.data_dir).get("networks", [])]
        out.write(json.dumps(rows, indent=2) + "\n" if args.json else render_networks(rows))
        return 0

    return _settings_error(run, err)


def set_setting(args: argparse.Namespace, out: TextIO = sys.stdout,
                err: TextIO = sys.stderr) -> int:
    from twistvpn.node import settings

    def run() -> int:
        key = args.key
        if key not in settings.SETTABLE:
            raise LocalAPIError(f"{key}: not a setting (settable: {', '.join(settings.SETTABLE)})")
        try:
            value = settings.CHECKS[key](args.value)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        try:
            result = call_if_running(socket_path(args),
                                     {"command": "set", "key": key, "value": value})
        except NodeNotRunningError:
            settings.update(args.data_dir, lambda saved: saved.__setitem__(key, value))
            out.write(f"{key} = {value}\n" + STOPPED_HINT.format(dir=args.data_dir))
            return 0
        out.write(f"{key} = {value}" + ("\n" if result["applied"] else
                                         " (saved; applies at the node's next start)\n"))
        return 0

    return _settings_error(run, err)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= MAX_PINGS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_PINGS}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """status, ping, netcheck: ask the joined node on this machine."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                       help=f"the node's data directory (default {DEFAULT_DATA_DIR})")
        p.add_argument("--socket", help="the node's local API socket (default DIR/node.sock)")

    p = subparsers.add_parser(
        "join", help="join a network now and at every start (the first join: --rendezvous)")
    p.add_argument("network", help="the network's ID (16 hex digits)")
    p.add_argument("--rendezvous", action="append",
                   help="twistvpn://HOST:PORT#sha256=... (saved); repeat it for the "
                        "instances of one rendezvous")
    p.add_argument("--auth-key-file",
                   help="a pre-auth key in a file only its owner may read: no admin needed")
    common(p)
    p.set_defaults(func=join)
    p = subparsers.add_parser("leave", help="leave a network: its routes and peers go now")
    p.add_argument("network", help="the network's ID")
    common(p)
    p.set_defaults(func=leave)
    p = subparsers.add_parser("networks", help="each network's ID, name, status and IP")
    common(p)
    p.set_defaults(func=networks)
    p = subparsers.add_parser(
        "set", help="change a setting (name: at once; the others at the next start)")
    p.add_argument("key", help="name, rendezvous, port, interface, metrics, answer-wait-us, "
                               "stay-awake-ms, tso")
    p.add_argument("value")
    common(p)
    p.set_defaults(func=set_setting)
    p = subparsers.add_parser("status", help="the joined node's peers and paths")
    common(p)
    p.set_defaults(func=status)
    p = subparsers.add_parser("ping", help="ping a peer; show the path used and the RTT")
    p.add_argument("peer", help="the peer's name, overlay IP, node ID or public key")
    p.add_argument("-c", "--count", type=_count, default=None,
                   help="pings to send (default 4; 10 with --until-direct)")
    p.add_argument("--until-direct", action="store_true",
                   help="stop at the first answer over a LAN or direct path")
    common(p)
    p.set_defaults(func=ping)
    p = subparsers.add_parser(
        "netcheck", help="public endpoint, NAT mapping, RTT to the rendezvous and relays")
    common(p)
    p.set_defaults(func=netcheck)
    p = subparsers.add_parser(
        "metrics", help="the node's Prometheus metrics (paths, RTTs, handshakes, drops)")
    common(p)
    p.set_defaults(func=metrics)

