"""
Two twistvpn nodes on the simulated NAT network, each with the real
forwarder, probe service and path manager: the harness behind the
traversal tests and C{bench/traversal.py}.

Each node first discovers its mapping from two reflectors at different
public addresses (as the rendezvous's UDP discovery will), which yields its
candidates and NAT hints honestly, from what the NATs did; then both path
managers start at the same moment, as after the rendezvous's "punch now".
"""

from __future__ import annotations

import random
import statistics
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from twistvpn.interfaces import IDatagramHandler
from twistvpn.node.forwarder import Forwarder
from twistvpn.node.joined import is_public_ipv6
from twistvpn.testing.fakerelay import FakeRelay
from twistvpn.testing.natsim import SAME_NAT, Host, Internet
from twistvpn.traversal.candidates import Candidates, Strategy, hints_from_observations
from twistvpn.traversal.manager import DIRECT, LAN, PathConfig, PathManager
from twistvpn.traversal.probe import ProbeService, address_of
from twistvpn.wire import DISCOVERY_REQUEST, DISCOVERY_RESPONSE
from twistvpn.wireguard.keys import clamp, public_key

NODE_PORT = 41641
PING = 0xFE  # test-only message type: data through the chosen path
OVERLAY = ("100.64.0.1", "100.64.0.2")  # the nodes' addresses with wireguard=True
SETTLED_AFTER = 0.5  # after the first path (twice the path manager's settle)


def ipv4_packet(src: str, dst: str, payload: bytes) -> bytes:
    """A minimal IPv4/UDP-protocol packet, as a TUN device would hand over."""
    import ipaddress

    total = 20 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header + payload


def _encode_addr(addr: tuple[str, int]) -> bytes:
    host = addr[0].encode("ascii")
    return bytes([len(host)]) + host + struct.pack("!H", addr[1])


class Reflector(DatagramProtocol):
    """Answers a discovery request with the address it came from."""

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        transport: Any = self.transport
        if data[:1] == bytes([DISCOVERY_REQUEST]):
            transport.write(bytes([DISCOVERY_RESPONSE]) + _encode_addr(addr), addr)


