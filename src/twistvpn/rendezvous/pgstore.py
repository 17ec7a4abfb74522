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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistvpn.rendezvous.cluster import MEMBERS_CHANNEL, NODES_CHANNEL, Cluster
from twistvpn.rendezvous.database import TARGET_VERSION, DBError, read_sql
from twistvpn.rendezvous.store import SQLiteStore, WriteConflictError

# How every instance's sessions are named in pg_stat_activity: an instance
# whose sessions are gone is gone.
APPLICATION_NAME = "twistvpn-rendezvous"
# The LISTEN connection's: only store connections (one per instance, its ID)
# carry APPLICATION_NAME, so that counting them counts instances.
LISTEN_APPLICATION_NAME = "twistvpn-rendezvous-listen"
# How often an instance asks the database which instances are still there.
ALIVE_INTERVAL = 2.0

_log = Logger(namespace=__name__)


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
        raw = psycopg.connect(dsn, autocommit=True, row_factory=_row_factory,
                              application_name=APPLICATION_NAME)
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


# -- the instances' notifications (twistvpn.rendezvous.cluster) -----------------------


def notifier(db: Connection) -> Callable[[str, str], None]:
    """Send a notification to every instance listening on the database."""

    def send(channel: str, payload: str) -> None:
        db.raw.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    return send


def instance_id(db: Connection) -> int:
    """This instance's ID on the database: its connection's backend process ID."""
    return int(db.raw.info.backend_pid)


def instances_alive(db: Connection) -> set[int]:
    rows = db.raw.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                          (APPLICATION_NAME,)).fetchall()
    return {int(row[0]) for row in rows}


@implementer(IReadDescriptor)
class _Listening:
    """The LISTEN connection, as the reactor reads it: notifications, or its loss."""

    def __init__(self, raw: Any, service: ClusterService) -> None:
        self.raw = raw
        self._fd = raw.pgconn.socket
        self._service = service

    def fileno(self) -> int:
        return int(self._fd)

    def logPrefix(self) -> str:
        return "twistvpn-cluster"

    def doRead(self) -> Any:
        import psycopg

        pgconn = self.raw.pgconn
        try:
            pgconn.consume_input()
        except psycopg.Error as e:
            return Failure(e)
        batch = []
        while (notification := pgconn.notifies()) is not None:
            batch.append((notification.relname.decode(), notification.be_pid,
                          notification.extra.decode("utf-8", "replace")))
        if batch:
            self._service.cluster.received(batch)
        return None

    def connectionLost(self, reason: Failure) -> None:
        self._service.lost(self, reason)


class ClusterService(Service):
    """
    This instance's ears on the shared database: a LISTEN connection the
    reactor reads (reconnected with backoff, and followed by a resync, when
    it is lost), and a look every C{ALIVE_INTERVAL} seconds at which
    instances still have sessions.
    """

    def __init__(self, reactor: Any, dsn: str, cluster: Cluster, db: Connection) -> None:
        self._reactor = reactor
        self._dsn = dsn
        self.cluster = cluster
        self._db = db
        self._listening: _Listening | None = None
        self._failures = 0
        self._retry: Any = None
        self._alive = LoopingCall(self._check_alive)
        self._alive.clock = reactor
        self._policy = backoffPolicy(initialDelay=0.5, maxDelay=10.0)

    def startService(self) -> None:
        super().startService()
        self.cluster.instance = instance_id(self._db)
        self._listen()
        self._alive.start(ALIVE_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._alive.running:
            self._alive.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        listening, self._listening = self._listening, None
        if listening is not None:
            self._reactor.removeReader(listening)
            listening.raw.close()

    def _listen(self) -> None:
        import psycopg

        self._retry = None
        if not self.running:
            return
        try:
            raw = psycopg.connect(self._dsn, autocommit=True,
                                  application_name=LISTEN_APPLICATION_NAME)
            for channel in (MEMBERS_CHANNEL, NODES_CHANNEL):
                raw.execute(f"LISTEN {channel}")
        except psycopg.Error as e:
            self._failures += 1
            delay = self._policy(self._failures)
            _log.warn("cannot listen to the other instances: {why}; again in {delay} s",
                      why=str(e).strip()[:200], delay=f"{delay:.1f}")
            self._retry = self._reactor.callLater(delay, self._listen)
            return
        self._failures = 0
        self._listening = _Listening(raw, self)
        self._reactor.addReader(self._listening)
        self.cluster.resync()

    def lost(self, listening: _Listening, reason: Failure) -> None:
        if listening is not self._listening:
            return
        self._reactor.removeReader(listening)
        listening.raw.close()
        self._listening = None
        _log.warn("lost the other instances' notifications ({why}); listening again",
                  why=reason.getErrorMessage()[:200])
        self._failures += 1
        self._retry = self._reactor.callLater(self._policy(self._failures), self._listen)

    def _check_alive(self) -> None:
        import psycopg

        try:
            alive = instances_alive(self._db)
        except psycopg.Error as e:
            _log.warn("cannot ask the database which instances run: {why}",
                      why=str(e).strip()[:200])
            return
        self.cluster.instances_alive(alive)
