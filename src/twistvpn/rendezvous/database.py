"""
The rendezvous's sqlite database: versioned schema files, migrations,
backups before a migration.

The pattern is magic-wormhole's: C{schema-vN.sql} creates a fresh database
at version N, C{upgrade-to-vN.sql} takes one from N-1 to N.  Every change the
controller makes is one transaction, and the journal is a write-ahead log, so
a process killed at any moment leaves the last committed state.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from importlib import resources

TARGET_VERSION = 5


class DBError(Exception):
    """The database cannot be used (newer than this code, or corrupt)."""


def read_sql(name: str) -> str:
    """An SQL file shipped with the package."""
    return resources.files(__package__).joinpath(name).read_text("utf-8")


def get_schema(version: int) -> str:
    """The SQL creating a fresh database at C{version}."""
    return read_sql(f"schema-v{version}.sql")


def get_upgrader(new_version: int) -> str:
    """The SQL taking a database from C{new_version - 1} to C{new_version}."""
    return read_sql(f"upgrade-to-v{new_version}.sql")


def _connect(path: str) -> sqlite3.Connection:
    # Autocommit at the driver level: transactions are explicit
    # (L{transaction}), so none is ever left open by accident.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA foreign_keys = ON")
    if path != ":memory:":
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise DBError(f"{path}: cannot use a write-ahead log (journal mode {mode})")
        # NORMAL in WAL mode: a committed transaction survives the process
        # being killed; only an OS crash may lose the last few.
        db.execute("PRAGMA synchronous = NORMAL")
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """
    One write transaction: committed when the block ends, rolled back if it
    raises.  IMMEDIATE takes the write lock at once, so two writers never
    deadlock half-way.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _run_script(db: sqlite3.Connection, script: str) -> None:
    for statement in _statements(script):
        db.execute(statement)


def _create(db: sqlite3.Connection, version: int) -> None:
    with transaction(db):
        _run_script(db, get_schema(version))
        db.execute("INSERT INTO version (version) VALUES (?)", (version,))


def get_version(db: sqlite3.Connection) -> int:
    """The schema version recorded in C{db}."""
    try:
        row = db.execute("SELECT version FROM version").fetchone()
    except sqlite3.DatabaseError as e:
        raise DBError(f"not a twistvpn rendezvous database: {e}") from None
    if row is None:
        raise DBError("the version table is empty")
    return int(row[0])


def backup(db: sqlite3.Connection, path: str) -> str:
    """Write a consistent copy of C{db} next to C{path}; return its name."""
    target = f"{path}.v{get_version(db)}-{int(time.time())}.backup"
    n = 0
    while os.path.exists(target):
        n += 1
        target = f"{path}.v{get_version(db)}-{int(time.time())}.{n}.backup"
    copy = sqlite3.connect(target)
    try:
        db.backup(copy)
    finally:
        copy.close()
    os.chmod(target, 0o600)
    return target


def upgrade(db: sqlite3.Connection, target_version: int) -> None:
    """Run every upgrade script up to C{target_version}, in one transaction."""
    version = get_version(db)
    with transaction(db):
        for v in range(version + 1, target_version + 1):
            _run_script(db, get_upgrader(v))
        db.execute("UPDATE version SET version = ?", (target_version,))


def _statements(script: str) -> list[str]:
    """Split a script into statements (sqlite3's executescript commits)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current)
            current = ""
    return statements


def get_db(path: str, target_version: int = TARGET_VERSION) -> sqlite3.Connection:
    """
    Open (creating if absent) the database at C{path} and bring it to
    C{target_version}, writing a backup copy before any migration.
    C{":memory:"} gives a fresh in-memory database.
    """
    fresh = path == ":memory:" or not os.path.exists(path)
    if fresh and path != ":memory:":
        # Created with the right mode, so no other user ever reads it.
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    try:
        db = _connect(path)
    except sqlite3.DatabaseError as e:
        raise DBError(f"{path}: {e}") from None
    try:
        if fresh:
            _create(db, target_version)
            return db
        version = get_version(db)
        if version > target_version:
            raise DBError(
                f"{path}: schema version {version} is newer than this code ({target_version})"
            )
        if version < target_version:
            backup(db, path)
            upgrade(db, target_version)
        return db
    except BaseException:
        db.close()
        raise