@implementer(IDatagramHandler)
class Inbox:
    """Collects datagrams of one type that a forwarder dispatches."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, Any]] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append((data, addr))


@dataclass
class SimPeer:
    """The little of an IWireGuardPeer that the path manager touches."""

    public_key: bytes
    endpoint: Any = None
    rx_bytes: int = 0
    tx_bytes: int = 0


class SimNode:
    """One node: a host, its forwarder on port 41641, its probe service."""

    def __init__(self, host: Host, rng: random.Random) -> None:
        self.host = host
        self.reactor = host.reactor
        self.private_key = clamp(rng.randbytes(32))
        self.public_key = public_key(self.private_key)
        self.forwarder = Forwarder()
        self.port = host.reactor.listenUDP(NODE_PORT, self.forwarder)
        self.probes = ProbeService(self.forwarder, host.reactor, self.private_key,
                                   self.public_key, random_bytes=rng.randbytes)
        self.discovery = Inbox()
        self.forwarder.register_handler(DISCOVERY_RESPONSE, self.discovery)  # type: ignore[arg-type]
        self.inbox = Inbox()
        self.forwarder.register_handler(PING, self.inbox)  # type: ignore[arg-type]
        self.manager: PathManager | None = None
        self.peer: Any = None
        self.device: Any = None
        self.delivered: list[bytes] = []

    def add_wireguard(self, rng: random.Random) -> None:
        """Run the real WireGuard data plane on this node's forwarder."""
        from twistvpn.wireguard.device import WireGuardDevice

        self.device = WireGuardDevice(self.private_key, self.reactor,
                                      self.forwarder.send_datagram, self.delivered.append,
                                      random=rng.randbytes, wall_clock=self.reactor.seconds)
        self.forwarder.set_wireguard(self.device)

    @property
    def local(self) -> tuple[str, int]:
        return (self.host.ip, NODE_PORT)

    def discover(self, reflectors: Sequence[tuple[str, int]],
                 retries: Sequence[float] = (0.0, 0.25, 0.5)) -> None:
        """
        Ask each reflector, in order, what it sees; ask again (as a STUN
        client retransmits) those that have not answered.
        """
        def ask() -> None:
            answered = {addr for _, addr in self.discovery.received}
            for reflector in reflectors:
                if reflector not in answered:
                    self.forwarder.send_datagram(bytes([DISCOVERY_REQUEST]), reflector)

        for delay in retries:
            self.reactor.callLater(delay, ask)

    def candidates(self, reflectors: Sequence[tuple[str, int]]) -> Candidates:
        seen: dict[Any, tuple[str, int]] = {}
        for data, addr in self.discovery.received:
            length = data[1]
            host = data[2:2 + length].decode("ascii")
            (port,) = struct.unpack("!H", data[2 + length:4 + length])
            seen[addr] = (host, port)
        observed = [seen.get(r) for r in reflectors]
        public = tuple(o for o in observed[:1] if o is not None)
        local: tuple[tuple[str, int], ...] = (self.local,)
        if self.host.ip6 is not None:
            local += ((self.host.ip6, NODE_PORT),)
        # As the joined node does: global IPv6 addresses are public candidates
        # too, after the observed IPv4 endpoint; hints come from IPv4.
        public6 = tuple(a for a in local if is_public_ipv6(a))
        return Candidates(public=public + public6, local=local,
                          hints=hints_from_observations(self.local, observed))

    def ping(self, payload: bytes = b"ping") -> None:
        """Send a datagram to the peer along the chosen path."""
        assert self.peer is not None
        self.forwarder.send_datagram(bytes([PING]) + payload, self.peer.endpoint)


@dataclass
class PairResult:
    """What one run of a pair did."""

    kinds: tuple[str, str]
    strategy: str | None  # what found the first non-relay path
    time_to_path: float | None  # until both sides use a LAN/direct path (or relay)
    probes: int  # probes both sides sent until then (or until the end)
    relay_at: float | None


