"""
C{twistvpn admin}: administer a rendezvous through its admin API.

    twistvpn admin [--data-dir DIR | --url URL --token T] network create NAME [--subnet CIDR]
    twistvpn admin ... network list | network delete ID
    twistvpn admin ... network set ID [--name NAME] [--domain DOMAIN]
    twistvpn admin ... member list ID
    twistvpn admin ... member auth|deauth|delete ID NODE
    twistvpn admin ... member set-ip ID NODE IP
    twistvpn admin ... member rename ID NODE NAME
    twistvpn admin ... web-password
    twistvpn admin ... status

With C{--data-dir} (the default) it talks to the UNIX socket in the
rendezvous's data directory; with C{--url} to the HTTP API, with the token
from C{--token}, C{--token-file} or C{$TWISTVPN_ADMIN_TOKEN}.  A plain
synchronous HTTP client: a command-line tool has nothing to wait for
concurrently.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

from twistvpn.options import is_decimal
from twistvpn.rendezvous import wgquick
from twistvpn.rendezvous.files import ADMIN_SOCKET, DEFAULT_DATA_DIR, TOKEN_FILE
from twistvpn.table import columns
from twistvpn.wireguard.keys import encode_key, generate_private_key, public_key

TIMEOUT = 30.0


class AdminError(Exception):
    """What went wrong, in one line."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=TIMEOUT)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """The admin API as method calls; every error is an L{AdminError}."""

    def __init__(
        self,
        data_dir: str | None = None,
        url: str | None = None,
        token: str | None = None,
    ) -> None:
        self._data_dir = data_dir
        self._url = url
        self._token = token
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise AdminError(f"bad --url {url!r}: expected http(s)://HOST:PORT")
            self._prefix = parts.path.rstrip("/")
            self._target = parts
            self._host: str = parts.hostname
        elif data_dir is None:
            raise AdminError("give --data-dir or --url")

    def _connection(self) -> http.client.HTTPConnection:
        if self._url is None:
            assert self._data_dir is not None
            return _UnixHTTPConnection(os.path.join(self._data_dir, ADMIN_SOCKET))
        cls = (
            http.client.HTTPSConnection
            if self._target.scheme == "https"
            else http.client.HTTPConnection
        )
        return cls(self._host, self._target.port, timeout=TIMEOUT)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["content-type"] = "application/json"
        if self._token is not None:
            headers["authorization"] = f"Bearer {self._token}"
        prefix = self._prefix if self._url is not None else ""
        where = self._url or os.path.join(self._data_dir or "", ADMIN_SOCKET)
        connection = self._connection()
        try:
            connection.request(method, prefix + "/api/v1/" + path, data, headers)
            response = connection.getresponse()
            payload = response.read()
        except FileNotFoundError:
            raise AdminError(f"no rendezvous is running ({where} does not exist)") from None
        except ConnectionRefusedError:
            raise AdminError(f"no rendezvous answers at {where}") from None
        except PermissionError:
            raise AdminError(f"permission denied: {where} (run as the rendezvous's user)") from None
        except (OSError, http.client.HTTPException) as e:
            raise AdminError(f"cannot reach the rendezvous at {where}: {e}") from None
        finally:
            connection.close()
        try:
            result = json.loads(payload)
        except ValueError:
            raise AdminError(f"the rendezvous answered {response.status} without JSON") from None
        if response.status >= 400:
            message = result.get("error") if isinstance(result, dict) else None
            raise AdminError(message or f"HTTP {response.status}")
        return result

    # -- the API ------------------------------------------------------------

    def create_network(self, name: str, subnet: str | None, private: bool,
                       force: bool = False) -> Any:
        body: dict[str, Any] = {"name": name, "private": private}
        if force:
            body["force"] = True
        if subnet is not None:
            body["subnet"] = subnet
        return self.request("POST", "networks", body)

    def member(self, network_id: str, node: str, method: str, body: Any = None) -> Any:
        return self.request(method, f"networks/{_seg(network_id)}/members/{_seg(node)}", body)


def _seg(text: str) -> str:
    return quote(text, safe="")


def _ago(then: float | None, now: float) -> str:
    if then is None:
        return "never"
    seconds = max(0, int(now - then))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _print_members(members: list[dict[str, Any]], out: TextIO) -> None:
    now = time.time()
    rows = [
        [
            m["node_id"],
            m["name"] or "-",
            "yes" if m["authorized"] else "no",
            m["ip"] or "-",
            _ago(m["last_seen"], now),
            (m["endpoints"] or ["-"])[0],
            # A device never connects to the rendezvous: it is reached through the relay.
            "device" if m.get("kind") == "device" else ("yes" if m["online"] else "no"),
        ]
        for m in members
    ]
    out.write(
        columns(["NODE", "NAME", "AUTHORIZED", "IP", "LAST SEEN", "ENDPOINT", "ONLINE"], rows)
    )


def _print_member(m: dict[str, Any], out: TextIO) -> None:
    state = "authorized" if m["authorized"] else "not authorized"
    out.write(f"{m['node_id']} {m['name'] or '-'}: {state}, IP {m['ip'] or '-'}\n")


def _print_keys(keys: list[dict[str, Any]], out: TextIO) -> None:
    rows = [
        [
            k["id"], k["network_id"], "yes" if k["reusable"] else "no", str(k["uses"]),
            "never" if k["expires"] is None
            else time.strftime("%Y-%m-%d %H:%M", time.localtime(k["expires"])),
            "yes" if k["revoked"] else "no", "yes" if k["valid"] else "no",
        ]
        for k in keys
    ]
    out.write(columns(["ID", "NETWORK", "REUSABLE", "USES", "EXPIRES", "REVOKED", "VALID"],
                      rows))


def _print_audit(entries: list[dict[str, Any]], out: TextIO) -> None:
    rows = [
        [
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"])),
            e["actor"], e["action"], e["object"], e["result"],
        ]
        for e in entries
    ]
    out.write(columns(["TIME", "ACTOR", "ACTION", "OBJECT", "RESULT"], rows))


def duration(text: str) -> float:
    """Seconds from "90", "90s", "15m", "2h" or "7d" (argparse type)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    if not is_decimal(number) or not number:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (90s, 15m, 2h, 7d)")
    return int(number) * units[unit]


