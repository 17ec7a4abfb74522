"""
The joined-mode node service: a data directory, a node key, a TUN device,
one UDP socket, a control connection to the rendezvous, and the local API.

L{JoinedNodeService} builds everything in C{startService} from factories it
is given (so tests hand it a fake TUN device and an in-memory reactor) and
removes device, routes and sockets in C{stopService}.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred

from twistvpn.common.datadir import load_or_create_key as common_load_or_create_key
from twistvpn.common.datadir import make_data_dir
from twistvpn.common.tls import RendezvousAddress
from twistvpn.node.config import InsecurePermissionsError, InterfaceConfig, read_private_file
from twistvpn.node.files import SOCKET_NAME
from twistvpn.node.forwarder import Forwarder
from twistvpn.node.joined import JoinedNode, host_addresses
from twistvpn.node.local_api import LocalAPI, local_api_factory
from twistvpn.node.service import (
    DeviceFactory,
    Resolver,
    StaticNodeService,
    TunFactory,
    resolve_endpoint,
)
from twistvpn.node.tun import DEFAULT_MTU
from twistvpn.node.uapi import UAPIFactory, claim_socket_path
from twistvpn.relay.client import RelayClient
from twistvpn.rendezvous.discovery import DiscoveryClient
from twistvpn.traversal.probe import ProbeService
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
    make_data_dir(data_dir)
    return common_load_or_create_key(os.path.join(data_dir, KEY_FILE), read=read_key_file)


# (reactor, address, private key, name, listener, networks, local endpoints)
# -> an (unstarted) RendezvousClient
ClientFactory = Callable[..., Any]


def tls_client(reactor: Any, address: RendezvousAddress, private_key: bytes, name: str,
               listener: Any, networks: Sequence[str], local_endpoints: Sequence[str]) -> Any:
    """The real control connection: TLS pinned to the address's fingerprint."""
    from twistvpn.rendezvous.client import RendezvousClient

    return RendezvousClient.from_address(reactor, address, private_key, name, listener,
                                         networks=networks, local_endpoints=local_endpoints)


class JoinedNodeService(StaticNodeService):
    """
    A node whose networks come from a rendezvous.  The socket, the TUN
    device, the control socket for C{wg show} and their teardown are the
    static node's; what differs is where peers, addresses and routes come
    from (a L{JoinedNode}).
    """

    def __init__(self, reactor: Any, *, data_dir: str, private_key: bytes,
                 rendezvous: RendezvousAddress, networks: Sequence[str], name: str,
                 port: int = DEFAULT_PORT, interface_name: str,
                 open_tun: TunFactory, make_device: DeviceFactory,
                 make_client: ClientFactory = tls_client,
                 connect_stream: Callable[[Any, Any], Any] | None = None,
                 local_addresses: Callable[[], list[str]] | None = None,
                 resolve: Resolver = resolve_endpoint, listen_interface: str = "::",
                 control_socket: str | None = None, mtu: int = DEFAULT_MTU,
                 **node_options: Any) -> None:
        super().__init__(
            reactor, InterfaceConfig(private_key=private_key, listen_port=port, mtu=mtu),
            interface_name=interface_name, open_tun=open_tun, make_device=make_device,
            resolve=resolve, listen_interface=listen_interface, control_socket=control_socket)
        self.data_dir = data_dir
        self.private_key = private_key
        self.public_key = public_key(private_key)
        self.rendezvous = rendezvous
        self.networks = list(networks)
        self.node_name = name
        self._make_client = make_client
        self._connect_stream = connect_stream
        self._local_addresses = local_addresses
        self._node_options = node_options
        self.node: JoinedNode | None = None
        self.client: Any = None
        self.api_port: Any = None

    @property
    def socket_path(self) -> str:
        return os.path.join(self.data_dir, SOCKET_NAME)

    def _start(self) -> None:
        reactor = self._reactor
        # Resolve first: a bad name should fail before anything is created.
        discovery_host = self._resolve(self.rendezvous.host, self.rendezvous.port)[0]
        self.tun = tun = self._open_tun(self._interface_name, self._config.mtu or DEFAULT_MTU)
        self.forwarder = forwarder = Forwarder()
        self.device = device = self._make_device(
            self.private_key, reactor, forwarder.send_datagram, tun.write)
        forwarder.set_wireguard(device)
        self.port = self._listen(self._config.listen_port or 0, forwarder)
        probes = ProbeService(forwarder, reactor, self.private_key, self.public_key)
        relay = None
        if self._connect_stream is not None:
            relay = RelayClient(reactor, forwarder, self.private_key, self._connect_stream)

        def local_addresses() -> list[str]:
            if self._local_addresses is not None:
                return self._local_addresses()
            return host_addresses(exclude=[tun.name])

        def make_discovery(server_key: bytes, servers: list[tuple[str, int]]) -> DiscoveryClient:
            return DiscoveryClient(forwarder, reactor, self.private_key, server_key, servers)

        self.node = node = JoinedNode(
            reactor, self.public_key, forwarder=forwarder, device=device,
            tun=tun, probes=probes, relay=relay, listen_port=lambda: self.listening_port,
            local_addresses=local_addresses, make_discovery=make_discovery,
            discovery_host=discovery_host, **self._node_options)
        self.client = self._make_client(reactor, self.rendezvous, self.private_key,
                                        self.node_name, node, self.networks,
                                        node.local_endpoints())
        node.attach(self.client)
        node.start()
        claim_socket_path(self.socket_path)
        self.api_port = reactor.listenUNIX(self.socket_path, local_api_factory(LocalAPI(node)),
                                           mode=0o600)
        if self._control_socket:
            claim_socket_path(self._control_socket)
            self.control_port = reactor.listenUNIX(
                self._control_socket, UAPIFactory(self.describe), mode=0o600)
        self.client.startService()
        self.log.info(
            "twistvpn node up (joined mode): interface {name}, UDP port {port}, "
            "public key {key}, rendezvous {rendezvous}, networks {networks}, "
            "local API {socket}", name=tun.name, port=self.listening_port,
            key=encode_key(self.public_key), rendezvous=str(self.rendezvous),
            networks=", ".join(self.networks), socket=self.socket_path)

    def _teardown(self) -> list[Deferred[Any]]:
        stopped: list[Deferred[Any]] = []
        if self.client is not None:
            if self.client.running:
                stopped.append(maybeDeferred(self.client.stopService))
            self.client = None
        if self.api_port is not None:
            stopped.append(maybeDeferred(self.api_port.stopListening))
            self.api_port = None
        if self.node is not None:
            self.node.stop()
            self.node = None
        return stopped + super()._teardown()
