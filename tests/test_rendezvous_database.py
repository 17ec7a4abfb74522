"""
Persistence: a restart loses nothing, an old schema is migrated after a
backup, a failed write changes nothing, and a process killed with SIGKILL
in the middle of writing leaves a consistent database.
"""

from __future__ import annotations

import glob
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.rendezvous import FakeSession, new_key
from twistvpn.rendezvous import database
from twistvpn.rendezvous.controller import Controller, node_id_of
from twistvpn.rendezvous.database import DBError, get_db, get_version
from twistvpn.rendezvous.store import SQLiteStore


class FailingConnection:
    """A database connection whose C{statement} fails, as a full disk would."""

    def __init__(self, db: sqlite3.Connection, statement: str | None) -> None:
        self.db = db
        self.statement = statement
        self.failed = 0

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if self.statement is not None and sql.startswith(self.statement):
            self.failed += 1
            raise OSError("disk on fire")
        return self.db.execute(sql, *args)

    def close(self) -> None:
        self.db.close()


class Files(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.abspath(os.path.join(self.dir, "rendezvous.sqlite"))
        self.clock = Clock()
        self.clock.advance(1000)

    def open(self) -> Controller:
        db = get_db(self.path)
        self.addCleanup(db.close)
        return Controller(SQLiteStore(db), self.clock)

    def test_new_database(self) -> None:
        db = get_db(self.path)
        self.addCleanup(db.close)
        self.assertEqual(get_version(db), database.TARGET_VERSION)
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_restart_loses_nothing(self) -> None:
        controller = self.open()
        net = controller.create_network("home")["id"]
        keys = []
        for name in ("a", "b", "c"):
            _, public = new_key()
            controller.register_node(public, name, FakeSession(public))
            controller.join(public, net)
            keys.append(public)
        controller.authorize(net, node_id_of(keys[0]))
        controller.authorize(net, node_id_of(keys[1]))
        controller.set_ip(net, node_id_of(keys[1]), "100.64.0.50")
        controller.set_local_endpoints(keys[0], ["192.168.1.5:51820"])
        controller.record_endpoint(keys[0], ("198.51.100.4", 4444), 0)
        before = controller.list_members(net)
        networks = controller.list_networks()
        controller.store.close()

        again = self.open()
        after = again.list_members(net)
        for member in before:
            member["online"] = False  # the sessions did not survive, of course
        self.assertEqual(after, before)
        self.assertEqual(again.list_networks(), networks)
        self.assertEqual(again.network_map(net).member(keys[0]).endpoints, ("198.51.100.4:4444",))
        # and the next free address accounts for the ones given before
        self.assertEqual(again.authorize(net, node_id_of(keys[2]))["ip"], "100.64.0.2")

    def test_migration_from_v1(self) -> None:
        """A v1 database is backed up, then migrated in place, data intact."""
        old = get_db(self.path, target_version=1)
        _, public = new_key()
        with database.transaction(old):
            old.execute(
                "INSERT INTO networks VALUES ('00112233aabbccdd', 'old', '10.5.0.0/24', 1, 5.0)"
            )
            old.execute(
                "INSERT INTO nodes VALUES (?, ?, 'veteran', 5.0, 6.0, '198.51.100.3:7')",
                (public, node_id_of(public)),
            )
            old.execute(
                "INSERT INTO members VALUES ('00112233aabbccdd', ?, 1, '10.5.0.9', 5.0)",
                (public,),
            )
        old.close()

        controller = self.open()
        self.assertEqual(get_version(controller.store.db), database.TARGET_VERSION)
        [member] = controller.list_members("00112233aabbccdd")
        self.assertEqual(member["name"], "veteran")
        self.assertEqual(member["ip"], "10.5.0.9")
        self.assertEqual(member["endpoints"], ["198.51.100.3:7"])
        self.assertEqual(member["local_endpoints"], [])
        self.assertEqual(controller.network_map("00112233aabbccdd").revision, 0)
        [backup] = glob.glob(self.path + ".v1-*.backup")
        copy = sqlite3.connect(backup)
        self.addCleanup(copy.close)
        self.assertEqual(copy.execute("SELECT version FROM version").fetchone()[0], 1)
        self.assertEqual(copy.execute("SELECT name FROM nodes").fetchone()[0], "veteran")
        # the migrated database takes v2's columns
        controller.set_local_endpoints  # noqa: B018 - exists
        controller.register_node(public, "veteran", FakeSession(public))
        controller.record_endpoint(public, ("198.51.100.3", 8), 1)
        self.assertTrue(controller.network_map("00112233aabbccdd").members[0].nat_varies)

    def test_schema_files_agree(self) -> None:
        """v1 and every upgrade give the same tables and columns as the newest schema."""
        fresh = get_db(":memory:")
        upgraded = get_db(":memory:", target_version=1)
        database.upgrade(upgraded, database.TARGET_VERSION)

        def shape(db: sqlite3.Connection) -> dict:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master ORDER BY name")]
            return {
                t: [tuple(c)[1:] for c in db.execute(f"PRAGMA table_info(`{t}`)")] for t in tables
            }

        self.assertEqual(shape(upgraded), shape(fresh))

    def test_newer_database_refused(self) -> None:
        db = get_db(self.path)
        with database.transaction(db):
            db.execute("UPDATE version SET version = 99")
        db.close()
        e = self.assertRaises(DBError, get_db, self.path)
        self.assertIn("newer", str(e))

    def test_not_a_database(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"this is not sqlite" * 100)
        self.assertRaises(DBError, get_db, self.path)

    def test_interrupted_write_changes_nothing(self) -> None:
        """A failure half-way through a change rolls all of it back."""
        db = get_db(self.path)
        self.addCleanup(db.close)
        failing = FailingConnection(db, "DELETE FROM networks")
        controller = Controller(SQLiteStore(failing), self.clock)  # type: ignore[arg-type]
        net = controller.create_network("home")["id"]
        _, public = new_key()
        controller.register_node(public, "a", FakeSession(public))
        controller.join(public, net)
        controller.authorize(net, node_id_of(public))
        # Deleting a network deletes its members, then the network: the
        # second statement fails, and the first is undone with it.
        self.assertRaises(OSError, controller.delete_network, net)
        self.assertEqual(failing.failed, 1)
        [member] = controller.list_members(net)
        self.assertTrue(member["authorized"])
        self.assertEqual(member["ip"], "100.64.0.1")
        failing.statement = None
        controller.delete_network(net)
        self.assertEqual(controller.list_networks(), [])

    def test_sigkill_while_writing(self) -> None:
        """Kill -9 a process in the middle of a stream of changes: every
        change it reported committed is there, and the database is sound."""
        script = textwrap.dedent(
            """
            import sys
            from twisted.internet.task import Clock
            from twistvpn.rendezvous.controller import Controller, node_id_of
            from twistvpn.rendezvous.store import open_store
            from tests.support.rendezvous import FakeSession, new_key
            c = Controller(open_store(sys.argv[1]), Clock())
            net = c.create_network("load", "10.0.0.0/16")["id"]
            for i in range(100000):
                _, public = new_key()
                c.register_node(public, "n%d" % i, FakeSession(public))
                c.join(public, net)
                c.authorize(net, node_id_of(public))
                print(i, flush=True)
            """
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        process = subprocess.Popen(
            [sys.executable, "-c", script, self.path],
            stdout=subprocess.PIPE,
            env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )

        def stop() -> None:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
            process.stdout.close()

        self.addCleanup(stop)
        deadline = time.monotonic() + 30
        committed = -1
        while committed < 200 and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            committed = int(line)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        self.assertGreaterEqual(committed, 200, "the writer did not get going")

        db = get_db(self.path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        authorized = db.execute("SELECT COUNT(*) FROM members WHERE authorized = 1").fetchone()[0]
        nodes = db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0]
        self.assertGreaterEqual(authorized, committed + 1)
        # a change is whole or absent: never a member without its node,
        # never an authorized member without an address
        self.assertIn(nodes - authorized, (0, 1))
        self.assertEqual(
            db.execute(
                "SELECT COUNT(*) FROM members WHERE authorized = 1 AND ip IS NULL"
            ).fetchone()[0],
            0,
        )
        ips = [r[0] for r in db.execute("SELECT ip FROM members WHERE ip IS NOT NULL")]
        self.assertEqual(len(ips), len(set(ips)))
