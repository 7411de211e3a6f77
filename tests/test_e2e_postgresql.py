"""
End to end on PostgreSQL: a real C{twistd rtunnel-server --database
postgresql://...} (its state in a throwaway cluster, tests/pg_support.py)
enrolls a site from a keyfile the C{rtunnel} command created in the same
database, serves a forward to it, and cuts it when C{rtunnel sites revoke}
revokes it through another connection: the revocation poll sees changes
without SQLite's data_version.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request

import pytest

from tests.e2e_support import EchoServer, read_until_closed
from tests.pg_support import PostgreSQLCluster, cluster, skip_unless_available
from tools.harness import Deployment, free_port, wait_until

pytestmark = pytest.mark.e2e

SITE = "alpha"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pg = cluster()
    name = pg.new_database()
    echo = EchoServer()
    d = Deployment(tmp_path_factory.mktemp("postgresql"), database=pg.url(name, tcp=True))
    port = free_port()
    d.start_server(forwards=[f"127.0.0.1:{port}:{SITE}:127.0.0.1:{echo.port}"], extra=["--open-timeout", "1"])
    keyfile = d.create_keyfile(SITE)
    site = d.start_site(SITE, allow=[echo.target], keyfile=keyfile, extra=["--retry-cap", "2"])
    d.wait_connected(SITE, watch=site)
    yield d, port, site
    statuses = d.stop_all()
    echo.close()
    pg.drop_database(name)
    assert statuses["server"] == 0, statuses


def _echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data, _ = read_until_closed(s, 10)
        return data


def test_state_is_in_postgresql_not_in_the_directory(world):
    """The state directory holds the CA and the server identity only; the site is listed from PostgreSQL."""
    d, _, _ = world
    assert sorted(os.listdir(d.server_state)) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    [record] = d.sites()
    assert record["name"] == SITE and record["connected"] and record["enrolled_at"]


def test_forward_serves_the_site(world):
    """A megabyte through the forward comes back from the site's echo service unchanged."""
    _, port, _ = world
    payload = os.urandom(1024 * 1024)
    assert _echo(port, payload) == payload


def test_revocation_through_another_connection_cuts_the_site(world):
    """
    Revoked by the rtunnel command (its own database connection), the site
    is cut by the server within seconds, and the forward no longer reaches it.
    """
    d, port, _ = world
    d.rtunnel("sites", "revoke", SITE, *d.state_args())
    started = time.monotonic()
    wait_until(lambda: not d.site_connected(SITE), 10, "the revoked site to be cut")
    assert time.monotonic() - started < 10
    [record] = d.sites()
    assert record["revoked_at"]
    assert _echo(port, b"hello") == b""
    assert d.server is not None
    assert f"cutting site {SITE}: site-revoked" in d.server.output()


def _readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_database_down_and_back(tmp_path):
    """
    PostgreSQL stopped while the server runs: the site stays connected and
    its forward works, /readyz says the database is failing; started again,
    the server reconnects on its own (/readyz ready) and sees a revocation
    made after the outage.
    """
    skip_unless_available()
    pg = PostgreSQLCluster()  # a cluster of its own: this test stops it
    pg.start()
    try:
        echo = EchoServer()
        admin = free_port()
        d = Deployment(tmp_path, database=pg.url(pg.new_database(), tcp=True), admin=f"tcp:{admin}:interface=127.0.0.1")
        port = free_port()
        d.start_server(forwards=[f"127.0.0.1:{port}:{SITE}:127.0.0.1:{echo.port}"])
        keyfile = d.create_keyfile(SITE)
        site = d.start_site(SITE, allow=[echo.target], keyfile=keyfile, extra=["--retry-cap", "2"])
        d.wait_connected(SITE, watch=site)
        assert _readyz(admin) == (200, "ready\n")

        pg.stop_server()
        wait_until(lambda: _readyz(admin)[0] == 503, 10, "/readyz to report the database down")
        assert "the state database is failing" in _readyz(admin)[1]
        assert _echo(port, b"still here") == b"still here"
        assert site.running()

        pg.start_server()
        wait_until(lambda: _readyz(admin)[0] == 200, 15, "/readyz to be ready again")
        d.rtunnel("sites", "revoke", SITE, *d.state_args())
        wait_until(lambda: not d.site_connected(SITE), 10, "the site revoked after the outage to be cut")
        assert d.server is not None
        log = d.server.output()
        assert "state database works again" in log
        assert f"cutting site {SITE}: site-revoked" in log
        statuses = d.stop_all()
        echo.close()
        assert statuses["server"] == 0, statuses
    finally:
        pg.stop()
