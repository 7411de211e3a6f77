"""
The state database's versioned schema (L{rtunnel.identity.migrations}):
created from empty, upgraded in place from the previous version keeping its
data (the SQLite databases 0.2.0 and its successors wrote, as fixtures made
with their own code), refused when newer, migrated once when two processes
open it at once; and C{rtunnel database upgrade}.
"""

from __future__ import annotations

import io
import os
import sqlite3
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from twisted.python import usage

from rtunnel.cli import server_tap
from rtunnel.cli.admin import main
from rtunnel.identity import migrations
from rtunnel.identity.errors import StateError
from rtunnel.identity.migrations import SCHEMA_VERSION
from rtunnel.identity.state import ServerState
from rtunnel.identity.store import ForwardState, StateStore
from rtunnel.services import ServerConfig
from tests.helpers_identity import NOW, TestCase
from tests.pg_support import cluster

FIXTURES = Path(__file__).parent / "fixtures"
#: rtunnel 0.2.0's database: schema version 1, no forward or service tables
V020 = FIXTURES / "state-0.2.0.sql"
#: a version-1 database with the forward and service tables added when missing (after 0.2.0)
V1_FORWARDS = FIXTURES / "state-v1-forwards.sql"
#: a version-2 database (before replicas): forward states without a replica id
V2 = FIXTURES / "state-v2.sql"


def _load(fixture: Path, path: Path) -> None:
    """Make the database of a fixture, in WAL mode as every rtunnel since 0.1 leaves its files."""
    raw = sqlite3.connect(path)
    raw.executescript(fixture.read_text())
    raw.execute("PRAGMA journal_mode = WAL").fetchone()
    raw.close()


def _schema(path: Path) -> list[tuple[str, str]]:
    raw = sqlite3.connect(path)
    try:
        rows = raw.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name").fetchall()
    finally:
        raw.close()
    # IF NOT EXISTS is how a table was created, not what it is
    return [(name, sql.replace("IF NOT EXISTS ", "")) for name, sql in rows]


