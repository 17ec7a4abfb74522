"""
What the rendezvous tells members about their network, in one format that
both the server (which builds it) and the node-side client (which reads it)
use.

A network map is JSON::

    {"network": {"id": "8f3a...", "name": "home", "subnet": "100.64.0.0/24",
                 "domain": "home.twistvpn.internal"},
     "revision": 12,
     "members": [{"node_id": "a1b2c3d4e5", "public_key": "<base64>",
                  "name": "laptop", "ip": "100.64.0.1",
                  "endpoints": ["203.0.113.7:51820"],
                  "local_endpoints": ["192.168.1.20:51820"],
                  "nat_varies": false, "online": true, "last_seen": 1700000000.0}],
     "relays": []}

It lists every authorized member, the receiving node included (so it
learns its own managed IP); C{endpoints} are the addresses the discovery
ports observed, C{nat_varies} whether the two ports saw different mappings
(an endpoint-dependent NAT).  C{relays} is reserved for the embedded relay:
a list of {"host", "port", "public_key"} objects.

To a node that accepts it (C{"zlib"} at registration) a map or delta of
more than L{COMPRESS_ABOVE} bytes goes zlib-compressed: a map of 10,000
members is 2.6 MB of JSON, about a fifth of that compressed, and each
joining node is sent one.  Readers tell the two apart by the first byte
(JSON starts with C{{}).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import zlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from zope.interface import implementer

from twistvpn.common.amp import MAX_MAP_BYTES
from twistvpn.common.dnsname import check_domain
from twistvpn.interfaces import IMapReader
from twistvpn.options import is_decimal
from twistvpn.wireguard.keys import decode_key, encode_key

MAX_ENDPOINTS = 8
MAX_NAME_LENGTH = 64
# What a node says it reads, and what is compressed for it.
ZLIB = "zlib"
COMPRESS_ABOVE = 1024
# The most a compressed map may inflate to: what the control channel bounds
# an uncompressed one to.
MAX_INFLATED = MAX_MAP_BYTES


def overlay6_prefix(network_id: str) -> str:
    """
    A network's IPv6 overlay prefix: the ULA /64 fd + the first 56 bits of its
    ID (RFC 4193's form; ZeroTier derives its "RFC 4193 mode" addresses alike).
    Derived, not stored: every node and the rendezvous compute the same.
    """
    n = network_id.lower()
    return str(ipaddress.IPv6Network(f"fd{n[0:2]}:{n[2:6]}:{n[6:10]}:{n[10:14]}::/64"))


@functools.lru_cache(maxsize=1 << 15)
def overlay6(network_id: str, node_id: str) -> str:
    """
    A member's IPv6 overlay address: the network's prefix and its 40-bit
    node ID.  Kept: a node works out every member's on each map change.
    """
    return str(ipaddress.IPv6Address(_prefix6(network_id) + int(node_id, 16)))


@functools.lru_cache(maxsize=64)
def _prefix6(network_id: str) -> int:
    return int(ipaddress.IPv6Network(overlay6_prefix(network_id)).network_address)


class MapError(ValueError):
    """A map or endpoint is malformed."""


def format_endpoint(addr: tuple[str, int]) -> str:
    """C{("203.0.113.7", 51820)} -> C{"203.0.113.7:51820"}; IPv6 in brackets."""
    host, port = addr[0], addr[1]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_endpoint(text: str) -> tuple[str, int]:
    """The inverse of L{format_endpoint}, for IP literals only."""
    if not isinstance(text, str) or len(text) > 64:
        raise MapError(f"not an endpoint: {text!r}")
    bracketed = text.startswith("[")
    if bracketed:
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not is_decimal(port):
        raise MapError(f"not host:port: {text!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise MapError(f"not an IP address: {host!r}") from None
    # IPv6 only in brackets, IPv4 never: "2001:db8::1:5" is ambiguous.
    if bracketed != (ip.version == 6) or not 0 < int(port) < 65536:
        raise MapError(f"not an endpoint: {text!r}")
    return str(ip), int(port)


def check_endpoints(endpoints: Any) -> tuple[str, ...]:
    """Validate a list of "host:port" from the network; return it normalized."""
    if not isinstance(endpoints, list | tuple) or len(endpoints) > MAX_ENDPOINTS:
        raise MapError(f"at most {MAX_ENDPOINTS} endpoints")
    return tuple(format_endpoint(parse_endpoint(e)) for e in endpoints)


@dataclass(frozen=True)
class Member:
    """One authorized member as the map describes it."""

    node_id: str
    public_key: bytes
    name: str
    ip: str
    endpoints: tuple[str, ...] = ()
    local_endpoints: tuple[str, ...] = ()
    nat_varies: bool = False
    online: bool = False
    last_seen: float | None = None
    # Public addresses the member's gateway forwards to it (PCP, NAT-PMP).
    mapped: tuple[str, ...] = ()
    # A stock WireGuard app (docs/devices.md): reached only through the relay,
    # never probed; its endpoint follows its authenticated packets.
    device: bool = False

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"mapped": list(self.mapped)} if self.mapped else {}
        if self.device:
            extra["device"] = True
        return {**extra,
            "node_id": self.node_id,
            "public_key": encode_key(self.public_key),
            "name": self.name,
            "ip": self.ip,
            "endpoints": list(self.endpoints),
            "local_endpoints": list(self.local_endpoints),
            "nat_varies": self.nat_varies,
            "online": self.online,
            "last_seen": self.last_seen,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Member:
        last_seen = d.get("last_seen")
        return cls(
            node_id=str(d["node_id"]),
            public_key=decode_key(d["public_key"]),
            name=str(d["name"])[:MAX_NAME_LENGTH],
            ip=str(ipaddress.IPv4Address(d["ip"])),
            endpoints=check_endpoints(d.get("endpoints", [])),
            local_endpoints=check_endpoints(d.get("local_endpoints", [])),
            nat_varies=bool(d.get("nat_varies", False)),
            online=bool(d.get("online", False)),
            last_seen=None if last_seen is None else float(last_seen),
            mapped=check_endpoints(d.get("mapped", [])),
            device=d.get("device") is True,
        )

    @property
    def candidates(self) -> tuple[str, ...]:
        """Every address worth probing, observed ones first."""
        return tuple(dict.fromkeys(self.endpoints + self.local_endpoints))


@dataclass(frozen=True)
class NetworkMap:
    """A network's authorized members, as of one revision."""

    network_id: str
    name: str
    subnet: str
    revision: int
    members: tuple[Member, ...] = ()
    relays: tuple[dict[str, Any], ...] = field(default=())
    domain: str = ""  # its members' DNS domain ("": NAME.twistvpn.internal)

    @property
    def subnet6(self) -> str:
        """The network's IPv6 overlay prefix (L{overlay6_prefix})."""
        return overlay6_prefix(self.network_id)

    def ip6(self, member: Member) -> str:
        """C{member}'s IPv6 overlay address in this network."""
        return overlay6(self.network_id, member.node_id)

    @property
    def prefix_length(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen

    def member(self, public_key: bytes) -> Member | None:
        """The member with C{public_key}, or None (not authorized)."""
        for m in self.members:
            if m.public_key == public_key:
                return m
        return None

    def peers(self, public_key: bytes) -> list[Member]:
        """Every member except C{public_key}'s."""
        return [m for m in self.members if m.public_key != public_key]

    def diff(self, old: NetworkMap) -> MapDelta:
        """What turns C{old} into this map."""
        before = {m.public_key: m for m in old.members}
        mine = {m.public_key for m in self.members}
        return MapDelta(
            network_id=self.network_id,
            name=self.name,
            subnet=self.subnet,
            domain=self.domain,
            base=old.revision,
            revision=self.revision,
            upsert=tuple(m for m in self.members if before.get(m.public_key) != m),
            remove=tuple(k for k in before if k not in mine),
            relays=self.relays,
        )

    def apply(self, delta: MapDelta) -> NetworkMap:
        """
        This map with C{delta} applied; members keep their order and new
        ones come last, as in a full map.  Raises L{MapError} unless
        C{delta} is based on this very revision.
        """
        if delta.network_id != self.network_id or delta.base != self.revision:
            raise MapError(f"delta from revision {delta.base}, the map is at {self.revision}")
        members = {m.public_key: m for m in self.members}
        for key in delta.remove:
            members.pop(key, None)
        for m in delta.upsert:
            members[m.public_key] = m
        return NetworkMap(
            network_id=self.network_id,
            name=delta.name,
            subnet=delta.subnet,
            domain=delta.domain,
            revision=delta.revision,
            members=tuple(members.values()),
            relays=delta.relays,
        )

    def to_json(self) -> bytes:
        return _dump_once(
            self,
            lambda: {"revision": self.revision, "members": [m.to_dict() for m in self.members]},
        )

    def compressed(self) -> bytes:
        """L{to_json}, zlib-compressed when that is big (made once, as it is)."""
        return _compress_once(self)

    @classmethod
    def from_json(cls, data: bytes) -> NetworkMap:
        """Parse a map; anything malformed raises L{MapError}."""

        def build(d: dict[str, Any], common: dict[str, Any]) -> NetworkMap:
            return cls(
                revision=int(d["revision"]),
                members=tuple(Member.from_dict(m) for m in d["members"]),
                **common,
            )

        return _load(data, "network map", build)


@dataclass(frozen=True)
class Punch:
    """
    "Start traversal towards this peer in C{delay} seconds": sent to both
    peers at once so that their first probes cross in the NATs.
    C{punch_id} is shared by both sides' messages.
    """

    peer_key: bytes
    candidates: tuple[str, ...]
    delay: float
    punch_id: str


@dataclass(frozen=True)
class MapDelta:
    """
    The change from map revision C{base} to C{revision}: members added or
    changed, public keys removed.  Sent instead of the full map to members
    that hold C{base}, so a change costs its own size, not the network's::

        {"network": {...}, "base": 11, "revision": 12,
         "upsert": [<member>...], "remove": ["<base64 key>"...], "relays": []}
    """

    network_id: str
    name: str
    subnet: str
    base: int
    revision: int
    upsert: tuple[Member, ...] = ()
    remove: tuple[bytes, ...] = ()
    relays: tuple[dict[str, Any], ...] = ()
    domain: str = ""

    def to_json(self) -> bytes:
        return _dump_once(
            self,
            lambda: {
                "base": self.base,
                "revision": self.revision,
                "upsert": [m.to_dict() for m in self.upsert],
                "remove": [encode_key(k) for k in self.remove],
            },
        )

    def compressed(self) -> bytes:
        """L{to_json}, zlib-compressed when that is big (made once, as it is)."""
        return _compress_once(self)

    @classmethod
    def from_json(cls, data: bytes) -> MapDelta:
        """Parse a delta; anything malformed raises L{MapError}."""

        def build(d: dict[str, Any], common: dict[str, Any]) -> MapDelta:
            return cls(
                base=int(d["base"]),
                revision=int(d["revision"]),
                upsert=tuple(Member.from_dict(m) for m in d["upsert"]),
                remove=tuple(decode_key(k) for k in d["remove"]),
                **common,
            )

        return _load(data, "map delta", build)


def kept(obj: NetworkMap | MapDelta, key: Hashable, make: Callable[[], bytes]) -> bytes:
    """
    C{make()}, made on the first call for C{key} and kept with C{obj}: one
    push sends the same map or delta to every member of a network, and
    encoding it once per member made a change in a network of N cost N
    encodings (its JSON, compressed form and wire box alike).
    """
    made: dict[Hashable, bytes] | None = obj.__dict__.get("_kept")
    if made is None:
        made = {}
        object.__setattr__(obj, "_kept", made)  # frozen, and not a field
    data = made.get(key)
    if data is None:
        data = made[key] = make()
    return data


def _dump_once(obj: NetworkMap | MapDelta, fields: Callable[[], dict[str, Any]]) -> bytes:
    """C{obj} as JSON, kept (L{kept})."""
    return kept(obj, "json", lambda: _dump(obj, fields()))


def _compress_once(obj: NetworkMap | MapDelta) -> bytes:
    """C{obj.to_json()}, compressed if longer than COMPRESS_ABOVE; kept (L{kept})."""

    def compress() -> bytes:
        data = obj.to_json()
        # level 1: most of the gain, a tenth of the time
        return zlib.compress(data, 1) if len(data) > COMPRESS_ABOVE else data

    return kept(obj, "compressed", compress)


def inflate(data: bytes) -> bytes:
    """
    A pushed map or delta as JSON: compressed ones inflated, to at most
    MAX_INFLATED bytes.  Raises L{MapError} on a bad or oversized stream.
    """
    if data[:1] == b"{":
        return data
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_INFLATED)
    except zlib.error as e:
        raise MapError(f"not JSON and not a zlib stream: {e}") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise MapError(f"a compressed map must inflate to at most {MAX_INFLATED} bytes, whole")
    return out


def _dump(obj: NetworkMap | MapDelta, fields: dict[str, Any]) -> bytes:
    """A map or delta as JSON: the network header, C{fields}, the relays."""
    return json.dumps(
        {
            "network": {"id": obj.network_id, "name": obj.name, "subnet": obj.subnet,
                        **({"domain": obj.domain} if obj.domain else {})},
            **fields,
            "relays": list(obj.relays),
        },
        separators=(",", ":"),
    ).encode("utf-8")


def _load(data: bytes, what: str, build: Any) -> Any:
    """Parse the network header and relays, then C{build(d, common)} the rest."""
    try:
        d = json.loads(inflate(data))
        net = d["network"]
        common = {
            "network_id": str(net["id"]),
            "name": str(net["name"]),
            "subnet": str(ipaddress.IPv4Network(net["subnet"])),
            "domain": check_domain(net["domain"]) if net.get("domain") else "",
            "relays": tuple(dict(r) for r in d.get("relays", [])),
        }
        return build(d, common)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MapError(f"malformed {what}: {e}") from None


@implementer(IMapReader)
class MapReader:
    """Each push parsed as it arrives: what a node's client does."""

    def read_map(self, data: bytes) -> NetworkMap:
        return NetworkMap.from_json(data)

    def apply_delta(self, base: NetworkMap, data: bytes) -> NetworkMap:
        return base.apply(MapDelta.from_json(data))
