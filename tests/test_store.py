"""
Tests for L{rtunnel.identity.store.StateStore}: tokens, enrollment,
admission, revocation, connection status, concurrency and damage.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from datetime import timedelta
from pathlib import Path

from rtunnel.identity import certs
from rtunnel.identity.errors import (
    EnrollmentRefused,
    SiteNotFound,
    SiteRejected,
    StateError,
)
from rtunnel.identity.keyfile import token_digest
from rtunnel.identity.store import SCHEMA_VERSION, AdmissionSnapshot, SiteAdmission, StateStore, pid_alive
from tests.helpers_identity import NOW, Authority, TestCase, later

_AUTHORITY = Authority.create()


class _Site:
    """
    A site's key and a way to have its certificate issued.
    """

    def __init__(self, name: str = "alpha") -> None:
        self.name = name
        self.key = certs.generate_private_key()
        self.csr = certs.create_csr(self.key, name)
        self.key_fingerprint = certs.public_key_fingerprint(self.key)
        self.issued = 0

    def issue(self) -> str:
        self.issued += 1
        cert = certs.issue_site_certificate(_AUTHORITY.ca_key, _AUTHORITY.ca_certificate, self.csr, self.name)
        return certs.dump_certificate(cert)


class _StoreTestCase(TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        self.path = self.directory / "state.sqlite3"
        self.alive: set[int] = set()
        self.store = self.open()

    def open(self, **kwargs: object) -> StateStore:
        kwargs.setdefault("process_alive", lambda pid: pid in self.alive)
        store = StateStore(self.path, **kwargs)  # type: ignore[arg-type]
        self.addCleanup(store.close)
        return store

    def enroll(self, site: _Site, now: float = 0) -> tuple[str, str]:
        """
        Create a token for C{site} and redeem it; return (token, cert PEM).
        """
        token = self.store.create_token(site.name, timedelta(hours=1), later(now))
        pem = self.store.redeem_token(site.name, token, site.key_fingerprint, site.issue, later(now))
        return token, pem

    def refused(self, code: str, site: _Site, token: str, now: float = 1) -> EnrollmentRefused:
        error = self.assertRaises(
            EnrollmentRefused,
            self.store.redeem_token,
            site.name,
            token,
            site.key_fingerprint,
            site.issue,
            later(now),
        )
        self.assertEqual(error.code, code)
        return error


class TokenTests(_StoreTestCase):
    def test_token_is_random_urlsafe_and_stored_hashed(self) -> None:
        """
        Tokens carry at least 128 random bits in URL-safe characters, differ
        each time, and only their SHA-256 reaches the database.
        """
        first = self.store.create_token("alpha", timedelta(hours=1), NOW)
        second = self.store.create_token("alpha", timedelta(hours=1), NOW)
        self.assertNotEqual(first, second)
        self.assertRegex(first, r"\A[A-Za-z0-9_-]{43}\Z")  # 6 bits each: 258 bits
        self.store.close()
        raw = b"".join(p.read_bytes() for p in self.directory.iterdir())
        self.assertNotIn(first.encode(), raw)
        self.assertIn(token_digest(first).encode(), raw)

    def test_create_token_validates(self) -> None:
        """
        A token needs a valid site name and a positive lifetime.
        """
        self.assertRaises(ValueError, self.store.create_token, "Alpha", timedelta(1), NOW)
        self.assertRaises(ValueError, self.store.create_token, "alpha", timedelta(0), NOW)

    def test_redeem_enrolls_site(self) -> None:
        """
        Redeeming a valid token issues the certificate once, marks the site
        enrolled with that certificate, and admits it.
        """
        site = _Site()
        _, pem = self.enroll(site)
        self.assertEqual(site.issued, 1)
        fp = certs.fingerprint(certs.load_certificate(pem))
        [record] = self.store.list_sites()
        self.assertEqual(record.name, "alpha")
        self.assertEqual(record.enrolled_at, NOW)
        self.assertEqual(record.certificate_fingerprint, fp)
        self.assertIsNone(record.revoked_at)
        self.assertIsNone(record.token_expires)
        self.store.check_site("alpha", fp)

    def test_unknown_token(self) -> None:
        """
        A token the server never issued is refused as token-unknown, without
        issuing anything.
        """
        site = _Site()
        self.refused("token-unknown", site, "B" * 43)
        self.assertEqual(site.issued, 0)

    def test_token_for_another_site(self) -> None:
        """
        A token issued for one site cannot enroll another; the message names
        both.
        """
        token = self.store.create_token("alpha", timedelta(hours=1), NOW)
        error = self.refused("token-wrong-site", _Site("beta"), token)
        self.assertIn("'alpha', not 'beta'", error.message)

    def test_expired_token(self) -> None:
        """
        A token is refused as token-expired from its expiry instant on, and
        accepted just before.
        """
        site = _Site()
        token = self.store.create_token("alpha", timedelta(seconds=60), NOW)
        error = self.refused("token-expired", site, token, now=60)
        self.assertIn("expired at 2030-01-02 03:05:05 UTC", error.message)
        self.store.redeem_token("alpha", token, site.key_fingerprint, site.issue, later(59.9))

    def test_spent_token_with_another_key(self) -> None:
        """
        A spent token refuses any other key as token-spent.
        """
        token, _ = self.enroll(_Site())
        other = _Site()
        error = self.refused("token-spent", other, token)
        self.assertIn("already used", error.message)
        self.assertEqual(other.issued, 0)

    def test_retry_with_same_key_returns_same_certificate(self) -> None:
        """
        After a connection cut during enrollment, retrying with the same key
        returns the stored certificate without issuing a new one, even after
        the token's expiry.
        """
        site = _Site()
        token, pem = self.enroll(site)
        again = self.store.redeem_token("alpha", token, site.key_fingerprint, site.issue, later(7200))
        self.assertEqual(again, pem)
        self.assertEqual(site.issued, 1)

    def test_no_retry_after_reenrollment_or_revocation(self) -> None:
        """
        Once the site enrolled again (or was revoked), a retry with the old
        token is token-spent: an old certificate is never handed out again.
        """
        first = _Site()
        token, _ = self.enroll(first)
        self.enroll(_Site(), now=10)
        self.refused("token-spent", first, token, now=20)

        third = _Site()
        token, _ = self.enroll(third, now=30)
        self.store.revoke_site("alpha", later(40))
        self.refused("token-spent", third, token, now=50)

    def test_failed_issue_leaves_token_unspent(self) -> None:
        """
        If issuing the certificate fails, the whole redemption rolls back: the
        token is still valid and the site not enrolled.
        """
        token = self.store.create_token("alpha", timedelta(hours=1), NOW)

        def broken() -> str:
            raise RuntimeError("signing failed")

        self.assertRaises(RuntimeError, self.store.redeem_token, "alpha", token, "f" * 64, broken, NOW)
        [record] = self.store.list_sites()
        self.assertFalse(record.enrolled)
        site = _Site()
        self.store.redeem_token("alpha", token, site.key_fingerprint, site.issue, NOW)

    def test_withdraw_token(self) -> None:
        """
        A withdrawn token is unknown afterwards.
        """
        token = self.store.create_token("alpha", timedelta(hours=1), NOW)
        self.store.withdraw_token(token)
        self.refused("token-unknown", _Site(), token)


class AdmissionTests(_StoreTestCase):
    def test_unknown_site(self) -> None:
        """
        A site that never enrolled (even with a token outstanding) is
        site-unknown.
        """
        error = self.assertRaises(SiteRejected, self.store.check_site, "alpha", "0" * 64)
        self.assertEqual(error.code, "site-unknown")
        self.store.create_token("alpha", timedelta(hours=1), NOW)
        error = self.assertRaises(SiteRejected, self.store.check_site, "alpha", "0" * 64)
        self.assertEqual(error.code, "site-unknown")

    def test_revoked_site(self) -> None:
        """
        A revoked site is refused as site-revoked with its current certificate.
        """
        _, pem = self.enroll(_Site())
        self.store.revoke_site("alpha", later(5))
        error = self.assertRaises(
            SiteRejected,
            self.store.check_site,
            "alpha",
            certs.fingerprint(certs.load_certificate(pem)),
        )
        self.assertEqual(error.code, "site-revoked")
        self.assertIn("2030-01-02 03:04:10 UTC", error.message)
        self.assertEqual(self.store.revoked_sites(), frozenset({"alpha"}))

    def test_superseded_certificate(self) -> None:
        """
        After a site enrolls again, only the newest certificate is admitted.
        """
        _, old = self.enroll(_Site())
        _, new = self.enroll(_Site(), now=10)
        error = self.assertRaises(
            SiteRejected,
            self.store.check_site,
            "alpha",
            certs.fingerprint(certs.load_certificate(old)),
        )
        self.assertEqual(error.code, "certificate-superseded")
        self.store.check_site("alpha", certs.fingerprint(certs.load_certificate(new)))

    def test_new_keyfile_readmits_revoked_site(self) -> None:
        """
        A token created after the revocation enrolls the site again and
        clears the revocation.
        """
        self.enroll(_Site())
        self.store.revoke_site("alpha", later(5))
        _, pem = self.enroll(_Site(), now=10)
        self.store.check_site("alpha", certs.fingerprint(certs.load_certificate(pem)))
        self.assertEqual(self.store.revoked_sites(), frozenset())

    def test_revocation_withdraws_outstanding_tokens(self) -> None:
        """
        Revoking a site withdraws its unspent tokens (token-revoked), so an
        old keyfile cannot undo the revocation.
        """
        self.enroll(_Site())
        token = self.store.create_token("alpha", timedelta(hours=1), later(1))
        self.store.revoke_site("alpha", later(2))
        error = self.refused("token-revoked", _Site(), token, now=3)
        self.assertIn("withdrawn", error.message)

    def test_revoke_pending_site(self) -> None:
        """
        A site with only a token outstanding can be revoked; it is listed as
        revoked and its token withdrawn.
        """
        token = self.store.create_token("alpha", timedelta(hours=1), NOW)
        record = self.store.revoke_site("alpha", later(1))
        self.assertTrue(record.revoked)
        self.assertFalse(record.enrolled)
        self.refused("token-revoked", _Site(), token, now=2)

    def test_revoke_unknown_site(self) -> None:
        """
        Revoking a site nobody heard of is an error naming it.
        """
        error = self.assertRaises(SiteNotFound, self.store.revoke_site, "ghost", NOW)
        self.assertIn("'ghost'", str(error))

    def test_revoke_twice_keeps_first_time(self) -> None:
        """
        Revocation is idempotent and keeps the original time.
        """
        self.enroll(_Site())
        self.store.revoke_site("alpha", later(5))
        record = self.store.revoke_site("alpha", later(50))
        self.assertEqual(record.revoked_at, later(5))


class SnapshotTests(_StoreTestCase):
    """
    The admission snapshot decides as check_site does, from the table the
    store loads, and follows the changes committed through the store.
    """

    def fingerprints(self, *pems: str) -> list[str]:
        return [certs.fingerprint(certs.load_certificate(pem)) for pem in pems]

    def assert_same_decisions(self, snapshot: AdmissionSnapshot, cases: list[tuple[str, str]]) -> None:
        for site, fp in cases:
            try:
                self.store.check_site(site, fp)
            except SiteRejected as e:
                error = self.assertRaises(SiteRejected, snapshot.check, site, fp)
                self.assertEqual((error.code, error.message), (e.code, e.message))
            else:
                snapshot.check(site, fp)

    def test_snapshot_decides_as_the_database(self) -> None:
        """
        Loaded from admission_table, the snapshot admits and refuses exactly
        what check_site does, with the same codes and messages: enrolled,
        superseded, revoked, only a token, never heard of.
        """
        _, alpha = self.enroll(_Site("alpha"))
        _, old = self.enroll(_Site("beta"))
        _, new = self.enroll(_Site("beta"), now=5)
        _, gamma = self.enroll(_Site("gamma"))
        self.store.revoke_site("gamma", later(7))
        self.store.create_token("delta", timedelta(hours=1), NOW)
        self.store.revoke_site("delta", later(8))  # revoked before it ever enrolled: unknown
        snapshot = AdmissionSnapshot(self.store.admission_table())
        self.assertEqual(len(snapshot), 4)
        [a, b_old, b_new, g] = self.fingerprints(alpha, old, new, gamma)
        cases = [("alpha", a), ("alpha", b_new), ("beta", b_old), ("beta", b_new), ("gamma", g)]
        cases += [("delta", a), ("omega", a)]
        self.assert_same_decisions(snapshot, cases)
        self.assertEqual(self.store.admission("gamma"), snapshot.get("gamma"))
        self.assertIsNone(self.store.admission("omega"))

    def test_listener_follows_own_commits(self) -> None:
        """
        Enrollments and revocations committed through the store are handed
        to its listeners with the site's new admission, after the commit
        (another connection already sees them); a retry that changes
        nothing, and a refused redemption, are not.
        """
        snapshot = AdmissionSnapshot(self.store.admission_table())
        other = self.open()
        seen: list[tuple[str, object]] = []

        def listener(site: str, admission: SiteAdmission | None) -> None:
            seen.append((site, admission))
            self.assertEqual(other.admission(site), admission)  # committed

        self.store.on_admission_change(listener)
        self.store.on_admission_change(snapshot.update)
        site = _Site("alpha")
        token, pem = self.enroll(site)
        [fp] = self.fingerprints(pem)
        self.assertEqual(seen, [("alpha", SiteAdmission(True, fp, None))])
        snapshot.check("alpha", fp)
        self.store.redeem_token("alpha", token, site.key_fingerprint, site.issue, later(1))  # a retry
        self.refused("token-spent", _Site("alpha"), token)
        self.assertEqual(len(seen), 1)
        self.store.revoke_site("alpha", later(2))
        self.assertEqual(seen[-1], ("alpha", SiteAdmission(True, fp, later(2))))
        error = self.assertRaises(SiteRejected, snapshot.check, "alpha", fp)
        self.assertEqual(error.code, "site-revoked")

    def test_snapshot_update_and_replace(self) -> None:
        """update sets or forgets one site; replace takes a whole table."""
        snapshot = AdmissionSnapshot()
        snapshot.update("alpha", SiteAdmission(True, "a" * 64, None))
        snapshot.check("alpha", "a" * 64)
        snapshot.update("alpha", None)
        error = self.assertRaises(SiteRejected, snapshot.check, "alpha", "a" * 64)
        self.assertEqual(error.code, "site-unknown")
        snapshot.replace({"beta": SiteAdmission(True, "b" * 64, None)})
        snapshot.check("beta", "b" * 64)
        self.assertEqual(len(snapshot), 1)

    def test_connection_may_move_to_another_thread(self) -> None:
        """
        The store opened here may be used from another thread afterwards
        (the tunnel server hands it to its database thread), one user at a
        time.
        """
        results: list[object] = []

        def elsewhere() -> None:
            try:
                results.append(self.store.create_token("alpha", timedelta(hours=1), NOW))
            except Exception as e:  # reported below, not lost in the thread
                results.append(e)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join(30)
        [token] = results
        self.assertIsInstance(token, str)
        self.assertIsNotNone(self.store.site("alpha"))


class ConnectionStatusTests(_StoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.enroll(_Site())
        self.alive.add(4242)
        self.store.record_server_start(4242, NOW)

    def test_connected_site_is_listed_with_peer(self) -> None:
        """
        A site marked connected shows as connected with its peer and since
        when, while the recorded server process runs.
        """
        self.store.mark_connected("alpha", "192.0.2.9:40000", later(3))
        [record] = self.store.list_sites()
        self.assertTrue(record.connected)
        self.assertEqual(record.peer, "192.0.2.9:40000")
        self.assertEqual(record.connected_since, later(3))

    def test_dead_server_means_disconnected(self) -> None:
        """
        If the server process that recorded the flags is gone, no site is
        reported connected.
        """
        self.store.mark_connected("alpha", "192.0.2.9:40000", later(3))
        self.alive.clear()
        [record] = self.store.list_sites()
        self.assertFalse(record.connected)

    def test_server_start_clears_stale_flags(self) -> None:
        """
        A new server start clears flags left by a previous run.
        """
        self.store.mark_connected("alpha", "192.0.2.9:40000", later(3))
        self.alive.add(4343)
        self.store.record_server_start(4343, later(10))
        [record] = self.store.list_sites()
        self.assertFalse(record.connected)

    def test_disconnect(self) -> None:
        """
        Marking a site disconnected clears the flag and records when it was
        last seen.
        """
        session = self.store.mark_connected("alpha", "192.0.2.9:40000", later(3))
        self.store.mark_disconnected("alpha", later(9), session)
        [record] = self.store.list_sites()
        self.assertFalse(record.connected)
        self.assertEqual(record.last_seen, later(9))

    def test_disconnect_of_replaced_session_is_ignored(self) -> None:
        """
        When a newer connection of the site took over, the end of the older
        one does not mark the site disconnected.
        """
        old = self.store.mark_connected("alpha", "192.0.2.9:40000", later(3))
        new = self.store.mark_connected("alpha", "192.0.2.9:40001", later(4))
        self.assertNotEqual(old, new)
        self.store.mark_disconnected("alpha", later(5), old)
        [record] = self.store.list_sites()
        self.assertTrue(record.connected)
        self.assertEqual(record.peer, "192.0.2.9:40001")

    def test_server_stop(self) -> None:
        """
        A clean server stop leaves no site connected.
        """
        self.store.mark_connected("alpha", "192.0.2.9:40000", later(3))
        self.store.record_server_stop(later(8))
        [record] = self.store.list_sites()
        self.assertFalse(record.connected)
        self.assertEqual(record.last_seen, later(8))

    def test_mark_connected_unknown_site(self) -> None:
        """
        Marking an unknown site connected is an error.
        """
        self.assertRaises(SiteNotFound, self.store.mark_connected, "ghost", "x:1", NOW)

    def test_pid_alive(self) -> None:
        """
        The real liveness check sees this process and not a reaped child.
        """
        self.assertTrue(pid_alive(os.getpid()))
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        self.assertFalse(pid_alive(pid))
        self.assertFalse(pid_alive(0))


class LookupTests(_StoreTestCase):
    def _steps(self, call) -> int:  # type: ignore[no-untyped-def]
        """SQLite virtual-machine steps (in hundreds) that C{call} costs."""
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        self.store._db.set_progress_handler(count, 100)
        try:
            call()
        finally:
            self.store._db.set_progress_handler(None, 100)
        return steps[0]

    def test_site_matches_list_sites(self) -> None:
        """
        site(NAME) gives the same record as list_sites() for enrolled,
        revoked and pending sites, and None for a name nobody knows.
        """
        self.enroll(_Site("alpha"))
        self.enroll(_Site("beta"))
        self.store.revoke_site("beta", later(1))
        self.store.create_token("gamma", timedelta(hours=1), NOW)
        for record in self.store.list_sites():
            self.assertEqual(self.store.site(record.name), record)
        self.assertIsNone(self.store.site("delta"))

    def test_site_does_not_scan_every_site(self) -> None:
        """
        Looking one site up costs the same with 2,000 known sites as with
        one (`rtunnel keyfile create` used to go through every site).
        """
        self.enroll(_Site("alpha"))
        small = self._steps(lambda: self.store.site("alpha"))
        for index in range(2000):
            self.store.create_token(f"site-{index}", timedelta(hours=1), NOW)
        large = self._steps(lambda: self.store.site("alpha"))
        self.assertLessEqual(large, small + 2)
        self.assertGreater(self._steps(self.store.list_sites), 10 * max(large, 1))


class ConcurrencyTests(_StoreTestCase):
    def test_wal_mode_and_private_file(self) -> None:
        """
        The database is in WAL mode and its file has mode 0600.
        """
        raw = sqlite3.connect(self.path)
        self.addCleanup(raw.close)
        self.assertEqual(raw.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)

    def test_changes_token_sees_other_writers(self) -> None:
        """
        changes_token changes when another connection commits (a CLI
        revocation), and not otherwise.
        """
        self.enroll(_Site())
        before = self.store.changes_token()
        self.store.list_sites()
        self.assertEqual(self.store.changes_token(), before)
        other = self.open()
        other.revoke_site("alpha", later(1))
        self.assertNotEqual(self.store.changes_token(), before)
        self.assertEqual(self.store.revoked_sites(), frozenset({"alpha"}))

    def test_changes_token_sees_own_enrollments_and_revocations(self) -> None:
        """
        Enrollments and revocations committed through this very connection
        (the server enrolls sites through its own) change the token too,
        although SQLite's data_version does not count them; connection
        status updates do not.
        """
        self.enroll(_Site())
        before = self.store.changes_token()
        self.store.mark_connected("alpha", "192.0.2.9:40000", later(1))
        self.assertEqual(self.store.changes_token(), before)
        self.enroll(_Site())  # the same site again: a new certificate
        after_enrollment = self.store.changes_token()
        self.assertNotEqual(after_enrollment, before)
        self.store.revoke_site("alpha", later(2))
        self.assertNotEqual(self.store.changes_token(), after_enrollment)

    def test_own_changes_name_their_sites_once(self) -> None:
        """
        take_own_changes names the sites enrolled or revoked through this
        connection since the last call, each once; other connections'
        changes and connection status updates are not in it.
        """
        self.enroll(_Site("alpha"))
        self.enroll(_Site("beta"))
        self.enroll(_Site("alpha"))
        self.assertEqual(self.store.take_own_changes(), frozenset({"alpha", "beta"}))
        self.assertEqual(self.store.take_own_changes(), frozenset())
        self.store.mark_connected("alpha", "192.0.2.9:40000", later(1))
        self.open().revoke_site("beta", later(2))
        self.assertEqual(self.store.take_own_changes(), frozenset())
        self.store.revoke_site("alpha", later(3))
        self.assertEqual(self.store.take_own_changes(), frozenset({"alpha"}))

    def test_readers_are_not_blocked_by_a_writer(self) -> None:
        """
        While another process holds the write lock, reads proceed and see
        only committed data.
        """
        self.enroll(_Site())
        raw = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(raw.close)
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("UPDATE sites SET revoked_at = '2030-01-01T00:00:00+00:00'")
        self.assertEqual(self.store.revoked_sites(), frozenset())
        raw.execute("ROLLBACK")

    def test_locked_writer_fails_cleanly(self) -> None:
        """
        A write that cannot get the lock within the busy timeout raises
        StateError saying the database is locked.
        """
        store = self.open(busy_timeout=0)
        raw = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(raw.close)
        raw.execute("BEGIN IMMEDIATE")
        error = self.assertRaises(StateError, store.create_token, "alpha", timedelta(hours=1), NOW)
        self.assertIn("locked", str(error))
        raw.execute("ROLLBACK")
        store.create_token("alpha", timedelta(hours=1), NOW)

    def test_one_token_one_enrollment_across_processes(self) -> None:
        """
        Two stores on one file: once one redeemed a token, the other sees it
        spent.
        """
        token = self.store.create_token("alpha", timedelta(hours=1), NOW)
        other = self.open()
        first, second = _Site(), _Site()
        other.redeem_token("alpha", token, first.key_fingerprint, first.issue, NOW)
        self.refused("token-spent", second, token)

    def test_second_open_of_new_file(self) -> None:
        """
        Opening a freshly created database again finds the schema in place.
        """
        other = self.open()
        self.assertEqual(other.get_meta("schema_version"), str(SCHEMA_VERSION))


class DamageTests(TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        self.path = self.directory / "state.sqlite3"

    def assertRefused(self, pattern: str, **kwargs: object) -> None:
        before = self.path.read_bytes() if self.path.is_file() else None
        error = self.assertRaises(StateError, StateStore, self.path, **kwargs)
        self.assertRegex(str(error), pattern)
        if before is not None:
            self.assertEqual(self.path.read_bytes(), before)

    def test_not_sqlite(self) -> None:
        """
        A file that is not SQLite is refused, not replaced.
        """
        self.path.write_bytes(b"this is not a database" * 100)
        self.assertRefused(r"not a usable rtunnel state database \(file is not a database\)")

    def test_foreign_sqlite_database(self) -> None:
        """
        An SQLite database of something else is refused.
        """
        raw = sqlite3.connect(self.path)
        raw.execute("CREATE TABLE songs (title TEXT)")
        raw.commit()
        raw.close()
        self.assertRefused("not an rtunnel state database")

    def test_newer_schema(self) -> None:
        """
        A database with another schema version is refused with both versions
        named.
        """
        StateStore(self.path).close()
        raw = sqlite3.connect(self.path)
        raw.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
        raw.commit()
        raw.close()
        self.assertRefused(
            rf"schema version {SCHEMA_VERSION + 1}; this rtunnel understands version {SCHEMA_VERSION} only .*newer"
        )

    def test_missing_table(self) -> None:
        """
        A database missing one of its tables is reported damaged.
        """
        StateStore(self.path).close()
        raw = sqlite3.connect(self.path)
        raw.execute("DROP TABLE tokens")
        raw.commit()
        raw.close()
        self.assertRefused(r"damaged: table\(s\) tokens missing")

    def test_missing_without_create(self) -> None:
        """
        Without create, a missing file is an error and is not created.
        """
        self.assertRefused("does not exist", create=False)
        self.assertFalse(self.path.exists())

    def test_empty_without_create(self) -> None:
        """
        Without create, an empty file is not initialized.
        """
        self.path.write_bytes(b"")
        self.assertRefused("is empty", create=False)

    def test_directory(self) -> None:
        """
        A directory in place of the database is refused.
        """
        self.path.mkdir()
        self.assertRefused("is a directory")

    def test_schema_version_is_protected(self) -> None:
        """
        Callers cannot overwrite the schema version through set_meta.
        """
        store = StateStore(self.path)
        self.addCleanup(store.close)
        self.assertRaises(ValueError, store.set_meta, "schema_version", "9")