def _read_password(stdin: TextIO) -> str:
    """Twice, hidden, on a terminal; one line otherwise (scripts, `echo ... |`)."""
    if stdin.isatty():
        import getpass

        first = getpass.getpass("New web console password: ")
        if getpass.getpass("Again: ") != first:
            raise AdminError("the two passwords differ; nothing changed")
        return first
    line = stdin.readline()
    if not line.strip():
        raise AdminError("no password on stdin; nothing changed")
    return line.rstrip("\r\n")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        client = _client(args)
        what = (args.admin_object, args.admin_action)
        if what == ("network", "create"):
            network = client.create_network(args.name, args.subnet, not args.public,
                                            args.force)
            out.write(network["id"] + "\n")
        elif what == ("network", "list"):
            networks = client.request("GET", "networks")
            rows = [
                [
                    n["id"],
                    n["name"],
                    n["subnet"],
                    "private" if n["private"] else "public",
                    str(n["members"]),
                    str(n["authorized"]),
                    n["domain"],
                ]
                for n in networks
            ]
            out.write(columns(["ID", "NAME", "SUBNET", "ACCESS", "MEMBERS", "AUTHORIZED",
                               "DOMAIN"], rows))
        elif what == ("network", "set"):
            change = {k: v for k, v in (("name", args.name), ("domain", args.domain))
                      if v is not None}
            if not change:
                raise AdminError("network set: give --name and/or --domain")
            network = client.request("POST", f"networks/{_seg(args.network)}", change)
            out.write(f"{network['id']} {network['name']}: domain {network['domain']}\n")
        elif what == ("network", "delete"):
            client.request("DELETE", f"networks/{_seg(args.network)}")
        elif what == ("member", "list"):
            _print_members(client.request("GET", f"networks/{_seg(args.network)}/members"), out)
        elif what == ("member", "auth"):
            _print_member(client.member(args.network, args.node, "POST", {"authorized": True}), out)
        elif what == ("member", "deauth"):
            _print_member(
                client.member(args.network, args.node, "POST", {"authorized": False}), out
            )
        elif what == ("member", "delete"):
            client.member(args.network, args.node, "DELETE")
        elif what == ("member", "rename"):
            _print_member(client.member(args.network, args.node, "POST", {"name": args.name}),
                          out)
        elif what == ("member", "set-ip"):
            _print_member(client.member(args.network, args.node, "POST", {"ip": args.ip}), out)
        elif what == ("web-password", None):
            password = _read_password(args.stdin or sys.stdin)
            result = client.request("POST", "web-password", {"password": password})
            out.write(f"web password {result['web_password']}\n")
        elif what == ("status", None):
            out.write(json.dumps(client.request("GET", "status"), indent=1) + "\n")
        elif what == ("key", "create"):
            body: dict[str, Any] = {"reusable": args.reusable}
            if args.expires is not None:
                body["expires_in"] = args.expires
            if args.name_prefix is not None:
                body["name_prefix"] = args.name_prefix
            key = client.request("POST", f"networks/{_seg(args.network)}/keys", body)
            out.write(key["secret"] + "\n")
            sys.stderr.write(f"key {key['id']} for network {key['network_id']}: "
                             "shown this once; give it to the node (--auth-key-file)\n")
        elif what == ("key", "list"):
            path = "keys" if args.network is None else f"networks/{_seg(args.network)}/keys"
            _print_keys(client.request("GET", path), out)
        elif what == ("key", "revoke"):
            client.request("DELETE", f"keys/{_seg(args.key)}")
        elif what == ("device", "add"):
            private = None
            if args.public_key is None:
                # Made here and printed once: the rendezvous never sees it.
                private_key = generate_private_key()
                private, public = encode_key(private_key), encode_key(public_key(private_key))
            else:
                public = args.public_key
            member = client.request("POST", f"networks/{_seg(args.network)}/devices",
                                    {"name": args.name, "public_key": public})
            config = client.request(
                "GET", f"networks/{_seg(args.network)}/devices/{_seg(member['node_id'])}/config")
            _print_device(config, private, args.qr, out)
        elif what == ("device", "config"):
            config = client.request(
                "GET", f"networks/{_seg(args.network)}/devices/{_seg(args.name)}/config")
            _print_device(config, None, args.qr, out)
        elif what == ("audit", None):
            query = "" if args.since is None else f"?since={time.time() - args.since:.3f}"
            _print_audit(client.request("GET", "audit" + query), out)
        else:  # pragma: no cover - argparse allows nothing else
            raise AdminError(f"unknown command {what}")
    except AdminError as e:
        sys.stderr.write(f"twistvpn admin: {e}\n")
        return 1
    return 0


