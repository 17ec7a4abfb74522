"""
Static meshes of VPN endpoints: twistvpn nodes and stock wireguard-go
peers from wg-quick files, as the tests, the static lab and the benchmark
run them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from twistvpn.build import PURE_ENV
from twistvpn.testing.netns.namespaces import (
    NODE_REACTOR,
    TWISTD,
    WIREGUARD_SOCKET_DIR,
    HarnessError,
    Network,
    Process,
    wait_for,
)


@dataclass
class PeerSpec:
    """One peer line of a wg config, in our terms."""

    public_key: str
    allowed_ips: Sequence[str]
    endpoint: str | None = None
    preshared_key: str | None = None
    persistent_keepalive: int = 0


def wg_config(
    private_key: str,
    peers: Sequence[PeerSpec],
    *,
    listen_port: int | None = None,
    addresses: Sequence[str] = (),
    mtu: int | None = None,
) -> str:
    """
    A wg config. With C{addresses}/C{mtu} it is a wg-quick file (what a
    twistvpn node reads); without, what C{wg setconf} takes.
    """
    lines = ["[Interface]", f"PrivateKey = {private_key}"]
    if addresses:
        lines.append(f"Address = {', '.join(addresses)}")
    if listen_port is not None:
        lines.append(f"ListenPort = {listen_port}")
    if mtu is not None:
        lines.append(f"MTU = {mtu}")
    for peer in peers:
        lines += ["", "[Peer]", f"PublicKey = {peer.public_key}"]
        if peer.preshared_key:
            lines.append(f"PresharedKey = {peer.preshared_key}")
        if peer.endpoint:
            lines.append(f"Endpoint = {peer.endpoint}")
        lines.append(f"AllowedIPs = {', '.join(peer.allowed_ips)}")
        if peer.persistent_keepalive:
            lines.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
    return "\n".join(lines) + "\n"


def start_twistvpn_node(
    network: Network,
    namespace: str,
    ifname: str,
    config_text: str,
    *,
    timeout: float = 15.0,
    env: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> Process:
    """
    Run C{twistd -n twistvpn-node} in C{namespace} (with C{env} added to
    the environment and C{extra_args} to the node's options), wait until
    its TUN device is up, and return the process.
    """
    config = network.write_private(f"{ifname}.conf", config_text)
    # Its control socket (for `wg show`), should the node be killed.
    network.track_socket(WIREGUARD_SOCKET_DIR / f"{ifname}.sock")
    process = network.spawn(
        namespace,
        [
            *TWISTD,
            *NODE_REACTOR,
            "-n",
            "--pidfile=",
            "twistvpn-node",
            "--config",
            str(config),
            "--interface",
            ifname,
            *extra_args,
        ],
        log_name=f"twistvpn-{ifname}",
        env=env,
    )

    def up() -> bool:
        if not process.running():
            raise HarnessError(f"twistvpn node {ifname} exited:\n{process.log()}")
        return "twistvpn node up" in process.log()

    wait_for(up, timeout, f"twistvpn node {ifname} to come up")
    return process


def start_wireguard_go(
    network: Network,
    namespace: str,
    ifname: str,
    config_text: str,
    addresses: Sequence[str],
    *,
    mtu: int = 1420,
    timeout: float = 10.0,
) -> Process:
    """
    Run wireguard-go in the foreground in C{namespace}, configure it with
    C{wg setconf}, address and raise its interface, and return the process.
    """
    socket_path = WIREGUARD_SOCKET_DIR / f"{ifname}.sock"
    if socket_path.exists():
        raise HarnessError(f"{socket_path} exists: another wireguard-go uses {ifname}")
    network.track_socket(socket_path)
    process = network.spawn(
        namespace, ["wireguard-go", "-f", ifname], log_name=f"wireguard-go-{ifname}"
    )

    def ready() -> bool:
        if not process.running():
            raise HarnessError(f"wireguard-go {ifname} exited:\n{process.log()}")
        return socket_path.exists()

    wait_for(ready, timeout, f"wireguard-go {ifname}'s control socket")
    config = network.write_private(f"{ifname}.wg", config_text)
    network.run(namespace, ["wg", "setconf", ifname, str(config)])
    network.configure_interface(namespace, ifname, addresses, mtu=mtu)
    return process


TWISTVPN = "twistvpn"
# The same node, for the benchmarks: its pure-Python build (in a compiled
# install, twistvpn.build), without the stay-awake timer, and without TSO.
TWISTVPN_PURE = "twistvpn-pure"
TWISTVPN_NO_STAY_AWAKE = "twistvpn-no-stay-awake"
TWISTVPN_NO_TSO = "twistvpn-no-tso"
# kind -> (environment added, options added)
TWISTVPN_KINDS: dict[str, tuple[dict[str, str] | None, tuple[str, ...]]] = {
    TWISTVPN: (None, ()),
    TWISTVPN_PURE: ({PURE_ENV: "1"}, ()),
    TWISTVPN_NO_STAY_AWAKE: (None, ("--stay-awake-ms", "0")),
    TWISTVPN_NO_TSO: (None, ("--tso", "off")),
}


WIREGUARD_GO = "wireguard-go"


WG_PORT = 51820


OVERLAY_PREFIX = "100.64.0"


@dataclass
class VpnNode:
    """One host of a mesh: its namespace, keys, addresses and VPN process."""

    label: str
    kind: str  # one of TWISTVPN_KINDS, or WIREGUARD_GO
    namespace: str
    ifname: str
    private_key: str
    public_key: str
    underlay_ip: str
    overlay_ip: str
    mtu: int
    peers: list[PeerSpec] = field(default_factory=list)
    process: Process | None = None


def generate_keypair() -> tuple[str, str]:
    """A (private, public) key pair in WireGuard's text form."""
    from twistvpn.wireguard.keys import encode_key, generate_private_key, public_key

    private = generate_private_key()
    return encode_key(private), encode_key(public_key(private))


def generate_preshared_key() -> str:
    from twistvpn.wireguard.keys import encode_key
    from twistvpn.wireguard.keys import generate_preshared_key as generate

    return encode_key(generate())


def build_mesh(
    network: Network,
    kinds: Sequence[str],
    *,
    mtu: int = 1420,
    link_mtu: int = 1500,
    keepalive: int = 0,
    keepalive_from: Sequence[str] | None = None,
    preshared_keys: bool = False,
    start: bool = True,
) -> list[VpnNode]:
    """
    One namespace per entry of C{kinds} on a simulated internet
    (203.0.113.0/24: a veth pair for two hosts, a bridge for more), each
    running that kind of VPN configured with every other as a peer (with a
    preshared key per pair if asked), the overlay in 100.64.0.0/24.
    C{keepalive} is every node's PersistentKeepalive, or only that of the
    nodes whose labels are in C{keepalive_from}: with it on both ends of a
    pair, WireGuard lets whichever timer fires first keep the path alive
    (any packet restarts the other's), so which end sends is down to timing.
    """
    labels = [chr(ord("a") + i) for i in range(len(kinds))]
    namespaces = [network.add_namespace(label) for label in labels]
    underlay = [f"203.0.113.{i + 1}" for i in range(len(kinds))]
    if len(kinds) == 2:
        network.veth(
            namespaces[0], namespaces[1], f"{underlay[0]}/24", f"{underlay[1]}/24", mtu=link_mtu
        )
    else:
        switch = network.add_switch("net")
        for ns, ip in zip(namespaces, underlay, strict=True):
            switch.attach(ns, f"{ip}/24", mtu=link_mtu)
    nodes = []
    for i, (label, kind, ns) in enumerate(zip(labels, kinds, namespaces, strict=True)):
        private, public = generate_keypair()
        nodes.append(
            VpnNode(
                label,
                kind,
                ns,
                network.interface_name(f"w{label}"),
                private,
                public,
                underlay[i],
                f"{OVERLAY_PREFIX}.{i + 1}",
                mtu,
            )
        )
    psks = {
        frozenset((a.label, b.label)): generate_preshared_key() if preshared_keys else None
        for a in nodes
        for b in nodes
    }
    for node in nodes:
        node.peers = [
            PeerSpec(
                other.public_key,
                [f"{other.overlay_ip}/32"],
                f"{other.underlay_ip}:{WG_PORT}",
                preshared_key=psks[frozenset((node.label, other.label))],
                persistent_keepalive=(
                    keepalive if keepalive_from is None or node.label in keepalive_from else 0),
            )
            for other in nodes
            if other is not node
        ]
    if start:
        for node in nodes:
            start_vpn(network, node)
    return nodes


def start_vpn(network: Network, node: VpnNode) -> Process:
    """Start (or start again) the node's VPN process."""
    address = f"{node.overlay_ip}/24"
    if node.kind in TWISTVPN_KINDS:
        text = wg_config(
            node.private_key, node.peers, listen_port=WG_PORT, addresses=[address], mtu=node.mtu
        )
        env, options = TWISTVPN_KINDS[node.kind]
        node.process = start_twistvpn_node(
            network, node.namespace, node.ifname, text, env=env, extra_args=options
        )
    elif node.kind == WIREGUARD_GO:
        text = wg_config(node.private_key, node.peers, listen_port=WG_PORT)
        node.process = start_wireguard_go(
            network, node.namespace, node.ifname, text, [address], mtu=node.mtu
        )
    else:
        raise ValueError(f"unknown VPN kind {node.kind!r}")
    return node.process


def stop_vpn(network: Network, node: VpnNode) -> None:
    """Stop the node's VPN process (its device goes with it)."""
    if node.process is not None:
        network.stop(node.process)
        node.process = None
