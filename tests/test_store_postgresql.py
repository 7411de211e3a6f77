"""
The state store's behaviour tests (tests/test_store.py, and the forward
tables' of tests/test_live_forwards.py) once more on PostgreSQL, each test
on a fresh database of a throwaway cluster (L{tests.pg_support}); what only
a shared database needs: the token stays single-use when separate
connections redeem it at the same moment, a dropped connection is replaced;
and the rtunnel command with --database.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import threading
import unittest
from datetime import timedelta
from typing import Any

from rtunnel.address import HostPort
from rtunnel.cli import admin
from rtunnel.identity.errors import EnrollmentRefused, StateError
from rtunnel.identity.keyfile import token_digest
from rtunnel.identity.state import ServerState
from rtunnel.identity.store import StateStore, database_location
from tests import pg_support, test_live_forwards, test_store
from tests.helpers_identity import NOW, TestCase
from tests.pg_support import cluster


class _OnPostgreSQL(test_store._StoreTestCase):
    """Open every store of the test on one fresh PostgreSQL database."""

    def setUp(self) -> None:
        pg = cluster()
        name = pg.new_database()
        self.addCleanup(pg.drop_database, name)
        self.database = name
        self.alive: set[int] = set()
        self.path = pg.url(name)  # type: ignore[assignment]  # what open() passes to StateStore
        self.store = self.open()


# The original class first: its setUp (ConnectionStatusTests has one) calls
# super().setUp(), which reaches _OnPostgreSQL's.


class TokenTests(test_store.TokenTests, _OnPostgreSQL):
    def test_token_is_random_urlsafe_and_stored_hashed(self) -> None:
        """As on SQLite: only the token's SHA-256 reaches the database."""
        first = self.store.create_token("alpha", timedelta(hours=1), NOW)
        second = self.store.create_token("alpha", timedelta(hours=1), NOW)
        self.assertNotEqual(first, second)
        self.assertRegex(first, r"\A[A-Za-z0-9_-]{43}\Z")
        rows = self.store._db.execute("SELECT * FROM tokens").fetchall()
        stored = repr([list(row) for row in rows])
        self.assertIn(token_digest(first), stored)
        self.assertNotIn(first, stored)
        self.assertNotIn(second, stored)


class AdmissionTests(test_store.AdmissionTests, _OnPostgreSQL):
    pass


class SnapshotTests(test_store.SnapshotTests, _OnPostgreSQL):
    pass


class ConnectionStatusTests(test_store.ConnectionStatusTests, _OnPostgreSQL):
    pass


class LookupTests(test_store.LookupTests, _OnPostgreSQL):
    def test_site_does_not_scan_every_site(self) -> None:
        """PostgreSQL plans site(NAME)'s lookups on indexes, not scans, with many sites known."""
        self.enroll(test_store._Site("alpha"))
        self.store._db.execute("INSERT INTO sites (name) SELECT 'site-' || n FROM generate_series(1, 5000) AS n")
        self.store._db.execute(
            "INSERT INTO tokens (digest, site, created_at, expires_at) "
            "SELECT 'd' || n, 'site-' || n, 'x', 'y' FROM generate_series(1, 5000) AS n"
        )
        self.store._db.execute("ANALYZE")
        for query in ("SELECT enrolled_at FROM sites WHERE name = ?", "SELECT 1 FROM tokens WHERE site = ?"):
            plan = " ".join(row[0] for row in self.store._db.execute("EXPLAIN " + query, ("alpha",)).fetchall())
            self.assertNotIn("Seq Scan", plan)
        self.assertIsNotNone(self.store.site("alpha"))


