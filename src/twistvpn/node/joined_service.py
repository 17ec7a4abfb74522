"""
The joined-mode node service: a data directory, a node key, a TUN device,
one UDP socket, a control connection to the rendezvous, and the local API.

L{JoinedNodeService} opens its L{DataPath} (as the static node does) and
builds the rest in C{startService} from factories it is given (so tests
hand it a fake TUN device and an in-memory reactor); the rendezvous client
is its child service.  C{stopService} removes device, routes and sockets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from twistvpn import build
from twistvpn.common.datadir import InsecurePermissionsError, open_data_dir
from twistvpn.common.tls import RendezvousAddress
from twistvpn.interfaces import INameService, INodeControl
from twistvpn.node import settings
from twistvpn.node.config import read_private_file
from twistvpn.node.datapath import DataPath, DataPathOwner, DeviceFactory, TunFactory
from twistvpn.node.files import SOCKET_NAME
from twistvpn.node.joined import JoinedNode, host_addresses
from twistvpn.node.local_api import LocalAPI, local_api_factory
from twistvpn.node.service import Resolver, listen_control_socket, resolve_endpoint, starting
from twistvpn.node.tun import DEFAULT_MTU
from twistvpn.node.uapi import claim_socket_path
from twistvpn.relay.client import RelayClient
from twistvpn.rendezvous.discovery import DiscoveryClient
from twistvpn.traversal.portmap import (
    PROTOCOLS,
    UPNP,
    PortMapper,
    PortMapProtocol,
    default_gateway,
    source_address_for,
)
from twistvpn.traversal.probe import ProbeService
from twistvpn.traversal.upnp import IGD, agent_requester
from twistvpn.wireguard.keys import (
    InvalidKey,
    decode_key,
    encode_key,
    public_key,
)

DEFAULT_PORT = 41641
KEY_FILE = "node.key"


class KeyFileError(ValueError):
    """A private key file that cannot be used; one line naming it."""


def read_key_file(path: str) -> bytes:
    """A private key (WireGuard text form) from a file only its owner may read."""
    try:
        return decode_key(read_private_file(path))
    except InsecurePermissionsError as e:
        raise KeyFileError(str(e)) from None
    except InvalidKey as e:
        raise KeyFileError(f"{path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"{path}: {getattr(e, 'strerror', None) or e}") from None


def load_or_create_key(data_dir: str) -> bytes:
    """
    The node's private key from C{DATA_DIR/node.key} (refused if group or
    others may read it); on first start, the directory and the key.
    """
    return open_data_dir(data_dir, KEY_FILE, read=read_key_file)


# (reactor, address, private key, name, listener, networks, local endpoints)
# -> an (unstarted) RendezvousClient
ClientFactory = Callable[..., Any]


def tls_client(reactor: Any, address: RendezvousAddress | Sequence[RendezvousAddress],
               private_key: bytes, name: str,
               listener: Any, networks: Sequence[str], local_endpoints: Sequence[str],
               auth_keys: dict[str, str] | None = None) -> Any:
    """The real control connection: TLS pinned to the address's fingerprint."""
    from twistvpn.rendezvous.client import RendezvousClient

    return RendezvousClient.from_address(reactor, address, private_key, name, listener,
                                         networks=networks, local_endpoints=local_endpoints,
                                         auth_keys=auth_keys)


