"""
A real site against two real C{twistd rtunnel-server} replicas of one
SQLite state, reached only through one address: a test-only round-robin TCP
relay on loopback (the simplest load balancer: no health checks, each
connection to the next replica in turn; one that refuses gets the client
closed). The replicas do not advertise addresses of their own, so the site
finds the second one only by dialling the relay again.

The site ends with a session to each replica; a connection through each
replica's own forward reaches the site's target over that replica's
session; a replica killed with -9 leaves the other session carrying
streams while the site redials, and once the replica is back the site
holds a session with it again.
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from tests.e2e_support import EchoServer, read_until_closed
from tools.harness import Deployment, Process, free_port, port_open, wait_until

pytestmark = pytest.mark.e2e

SITE = "alpha"


class RoundRobinRelay:
    """
    Listens on a loopback port; each accepted connection is joined to the
    next backend port in turn, byte for byte both ways (half-closes passed
    on). A backend that refuses: the client's connection is closed, as a
    balancer without health checks does.
    """

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._turn = itertools.count()
        self._lock = threading.Lock()
        #: the backend port of every connection accepted, in order (None: it refused)
        self.routed: list[int | None] = []
        self._open: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            backend = self.backends[next(self._turn) % len(self.backends)]
            try:
                upstream = socket.create_connection(("127.0.0.1", backend), timeout=5)
            except OSError:
                with self._lock:
                    self.routed.append(None)
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self.routed.append(backend)
                self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
        except OSError:
            # One side reset: reset the other too (a half-dead balancer
            # connection would hide the replica's death from the site).
            for s in (source, sink):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    s.close()
                except OSError:
                    pass

    def connections(self) -> list[int | None]:
        with self._lock:
            return list(self.routed)

    def close(self) -> None:
        self.sock.close()
        with self._lock:
            for s in self._open:
                try:
                    s.close()
                except OSError:
                    pass


def metric(port: int, name: str) -> dict[str, float]:
    """The samples of one metric family from an admin endpoint: labels text -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(\{{[^}}]*\}})? (\S+)", line)
        if match:
            samples[match.group(1) or ""] = float(match.group(2))
    return samples


def replicas_up(site_admin: int) -> dict[str, float]:
    return {
        labels.removeprefix('{replica="').removesuffix('"}'): value
        for labels, value in metric(site_admin, "rtunnel_site_replica_up").items()
    }


