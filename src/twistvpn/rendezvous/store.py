"""
The rendezvous's persistent state behind L{IRendezvousStore}: nodes,
networks and members in the sqlite database (L{twistvpn.rendezvous.database}).

This is the only module with SQL in it.  Every write method is one
transaction, so a failure half-way leaves nothing half-written; reads
return plain records, not database rows, so the controller's parts do not
know which database holds them.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from zope.interface import implementer

from twistvpn.common.dnsname import default_domain
from twistvpn.interfaces import IRendezvousStore
from twistvpn.rendezvous.database import get_db, transaction


@dataclass(frozen=True)
class NodeRecord:
    """A node as stored: its key, IDs, and where it was last seen."""

    public_key: bytes
    node_id: str
    name: str
    last_seen: float | None
    endpoints: tuple[str | None, str | None]
    local_endpoints: tuple[str, ...]
    kind: str = "node"  # or "device": a stock WireGuard app, reached through the relay


@dataclass(frozen=True)
class NetworkRecord:
    """A network as stored; C{revision} is its last published map's."""

    id: str
    name: str
    subnet: str
    private: bool
    created: float
    revision: int
    domain: str | None = None  # None: NAME.twistvpn.internal

    @property
    def dns_domain(self) -> str:
        """The DNS domain of its members: the admin's, or NAME.twistvpn.internal."""
        return self.domain or default_domain(self.name, self.id)


@dataclass(frozen=True)
class MemberRecord:
    """One node's membership of one network."""

    network_id: str
    public_key: bytes
    authorized: bool
    ip: str | None
    created: float
    name: str | None = None  # the admin's name for it in this network; None: the node's


@dataclass(frozen=True)
class KeyRecord:
    """A pre-auth key as stored: never its secret, only the secret's hash."""

    id: str
    network_id: str
    reusable: bool
    uses: int
    expires: float | None
    name_prefix: str | None
    revoked: bool
    created: float


def _key(row: sqlite3.Row) -> KeyRecord:
    return KeyRecord(row["id"], row["network_id"], bool(row["reusable"]), row["uses"],
                     row["expires"], row["name_prefix"], bool(row["revoked"]), row["created"])


def _node(row: sqlite3.Row) -> NodeRecord:
    return NodeRecord(
        public_key=bytes(row["public_key"]),
        node_id=row["node_id"],
        name=row["name"],
        last_seen=row["last_seen"],
        endpoints=(row["endpoint"], row["endpoint2"]),
        local_endpoints=tuple(json.loads(row["local_endpoints"])),
        kind=row["kind"],
    )


def _network(row: sqlite3.Row) -> NetworkRecord:
    return NetworkRecord(row["id"], row["name"], row["subnet"], bool(row["private"]),
                         row["created"], row["revision"], row["domain"])


def _member(row: sqlite3.Row) -> MemberRecord:
    return MemberRecord(row["network_id"], bytes(row["public_key"]), bool(row["authorized"]),
                        row["ip"], row["created"], row["name"])


class WriteConflictError(Exception):
    """
    A write that a constraint refuses (a unique address or key, a missing
    row): another writer's committed change got there first.  Nothing of
    the write was kept.
    """


