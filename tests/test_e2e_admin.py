"""
End to end, real twistd processes on loopback: the admin endpoint of both
roles (C{--admin}), and C{rtunnel sites list} with the server's live
figures and without them.

The harness gives every server C{--admin tcp:0:interface=127.0.0.1}, so the
port is the kernel's pick; the server records the URL with the real port
in its state database, which is how these tests (and the CLI) find it.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rtunnel.identity.state import DATABASE
from rtunnel.identity.store import StateStore
from rtunnel.observe.live import ADMIN_URL_KEY
from tests.e2e_support import EchoServer, read_until_closed
from tools.harness import Deployment, free_port, wait_until

pytestmark = pytest.mark.e2e


def recorded_url(d: Deployment) -> str | None:
    store = StateStore(d.server_state / DATABASE, create=False)
    try:
        return store.get_meta(ADMIN_URL_KEY)
    finally:
        store.close()


def admin_url(d: Deployment) -> str:
    """The server's admin URL, once it has recorded it."""
    wait_until(lambda: bool(recorded_url(d)), 30, "the server to record its admin URL")
    url = recorded_url(d)
    assert url
    return url


def get(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    """Status, content type and body; error statuses are answers too."""
    request = urllib.request.Request(url, method=method, data=b"x" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process C{pid} listens on (from /proc: its socket inodes in LISTEN state)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_server_admin_endpoint_and_live_sites_list(tmp_path: Path) -> None:
    """
    The server's admin endpoint answers /healthz, /readyz, /metrics (with
    build info), refuses POST; rtunnel sites list shows the live columns
    while it runs and says it falls back once the server is stopped, when
    the recorded URL is cleared.
    """
    echo = EchoServer()
    d = Deployment(tmp_path)
    forward = free_port()
    try:
        server = d.start_server(forwards=[f"127.0.0.1:{forward}:alpha:127.0.0.1:{echo.port}"])
        site = d.start_site("alpha", allow=[echo.target], keyfile=d.create_keyfile("alpha"))
        d.wait_connected("alpha", watch=site)
        url = admin_url(d)
        port = int(url.rsplit(":", 1)[1])
        assert url == f"http://127.0.0.1:{port}" and port != 5501
        assert f"admin endpoint listening on 127.0.0.1:{port}" in server.output()

        assert get(url + "/healthz") == (200, "text/plain; charset=utf-8", b"ok\n")
        assert get(url + "/readyz") == (200, "text/plain; charset=utf-8", b"ready\n")
        status, content_type, body = get(url + "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        assert b"rtunnel_build_info{" in body
        status, _, body = get(url + "/readyz", method="POST")
        assert status == 405 and b"read-only" in body

        payload = os.urandom(300 * 1024)
        with socket.create_connection(("127.0.0.1", forward), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            data, ended = read_until_closed(s, timeout=30)
        assert ended and data == payload

        def traffic_listed() -> bool:
            [alpha] = d.sites()
            return bool(alpha["streams"] == 0 and (alpha["bytes_to_site"] or 0) >= len(payload))

        wait_until(traffic_listed, 10, "the traffic, its stream closed, in sites list --json")
        result = d.rtunnel("sites", "list", "--state", str(d.server_state), "--json")
        assert result.stderr == ""
        [alpha] = json.loads(result.stdout)
        assert alpha["streams"] == 0
        assert alpha["bytes_from_site"] >= len(payload)
        assert alpha["connected"] is True
        table = d.rtunnel("sites", "list", "--state", str(d.server_state))
        header, row = table.stdout.splitlines()
        live_columns = ["STREAMS", "BYTES", "RTT"]
        assert header.split() == ["SITE", "ENROLLED", "REVOKED", "SERVICES", *live_columns, "REPLICAS", "CONNECTED"]
        assert "K/" in row and table.stderr == ""

        assert d.stop_all() == {"server": 0, "site-alpha": 0}
        assert recorded_url(d) == ""  # cleared at stop
        table = d.rtunnel("sites", "list", "--state", str(d.server_state))
        header = table.stdout.splitlines()[0]
        assert header.split() == ["SITE", "ENROLLED", "REVOKED", "SERVICES", "REPLICAS", "CONNECTED"]
        assert table.stderr == (
            "rtunnel: no live figures: the tunnel server is not running; listing the state database alone\n"
        )
    finally:
        d.stop_all()
        echo.close()


def test_unanswered_admin_url_falls_back(tmp_path: Path) -> None:
    """A running server whose admin endpoint does not answer (stopped here with SIGSTOP): the line names the URL."""
    d = Deployment(tmp_path)
    try:
        server = d.start_server()
        site = d.start_site("alpha", allow=[], keyfile=d.create_keyfile("alpha"))
        d.wait_connected("alpha", watch=site)
        url = admin_url(d)
        server.signal(19)  # SIGSTOP: the port still accepts (the backlog), nothing answers
        try:
            result = d.rtunnel("sites", "list", "--state", str(d.server_state))
        finally:
            server.signal(18)  # SIGCONT
        assert result.stdout.splitlines()[0].split()[-1] == "CONNECTED"
        assert "STREAMS" not in result.stdout
        assert result.stderr == (
            f"rtunnel: no live figures: {url}/api/v1/sites: no answer within 2s; listing the state database alone\n"
        )
    finally:
        assert d.stop_all() == {"server": 0, "site-alpha": 0}


def test_admin_none_leaves_no_port(tmp_path: Path) -> None:
    """--admin none: the server listens on its tunnel port only and records no URL; sites list says why."""
    d = Deployment(tmp_path, admin="none")
    try:
        server = d.start_server()
        site = d.start_site("alpha", allow=[], keyfile=d.create_keyfile("alpha"))
        d.wait_connected("alpha", watch=site)
        assert listening_ports(server.pid) == {d.server_port}
        assert "admin endpoint" not in server.output()
        assert recorded_url(d) is None
        result = d.rtunnel("sites", "list", "--state", str(d.server_state))
        assert "has no admin endpoint (--admin none)" in result.stderr
    finally:
        assert d.stop_all() == {"server": 0, "site-alpha": 0}


def test_site_admin_readiness_follows_the_session(tmp_path: Path) -> None:
    """
    A site's --admin: /readyz is 200 while its tunnel session is open, 503
    with the reason while the server is away, 200 again once it is back;
    /metrics and /healthz answer throughout.
    """
    d = Deployment(tmp_path)
    admin = free_port()
    url = f"http://127.0.0.1:{admin}"
    try:
        d.start_server()
        site = d.start_site(
            "alpha", allow=[], keyfile=d.create_keyfile("alpha"), extra=["--admin", f"tcp:{admin}", "--retry-cap", "1"]
        )
        d.wait_connected("alpha", watch=site)
        wait_until(lambda: get(url + "/readyz")[0] == 200, 10, "the site to be ready")
        assert get(url + "/readyz")[2] == b"ready\n"
        assert f"admin endpoint listening on 127.0.0.1:{admin}" in site.output()
        assert get(url + "/")[0] == 404  # no status page on a site
        status, _, body = get(url + "/metrics")
        assert status == 200 and b"rtunnel_" in body

        assert d.server is not None
        assert d.server.stop() == 0
        wait_until(lambda: get(url + "/readyz")[0] == 503, 15, "the site to be not ready")
        status, _, body = get(url + "/readyz")
        assert body.startswith(b"not ready: no tunnel session with the tunnel server")
        assert get(url + "/healthz")[0] == 200

        d.start_server()
        wait_until(lambda: get(url + "/readyz")[0] == 200, 30, "the site to be ready again")
    finally:
        d.stop_all()


def test_admin_beyond_loopback_is_warned_about(tmp_path: Path) -> None:
    """
    --admin on an address that is not loopback logs what it would expose
    before it listens. The address is TEST-NET-1 (192.0.2.1), which this
    host does not have: the listen fails (exit 1, naming the endpoint), so
    nothing is ever bound beyond loopback by the test.
    """
    d = Deployment(tmp_path, admin="tcp:0:interface=192.0.2.1")
    server = d.start_server(wait=False)
    assert server.wait(30) == 1
    output = server.output()
    assert (
        "admin endpoint listens on 192.0.2.1, not loopback: anyone who can reach it reads every site's name" in output
    )
    assert "cannot listen on tcp:0:interface=192.0.2.1" in output
