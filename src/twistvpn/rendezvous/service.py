"""
The rendezvous process: its data directory and the services that listen.

L{prepare_data_dir} does what a first start needs (the directory, mode
0700; the server key; a self-signed certificate unless one is given; the
admin token; the database) and L{RendezvousService} hangs the listeners on
a C{MultiService}.  Both take everything as arguments, the reactor too.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.application.service import MultiService
from twisted.internet import defer, ssl
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import Site

from twistvpn import __version__
from twistvpn.common import tls
from twistvpn.common.datadir import DataDirError, open_data_dir
from twistvpn.common.metrics import (
    Family,
    MetricsResource,
    WithMetrics,
    counters,
    is_loopback_endpoint,
)
from twistvpn.common.services import (
    DatagramListenService,
    StreamListener,
    quiet,
    release_free_memory,
)
from twistvpn.interfaces import IRendezvousRelays
from twistvpn.rendezvous.admin import AdminAPI, load_or_create_token
from twistvpn.rendezvous.audit import AuditLog
from twistvpn.rendezvous.channel import ChannelFactory
from twistvpn.rendezvous.controller import Controller
from twistvpn.rendezvous.database import DBError, get_db
from twistvpn.rendezvous.discovery import DiscoveryProtocol, DiscoveryState
from twistvpn.rendezvous.files import ADMIN_SOCKET, AUDIT_FILE, STATE_FILE, WEB_PASSWORD_FILE
from twistvpn.rendezvous.server import ControlServerFactory
from twistvpn.rendezvous.store import SQLiteStore
from twistvpn.rendezvous.webpassword import WebPassword
from twistvpn.wireguard.keys import (
    encode_key,
    public_key,
)

SERVER_KEY_FILE = "server.key"
CERT_FILE = "tls-cert.pem"
KEY_FILE = "tls-key.pem"
DB_FILE = "rendezvous.sqlite"
# sockaddr_un holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107
# Which option each listener comes from, for a start-up error a person can act on.
_LISTENER_OPTIONS = {"control": "--control", "udp0": "--udp-port", "udp1": "--udp-port2",
                     "admin-unix": "the admin socket", "admin-http": "--admin-http"}
# How often the rendezvous hands freed memory back to the system (after a
# flood of connections, say): a few milliseconds each time.
TRIM_INTERVAL = 30.0
# Connections the kernel holds for the control port until they are accepted.
# A dead instance's nodes reach a survivor by the hundred a second; with
# Twisted's default of 50 the kernel drops the rest's SYNs, and TCP sends
# them again only after 1, 3, 7... s (the fail-over benchmark's stragglers).
CONTROL_BACKLOG = 1024


def with_backlog(description: str, backlog: int = CONTROL_BACKLOG) -> str:
    """A TCP endpoint description with C{backlog}, unless it names its own."""
    if description.split(":", 1)[0].lower() in ("tcp", "tcp6") and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


_Listener = TypeVar("_Listener", StreamListener, DatagramListenService)


@dataclass
class DataDir:
    """What a started rendezvous reads from its directory."""

    path: str
    server_private: bytes
    cert_pem: bytes
    key_pem: bytes
    token: str
    db: Any  # a sqlite3.Connection, or a pgstore.Connection with --database
    database: str | None = None  # a postgresql:// URL, or None: sqlite in the directory

    def open_store(self) -> SQLiteStore:
        """The controller's store over C{db}: PostgreSQL's, or sqlite's."""
        if self.database is not None:
            from twistvpn.rendezvous.pgstore import PostgreSQLStore

            return PostgreSQLStore(self.db)
        return SQLiteStore(self.db)

    @property
    def fingerprint(self) -> bytes:
        return tls.fingerprint(self.cert_pem)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataDirError(f"cannot read {path}: {e.strerror}") from None


