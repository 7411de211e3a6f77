"""
The tunnel server's state database: enrollment tokens, enrolled sites,
revocations and live connection status.

It is a plain SQLite file in WAL mode so that the tunnel server and the admin
CLI can use it at the same time: the CLI creates tokens and revokes sites
while the server redeems tokens, checks sites and records connections.  Every
write is one short C{BEGIN IMMEDIATE} transaction, which takes the write lock
up front: two writers queue on the busy timeout instead of deadlocking on a
lock upgrade.

Calls block.  Each is a handful of indexed row operations on a local file
(well under a millisecond), but a competing writer holding the lock makes a
call wait up to the busy timeout (5 s), and a slow disk makes any call wait:
so the tunnel server never calls the store from its reactor while it runs.
It admits sites from an L{AdmissionSnapshot} in memory, and does everything
else in one database thread (L{rtunnel.roles.server.StateThread}).

Tokens are stored only as their SHA-256 digest, so a copy of the database
does not let anyone enroll a site.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from attrs import frozen

from rtunnel.address import HostPort
from rtunnel.identity.certs import fingerprint, load_certificate, validate_site_name
from rtunnel.identity.errors import (
    CERTIFICATE_SUPERSEDED,
    SITE_REVOKED,
    SITE_UNKNOWN,
    TOKEN_EXPIRED,
    TOKEN_REVOKED,
    TOKEN_SPENT,
    TOKEN_UNKNOWN,
    TOKEN_WRONG_SITE,
    EnrollmentRefused,
    SiteNotFound,
    SiteRejected,
    StateError,
)
from rtunnel.identity.keyfile import token_digest

__all__ = [
    "SCHEMA_VERSION",
    "AdmissionSnapshot",
    "ForwardConflict",
    "ForwardRecord",
    "ForwardState",
    "SiteAdmission",
    "SiteRecord",
    "StateStore",
    "check_admission",
    "pid_alive",
]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE sites (
    name TEXT PRIMARY KEY,
    enrolled_at TEXT,
    certificate_fingerprint TEXT,
    certificate_pem TEXT,
    revoked_at TEXT,
    connected INTEGER NOT NULL DEFAULT 0,
    session INTEGER NOT NULL DEFAULT 0,
    peer TEXT,
    connected_since TEXT,
    last_seen TEXT
);
CREATE TABLE tokens (
    digest TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    spent_at TEXT,
    key_fingerprint TEXT,
    certificate_fingerprint TEXT,
    certificate_pem TEXT,
    withdrawn_at TEXT
);
CREATE INDEX tokens_by_site ON tokens (site);
"""
_TABLES = {"meta", "sites", "tokens"}


