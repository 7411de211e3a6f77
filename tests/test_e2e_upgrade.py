"""
End to end: a tunnel server started on a state directory whose database
rtunnel 0.2.0 wrote (the fixture tests/fixtures/state-0.2.0.sql) upgrades it
in place at start, says so in one log line, and serves from it: the sites,
tokens and revocations of 0.2.0 are all there for the rtunnel command.
"""

from __future__ import annotations

import sqlite3

import pytest

from rtunnel.identity.migrations import SCHEMA_VERSION
from rtunnel.identity.state import DATABASE, ServerState
from tests.test_migrations import V020
from tools.harness import Deployment

pytestmark = pytest.mark.e2e


def test_server_upgrades_a_0_2_0_database(tmp_path):
    d = Deployment(tmp_path)
    ServerState.load_or_create(d.server_state, ["127.0.0.1"]).close()
    database = d.server_state / DATABASE
    for suffix in ("", "-wal", "-shm"):
        database.with_name(DATABASE + suffix).unlink(missing_ok=True)
    raw = sqlite3.connect(database)
    raw.executescript(V020.read_text())
    raw.execute("PRAGMA journal_mode = WAL").fetchone()
    raw.close()
    database.chmod(0o600)

    server = d.start_server()
    assert (
        f"upgraded state database {database} from schema version 1 to {SCHEMA_VERSION}: "
        "live forwards, announced services, admission counter"
    ) in server.output()
    sites = {site["name"]: site for site in d.sites()}
    assert sorted(sites) == ["alpha", "beta", "delta", "gamma"]
    assert sites["alpha"]["enrolled_at"] and not sites["alpha"]["revoked_at"]
    assert sites["beta"]["revoked_at"]
    assert d.rtunnel("database", "upgrade", "--state", str(d.server_state)).stdout == (
        f"state database {database}: schema version {SCHEMA_VERSION}, already current\n"
    )
    assert d.rtunnel("forwards", "list", "--state", str(d.server_state)).returncode == 0
    assert d.stop_all() == {"server": 0}
