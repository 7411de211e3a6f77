"""
End to end, with real twistd processes on loopback: forwards added and
removed with C{rtunnel forwards} while the tunnel server runs (issue 11).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from typing import Any

import pytest

from rtunnel.identity.state import ServerState
from tests.e2e_support import EchoServer, read_until_closed
from tools.harness import Deployment, free_port, port_open, wait_until

pytestmark = pytest.mark.e2e

SITE = "alpha"
#: The contract: an addition or removal is applied within 2 s.
APPLY = 2.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    echo = EchoServer()
    d = Deployment(tmp_path_factory.mktemp("live-forwards"))
    command_line_port = free_port()
    d.start_server(forwards=[f"127.0.0.1:{command_line_port}:{SITE}:127.0.0.1:{echo.port}"])
    keyfile = d.create_keyfile(SITE)
    site = d.start_site(SITE, allow=[echo.target], keyfile=keyfile)
    d.wait_connected(SITE, watch=site)
    yield d, echo, command_line_port, site
    statuses = d.stop_all()
    echo.close()
    assert statuses == {"server": 0, f"site-{SITE}": 0}, statuses


def _forwards(d: Deployment) -> dict[int, dict[str, Any]]:
    result = d.rtunnel("forwards", "list", "--state", str(d.server_state), "--json")
    return {f["port"]: f for f in json.loads(result.stdout)}


def _echo_once(port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data, ended = read_until_closed(s, timeout=10)
    assert ended
    return data


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _add(d: Deployment, spec: str) -> float:
    """Add a forward; return when the command returned (monotonic)."""
    d.rtunnel("forwards", "add", spec, "--state", str(d.server_state))
    return time.monotonic()


def _wait_listening(d: Deployment, port: int) -> None:
    """
    Wait until the server reports the forward listening, without probing
    the port: a probe would be one more client in the counts the removal
    logs (its close goes through the site and may not be done yet).
    """
    wait_until(lambda: _forwards(d).get(port, {}).get("state") == "listening", APPLY + 1, "the forward to listen")


class _Reader(threading.Thread):
    """Reads a socket to its end, hashing what came."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.digest = hashlib.sha256()
        self.count = 0
        self.ended = False

    def run(self) -> None:
        while True:
            chunk = self.sock.recv(262144)
            if not chunk:
                self.ended = True
                return
            self.digest.update(chunk)
            self.count += len(chunk)


def test_add_while_a_transfer_runs_through_another_forward(world):
    """
    A forward added while a transfer runs through the command-line forward
    works within 2 s; the transfer, sent half before and half after the
    change, comes back intact; no session was opened again.
    """
    d, echo, command_line_port, site = world
    new_port = free_port()
    payload = os.urandom(16 * 1024 * 1024)
    half = len(payload) // 2
    with socket.create_connection(("127.0.0.1", command_line_port), timeout=30) as s:
        reader = _Reader(s)
        reader.start()
        s.sendall(payload[:half])
        wait_until(lambda: reader.count >= half, 30, "the first half to come back")
        added = _add(d, f"127.0.0.1:{new_port}:{SITE}:127.0.0.1:{echo.port}")
        wait_until(lambda: port_open("127.0.0.1", new_port), APPLY, "the new forward to listen")
        assert time.monotonic() - added < APPLY
        assert _echo_once(new_port, b"through the new forward") == b"through the new forward"
        s.sendall(payload[half:])
        s.shutdown(socket.SHUT_WR)
        reader.join(30)
    assert reader.ended
    assert reader.digest.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert _forwards(d)[new_port]["state"] == "listening"
    assert d.server.output().count(f"site {SITE} connected from") == 1
    assert site.output().count(f"site {SITE} connected to tunnel server") == 1
    assert "added from the database" in d.server.output()


def test_remove_closes_the_listener_and_open_connections_go_on(world):
    """
    Removing a forward closes its listener at once (new connections are
    refused within 2 s); a connection open through it goes on.
    """
    d, echo, _, _ = world
    port = free_port()
    _add(d, f"{port}:{SITE}:127.0.0.1:{echo.port}")
    _wait_listening(d, port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"before")
        assert s.recv(100) == b"before"
        d.rtunnel("forwards", "remove", str(port), "--state", str(d.server_state))
        # Wait for the log line, not for a refused probe: a probe that
        # connects while the listener still stands is one more client, and
        # the line would count it. The server logs only after the listener
        # has closed, so the port refuses from then on.
        wait_until(
            lambda: (
                f"127.0.0.1:{port} -> {SITE}:127.0.0.1:{echo.port} removed: listener closed, 1 open connections go on"
                in d.server.output()
            ),
            APPLY,
            "the removal to be applied and logged",
        )
        assert _refused(port)
        s.sendall(b"after")
        assert s.recv(100) == b"after"
        s.shutdown(socket.SHUT_WR)
        data, ended = read_until_closed(s, timeout=10)
    assert ended and data == b""
    assert port not in _forwards(d)


