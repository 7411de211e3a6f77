"""
Two real C{twistd rtunnel-server} processes as replicas of each other on one
state (the same C{--state}, and C{--database} on PostgreSQL; their own
C{--listen} port, C{--replica-id} and C{--advertise}), and a site enrolled
through one of them; on SQLite, and on a throwaway PostgreSQL cluster
(skipped without PostgreSQL: tests/pg_support.py).

Both record themselves and see each other (C{rtunnel replicas list}, the
C{rtunnel_replicas} metric); the site is told both (it can reach the second
only through the address the REPLICAS frame advertised) and holds a session
with each; a revocation by the C{rtunnel} command is seen by both replicas'
polls within 2 s; a replica killed with -9 drops out of the set within
REPLICA_TIMEOUT + 2 s, and the other says who left.
"""

from __future__ import annotations

import functools
import json
import time
import urllib.request
from typing import Any

import pytest

from rtunnel.identity.store import REPLICA_TIMEOUT
from tests.pg_support import cluster
from tools.harness import Deployment, Process, free_port, port_open, wait_until

pytestmark = pytest.mark.e2e

SITE = "alpha"


def metric(port: int, name: str) -> str:
    """The lines of one metric family from a server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


def api_site(port: int, site: str) -> dict[str, Any]:
    """One SITE from a server's JSON API."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/sites/{site}", timeout=10) as response:
        value: dict[str, Any] = json.loads(response.read())
    return value


def cut_off(port: int) -> bool:
    """Whether the server with this admin port has the site revoked and without a session."""
    site = api_site(port, SITE)
    return bool(site["revoked"] and not site["connected"])


def replicas(d: Deployment) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(d.rtunnel("replicas", "list", *d.state_args(), "--json").stdout)
    return listed


def sessions(d: Deployment, site: str) -> list[str]:
    """The replicas the site has a session with, as C{rtunnel sites list} reads them from the database."""
    for record in d.sites():
        if record["name"] == site:
            return sorted(s["replica"] for s in record["sessions"])
    return []


def wait_for_line(process: Process, text: str, timeout: float) -> None:
    wait_until(lambda: text in process.output(), timeout, f"{process.name} to log {text!r}")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    database = None
    if request.param == "postgresql":
        pg = cluster()
        name = pg.new_database()
        database = pg.url(name, tcp=True)
    d = Deployment(tmp_path_factory.mktemp(f"server-replicas-{request.param}"), database=database)
    port_a, port_b = d.server_port, free_port()
    admin_a, admin_b = free_port(), free_port()
    d.admin = f"tcp:{admin_a}:interface=127.0.0.1"
    a = d.start_server(extra=["--replica-id", "cloud-a", "--advertise", f"127.0.0.1:{port_a}"])
    b = d.twistd(
        "server-b",
        [
            "rtunnel-server",
            *d.state_args(),
            "--listen",
            f"tcp:{port_b}:interface=127.0.0.1",
            "--public-address",
            "127.0.0.1",
            "--admin",
            f"tcp:{admin_b}:interface=127.0.0.1",
            "--replica-id",
            "cloud-b",
            "--advertise",
            f"127.0.0.1:{port_b}",
        ],
    )
    wait_until(lambda: port_open("127.0.0.1", port_b) or not b.running(), 30, "replica cloud-b to listen")
    assert b.running(), b.output()
    keyfile = d.create_keyfile(SITE)  # dials cloud-a; cloud-b only where REPLICAS advertised it
    site = d.start_site(SITE, allow=[], keyfile=keyfile, extra=["--retry-cap", "2"])
    yield d, a, b, site, (admin_a, admin_b)
    d.stop_all()
    if database is not None:
        pg.drop_database(name)