def prepare_data_dir(
    path: str,
    hostname: str,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    database: str | None = None,
) -> DataDir:
    """
    Create (on first start) and load the rendezvous's data directory, and
    open its database: sqlite there, or the PostgreSQL one at C{database}.
    """
    socket_path = os.path.join(path, ADMIN_SOCKET)
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        raise DataDirError(
            f"{path}: too long a path for the admin socket {socket_path} "
            f"(at most {MAX_SOCKET_PATH} bytes)"
        )
    server_private = open_data_dir(path, SERVER_KEY_FILE)
    if tls_cert is not None and tls_key is not None:
        cert_pem, key_pem = _read(tls_cert), _read(tls_key)
    else:
        try:
            cert_pem, key_pem = tls.load_or_create_self_signed(
                os.path.join(path, CERT_FILE), os.path.join(path, KEY_FILE), hostname
            )
        except OSError as e:
            raise DataDirError(f"cannot read {e.filename}: {e.strerror}") from None
    try:
        tls.server_options(cert_pem, key_pem)
    except tls.TLSConfigError as e:
        raise DataDirError(str(e)) from None
    try:
        token = load_or_create_token(path)
    except (OSError, ValueError) as e:
        raise DataDirError(str(e)) from None
    try:
        if database is not None:
            from twistvpn.rendezvous import pgstore

            db: Any = pgstore.connect(database)
            # Instances on one database are one rendezvous to nodes: the first
            # one's server key and certificate (unless --tls-cert gives one).
            mine = {"server_key": server_private}
            if tls_cert is None:
                mine |= {"tls_cert": cert_pem, "tls_key": key_pem}
            shared = pgstore.share_identity(db, mine)
            server_private = shared["server_key"]
            cert_pem, key_pem = shared.get("tls_cert", cert_pem), shared.get("tls_key", key_pem)
        else:
            db = get_db(os.path.join(path, DB_FILE))
    except DBError as e:
        raise DataDirError(str(e)) from None
    return DataDir(path, server_private, cert_pem, key_pem, token, db, database)


@dataclass(frozen=True)
class RelaySettings:
    """
    The relays a rendezvous hosts: its embedded one (on by default, at
    C{public_ip}, an address nodes reach it at; without one it cannot be
    advertised and is left out), and the link standalone relays whose keys
    are C{relay_keys} log in to (C{link}, a server endpoint, or None).
    """

    embedded: bool = True
    public_ip: str | None = None
    udp_port: int = 443
    tcp_port: int = 443
    link: str | None = None
    relay_keys: tuple[bytes, ...] = ()

    @property
    def runs_embedded(self) -> bool:
        """Whether the embedded relay runs: asked for, and with an address to advertise."""
        return self.embedded and self.public_ip is not None

    @property
    def any(self) -> bool:
        """Whether there is any relay to attach: the embedded one, or the link."""
        return self.runs_embedded or self.link is not None


NO_RELAYS = RelaySettings(embedded=False)


def _exit_failed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _port_number(port: IListeningPort) -> int:
    """The port number a listener got (the configured one, or the kernel's for 0)."""
    address: Any = port.getHost()  # an IPv4Address or IPv6Address: both have .port
    return int(address.port)


