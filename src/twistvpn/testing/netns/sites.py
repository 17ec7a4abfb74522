"""
Sites: LANs behind NAT routers (or none) on the simulated internet, each
with its hosts in namespaces of a L{Network}.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import uuid
from dataclasses import dataclass

from pyroute2 import NetNS

from twistvpn.testing.netns.namespaces import (
    NAT_MODES,
    Core,
    HarnessError,
    Network,
    Process,
    Switch,
    check_address,
    signals_safe_for_children,
    wait_for,
)

# How a site reaches the simulated internet: "open" is no NAT at all (its
# hosts have public addresses), the others are L{Network.masquerade}'s.
# "hard+upnp", "hard+pcp", "hard+natpmp": a hard NAT whose router runs the
# real miniupnpd, offering UPnP IGD only, or PCP and NAT-PMP (miniupnpd has
# one switch for both; the lab's nodes on a "+natpmp" site ask NAT-PMP only).
PORT_MAPPING_MODES = ("hard+upnp", "hard+pcp", "hard+natpmp")
SITE_MODES = ("open", *NAT_MODES, *PORT_MAPPING_MODES)


@dataclass
class Host:
    """One machine of a site: its namespace, its interface and address."""

    name: str
    namespace: str
    ifname: str
    address: str
    prefixlen: int
    gateway: str | None


@dataclass
class Site:
    """A LAN with its NAT router on the internet, or open hosts on the internet."""

    name: str
    mode: str
    public_ip: str  # the router's WAN address (the first host's, open)
    hosts: list[Host]
    router: str | None = None
    lan: str | None = None  # e.g. "192.168.1" (a /24)
    wan_if: str | None = None  # the router's interfaces: on the internet,
    lan_if: str | None = None  # and on the LAN


def add_site(
    network: Network,
    name: str,
    internet: Switch | Core,
    public_ip: str,
    lan: str,
    *,
    mode: str = "easy",
    hosts: int = 1,
    mtu: int = 1500,
) -> Site:
    """
    A site: C{hosts} machines on the LAN C{lan}.0/24 (.2, .3, ...) behind a
    router whose WAN side is C{public_ip} on C{internet} (a /24), NATting
    as C{mode} says; with C{mode} "open", the machines are on the internet
    themselves, at C{public_ip} and the addresses after it.  Namespaces are
    C{name}r (router), C{name}l (the LAN's switch), C{name}1, C{name}2...
    """
    if mode not in SITE_MODES:
        raise ValueError(f"unknown site mode {mode!r} (one of {', '.join(SITE_MODES)})")
    first = ipaddress.ip_address(public_ip)
    if mode == "open":
        members = []
        for i in range(hosts):
            address = str(first + i)
            namespace = network.add_namespace(f"{name}{i + 1}")
            ifname = internet.attach(namespace, f"{address}/24", mtu=mtu)
            members.append(Host(f"{name}{i + 1}", namespace, ifname, address, 24, None))
        return Site(name, mode, public_ip, members)
    router = network.add_namespace(f"{name}r")
    wan = internet.attach(router, f"{public_ip}/24", mtu=mtu)
    switch = network.add_switch(f"{name}l")
    lan_if = switch.attach(router, f"{lan}.1/24", mtu=mtu)
    members = []
    for i in range(hosts):
        namespace = network.add_namespace(f"{name}{i + 1}")
        address = f"{lan}.{i + 2}"
        ifname = switch.attach(namespace, f"{address}/24", mtu=mtu)
        network.add_route(namespace, "default", f"{lan}.1")
        members.append(Host(f"{name}{i + 1}", namespace, ifname, address, 24, f"{lan}.1"))
    base, _, extra = mode.partition("+")
    network.masquerade(router, wan, mode=base)
    site = Site(name, mode, public_ip, members, router, lan, wan, lan_if)
    if extra:
        start_miniupnpd(network, site, upnp=extra == "upnp")
    return site


def add_ipv6(network: Network, site: Site, wan_address: str, lan_prefix: str) -> None:
    """
    Dual stack for a site behind a router: global IPv6 on the router's WAN
    (C{wan_address}, a /64 of the simulated internet) and on its LAN
    (C{lan_prefix}::/64, hosts from ::2), no NAT, and a firewall that lets in
    only what answers traffic from inside, as home routers do for IPv6.
    """
    router, wan, lan_if = site.router, site.wan_if, site.lan_if
    if router is None or wan is None or lan_if is None:
        raise HarnessError(f"site {site.name} has no router: no IPv6 for it")
    network.run(router, ["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])
    for ifname, address in ((wan, wan_address), (lan_if, f"{lan_prefix}::1/64")):
        check_address(address)
        network.ip("-6", "addr", "add", address, "dev", ifname, "nodad", namespace=router)
    for i, host in enumerate(site.hosts):
        address = f"{lan_prefix}::{i + 2}/64"
        check_address(address)
        network.ip("-6", "addr", "add", address, "dev", host.ifname, "nodad",
                   namespace=host.namespace)
        network.ip("-6", "route", "replace", "default", "via", f"{lan_prefix}::1",
                   namespace=host.namespace)
    rules = [["-i", wan, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
             ["-i", wan, "-j", "DROP"]]
    if site.mode.startswith("udpblock"):
        rules.insert(0, ["-p", "udp", "-j", "DROP"])
    for rule in rules:
        network.run(router, ["ip6tables", "-A", "FORWARD", *rule])


def route_ipv6(network: Network, site: Site, prefix: str, via: str) -> None:
    """Route another site's IPv6 LAN C{prefix} through its router's WAN address C{via}."""
    check_address(via)
    assert site.router is not None
    network.ip("-6", "route", "replace", prefix, "via", via, namespace=site.router)


MINIUPNPD = "/usr/sbin/miniupnpd"


def start_miniupnpd(network: Network, site: Site, *, upnp: bool) -> Process:
    """
    The real miniupnpd on the site's router: UPnP IGD (C{upnp}) or PCP and
    NAT-PMP, forwarding with nftables DNAT; it learns its public address
    from a STUN responder on the router's own WAN address (see
    L{twistvpn.testing.stunserver} for why).
    """
    router, wan, lan_if, lan = site.router, site.wan_if, site.lan_if, site.lan
    if router is None or wan is None or lan_if is None or lan is None:
        raise HarnessError(f"site {site.name} has no router to run miniupnpd on")
    if not os.path.exists(MINIUPNPD):
        raise HarnessError(f"{MINIUPNPD} is missing (apt-get install miniupnpd-nftables)")
    stun = network.spawn(router, [sys.executable, "-m", "twistvpn.testing.stunserver",
                                  site.public_ip], log_name=f"stun-{site.name}")
    wait_for(lambda: _ready(stun, "listening"), 10, "the router's STUN responder", interval=0.05)
    # The tables and chains miniupnpd fills (its defaults: table inet filter).
    network.run(router, ["nft", "-f", "-"], input=MINIUPNPD_TABLES.encode())
    config = network.write_private(f"miniupnpd-{site.name}.conf", "\n".join([
        f"ext_ifname={wan}",
        f"listening_ip={lan_if}",
        f"enable_upnp={'yes' if upnp else 'no'}",
        f"enable_natpmp={'no' if upnp else 'yes'}",
        "ext_perform_stun=yes",
        f"ext_stun_host={site.public_ip}",
        "ext_stun_port=3478",
        "secure_mode=yes",
        "system_uptime=no",
        f"uuid={uuid.uuid4()}",
        f"allow 1024-65535 {lan}.0/24 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
        "",
    ]))
    pidfile = config.with_suffix(".pid")  # its own: the default is one for the machine
    process = network.spawn(router, [MINIUPNPD, "-d", "-f", str(config), "-P", str(pidfile)],
                            log_name=f"miniupnpd-{site.name}")
    wait_for(lambda: _ready(process, "Port forwarding is now enabled")
             and _ready(process, "Listening for NAT-PMP" if not upnp else "HTTP listening"),
             15, "miniupnpd", interval=0.1)
    return process


MINIUPNPD_TABLES = """
table inet filter {
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority -100; policy accept;
                     jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 100; policy accept;
                      jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
"""


def _ready(process: Process, line: str) -> bool:
    if not process.running():
        raise HarnessError(f"{process.argv[0]} exited:\n{process.log()}")
    return line in process.log()


def change_address(network: Network, host: Host, address: str) -> None:
    """
    Move C{host} to another address of its subnet (roaming: a new DHCP
    lease), the old one gone and the default route back through the gateway.
    """
    new = check_address(f"{address}/{host.prefixlen}")
    old = check_address(f"{host.address}/{host.prefixlen}")
    with signals_safe_for_children(), NetNS(host.namespace) as ns:
        index = ns.link_lookup(ifname=host.ifname)[0]
        # Old first: removing a primary address removes its secondaries too.
        ns.addr("del", index=index, address=str(old.ip), prefixlen=old.network.prefixlen)
        ns.addr("add", index=index, address=str(new.ip), prefixlen=new.network.prefixlen)
    if host.gateway is not None:
        network.add_route(host.namespace, "default", host.gateway)
    host.address = address
