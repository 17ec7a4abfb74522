"""
The rendezvous's store in PostgreSQL (psycopg 3): the same tables and the
same SQL as the sqlite store (L{twistvpn.rendezvous.store}), so several
rendezvous instances can share one database.

Only what differs lives here: the connection (placeholders, rows readable
by name and by position, as sqlite3's are), transactions, and the
versioned schema (C{postgresql-schema-vN.sql}; C{postgresql-upgrade-to-vN.sql}
files join it when a version changes).  A write is one transaction, as in
sqlite; PostgreSQL's own constraints (unique IPs per network, primary keys)
keep concurrent writers from both succeeding where only one may.

Back it up as any PostgreSQL database (C{pg_dump}, or the cluster's own
continuous archiving); docs/rendezvous.md says more.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from twistvpn.rendezvous.database import TARGET_VERSION, DBError, read_sql
from twistvpn.rendezvous.store import SQLiteStore, WriteConflictError


class Row:
    """A result row by column name or by position, as sqlite3.Row is."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: dict[str, int], values: Sequence[Any]) -> None:
        self._names = names  # column name -> position, one dict per result
        self._values = values

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self._values[self._names[key]]
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: Any) -> Any:
    names = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: Row(names, values)


class Connection:
    """A psycopg connection that takes sqlite's "?" placeholders."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.raw.execute(sql.replace("?", "%s"), tuple(params))

    def close(self) -> None:
        self.raw.close()


def connect(dsn: str, target_version: int = TARGET_VERSION) -> Connection:
    """
    Connect to the PostgreSQL database at C{dsn} ("postgresql://..."),
    creating its tables if it has none, refusing a newer schema.
    """
    try:
        import psycopg
    except ImportError:
        raise DBError("PostgreSQL needs psycopg 3 (pip install 'twistvpn[postgresql]')") from None
    try:
        raw = psycopg.connect(dsn, autocommit=True, row_factory=_row_factory)
    except psycopg.Error as e:
        raise DBError(f"cannot connect to PostgreSQL: {str(e).strip()}") from None
    db = Connection(raw)
    try:
        with raw.transaction():
            # One instance creates the tables; the others wait for it here.
            raw.execute("SELECT pg_advisory_xact_lock(7247121)")
            if not _one(raw, "SELECT to_regclass('version') IS NOT NULL"):
                raw.execute(read_sql(f"postgresql-schema-v{target_version}.sql"))
                raw.execute("INSERT INTO version (version) VALUES (%s)", (target_version,))
            version = int(_one(raw, "SELECT version FROM version"))
            if version > target_version:
                raise DBError(f"schema version {version} is newer than this code "
                              f"({target_version})")
            for v in range(version + 1, target_version + 1):
                raw.execute(read_sql(f"postgresql-upgrade-to-v{v}.sql"))
            if version < target_version:
                raw.execute("UPDATE version SET version = %s", (target_version,))
    except BaseException:
        raw.close()
        raise
    return db


def share_identity(db: Connection, mine: dict[str, bytes]) -> dict[str, bytes]:
    """
    The identity every instance on this database presents (server key, TLS
    certificate and key): C{mine} if this instance is the first, else what
    the first wrote.  Nodes then pin one fingerprint whichever instance
    they reach.
    """
    raw = db.raw
    with raw.transaction():
        for name, value in mine.items():
            raw.execute("INSERT INTO shared_identity (name, value) VALUES (%s, %s)"
                        " ON CONFLICT (name) DO NOTHING", (name, value))
        rows = raw.execute("SELECT name, value FROM shared_identity").fetchall()
    return {row[0]: bytes(row[1]) for row in rows if row[0] in mine}


def _one(raw: Any, sql: str) -> Any:
    row = raw.execute(sql).fetchone()
    if row is None:
        raise DBError(f"no answer to {sql!r}: not a twistvpn rendezvous database")
    return row[0]


class PostgreSQLStore(SQLiteStore):
    """L{IRendezvousStore} in PostgreSQL: the sqlite store's SQL on a psycopg connection."""

    def __init__(self, db: Connection) -> None:
        self.db = db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        import psycopg

        try:
            with self.db.raw.transaction():
                yield self.db
        except psycopg.IntegrityError as e:
            raise WriteConflictError(str(e).strip()) from e


def open_postgresql_store(dsn: str) -> PostgreSQLStore:
    """The store in the PostgreSQL database at C{dsn} (its tables made if need be)."""
    return PostgreSQLStore(connect(dsn))