@implementer(IRendezvousStore)
class SQLiteStore:
    """
    L{IRendezvousStore} over one sqlite connection (L{database.get_db}).
    Its SQL is PostgreSQL's too (L{twistvpn.rendezvous.pgstore} runs it
    there); only the transactions and the connection differ.
    """

    ENDPOINT_COLUMNS = ("endpoint", "endpoint2")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db: Any = db

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        """One write transaction: all of a method's changes, or none."""
        try:
            with transaction(self.db):
                yield self.db
        except sqlite3.IntegrityError as e:
            raise WriteConflictError(str(e)) from e

    # -- nodes ------------------------------------------------------------------

    def load_nodes(self) -> list[NodeRecord]:
        return [_node(r) for r in self.db.execute("SELECT * FROM nodes")]

    def get_node(self, public_key: bytes) -> NodeRecord | None:
        row = self.db.execute("SELECT * FROM nodes WHERE public_key = ?",
                              (public_key,)).fetchone()
        return None if row is None else _node(row)

    def get_node_by_id(self, node_id: str) -> NodeRecord | None:
        row = self.db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return None if row is None else _node(row)

    def add_node(self, public_key: bytes, node_id: str, name: str, now: float) -> NodeRecord:
        with self._transaction():
            self.db.execute(
                "INSERT INTO nodes (public_key, node_id, name, created, last_seen)"
                " VALUES (?, ?, ?, ?, ?)",
                (public_key, node_id, name, now, now),
            )
        return NodeRecord(public_key, node_id, name, now, (None, None), ())

    def add_device(self, public_key: bytes, node_id: str, name: str, network_id: str,
                   ip: str, now: float) -> tuple[NodeRecord, MemberRecord]:
        with self._transaction():
            # A device already known (of another network, or deleted from
            # this one) keeps its record.
            self.db.execute(
                "INSERT INTO nodes (public_key, node_id, name, created, last_seen, kind)"
                " VALUES (?, ?, ?, ?, NULL, 'device') ON CONFLICT (public_key) DO NOTHING",
                (public_key, node_id, name, now),
            )
            self.db.execute(
                "INSERT INTO members (network_id, public_key, authorized, ip, created, name)"
                " VALUES (?, ?, 1, ?, ?, ?)",
                (network_id, public_key, ip, now, name),
            )
        return (NodeRecord(public_key, node_id, name, None, (None, None), (), "device"),
                MemberRecord(network_id, public_key, True, ip, now, name))

    def update_node(self, public_key: bytes, last_seen: float, name: str | None = None) -> None:
        with self._transaction():
            if name is None:
                self.db.execute("UPDATE nodes SET last_seen = ? WHERE public_key = ?",
                                (last_seen, public_key))
            else:
                self.db.execute("UPDATE nodes SET name = ?, last_seen = ? WHERE public_key = ?",
                                (name, last_seen, public_key))

    def set_endpoint(self, public_key: bytes, which: int, endpoint: str,
                     last_seen: float) -> None:
        column = self.ENDPOINT_COLUMNS[which]
        with self._transaction():
            self.db.execute(
                f"UPDATE nodes SET {column} = ?, last_seen = ? WHERE public_key = ?",
                (endpoint, last_seen, public_key),
            )

    def set_local_endpoints(self, public_key: bytes, endpoints: tuple[str, ...]) -> None:
        with self._transaction():
            self.db.execute("UPDATE nodes SET local_endpoints = ? WHERE public_key = ?",
                            (json.dumps(list(endpoints)), public_key))

    # -- networks ---------------------------------------------------------------

    def get_network(self, network_id: str) -> NetworkRecord | None:
        row = self.db.execute("SELECT * FROM networks WHERE id = ?", (network_id,)).fetchone()
        return None if row is None else _network(row)

    def list_networks(self) -> list[NetworkRecord]:
        return [_network(r) for r in
                self.db.execute("SELECT * FROM networks ORDER BY created, id")]

    def count_networks(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM networks").fetchone()[0])

    def count_members(self, network_id: str) -> tuple[int, int]:
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(authorized), 0) FROM members WHERE network_id = ?",
            (network_id,),
        ).fetchone()
        return int(row[0]), int(row[1])

    def subnets(self) -> list[str]:
        return [r["subnet"] for r in self.db.execute("SELECT subnet FROM networks")]

    def add_network(self, network_id: str, name: str, subnet: str, private: bool,
                    now: float) -> NetworkRecord | None:
        with self._transaction():
            if self.db.execute("SELECT 1 FROM networks WHERE id = ?",
                               (network_id,)).fetchone() is not None:
                return None
            self.db.execute(
                "INSERT INTO networks (id, name, subnet, private, created, revision)"
                " VALUES (?, ?, ?, ?, ?, 0)",
                (network_id, name, subnet, int(private), now),
            )
        return NetworkRecord(network_id, name, subnet, private, now, 0)

    def delete_network(self, network_id: str) -> list[bytes]:
        with self._transaction():
            keys = [bytes(r["public_key"]) for r in self.db.execute(
                "SELECT public_key FROM members WHERE network_id = ?", (network_id,))]
            self.db.execute("DELETE FROM members WHERE network_id = ?", (network_id,))
            self.db.execute("DELETE FROM networks WHERE id = ?", (network_id,))
        return keys

    def update_network(self, network_id: str, name: str, domain: str | None,
                       private: bool) -> NetworkRecord | None:
        with self._transaction():
            self.db.execute("UPDATE networks SET name = ?, domain = ?, private = ? WHERE id = ?",
                            (name, domain, int(private), network_id))
        return self.get_network(network_id)

    def revisions(self) -> dict[str, int]:
        rows = self.db.execute("SELECT id, revision FROM networks")
        return {r["id"]: r["revision"] for r in rows}

    def set_revision(self, network_id: str, revision: int) -> None:
        with self._transaction():
            self.db.execute("UPDATE networks SET revision = ? WHERE id = ?",
                            (revision, network_id))

    # -- members ----------------------------------------------------------------

    def get_member(self, network_id: str, public_key: bytes) -> MemberRecord | None:
        row = self.db.execute(
            "SELECT * FROM members WHERE network_id = ? AND public_key = ?",
            (network_id, public_key),
        ).fetchone()
        return None if row is None else _member(row)

    def list_members(self, network_id: str, authorized_only: bool = False) -> list[MemberRecord]:
        query = "SELECT * FROM members WHERE network_id = ?"
        if authorized_only:
            query += " AND authorized = 1"
        query += " ORDER BY created, public_key"
        return [_member(r) for r in self.db.execute(query, (network_id,))]

    def member_networks(self, public_key: bytes) -> list[str]:
        return [r["network_id"] for r in self.db.execute(
            "SELECT network_id FROM members WHERE public_key = ? AND authorized = 1",
            (public_key,))]

    def authorized_members(self) -> dict[str, frozenset[bytes]]:
        found: dict[str, set[bytes]] = {r["id"]: set() for r in
                                        self.db.execute("SELECT id FROM networks")}
        for row in self.db.execute(
            "SELECT network_id, public_key FROM members WHERE authorized = 1"
        ):
            found.setdefault(row["network_id"], set()).add(bytes(row["public_key"]))
        return {network_id: frozenset(keys) for network_id, keys in found.items()}

    def authorized_devices(self, network_id: str | None = None) -> dict[str, frozenset[bytes]]:
        query = ("SELECT m.network_id, m.public_key FROM members m JOIN nodes n"
                 " ON n.public_key = m.public_key WHERE m.authorized = 1 AND n.kind = 'device'")
        params: tuple[str, ...] = ()
        if network_id is not None:
            query += " AND m.network_id = ?"
            params = (network_id,)
        found: dict[str, set[bytes]] = {}
        for row in self.db.execute(query, params):
            found.setdefault(row["network_id"], set()).add(bytes(row["public_key"]))
        return {network_id: frozenset(keys) for network_id, keys in found.items()}

    def used_ips(self, network_id: str) -> set[str]:
        return {r["ip"] for r in self.db.execute(
            "SELECT ip FROM members WHERE network_id = ? AND ip IS NOT NULL", (network_id,))}

    def ip_holder(self, network_id: str, ip: str) -> bytes | None:
        row = self.db.execute(
            "SELECT public_key FROM members WHERE network_id = ? AND ip = ?", (network_id, ip)
        ).fetchone()
        return None if row is None else bytes(row["public_key"])

    def add_member(self, network_id: str, public_key: bytes, now: float, authorized: bool,
                   ip: str | None) -> MemberRecord:
        with self._transaction():
            self.db.execute(
                "INSERT INTO members (network_id, public_key, authorized, ip, created)"
                " VALUES (?, ?, ?, ?, ?)",
                (network_id, public_key, int(authorized), ip, now),
            )
        return MemberRecord(network_id, public_key, authorized, ip, now)

    def update_member(self, network_id: str, public_key: bytes, authorized: bool,
                      ip: str | None, name: str | None = None) -> None:
        with self._transaction():
            self.db.execute(
                "UPDATE members SET authorized = ?, ip = ?, name = ?"
                " WHERE network_id = ? AND public_key = ?",
                (int(authorized), ip, name, network_id, public_key),
            )

    # -- pre-auth keys -----------------------------------------------------------

    def add_key(self, key: KeyRecord, secret_hash: bytes) -> None:
        with self._transaction():
            self.db.execute(
                "INSERT INTO auth_keys (id, network_id, secret_hash, reusable, uses, expires,"
                " name_prefix, revoked, created) VALUES (?, ?, ?, ?, 0, ?, ?, 0, ?)",
                (key.id, key.network_id, secret_hash, int(key.reusable), key.expires,
                 key.name_prefix, key.created),
            )

    def key_by_hash(self, secret_hash: bytes) -> KeyRecord | None:
        row = self.db.execute("SELECT * FROM auth_keys WHERE secret_hash = ?",
                              (secret_hash,)).fetchone()
        return None if row is None else _key(row)

    def list_keys(self, network_id: str | None = None) -> list[KeyRecord]:
        if network_id is None:
            rows = self.db.execute("SELECT * FROM auth_keys ORDER BY created, id")
        else:
            rows = self.db.execute("SELECT * FROM auth_keys WHERE network_id = ?"
                                   " ORDER BY created, id", (network_id,))
        return [_key(r) for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        with self._transaction():
            changed = self.db.execute("UPDATE auth_keys SET revoked = 1 WHERE id = ?",
                                      (key_id,)).rowcount
        return bool(changed)

    def join_with_key(self, key_id: str, network_id: str, public_key: bytes, now: float,
                      ip: str, single_use: bool, name: str | None = None) -> MemberRecord | None:
        """
        Spend a use of the key and make the node an authorized member, in one
        transaction; None if a single-use key was spent meanwhile.
        """
        with self._transaction():
            spent = self.db.execute(
                "UPDATE auth_keys SET uses = uses + 1 WHERE id = ? AND revoked = 0"
                + (" AND uses = 0" if single_use else ""), (key_id,)).rowcount
            if not spent:
                return None
            self.db.execute(
                "INSERT INTO members (network_id, public_key, authorized, ip, created, name)"
                " VALUES (?, ?, 1, ?, ?, ?) ON CONFLICT (network_id, public_key)"
                " DO UPDATE SET authorized = 1, ip = COALESCE(members.ip, excluded.ip),"
                " name = COALESCE(members.name, excluded.name)",
                (network_id, public_key, ip, now, name),
            )
            row = self.db.execute("SELECT * FROM members WHERE network_id = ? AND public_key = ?",
                                  (network_id, public_key)).fetchone()
        return _member(row)

    def delete_member(self, network_id: str, public_key: bytes) -> None:
        with self._transaction():
            self.db.execute("DELETE FROM members WHERE network_id = ? AND public_key = ?",
                            (network_id, public_key))


def open_store(path: str) -> SQLiteStore:
    """The store in the sqlite database at C{path} (created or upgraded)."""
    return SQLiteStore(get_db(path))
