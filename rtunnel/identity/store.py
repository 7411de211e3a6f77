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

The same store runs on PostgreSQL (C{--database postgresql://...}, psycopg
3), which several tunnel servers can share: the same SQL (written for both),
every write transaction serialized by one advisory lock as SQLite's write
lock serializes them, and an admission counter in place of SQLite's
C{data_version}. The schema is versioned and migrated on open
(L{rtunnel.identity.migrations}).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

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
from rtunnel.identity.migrations import SCHEMA_VERSION, migrations_for
from rtunnel.logs import Logger

__all__ = [
    "ADMISSION_COUNTER",
    "HEARTBEAT_INTERVAL",
    "REPLICA_TIMEOUT",
    "SCHEMA_VERSION",
    "AdmissionSnapshot",
    "ForwardConflict",
    "ForwardRecord",
    "ForwardState",
    "ReplicaRecord",
    "SessionRecord",
    "SiteAdmission",
    "SiteRecord",
    "StateStore",
    "check_admission",
    "database_location",
    "is_postgresql",
    "pid_alive",
]

#: The tables every state database has once migrated.
_TABLES = {"meta", "sites", "tokens", "forwards", "forward_states", "site_services", "replicas", "site_sessions"}
#: The key of PostgreSQL's advisory lock that every write transaction takes
#: first (SQLite's BEGIN IMMEDIATE): writers queue instead of racing, as on
#: SQLite; "rtun" in ASCII.
_WRITE_LOCK = 0x7274756E
#: The meta key of the admission counter, bumped with every enrollment and
#: revocation in the same transaction: what the tunnel servers' revocation
#: poll watches to know that admission changed.
ADMISSION_COUNTER = "admission_version"
_POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")

_log = Logger(namespace="rtunnel.identity.store")

#: Seconds between a replica's heartbeats (L{StateStore.replica_heartbeat}).
HEARTBEAT_INTERVAL = 1.0
#: Seconds without a heartbeat after which a replica is taken for dead: its
#: sessions no longer count and the next L{StateStore.expire_replicas} deletes
#: it. Six missed heartbeats: a replica is not dropped for one slow write or a
#: database that paused a few seconds, and a dead one is gone well within the
#: time a site takes to redial.
REPLICA_TIMEOUT = 6.0


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


def _stored_time(text: str) -> datetime:
    """A timestamp as L{_ts} stored it (for a column that is never NULL)."""
    return datetime.fromisoformat(text).astimezone(UTC)


def _dt(text: str | None) -> datetime | None:
    return None if text is None else _stored_time(text)


def _human(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _utcnow() -> datetime:
    return datetime.now(UTC)


@frozen
class ReplicaRecord:
    """
    One tunnel server replica as the database records it.

    @ivar advertise: C{HOST:PORT} sites may dial to reach this replica
        itself, or C{""}: it is reached only through the shared address.
    @ivar pid: its process id (C{None} when another replica's heartbeat
        re-created the row without it).
    @ivar host: the host name it runs on (likewise).
    """

    replica_id: str
    advertise: str
    pid: int | None
    host: str | None
    started_at: datetime
    heartbeat_at: datetime


@frozen
class SessionRecord:
    """One session of a site, with one replica."""

    replica_id: str
    peer: str
    since: datetime


@frozen
class SiteRecord:
    """
    What the state store knows about one site.

    A site appears once a token was created for it; C{enrolled_at} stays
    C{None} until a token is redeemed.

    @ivar connected: whether a tunnel from this site is up now: it has a
        session with a live replica (or, recorded by a server older than
        replicas, that server is still running).
    @ivar peer: the site's address (C{host:port}) on its current or last
        connection (while connected, its oldest live session's).
    @ivar token_expires: expiry of the newest outstanding (unspent, not
        withdrawn) token, or C{None}.
    @ivar sessions: its sessions with live replicas, by replica id.
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
    sessions: tuple[SessionRecord, ...] = ()

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
    The state database of one tunnel server: an SQLite file (the default),
    or a PostgreSQL database that several servers can share.

    One instance owns one connection; use it from one thread at a time.
    Open as many instances (in as many processes) as needed on the same
    database.

    The SQLite connection is opened with C{check_same_thread=False}: the
    tunnel server loads its state (and this store) at build time, in the
    thread that builds the service, and from its start on uses the store
    only in its one database thread; Python's check would refuse that
    hand-over. One user at a time is all SQLite needs here (the module is
    built serialized, C{sqlite3.threadsafety} 3, and a transaction is begun
    and ended by the same call). A psycopg connection takes the same
    hand-over.

    On PostgreSQL every write transaction first takes one advisory lock, the
    counterpart of SQLite's C{BEGIN IMMEDIATE}: writers from every process
    sharing the database run one after another, so each read-then-write
    (redeeming a token above all) sees the state the previous one left, as
    on SQLite. Writes are a handful of row operations; serializing them
    costs far less than a mistake in reasoning about isolation levels.

    @ivar path: the SQLite file, or the PostgreSQL URL with any password
        masked: what messages name.
    @ivar dialect: C{"sqlite"} or C{"postgresql"}.
    @ivar upgraded_from: the schema version this open migrated the database
        from (0: it was empty), or C{None} if it was current.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        busy_timeout: float = 5.0,
        process_alive: Callable[[int], bool] = pid_alive,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        """
        Open (and with C{create}, create and initialize) a state database,
        and bring its schema up to date.

        @param path: an SQLite file, or a C{postgresql://} URL.
        @param create: whether a missing or empty file may be initialized
            (an empty PostgreSQL database always may).
        @param busy_timeout: seconds to wait for another process's write
            transaction before failing (SQLite).
        @param process_alive: tells whether a process id is running; used to
            ignore the connection flags of a tunnel server that died (one
            older than replicas: a replica's liveness is its heartbeat).
        @param clock: the current time, for the listings that tell live
            replicas from dead ones when not given a time.

        @raise StateError: if the file is missing (without C{create}), not
            SQLite, not an rtunnel database, or of a newer schema version;
            if the PostgreSQL server cannot be reached.
        """
        self.path = os.fspath(path)
        self.dialect = "sqlite"
        self.upgraded_from: int | None = None
        self._process_alive = process_alive
        self._clock = clock
        #: what this connection recorded for each replica it runs, kept to
        #: restore it whole (L{replica_heartbeat})
        self._replicas: dict[str, _OwnReplica] = {}
        #: what _guard turns into StateError besides sqlite3's errors
        self._foreign_errors: tuple[type[Exception], ...] = ()
        #: admission changes committed through this connection (enrollments,
        #: revocations), which SQLite's data_version does not count, and the
        #: sites they concern (until L{take_own_changes})
        self._own_changes = 0
        self._own_changed_sites: set[str] = set()
        #: told of every admission change committed through this connection
        self._admission_listeners: list[Callable[[str, SiteAdmission | None], None]] = []
        self._busy_timeout = busy_timeout
        self._db: _Connection
        if is_postgresql(self.path):
            self._open_postgresql(self.path)
            return
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
            db = sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StateError(f"cannot open state database {self.path}: {e}") from None
        self._db = db
        try:
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            # Check before switching to WAL: that switch writes to the file,
            # and a file that is not ours must be left exactly as it was.
            self._check_schema(create)
            self._switch_to_wal()
            db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as e:
            db.close()
            raise StateError(f"{self.path} is not a usable rtunnel state database ({e})") from None
        except BaseException:
            db.close()
            raise

    def _open_postgresql(self, url: str) -> None:
        """
        Connect to a PostgreSQL database (psycopg 3, the C{postgresql}
        extra) in autocommit mode, our transactions being explicit, and
        bring its schema up to date.
        """
        self.dialect = "postgresql"
        self.path = _mask_password(url)
        try:
            import psycopg
        except ImportError:
            raise StateError(
                f"state database {self.path}: PostgreSQL needs psycopg 3, which is not installed "
                "(pip install 'rtunnel[postgresql]')"
            ) from None
        self._foreign_errors = (psycopg.Error,)
        try:
            connection = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            raise StateError(f"cannot connect to state database {self.path}: {_one_line(e)}") from None
        self._db = _PostgreSQL(connection, lambda: psycopg.connect(url, autocommit=True, connect_timeout=10))
        try:
            with self._guard():
                self._check_schema(create=True)
        except BaseException:
            connection.close()
            raise

    # -- plumbing ---------------------------------------------------------

    def _check_schema(self, create: bool) -> None:
        tables = self._tables()
        if not tables:
            if not create:
                raise StateError(f"state database {self.path} is empty")
            if self.dialect == "sqlite":
                self._switch_to_wal()
            with self._transaction() as db:
                # Another process may have initialized it while we waited
                # for the write lock.
                if not self._tables():
                    self._migrate(db, 0)
            tables = self._tables()
        if "meta" not in tables:
            what = "an SQLite database" if self.dialect == "sqlite" else "a database"
            raise StateError(f"{self.path} is {what} but not an rtunnel state database (it has no meta table)")
        version = self._schema_version()
        if version < SCHEMA_VERSION:
            with self._transaction() as db:
                # Another process may have upgraded it while we waited.
                version = self._schema_version()
                if version < SCHEMA_VERSION:
                    self._migrate(db, version)
        # Read again: another process may have migrated since the first look.
        missing = _TABLES - self._tables()
        if missing:
            raise StateError(f"{self.path} is damaged: table(s) {', '.join(sorted(missing))} missing")

    def _switch_to_wal(self) -> None:
        """
        Put the SQLite file in WAL mode (a no-op when it is).

        The switch of a new file needs it to itself, and SQLite answers
        "locked" at once, without waiting on the busy timeout, when other
        processes are opening the same new file at that moment (servers and
        commands started together): try again until the busy timeout.
        """
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL").fetchone()
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.005)

    def _schema_version(self) -> int:
        """
        The database's schema version, known to be at most ours.

        @raise StateError: none recorded, not a number, or newer than ours.
        """
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise StateError(f"{self.path} has no schema version: not an rtunnel state database")
        version = str(row[0])
        if not version.isdigit() or int(version) > SCHEMA_VERSION:
            newer = version.isdigit() and int(version) > SCHEMA_VERSION
            raise StateError(
                f"{self.path} has schema version {version}; this rtunnel understands "
                f"version {SCHEMA_VERSION} only" + (" (it was written by a newer rtunnel)" if newer else "")
            )
        return int(version)

    def _migrate(self, db: _Connection, version: int) -> None:
        """
        Apply the migrations after C{version}, inside the caller's write
        transaction (all of them or, on failure, none).
        """
        steps = migrations_for(self.dialect, version)
        for step in steps:
            for statement in step.statements:
                db.execute(statement)
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )
        self.upgraded_from = version
        if version:
            _log.info(
                "upgraded state database {database} from schema version {old} to {new}: {what}",
                database=self.path,
                old=version,
                new=SCHEMA_VERSION,
                what="; ".join(step.why for step in steps),
            )

    def _tables(self) -> set[str]:
        if self.dialect == "sqlite":
            rows = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        else:
            rows = self._db.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
            ).fetchall()
        return {r[0] for r in rows}

    @contextmanager
    def _transaction(self) -> Iterator[_Connection]:
        """
        Run a write transaction, taking the write lock first.
        """
        with self._guard():
            if self.dialect == "sqlite":
                self._db.execute("BEGIN IMMEDIATE")
            else:
                self._db.execute("BEGIN")
            try:
                if self.dialect != "sqlite":
                    self._db.execute("SELECT pg_advisory_xact_lock(?)", (_WRITE_LOCK,))
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """
        Turn database failures (a locked or damaged file, a PostgreSQL
        server gone) into L{StateError}.
        """
        try:
            yield
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise StateError(f"state database {self.path} is locked by another process ({e})") from None
            raise StateError(f"state database {self.path}: {e}") from None
        except sqlite3.Error as e:
            raise StateError(f"state database {self.path}: {e}") from None
        except self._foreign_errors as e:
            raise StateError(f"state database {self.path}: {_one_line(e)}") from None

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

    def clear_meta_if(self, key: str, value: str) -> bool:
        """
        Empty a value of the C{meta} table if it still is C{value}: what one
        replica wrote there, and no other replica has overwritten since.

        @return: whether it was cleared.
        """
        with self._transaction() as db:
            cursor = db.execute("UPDATE meta SET value = '' WHERE key = ? AND value = ?", (key, value))
            return bool(cursor.rowcount)

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
            _bump(db, ADMISSION_COUNTER)
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
    def _admission(row: Any) -> SiteAdmission:
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
            _bump(db, ADMISSION_COUNTER)
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

        PostgreSQL has no C{data_version}: there the first part is the
        admission counter every enrollment and revocation bumps in its own
        transaction (one indexed read). It counts this connection's changes
        too, so a poller reloads its table after them as well: correct,
        and rare next to connections.
        """
        with self._guard():
            if self.dialect == "sqlite":
                return int(self._db.execute("PRAGMA data_version").fetchone()[0]), self._own_changes
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (ADMISSION_COUNTER,)).fetchone()
            return (int(row[0]) if row is not None else 0), self._own_changes

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

    # -- connection status of a server older than replicas ----------------
    #
    # Kept for one release, until the tunnel server records its sessions per
    # replica (L{session_opened}); a site counts as connected by these flags
    # only while the process that recorded its start runs.

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
            if session is None:
                db.execute("UPDATE sites SET connected = 0, last_seen = ? WHERE name = ?", (_ts(now), site))
            else:
                db.execute(
                    "UPDATE sites SET connected = 0, last_seen = ? WHERE name = ? AND session = ?",
                    (_ts(now), site, session),
                )

    # -- replicas and their sessions (issue 13) ---------------------------

    def replica_started(self, replica_id: str, advertise: str, pid: int, host: str, now: datetime) -> None:
        """
        Record that replica C{replica_id} (re)started: its row, heartbeat
        C{now}; the sessions and forward states an earlier run of the same id
        left are deleted (that run's sessions ended with its process).

        What this connection recorded for the replica before (sessions
        opened before its start was written, which the server's first
        heartbeat does; a start retried after its write failed) is kept and
        written back, not deleted with the earlier run's.
        """
        _check_replica_id(replica_id)
        stamp = _ts(now)
        own = self._own(replica_id)
        own.pid, own.host = pid, host
        if own.started_at is None:
            own.started_at = stamp
        with self._transaction() as db:
            old = db.execute("SELECT heartbeat_at FROM replicas WHERE replica_id = ?", (replica_id,)).fetchone()
            db.execute(
                "INSERT INTO replicas (replica_id, advertise, pid, host, started_at, heartbeat_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (replica_id) DO UPDATE SET advertise = excluded.advertise, "
                "pid = excluded.pid, host = excluded.host, started_at = excluded.started_at, "
                "heartbeat_at = excluded.heartbeat_at",
                (replica_id, advertise, pid, host, own.started_at, stamp),
            )
            _write_back(db, replica_id, own, stamp if old is None else old["heartbeat_at"])
            # A server older than replicas cannot run on this schema: the
            # pid such a server recorded is stale, and a process that took
            # that pid over must not make its connection flags count.
            db.execute("DELETE FROM meta WHERE key = 'server_pid'")
        own.stale = False

    def replica_heartbeat(self, replica_id: str, advertise: str, now: datetime) -> None:
        """
        Record that replica C{replica_id} is alive at C{now}.

        A replica whose heartbeats were late (a stalled process, a database
        out of reach) may have been expired by another meanwhile, its
        sessions and forward states deleted with its row: its row is then
        made again, and what this connection recorded for it (its sessions,
        its forwards' states) written back, as after any of its writes that
        failed. The replica itself need not know.
        """
        _check_replica_id(replica_id)
        own = self._replicas.get(replica_id)
        stamp = _ts(now)
        with self._transaction() as db:
            found = db.execute(
                "UPDATE replicas SET heartbeat_at = ?, advertise = ? WHERE replica_id = ?",
                (stamp, advertise, replica_id),
            ).rowcount
            if not found:
                db.execute(
                    "INSERT INTO replicas (replica_id, advertise, pid, host, started_at, heartbeat_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        replica_id,
                        advertise,
                        None if own is None else own.pid,
                        None if own is None else own.host,
                        stamp if own is None or own.started_at is None else own.started_at,
                        stamp,
                    ),
                )
            restore = own is not None and (own.stale or not found)
            if restore:
                assert own is not None
                _write_back(db, replica_id, own, stamp)
        if own is not None:
            if restore:
                _log.info(
                    "state database: replica {replica} written back with its {count} site session(s) ({why})",
                    replica=replica_id,
                    count=len(own.sessions),
                    why="writes had failed" if found else "another process had dropped it",
                )
            own.stale = False

    def replica_stopped(self, replica_id: str, now: datetime | None = None) -> None:
        """
        Record a clean stop of replica C{replica_id}: its row, sessions and
        forward states are deleted (its sites are last seen C{now}).
        """
        stamp = _ts(self._clock() if now is None else now)
        with self._transaction() as db:
            db.execute("DELETE FROM replicas WHERE replica_id = ?", (replica_id,))
            _drop_replica_rows(db, replica_id, stamp)
        self._replicas.pop(replica_id, None)

    def expire_replicas(self, now: datetime, timeout: float = REPLICA_TIMEOUT) -> list[str]:
        """
        Delete the replicas whose last heartbeat is more than C{timeout}
        seconds before C{now}, with their sessions and forward states (their
        sites last seen at that heartbeat).

        @return: the ids of the replicas deleted, sorted.
        """
        cutoff = now - timedelta(seconds=timeout)
        with self._transaction() as db:
            rows = db.execute("SELECT replica_id, heartbeat_at FROM replicas ORDER BY replica_id").fetchall()
            expired = [(r["replica_id"], r["heartbeat_at"]) for r in rows if _stored_time(r["heartbeat_at"]) < cutoff]
            for replica_id, heartbeat_at in expired:
                db.execute("DELETE FROM replicas WHERE replica_id = ?", (replica_id,))
                _drop_replica_rows(db, replica_id, heartbeat_at)
        return [replica_id for replica_id, _ in expired]

    def live_replicas(self, now: datetime, timeout: float = REPLICA_TIMEOUT) -> list[ReplicaRecord]:
        """The replicas that sent a heartbeat within C{timeout} seconds before C{now}, by id."""
        cutoff = now - timedelta(seconds=timeout)
        with self._guard():
            rows = self._db.execute("SELECT * FROM replicas ORDER BY replica_id").fetchall()
        records = [
            ReplicaRecord(
                replica_id=r["replica_id"],
                advertise=r["advertise"],
                pid=None if r["pid"] is None else int(r["pid"]),
                host=r["host"],
                started_at=_stored_time(r["started_at"]),
                heartbeat_at=_stored_time(r["heartbeat_at"]),
            )
            for r in rows
        ]
        return [r for r in records if r.heartbeat_at >= cutoff]

    def session_opened(self, site: str, replica_id: str, peer: str, now: datetime) -> None:
        """
        Record that C{site} opened a session with replica C{replica_id} from
        C{peer}: its session with that replica (replacing an earlier one),
        and the site's connection columns as they always were (connected,
        peer, since, last seen).

        @raise SiteNotFound: if the site is not known.
        """
        _check_replica_id(replica_id)
        own = self._own(replica_id)
        stamp = _ts(now)
        own.sessions[site] = (peer, stamp)
        try:
            with self._transaction() as db:
                cursor = db.execute(
                    "UPDATE sites SET connected = 1, session = session + 1, peer = ?, "
                    "connected_since = ?, last_seen = ? WHERE name = ?",
                    (peer, stamp, stamp, site),
                )
                if cursor.rowcount != 1:
                    raise SiteNotFound(f"no site named {site!r} is known to this server")
                _put_session(db, site, replica_id, peer, stamp)
        except SiteNotFound:
            own.sessions.pop(site, None)
            raise
        except StateError:
            own.stale = True
            raise

    def session_closed(self, site: str, replica_id: str, now: datetime) -> None:
        """
        Record that C{site}'s session with replica C{replica_id} ended: the
        site was last seen C{now}, and stays connected while it has a
        session with another replica.
        """
        own = self._replicas.get(replica_id)
        if own is not None:
            own.sessions.pop(site, None)
        try:
            with self._transaction() as db:
                db.execute("DELETE FROM site_sessions WHERE site = ? AND replica_id = ?", (site, replica_id))
                db.execute(
                    "UPDATE sites SET last_seen = ?, connected = CASE WHEN EXISTS "
                    "(SELECT 1 FROM site_sessions s WHERE s.site = ?) THEN 1 ELSE 0 END WHERE name = ?",
                    (_ts(now), site, site),
                )
        except StateError:
            if own is not None:
                own.stale = True
            raise

    def _own(self, replica_id: str) -> _OwnReplica:
        """What this connection records for a replica it runs, from its first write for it on."""
        own = self._replicas.get(replica_id)
        if own is None:
            own = self._replicas[replica_id] = _OwnReplica()
        return own

    def list_sessions(self, now: datetime) -> dict[str, tuple[SessionRecord, ...]]:
        """Every site's sessions with the replicas live at C{now}, by site, each by replica id."""
        return self._live_sessions(self._live_ids(now))

    def _live_ids(self, now: datetime | None = None) -> frozenset[str]:
        """
        The ids of the replicas live at C{now} (default: the clock's), and
        C{""} when a server older than replicas recorded its start and still
        runs (its forward states carry that id).
        """
        moment = self._clock() if now is None else now
        ids = {r.replica_id for r in self.live_replicas(moment)}
        if self._legacy_server_alive():
            ids.add("")
        return frozenset(ids)

    # -- listing ----------------------------------------------------------

    def _legacy_server_alive(self) -> bool:
        """Whether a server older than replicas recorded its start (L{record_server_start}) and runs."""
        pid = self.get_meta("server_pid")
        return pid is not None and pid.isdigit() and self._process_alive(int(pid))

    def _live_sessions(self, live: frozenset[str], site: str | None = None) -> dict[str, tuple[SessionRecord, ...]]:
        with self._guard():
            if site is None:
                rows = self._db.execute("SELECT * FROM site_sessions ORDER BY site, replica_id").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM site_sessions WHERE site = ? ORDER BY replica_id", (site,)
                ).fetchall()
        found: dict[str, list[SessionRecord]] = {}
        for r in rows:
            if r["replica_id"] in live:
                found.setdefault(r["site"], []).append(_session(r))
        return {name: tuple(sessions) for name, sessions in found.items()}

    def list_sites(self, now: datetime | None = None) -> list[SiteRecord]:
        """
        All known sites (enrolled, revoked, or with a token outstanding),
        sorted by name, with their sessions with the replicas live at
        C{now} (default: the clock's). A site is connected while it has one.
        """
        live = self._live_ids(now)
        sessions = self._live_sessions(live)
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
        return [self._record(r, "" in live, sessions.get(r["name"], ())) for r in rows]

    def site(self, name: str, now: datetime | None = None) -> SiteRecord | None:
        """
        The record of one site, or C{None} if it is not known. Indexed
        lookups, whatever the number of sites.
        """
        live = self._live_ids(now)
        sessions = self._live_sessions(live, name)
        with self._guard():
            row = self._db.execute(
                """
                SELECT CAST(? AS TEXT) AS name, s.enrolled_at, s.revoked_at, s.connected,
                       s.peer, s.connected_since, s.last_seen,
                       s.certificate_fingerprint,
                       (SELECT max(t.expires_at) FROM tokens t WHERE t.site = ?
                          AND t.spent_at IS NULL AND t.withdrawn_at IS NULL)
                         AS token_expires,
                       s.name IS NOT NULL
                         OR EXISTS (SELECT 1 FROM tokens t WHERE t.site = ?) AS known
                FROM (SELECT 1) AS one LEFT JOIN sites s ON s.name = ?
                """,
                (name, name, name, name),
            ).fetchone()
        if row is None or not row["known"]:
            return None
        return self._record(row, "" in live, sessions.get(name, ()))

    @staticmethod
    def _record(row: Any, legacy_alive: bool, sessions: tuple[SessionRecord, ...]) -> SiteRecord:
        """
        A site's record from its row and its live sessions: while it has
        any, its peer and time of connection are its oldest session's (the
        row holds the newest, which may have ended since).
        """
        oldest = min(sessions, key=lambda s: s.since) if sessions else None
        return SiteRecord(
            name=row["name"],
            enrolled_at=_dt(row["enrolled_at"]),
            revoked_at=_dt(row["revoked_at"]),
            connected=oldest is not None or bool(legacy_alive and row["connected"]),
            peer=row["peer"] if oldest is None else oldest.peer,
            connected_since=_dt(row["connected_since"]) if oldest is None else oldest.since,
            last_seen=_dt(row["last_seen"]),
            certificate_fingerprint=row["certificate_fingerprint"],
            token_expires=_dt(row["token_expires"]),
            sessions=sessions,
        )

    # -- named services (issue 11) ----------------------------------------

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

    def add_forward(self, record: ForwardRecord, now: datetime) -> ForwardRecord:
        """
        Store a forward for the tunnel server to listen on.

        @raise ForwardConflict: if a stored forward, or a running replica's
            command-line forward, is on the same BIND:PORT already.
        """
        live = self._live_ids(now)
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
            theirs = _command_line_state(db, record.bind, record.port, live)
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

        With replicas, "a running server" is any live replica; each closes
        the forward, and the row goes once the last has (L{forget_removed_forwards}).

        @raise ForwardConflict: if no stored forward is on BIND:PORT (naming
            the command-line forward there, if a running replica has one).
        """
        live = self._live_ids()
        alive = bool(live)
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM forwards WHERE bind = ? AND port = ? AND removed = 0", (bind, port)
            ).fetchone()
            if row is None:
                theirs = _command_line_state(db, bind, port, live)
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

    def forget_removed_forwards(self, keys: Sequence[tuple[str, int]], replica_id: str = "") -> None:
        """
        Replica C{replica_id} closed these removed forwards: its states of
        them go, and each row with the last state a live replica recorded
        of it (a forward added again on the same port meanwhile is kept).
        Without a replica id (one server), the rows and their states go at
        once.
        """
        live = self._live_ids() if replica_id else frozenset()
        own = self._replicas.get(replica_id) if replica_id else None
        if own is not None:  # even if the write fails: a write-back must not bring them back
            for bind, port in keys:
                own.forward_states.pop((bind, port, SOURCE_DATABASE), None)
        with self._transaction() as db:
            for bind, port in keys:
                if replica_id:
                    db.execute(
                        "DELETE FROM forward_states WHERE bind = ? AND port = ? AND source = ? AND replica_id = ?",
                        (bind, port, SOURCE_DATABASE, replica_id),
                    )
                    others = db.execute(
                        "SELECT replica_id FROM forward_states WHERE bind = ? AND port = ? AND source = ?",
                        (bind, port, SOURCE_DATABASE),
                    ).fetchall()
                    if any(r["replica_id"] in live for r in others):
                        continue  # another replica has still to close it
                db.execute("DELETE FROM forwards WHERE bind = ? AND port = ? AND removed = 1", (bind, port))
                gone = db.execute("SELECT 1 FROM forwards WHERE bind = ? AND port = ?", (bind, port)).fetchone() is None
                if gone:
                    db.execute(
                        "DELETE FROM forward_states WHERE bind = ? AND port = ? AND source = ?",
                        (bind, port, SOURCE_DATABASE),
                    )

    def reset_forward_states(self, states: Sequence[ForwardState], now: datetime, replica_id: str = "") -> None:
        """
        Forget every forward state replica C{replica_id} recorded (a new
        run), then record C{states} as its.
        """
        if replica_id:
            self._own(replica_id).forward_states = {}
        self._record_states(states, now, replica_id, reset=True)

    def record_forward_states(self, states: Sequence[ForwardState], now: datetime, replica_id: str = "") -> None:
        """Record replica C{replica_id}'s view of these forwards."""
        self._record_states(states, now, replica_id, reset=False)

    def _record_states(self, states: Sequence[ForwardState], now: datetime, replica_id: str, reset: bool) -> None:
        own = self._own(replica_id) if replica_id else None
        stamp = _ts(now)
        if own is not None:
            own.forward_states.update({(s.bind, s.port, s.source): (s, stamp) for s in states})
        try:
            with self._transaction() as db:
                if reset:
                    db.execute("DELETE FROM forward_states WHERE replica_id = ?", (replica_id,))
                _put_states(db, states, stamp, replica_id)
        except StateError:
            if own is not None:
                own.stale = True
            raise

    def list_forwards(self, now: datetime | None = None) -> list[ForwardState]:
        """
        Every forward for C{rtunnel forwards list}: the stored ones (not
        removed) with the state the live replicas reported (L{STATE_PENDING}
        until one did), and the live replicas' command-line ones. With no
        replica live at C{now} (default: the clock's), only the stored ones,
        each L{STATE_NOT_RUNNING}: a state recorded by a server that is gone
        would be stale.

        Each forward has one state: the one every live replica that reported
        it agrees on, else C{mixed: ID STATE, ...} by replica id.
        """
        live = self._live_ids(now)
        with self._guard():
            stored = self._db.execute("SELECT * FROM forwards WHERE removed = 0").fetchall()
            reported = self._db.execute("SELECT * FROM forward_states").fetchall()
        database: dict[tuple[str, int], dict[str, str]] = {}
        command_line: dict[tuple[str, int, str, str, int], dict[str, str]] = {}
        for r in reported:
            if r["replica_id"] not in live:
                continue
            if r["source"] == SOURCE_DATABASE:
                database.setdefault((r["bind"], int(r["port"])), {})[r["replica_id"]] = r["state"]
            elif r["source"] == SOURCE_COMMAND_LINE:
                spec = (r["bind"], int(r["port"]), r["site"], r["host"], int(r["hostport"]))
                command_line.setdefault(spec, {})[r["replica_id"]] = r["state"]
        result = [
            ForwardState(
                bind=r["bind"],
                port=int(r["port"]),
                site=r["site"],
                host=r["host"],
                hostport=int(r["hostport"]),
                source=SOURCE_DATABASE,
                state=_agreed_state(database.get((r["bind"], int(r["port"])), {})) if live else STATE_NOT_RUNNING,
            )
            for r in stored
        ]
        result += [
            ForwardState(*spec, source=SOURCE_COMMAND_LINE, state=_agreed_state(states))
            for spec, states in command_line.items()
        ]
        return sorted(result, key=lambda f: (f.port, f.bind, f.source, f.spec))

    def server_running(self, now: datetime | None = None) -> bool:
        """Whether a tunnel server runs: a replica is live at C{now} (default: the clock's)."""
        return bool(self._live_ids(now))


# -- live forwards (issue 11) ---------------------------------------------


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


def _forward_record(row: Any) -> ForwardRecord:
    return ForwardRecord(
        bind=row["bind"],
        port=int(row["port"]),
        site=row["site"],
        host=row["host"],
        hostport=int(row["hostport"]),
        removed=bool(row["removed"]),
        cut=bool(row["cut"]),
    )


def _bump_forwards(db: _Connection) -> None:
    _bump(db, _FORWARDS_VERSION)


def _bump(db: _Connection, key: str) -> None:
    """Add one to a counter of the meta table, in the caller's transaction."""
    db.execute(
        "INSERT INTO meta (key, value) VALUES (?, '1') "
        "ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(meta.value AS INTEGER) + 1 AS TEXT)",
        (key,),
    )


# -- the PostgreSQL connection ----------------------------------------------


class _Cursor(Protocol):
    """What the store uses of a cursor: sqlite3's, or L{_PostgreSQLCursor}."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class _Connection(Protocol):
    """What the store uses of a connection: sqlite3's, or L{_PostgreSQL}."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> _Cursor: ...

    def close(self) -> None: ...


class _Row:
    """
    A PostgreSQL result row read as the store reads an C{sqlite3.Row}: by
    column name, by index, or unpacked.
    """

    __slots__ = ("_names", "_values")

    def __init__(self, names: Mapping[str, int], values: Sequence[Any]) -> None:
        self._names = names
        self._values = values

    def __getitem__(self, key: int | str) -> Any:
        return self._values[self._names[key] if isinstance(key, str) else key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


class _PostgreSQLCursor:
    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self._names: dict[str, int] | None = None

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    def _row(self, values: Sequence[Any]) -> _Row:
        if self._names is None:  # one mapping for all the rows of a result
            self._names = {column.name: i for i, column in enumerate(self._cursor.description or ())}
        return _Row(self._names, values)

    def fetchone(self) -> Any:
        values = self._cursor.fetchone()
        return None if values is None else self._row(values)

    def fetchall(self) -> list[Any]:
        return [self._row(values) for values in self._cursor.fetchall()]


class _PostgreSQL:
    """
    A psycopg connection that takes the store's SQL as written for SQLite:
    C{?} placeholders become C{%s} (a literal C{%} is doubled; the store's
    SQL has no C{?} inside literals), and rows read like C{sqlite3.Row}.

    A connection that broke (the PostgreSQL server restarted, a network cut)
    fails the call that found it broken; the next call outside a
    transaction connects again. Within a transaction it never reconnects:
    the transaction's earlier statements are gone with the old connection.
    """

    def __init__(self, connection: Any, connect: Callable[[], Any]) -> None:
        self._connection = connection
        self._connect = connect
        self._in_transaction = False

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> _Cursor:
        if sql == "ROLLBACK" and self._connection.closed:
            self._in_transaction = False  # nothing to roll back: the server dropped it with the connection
            return _PostgreSQLCursor(None)
        if self._connection.closed and not self._in_transaction:
            self._connection = self._connect()
        if sql in ("COMMIT", "ROLLBACK"):
            self._in_transaction = False
        query = sql.replace("%", "%%").replace("?", "%s")
        cursor = _PostgreSQLCursor(self._connection.execute(query, tuple(parameters)))
        if sql == "BEGIN":
            self._in_transaction = True
        return cursor

    def close(self) -> None:
        self._connection.close()


def _mask_password(url: str) -> str:
    """A database URL fit for messages and logs: its password replaced by C{***}."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _one_line(error: BaseException) -> str:
    """A driver error as one line (libpq's messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def is_postgresql(location: str) -> bool:
    """Whether L{StateStore} opens this location (see L{database_location}) on PostgreSQL."""
    return location.startswith(_POSTGRESQL_SCHEMES)


def database_location(database: str | None, state_dir: str) -> str:
    """
    Where the state lives, from C{--database}: C{sqlite:PATH}, a
    C{postgresql://} URL, or nothing (the SQLite file in C{state_dir}).

    @return: what L{StateStore} opens: a file path or the URL.
    @raise StateError: for any other form.
    """
    if database is None:
        return os.path.join(state_dir, "state.sqlite3")
    if database.startswith("sqlite:"):
        path = database[len("sqlite:") :]
        if path.startswith("//"):
            raise StateError(f"--database {database}: write sqlite:PATH (sqlite:/var/lib/rtunnel/state.sqlite3)")
        if not path:
            raise StateError("--database sqlite: needs a file path (sqlite:PATH)")
        return path
    if database.startswith(_POSTGRESQL_SCHEMES):
        return database
    raise StateError(
        f"--database {_mask_password(database)!r} is not a database this rtunnel knows: "
        "use sqlite:PATH or postgresql://USER@HOST/DBNAME"
    )


def _put_states(db: _Connection, states: Sequence[ForwardState], stamp: str, replica_id: str) -> None:
    for s in states:
        db.execute(
            "INSERT INTO forward_states (bind, port, source, replica_id, site, host, hostport, state, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (bind, port, source, replica_id) DO UPDATE SET "
            "site = excluded.site, host = excluded.host, hostport = excluded.hostport, "
            "state = excluded.state, updated_at = excluded.updated_at",
            (s.bind, s.port, s.source, replica_id, s.site, s.host, s.hostport, s.state, stamp),
        )


def _command_line_state(db: _Connection, bind: str, port: int, live: frozenset[str]) -> Any:
    """A live replica's command-line forward on BIND:PORT (its state row), or C{None}."""
    rows = db.execute(
        "SELECT * FROM forward_states WHERE bind = ? AND port = ? AND source = ? ORDER BY replica_id",
        (bind, port, SOURCE_COMMAND_LINE),
    ).fetchall()
    return next((r for r in rows if r["replica_id"] in live), None)


def _agreed_state(states: Mapping[str, str]) -> str:
    """
    One forward's state from the live replicas' reports (by replica id):
    theirs when they agree, L{STATE_PENDING} when none reported yet.
    """
    if not states:
        return STATE_PENDING
    if len(set(states.values())) == 1:
        return next(iter(states.values()))
    return "mixed: " + ", ".join(f"{replica} {state}" for replica, state in sorted(states.items()))


# -- replicas (issue 13) ------------------------------------------------------


class _OwnReplica:
    """
    What one connection recorded for a replica it runs (its sessions and
    forwards' states), to write it back when the database lost it: another
    replica expired this one while its heartbeats were late, or a write
    failed (L{StateStore.replica_heartbeat}).

    @ivar sessions: site -> (peer, since as stored).
    @ivar forward_states: (bind, port, source) -> (state, updated at as stored).
    @ivar stale: a write failed since the last heartbeat: the database may
        miss some of the above.
    """

    def __init__(self) -> None:
        #: what its start recorded (C{None} before it)
        self.pid: int | None = None
        self.host: str | None = None
        self.started_at: str | None = None
        self.sessions: dict[str, tuple[str, str]] = {}
        self.forward_states: dict[tuple[str, int, str], tuple[ForwardState, str]] = {}
        self.stale = False


def _check_replica_id(replica_id: str) -> None:
    if not replica_id:
        raise ValueError("a replica id must not be empty")


def _session(row: Any) -> SessionRecord:
    return SessionRecord(replica_id=row["replica_id"], peer=row["peer"], since=_stored_time(row["since"]))


def _put_session(db: _Connection, site: str, replica_id: str, peer: str, since: str) -> None:
    db.execute(
        "INSERT INTO site_sessions (site, replica_id, peer, since) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (site, replica_id) DO UPDATE SET peer = excluded.peer, since = excluded.since",
        (site, replica_id, peer, since),
    )


def _write_back(db: _Connection, replica_id: str, own: _OwnReplica, last_seen: str) -> None:
    """
    Make the database hold exactly what this connection recorded for a
    replica it runs (its sessions, its forwards' states), in the caller's
    transaction; the sites of the sessions dropped are last seen
    C{last_seen}.
    """
    _drop_replica_rows(db, replica_id, last_seen)
    for site, (peer, since) in sorted(own.sessions.items()):
        _put_session(db, site, replica_id, peer, since)
        db.execute("UPDATE sites SET connected = 1 WHERE name = ?", (site,))
    for _, (state, updated_at) in sorted(own.forward_states.items()):
        _put_states(db, [state], updated_at, replica_id)


def _drop_replica_rows(db: _Connection, replica_id: str, last_seen: str) -> None:
    """
    Delete a replica's sessions and forward states, in the caller's
    transaction; its sites left with no session are disconnected, last seen
    C{last_seen}.
    """
    db.execute(
        "UPDATE sites SET connected = 0, last_seen = ? "
        "WHERE name IN (SELECT site FROM site_sessions WHERE replica_id = ?) "
        "AND NOT EXISTS (SELECT 1 FROM site_sessions s WHERE s.site = sites.name AND s.replica_id != ?)",
        (last_seen, replica_id, replica_id),
    )
    db.execute("DELETE FROM site_sessions WHERE replica_id = ?", (replica_id,))
    db.execute("DELETE FROM forward_states WHERE replica_id = ?", (replica_id,))