def test_remove_with_cut_closes_open_connections(world):
    """With --cut, the connections open through the removed forward are closed, with the reason logged."""
    d, echo, _, _ = world
    port = free_port()
    _add(d, f"{port}:{SITE}:127.0.0.1:{echo.port}")
    _wait_listening(d, port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"hello")
        assert s.recv(100) == b"hello"
        d.rtunnel("forwards", "remove", f"127.0.0.1:{port}", "--cut", "--state", str(d.server_state))
        start = time.monotonic()
        try:
            _, ended = read_until_closed(s, timeout=10)
        except ConnectionResetError:
            ended = True
        assert ended
        assert time.monotonic() - start < APPLY + 1
    assert _refused(port)
    output = d.server.output()
    assert "cut: forward removed with --cut" in output
    assert "removed: listener closed, 1 open connections cut (--cut)" in output


def test_a_port_in_use_is_reported_failed_and_the_server_runs_on(world):
    """A forward on a port someone else listens on is `failed: port in use`; everything else runs on."""
    d, echo, command_line_port, _ = world
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        _add(d, f"127.0.0.1:{port}:{SITE}:127.0.0.1:{echo.port}")
        wait_until(lambda: _forwards(d)[port]["state"] != "pending", APPLY, "the server to try the forward")
        entry = _forwards(d)[port]
        assert entry["state"].startswith("failed: port in use"), entry
        assert entry["source"] == "database"
        assert d.server.running()
        assert _echo_once(command_line_port) == b"ping"
    listing = d.rtunnel("forwards", "list", "--state", str(d.server_state)).stdout
    assert f"127.0.0.1:{port}:{SITE}:127.0.0.1:{echo.port}  database      failed: port in use" in listing
    d.rtunnel("forwards", "remove", str(port), "--state", str(d.server_state))


def test_a_forward_on_a_command_line_port_is_refused_naming_both(world):
    """`forwards add` on the port of the running server's --forward fails, naming both forwards."""
    d, echo, command_line_port, _ = world
    listed = _forwards(d)[command_line_port]
    assert listed["source"] == "command line" and listed["state"] == "listening"
    result = d.rtunnel(
        "forwards", "add", f"{command_line_port}:{SITE}:127.0.0.1:9", "--state", str(d.server_state), check=False
    )
    assert result.returncode == 1
    assert f"127.0.0.1:{command_line_port}:{SITE}:127.0.0.1:9" in result.stderr
    assert f"--forward 127.0.0.1:{command_line_port}:{SITE}:127.0.0.1:{echo.port}" in result.stderr
    assert command_line_port in _forwards(d) and _forwards(d)[command_line_port]["source"] == "command line"


def test_a_stored_forward_on_a_command_line_port_fails_at_start(tmp_path):
    """
    A forward stored while the server was down, on the port a --forward of
    the next start takes: the server starts and runs; the stored forward is
    `failed:` naming the command-line one.
    """
    d = Deployment(tmp_path)
    ServerState.load_or_create(d.server_state, ["127.0.0.1"]).close()
    port, other = free_port(), free_port()
    d.rtunnel("forwards", "add", f"{port}:beta:127.0.0.1:1", "--state", str(d.server_state))
    d.rtunnel("forwards", "add", f"{other}:beta:127.0.0.1:2", "--state", str(d.server_state))
    assert {f["state"] for f in _forwards(d).values()} == {"not running"}
    try:
        d.start_server(forwards=[f"127.0.0.1:{port}:gamma:127.0.0.1:3"])
        wait_until(lambda: _forwards(d)[other]["state"] == "listening", 10, "the stored forwards to be applied")
        stored = [f for f in json.loads(d.rtunnel("forwards", "list", "--state", str(d.server_state), "--json").stdout)]
        mine = [f for f in stored if f["port"] == port and f["source"] == "database"]
        theirs = [f for f in stored if f["port"] == port and f["source"] == "command line"]
        assert len(mine) == 1 and len(theirs) == 1, stored
        assert mine[0]["state"] == (
            f"failed: conflicts with the command-line forward --forward 127.0.0.1:{port}:gamma:127.0.0.1:3 "
            f"(both on 127.0.0.1:{port})"
        )
        assert theirs[0]["state"] == "listening"
        assert d.server.running()
    finally:
        statuses = d.stop_all()
    assert statuses == {"server": 0}
    assert {f["state"] for f in _forwards(d).values()} == {"not running"}
