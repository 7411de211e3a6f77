"""
A throwaway HAProxy for the tests: Debian's C{haproxy} in TCP mode on
loopback in front of a few backends, as an operator puts one in front of
tunnel server replicas (docs/scaling.md shows the same configuration).

Each frontend listens on a free port of 127.0.0.1 and spreads connections
round-robin over its servers; a server is checked by a TCP connect every
L{HAProxy.check_interval} seconds, taken out after two failed checks and put
back after two good ones, and a connection refused by a server that is not
marked down yet is tried again on another (C{option redispatch}), so that
clients of the balancer do not see a replica that just died.

HAProxy runs in the foreground (C{-db}) with its configuration, its log
(C{log stderr}) and its admin socket in a temporary directory; it is stopped
by its PID. The Debian package's own service is not used. Without the
C{haproxy} command the tests that need it skip and say what installs it.
"""

from __future__ import annotations

import atexit
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import unittest
from collections.abc import Mapping
from pathlib import Path

from tools.harness import free_port, port_open, wait_until

__all__ = ["HAProxy", "missing", "skip_unless_available"]

INSTALL = "make test installs it: apt-get install haproxy"


def _command() -> str | None:
    """The haproxy program: on PATH, or where Debian puts it (C{/usr/sbin}, not on every user's PATH)."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")


def missing() -> str | None:
    """Why the HAProxy tests cannot run here (with what fixes it), or C{None}."""
    if _command() is None:
        return f"HAProxy is not installed (no haproxy command on PATH or in /usr/sbin); {INSTALL}"
    return None


def skip_unless_available() -> None:
    """
    Skip the calling test if HAProxy cannot run here (C{unittest.SkipTest}:
    a skip for trial's test cases and for pytest's functions and fixtures).
    """
    reason = missing()
    if reason is not None:
        raise unittest.SkipTest(reason)


class HAProxy:
    """
    One HAProxy process.

    @ivar frontends: frontend name -> {server name: its port on 127.0.0.1}.
    @ivar ports: frontend name -> the port it listens on (127.0.0.1).
    @ivar check_interval: seconds between two health checks of a server.
    @ivar track: a frontend whose servers' health the others follow (the
        server of the same name, C{track} in HAProxy's terms), or C{None}:
        each checks its own. A replica's forward port is best judged by its
        tunnel port: a TCP check of the forward itself would open a stream
        to the site each time.
    """

    def __init__(
        self, frontends: Mapping[str, Mapping[str, int]], check_interval: float = 0.25, track: str | None = None
    ) -> None:
        if not frontends or not all(frontends.values()):
            raise ValueError("HAProxy needs at least one frontend, each with at least one server")
        if track is not None and track not in frontends:
            raise ValueError(f"no frontend {track!r} to track")
        self.frontends = {name: dict(servers) for name, servers in frontends.items()}
        for name, servers in self.frontends.items():
            if track is not None and not set(servers) <= set(self.frontends[track]):
                raise ValueError(f"frontend {name!r} has servers that {track!r} has not: cannot track them")
        self.track = track
        self.ports = {name: free_port() for name in self.frontends}
        self.check_interval = check_interval
        self._root = Path(tempfile.mkdtemp(prefix="rtunnel-haproxy-"))
        self.config_path = self._root / "haproxy.cfg"
        self.log = self._root / "haproxy.log"
        self.socket_path = self._root / "admin.sock"
        self._process: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        """
        The configuration: TCP mode; client and server timeouts well above
        the sites' keepalive (a PING every 10 s, dead after 30 s), so that
        HAProxy never cuts an idle tunnel session itself.
        """
        interval = f"{round(self.check_interval * 1000)}ms"
        lines = [
            "global",
            "    log stderr format raw daemon info",
            f"    stats socket {self.socket_path} mode 600 level admin",
            "    maxconn 4096",
            "",
            "defaults",
            "    mode tcp",
            "    log global",
            "    option tcplog",
            "    option redispatch 1",
            "    retries 3",
            "    timeout connect 1s",
            "    timeout client 1h",
            "    timeout server 1h",
            "    timeout check 1s",
        ]
        for name, servers in self.frontends.items():
            lines += [
                "",
                f"frontend {name}",
                f"    bind 127.0.0.1:{self.ports[name]}",
                f"    default_backend {name}-servers",
                "",
                f"backend {name}-servers",
                "    balance roundrobin",
            ]
            if self.track is None or name == self.track:
                lines.append(f"    default-server check inter {interval} fall 2 rise 2")
                lines += [f"    server {server} 127.0.0.1:{port}" for server, port in servers.items()]
            else:
                lines += [
                    f"    server {server} 127.0.0.1:{port} track {self.track}-servers/{server}"
                    for server, port in servers.items()
                ]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Write the configuration, check it, start HAProxy and wait until every frontend accepts."""
        command = _command()
        assert command is not None, missing()
        self.config_path.write_text(self.config())
        checked = subprocess.run(
            [command, "-c", "-q", "-f", str(self.config_path)], capture_output=True, text=True, timeout=30
        )
        if checked.returncode != 0:
            raise RuntimeError(f"haproxy refused its configuration:\n{checked.stdout}{checked.stderr}")
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                [command, "-db", "-f", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self._root,
            )
        process = self._process
        # A test process that ends without its fixture's teardown (or a
        # script that fails before its stop) must not leave HAProxy running.
        atexit.register(self.stop)

        def listening() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"haproxy exited ({process.returncode}):\n{self.output()}")
            return all(port_open("127.0.0.1", port) for port in self.ports.values()) and self.socket_path.exists()

        wait_until(listening, 15, "haproxy to listen")

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def output(self) -> str:
        """Its log so far: warnings and one line per connection (C{option tcplog})."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def server_states(self) -> dict[tuple[str, str], str]:
        """
        Each server's health as HAProxy sees it, from C{show stat} on its
        admin socket: (frontend, server) -> C{"UP"}, C{"DOWN"}, or a
        transition such as C{"UP 1/2"}.
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.socket_path))
            s.sendall(b"show stat\n")
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
        text = b"".join(chunks).decode().lstrip("# ")
        states = {}
        for row in csv.DictReader(io.StringIO(text)):
            proxy, server = row["pxname"], row["svname"]
            if proxy.endswith("-servers") and server not in ("FRONTEND", "BACKEND"):
                states[proxy.removesuffix("-servers"), server] = row["status"]
        return states

    def wait_state(self, frontend: str, server: str, state: str, timeout: float = 15) -> None:
        """Wait until HAProxy has marked C{server} of C{frontend} C{state} (C{"UP"} or C{"DOWN"})."""
        wait_until(
            lambda: self.server_states().get((frontend, server)) == state,
            timeout,
            f"haproxy to mark {frontend}/{server} {state}",
        )

    def wait_all_up(self, timeout: float = 15) -> None:
        """
        Wait until every server passed a check: HAProxy starts with each one
        up but unchecked (C{"UP 1/2"}, one failed check from down).
        """
        everyone = {(frontend, server) for frontend, servers in self.frontends.items() for server in servers}
        wait_until(
            lambda: self.server_states() == dict.fromkeys(everyone, "UP"), timeout, "haproxy to find every server up"
        )

    def stop(self) -> None:
        """Stop HAProxy (SIGTERM, then SIGKILL by its PID) and remove its directory."""
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)
        shutil.rmtree(self._root, ignore_errors=True)