def _print_device(config: dict[str, Any], private: str | None, qr: bool, out: TextIO) -> None:
    text = wgquick.render(config, private)
    if qr:
        try:
            out.write(wgquick.qr_code(text))
        except wgquick.QRError as e:
            raise AdminError(str(e)) from None
    else:
        out.write(text)
    if private is not None:
        sys.stderr.write(f"device {config['name']} ({config['node_id']}): its private key is in "
                         "this file only, shown this once\n")
    elif not qr:
        sys.stderr.write("put the device's own private key in the file (PrivateKey)\n")


def _client(args: argparse.Namespace) -> AdminClient:
    if args.url is None:
        if args.token is not None or args.token_file is not None:
            raise AdminError("--token and --token-file go with --url")
        return AdminClient(data_dir=args.data_dir or DEFAULT_DATA_DIR)
    if args.data_dir is not None:
        raise AdminError("give either --data-dir or --url, not both")
    token = args.token or os.environ.get("TWISTVPN_ADMIN_TOKEN")
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise AdminError(f"--token-file {args.token_file}: {e.strerror}") from None
    if not token:
        raise AdminError(
            f"--url needs a token (--token, --token-file or $TWISTVPN_ADMIN_TOKEN; "
            f"it is in the rendezvous's DATA-DIR/{TOKEN_FILE})"
        )
    return AdminClient(url=args.url, token=token)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The C{admin} command and its subcommands."""
    admin = subparsers.add_parser(
        "admin",
        help="administer a rendezvous: networks and members",
        description="Administer a twistvpn rendezvous through its admin API.",
    )
    # Where the rendezvous is: before the object or after the action alike
    # ("admin --data-dir D network list" and "admin network list --data-dir D").
    connection = argparse.ArgumentParser(add_help=False)
    for parser, default in ((admin, None), (connection, argparse.SUPPRESS)):
        parser.add_argument(
            "--data-dir", default=default,
            help=f"the rendezvous's data directory, for its admin socket "
                 f"(default {DEFAULT_DATA_DIR})",
        )
        parser.add_argument("--url", default=default,
                            help="the HTTP admin API, e.g. http://127.0.0.1:8444")
        parser.add_argument("--token", default=default, help="bearer token for --url")
        parser.add_argument("--token-file", default=default,
                            help="file holding the bearer token for --url")
    objects = admin.add_subparsers(dest="admin_object", metavar="OBJECT", required=True)

    network = objects.add_parser("network", help="create, list and delete networks")
    actions = network.add_subparsers(dest="admin_action", metavar="ACTION", required=True)
    p = actions.add_parser("create", help="create a network and print its ID", parents=[connection])
    p.add_argument("name")
    p.add_argument("--force", action="store_true",
                   help="create it even if another network has the name")
    p.add_argument("--subnet", help="IPv4 CIDR (default: a free /24 of 100.64.0.0/10)")
    p.add_argument(
        "--public", action="store_true", help="members need no authorization (default: private)"
    )
    actions.add_parser("list", help="list networks", parents=[connection])
    p = actions.add_parser("delete", help="delete a network", parents=[connection])
    p.add_argument("network", metavar="ID")
    p = actions.add_parser("set", help="rename a network or set its DNS domain",
                           parents=[connection])
    p.add_argument("network", metavar="ID")
    p.add_argument("--name", help="the network's new name")
    p.add_argument("--domain", help="its members' DNS domain ('': NAME.twistvpn.internal)")

    member = objects.add_parser("member", help="list and manage a network's members")
    actions = member.add_subparsers(dest="admin_action", metavar="ACTION", required=True)
    p = actions.add_parser("list", help="list a network's members", parents=[connection])
    p.add_argument("network", metavar="ID")
    for action, text in (
        ("auth", "authorize a member (assigns the next free IP unless it has one)"),
        ("deauth", "revoke a member's authorization at once"),
        ("delete", "remove a member and release its IP"),
    ):
        p = actions.add_parser(action, help=text, parents=[connection])
        p.add_argument("network", metavar="ID")
        p.add_argument("node", metavar="NODE", help="node ID (10 hex digits) or public key")
    p = actions.add_parser("set-ip", help="give a member a managed IP", parents=[connection])
    p.add_argument("network", metavar="ID")
    p.add_argument("node", metavar="NODE")
    p.add_argument("ip", metavar="IP")
    p = actions.add_parser("rename", help="name a member in this network ('': the node's own)",
                           parents=[connection])
    p.add_argument("network", metavar="ID")
    p.add_argument("node", metavar="NODE")
    p.add_argument("name", metavar="NAME")

    device = objects.add_parser(
        "device", help="stock WireGuard apps (phones, Macs, Windows) as members, via the relay")
    actions = device.add_subparsers(dest="admin_action", metavar="ACTION", required=True)
    p = actions.add_parser("add", parents=[connection],
                           help="add a device (authorized, with an IP) and print its wg-quick file")
    p.add_argument("network", metavar="ID")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--public-key", default=None,
                   help="the key the device made itself (else a key pair is made here, "
                        "printed once in the file, and never stored)")
    p.add_argument("--qr", action="store_true", help="print the file as a QR code (qrencode)")
    p = actions.add_parser("config", parents=[connection],
                           help="print a device's wg-quick file again (nodes may have changed)")
    p.add_argument("network", metavar="ID")
    p.add_argument("name", metavar="NAME", help="its name, node ID or public key")
    p.add_argument("--qr", action="store_true", help="print the file as a QR code (qrencode)")

    key = objects.add_parser("key", help="pre-auth keys: nodes that join with one are authorized")
    actions = key.add_subparsers(dest="admin_action", metavar="ACTION", required=True)
    p = actions.add_parser("create", help="make a key and print its secret (shown this once)",
                           parents=[connection])
    p.add_argument("network", metavar="ID")
    p.add_argument("--reusable", action="store_true",
                   help="any number of nodes may join with it (default: one)")
    p.add_argument("--expires", type=duration, default=None, metavar="DURATION",
                   help="it stops working after DURATION (90s, 15m, 2h, 7d; default never)")
    p.add_argument("--name-prefix", default=None, help="recorded with the key")
    p = actions.add_parser("list", help="list keys (never their secrets)", parents=[connection])
    p.add_argument("network", metavar="ID", nargs="?", default=None)
    p = actions.add_parser("revoke", help="revoke a key at once", parents=[connection])
    p.add_argument("key", metavar="KEY_ID")

    password = objects.add_parser(
        "web-password", help="set the web console's admin password (prompts twice on a TTY, "
        "else reads one line from stdin)", parents=[connection])
    password.set_defaults(admin_action=None, stdin=None)
    status = objects.add_parser("status", help="the rendezvous's address, key and counters",
                                parents=[connection])
    status.set_defaults(admin_action=None)
    audit = objects.add_parser(
        "audit", help="who changed what, and when: the rendezvous's audit log",
        parents=[connection])
    audit.add_argument("--since", type=duration, default=None, metavar="DURATION",
                       help="only the last DURATION (90s, 15m, 2h, 7d)")
    audit.set_defaults(admin_action=None)
    admin.set_defaults(func=run)
