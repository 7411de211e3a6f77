"""
Staying connected through faults, with real twistd processes and sockets:
server crash and restart, site restart, a black-holed path, a takeover of a
half-dead session, hostile clients on the tunnel port, a stream flood, and a
graceful drain. Timeouts are made small through configuration; every wait
polls a real condition with a bound.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import threading
import time

import pytest

from tests.e2e_support import EchoServer, Relay, read_until_closed
from tools.harness import Deployment, free_port, wait_until

pytestmark = pytest.mark.e2e

FAST = ["--keepalive", "0.5", "--keepalive-timeout", "2", "--retry-cap", "1"]
FAST_SERVER = ["--keepalive", "0.5", "--keepalive-timeout", "2", "--open-timeout", "3"]


def echo_roundtrip(port: int, payload: bytes | None = None, timeout: float = 10) -> bool:
    """Send C{payload} through a forward to the echo service while reading
    the echo back (an echo that is not read stalls, as it should)."""
    payload = payload or os.urandom(4096)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:

        def send() -> None:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        data, ended = read_until_closed(s, timeout)
        sender.join(timeout)
    return ended and hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_server_killed_during_a_transfer_comes_back_without_touching_the_site(tmp_path, echo):
    """
    kill -9 of the server in the middle of a transfer breaks that transfer;
    once the server is started again (same state) the site reconnects by
    itself and a new forwarded connection works within the backoff cap.
    """
    d = Deployment(tmp_path)
    fwd = free_port()
    forward = [f"127.0.0.1:{fwd}:s1:127.0.0.1:{echo.port}"]
    d.start_server(forwards=forward, extra=FAST_SERVER)
    site = d.start_site("s1", allow=[echo.target], keyfile=d.create_keyfile("s1"), extra=FAST)
    try:
        d.wait_connected("s1", watch=site)
        s = socket.create_connection(("127.0.0.1", fwd), timeout=10)
        s.sendall(os.urandom(1 << 20))
        assert d.server.kill() == -9
        data, ended = read_until_closed(s, timeout=10)
        s.close()
        assert ended  # the client sees its connection end, not a hang
        start = time.monotonic()
        d.start_server(forwards=forward, extra=FAST_SERVER)
        d.wait_connected("s1", timeout=15, watch=site)
        assert echo_roundtrip(fwd)
        assert time.monotonic() - start < 15
        assert site.running()
    finally:
        statuses = d.stop_all()
    assert statuses["site-s1"] == 0


def test_site_restart_needs_no_action_in_the_cloud(tmp_path, echo):
    """A site stopped and started again (no keyfile the second time) serves the same forward."""
    d = Deployment(tmp_path)
    fwd = free_port()
    d.start_server(forwards=[f"127.0.0.1:{fwd}:s1:127.0.0.1:{echo.port}"], extra=FAST_SERVER)
    try:
        first = d.start_site("s1", allow=[echo.target], keyfile=d.create_keyfile("s1"), extra=FAST)
        d.wait_connected("s1", watch=first)
        assert echo_roundtrip(fwd)
        assert first.stop() == 0
        wait_until(lambda: not d.site_connected("s1"), 10, "the server to see the site leave")
        second = d.start_site("s1", allow=[echo.target], extra=FAST, name="site-s1-again")
        d.wait_connected("s1", watch=second)
        assert echo_roundtrip(fwd)
        assert "already" not in second.output() or "enrolling" not in second.output()
    finally:
        statuses = d.stop_all()
    assert all(code == 0 for code in statuses.values()), statuses


def test_black_holed_path_is_detected_on_both_ends_and_healed(tmp_path, echo):
    """
    When the path starts dropping everything silently, both ends declare the
    peer dead within the keepalive timeout; once the path heals the site is
    connected again and forwards work.
    """
    d = Deployment(tmp_path)
    relay = Relay(d.server_port)
    relay.keep_server_legs = True  # the server must find out by itself
    fwd = free_port()
    d.start_server(forwards=[f"127.0.0.1:{fwd}:s1:127.0.0.1:{echo.port}"], extra=FAST_SERVER)
    keyfile = d.create_keyfile("s1", address=f"127.0.0.1:{relay.port}")
    site = d.start_site("s1", allow=[echo.target], keyfile=keyfile, extra=FAST)
    try:
        d.wait_connected("s1", watch=site)
        relay.blackhole = True
        wait_until(lambda: "declaring it dead" in d.server.output(), 15, "the server to declare the site dead")
        wait_until(lambda: "declaring it dead" in site.output(), 15, "the site to declare the server dead")
        # Each end measured the silence on its own clock: at most the
        # timeout (2 s) plus one check interval (0.5 s), with some slack.
        for output in (d.server.output(), site.output()):
            silent = float(re.search(r"silent for ([0-9.]+)s", output).group(1))
            assert 2.0 <= silent <= 3.0, silent
        relay.blackhole = False
        d.wait_connected("s1", timeout=20, watch=site)
        wait_until(lambda: echo_roundtrip(fwd), 20, "a forward to work again", interval=0.5)
    finally:
        statuses = d.stop_all()
        relay.close()
    assert statuses["server"] == 0


def test_reconnecting_site_takes_over_a_half_dead_session_at_once(tmp_path, echo):
    """
    A site that is killed and restarted while the server still holds its old
    connection (kept open and silent by the path) wins at once: new streams
    use the new session, long before the keepalive would have noticed.
    """
    d = Deployment(tmp_path)
    relay = Relay(d.server_port)
    relay.keep_server_legs = True
    fwd = free_port()
    slow_keepalive = ["--keepalive", "30", "--keepalive-timeout", "90"]
    d.start_server(forwards=[f"127.0.0.1:{fwd}:s1:127.0.0.1:{echo.port}"], extra=slow_keepalive)
    keyfile = d.create_keyfile("s1", address=f"127.0.0.1:{relay.port}")
    first = d.start_site("s1", allow=[echo.target], keyfile=keyfile, extra=slow_keepalive)
    try:
        d.wait_connected("s1", watch=first)
        assert first.kill() == -9
        second = d.start_site("s1", allow=[echo.target], extra=slow_keepalive, name="site-s1-second")
        # The new session is the live one (it announces its services) within
        # seconds: by a takeover, at once when the site does not keep one
        # session per replica, else once the old one ends (the server's RTT
        # probe finds its leg dead) or after REPLICA_TAKEOVER_GRACE.
        wait_until(lambda: d.server.output().count("site s1 announced") == 2, 15, "the takeover")
        assert echo_roundtrip(fwd)
        assert second.running()
    finally:
        d.stop_all()
        relay.close()


def test_slowloris_and_garbage_clients_do_not_hurt_a_real_transfer(tmp_path, echo):
    """
    200 connections to the tunnel port that send nothing or random bytes,
    while a real site moves data: the transfer completes and verifies, every
    bad connection is closed within the handshake timeout, and the server's
    memory stays bounded.
    """
    d = Deployment(tmp_path)
    fwd = free_port()
    d.start_server(forwards=[f"127.0.0.1:{fwd}:s1:127.0.0.1:{echo.port}"], extra=["--handshake-timeout", "2"])
    site = d.start_site("s1", allow=[echo.target], keyfile=d.create_keyfile("s1"), extra=FAST)
    bad: list[socket.socket] = []
    try:
        d.wait_connected("s1", watch=site)
        rss_before = rss_kib(d.server.pid)
        rng = random.Random(7)
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", d.server_port), timeout=5)
            if i % 2:
                s.sendall(rng.randbytes(rng.randrange(1, 65536)))
            bad.append(s)
        opened = time.monotonic()
        payload = os.urandom(32 << 20)
        result: dict[str, bool] = {}
        t = threading.Thread(target=lambda: result.setdefault("ok", echo_roundtrip(fwd, payload, timeout=60)))
        t.start()
        closed = 0
        for s in bad:
            data, ended = read_until_closed(s, timeout=max(0.1, opened + 6 - time.monotonic()))
            closed += ended
        assert closed == len(bad)
        assert time.monotonic() - opened < 6  # handshake timeout 2 s, with slack
        t.join(60)
        assert result.get("ok") is True
        assert rss_kib(d.server.pid) - rss_before < 64 * 1024
        assert d.site_connected("s1")
    finally:
        for s in bad:
            s.close()
        statuses = d.stop_all()
    assert statuses["server"] == 0


def test_stream_flood_beyond_the_site_limit_is_refused_cleanly(tmp_path, echo):
    """
    With the site allowing 20 concurrent streams, 30 held connections: 20
    work, 10 are closed promptly with the limit logged; the 20 keep working.
    """
    d = Deployment(tmp_path)
    fwd = free_port()
    d.start_server(forwards=[f"127.0.0.1:{fwd}:s1:127.0.0.1:{echo.port}"], extra=FAST_SERVER)
    site = d.start_site("s1", allow=[echo.target], keyfile=d.create_keyfile("s1"), extra=[*FAST, "--max-streams", "20"])
    conns: list[socket.socket] = []
    try:
        d.wait_connected("s1", watch=site)
        for _ in range(30):
            s = socket.create_connection(("127.0.0.1", fwd), timeout=10)
            s.sendall(b"x")
            conns.append(s)
        alive, refused = [], []
        for s in conns:
            s.settimeout(5)
            try:
                data = s.recv(10)
            except (TimeoutError, ConnectionResetError):
                data = b""
            (alive if data == b"x" else refused).append(s)
        assert (len(alive), len(refused)) == (20, 10)
        assert "stream limit reached" in d.server.output()
        for s in alive:
            s.sendall(b"still here")
            assert s.recv(100) == b"still here"
    finally:
        for s in conns:
            s.close()
        d.stop_all()


def test_sigterm_drains_open_streams_then_stops(tmp_path, echo):
    """
    SIGTERM on the site sends GOAWAY: the open stream keeps working during
    the grace period, the server logs the drain as such (not as an error),
    and the site exits 0 once the stream is done.
    """
    d = Deployment(tmp_path)
    fwd = free_port()
    d.start_server(forwards=[f"127.0.0.1:{fwd}:s1:127.0.0.1:{echo.port}"], extra=FAST_SERVER)
    site = d.start_site("s1", allow=[echo.target], keyfile=d.create_keyfile("s1"), extra=[*FAST, "--drain-grace", "20"])
    try:
        d.wait_connected("s1", watch=site)
        with socket.create_connection(("127.0.0.1", fwd), timeout=10) as s:
            s.sendall(b"before")
            assert s.recv(100) == b"before"
            site.signal(15)
            wait_until(lambda: "is draining" in d.server.output(), 10, "the server to see the drain")
            s.sendall(b"during")
            assert s.recv(100) == b"during"
            assert site.running()
            s.shutdown(socket.SHUT_WR)
            data, ended = read_until_closed(s, 10)
            assert ended
        assert site.wait(15) == 0
    finally:
        d.stop_all()
