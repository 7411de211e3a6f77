"""
End to end, with real twistd processes on loopback: a tunnel server with
forwards, a site enrolled from a keyfile, real TCP clients and services.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import socket
import time

import pytest

from tests.e2e_support import EchoServer, closed_port, read_until_closed
from tools.harness import Deployment, free_port, wait_until

pytestmark = pytest.mark.e2e

SITE = "alpha"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    echo = EchoServer()
    down = closed_port()
    not_allowed = closed_port()
    d = Deployment(tmp_path_factory.mktemp("forwarding"))
    ports = {name: free_port() for name in ("echo", "denied", "down", "absent")}
    d.start_server(
        forwards=[
            f"127.0.0.1:{ports['echo']}:{SITE}:127.0.0.1:{echo.port}",
            f"{ports['denied']}:{SITE}:127.0.0.1:{not_allowed}",
            f"127.0.0.1:{ports['down']}:{SITE}:127.0.0.1:{down}",
            f"127.0.0.1:{ports['absent']}:nosuchsite:127.0.0.1:{echo.port}",
        ],
        extra=["--open-timeout", "1"],
    )
    keyfile = d.create_keyfile(SITE)
    site = d.start_site(SITE, allow=[echo.target, f"127.0.0.1:{down}"], keyfile=keyfile, extra=["--retry-cap", "2"])
    d.wait_connected(SITE, watch=site)
    yield d, echo, ports, site
    statuses = d.stop_all()
    echo.close()
    assert statuses == {"server": 0, f"site-{SITE}": 0}, statuses


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def test_bytes_flow_both_ways_through_a_forward(world):
    """Four megabytes sent to a forward come back from the site's echo service unchanged."""
    d, echo, ports, _ = world
    payload = os.urandom(4 * 1024 * 1024)
    with _connect(ports["echo"]) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data, ended = read_until_closed(s, timeout=30)
    assert ended
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_half_close_reaches_the_site_and_the_reverse_direction_keeps_flowing(world):
    """
    The client's EOF reaches the site service (which sees EOF), while the
    service's replies still flow back; then the service's own EOF reaches
    the client.
    """
    d, echo, ports, _ = world
    before = echo.eof_seen
    with _connect(ports["echo"]) as s:
        s.sendall(b"first")
        s.shutdown(socket.SHUT_WR)
        wait_until(lambda: echo.eof_seen > before, 10, "the site service to see EOF")
        data, ended = read_until_closed(s, timeout=10)
    assert data == b"first"
    assert ended


def test_disallowed_target_is_refused_promptly_and_logged_on_both_ends(world):
    """
    A forward to a target missing from the site's --allow list gets its
    client closed at once; the site logs the refusal and the server logs
    the TARGET_NOT_ALLOWED reason it received.
    """
    d, _, ports, site = world
    start = time.monotonic()
    with _connect(ports["denied"]) as s:
        data, ended = read_until_closed(s, timeout=10)
    assert ended and data == b""
    assert time.monotonic() - start < 5
    wait_until(lambda: "TARGET_NOT_ALLOWED" in d.server.output(), 5, "the server to log the refusal")
    assert "not in the allowlist" in site.output()


def test_target_down_closes_the_client_with_the_reason_logged(world):
    """A target that refuses TCP closes the cloud client promptly; TARGET_REFUSED is logged."""
    d, _, ports, _ = world
    with _connect(ports["down"]) as s:
        data, ended = read_until_closed(s, timeout=10)
    assert ended and data == b""
    wait_until(lambda: "TARGET_REFUSED" in d.server.output(), 5, "the server to log TARGET_REFUSED")


def test_site_not_connected_closes_the_client_after_the_open_timeout(world):
    """A forward to a site that is not connected closes its client after --open-timeout (1 s here)."""
    d, _, ports, _ = world
    start = time.monotonic()
    with _connect(ports["absent"]) as s:
        data, ended = read_until_closed(s, timeout=10)
    elapsed = time.monotonic() - start
    assert ended and data == b""
    assert 0.9 <= elapsed < 5
    wait_until(lambda: "not connected within 1s" in d.server.output(), 5, "the server to log the reason")


def test_a_thousand_concurrent_streams_each_carry_their_own_data(world):
    """
    1,000 client connections open at once through one forward (one tunnel),
    each sends distinct bytes and gets exactly its own bytes back.
    """
    d, _, ports, _ = world
    count = 1000
    sel = selectors.DefaultSelector()
    expected: dict[socket.socket, bytes] = {}
    received: dict[socket.socket, bytearray] = {}
    try:
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", ports["echo"]), timeout=10)
            payload = hashlib.sha256(str(i).encode()).digest() * 32  # 1 KiB, distinct per stream
            s.sendall(payload)
            s.setblocking(False)
            expected[s] = payload
            received[s] = bytearray()
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        done = 0
        while done < count and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                s = key.fileobj
                chunk = s.recv(65536)
                received[s] += chunk
                if len(received[s]) >= len(expected[s]):
                    sel.unregister(s)
                    done += 1
        assert done == count
        assert all(bytes(received[s]) == expected[s] for s in expected)
    finally:
        for s in expected:
            s.close()
        sel.close()


def test_sites_list_reports_the_connected_site(world):
    """`rtunnel sites list --json` shows the site as connected, from a loopback peer."""
    d, _, _, _ = world
    entries = {s["name"]: s for s in d.sites()}
    assert entries[SITE]["connected"] is True
    assert entries[SITE]["peer"].startswith("127.0.0.1:")


def test_keyfile_without_address_names_the_port_the_server_listens_on(world, tmp_path):
    """
    `rtunnel keyfile create` without --address names the server's public
    address with the port the running server listens on (not a fixed 5500).
    """
    d, _, _, _ = world
    output = tmp_path / "beta.rtkey"
    d.rtunnel("keyfile", "create", "--state", str(d.server_state), "--site", "beta", "--output", str(output))
    addresses = json.loads(output.read_text())["addresses"]
    assert addresses == [f"127.0.0.1:{d.server_port}"]