def round_trip(port: int, payload: bytes) -> bytes:
    """Through a forward: send C{payload}, half-close, read the echo to its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data, closed = read_until_closed(sock, 10)
        assert closed, "the echo did not end"
        return data


class Replicas:
    def __init__(self, d: Deployment, echo: EchoServer) -> None:
        self.d = d
        self.echo = echo
        self.ports = {"cloud-a": d.server_port, "cloud-b": free_port()}
        self.forwards = {"cloud-a": free_port(), "cloud-b": free_port()}
        self.processes: dict[str, Process] = {}

    def start(self, replica: str) -> Process:
        d = self.d
        port = self.ports[replica]
        process = d.twistd(
            f"server-{replica}-{len(d.processes)}",
            [
                "rtunnel-server",
                *d.state_args(),
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--public-address",
                "127.0.0.1",
                "--admin",
                "tcp:0:interface=127.0.0.1",
                "--replica-id",
                replica,
                "--forward",
                f"127.0.0.1:{self.forwards[replica]}:{SITE}:{self.echo.target}",
                "--open-timeout",
                "5",
            ],
        )
        wait_until(lambda: port_open("127.0.0.1", port) or not process.running(), 30, f"replica {replica} to listen")
        assert process.running(), process.output()
        self.processes[replica] = process
        return process


@pytest.fixture
def world(tmp_path) -> Iterator[tuple[Deployment, Replicas, RoundRobinRelay, Process, int]]:  # type: ignore[no-untyped-def]
    d = Deployment(tmp_path)
    echo = EchoServer()
    replicas = Replicas(d, echo)
    # The first start creates the state (CA, identity, database); the second joins it.
    replicas.start("cloud-a")
    replicas.start("cloud-b")
    relay = RoundRobinRelay([replicas.ports["cloud-a"], replicas.ports["cloud-b"]])
    keyfile = d.create_keyfile(SITE, address=f"127.0.0.1:{relay.port}")
    site_admin = free_port()
    site = d.start_site(
        SITE,
        allow=[echo.target],
        keyfile=keyfile,
        extra=["--admin", f"tcp:{site_admin}:interface=127.0.0.1", "--retry-cap", "4"],
    )
    try:
        yield d, replicas, relay, site, site_admin
    finally:
        d.stop_all()
        relay.close()
        echo.close()


def sessions_of(site: Process, site_admin: int) -> dict[str, float]:
    assert site.running(), site.output()
    try:
        return replicas_up(site_admin)
    except OSError:
        return {}


def test_a_session_with_each_replica_behind_one_address(world) -> None:  # type: ignore[no-untyped-def]
    """
    Both replicas are reached through the relay alone; each replica's
    forward carries a connection to the site's target over its own session.
    """
    d, replicas, relay, site, site_admin = world
    wait_until(
        lambda: sessions_of(site, site_admin) == {"cloud-a": 1.0, "cloud-b": 1.0},
        30,
        "the site to hold a session with both replicas",
    )
    assert metric(site_admin, "rtunnel_site_sessions") == {"": 2.0}
    with urllib.request.urlopen(f"http://127.0.0.1:{site_admin}/readyz", timeout=10) as response:
        assert response.read() == b"ready\n"
    output = site.output()
    assert "site alpha: session with replica cloud-a" in output
    assert "site alpha: session with replica cloud-b" in output
    assert "site alpha: the tunnel server has 2 replica(s): cloud-a, cloud-b" in output
    assert set(relay.connections()) <= set(replicas.ports.values())
    for replica in ("cloud-a", "cloud-b"):
        payload = f"through {replica}".encode() * 1000
        assert round_trip(replicas.forwards[replica], payload) == payload
    # Each forward's connection went through its own replica's session to the site.
    sessions = {r["name"]: r for r in d.sites()}[SITE]["sessions"]
    assert sorted(s["replica"] for s in sessions) == ["cloud-a", "cloud-b"]
    for replica, process in replicas.processes.items():
        assert "Unhandled" not in process.output(), replica
    assert "Traceback" not in output


def test_a_replica_killed_and_back(world) -> None:  # type: ignore[no-untyped-def]
    """
    kill -9 of cloud-b: the session with cloud-a goes on carrying streams
    (one held open from before the kill until cloud-b is back, and new
    ones) while the site redials through the relay, whose every other
    connection lands on cloud-a: those extra sessions are closed by the
    site, and cloud-a never replaces the session it has. cloud-b started
    again is reached again.
    """
    d, replicas, relay, site, site_admin = world
    wait_until(
        lambda: sessions_of(site, site_admin) == {"cloud-a": 1.0, "cloud-b": 1.0},
        30,
        "the site to hold a session with both replicas",
    )
    before = relay.connections()
    with socket.create_connection(("127.0.0.1", replicas.forwards["cloud-a"]), timeout=10) as held:

        def still_echoing(text: bytes) -> None:
            held.sendall(text)
            got = b""
            while len(got) < len(text):
                chunk = held.recv(len(text) - len(got))
                assert chunk, "the stream through cloud-a was cut"
                got += chunk
            assert got == text

        still_echoing(b"before")
        replicas.processes["cloud-b"].kill()
        wait_until(
            lambda: sessions_of(site, site_admin).get("cloud-b") != 1.0,
            15,
            "the site to see its session with cloud-b gone",
        )
        assert sessions_of(site, site_admin).get("cloud-a") == 1.0

        def redialled_onto_cloud_a() -> bool:
            still_echoing(b"meanwhile")
            assert round_trip(replicas.forwards["cloud-a"], b"new") == b"new"
            return relay.connections()[len(before) :].count(replicas.ports["cloud-a"]) >= 1

        # The site redials for cloud-b; the relay sends those dials to cloud-a
        # (only there: alternating with the dead cloud-b, the first that lands
        # on cloud-a could come after cloud-b has left the set, and the site
        # stops dialling for a replica that left).
        relay.backends = [replicas.ports["cloud-a"]]
        wait_until(redialled_onto_cloud_a, 20, "a redial of the site to land on cloud-a", interval=0.2)
        relay.backends = [replicas.ports["cloud-a"], replicas.ports["cloud-b"]]
        replicas.start("cloud-b")

        def both_again() -> bool:
            still_echoing(b"until")
            return sessions_of(site, site_admin) == {"cloud-a": 1.0, "cloud-b": 1.0}

        wait_until(both_again, 40, "the site to hold a session with cloud-b again", interval=0.2)
        still_echoing(b"after")
    assert round_trip(replicas.forwards["cloud-b"], b"back") == b"back"
    output = site.output()
    assert "already connected to replica cloud-a; closing the extra session" in output
    assert "SESSION_REPLACED" not in output
    assert "Traceback" not in output
    assert "replaces the one from" not in replicas.processes["cloud-a"].output()
