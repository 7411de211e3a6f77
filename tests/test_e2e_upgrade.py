"""
End to end: a tunnel server started on a state directory whose database
rtunnel 0.2.0 wrote (the fixture tests/fixtures/state-0.2.0.sql) upgrades it
in place at start, says so in one log line, and serves from it: the sites,
tokens and revocations of 0.2.0 are all there for the rtunnel command. The
same from schema version 2 (tests/fixtures/state-v2.sql, before replicas):
its forwards too, and the server is then listed as a replica.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from rtunnel.identity.migrations import SCHEMA_VERSION
from rtunnel.identity.state import DATABASE, ServerState
from tests.test_migrations import V020, V2
from tools.harness import Deployment, wait_until

pytestmark = pytest.mark.e2e


_V3 = "server replicas, site sessions per replica, forward states per replica"


def _state_from(d: Deployment, fixture: Path) -> Path:
    """A server state directory whose database is the fixture's."""
    ServerState.load_or_create(d.server_state, ["127.0.0.1"]).close()
    database = d.server_state / DATABASE
    for suffix in ("", "-wal", "-shm"):
        database.with_name(DATABASE + suffix).unlink(missing_ok=True)
    raw = sqlite3.connect(database)
    raw.executescript(fixture.read_text())
    raw.execute("PRAGMA journal_mode = WAL").fetchone()
    raw.close()
    database.chmod(0o600)
    return database


def test_server_upgrades_a_0_2_0_database(tmp_path):
    d = Deployment(tmp_path)
    database = _state_from(d, V020)

    server = d.start_server()
    assert (
        f"upgraded state database {database} from schema version 1 to {SCHEMA_VERSION}: "
        f"live forwards, announced services, admission counter; {_V3}"
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


def test_server_upgrades_a_version_2_database(tmp_path):
    d = Deployment(tmp_path)
    database = _state_from(d, V2)

    server = d.start_server()
    assert f"upgraded state database {database} from schema version 2 to {SCHEMA_VERSION}: {_V3}" in server.output()
    sites = {site["name"]: site for site in d.sites()}
    assert sorted(sites) == ["alpha", "beta", "gamma"]
    assert sites["beta"]["revoked_at"]
    assert sites["alpha"]["connected"] is False and sites["alpha"]["sessions"] == []
    listed = json.loads(d.rtunnel("forwards", "list", "--state", str(d.server_state), "--json").stdout)
    assert [(f["spec"], f["source"]) for f in listed] == [("127.0.0.1:9000:alpha:localhost:22", "database")]

    # the server records itself as a replica in the upgraded database
    def replicas():
        return json.loads(d.rtunnel("replicas", "list", "--state", str(d.server_state), "--json").stdout)

    wait_until(lambda: replicas() != [], 15, "the server to record itself as a replica")
    assert [r["pid"] for r in replicas()] == [server.pid]
    assert d.stop_all() == {"server": 0}