class Pair:
    """Two nodes (A and B) on one simulated internet."""

    def __init__(self, a: str, b: str, seed: int = 0, *, same_nat: bool = False,
                 hairpin: bool = False, latency: float | tuple[float, float] = 0.015,
                 loss: float = 0.0,
                 strategies: Sequence[Strategy] | None = None,
                 config: PathConfig | None = None, relay: bool = True,
                 mapping_timeout: float = 30.0, wireguard: bool = False,
                 ipv6: bool = False) -> None:
        self.internet = Internet(seed=seed)
        net = self.internet
        rng = random.Random(seed ^ 0x5EED)
        self.reflectors = [(net.add_public_host().ip, 3478), (net.add_public_host().ip, 3478)]
        for ip, port in self.reflectors:
            net._public[ip].reactor.listenUDP(port, Reflector())  # type: ignore[union-attr]
        latencies = latency if isinstance(latency, tuple) else (latency, latency)
        if same_nat:
            a, b = ("same-nat-hairpin" if hairpin else "same-nat"), a
        hosts = net.add_pair(a, b, latencies, loss, ipv6=ipv6, timeout=mapping_timeout)
        self.nats = [h.nat for h in hosts]
        self.a, self.b = SimNode(hosts[0], rng), SimNode(hosts[1], rng)
        if wireguard:
            for node in self.nodes:
                node.add_wireguard(rng)
        self.relay = FakeRelay(net.clock) if relay else None
        self.strategies = strategies
        self.config = config
        self.rng = rng

    @property
    def nodes(self) -> tuple[SimNode, SimNode]:
        return (self.a, self.b)

    @property
    def clock(self):
        return self.internet.clock

    def start(self, skew: float = 0.0) -> None:
        """
        Discover, exchange candidates, and start both path managers at once
        (B's C{skew} seconds after A's: the two "punch now" messages of the
        rendezvous arrive that far apart).
        """
        for node in self.nodes:
            node.discover(self.reflectors)
        self.internet.run(1.0)
        cands = [node.candidates(self.reflectors) for node in self.nodes]
        for i, node in enumerate(self.nodes):
            other = self.nodes[1 - i]
            if node.device is not None:
                node.peer = node.device.add_peer(other.public_key,
                                                 allowed_ips=[f"{OVERLAY[1 - i]}/32"])
            else:
                node.peer = SimPeer(other.public_key)
            provider = (self.relay.provider(node.public_key, node.forwarder)
                        if self.relay is not None else None)
            node.manager = PathManager(
                node.peer, node.probes, node.reactor, local=cands[i], remote=cands[1 - i],
                strategies=self.strategies, relay=provider,
                rng=random.Random(self.rng.random()), config=self.config)
        self.started = self.clock.seconds()
        self.probes_before = self._sent()
        self.a.manager.start()  # type: ignore[union-attr]
        if skew > 0:
            self.clock.callLater(skew, self.b.manager.start)  # type: ignore[union-attr]
        else:
            self.b.manager.start()  # type: ignore[union-attr]

    def managers(self) -> tuple[PathManager, PathManager]:
        assert self.a.manager is not None and self.b.manager is not None
        return (self.a.manager, self.b.manager)

    def both_direct(self) -> bool:
        return all(m.kind in (LAN, DIRECT) for m in self.managers())

    def _sent(self) -> int:
        return sum(n.probes.counters["probe_sent"] + n.probes.counters["opener_sent"]
                   for n in self.nodes)

    def probes_sent(self) -> int:
        """Probes, openers included, both sides sent since the start."""
        return self._sent() - self.probes_before

    def run(self, timeout: float = 30.0) -> PairResult:
        """Run until both sides use a LAN or direct path, or C{timeout}."""
        found = self.internet.run(timeout, until=self.both_direct)
        elapsed = self.clock.seconds() - self.started
        ma, mb = self.managers()
        relay_at = None
        for t, event, kind, _ in ma.events:
            if event == "chosen" and kind == "relay":
                relay_at = t - self.started
                break
        strategy = None
        if found:
            firsts = [a for m in (ma, mb) for a in m.history if a.first_path_strategy]
            strategy = firsts[0].first_path_strategy if firsts else ma.strategy
        return PairResult((ma.kind, mb.kind), strategy,
                          elapsed if found else relay_at, self.probes_sent(), relay_at)

    def settled_family(self) -> int | None:
        """
        The IP version (4 or 6) of side A's LAN or direct path once the
        settling window after the first path has closed; None on the relay.
        """
        self.internet.run(SETTLED_AFTER)
        manager = self.managers()[0]
        if manager.kind not in (LAN, DIRECT):
            return None
        return 6 if ":" in address_of(manager.endpoint)[0] else 4