class ChangeTests(_OnPostgreSQL):
    """
    What the revocation poll relies on, with PostgreSQL's admission counter
    in place of SQLite's data_version.
    """

    test_changes_token_sees_other_writers = test_store.ConcurrencyTests.test_changes_token_sees_other_writers
    test_changes_token_sees_own_enrollments_and_revocations = (
        test_store.ConcurrencyTests.test_changes_token_sees_own_enrollments_and_revocations
    )
    test_own_changes_name_their_sites_once = test_store.ConcurrencyTests.test_own_changes_name_their_sites_once
    test_one_token_one_enrollment_across_processes = (
        test_store.ConcurrencyTests.test_one_token_one_enrollment_across_processes
    )
    test_second_open_of_new_file = test_store.ConcurrencyTests.test_second_open_of_new_file

    def test_connection_status_is_no_admission_change(self) -> None:
        """Recording connections (many per second on a busy server) leaves the token alone."""
        self.enroll(test_store._Site())
        before = self.open().changes_token()
        self.store.mark_connected("alpha", "192.0.2.9:40000", NOW)
        self.store.mark_disconnected("alpha", NOW)
        self.assertEqual(self.open().changes_token(), before)


class _TokenRace:
    """
    Two servers sharing the database redeem one token at the same moment:
    exactly one enrolls the site, the other is told the token is spent.
    """

    ROUNDS = 40

    @staticmethod
    def _race(token: str, redeemers: list[tuple[StateStore, test_store._Site]]) -> list[object]:
        """Redeem C{token} through each store at the same moment: each one's certificate or refusal code."""
        barrier = threading.Barrier(len(redeemers))
        outcomes: list[object] = [None] * len(redeemers)

        def redeem(index: int) -> None:
            store, site = redeemers[index]
            barrier.wait(timeout=10)
            try:
                outcomes[index] = store.redeem_token("alpha", token, site.key_fingerprint, site.issue, NOW)
            except EnrollmentRefused as e:
                outcomes[index] = e.code

        threads = [threading.Thread(target=redeem, args=(i,)) for i in range(len(redeemers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        return outcomes

    def test_exactly_one_redemption_wins(self) -> None:
        first, second = self.open(), self.open()
        for round_number in range(self.ROUNDS):
            token = self.store.create_token("alpha", timedelta(hours=1), NOW)
            sites = [test_store._Site(), test_store._Site()]
            outcomes = self._race(token, [(first, sites[0]), (second, sites[1])])
            certificates = [o for o in outcomes if isinstance(o, str) and o.startswith("-----BEGIN")]
            refusals = [o for o in outcomes if o == "token-spent"]
            self.assertEqual((len(certificates), len(refusals)), (1, 1), f"round {round_number}: {outcomes}")
            self.assertEqual(sum(site.issued for site in sites), 1, f"round {round_number}: two certificates issued")
            winner = sites[0] if outcomes[0] is certificates[0] else sites[1]
            record = self.store.site("alpha")
            assert record is not None
            self.assertEqual(
                record.certificate_fingerprint,
                test_store.certs.fingerprint(test_store.certs.load_certificate(certificates[0])),
            )
            self.assertEqual(winner.issued, 1)


class TokenRaceTests(_TokenRace, _OnPostgreSQL):
    pass


class SQLiteTokenRaceTests(_TokenRace, test_store._StoreTestCase):
    """The same race on SQLite (two connections to one file), as a reference."""


class OpenTests(TestCase):
    def test_unreachable_server(self) -> None:
        """A PostgreSQL server that is not there is one clear error naming the database, password masked."""
        pg = cluster()
        url = f"postgresql://rtunnel:secret@127.0.0.1:{pg.port}/nosuchdatabase"
        error = self.assertRaises(StateError, StateStore, url)
        self.assertIn("cannot connect to state database postgresql://rtunnel:***@127.0.0.1", str(error))
        self.assertNotIn("secret", str(error))

    def test_database_location(self) -> None:
        """C{--database}: sqlite:PATH, a PostgreSQL URL, or the file in the state directory."""
        self.assertEqual(database_location(None, "/srv/state"), "/srv/state/state.sqlite3")
        self.assertEqual(database_location("sqlite:/data/s.db", "/srv/state"), "/data/s.db")
        self.assertEqual(database_location("sqlite:rel.db", "/srv/state"), "rel.db")
        url = "postgresql://rtunnel@db.example/rtunnel"
        self.assertEqual(database_location(url, "/srv/state"), url)
        for bad, message in (
            ("mysql://x/y", "not a database this rtunnel knows: use sqlite:PATH or postgresql://"),
            ("sqlite:", "needs a file path"),
            ("sqlite:///x", "write sqlite:PATH"),
            ("/srv/state/state.sqlite3", "not a database this rtunnel knows"),
        ):
            error = self.assertRaises(StateError, database_location, bad, "/srv/state")
            self.assertIn(message, str(error))


class SupportTests(TestCase):
    def test_missing_binaries_say_what_installs_them(self) -> None:
        """Without Debian's PostgreSQL, the tests that need it skip naming the command that fixes it."""
        self.patch(pg_support, "_bin_directory", lambda: None)
        reason = pg_support.missing()
        assert reason is not None
        self.assertIn("make test installs it: apt-get install postgresql", reason)
        error = self.assertRaises(unittest.SkipTest, pg_support.skip_unless_available)
        self.assertEqual(str(error), reason)


class ReconnectTests(_OnPostgreSQL):
    def test_broken_connection_is_replaced(self) -> None:
        """
        When PostgreSQL drops the store's connection, the call that finds it
        broken fails with a StateError, and the next one connects again:
        nothing was written half, and nothing is lost.
        """
        site = test_store._Site()
        self.enroll(site)
        cluster().execute(
            [
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{self.database}' AND pid <> pg_backend_pid()"
            ]
        )
        self.assertRaises(StateError, self.store.create_token, "beta", timedelta(hours=1), NOW)
        token = self.store.create_token("beta", timedelta(hours=1), NOW)
        self.assertEqual([r.name for r in self.store.list_sites()], ["alpha", "beta"])
        self.store.redeem_token("beta", token, site.key_fingerprint, test_store._Site("beta").issue, NOW)
        self.assertEqual(self.open().changes_token()[0], 2)


class ForwardStoreTests(test_live_forwards.StoreTests):
    """The live forwards' tables (issue 11) on PostgreSQL."""

    def setUp(self) -> None:
        pg = cluster()
        name = pg.new_database()
        self.addCleanup(pg.drop_database, name)
        self.path = pg.url(name)
        self.alive = True
        self.store = StateStore(self.path, process_alive=lambda pid: self.alive)
        self.addCleanup(self.store.close)
        self.store.record_server_start(4242, NOW)

    def test_services_are_recorded_and_replaced(self) -> None:
        """What a site announced is stored as JSON, replaced by its next announcement, read by another connection."""
        self.store.record_services("alpha", {"ssh": HostPort.parse("localhost:22")}, NOW)
        self.store.record_services("beta", {}, NOW)
        self.store.record_services("alpha", {"web": HostPort.parse("10.0.0.5:80")}, NOW)
        found = {site: {n: str(t) for n, t in s.items()} for site, s in self.other().site_services().items()}
        self.assertEqual(found, {"alpha": {"web": "10.0.0.5:80"}, "beta": {}})


class AdminCommandTests(TestCase):
    """The rtunnel command with --database, on a server state whose database is PostgreSQL."""

    def setUp(self) -> None:
        pg = cluster()
        name = pg.new_database()
        self.addCleanup(pg.drop_database, name)
        self.url = pg.url(name)
        self.state = os.path.join(self.mktemp(), "server")
        ServerState.load_or_create(self.state, ["127.0.0.1"], database=self.url).close()

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = admin.main([*argv, "--state", self.state, "--database", self.url], stdout=out, stderr=err, now=NOW)
        return status, out.getvalue(), err.getvalue()

    def test_commands_work_on_the_database(self) -> None:
        """keyfile create, sites list and revoke, forwards add and list: all on PostgreSQL, none on a file."""
        self.assertEqual(sorted(os.listdir(self.state)), ["ca.crt", "ca.key", "server.crt", "server.key"])
        keyfile = os.path.join(self.mktemp(), "alpha.rtkey")
        os.makedirs(os.path.dirname(keyfile))
        status, _, err = self.run_cli("keyfile", "create", "--site", "alpha", "--output", keyfile)
        self.assertEqual((status, err), (0, ""))
        status, out, err = self.run_cli("forwards", "add", "8080:alpha:10.0.0.5:80")
        self.assertEqual(status, 0, err)
        status, out, _ = self.run_cli("forwards", "list", "--json")
        self.assertEqual([f["spec"] for f in json.loads(out)], ["127.0.0.1:8080:alpha:10.0.0.5:80"])
        status, out, _ = self.run_cli("sites", "list", "--json")
        [site] = json.loads(out)
        self.assertEqual((site["name"], site["enrolled_at"]), ("alpha", None))
        self.assertEqual(self.run_cli("sites", "revoke", "alpha")[0], 0)
        self.assertTrue(json.loads(self.run_cli("sites", "list", "--json")[1])[0]["revoked_at"])
        self.assertEqual(sorted(os.listdir(self.state)), ["ca.crt", "ca.key", "server.crt", "server.key"])

    def test_without_database_the_file_is_missing(self) -> None:
        """Forgetting --database names what is missing instead of making an empty SQLite state."""
        err = io.StringIO()
        status = admin.main(["sites", "list", "--state", self.state], stdout=io.StringIO(), stderr=err)
        self.assertEqual(status, 1)
        self.assertIn("not a complete tunnel server state directory (state.sqlite3 missing)", err.getvalue())


def _redeem_rounds(url: str, tokens: list[str], barrier: Any, results: Any, index: int) -> None:
    """In a child process: its own connection redeems each token as soon as the other process is ready too."""
    store = StateStore(url)
    try:
        for number, token in enumerate(tokens):
            site = test_store._Site()
            barrier.wait(timeout=30)
            try:
                store.redeem_token("alpha", token, site.key_fingerprint, site.issue, NOW)
                results.put((number, index, "enrolled"))
            except EnrollmentRefused as e:
                results.put((number, index, e.code))
    finally:
        store.close()


class ProcessTokenRaceTests(_OnPostgreSQL):
    """The token race between two processes, as between two servers on one database."""

    ROUNDS = 20

    def test_exactly_one_process_enrolls(self) -> None:
        tokens = [self.store.create_token("alpha", timedelta(hours=1), NOW) for _ in range(self.ROUNDS)]
        context = multiprocessing.get_context("fork")
        barrier = context.Barrier(2)
        results = context.Queue()
        processes = [
            context.Process(target=_redeem_rounds, args=(self.path, tokens, barrier, results, index))
            for index in range(2)
        ]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=60) for _ in range(2 * self.ROUNDS)]
        for process in processes:
            process.join(timeout=30)
            self.assertEqual(process.exitcode, 0)
        for number in range(self.ROUNDS):
            this_round = sorted(outcome for n, _, outcome in outcomes if n == number)
            self.assertEqual(this_round, ["enrolled", "token-spent"], f"round {number}")
        spent = self.store._db.execute("SELECT count(*) FROM tokens WHERE spent_at IS NOT NULL").fetchone()[0]
        self.assertEqual(spent, self.ROUNDS)


class TranslationTests(_OnPostgreSQL):
    def test_percent_and_placeholders(self) -> None:
        """SQL written for SQLite runs as is: a literal % stays one, each ? takes its parameter."""
        row = self.store._db.execute("SELECT 'a%b' AS text, CAST(? AS TEXT) AS p, ? + 1 AS n", ("x%s", 41)).fetchone()
        self.assertEqual((row["text"], row["p"], row["n"]), ("a%b", "x%s", 42))
        self.assertEqual(list(row), ["a%b", "x%s", 42])
