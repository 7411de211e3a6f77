"""
The state database's schema, as numbered migrations per SQL dialect.

A database records the number of the last migration applied to it
(C{meta.schema_version}). Opening it applies the missing ones, in order, in
one transaction that holds the database's write lock (SQLite's C{BEGIN
IMMEDIATE}, PostgreSQL's advisory lock, see L{rtunnel.identity.store}): two
processes starting at once queue, and the second finds the work done. A
database with a higher number than L{SCHEMA_VERSION} was written by a newer
rtunnel and is refused.

Never edit a migration that has shipped: a database that applied it will not
apply it again. Add a new one, to every dialect, with the same number.

Each list is kept self-contained rather than generated from one source: the
dialects will diverge (types, indexes) and each must read as the exact DDL
its databases received.
"""

from __future__ import annotations

from attrs import frozen

__all__ = ["POSTGRESQL", "SCHEMA_VERSION", "SQLITE", "Migration", "migrations_for"]


@frozen
class Migration:
    """
    One step of the schema.

    @ivar version: the schema version a database has after this step.
    @ivar why: what it adds, for the upgrade's log line.
    @ivar statements: the statements, run in order in one transaction.
    """

    version: int
    why: str
    statements: tuple[str, ...]


# Version 1 is the schema as rtunnel 0.1 and 0.2.0 created it: the exact DDL,
# so that a database made by them and one made here from empty are the same.
_BASE = (
    """CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
)""",
    """CREATE TABLE sites (
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
)""",
    """CREATE TABLE tokens (
    digest TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    spent_at TEXT,
    key_fingerprint TEXT,
    certificate_fingerprint TEXT,
    certificate_pem TEXT,
    withdrawn_at TEXT
)""",
    "CREATE INDEX tokens_by_site ON tokens (site)",
)

# Version 2: the live forwards and announced services of issue 11, which the
# store used to add to a version-1 database when missing (hence IF NOT
# EXISTS: a database made between 0.2.0 and this version has them), and the
# admission counter: bumped in the transaction of every enrollment and
# revocation, so that a poller on a database without SQLite's data_version
# (PostgreSQL) sees another process's admission changes.
_FORWARDS_AND_SERVICES = (
    """CREATE TABLE IF NOT EXISTS forwards (
    bind TEXT NOT NULL,
    port INTEGER NOT NULL,
    site TEXT NOT NULL,
    host TEXT NOT NULL,
    hostport INTEGER NOT NULL,
    added_at TEXT NOT NULL,
    removed INTEGER NOT NULL DEFAULT 0,
    cut INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (bind, port)
)""",
    """CREATE TABLE IF NOT EXISTS forward_states (
    bind TEXT NOT NULL,
    port INTEGER NOT NULL,
    source TEXT NOT NULL,
    site TEXT NOT NULL,
    host TEXT NOT NULL,
    hostport INTEGER NOT NULL,
    state TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (bind, port, source)
)""",
    """CREATE TABLE IF NOT EXISTS site_services (
    site TEXT PRIMARY KEY,
    services TEXT NOT NULL,
    announced_at TEXT NOT NULL
)""",
    "INSERT INTO meta (key, value) VALUES ('admission_version', '0') ON CONFLICT (key) DO NOTHING",
)

# Version 3: server replicas sharing one database (issue 13). Each replica
# records itself with a heartbeat; a site's sessions are recorded per
# replica, and so are the forwards' states (replica_id joins their key: every
# replica listens on every forward). The states an older server recorded keep
# replica id '' (that server's).
_REPLICAS = (
    """CREATE TABLE IF NOT EXISTS replicas (
    replica_id TEXT PRIMARY KEY,
    advertise TEXT NOT NULL DEFAULT '',
    pid INTEGER,
    host TEXT,
    started_at TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS site_sessions (
    site TEXT NOT NULL,
    replica_id TEXT NOT NULL,
    peer TEXT NOT NULL,
    since TEXT NOT NULL,
    PRIMARY KEY (site, replica_id)
)""",
)

# SQLite cannot change a table's primary key in place: the table is made
# anew under another name, filled, and renamed.
_SQLITE_FORWARD_STATES_PER_REPLICA = (
    """CREATE TABLE forward_states_v3 (
    bind TEXT NOT NULL,
    port INTEGER NOT NULL,
    source TEXT NOT NULL,
    site TEXT NOT NULL,
    host TEXT NOT NULL,
    hostport INTEGER NOT NULL,
    state TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    replica_id TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (bind, port, source, replica_id)
)""",
    "INSERT INTO forward_states_v3 (bind, port, source, site, host, hostport, state, updated_at) "
    "SELECT bind, port, source, site, host, hostport, state, updated_at FROM forward_states",
    "DROP TABLE forward_states",
    "ALTER TABLE forward_states_v3 RENAME TO forward_states",
)

_POSTGRESQL_FORWARD_STATES_PER_REPLICA = (
    "ALTER TABLE forward_states ADD COLUMN replica_id TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE forward_states DROP CONSTRAINT forward_states_pkey",
    "ALTER TABLE forward_states ADD PRIMARY KEY (bind, port, source, replica_id)",
)

_REPLICAS_WHY = "server replicas, site sessions per replica, forward states per replica"

SQLITE: tuple[Migration, ...] = (
    Migration(1, "tokens, sites and metadata", _BASE),
    Migration(2, "live forwards, announced services, admission counter", _FORWARDS_AND_SERVICES),
    Migration(3, _REPLICAS_WHY, (*_REPLICAS, *_SQLITE_FORWARD_STATES_PER_REPLICA)),
)

# The same DDL reads right on PostgreSQL today (TEXT timestamps as ISO 8601,
# INTEGER flags); it is repeated, not shared, so that a later SQLite-only
# change cannot alter what PostgreSQL databases received.
POSTGRESQL: tuple[Migration, ...] = (
    Migration(1, "tokens, sites and metadata", tuple(_BASE)),
    Migration(2, "live forwards, announced services, admission counter", tuple(_FORWARDS_AND_SERVICES)),
    Migration(3, _REPLICAS_WHY, (*_REPLICAS, *_POSTGRESQL_FORWARD_STATES_PER_REPLICA)),
)

#: The schema version this rtunnel writes: the last migration of every dialect.
SCHEMA_VERSION = 3

for _dialect in (SQLITE, POSTGRESQL):
    assert [m.version for m in _dialect] == list(range(1, SCHEMA_VERSION + 1)), "migrations must be numbered 1..N"


def migrations_for(dialect: str, after: int) -> tuple[Migration, ...]:
    """
    The migrations a database of C{dialect} (C{"sqlite"} or
    C{"postgresql"}) at schema version C{after} (0: empty) still needs.
    """
    steps = {"sqlite": SQLITE, "postgresql": POSTGRESQL}[dialect]
    return tuple(m for m in steps if m.version > after)
