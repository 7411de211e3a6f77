"""
Three tunnel server replicas on one PostgreSQL behind HAProxy, end to end
(issue 13, section 4), deployed as docs/scaling.md tells operators to:

 - one throwaway PostgreSQL cluster (tests/pg_support.py), its own: a test
   stops and starts it;
 - the CA and the server identity created once, by the first replica's start
   with C{--state}, and copied to the other replicas' state directories;
 - three C{twistd rtunnel-server} processes with C{--database
   postgresql://...}, each its own C{--listen} port, C{--replica-id} and
   forwards to every site (their own ports: they share one host);
 - HAProxy in TCP mode (tests/haproxy_support.py) in front of the three
   tunnel ports (the address in every keyfile) and of the three replicas'
   forwards of site alpha (what a client of that forward dials);
 - sites that dial the balancer only (the token race also dials replicas
   directly).

The whole module takes about a minute: one set of replicas serves every
test, each test with sites of its own; the kill test starts the replica it
killed again, the PostgreSQL test starts the database again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rtunnel.identity.certs import create_csr, dump_csr, generate_private_key
from rtunnel.identity.enrollment import EnrollAccepted, EnrollRequest, ReplyReader, encode_request
from rtunnel.identity.store import REPLICA_TIMEOUT, StateStore
from tests import haproxy_support, pg_support
from tests.e2e_support import EchoServer, read_until_closed
from tests.haproxy_support import HAProxy
from tests.pg_support import PostgreSQLCluster
from tools.harness import Deployment, Process, free_port, port_open, wait_until

pytestmark = pytest.mark.e2e

REPLICA_IDS = ("a", "b", "c")
#: every replica forwards a port of its own to each of these sites' echo service
SITES = ("alpha", "beta", "gamma", "delta", "epsilon")
OPEN_TIMEOUT = 1.0
#: how long a site may take to hold a session with every replica (dials through the balancer, duplicates closed)
ALL_SESSIONS_TIMEOUT = 30.0


class Replica:
    """One C{twistd rtunnel-server} of the set: its ports and its state directory."""

    def __init__(self, replica_id: str, root: Path, database: str, echo: EchoServer) -> None:
        self.id = replica_id
        self.admin_port = free_port()
        self.deployment = Deployment(
            root / f"replica-{replica_id}", database=database, admin=f"tcp:{self.admin_port}:interface=127.0.0.1"
        )
        self.forwards = {site: free_port() for site in SITES}
        self._echo = echo

    @property
    def tunnel_port(self) -> int:
        return self.deployment.server_port

    @property
    def server(self) -> Process:
        assert self.deployment.server is not None
        return self.deployment.server

    def start(self, wait: bool = True) -> Process:
        extra = ["--open-timeout", str(OPEN_TIMEOUT), "--replica-id", self.id]
        forwards = [f"127.0.0.1:{port}:{site}:{self._echo.target}" for site, port in self.forwards.items()]
        return self.deployment.start_server(forwards=forwards, extra=extra, wait=wait)

    def wait_listening(self) -> None:
        server = self.server
        wait_until(
            lambda: port_open("127.0.0.1", self.tunnel_port) or not server.running(),
            30,
            f"replica {self.id} to listen",
        )
        if not server.running():
            raise RuntimeError(f"replica {self.id} exited:\n{server.output()}")

    def api_site(self, site: str) -> dict[str, Any]:
        """The SITE this replica's JSON API shows (its own view: its registry, its admission snapshot)."""
        url = f"http://127.0.0.1:{self.admin_port}/api/v1/sites/{site}"
        with urllib.request.urlopen(url, timeout=5) as response:
            value: dict[str, Any] = json.loads(response.read())
        return value

    def cut_off(self, site: str) -> bool:
        """Whether this replica has C{site} revoked and holds no session of it."""
        shown = self.api_site(site)
        return bool(shown["revoked"] and not shown["connected"])

    def readyz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