def pid_alive(pid: int) -> bool:
    """
    Tell whether a process with this id exists (it may belong to another
    user).
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _ts(when: datetime) -> str:
    if when.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(text: str | None) -> datetime | None:
    if text is None:
        return None
    return datetime.fromisoformat(text).astimezone(UTC)


def _human(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@frozen
class SiteRecord:
    """
    What the state store knows about one site.

    A site appears once a token was created for it; C{enrolled_at} stays
    C{None} until a token is redeemed.

    @ivar connected: whether a tunnel from this site is up now, as recorded
        by a tunnel server that is still running.
    @ivar peer: the site's address (C{host:port}) on its current or last
        connection.
    @ivar token_expires: expiry of the newest outstanding (unspent, not
        withdrawn) token, or C{None}.
    """

    name: str
    enrolled_at: datetime | None
    revoked_at: datetime | None
    connected: bool
    peer: str | None
    connected_since: datetime | None
    last_seen: datetime | None = None
    certificate_fingerprint: str | None = None
    token_expires: datetime | None = None

    @property
    def enrolled(self) -> bool:
        return self.enrolled_at is not None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@frozen
class SiteAdmission:
    """
    What decides whether a site may connect: three columns of its row.

    @ivar enrolled: whether a token was ever redeemed for the site.
    @ivar certificate_fingerprint: the fingerprint of its newest certificate;
        only that one is admitted.
    @ivar revoked_at: when it was revoked, or C{None}.
    """

    enrolled: bool
    certificate_fingerprint: str | None
    revoked_at: datetime | None


def check_admission(site: str, certificate_fingerprint: str, admission: SiteAdmission | None) -> None:
    """
    Decide whether a site presenting a certificate with this fingerprint
    (already verified against our CA) may connect, given what the state
    database says of it (C{None}: nothing).

    @raise SiteRejected: C{site-unknown} if the site never enrolled,
        C{site-revoked}, or C{certificate-superseded} if the site has
        enrolled again since this certificate was issued.
    """
    if admission is None or not admission.enrolled:
        raise SiteRejected(SITE_UNKNOWN, f"site {site!r} is not enrolled")
    if admission.revoked_at is not None:
        raise SiteRejected(SITE_REVOKED, f"site {site!r} was revoked at {_human(admission.revoked_at)}")
    if admission.certificate_fingerprint != certificate_fingerprint:
        raise SiteRejected(
            CERTIFICATE_SUPERSEDED,
            f"site {site!r} has enrolled again since this certificate was "
            "issued; only its newest certificate is accepted",
        )


class AdmissionSnapshot:
    """
    Every site's L{SiteAdmission}, in memory: what the tunnel server admits
    sites from, at the TLS handshake and again at HELLO.

    Why not ask the database each time: a connection would then wait for
    the file, on the reactor, and with it every tunnel; a CLI holding the
    write lock or a slow disk stalled them all. The snapshot is loaded once
    at start, replaced by the revocation poll when another process changed
    the database, and updated at once for the changes the server commits
    itself (L{StateStore.on_admission_change}): a site the server just
    enrolled is admitted on its very next connection.

    Costs about 250 bytes per known site. Knows no reactor and no thread:
    its owner updates it from one thread (the tunnel server's reactor).
    """

    def __init__(self, table: Mapping[str, SiteAdmission] | None = None) -> None:
        self._sites: dict[str, SiteAdmission] = dict(table or {})

    def check(self, site: str, certificate_fingerprint: str) -> None:
        """
        As L{StateStore.check_site}, from memory.

        @raise SiteRejected: see L{check_admission}.
        """
        check_admission(site, certificate_fingerprint, self._sites.get(site))

    def get(self, site: str) -> SiteAdmission | None:
        return self._sites.get(site)

    def replace(self, table: Mapping[str, SiteAdmission]) -> None:
        """Take a whole new table (L{StateStore.admission_table})."""
        self._sites = dict(table)

    def update(self, site: str, admission: SiteAdmission | None) -> None:
        """Take one site's new row (C{None}: the site is not known)."""
        if admission is None:
            self._sites.pop(site, None)
        else:
            self._sites[site] = admission

    def __len__(self) -> int:
        return len(self._sites)

    def __iter__(self) -> Iterator[str]:
        """The names of every site in the table (admitted or not: see L{get})."""
        return iter(list(self._sites))


class StateStore:
    """
    The SQLite state database of one tunnel server.

    One instance owns one connection; use it from one thread at a time.
    Open as many instances (in as many processes) as needed on the same
    file.

    The connection is opened with C{check_same_thread=False}: the tunnel
    server loads its state (and this store) at build time, in the thread
    that builds the service, and from its start on uses the store only in
    its one database thread; Python's check would refuse that hand-over.
    One user at a time is all SQLite needs here (the module is built
    serialized, C{sqlite3.threadsafety} 3, and a transaction is begun and
    ended by the same call).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        busy_timeout: float = 5.0,
        process_alive: Callable[[int], bool] = pid_alive,
    ) -> None:
        """
        Open (and with C{create}, create and initialize) a state database.

        @param create: whether a missing or empty file may be initialized.
        @param busy_timeout: seconds to wait for another process's write
            transaction before failing.
        @param process_alive: tells whether a process id is running; used to
            ignore the connection flags of a tunnel server that died.

        @raise StateError: if the file is missing (without C{create}), not
            SQLite, not an rtunnel database, or of another schema version.
        """
        self.path = os.fspath(path)
        self._process_alive = process_alive
        #: admission changes committed through this connection (enrollments,
        #: revocations), which SQLite's data_version does not count, and the
        #: sites they concern (until L{take_own_changes})
        self._own_changes = 0
        self._own_changed_sites: set[str] = set()
        #: told of every admission change committed through this connection
        self._admission_listeners: list[Callable[[str, SiteAdmission | None], None]] = []
        p = Path(self.path)
        if p.is_dir():
            raise StateError(f"state database {self.path} is a directory")
        if not p.exists():
            if not create:
                raise StateError(f"state database {self.path} does not exist")
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            except OSError as e:
                raise StateError(f"cannot create state database {self.path}: {e.strerror}") from None
        elif not os.access(self.path, os.R_OK | os.W_OK):
            raise StateError(
                f"cannot open state database {self.path}: permission denied "
                "(it must be readable and writable by this user)"
            )
        uri = p.absolute().as_uri() + "?mode=rw"
        try:
            self._db = sqlite3.connect(
                uri, uri=True, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise StateError(f"cannot open state database {self.path}: {e}") from None
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            # Check before switching to WAL: that switch writes to the file,
            # and a file that is not ours must be left exactly as it was.
            self._check_schema(create)
            self._db.execute("PRAGMA journal_mode = WAL").fetchone()
            self._db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise StateError(f"{self.path} is not a usable rtunnel state database ({e})") from None
        except BaseException:
            self._db.close()
            raise

    # -- plumbing ---------------------------------------------------------

    def _check_schema(self, create: bool) -> None:
        tables = self._tables()
        if not tables:
            if not create:
                raise StateError(f"state database {self.path} is empty")
            self._db.execute("PRAGMA journal_mode = WAL").fetchone()
            with self._transaction() as db:
                # Another process may have initialized it while we waited
                # for the write lock.
                if not self._tables():
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),),
                    )
            tables = self._tables()
        if "meta" not in tables:
            raise StateError(
                f"{self.path} is an SQLite database but not an rtunnel state database (it has no meta table)"
            )
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise StateError(f"{self.path} has no schema version: not an rtunnel state database")
        version = str(row[0])
        if version != str(SCHEMA_VERSION):
            newer = version.isdigit() and int(version) > SCHEMA_VERSION
            raise StateError(
                f"{self.path} has schema version {version}; this rtunnel understands "
                f"version {SCHEMA_VERSION} only" + (" (it was written by a newer rtunnel)" if newer else "")
            )
        missing = _TABLES - tables
        if missing:
            raise StateError(f"{self.path} is damaged: table(s) {', '.join(sorted(missing))} missing")
        self._ensure_forward_tables(tables)
        self._ensure_service_table(tables)

    def _tables(self) -> set[str]:
        rows = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {r[0] for r in rows}

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """
        Run a write transaction, taking the write lock first.
        """
        with self._guard():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """
        Turn SQLite failures (a locked or damaged file) into L{StateError}.
        """
        try:
            yield
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise StateError(f"state database {self.path} is locked by another process ({e})") from None
            raise StateError(f"state database {self.path}: {e}") from None
        except sqlite3.Error as e:
            raise StateError(f"state database {self.path}: {e}") from None

    def close(self) -> None:
        """
        Close the database connection.
        """
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- metadata ---------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """
        Return a value of the C{meta} table, or C{None}.
        """
        with self._guard():
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """
        Set a value of the C{meta} table.
        """
        if key == "schema_version":
            raise ValueError("the schema version is not set by callers")
        with self._transaction() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def public_addresses(self) -> list[str]:
        """
        The host names the tunnel server was last started with (see
        L{record_public_addresses}).
        """
        value = self.get_meta("public_addresses")
        return [] if not value else value.split()

    def record_public_addresses(self, hosts: Sequence[str]) -> None:
        """
        Remember the server's public host names, so that the admin CLI can
        default keyfile addresses to them.
        """
        self.set_meta("public_addresses", " ".join(hosts))

    # -- tokens and enrollment -------------------------------------------

    def create_token(self, site: str, ttl: timedelta, now: datetime) -> str:
        """
        Create a one-time enrollment token for C{site}, valid for C{ttl}.

        @return: the token: 256 random bits, URL-safe base64 (43
            characters).  Only its SHA-256 is stored.
        """
        validate_site_name(site)
        if ttl <= timedelta(0):
            raise ValueError("token lifetime must be positive")
        token = secrets.token_urlsafe(32)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO tokens (digest, site, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (token_digest(token), site, _ts(now), _ts(now + ttl)),
            )
        return token

    def withdraw_token(self, token: str) -> None:
        """
        Forget an unspent token (used when its keyfile could not be
        written).
        """
        with self._transaction() as db:
            db.execute(
                "DELETE FROM tokens WHERE digest = ? AND spent_at IS NULL",
                (token_digest(token),),
            )

    def redeem_token(
        self,
        site: str,
        token: str,
        public_key_fingerprint: str,
        issue: Callable[[], str],
        now: datetime,
    ) -> str:
        """
        Spend an enrollment token and record the site's new certificate, in
        one transaction.

        The token must be known, issued for C{site}, not withdrawn, not
        expired and not spent.  Then C{issue()} is called for the certificate
        PEM; the token is marked spent (recording the key fingerprint), and
        the site recorded as enrolled with that certificate, which replaces
        any earlier certificate of the site and clears a revocation.

        A retry with the same public key after the token was spent returns
        the stored certificate again, as long as it is still the site's
        current, unrevoked certificate: a site whose connection was cut
        during enrollment can simply retry.

        @raise EnrollmentRefused: with code C{token-unknown},
            C{token-wrong-site}, C{token-spent}, C{token-revoked} or
            C{token-expired}.
        """
        digest = token_digest(token)
        certificate_pem, admission = self._redeem(site, digest, public_key_fingerprint, issue, now)
        if admission is not None:
            self._admission_changed(site, admission)
        return certificate_pem

    def _redeem(
        self,
        site: str,
        digest: str,
        public_key_fingerprint: str,
        issue: Callable[[], str],
        now: datetime,
    ) -> tuple[str, SiteAdmission | None]:
        """
        L{redeem_token}'s transaction: the certificate, and the site's new
        admission if this call changed it.
        """
        with self._transaction() as db:
            row = db.execute("SELECT * FROM tokens WHERE digest = ?", (digest,)).fetchone()
            if row is None:
                raise EnrollmentRefused(
                    TOKEN_UNKNOWN,
                    "the tunnel server does not know this enrollment token (is the keyfile from another server?)",
                )
            if row["site"] != site:
                raise EnrollmentRefused(
                    TOKEN_WRONG_SITE,
                    f"this token was issued for site {row['site']!r}, not {site!r}",
                )
            if row["spent_at"] is not None:
                current = db.execute(
                    "SELECT certificate_fingerprint, revoked_at FROM sites WHERE name = ?",
                    (site,),
                ).fetchone()
                if (
                    row["key_fingerprint"] == public_key_fingerprint
                    and current is not None
                    and current["revoked_at"] is None
                    and current["certificate_fingerprint"] == row["certificate_fingerprint"]
                ):
                    return str(row["certificate_pem"]), None
                spent = _dt(row["spent_at"])
                assert spent is not None
                raise EnrollmentRefused(
                    TOKEN_SPENT,
                    f"this token was already used at {_human(spent)} to enroll site {site!r}; create a new keyfile",
                )
            if row["withdrawn_at"] is not None:
                withdrawn = _dt(row["withdrawn_at"])
                assert withdrawn is not None
                raise EnrollmentRefused(
                    TOKEN_REVOKED,
                    f"this token was withdrawn at {_human(withdrawn)} when site "
                    f"{site!r} was revoked; create a new keyfile",
                )
            expires = _dt(row["expires_at"])
            assert expires is not None
            if now >= expires:
                raise EnrollmentRefused(
                    TOKEN_EXPIRED,
                    f"this token expired at {_human(expires)}; create a new keyfile",
                )
            certificate_pem = issue()
            cert_fp = fingerprint(load_certificate(certificate_pem))
            stamp = _ts(now)
            db.execute(
                "UPDATE tokens SET spent_at = ?, key_fingerprint = ?, "
                "certificate_fingerprint = ?, certificate_pem = ? WHERE digest = ?",
                (stamp, public_key_fingerprint, cert_fp, certificate_pem, digest),
            )
            db.execute(
                "INSERT INTO sites (name, enrolled_at, certificate_fingerprint, "
                "certificate_pem) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET enrolled_at = excluded.enrolled_at, "
                "certificate_fingerprint = excluded.certificate_fingerprint, "
                "certificate_pem = excluded.certificate_pem, revoked_at = NULL",
                (site, stamp, cert_fp, certificate_pem),
            )
            self._own_changes += 1
            self._own_changed_sites.add(site)
            return certificate_pem, SiteAdmission(enrolled=True, certificate_fingerprint=cert_fp, revoked_at=None)

    # -- admission --------------------------------------------------------

    def check_site(self, site: str, certificate_fingerprint: str) -> None:
        """
        Decide whether a site presenting a certificate with this fingerprint
        (already verified against our CA) may connect now, from the
        database (the running server decides from its L{AdmissionSnapshot}).

        @raise SiteRejected: see L{check_admission}.
        """
        check_admission(site, certificate_fingerprint, self.admission(site))

    def admission(self, site: str) -> SiteAdmission | None:
        """
        What decides whether C{site} may connect (C{None}: no such row).
        One indexed lookup.
        """
        with self._guard():
            row = self._db.execute(
                "SELECT enrolled_at, certificate_fingerprint, revoked_at FROM sites WHERE name = ?",
                (site,),
            ).fetchone()
        return None if row is None else self._admission(row)

    def admission_table(self) -> dict[str, SiteAdmission]:
        """
        The L{SiteAdmission} of every site with a row, for an
        L{AdmissionSnapshot}: one scan of the sites table.
        """
        with self._guard():
            rows = self._db.execute(
                "SELECT name, enrolled_at, certificate_fingerprint, revoked_at FROM sites"
            ).fetchall()
        return {row["name"]: self._admission(row) for row in rows}

    @staticmethod
    def _admission(row: sqlite3.Row) -> SiteAdmission:
        return SiteAdmission(
            enrolled=row["enrolled_at"] is not None,
            certificate_fingerprint=row["certificate_fingerprint"],
            revoked_at=_dt(row["revoked_at"]),
        )

    def on_admission_change(self, listener: Callable[[str, SiteAdmission | None], None]) -> None:
        """
        Call C{listener(site, admission)} after every commit through this
        connection that changed whether C{site} may connect (an enrollment,
        a revocation), in the thread that committed, before the committing
        call returns.

        The tunnel server keeps its L{AdmissionSnapshot} current this way
        for its own enrollments, without waiting for a poll; changes by
        other processes reach it through L{changes_token}.
        """
        self._admission_listeners.append(listener)

    def _admission_changed(self, site: str, admission: SiteAdmission | None) -> None:
        for listener in self._admission_listeners:
            listener(site, admission)

    def revoke_site(self, name: str, now: datetime) -> SiteRecord:
        """
        Revoke a site: its certificate is refused from now on, and its
        outstanding tokens are withdrawn.  Revoking twice keeps the first
        revocation time.  Only a keyfile created after this re-admits it.

        @return: the site's record after revocation.
        @raise SiteNotFound: if no site of that name is known.
        """
        with self._transaction() as db:
            row = db.execute("SELECT revoked_at FROM sites WHERE name = ?", (name,)).fetchone()
            has_tokens = db.execute("SELECT 1 FROM tokens WHERE site = ? LIMIT 1", (name,)).fetchone()
            if row is None and has_tokens is None:
                raise SiteNotFound(f"no site named {name!r} is known to this server")
            stamp = _ts(now)
            db.execute(
                "UPDATE tokens SET withdrawn_at = ? WHERE site = ? AND spent_at IS NULL AND withdrawn_at IS NULL",
                (stamp, name),
            )
            if row is None:
                db.execute("INSERT INTO sites (name, revoked_at) VALUES (?, ?)", (name, stamp))
            elif row["revoked_at"] is None:
                db.execute("UPDATE sites SET revoked_at = ? WHERE name = ?", (stamp, name))
            self._own_changes += 1
            self._own_changed_sites.add(name)
        self._admission_changed(name, self.admission(name))
        record = self.site(name)
        assert record is not None
        return record

    def revoked_sites(self) -> frozenset[str]:
        """
        The names of all revoked sites.
        """
        with self._guard():
            rows = self._db.execute("SELECT name FROM sites WHERE revoked_at IS NOT NULL").fetchall()
        return frozenset(r[0] for r in rows)

    def changes_token(self) -> tuple[int, int]:
        """
        A value that changes whenever admission may have changed: another
        connection (the CLI, another process) committed anything, or this
        one enrolled or revoked a site. Cheap enough to poll every second
        before re-checking the live sessions.

        SQLite's C{data_version} alone does not change for commits made
        through the same connection, and the server enrolls sites through
        its own: a re-enrollment would then leave the superseded
        certificate's session alive.
        """
        with self._guard():
            return int(self._db.execute("PRAGMA data_version").fetchone()[0]), self._own_changes

    def take_own_changes(self) -> frozenset[str]:
        """
        The sites enrolled or revoked through this connection since the last
        call (the changes L{changes_token} counts in its second part).

        A poller that sees only its own changes re-checks just these sites
        instead of every live one: during an enrollment wave through the
        server's own connection, each poll would otherwise re-check all of
        them.
        """
        changed, self._own_changed_sites = frozenset(self._own_changed_sites), set()
        return changed

    # -- connection status ------------------------------------------------

    def record_server_start(self, pid: int, now: datetime) -> None:
        """
        Record that a tunnel server (process C{pid}) started and owns the
        connection flags; flags left by an earlier run are cleared.
        """
        with self._transaction() as db:
            for key, value in (("server_pid", str(pid)), ("server_started_at", _ts(now))):
                db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
            db.execute("UPDATE sites SET connected = 0 WHERE connected != 0")

    def record_server_stop(self, now: datetime) -> None:
        """
        Record a clean shutdown of the tunnel server: no site is connected.
        """
        with self._transaction() as db:
            db.execute("DELETE FROM meta WHERE key = 'server_pid'")
            db.execute(
                "UPDATE sites SET connected = 0, last_seen = ? WHERE connected != 0",
                (_ts(now),),
            )

    def mark_connected(self, site: str, peer: str, now: datetime) -> int:
        """
        Record that C{site} is connected from C{peer} since C{now}.

        @return: a session number; pass it to L{mark_disconnected} so that
            the end of a connection that was taken over by a newer one does
            not mark the newer one disconnected.
        @raise SiteNotFound: if the site is not known.
        """
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE sites SET connected = 1, session = session + 1, peer = ?, "
                "connected_since = ?, last_seen = ? WHERE name = ?",
                (peer, _ts(now), _ts(now), site),
            )
            if cursor.rowcount != 1:
                raise SiteNotFound(f"no site named {site!r} is known to this server")
            row = db.execute("SELECT session FROM sites WHERE name = ?", (site,)).fetchone()
            return int(row[0])

    def mark_disconnected(self, site: str, now: datetime, session: int | None = None) -> None:
        """
        Record that C{site} disconnected at C{now}.

        @param session: the number L{mark_connected} returned; if the site has
            connected again since (a newer session), nothing changes.
        """
        with self._transaction() as db:
            db.execute(
                "UPDATE sites SET connected = 0, last_seen = ? WHERE name = ? AND (? IS NULL OR session = ?)",
                (_ts(now), site, session, session),
            )

    # -- listing ----------------------------------------------------------

    def _server_alive(self) -> bool:
        pid = self.get_meta("server_pid")
        return pid is not None and pid.isdigit() and self._process_alive(int(pid))

    def list_sites(self) -> list[SiteRecord]:
        """
        All known sites (enrolled, revoked, or with a token outstanding),
        sorted by name.  C{connected} is C{False} for every site if the
        recorded tunnel server process is not running.
        """
        alive = self._server_alive()
        with self._guard():
            rows = self._db.execute(
                """
                SELECT n.name AS name, s.enrolled_at, s.revoked_at, s.connected,
                       s.peer, s.connected_since, s.last_seen,
                       s.certificate_fingerprint,
                       (SELECT max(t.expires_at) FROM tokens t WHERE t.site = n.name
                          AND t.spent_at IS NULL AND t.withdrawn_at IS NULL)
                         AS token_expires
                FROM (SELECT name FROM sites UNION SELECT site FROM tokens) n
                LEFT JOIN sites s ON s.name = n.name
                ORDER BY n.name
                """
            ).fetchall()
        return [self._record(r, alive) for r in rows]

    def site(self, name: str) -> SiteRecord | None:
        """
        The record of one site, or C{None} if it is not known. One indexed
        lookup, whatever the number of sites.
        """
        alive = self._server_alive()
        with self._guard():
            row = self._db.execute(
                """
                SELECT ? AS name, s.enrolled_at, s.revoked_at, s.connected,
                       s.peer, s.connected_since, s.last_seen,
                       s.certificate_fingerprint,
                       (SELECT max(t.expires_at) FROM tokens t WHERE t.site = ?
                          AND t.spent_at IS NULL AND t.withdrawn_at IS NULL)
                         AS token_expires,
                       s.name IS NOT NULL
                         OR EXISTS (SELECT 1 FROM tokens t WHERE t.site = ?) AS known
                FROM (SELECT 1) LEFT JOIN sites s ON s.name = ?
                """,
                (name, name, name, name),
            ).fetchone()
        if row is None or not row["known"]:
            return None
        return self._record(row, alive)

    @staticmethod
    def _record(row: sqlite3.Row, alive: bool) -> SiteRecord:
        return SiteRecord(
            name=row["name"],
            enrolled_at=_dt(row["enrolled_at"]),
            revoked_at=_dt(row["revoked_at"]),
            connected=bool(alive and row["connected"]),
            peer=row["peer"],
            connected_since=_dt(row["connected_since"]),
            last_seen=_dt(row["last_seen"]),
            certificate_fingerprint=row["certificate_fingerprint"],
            token_expires=_dt(row["token_expires"]),
        )

    # -- named services (issue 11) ----------------------------------------

    def _ensure_service_table(self, tables: set[str]) -> None:
        """Create C{site_services} in a database made before it existed."""
        if "site_services" in tables:
            return
        with self._transaction() as db:
            db.execute(_SERVICE_SCHEMA)

    def record_services(self, site: str, services: Mapping[str, HostPort], now: datetime) -> None:
        """
        Record the named services C{site} announced (replacing what it
        announced before), for C{rtunnel sites list} and the server's next
        start.
        """
        text = json.dumps({name: str(target) for name, target in sorted(services.items())})
        with self._transaction() as db:
            db.execute(
                "INSERT INTO site_services (site, services, announced_at) VALUES (?, ?, ?) "
                "ON CONFLICT (site) DO UPDATE SET services = excluded.services, announced_at = excluded.announced_at",
                (site, text, _ts(now)),
            )

    def site_services(self) -> dict[str, dict[str, HostPort]]:
        """What each site last announced ({} for a site that announced none);
        sites that never announced are absent. Unreadable entries are skipped."""
        found: dict[str, dict[str, HostPort]] = {}
        for site, text in self._db.execute("SELECT site, services FROM site_services").fetchall():
            try:
                found[site] = {name: HostPort.parse(target) for name, target in json.loads(text).items()}
            except (ValueError, AttributeError):
                continue
        return found

    # -- live forwards (issue 11) -----------------------------------------

    def _ensure_forward_tables(self, tables: set[str]) -> None:
        """
        Create the forward tables in a database made before they existed; a
        no-op (no write) when they are there.
        """
        if {"forwards", "forward_states"} <= tables:
            return
        with self._transaction() as db:
            for statement in _FORWARD_SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def add_forward(self, record: ForwardRecord, now: datetime) -> ForwardRecord:
        """
        Store a forward for the tunnel server to listen on.

        @raise ForwardConflict: if a stored forward, or the running server's
            command-line forward, is on the same BIND:PORT already.
        """
        alive = self._server_alive()
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM forwards WHERE bind = ? AND port = ? AND removed = 0", record.key
            ).fetchone()
            if row is not None:
                existing = _forward_record(row)
                raise ForwardConflict(
                    f"a forward on {_join(record.bind, record.port)} is stored already: {existing.spec} "
                    f"(remove it first with 'rtunnel forwards remove {_join(record.bind, record.port)}')"
                )
            if alive:
                theirs = db.execute(
                    "SELECT * FROM forward_states WHERE bind = ? AND port = ? AND source = ?",
                    (*record.key, SOURCE_COMMAND_LINE),
                ).fetchone()
                if theirs is not None:
                    other = forward_spec_text(
                        theirs["bind"], theirs["port"], theirs["site"], theirs["host"], theirs["hostport"]
                    )
                    raise ForwardConflict(
                        f"forward {record.spec} conflicts with the running server's command-line forward "
                        f"--forward {other}: both are on {_join(record.bind, record.port)}"
                    )
            db.execute(
                "INSERT INTO forwards (bind, port, site, host, hostport, added_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (bind, port) DO UPDATE SET site = excluded.site, host = excluded.host, "
                "hostport = excluded.hostport, added_at = excluded.added_at, removed = 0, cut = 0",
                (record.bind, record.port, record.site, record.host, record.hostport, _ts(now)),
            )
            _bump_forwards(db)
        return ForwardRecord(record.bind, record.port, record.site, record.host, record.hostport)

    def remove_forward(self, bind: str, port: int, cut: bool) -> ForwardRecord:
        """
        Remove a stored forward: with a running server, mark it for the server
        to close (and with C{cut}, to close its connections), else delete it.

        @raise ForwardConflict: if no stored forward is on BIND:PORT (naming
            the command-line forward there, if the running server has one).
        """
        alive = self._server_alive()
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM forwards WHERE bind = ? AND port = ? AND removed = 0", (bind, port)
            ).fetchone()
            if row is None:
                theirs = (
                    db.execute(
                        "SELECT * FROM forward_states WHERE bind = ? AND port = ? AND source = ?",
                        (bind, port, SOURCE_COMMAND_LINE),
                    ).fetchone()
                    if alive
                    else None
                )
                if theirs is not None:
                    other = forward_spec_text(
                        theirs["bind"], theirs["port"], theirs["site"], theirs["host"], theirs["hostport"]
                    )
                    raise ForwardConflict(
                        f"the forward on {_join(bind, port)} is the server's command-line forward --forward {other}: "
                        "remove it from the command line and restart the server"
                    )
                raise ForwardConflict(f"no forward on {_join(bind, port)} is stored in the database")
            if alive:
                db.execute(
                    "UPDATE forwards SET removed = 1, cut = ? WHERE bind = ? AND port = ?", (int(cut), bind, port)
                )
            else:
                db.execute("DELETE FROM forwards WHERE bind = ? AND port = ?", (bind, port))
                db.execute(
                    "DELETE FROM forward_states WHERE bind = ? AND port = ? AND source = ?",
                    (bind, port, SOURCE_DATABASE),
                )
            _bump_forwards(db)
        return _forward_record(row)

    def forwards_version(self) -> int:
        """A number that changes whenever a forward is added or removed: cheap to poll."""
        value = self.get_meta(_FORWARDS_VERSION)
        return int(value) if value is not None and value.isdigit() else 0

    def stored_forwards(self) -> list[ForwardRecord]:
        """Every stored forward, those marked removed included, by BIND:PORT."""
        with self._guard():
            rows = self._db.execute("SELECT * FROM forwards ORDER BY bind, port").fetchall()
        return [_forward_record(r) for r in rows]

    def forget_removed_forwards(self, keys: Sequence[tuple[str, int]]) -> None:
        """
        Delete the removed forwards the server has closed, and their states (a
        forward added again on the same port meanwhile is kept).
        """
        with self._transaction() as db:
            for bind, port in keys:
                db.execute("DELETE FROM forwards WHERE bind = ? AND port = ? AND removed = 1", (bind, port))
                gone = db.execute("SELECT 1 FROM forwards WHERE bind = ? AND port = ?", (bind, port)).fetchone() is None
                if gone:
                    db.execute(
                        "DELETE FROM forward_states WHERE bind = ? AND port = ? AND source = ?",
                        (bind, port, SOURCE_DATABASE),
                    )

    def reset_forward_states(self, states: Sequence[ForwardState], now: datetime) -> None:
        """Forget every recorded forward state (a new server run), then record C{states}."""
        with self._transaction() as db:
            db.execute("DELETE FROM forward_states")
            _put_states(db, states, now)

    def record_forward_states(self, states: Sequence[ForwardState], now: datetime) -> None:
        """Record the running server's view of these forwards."""
        with self._transaction() as db:
            _put_states(db, states, now)

    def list_forwards(self) -> list[ForwardState]:
        """
        Every forward for C{rtunnel forwards list}: the stored ones (not
        removed) with the state the running server reported (L{STATE_PENDING}
        until it did), and the running server's command-line ones. With no
        server running, only the stored ones, each L{STATE_NOT_RUNNING}: a
        state recorded by a server that is gone would be stale.
        """
        alive = self._server_alive()
        with self._guard():
            stored = self._db.execute(
                "SELECT f.*, s.state AS state FROM forwards f LEFT JOIN forward_states s "
                "ON s.bind = f.bind AND s.port = f.port AND s.source = ? WHERE f.removed = 0",
                (SOURCE_DATABASE,),
            ).fetchall()
            command_line = self._db.execute(
                "SELECT * FROM forward_states WHERE source = ?", (SOURCE_COMMAND_LINE,)
            ).fetchall()
        result = [
            ForwardState(
                bind=r["bind"],
                port=int(r["port"]),
                site=r["site"],
                host=r["host"],
                hostport=int(r["hostport"]),
                source=SOURCE_DATABASE,
                state=(r["state"] or STATE_PENDING) if alive else STATE_NOT_RUNNING,
            )
            for r in stored
        ]
        if alive:
            result += [
                ForwardState(
                    bind=r["bind"],
                    port=int(r["port"]),
                    site=r["site"],
                    host=r["host"],
                    hostport=int(r["hostport"]),
                    source=SOURCE_COMMAND_LINE,
                    state=r["state"],
                )
                for r in command_line
            ]
        return sorted(result, key=lambda f: (f.port, f.bind, f.source))

    def server_running(self) -> bool:
        """Whether the tunnel server that last recorded its start is running now."""
        return self._server_alive()


#: What each site last announced with C{--service} (issue 11): one JSON
#: object C{{name: "host:port"}} per site. New table, added when missing, as
#: the forward tables are: nothing older reads it.
_SERVICE_SCHEMA = """
CREATE TABLE IF NOT EXISTS site_services (
    site TEXT PRIMARY KEY,
    services TEXT NOT NULL,
    announced_at TEXT NOT NULL
)
"""


# -- live forwards (issue 11) ---------------------------------------------


#: The forwards added with C{rtunnel forwards add}, and the state of every
#: forward of the running server as it reported it. Added to a database of
#: schema version 1 when missing (L{StateStore._ensure_forward_tables}): the
#: tables are new, nothing older reads them, so no version change is needed.
_FORWARD_SCHEMA = """
CREATE TABLE IF NOT EXISTS forwards (
    bind TEXT NOT NULL,
    port INTEGER NOT NULL,
    site TEXT NOT NULL,
    host TEXT NOT NULL,
    hostport INTEGER NOT NULL,
    added_at TEXT NOT NULL,
    removed INTEGER NOT NULL DEFAULT 0,
    cut INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (bind, port)
);
CREATE TABLE IF NOT EXISTS forward_states (
    bind TEXT NOT NULL,
    port INTEGER NOT NULL,
    source TEXT NOT NULL,
    site TEXT NOT NULL,
    host TEXT NOT NULL,
    hostport INTEGER NOT NULL,
    state TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (bind, port, source)
);
"""

#: Where a forward comes from, as C{forwards list} shows it.
SOURCE_COMMAND_LINE = "command line"
SOURCE_DATABASE = "database"
#: The state of every forward while no tunnel server runs.
STATE_NOT_RUNNING = "not running"
#: A database forward the running server has not applied yet.
STATE_PENDING = "pending"
_FORWARDS_VERSION = "forwards_version"


def forward_spec_text(bind: str, port: int, site: str, host: str, hostport: int) -> str:
    """C{BIND:PORT:SITE:HOST:HOSTPORT}, IPv6 in brackets: how every forward is shown."""
    return f"{_join(bind, port)}:{site}:{_join(host, hostport)}"


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ForwardConflict(StateError):
    """
    A forward cannot be added or removed as asked (its port is taken by
    another forward, or there is no such forward).
    """


@frozen
class ForwardRecord:
    """
    One forward stored in the database (C{rtunnel forwards add}).

    @ivar removed: C{rtunnel forwards remove} asked the running server to
        close it; the server deletes the row once it has.
    @ivar cut: with C{removed}: its open connections are closed too.
    """

    bind: str
    port: int
    site: str
    host: str
    hostport: int
    removed: bool = False
    cut: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return self.bind, self.port

    @property
    def spec(self) -> str:
        return forward_spec_text(self.bind, self.port, self.site, self.host, self.hostport)


@frozen
class ForwardState:
    """
    One forward as C{rtunnel forwards list} shows it.

    @ivar source: L{SOURCE_COMMAND_LINE} or L{SOURCE_DATABASE}.
    @ivar state: C{listening}, C{failed: REASON}, L{STATE_PENDING} (not
        applied yet), or L{STATE_NOT_RUNNING}.
    """

    bind: str
    port: int
    site: str
    host: str
    hostport: int
    source: str
    state: str

    @property
    def spec(self) -> str:
        return forward_spec_text(self.bind, self.port, self.site, self.host, self.hostport)


def _forward_record(row: sqlite3.Row) -> ForwardRecord:
    return ForwardRecord(
        bind=row["bind"],
        port=int(row["port"]),
        site=row["site"],
        host=row["host"],
        hostport=int(row["hostport"]),
        removed=bool(row["removed"]),
        cut=bool(row["cut"]),
    )


def _bump_forwards(db: sqlite3.Connection) -> None:
    db.execute(
        "INSERT INTO meta (key, value) VALUES (?, '1') "
        "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
        (_FORWARDS_VERSION,),
    )


def _put_states(db: sqlite3.Connection, states: Sequence[ForwardState], now: datetime) -> None:
    for s in states:
        db.execute(
            "INSERT INTO forward_states (bind, port, source, site, host, hostport, state, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (bind, port, source) DO UPDATE SET "
            "site = excluded.site, host = excluded.host, hostport = excluded.hostport, "
            "state = excluded.state, updated_at = excluded.updated_at",
            (s.bind, s.port, s.source, s.site, s.host, s.hostport, s.state, _ts(now)),
        )