def test_both_replicas_recorded(world):  # type: ignore[no-untyped-def]
    """Each replica records itself (id, advertised address, pid) and counts the other."""
    d, a, b, _, (admin_a, admin_b) = world
    wait_until(lambda: len(replicas(d)) == 2, 15, "both replicas to be listed")
    listed = {r["replica"]: r for r in replicas(d)}
    assert listed["cloud-a"]["pid"] == a.pid and listed["cloud-b"]["pid"] == b.pid
    assert listed["cloud-a"]["advertise"] == f"127.0.0.1:{d.server_port}"
    assert all(r["heartbeat_age_seconds"] < REPLICA_TIMEOUT for r in listed.values())
    wait_until(lambda: metric(admin_a, "rtunnel_replicas ") == "rtunnel_replicas 2.0", 10, "cloud-a to count 2")
    assert metric(admin_b, "rtunnel_replica_info") == 'rtunnel_replica_info{replica="cloud-b"} 1.0'
    assert "replica set changed: cloud-b joined; now 2: cloud-a, cloud-b" in a.output()


def test_site_told_both_holds_both(world):  # type: ignore[no-untyped-def]
    """
    The site, whose keyfile names cloud-a only, is told both replicas and
    holds a session with each (cloud-b reached at its advertised address).
    """
    d, _, _, site, _ = world

    def both() -> bool:
        assert site.running(), site.output()
        return sessions(d, SITE) == ["cloud-a", "cloud-b"]

    wait_until(both, 30, "the site to hold a session with both replicas")


def test_second_server_on_a_taken_port_records_nothing(world):  # type: ignore[no-untyped-def]
    """
    A server started by mistake with the same state, port and id as a
    running replica cannot listen and exits with status 1, recording
    nothing: the running replica's row and the site's sessions stay as
    they were (no stop record under the shared id, nothing to write back).
    """
    d, a, _, _, _ = world
    wait_until(lambda: sessions(d, SITE) == ["cloud-a", "cloud-b"], 30, "the site's two sessions")
    started = {r["replica"]: r["started_at"] for r in replicas(d)}
    duplicate = d.twistd(
        "server-duplicate",
        [
            "rtunnel-server",
            *d.state_args(),
            "--listen",
            f"tcp:{d.server_port}:interface=127.0.0.1",
            "--admin",
            "none",
            "--replica-id",
            "cloud-a",
        ],
    )
    assert duplicate.wait(30) == 1, duplicate.output()
    assert "Address already in use" in duplicate.output()
    assert {r["replica"]: r["started_at"] for r in replicas(d)} == started
    assert sessions(d, SITE) == ["cloud-a", "cloud-b"]
    assert "written back" not in a.output()


def test_revocation_seen_by_both_within_two_seconds(world):  # type: ignore[no-untyped-def]
    """
    rtunnel sites revoke (another process) is seen by the revocation poll
    of both replicas within 2 s of the command's return: each reports the
    site revoked and without a session (the first to cut it may make the
    site give up and close its other session before the second cuts it).
    """
    d, a, b, site, admins = world
    wait_until(lambda: sessions(d, SITE) == ["cloud-a", "cloud-b"], 30, "the site's two sessions")
    d.rtunnel("sites", "revoke", *d.state_args(), SITE)
    revoked = time.monotonic()
    for admin in admins:
        wait_until(
            functools.partial(cut_off, admin),
            2.0 - (time.monotonic() - revoked),
            f"the replica with admin port {admin} to see the revocation",
        )
    assert "cutting site alpha: site-revoked" in a.output() + b.output()
    wait_until(lambda: not site.running(), 30, "the revoked site to give up")


def test_killed_replica_drops_out(world):  # type: ignore[no-untyped-def]
    """
    A replica killed with -9 sends no more heartbeats: it is gone from the
    set within REPLICA_TIMEOUT + 2 s, and the one left says who left.
    """
    d, a, b, _, (admin_a, _) = world
    assert len(replicas(d)) == 2
    b.kill()
    killed = time.monotonic()
    wait_until(lambda: [r["replica"] for r in replicas(d)] == ["cloud-a"], REPLICA_TIMEOUT + 2, "cloud-b to drop out")
    assert time.monotonic() - killed < REPLICA_TIMEOUT + 2
    wait_for_line(a, "replica set changed: cloud-b left; now 1: cloud-a", 5)
    assert metric(admin_a, "rtunnel_replicas ") == "rtunnel_replicas 1.0"
