"""
Real rtunnel processes on loopback: a tunnel server, keyfiles, sites.

Used by C{make demo} and by the end-to-end tests, which must exercise exactly
what an operator runs: C{twistd rtunnel-server}, C{rtunnel keyfile create},
C{twistd rtunnel}. Every process started here is ended here, by its PID. Every
wait is bounded and polls a real condition (a port accepts, the database says
the site is connected), never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: twistd, run by the same interpreter (no reliance on a script on PATH).
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll C{condition} until true; raise C{TimeoutError} naming C{what}."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The dropin in twisted/plugins is found through the source tree.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class Process:
    """One child process with its log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, nofile: int | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self._logfile = open(log, "ab")  # noqa: SIM115 (closed in stop())
        self._terminated = False

        def limit() -> None:
            # As `ulimit -n NOFILE` would, soft and hard, before exec.
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._logfile,
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            preexec_fn=limit if nofile is not None else None,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            if signum == signal.SIGTERM:
                self._terminated = True
            os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        """
        Wait for the exit status. twistd ends itself with the signal it was
        stopped by once its shutdown is done, so after our SIGTERM, death by
        SIGTERM counts as a clean exit (0).
        """
        try:
            status = self.popen.wait(timeout)
            return 0 if status == -signal.SIGTERM and self._terminated else status
        finally:
            if not self.running():
                self._logfile.close()

    def stop(self, timeout: float = 15.0) -> int:
        """
        SIGTERM (graceful drain), then SIGKILL if it does not end in time.

        @return: the exit status (see L{wait}).
        """
        if self.running():
            self.signal(signal.SIGTERM)
            try:
                return self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
        return self.wait(timeout)

    def kill(self) -> int:
        self.signal(signal.SIGKILL)
        return self.wait(10)

    def output(self) -> str:
        if not self._logfile.closed:
            self._logfile.flush()
        return self.log.read_text(errors="replace")


class Deployment:
    """
    A tunnel server and its sites, all on loopback, state under C{workdir}.
    """

    def __init__(
        self,
        workdir: Path,
        python: str = sys.executable,
        admin: str = "tcp:0:interface=127.0.0.1",
        database: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        #: the server's and the admin commands' --database (None: the SQLite file in the state directory)
        self.database = database
        #: the server's --admin: a port the kernel picks (its URL is recorded in the state database), so that
        #: deployments side by side never fight over the default 5501
        self.admin = admin
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.server_state = self.workdir / "server-state"
        self.server_port = free_port()
        self.processes: list[Process] = []
        self.server: Process | None = None

    # -- commands ----------------------------------------------------------

    def twistd(self, name: str, args: Sequence[str], nofile: int | None = None) -> Process:
        log = self.workdir / f"{name}.log"
        argv = [self.python, "-c", TWISTD, "-n", "--pidfile=", "--logfile=-", *args]
        proc = Process(name, argv, log, nofile)
        self.processes.append(proc)
        return proc

    def rtunnel(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the C{rtunnel} admin command; return its result."""
        result = subprocess.run(
            [self.python, "-m", "rtunnel", *args],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=ROOT,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"rtunnel {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def start_server(
        self,
        forwards: Sequence[str] = (),
        extra: Sequence[str] = (),
        wait: bool = True,
        nofile: int | None = None,
        twistd_options: Sequence[str] = (),
    ) -> Process:
        args = [
            "rtunnel-server",
            *self.state_args(),
            "--listen",
            f"tcp:{self.server_port}:interface=127.0.0.1",
            "--public-address",
            "127.0.0.1",
            "--admin",
            self.admin,
        ]
        for spec in forwards:
            args += ["--forward", spec]
        # twistd's own options (e.g. --logger) go before the plugin name.
        server = self.server = self.twistd("server", [*twistd_options, *args, *extra], nofile)
        if wait:
            wait_until(
                lambda: port_open("127.0.0.1", self.server_port) or not server.running(),
                30,
                "the tunnel server to listen",
            )
            if not server.running():
                raise RuntimeError(f"tunnel server exited:\n{server.output()}")
        return server

    def create_keyfile(self, site: str, expires: str | None = None, address: str | None = None) -> Path:
        path = self.workdir / f"{site}-{time.monotonic_ns()}.rtkey"
        args = ["keyfile", "create", *self.state_args(), "--site", site, "--output", str(path)]
        args += ["--address", address or f"127.0.0.1:{self.server_port}"]
        if expires:
            args += ["--expires", expires]
        self.rtunnel(*args)
        return path

    def start_site(
        self,
        site: str,
        allow: Sequence[str],
        keyfile: Path | None = None,
        extra: Sequence[str] = (),
        name: str | None = None,
        twistd_options: Sequence[str] = (),
    ) -> Process:
        args = [*twistd_options, "rtunnel", "--state", str(self.site_state(site))]
        if keyfile is not None:
            args += ["--keyfile", str(keyfile)]
        for target in allow:
            args += ["--allow", target]
        return self.twistd(name or f"site-{site}", [*args, *extra])

    def state_args(self) -> list[str]:
        """C{--state DIR} and, if the deployment has one, C{--database URL}: for the server and C{rtunnel}."""
        args = ["--state", str(self.server_state)]
        return args + ["--database", self.database] if self.database is not None else args

    def site_state(self, site: str) -> Path:
        return self.workdir / f"site-{site}-state"

    def sites(self) -> list[dict[str, Any]]:
        result = self.rtunnel("sites", "list", *self.state_args(), "--json")
        sites: list[dict[str, Any]] = json.loads(result.stdout)
        return sites

    def site_connected(self, site: str) -> bool:
        return any(s["name"] == site and s["connected"] for s in self.sites())

    def wait_connected(self, site: str, timeout: float = 30.0, watch: Process | None = None) -> None:
        def check() -> bool:
            if watch is not None and not watch.running():
                raise RuntimeError(f"{watch.name} exited ({watch.popen.returncode}):\n{watch.output()}")
            return self.site_connected(site)

        wait_until(check, timeout, f"site {site} to connect")

    def stop_all(self) -> dict[str, int]:
        """Stop every process (sites first), return their exit statuses."""
        statuses = {}
        for proc in reversed(self.processes):
            statuses[proc.name] = proc.stop()
        return statuses