class World:
    """
    The replicas, the balancer in front of them, and C{control}: where the
    C{rtunnel} commands run (replica a's state directory, the shared
    database) and the sites' processes are started from.
    """

    def __init__(self, pg: PostgreSQLCluster, database: str, echo: EchoServer, root: Path) -> None:
        self.pg = pg
        self.database = database
        self.echo = echo
        self.root = root
        self.replicas = [Replica(replica_id, root, database, echo) for replica_id in REPLICA_IDS]
        self.control = Deployment(root / "control", database=database)
        self.control.server_state = self.replicas[0].deployment.server_state
        self.balancer: HAProxy | None = None

    @property
    def lb(self) -> HAProxy:
        assert self.balancer is not None
        return self.balancer

    @property
    def address(self) -> str:
        """The balancer's tunnel address: the one address in every keyfile."""
        return f"127.0.0.1:{self.lb.ports['tunnel']}"

    def start_site(self, site: str, keyfile: Path | None = None, name: str | None = None) -> Process:
        keyfile = keyfile or self.control.create_keyfile(site, address=self.address)
        return self.control.start_site(
            site, allow=[self.echo.target], keyfile=keyfile, extra=["--retry-cap", "2"], name=name
        )

    def restart_site(self, site: str, name: str) -> Process:
        """Start C{site} again from its state directory (enrolled: no keyfile)."""
        return self.control.start_site(site, allow=[self.echo.target], extra=["--retry-cap", "2"], name=name)

    def connected_site(self, site: str) -> Process:
        process = self.start_site(site)
        self.control.wait_connected(site, watch=process)
        return process

    def row(self, site: str) -> dict[str, Any]:
        [row] = [r for r in self.control.sites() if r["name"] == site]
        return row

    def sessions(self, site: str) -> set[str]:
        """The replicas the database says C{site} has a session with."""
        return {session["replica"] for session in self.row(site).get("sessions", [])}

    def wait_all_sessions(self, site: str, timeout: float = ALL_SESSIONS_TIMEOUT) -> None:
        wait_until(
            lambda: self.sessions(site) == set(REPLICA_IDS),
            timeout,
            f"site {site} to hold a session with every replica",
        )


def _copy_state(source: Path, target: Path) -> None:
    """What an operator does with C{cp -a}: the same files, modes kept (the keys 0600, the directory 0700)."""
    shutil.copytree(source, target)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    pg_support.skip_unless_available()
    haproxy_support.skip_unless_available()
    pg = PostgreSQLCluster()
    pg.start()
    echo = EchoServer()
    w = World(pg, pg.url(pg.new_database(), tcp=True), echo, tmp_path_factory.mktemp("replicas"))
    try:
        first, *others = w.replicas
        first.start()  # creates the CA and the server identity, and the schema
        for replica in others:
            _copy_state(first.deployment.server_state, replica.deployment.server_state)
            replica.start(wait=False)
        for replica in others:
            replica.wait_listening()
        w.balancer = HAProxy(
            {
                "tunnel": {r.id: r.tunnel_port for r in w.replicas},
                "alpha": {r.id: r.forwards["alpha"] for r in w.replicas},
            },
            track="tunnel",
        )
        w.balancer.start()
        w.lb.wait_all_up()
        yield w
        for process in w.control.processes:
            process.stop()
        statuses = {r.id: r.server.stop() for r in w.replicas}
        assert statuses == dict.fromkeys(REPLICA_IDS, 0), statuses
    finally:
        for process in w.control.processes:
            process.stop()
        for r in w.replicas:
            for process in r.deployment.processes:
                process.stop()
        if w.balancer is not None:
            w.balancer.stop()
        echo.close()
        pg.stop()


