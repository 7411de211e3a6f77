"""
A throwaway PostgreSQL cluster for the tests: Debian's binaries
(C{/usr/lib/postgresql/VERSION/bin}), a data directory and a socket directory
in a temporary directory, the server on a unix socket and on 127.0.0.1 with
a free port, trust authentication, stopped (C{pg_ctl stop}, then its PID)
when the tests are done.

PostgreSQL refuses to run as root: as root, the binaries run as the
C{postgres} user (C{runuser -u postgres --}), which owns the temporary
directory. Without the binaries, or without psycopg, the tests that need a
cluster skip and say what installs them.

One cluster serves a whole test run (starting one takes about a second),
stopped when the test process exits;
each test takes a fresh database of its own (L{PostgreSQLCluster.new_database}).
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import unittest
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PostgreSQLCluster", "cluster", "missing", "skip_unless_available", "stop_cluster"]

INSTALL = "make test installs it: apt-get install postgresql"


def _bin_directory() -> Path | None:
    """The newest installed PostgreSQL's binaries, or C{None}."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    return Path(found[-1]).parent if found else None


def missing() -> str | None:
    """Why the PostgreSQL tests cannot run here (with what fixes it), or C{None}."""
    if _bin_directory() is None:
        return f"PostgreSQL's server binaries (/usr/lib/postgresql/*/bin/initdb) are not installed; {INSTALL}"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install -e '.[test]' (make test does)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser to start PostgreSQL as the postgres user"
    return None


def skip_unless_available() -> None:
    """
    Skip the calling test if PostgreSQL cannot run here. C{unittest.SkipTest}:
    what both trial's test cases and pytest's functions and fixtures take as
    a skip.
    """
    reason = missing()
    if reason is not None:
        raise unittest.SkipTest(reason)


class PostgreSQLCluster:
    """
    One PostgreSQL server in a temporary directory.

    @ivar port: its TCP port on 127.0.0.1 (and its socket's number).
    @ivar socket_directory: where its unix socket is.
    """

    def __init__(self) -> None:
        bin_directory = _bin_directory()
        assert bin_directory is not None, missing()
        self._bin = bin_directory
        self._root = Path(tempfile.mkdtemp(prefix="rtunnel-pg-"))
        self.data = self._root / "data"
        self.socket_directory = self._root / "run"
        self.socket_directory.mkdir()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self._root, "postgres", "postgres")
            shutil.chown(self.socket_directory, "postgres", "postgres")
        self.port = _free_port()
        self._names = itertools.count(1)
        self._pid: int | None = None

    def _run(self, program: str, *arguments: str) -> None:
        command: list[str] = [str(self._bin / program), *arguments]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self._root)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stdout}{result.stderr}")

    def start(self) -> None:
        """Create the cluster and start its server."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        self.start_server()

    def start_server(self) -> None:
        """Start the server (again, after L{stop_server}), on the same port and socket."""
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_directory} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self._root / "server.log"), "-o", options, "-w", "start")
        pid_file = self.data / "postmaster.pid"
        self._pid = int(pid_file.read_text().split()[0])

    def stop_server(self) -> None:
        """Stop the server (fast shutdown: connections are cut), keeping its data for L{start_server}."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self._pid = None

    def stop(self) -> None:
        """Stop the server (fast shutdown, then SIGKILL by its PID) and remove its directory."""
        if self._pid is not None:
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                try:
                    os.kill(self._pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._pid = None
        shutil.rmtree(self._root, ignore_errors=True)

    def url(self, database: str = "postgres", *, tcp: bool = False) -> str:
        """A URL of one of its databases: over the unix socket, or with C{tcp} over 127.0.0.1."""
        if tcp:
            return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
        return f"postgresql://postgres@/{database}?host={self.socket_directory}&port={self.port}"

    def execute(self, statements: Sequence[str], database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as connection:
            for statement in statements:
                connection.execute(statement.encode())

    def new_database(self) -> str:
        """Create an empty database; return its name."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.execute([f"CREATE DATABASE {name}"])
        return name

    def drop_database(self, name: str) -> None:
        self.execute([f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_cluster: PostgreSQLCluster | None = None


def cluster() -> PostgreSQLCluster:
    """
    The test run's cluster, started on first use (skipping the calling test
    when PostgreSQL is not installed); L{stop_cluster} stops it, at the
    latest when the test process exits.
    """
    global _cluster
    skip_unless_available()
    if _cluster is None:
        started = PostgreSQLCluster()
        try:
            started.start()
        except BaseException:
            started.stop()
            raise
        _cluster = started
        atexit.register(stop_cluster)  # a run that ends without the session fixture's teardown
    return _cluster


def stop_cluster() -> None:
    global _cluster
    if _cluster is not None:
        _cluster.stop()
        _cluster = None