class RendezvousService(MultiService):
    """Every listener of one rendezvous, and the state behind them."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        data: DataDir,
        hostname: str,
        control: str = "tcp:8443",
        udp_ports: tuple[int, int] = (3478, 3479),
        udp_interface: str = "",
        udp_interface6: str = "",
        admin_http: str | None = None,
        registration_rate: float = 20.0,
        relays: RelaySettings = NO_RELAYS,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.data = data
        self.hostname = hostname
        self.controller = Controller(data.open_store(), reactor)
        if data.database is not None:
            # Other instances may share the database: hear them, tell them.
            from twistvpn.rendezvous import pgstore
            from twistvpn.rendezvous.cluster import Cluster

            controller = self.controller
            cluster = Cluster(controller.registry, controller.membership,
                              pgstore.notifier(data.db), controller.counters)
            controller.attach_cluster(cluster)
            pgstore.ClusterService(reactor, data.database, cluster, data.db).setServiceParent(
                self)
        self.discovery = DiscoveryState(self.controller, data.server_private, reactor)
        self.control_factory = ControlServerFactory(
            self.controller, data.server_private, reactor, udp_ports, registration_rate,
            discovery_epoch=self.discovery.epoch, discovery6=udp_interface6 or None,
        )
        self._listeners: list[StreamListener | DatagramListenService] = []
        self._udp: list[DatagramListenService] = []
        for which, port in enumerate(udp_ports):
            protocol = DiscoveryProtocol(self.discovery, which)
            udp = DatagramListenService(reactor, port, protocol, udp_interface, buffer_size=None)
            self._udp.append(self._add(f"udp{which}", udp))
            if udp_interface6:
                protocol6 = DiscoveryProtocol(self.discovery, which, record=False)
                udp6 = DatagramListenService(reactor, port, protocol6, udp_interface6,
                                             buffer_size=None)
                self._add(f"udp6-{which}", udp6)  # the same port numbers, on IPv6
        control_tls = tls.server_options(data.cert_pem, data.key_pem, ssl.TLSVersion.TLSv1_3)
        self.channel_factory = ChannelFactory(control_tls, False, self.control_factory,
                                              clock=reactor)
        self.control = self._add(
            "control", StreamListener(serverFromString(reactor, with_backlog(control)),
                                      self.channel_factory)
        )
        self.relay_settings = relays
        self._trimmer: LoopingCall | None = None
        # The relays, when the tap attaches them (twistvpn.rendezvous.rendezvous_tap).
        self.relays: IRendezvousRelays | None = None
        self.audit = AuditLog(data.file(AUDIT_FILE), reactor.seconds)
        self.web_password = WebPassword(data.file(WEB_PASSWORD_FILE))
        # The admin API as the socket's owner uses it (and the web console, in process).
        self.admin_api = AdminAPI(self.controller, None, self.info, self.audit,
                                  self.web_password)
        socket = data.file(ADMIN_SOCKET)
        unix = UNIXServerEndpoint(reactor, socket, mode=0o600, wantPID=True)
        self.admin_unix = self._add(
            "admin-unix", StreamListener(unix, quiet(Site(self.admin_api))))
        self.console: StreamListener | None = None
        self._console_endpoint = ""
        self.admin_http: StreamListener | None = None
        if admin_http is not None:
            # /metrics beside the API: without a token on loopback (Prometheus
            # on the same machine), with the admin token anywhere else.
            token = None if is_loopback_endpoint(admin_http) else data.token
            api = AdminAPI(self.controller, data.token, self.info, self.audit,
                           self.web_password)
            site = quiet(Site(WithMetrics(MetricsResource(self.metrics, token), api)))
            self.admin_http = self._add(
                "admin-http", StreamListener(serverFromString(reactor, admin_http), site)
            )

    def attach_console(self, listener: StreamListener, endpoint: str) -> None:
        """The web console's listener (built by the tap: the console sits above us)."""
        self.console = self._add("console", listener)
        self._console_endpoint = endpoint

    def console_url(self) -> str | None:
        if self.console is None or self.console.port is None:
            return None
        interface = dict(p.split("=", 1) for p in self._console_endpoint.split(":")[2:]
                         if "=" in p).get("interface")
        host = interface if interface and interface not in ("0.0.0.0", "::") else self.hostname
        if ":" in host:
            host = f"[{host}]"
        return f"https://{host}:{_port_number(self.console.port)}/"

    def _add(self, name: str, listener: _Listener) -> _Listener:
        listener.setName(name)
        listener.setServiceParent(self)
        self._listeners.append(listener)
        return listener

    def metrics(self) -> list[Family]:
        """Prometheus families: nodes, networks, members, and every counter kept."""
        status = self.controller.status()
        nodes = Family("twistvpn_rendezvous_nodes", "gauge", "Nodes ever registered, and online.",
                       ("state",))
        nodes.add(status["nodes"], "registered").add(status["online"], "online")
        networks = self.controller.list_networks()
        members = Family("twistvpn_rendezvous_members", "gauge", "Members, by state.",
                         ("state",))
        authorized = sum(n["authorized"] for n in networks)
        members.add(authorized, "authorized").add(
            sum(n["members"] for n in networks) - authorized, "pending")
        families = [
            nodes, members,
            Family("twistvpn_rendezvous_networks", "gauge", "Networks.").add(len(networks)),
            counters("twistvpn_rendezvous_events", "Registrations, joins, map pushes, punches.",
                     "event", status["counters"]),
            counters("twistvpn_rendezvous_control", "Control connections and their failures.",
                     "event", dict(self.control_factory.counters)
                     | {f"channel_{k}": v for k, v in self.channel_factory.counters.items()}),
            counters("twistvpn_rendezvous_discovery", "Discovery requests answered and dropped.",
                     "event", dict(self.discovery.counters)),
        ]
        latency = self.controller.publisher.push_latency
        families.append(Family(
            "twistvpn_rendezvous_map_push_latency_seconds", "histogram",
            "Seconds from a change members see to the push of their maps.",
            histogram=(latency.cumulative(), latency.sum)))
        if self.relays is not None:
            families += self.relays.metrics()
        return families

    def relay_status(self) -> dict[str, Any]:
        """The relays' part of the status: where they are and their counters."""
        if self.relays is None:
            if not self.relay_settings.embedded:
                reason = "--no-relay"
            else:
                reason = f"no --public-ip (--hostname {self.hostname} is not an IP address)"
            return {"embedded": None, "embedded_off": reason, "standalone": [], "advertised": []}
        status = self.relays.stats()
        if status["embedded"] is None:
            status["embedded_off"] = "--no-relay"
        status["advertised"] = list(self.controller.relays)
        return status

    @property
    def udp_ports(self) -> tuple[int, ...]:
        return tuple(_port_number(s.port) for s in self._udp if s.port is not None)

    @property
    def address(self) -> tls.RendezvousAddress | None:
        """Where nodes connect, once the control port listens."""
        if self.control.port is None:
            return None
        return tls.RendezvousAddress(
            self.hostname, _port_number(self.control.port), self.data.fingerprint
        )

    def info(self) -> dict[str, Any]:
        """The facts an admin (or a node's operator) needs."""
        admin_port = None
        if self.admin_http is not None and self.admin_http.port is not None:
            admin_port = _port_number(self.admin_http.port)
        return {
            "version": __version__,
            "url": str(self.address) if self.address else None,
            "server_key": encode_key(public_key(self.data.server_private)),
            "udp_ports": list(self.udp_ports),
            "admin_http_port": admin_port,
            "console": self.console_url(),
            "discovery": dict(self.discovery.counters),
            "control": dict(self.control_factory.counters)
            | {f"channel_{k}": v for k, v in self.channel_factory.counters.items()},
            "relays": self.relay_status(),
        }

    def startService(self) -> None:
        super().startService()
        self._trimmer = LoopingCall(release_free_memory)
        self._trimmer.clock = self.reactor
        self._trimmer.start(TRIM_INTERVAL, now=False)
        ready = [s.listening for s in self._listeners]
        d = defer.gatherResults(ready, consumeErrors=True)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, _: object) -> None:
        self.control_factory.udp_ports = self.udp_ports
        info = self.info()
        console = "off (--web '')"
        if info["console"]:
            console = info["console"] + ("" if self.web_password.is_set else
                                         " (set its password: twistvpn admin web-password)")
        self.log.info(
            "twistvpn rendezvous ready. Nodes use: {url} (server key {key}; "
            "discovery on UDP {udp}; admin socket {socket}; web console {console})",
            url=info["url"],
            key=info["server_key"],
            udp=info["udp_ports"],
            socket=self.data.file(ADMIN_SOCKET),
            console=console,
        )
        # The state file is what scripts (and tests) wait for: after the ready line.
        tls.write_private(self.data.file(STATE_FILE), (json.dumps(info, indent=1) + "\n").encode())
        relays = info["relays"]
        if relays["embedded"] is not None:
            embedded = relays["advertised"][0]
            self.log.info(
                "embedded relay at {host} (UDP {udp}, TLS on TCP {tcp})",
                host=embedded["host"], udp=embedded["port"], tcp=embedded["tcp_port"],
            )
        elif self.relay_settings.embedded:
            self.log.warn(
                "no embedded relay: it needs an IP address nodes reach it at (--public-ip); "
                "nodes whose NATs cannot be traversed will have no path"
            )

    def _failed(self, failure: Any) -> None:
        option = "a port"
        reason = failure
        if failure.check(defer.FirstError):
            reason = failure.value.subFailure
            name = self._listeners[failure.value.index].name
            option = _LISTENER_OPTIONS.get(name, name)
        self.log.critical(
            "twistvpn-rendezvous: cannot listen for {option}: {reason}; stopping",
            option=option, reason=reason.getErrorMessage(),
        )
        # twistd has no exit status of its own: leave with 1 once it has
        # shut down (services stopped, database closed).
        self.reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
        self.reactor.callLater(0, self.reactor.stop)

    def stopService(self) -> defer.Deferred[None]:
        if self._trimmer is not None and self._trimmer.running:
            self._trimmer.stop()
        self.controller.close()
        closed = self.control_factory.close_all()
        d = defer.maybeDeferred(super().stopService)
        d.addCallback(lambda _: closed)

        def close(_: object) -> None:
            self.data.db.close()
            self.audit.close()
            for name in (STATE_FILE,):
                try:
                    os.unlink(self.data.file(name))
                except OSError:
                    pass

        return d.addCallback(close)