def _echo(port: int, payload: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data, _ = read_until_closed(s, timeout)
        return data


def _wait_exit(process: Process, timeout: float = 20) -> int:
    wait_until(lambda: not process.running(), timeout, f"{process.name} to exit")
    return process.wait(1)


def test_replicas_share_one_database_behind_haproxy(world: World) -> None:
    """
    Three replicas from one state directory's files, on one database: their
    state directories hold the same four files (the rest is in PostgreSQL),
    HAProxy sees all three up, and a site whose keyfile names only the
    balancer enrolls and connects; with the replica set it ends with a
    session to each replica, each of whose forwards then reaches it.
    """
    states = [r.deployment.server_state for r in world.replicas]
    for state in states:
        assert sorted(os.listdir(state)) == ["ca.crt", "ca.key", "server.crt", "server.key"]
        assert oct(state.stat().st_mode & 0o777) == "0o700"
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        assert len({(state / name).read_bytes() for state in states}) == 1, f"{name} differs between replicas"
    assert world.lb.server_states() == {
        **{("tunnel", r): "UP" for r in REPLICA_IDS},
        **{("alpha", r): "UP" for r in REPLICA_IDS},
    }

    site = world.connected_site("alpha")
    assert site.running()
    payload = os.urandom(256 * 1024)
    world.wait_all_sessions("alpha")
    for r in world.replicas:
        assert _echo(r.forwards["alpha"], payload) == payload, f"replica {r.id}'s forward"
    assert world.row("alpha")["enrolled_at"]


def test_replicas_list(world: World) -> None:
    """C{rtunnel replicas list} shows the three replicas, each with its process and a fresh heartbeat."""
    result = world.control.rtunnel("replicas", "list", *world.control.state_args(), "--json")
    rows = json.loads(result.stdout)
    assert [row["replica"] for row in rows] == list(REPLICA_IDS)
    assert {row["pid"] for row in rows} == {r.server.pid for r in world.replicas}


class HashedStream:
    """
    A client streaming random bytes through a forward to the site's echo
    service, paced (about 1.6 MB/s), hashing what it sends and what comes
    back; L{finish} half-closes and checks the two agree.
    """

    CHUNK = 16 * 1024

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sent = 0
        self.received = 0
        self._sent_hash = hashlib.sha256()
        self._received_hash = hashlib.sha256()
        self._stop = threading.Event()
        self._eof = False
        self._errors: list[BaseException] = []
        self._sender = threading.Thread(target=self._send, daemon=True)
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._sender.start()
        self._receiver.start()

    def _send(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = os.urandom(self.CHUNK)
                self._sent_hash.update(chunk)
                self.sock.sendall(chunk)
                self.sent += len(chunk)
                self._stop.wait(0.01)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self._errors.append(e)

    def _receive(self) -> None:
        try:
            while data := self.sock.recv(65536):
                self._received_hash.update(data)
                self.received += len(data)
            self._eof = True
        except OSError as e:
            self._errors.append(e)

    def finish(self) -> None:
        self._stop.set()
        self._sender.join(20)
        self._receiver.join(20)
        self.sock.close()
        assert not self._errors, self._errors
        assert self._eof, "the echo did not end"
        assert self.received == self.sent > 0
        assert self._received_hash.digest() == self._sent_hash.digest()


def test_kill_9_one_replica_during_traffic(world: World) -> None:
    """
    Replica a killed with -9 while streams run through b and c: those go on
    and every byte comes back; new connections to the balancer's forward
    succeed (HAProxy retries a refused connect on another replica); the
    site's session with a ends and, once a is started again, the site holds
    a session with it again.
    """
    a, b, c = world.replicas
    world.wait_all_sessions("alpha")
    streams = [HashedStream(r.forwards["alpha"]) for r in (b, c) for _ in range(2)]
    try:
        _kill_during_traffic(world, streams)
    finally:
        if not a.server.running():
            a.start()  # the tests after this one need all three
        for s in streams:
            s.finish()
    world.wait_all_sessions("alpha")
    assert _echo(a.forwards["alpha"], b"back") == b"back"
    world.lb.wait_state("tunnel", "a", "UP")


def _kill_during_traffic(world: World, streams: list[HashedStream]) -> None:
    a = world.replicas[0]
    wait_until(lambda: all(s.received >= 256 * 1024 for s in streams), 15, "the streams to carry data")
    assert a.server.kill() == -9
    before = [s.received for s in streams]
    for _ in range(6):
        assert _echo(world.lb.ports["alpha"], b"through the balancer") == b"through the balancer"
    wait_until(lambda: "a" not in world.sessions("alpha"), 15, "the database to drop a's session")
    wait_until(
        lambda: all(s.received >= n + 512 * 1024 for s, n in zip(streams, before, strict=True)),
        20,
        "the streams through b and c to go on after a died",
    )


def test_revocation_through_one_replica_cuts_every_session(world: World) -> None:
    """
    C{rtunnel sites revoke} run with replica a's state directory (its own
    database connection): within 2 s every replica has the site revoked and
    holds no session of it (the first replica to cut it makes the site
    give up, which ends its other sessions too), and the site process, told
    it is refused, ends.
    """
    site = world.connected_site("beta")
    world.wait_all_sessions("beta")
    assert all(r.api_site("beta")["connected"] for r in world.replicas)
    world.control.rtunnel("sites", "revoke", "beta", *world.control.state_args())
    revoked = time.monotonic()
    for r in world.replicas:
        wait_until(
            functools.partial(r.cut_off, "beta"),
            max(2.0 - (time.monotonic() - revoked), 0.01),
            f"replica {r.id} to cut the revoked site",
        )
    assert any("cutting site beta: site-revoked" in r.server.output() for r in world.replicas)
    assert _wait_exit(site) == 1
    assert "refused site beta" in site.output()
    assert world.sessions("beta") == set()
    assert _echo(world.replicas[2].forwards["beta"], b"anyone?") == b""


def _edit_keyfile(keyfile: Path, target: Path, address: str) -> Path:
    """A copy of C{keyfile} (same token) that dials C{address}."""
    document = json.loads(keyfile.read_text())
    document["addresses"] = [address]
    target.write_text(json.dumps(document))
    target.chmod(0o600)
    return target


def _one_ended(processes: list[Process]) -> bool:
    return not all(p.running() for p in processes)


def test_token_race_between_site_processes(world: World) -> None:
    """
    One keyfile used by two sites at once, one dialling replica a, the
    other replica b directly: one enrolls and connects, the other is told
    the token is spent and ends with status 1.
    """
    a, b, _ = world.replicas
    rounds = ("race-1", "race-2")
    pairs = []
    for site in rounds:
        first = world.control.create_keyfile(site, address=f"127.0.0.1:{a.tunnel_port}")
        second = _edit_keyfile(first, first.with_suffix(".b.rtkey"), f"127.0.0.1:{b.tunnel_port}")
        pairs.append(
            [
                world.control.twistd(
                    f"site-{site}-{index}",
                    ["rtunnel", "--state", str(world.root / f"{site}-{index}"), "--keyfile", str(keyfile)]
                    + ["--allow", world.echo.target, "--retry-cap", "2"],
                )
                for index, keyfile in enumerate((first, second))
            ]
        )
    for site, processes in zip(rounds, pairs, strict=True):
        world.control.wait_connected(site)
        wait_until(functools.partial(_one_ended, processes), 20, f"one of {site}'s two processes to end")
        [loser] = [p for p in processes if not p.running()]
        [winner] = [p for p in processes if p.running()]
        assert loser.wait(1) == 1
        assert "token-spent" in loser.output()
        assert f"site {site} connected to tunnel server" in winner.output()
        winner.stop()


def _enroll_raw(port: int, ca: Path, site: str, token: str, barrier: threading.Barrier) -> str:
    """
    One enrollment as a site makes it (TLS verifying the server against the
    CA, a fresh key's CSR), the request written when the other racer is
    ready too: C{"enrolled"} or the refusal code.
    """
    context = ssl.create_default_context(cafile=str(ca))
    request = encode_request(EnrollRequest(site, token, dump_csr(create_csr(generate_private_key(), site))))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        barrier.wait(10)
        tls.sendall(request)
        reader = ReplyReader()
        while True:
            data = tls.recv(65536)
            if not data:
                return "closed without an answer"
            reply = reader.receive_data(data)
            if reply is not None:
                return "enrolled" if isinstance(reply, EnrollAccepted) else reply.code


def _race_once(ports: list[int], ca: Path, site: str, token: str) -> list[str]:
    """Redeem C{token} through each of C{ports} at the same moment: the outcomes."""
    barrier = threading.Barrier(len(ports))
    outcomes: list[str] = []

    def race(port: int) -> None:
        try:
            outcomes.append(_enroll_raw(port, ca, site, token, barrier))
        except (OSError, threading.BrokenBarrierError) as e:
            outcomes.append(f"failed: {e!r}")

    threads = [threading.Thread(target=race, args=(port,)) for port in ports]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes


def test_token_race_across_replicas(world: World) -> None:
    """
    Twenty tokens, each redeemed through replica a and replica b at the
    same moment (both requests written when both TLS handshakes are done):
    each time exactly one enrollment succeeds and the other is refused as
    token-spent; the database ends with each site enrolled once.
    """
    a, b, _ = world.replicas
    sites = [f"racer-{n}" for n in range(20)]
    store = StateStore(world.database)
    try:
        tokens = [store.create_token(site, timedelta(hours=1), datetime.now(UTC)) for site in sites]
    finally:
        store.close()
    ca = a.deployment.server_state / "ca.crt"
    for site, token in zip(sites, tokens, strict=True):
        outcomes = _race_once([a.tunnel_port, b.tunnel_port], ca, site, token)
        assert sorted(outcomes) == ["enrolled", "token-spent"], f"{site}: {outcomes}"
    rows = {row["name"]: row for row in world.control.sites()}
    assert all(rows[site]["enrolled_at"] for site in sites)


def _ready_is(replica: Replica, status: int) -> bool:
    return replica.readyz()[0] == status


def test_postgresql_stopped_and_started(world: World) -> None:
    """
    PostgreSQL stopped under the replicas for longer than a replica may go
    without a heartbeat: each says so on /readyz and goes on serving; a site
    already connected keeps working, an enrolled site that restarts
    meanwhile is admitted (each replica admits from memory), a revoked one
    is refused, and an enrollment cannot be decided (the site is told
    internal-error and gives up). Started again: every replica is ready,
    both sites are listed with a session on every replica (the ones opened
    during the outage written back), the revoked one stays out, and the
    keyfile that could not enroll during the outage enrolls (its token was
    not spent).
    """
    gamma, delta, epsilon = (world.start_site(site) for site in ("gamma", "delta", "epsilon"))
    zeta_keyfile = world.control.create_keyfile("zeta", address=world.address)
    for site, process in (("gamma", gamma), ("delta", delta), ("epsilon", epsilon)):
        world.control.wait_connected(site, watch=process)
    world.control.rtunnel("sites", "revoke", "delta", *world.control.state_args())
    assert _wait_exit(delta) == 1
    world.wait_all_sessions("gamma")

    world.pg.stop_server()
    stopped = time.monotonic()
    try:
        for r in world.replicas:
            wait_until(
                functools.partial(_ready_is, r, 503), 10, f"replica {r.id}'s /readyz to report the database down"
            )
            assert "the state database is failing" in r.readyz()[1]
        for r in world.replicas:
            assert _echo(r.forwards["gamma"], b"still here") == b"still here", f"replica {r.id}"
        assert epsilon.stop() == 0
        epsilon = world.restart_site("epsilon", "site-epsilon-outage")
        wait_until(
            lambda: "site epsilon connected to tunnel server" in epsilon.output() or not epsilon.running(),
            20,
            "epsilon to connect again during the outage",
        )
        assert epsilon.running(), epsilon.output()
        refused = world.restart_site("delta", "site-delta-outage")
        assert _wait_exit(refused) == 1
        assert "refused site delta" in refused.output()
        early = world.start_site("zeta", keyfile=zeta_keyfile, name="site-zeta-outage")
        assert _wait_exit(early) == 1
        assert "internal-error" in early.output()
        # Longer than a heartbeat may be missed: when the database is back,
        # the first replica to beat finds the others' heartbeats too old.
        turn = 0
        while time.monotonic() < stopped + REPLICA_TIMEOUT + 1.0:
            r = world.replicas[turn % len(world.replicas)]
            assert _echo(r.forwards["gamma"], b"%d" % turn) == b"%d" % turn, f"replica {r.id}"
            turn += 1
            time.sleep(0.5)
        assert gamma.running() and epsilon.running()
    finally:
        world.pg.start_server()
    for r in world.replicas:
        wait_until(functools.partial(_ready_is, r, 200), 15, f"replica {r.id} to be ready again")
    for site in ("gamma", "epsilon"):
        assert world.row(site)["connected"], site
    world.wait_all_sessions("gamma", timeout=10)
    world.wait_all_sessions("epsilon", timeout=10)
    for r in world.replicas:
        assert _echo(r.forwards["gamma"], b"after") == b"after", f"replica {r.id}"
    zeta = world.start_site("zeta", keyfile=zeta_keyfile, name="site-zeta-after")
    world.control.wait_connected("zeta", watch=zeta)
    refused = world.restart_site("delta", "site-delta-after")
    assert _wait_exit(refused) == 1
    row = world.row("delta")
    assert row["revoked_at"] and not row["connected"]