def summarize(times: Sequence[float]) -> dict[str, float | None]:
    """Median, 90th percentile and maximum of some durations."""
    if not times:
        return {"median": None, "p90": None, "max": None}
    ordered = sorted(times)
    return {"median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "max": ordered[-1]}


# "easynf" and "hardnf": routers without a firewall on themselves (the
# clash); with openers they end as their firewalled kind does.
PRESET_NAMES = ("open", "easy", "easyaf", "hard", "hard-sequential", "udpblock", "easynf",
                "hardnf")
_AS_FIREWALLED = {"easynf": "easy", "hardnf": "hard"}


def grid_pairs() -> list[tuple[str, str]]:
    """Every ordered pair of presets, then two hosts behind one NAT."""
    pairs = [(a, b) for a in PRESET_NAMES for b in PRESET_NAMES]
    return pairs + [(s, s) for s in SAME_NAT]


def expected(a: str, b: str, ipv6: bool = False) -> tuple[str, str | None]:
    """
    The path kind a pair should end on and the strategy that should find it
    (None: any).  Two endpoint-dependent-mapping sides need a relay, unless
    both are sequential (then each side's k-th new mapping is predictable).
    Dual stack (C{ipv6}): whatever UDP reaches goes direct, the pairs IPv4
    cannot carry by punching over IPv6; the others by whichever is first.
    """
    if a in SAME_NAT:
        return (LAN, "lan")
    if ipv6:
        kind, _ = expected(a, b)
        if "udpblock" in (a, b):
            return ("relay", None)
        return (DIRECT, "punch" if kind == "relay" else None)
    pair = {_AS_FIREWALLED.get(a, a), _AS_FIREWALLED.get(b, b)}
    if "udpblock" in pair:
        return ("relay", None)
    hard = {"hard", "hard-sequential"}
    if pair <= hard and pair != {"hard-sequential"}:
        return ("relay", None)
    if "hard-sequential" in pair:
        return (DIRECT, "sequential")
    if "hard" in pair and pair & {"easy"}:
        return (DIRECT, "birthday")
    return (DIRECT, "punch")


def build(a: str, b: str, seed: int, **kw: Any) -> Pair:
    """
    A L{Pair} for a grid cell (the same-NAT cells use an C{easy} NAT).
    Unless given, each side's one-way latency to the core is drawn from the
    seed, between 5 and 60 ms, so that times vary as on real links.
    """
    if "latency" not in kw:
        draw = random.Random(seed * 7919 + 1)
        kw["latency"] = (draw.uniform(0.005, 0.060), draw.uniform(0.005, 0.060))
    return Pair(a, b, seed, **kw)


@dataclass
class CellStats:
    """A grid cell over many seeds."""

    pair: tuple[str, str]
    runs: int
    kinds: dict[str, int]  # final kind (side A) -> runs
    strategies: dict[str, int]  # first-path strategy -> runs
    successes: int  # runs that reached the expected kind within the deadline
    times: list[float]  # time to the first path of the expected kind, successful runs
    probes: list[int]  # probes sent until then (or until the deadline)
    families: dict[int, int] = field(default_factory=dict)  # direct path's IP version -> runs

    @property
    def rate(self) -> float:
        return self.successes / self.runs if self.runs else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"pair": list(self.pair), "runs": self.runs, "kinds": self.kinds,
                "strategies": self.strategies, "families": self.families,
                "success_rate": self.rate,
                "time": summarize(self.times),
                "probes": {"median": statistics.median(self.probes) if self.probes else None,
                           "max": max(self.probes, default=None)}}


def measure(a: str, b: str, seeds: Sequence[int], deadline: float = 15.0,
            **kw: Any) -> CellStats:
    """Run a grid cell once per seed, up to C{deadline} simulated seconds each."""
    want, _ = expected(a, b, kw.get("ipv6", False))
    kinds: dict[str, int] = {}
    strategies: dict[str, int] = {}
    families: dict[int, int] = {}
    times: list[float] = []
    probes: list[int] = []
    successes = 0
    for seed in seeds:
        pair = build(a, b, seed, **kw)
        pair.start()
        result = pair.run(deadline)
        kind = result.kinds[0]
        kinds[kind] = kinds.get(kind, 0) + 1
        if result.strategy is not None:
            strategies[result.strategy] = strategies.get(result.strategy, 0) + 1
        probes.append(result.probes)
        family = pair.settled_family()
        if family is not None:
            families[family] = families.get(family, 0) + 1
        if kind == want and result.kinds[1] == want and result.time_to_path is not None:
            successes += 1
            times.append(result.time_to_path)
    return CellStats((a, b), len(seeds), kinds, strategies, successes, times, probes, families)