@implementer(INodeControl)
class JoinedNodeService(DataPathOwner, MultiService):
    """
    A node whose networks come from a rendezvous: a L{DataPath} like the
    static node's, a L{JoinedNode} that applies what the rendezvous says,
    the rendezvous client (a child service), the local API and the control
    socket for C{wg show}.
    """

    log = Logger()

    def __init__(self, reactor: Any, *, data_dir: str, private_key: bytes,
                 rendezvous: RendezvousAddress | Sequence[RendezvousAddress],
                 networks: Sequence[str], name: str,
                 port: int = DEFAULT_PORT, interface_name: str,
                 open_tun: TunFactory, make_device: DeviceFactory,
                 make_client: ClientFactory = tls_client,
                 connect_stream: Callable[[Any, Any], Any] | None = None,
                 local_addresses: Callable[[], list[str]] | None = None,
                 resolve: Resolver = resolve_endpoint, listen_interface: str = "::",
                 control_socket: str | None = None, mtu: int = DEFAULT_MTU,
                 auth_key: str | None = None, names: INameService | None = None,
                 port_mapping: str = "off", **node_options: Any) -> None:
        super().__init__()
        self._reactor = reactor
        self.datapath = DataPath(reactor, private_key, interface_name=interface_name, mtu=mtu,
                                 open_tun=open_tun, make_device=make_device,
                                 listen_interface=listen_interface)
        self.port_number = port
        self.data_dir = data_dir
        self.private_key = private_key
        self.public_key = public_key(private_key)
        # Every instance of the rendezvous (one, or several sharing a database).
        self.rendezvous_all = ((rendezvous,) if isinstance(rendezvous, RendezvousAddress)
                               else tuple(rendezvous))
        self.rendezvous = self.rendezvous_all[0]
        self.networks = list(networks)
        self.auth_key = auth_key  # a pre-auth key, presented with each join
        self.node_name = name
        self._make_client = make_client
        self._connect_stream = connect_stream
        self._local_addresses = local_addresses
        self._resolve = resolve
        self._control_socket = control_socket
        self._node_options = node_options
        self.names = names
        self.port_mapping = port_mapping  # "auto", "pcp", "natpmp" or "off"
        self.portmap_port: Any = None
        self.node: JoinedNode | None = None
        self.client: Any = None
        self.api_port: Any = None
        self.control_port: Any = None

    @property
    def socket_path(self) -> str:
        return os.path.join(self.data_dir, SOCKET_NAME)

    def describe(self) -> str:
        """The node's state in the control socket's C{get=1} form (for C{wg show})."""
        return self.datapath.describe()

    def startService(self) -> None:
        super().startService()
        with starting(self._teardown):
            self._start()

    def _start(self) -> None:
        reactor = self._reactor
        # Resolve first: a bad name should fail before anything is created.
        discovery_hosts = [self._resolve(a.host, a.port)[0] for a in self.rendezvous_all]
        datapath = self.datapath
        datapath.open(self.port_number)
        forwarder, tun = datapath.forwarder, datapath.tun
        assert forwarder is not None
        probes = ProbeService(forwarder, reactor, self.private_key, self.public_key)
        relay = None
        if self._connect_stream is not None:
            relay = RelayClient(reactor, forwarder, self.private_key, self._connect_stream)

        def local_addresses() -> list[str]:
            if self._local_addresses is not None:
                return self._local_addresses()
            return host_addresses(exclude=[tun.name])

        def make_discovery(server_key: bytes, servers: list[tuple[str, int]],
                           epoch: bytes) -> DiscoveryClient:
            return DiscoveryClient(forwarder, reactor, self.private_key, server_key, servers,
                                   epoch=epoch)

        self.node = node = JoinedNode(
            reactor, self.public_key, forwarder=forwarder, device=datapath.device,
            tun=tun, probes=probes, relay=relay, listen_port=lambda: self.listening_port,
            local_addresses=local_addresses, make_discovery=make_discovery,
            discovery_hosts=discovery_hosts, on_join_status=self._join_status, names=self.names,
            **self._node_options)
        # Keys given by `twistvpn join --auth-key-file` wait in the data
        # directory until their network authorizes us; --auth-key-file on
        # the command line applies to every network of this run.
        auth_keys = settings.pending_keys(self.data_dir, self.networks)
        if self.auth_key is not None:
            auth_keys.update({network_id: self.auth_key for network_id in self.networks})
        self.client = self._make_client(reactor, self.rendezvous_all, self.private_key,
                                        self.node_name, node, self.networks,
                                        node.local_endpoints(), auth_keys)
        node.attach(self.client)
        node.start()
        self._start_port_mapping(node)
        claim_socket_path(self.socket_path)
        self.api_port = reactor.listenUNIX(
            self.socket_path, local_api_factory(LocalAPI(node, control=self)), mode=0o600)
        self.control_port = listen_control_socket(reactor, self._control_socket, self.describe)
        self.client.setServiceParent(self)  # started now: this service is running
        self.log.info(
            "twistvpn node up (joined mode): interface {name}, UDP port {port}, "
            "public key {key}, rendezvous {rendezvous}, networks {networks}, "
            "local API {socket}; {build}", build=build.describe(), name=tun.name,
            port=self.listening_port,
            key=encode_key(self.public_key), rendezvous=self.rendezvous_text,
            networks=", ".join(self.networks), socket=self.socket_path)

    @property
    def rendezvous_text(self) -> str:
        return ", ".join(str(a) for a in self.rendezvous_all)

    def _start_port_mapping(self, node: JoinedNode) -> None:
        """Ask the gateway for a mapping of our port (PCP, NAT-PMP, then UPnP), unless off."""
        if self.port_mapping == "off":
            return
        gateway = default_gateway()
        if gateway is None:
            self.log.info("port mapping: no IPv4 default gateway")
            return
        client_ip = source_address_for(gateway)
        if client_ip is None:
            return
        protocols = PROTOCOLS if self.port_mapping == "auto" else (self.port_mapping,)
        port = self.listening_port
        assert port is not None

        def make(send: Callable[[bytes, tuple[str, int]], Any]) -> PortMapper:
            igd = (IGD(agent_requester(self._reactor), gateway=gateway, client_ip=client_ip,
                       internal_port=port, description=f"twistvpn {self.listening_port}")
                   if UPNP in protocols else None)
            mapper = PortMapper(self._reactor, send, gateway=gateway, client_ip=client_ip,
                                internal_port=port, on_change=node.set_mapped,
                                protocols=protocols, igd=igd)
            node.port_mapper = mapper
            mapper.start()
            return mapper

        self.portmap_port = self._reactor.listenUDP(0, PortMapProtocol(make))

    # -- INodeControl: what `twistvpn join`, `leave` and `set` change ---------

    def _join_status(self, network_id: str, status: str) -> None:
        if status == "authorized":
            settings.drop_pending_key(self.data_dir, network_id)  # spent, or not needed

    def join(self, network_id: str, auth_key: str | None = None) -> Deferred[str | None]:
        network_id = settings.check_network_id(network_id)
        if auth_key is not None:
            settings.store_pending_key(self.data_dir, network_id, auth_key)
        def change(saved: dict[str, Any]) -> None:
            settings.add_network(saved, network_id)
            # A node started with --rendezvous: the next start needs it too.
            saved.setdefault("rendezvous", settings.rendezvous_setting(
                [str(a) for a in self.rendezvous_all]))

        settings.update(self.data_dir, change)
        if network_id not in self.networks:
            self.networks.append(network_id)
        self.log.info("joining network {network}", network=network_id)
        if self.client is None:
            return succeed(None)
        return self.client.join(network_id, auth_key)

    def leave(self, network_id: str) -> Deferred[None]:
        network_id = settings.check_network_id(network_id)
        settings.update(self.data_dir, lambda s: settings.remove_network(s, network_id))
        settings.drop_pending_key(self.data_dir, network_id)
        if network_id in self.networks:
            self.networks.remove(network_id)
        self.log.info("leaving network {network}", network=network_id)
        if self.client is None:
            return succeed(None)
        left = self.client.leave(network_id)  # drops the map first
        if self.node is not None:
            self.node.forget(network_id)
        return left

    def networks_status(self) -> list[dict[str, Any]]:
        known = self.node.status()["networks"] if self.node is not None else {}
        rows = []
        for network_id in dict.fromkeys([*self.networks, *known]):
            entry = known.get(network_id, {})
            rows.append({"id": network_id, "name": entry.get("name"),
                         "status": entry.get("status", "joining"), "ip": entry.get("ip"),
                         "ip6": entry.get("ip6"),
                         "subnet": entry.get("subnet"), "domain": entry.get("domain")})
        return rows

    def set_setting(self, key: str, value: Any) -> bool:
        if key not in settings.SETTABLE:
            raise settings.SettingsError(
                f"{key}: not a setting (settable: {', '.join(settings.SETTABLE)})")
        try:
            value = settings.CHECKS[key](value)
        except ValueError as e:
            raise settings.SettingsError(f"{key}: {e}") from None
        settings.update(self.data_dir, lambda s: s.__setitem__(key, value))
        if key == "name":
            self.node_name = value
            if self.client is not None:
                self.client.set_name(value).addErrback(
                    lambda f: self.log.warn("the rendezvous refused the name: {why}",
                                            why=f.getErrorMessage()))
            return True
        return False

    def stopService(self) -> Deferred[Any]:
        children = maybeDeferred(super().stopService)  # the rendezvous client
        stopped = [children, *self._teardown()]
        self.log.info("twistvpn node down: {name} removed", name=self.datapath.interface_name)
        return gatherResults(stopped, consumeErrors=True)

    def _teardown(self) -> list[Deferred[Any]]:
        stopped: list[Deferred[Any]] = []
        if self.client is not None:
            if self.client.parent is self:
                # Stopped here if this service still runs (a failed start).
                stopped.append(maybeDeferred(self.removeService, self.client))
            elif self.client.running:
                stopped.append(maybeDeferred(self.client.stopService))
            self.client = None
        if self.api_port is not None:
            stopped.append(maybeDeferred(self.api_port.stopListening))
            self.api_port = None
        if self.portmap_port is not None:
            mapper = self.portmap_port.protocol.mapper
            if mapper is not None:
                deleted = mapper.stop()  # asks the gateway to delete the mapping
                if deleted is not None:  # UPnP: an HTTP request, bounded by its timeout
                    stopped.append(deleted.addErrback(
                        lambda f: self.log.info("port mapping not deleted: {why}",
                                                why=f.getErrorMessage())))
            stopped.append(maybeDeferred(self.portmap_port.stopListening))
            self.portmap_port = None
        if self.node is not None:
            self.node.stop()
            self.node = None
        if self.names is not None:
            stopped.append(self.names.stop())
        if self.control_port is not None:
            stopped.append(maybeDeferred(self.control_port.stopListening))
            self.control_port = None
        return stopped + self.datapath.close()