def _open_at_once(open_store: Callable[[], StateStore], count: int = 3) -> list[object]:
    """Open C{count} stores in as many threads at the same moment; what each migrated from, or its error."""
    barrier = threading.Barrier(count)
    results: list[object] = []

    def open_it() -> None:
        barrier.wait(timeout=10)
        try:
            store = open_store()
        except StateError as e:
            results.append(e)
            return
        results.append(store.upgraded_from)
        store.close()

    threads = [threading.Thread(target=open_it) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


class SQLiteMigrationTests(TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir(mode=0o700)
        self.path = self.directory / "state.sqlite3"

    def open(self) -> StateStore:
        store = StateStore(self.path, process_alive=lambda pid: False)
        self.addCleanup(store.close)
        return store

    def test_from_empty(self) -> None:
        """A new file gets every migration: the current version and all tables; a second open changes nothing."""
        store = self.open()
        self.assertEqual(store.upgraded_from, 0)
        self.assertEqual(store.get_meta("schema_version"), str(SCHEMA_VERSION))
        self.assertEqual(store.changes_token()[1], 0)
        again = self.open()
        self.assertIsNone(again.upgraded_from)
        self.assertEqual(
            {name for name, _ in _schema(self.path)},
            {
                "meta",
                "sites",
                "tokens",
                "tokens_by_site",
                "forwards",
                "forward_states",
                "site_services",
                "replicas",
                "site_sessions",
            },
        )

    def test_from_0_2_0(self) -> None:
        """
        rtunnel 0.2.0's database is upgraded in place: its sites, tokens,
        revocations and metadata kept, the new tables there, and the same
        schema as a database created from empty.
        """
        _load(V020, self.path)
        store = self.open()
        self.assertEqual(store.upgraded_from, 1)
        self.assertEqual(store.get_meta("schema_version"), str(SCHEMA_VERSION))
        sites = {record.name: record for record in store.list_sites()}
        self.assertEqual(sorted(sites), ["alpha", "beta", "delta", "gamma"])
        self.assertTrue(sites["alpha"].enrolled)
        self.assertEqual(sites["alpha"].peer, "192.0.2.10:40000")
        self.assertTrue(sites["beta"].revoked)
        self.assertFalse(sites["gamma"].enrolled)
        self.assertIsNotNone(sites["delta"].token_expires)
        self.assertEqual(store.public_addresses(), ["tunnel.example", "192.0.2.7"])
        self.assertEqual(store.get_meta("public_port"), "8443")
        fingerprint = sites["alpha"].certificate_fingerprint
        assert fingerprint is not None
        store.check_site("alpha", fingerprint)
        self.assertEqual(store.stored_forwards(), [])
        self.assertEqual(store.site_services(), {})
        fresh = self.directory / "fresh.sqlite3"
        StateStore(fresh).close()
        self.assertEqual(_schema(self.path), _schema(fresh))

    def test_from_version_1_with_forward_tables(self) -> None:
        """A version-1 database that already has the forward and service tables keeps their rows."""
        _load(V1_FORWARDS, self.path)
        store = self.open()
        self.assertEqual(store.upgraded_from, 1)
        [forward] = store.stored_forwards()
        self.assertEqual(forward.spec, "127.0.0.1:9000:alpha:localhost:22")
        self.assertEqual(
            {site: {n: str(t) for n, t in s.items()} for site, s in store.site_services().items()},
            {"alpha": {"ssh": "localhost:22"}},
        )
        self.assertEqual(store.forwards_version(), 1)

    def test_from_version_2(self) -> None:
        """
        A version-2 database (a server before replicas ran on it and
        stopped) is upgraded in place: its sites, tokens, forwards and
        forward states kept (the states as the old server's, replica id
        ''), the replica tables there, the same schema as from empty.
        """
        _load(V2, self.path)
        store = self.open()
        self.assertEqual(store.upgraded_from, 2)
        self.assertEqual(store.get_meta("schema_version"), str(SCHEMA_VERSION))
        sites = {record.name: record for record in store.list_sites()}
        self.assertEqual(sorted(sites), ["alpha", "beta", "gamma"])
        self.assertEqual(
            (sites["alpha"].connected, sites["alpha"].peer, sites["alpha"].sessions), (False, "192.0.2.10:40000", ())
        )
        self.assertTrue(sites["beta"].revoked)
        self.assertFalse(sites["gamma"].enrolled)
        [forward] = store.stored_forwards()
        self.assertEqual(forward.spec, "127.0.0.1:9000:alpha:localhost:22")
        query = "SELECT port, source, replica_id, state FROM forward_states ORDER BY port"
        states = store._db.execute(query).fetchall()
        self.assertEqual(
            [tuple(r) for r in states],
            [(9000, "database", "", "listening"), (9100, "command line", "", "listening")],
        )
        self.assertEqual([(f.port, f.state) for f in store.list_forwards()], [(9000, "not running")])
        self.assertEqual(store.live_replicas(NOW), [])
        fresh = self.directory / "fresh.sqlite3"
        StateStore(fresh).close()
        self.assertEqual(_schema(self.path), _schema(fresh))

    def test_newer_version_refused(self) -> None:
        """A database of a newer rtunnel is refused with the store's message, and left as it was."""
        StateStore(self.path).close()
        raw = sqlite3.connect(self.path)
        raw.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
        raw.commit()
        raw.close()
        before = self.path.read_bytes()
        error = self.assertRaises(StateError, StateStore, self.path)
        self.assertIn(
            f"has schema version {SCHEMA_VERSION + 1}; this rtunnel understands version {SCHEMA_VERSION} only "
            "(it was written by a newer rtunnel)",
            str(error),
        )
        self.assertEqual(self.path.read_bytes(), before)

    def test_failed_migration_changes_nothing(self) -> None:
        """A migration that fails leaves the database at its version, none of its steps applied."""
        _load(V020, self.path)
        broken = (
            migrations.Migration(1, "base", ()),
            migrations.Migration(2, "broken", (*migrations.SQLITE[1].statements, "CREATE TABLE sites (x TEXT)")),
        )
        self.patch(migrations, "SQLITE", broken)
        self.assertRaises(StateError, StateStore, self.path)
        self.patch(migrations, "SQLITE", migrations.SQLITE)
        raw = sqlite3.connect(self.path)
        self.addCleanup(raw.close)
        self.assertEqual(raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0], "1")
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.assertEqual(tables, {"meta", "sites", "tokens"})

    def test_two_processes_upgrade_once(self) -> None:
        """
        Stores opening an old database at the same moment queue on the write
        lock: one migrates, the others find it done, and every one works.
        """
        for _ in range(5):
            if self.path.exists():
                self.path.unlink()
            _load(V020, self.path)
            results = _open_at_once(lambda: StateStore(self.path, busy_timeout=10))
            self.assertEqual(sorted(results, key=repr), sorted([1, None, None], key=repr))


class SQLiteFirstOpenTests(TestCase):
    def test_concurrent_first_opens(self) -> None:
        """
        Processes opening one new file at the same moment: one creates the
        schema, the others wait for it (the switch to WAL included), none fails.
        """
        for _ in range(20):
            path = Path(self.mktemp())
            path.parent.mkdir(parents=True, exist_ok=True)
            results = _open_at_once(lambda path=path: StateStore(path, busy_timeout=10))  # type: ignore[misc]
            self.assertEqual(sorted(results, key=repr), sorted([0, None, None], key=repr))


class PostgreSQLMigrationTests(TestCase):
    def setUp(self) -> None:
        self.pg = cluster()
        self.name = self.pg.new_database()
        self.addCleanup(self.pg.drop_database, self.name)
        self.url = self.pg.url(self.name)

    def test_from_empty_and_again(self) -> None:
        """An empty database gets every migration; the next open finds it current."""
        store = StateStore(self.url)
        self.addCleanup(store.close)
        self.assertEqual(store.upgraded_from, 0)
        self.assertEqual(store.get_meta("schema_version"), str(SCHEMA_VERSION))
        again = StateStore(self.url)
        self.addCleanup(again.close)
        self.assertIsNone(again.upgraded_from)

    def test_from_version_1(self) -> None:
        """A database at version 1 (its DDL and a site) is upgraded in place, its rows kept."""
        self.pg.execute(
            [
                *migrations.POSTGRESQL[0].statements,
                "INSERT INTO meta (key, value) VALUES ('schema_version', '1')",
                "INSERT INTO sites (name, enrolled_at, certificate_fingerprint) "
                "VALUES ('alpha', '2026-12-05T12:00:00.000000+00:00', 'ab')",
            ],
            self.name,
        )
        store = StateStore(self.url)
        self.addCleanup(store.close)
        self.assertEqual(store.upgraded_from, 1)
        store.check_site("alpha", "ab")
        self.assertEqual(store.stored_forwards(), [])
        self.assertEqual(store.changes_token(), (0, 0))

    def test_from_version_2(self) -> None:
        """
        A database at version 2 with a forward state is upgraded in place:
        the state kept as the old server's (replica id ''), each replica's
        state of the same forward a row of its own.
        """
        self.pg.execute(
            [
                *migrations.POSTGRESQL[0].statements,
                *migrations.POSTGRESQL[1].statements,
                "INSERT INTO meta (key, value) VALUES ('schema_version', '2')",
                "INSERT INTO forward_states (bind, port, source, site, host, hostport, state, updated_at) "
                "VALUES ('127.0.0.1', 9000, 'database', 'alpha', 'h', 22, 'listening', "
                "'2026-12-05T12:00:00.000000+00:00')",
            ],
            self.name,
        )
        store = StateStore(self.url)
        self.addCleanup(store.close)
        self.assertEqual(store.upgraded_from, 2)
        store.replica_started("a", "", 1, "h", NOW)
        store.record_forward_states(
            [ForwardState("127.0.0.1", 9000, "alpha", "h", 22, "database", "failed: x")], NOW, replica_id="a"
        )
        rows = store._db.execute("SELECT replica_id, state FROM forward_states ORDER BY replica_id").fetchall()
        self.assertEqual([tuple(r) for r in rows], [("", "listening"), ("a", "failed: x")])
        self.assertEqual(store.live_replicas(NOW)[0].replica_id, "a")

    def test_newer_version_refused(self) -> None:
        StateStore(self.url).close()
        self.pg.execute(["UPDATE meta SET value = '99' WHERE key = 'schema_version'"], self.name)
        error = self.assertRaises(StateError, StateStore, self.url)
        self.assertIn(
            f"has schema version 99; this rtunnel understands version {SCHEMA_VERSION} only "
            "(it was written by a newer rtunnel)",
            str(error),
        )

    def test_concurrent_first_opens(self) -> None:
        """Servers starting at once on an empty database: one creates the schema, all of them work."""
        results = _open_at_once(lambda: StateStore(self.url))
        self.assertEqual(sorted(results, key=repr), sorted([0, None, None], key=repr))


class UpgradeCommandTests(TestCase):
    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main(list(argv), stdout=out, stderr=err, now=NOW)
        return status, out.getvalue(), err.getvalue()

    def test_upgrade_sqlite(self) -> None:
        """The command upgrades the state directory's file, then says it is current."""
        state = Path(self.mktemp())
        state.mkdir(mode=0o700)
        _load(V020, state / "state.sqlite3")
        self.assertEqual(
            self.run_cli("database", "upgrade", "--state", str(state)),
            (0, f"state database {state}/state.sqlite3: upgraded from schema version 1 to {SCHEMA_VERSION}\n", ""),
        )
        self.assertEqual(
            self.run_cli("database", "upgrade", "--state", str(state)),
            (0, f"state database {state}/state.sqlite3: schema version {SCHEMA_VERSION}, already current\n", ""),
        )

    def test_upgrade_sqlite_elsewhere(self) -> None:
        """--database sqlite:PATH names the file; a missing one is an error, not a new database."""
        state = Path(self.mktemp())
        state.mkdir(mode=0o700)
        other = state / "elsewhere.db"
        status, out, err = self.run_cli("database", "upgrade", "--state", str(state), "--database", f"sqlite:{other}")
        self.assertEqual((status, out), (1, ""))
        self.assertIn(f"state database {other} does not exist", err)
        _load(V020, other)
        status, out, err = self.run_cli("database", "upgrade", "--state", str(state), "--database", f"sqlite:{other}")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("upgraded from schema version 1", out)

    def test_missing_state_directory(self) -> None:
        status, out, err = self.run_cli("database", "upgrade", "--state", "/nonexistent/rtunnel")
        self.assertEqual(status, 1)
        self.assertIn("no tunnel server state at /nonexistent/rtunnel", err)

    def test_unknown_database(self) -> None:
        status, out, err = self.run_cli("database", "upgrade", "--state", "/tmp", "--database", "mysql://db/x")
        self.assertEqual(status, 1)
        self.assertIn("not a database this rtunnel knows: use sqlite:PATH or postgresql://", err)

    def test_upgrade_postgresql(self) -> None:
        """An empty PostgreSQL database gets the schema from the command."""
        pg = cluster()
        name = pg.new_database()
        self.addCleanup(pg.drop_database, name)
        state = Path(self.mktemp())
        state.mkdir(mode=0o700)
        status, out, err = self.run_cli("database", "upgrade", "--state", str(state), "--database", pg.url(name))
        self.assertEqual((status, err), (0, ""))
        self.assertIn(f": created at schema version {SCHEMA_VERSION}", out)
        self.assertTrue(out.startswith("state database postgresql://postgres@/"))


class DatabaseOptionTests(TestCase):
    """C{twistd rtunnel-server --database}."""

    def parse(self, *argv: str) -> ServerConfig:
        options = server_tap.Options()
        options.parseOptions(list(argv))
        config: ServerConfig = options.config
        return config

    def test_default_and_given(self) -> None:
        self.assertIsNone(self.parse("--state", "/srv/rtunnel").database)
        url = "postgresql://rtunnel@db.example/rtunnel"
        self.assertEqual(self.parse("--state", "/srv/rtunnel", "--database", url).database, url)
        self.assertEqual(self.parse("--state", "/s", "--database", "sqlite:/d/s.db").database, "sqlite:/d/s.db")

    def test_unknown_database_is_a_usage_error(self) -> None:
        error = self.assertRaises(usage.UsageError, self.parse, "--state", "/s", "--database", "mysql://db/x")
        self.assertIn("not a database this rtunnel knows: use sqlite:PATH or postgresql://", str(error))

    def test_server_state_on_another_sqlite_file(self) -> None:
        """--database sqlite:PATH: the server creates that file and keeps the identity in --state."""
        root = Path(self.mktemp())
        root.mkdir()
        database = root / "elsewhere.sqlite3"
        state = ServerState.load_or_create(root / "server", ["127.0.0.1"], database=f"sqlite:{database}")
        state.store.create_token("alpha", timedelta(hours=1), NOW)
        state.close()
        self.assertEqual(sorted(os.listdir(root / "server")), ["ca.crt", "ca.key", "server.crt", "server.key"])
        again = ServerState.open_existing(root / "server", f"sqlite:{database}")
        self.addCleanup(again.close)
        self.assertEqual([s.name for s in again.store.list_sites()], ["alpha"])
