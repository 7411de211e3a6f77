"""rtunnel fleet benchmark: one real tunnel server, thousands of sites from a few processes.

Usage (from the repo root)::

    make bench-fleet                               # N = 1,000 and 10,000 (~7.5 min on 2 cores)
    make bench-fleet FLEET_ARGS=--quick            # N = 500, shorter windows (~1 min)
    make bench-fleet FLEET_ARGS="--sizes 2000 --drivers 2 --backlog 1024"
    make bench-fleet FLEET_ARGS=--help

What runs:

* the server: ``twistd -n rtunnel-server`` started as tools/harness.py does
  (``python -c TWISTD``, the source tree on PYTHONPATH), listening on
  127.0.0.1 with K forwards ``127.0.0.1:PORT:SITE:echo:7`` to K sites;
* D driver processes (bench/fleet_driver.py), each running N/D sites as
  ``TunnelClientService`` instances (the embedding API) on one epoll reactor,
  each site with its own state directory and an in-process echo target;
* this orchestrator, which creates the N keyfiles in-process through the
  library calls ``rtunnel keyfile create`` makes (one interpreter start per
  keyfile would cost ~150 ms each), drives the phases over the drivers'
  stdin/stdout (JSON lines), measures, and writes the report.

Phases at each N (every wait polls a real condition and is bounded):

1. server start; RSS and CPU with 0 sites;
2. N tokens and keyfiles against the server's state directory;
3. enrollment: all N sites start with their keyfiles at once;
4. settle (a few keepalive intervals), then an idle window: server CPU and RSS;
5. SIGTERM the server, restart it at once on the same state; time until every
   site has a new session;
6. ``kill -9`` the server, restart; the same;
7. settle, idle window again (a server process that never enrolled anyone);
8. sequential connect + 64 B echo + close through the forwards;
9. the admin endpoint (issue 12; bench/fleet_admin.py): timed scrapes of
   /metrics and /api/v1/sites with all N sites connected, what they count
   checked against N, and echoes through the forwards while a scrape runs.

Listen drops and overflows come from ``nstat`` around each phase.  By default
(as root) the whole benchmark runs in its own network namespace, so these
counters and ports are the benchmark's alone; ``--netns off`` runs in the host
namespace, where other programs' drops would be counted too.

Outputs: the Markdown report, printed and written to
bench/results/fleet-latest.md for a default full run (else to _bench/); raw
numbers in _bench/fleet/last-run.json; logs and state under _bench/fleet/nN/
(git-ignored; site state directories and keyfiles are removed after each size
unless --keep).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import fleet_admin, fleet_profile, procstats  # noqa: E402

WORK = REPO / "_bench" / "fleet"
RESULTS_MD = REPO / "bench" / "results" / "fleet-latest.md"
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
#: twistd, run by the same interpreter (as tools/harness.py does)
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
NETNS_ENV = "RTUNNEL_FLEET_IN_NETNS"
PROBE_ENV = "RTUNNEL_FLEET_PROBE"  # read by bench/fleet_probe.py
KEEPALIVE_S = 10.0  # the default keepalive interval of both roles

PLANS: dict[str, dict[str, Any]] = {
    # settle: after all sites are up, before measuring (a few keepalive intervals)
    # idle: the CPU window; echo: sequential connect+echo+close through the forwards
    "full": dict(sizes=[1000, 10000], settle_s=30.0, idle_s=30.0, echo=2000, zero_s=5.0),
    "quick": dict(sizes=[500], settle_s=12.0, idle_s=10.0, echo=500, zero_s=2.0),
}

TARGETS = {  # at N = 10,000 (issue 9, item 15)
    "kib_site": 48.0,
    "cpu_idle_pct": 10.0,
    "back_s": 30.0,
    "drops": 0,
    "echo_p99_ms": 5.0,
}


class MeasureError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ small helpers
def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def listen_counters() -> dict[str, int] | None:
    """TcpExtListenDrops/Overflows now (nstat, absolute, history untouched); None if unavailable."""
    try:
        out = subprocess.run(
            ["nstat", "-saz", "TcpExtListenDrops", "TcpExtListenOverflows"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    vals = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith("TcpExt"):
            vals[parts[0][6:]] = int(parts[1])
    return vals if "ListenDrops" in vals else None


def counter_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {k: after[k] - before.get(k, 0) for k in after}


def listening(port: int) -> bool:
    """Whether 127.0.0.1:port is in LISTEN state (read from /proc/net/tcp: no connection is made)."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            return any(ln.split()[1] == want and ln.split()[3] == "0A" for ln in f)
    except OSError:
        return False


def listen_backlog(port: int) -> int | None:
    """The accept-queue limit of a listening socket: `ss -ltn` shows it as Send-Q."""
    try:
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "LISTEN":
            return int(parts[2])
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def echo_once(port: int, msg: bytes) -> float:
    """Connect to 127.0.0.1:port (a forward), send ``msg``, read it back, close: the seconds it took.

    OSError if the connection fails; MeasureError if what came back is not ``msg``.
    """
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = c.recv(len(msg) - len(got))
            if not chunk:
                break
            got += chunk
    elapsed = time.perf_counter() - start
    if got != msg:
        raise MeasureError(f"echo mismatch ({len(got)} bytes)")
    return elapsed


def thread_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def activity(pid: int) -> dict[str, int]:
    """How often a process went to sleep: voluntary context switches
    (/proc/PID/status); for a reactor, about one per epoll_wait that slept."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                out["wakeups"] = int(line.split()[1])
    except OSError:
        pass
    return out


def sysctl(name: str) -> str:
    try:
        return Path("/proc/sys/" + name.replace(".", "/")).read_text().strip()
    except OSError:
        return "?"


# ------------------------------------------------------------------ processes
_started: list[subprocess.Popen[bytes]] = []  # every process this run started, ended by PID in finally


def end_process(p: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM one process we started, SIGKILL after ``timeout``; reaped either way."""
    if p.poll() is not None:
        return
    try:
        os.kill(p.pid, signal.SIGTERM)
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(10)
    except ProcessLookupError:
        pass


class Server:
    """``twistd -n rtunnel-server`` on 127.0.0.1, restartable on the same state and ports."""

    def __init__(
        self,
        workdir: Path,
        forwards: list[tuple[int, str]],
        backlog: int | None,
        probe: str = "off",
        extra: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.extra = list(extra or [])
        self.probe = probe
        self.state = workdir / "server-state"
        self.port = free_port()
        # The admin endpoint's default port (5501) is fixed and may be taken on this host: give it a free one,
        # unless --server-arg says where it goes (or turns it off); the admin phase is skipped then.
        self.admin_port: int | None = (
            None if any(a == "--admin" or a.startswith("--admin=") for a in self.extra) else free_port()
        )
        self.forwards = forwards
        self.backlog = backlog
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        listen = f"tcp:{self.port}:interface=127.0.0.1" + (f":backlog={self.backlog}" if self.backlog else "")
        # --probe: the same twistd run() from bench/fleet_probe.py, which adds a SIGUSR2 memory dump
        launcher = [str(REPO / "bench" / "fleet_probe.py")] if self.probe != "off" else ["-c", TWISTD]
        argv = [
            PYTHON,
            *launcher,
            "-n",
            "--pidfile=",
            f"--logfile={self.workdir / 'server.log'}",
            "rtunnel-server",
            "--state",
            str(self.state),
            "--listen",
            listen,
            "--public-address",
            "127.0.0.1",
        ]
        for port, site in self.forwards:
            argv += ["--forward", f"127.0.0.1:{port}:{site}:echo:7"]
        if self.admin_port is not None:
            argv += ["--admin", f"tcp:{self.admin_port}:interface=127.0.0.1"]
        return argv + self.extra

    def start(self) -> None:
        self.starts += 1
        env = dict(os.environ, PYTHONPATH=str(REPO))
        if self.probe != "off":
            env[PROBE_ENV] = str(self.workdir)
        if self.probe == "tracemalloc":
            env["PYTHONTRACEMALLOC"] = "1"
        with open(self.workdir / "server.stderr", "ab") as err:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, cwd=REPO, start_new_session=True
            )
        _started.append(self.proc)

    def wait_listening(self, timeout: float = 60.0) -> float:
        """Poll /proc/net/tcp until the tunnel port and every forward listen; the monotonic time it did."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        ports = [self.port] + [p for p, _ in self.forwards]
        while True:
            if all(listening(p) for p in ports):
                return time.monotonic()
            if self.proc.poll() is not None:
                raise MeasureError(
                    f"server exited with {self.proc.returncode}: "
                    f"{tail(self.workdir / 'server.stderr')} {tail(self.workdir / 'server.log')}"
                )
            if time.monotonic() > deadline:
                raise MeasureError(f"server not listening after {timeout:.0f} s")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_and_wait(self, sig: int, timeout: float) -> tuple[float, int | None]:
        """Send ``sig``; wait (bounded) for the exit; (monotonic time of the exit, exit status)."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise MeasureError(f"server did not exit within {timeout:.0f} s of signal {sig}; killed") from None
        return time.monotonic(), rc


def tail(path: Path, n: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Driver:
    """One bench/fleet_driver.py process and its JSON-lines pipe."""

    def __init__(self, index: int, workdir: Path, sites: Sequence[Sequence[str | None]], nice: int = 0) -> None:
        self.index = index
        self.n = len(sites)
        cfg = workdir / f"driver-{index}.json"
        cfg.write_text(json.dumps(sites))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(workdir / f"driver-{index}.stderr", "ab") as err:
            self.proc = subprocess.Popen(
                (["nice", "-n", str(nice)] if nice else [])
                + [
                    PYTHON,
                    str(REPO / "bench" / "fleet_driver.py"),
                    "--config",
                    str(cfg),
                    "--log",
                    str(workdir / f"driver-{index}.log"),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )
        _started.append(self.proc)
        self.buf = b""
        self.workdir = workdir
        self.stderr = workdir / f"driver-{index}.stderr"

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise MeasureError(f"driver {self.index} is gone (rc {self.proc.poll()}): {tail(self.stderr)}") from None

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            r, _, _ = select.select([fd], [], [], max(0.0, left))
            if not r:
                where = self.workdir / f"stuck-driver-{self.index}.txt"
                binary = fleet_profile.pyspy_binary()
                if binary is not None:  # what was it doing? (diagnosis only)
                    with open(where, "ab") as f:
                        subprocess.run([binary, "dump", "--pid", str(self.proc.pid)], stdout=f, stderr=f, timeout=60)
                raise MeasureError(
                    f"driver {self.index}: no answer within {timeout:.0f} s"
                    + (f" (py-spy dump in {where.name})" if binary else "")
                )
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise MeasureError(f"driver {self.index} exited (rc {self.proc.wait(5)}): {tail(self.stderr)}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def poll_line(self) -> dict[str, Any] | None:
        """The next line if one has arrived, else None (never blocks)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            r, _, _ = select.select([fd], [], [], 0)
            if not r:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise MeasureError(f"driver {self.index} exited (rc {self.proc.wait(5)}): {tail(self.stderr)}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def request(self, obj: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        self.send(obj)
        return self.read(timeout)

    def end(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "exit"})
                self.proc.wait(10)
            except (MeasureError, subprocess.TimeoutExpired, OSError):
                pass
        end_process(self.proc, timeout=10)


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}) \[([^\]#]*)#(warn|error|critical)\] (.*)$")


def server_log_events(workdir: Path, phases: dict[str, dict[str, Any]]) -> None:
    """Count the server's warn/error/critical lines per phase (by the phase's wall-clock span),
    addresses, site names and numbers folded, into ``phase["server_events"]``."""
    spans = {name: ph["wall"] for name, ph in phases.items() if "wall" in ph}
    counts: dict[str, dict[str, int]] = {name: {} for name in spans}
    for path in sorted(workdir.glob("server.log*")):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            m = _LOG_LINE.match(line)
            if not m:
                continue
            when = dt.datetime.fromisoformat(m.group(1)).timestamp()
            msg = re.sub(r"\d+\.\d+\.\d+\.\d+:\d+", "ADDR", m.group(4))
            msg = re.sub(r"fleet-\d+", "SITE", msg)
            msg = re.sub(r"\d+(\.\d+)?", "N", msg)[:200]
            key = f"{m.group(3)}: {m.group(2).rsplit('.', 1)[-1]}: {msg}"
            for name, (w0, w1) in spans.items():
                if int(w0) <= when <= w1 + 1:
                    counts[name][key] = counts[name].get(key, 0) + 1
    for name, c in counts.items():
        phases[name]["server_events"] = dict(sorted(c.items(), key=lambda kv: -kv[1]))


# ------------------------------------------------------------------ keyfiles
def create_keyfiles(server_state: Path, names: list[str], outdir: Path, address: str) -> float:
    """What ``rtunnel keyfile create`` does (rtunnel/cli/admin.py), in-process for every site.

    Returns the seconds it took.  The token goes into the server's database
    while the server runs, exactly as the CLI does it.
    """
    from rtunnel.identity.certs import certificate_covers, dump_certificate
    from rtunnel.identity.keyfile import Keyfile, parse_address, write_keyfile
    from rtunnel.identity.state import ServerState

    t0 = time.monotonic()
    state = ServerState.open_existing(str(server_state))
    try:
        host = parse_address(address)[0]
        if not certificate_covers(state.server_certificate, host):
            raise MeasureError(f"server certificate does not cover {host}")
        ca_pem = dump_certificate(state.ca_certificate)
        expires = timedelta(hours=24)
        for name in names:
            now = dt.datetime.now(UTC).replace(microsecond=0)  # whole seconds, as the CLI
            token = state.store.create_token(name, expires, now)
            write_keyfile(
                outdir / f"{name}.rtkey",
                Keyfile(
                    site=name,
                    addresses=(address,),
                    server_name=host,
                    ca_certificate_pem=ca_pem,
                    token=token,
                    expires=now + expires,
                ),
            )
    finally:
        state.close()
    return time.monotonic() - t0


# ------------------------------------------------------------------ one size
class Fleet:
    def __init__(self, n: int, args: argparse.Namespace, plan: dict[str, Any]) -> None:
        self.n = n
        self.args = args
        self.plan = plan
        self.workdir = WORK / f"n{n}"
        self.names = [f"fleet-{i:05d}" for i in range(n)]
        self.drivers: list[Driver] = []
        self.res: dict[str, Any] = {"n": n, "drivers": args.drivers, "phases": {}, "probes": {}, "profiles": {}}
        self.server: Server | None = None
        self._spies: list[tuple[str, Path, subprocess.Popen[bytes] | None]] = []

    # -- measurement helpers
    def cpu(self) -> dict[str, float]:
        assert self.server is not None
        snap = {"server": procstats.cpu_seconds(self.server.pid) if self.server.alive() else 0.0}
        snap["drivers"] = sum(procstats.cpu_seconds(d.proc.pid) for d in self.drivers)
        return snap

    def rss_kib(self) -> int:
        assert self.server is not None
        return procstats.rss_kib(self.server.pid)

    def status(self, since: float) -> list[dict[str, Any]]:
        for d in self.drivers:
            d.send({"cmd": "status", "since": since})
        sts = [d.read(120) for d in self.drivers]
        fatal = [s["first_fatal"] for s in sts if s.get("fatal")]
        if fatal:
            raise MeasureError(f"{sum(s['fatal'] for s in sts)} sites failed fatally, first: {fatal[0]}")
        return sts

    def wait_all_up(
        self, since: float, timeout: float, what: str, key: str = "up_since", timeline: list[list[float]] | None = None
    ) -> list[dict[str, Any]]:
        """Poll the drivers (each at most 10 times a second) until all N sites have a
        session begun at or after ``since``; return their last status replies.

        The drivers are asked in parallel and their answers read as they come:
        in a reconnect storm a driver's reactor can be busy for seconds, and the
        ``timeline`` must not wait for it.  ``timeline`` gets a row every 0.5 s:
        seconds since ``since``, sites up (as last reported), server and drivers'
        CPU seconds so far (the server's 0 while it is down).
        """
        deadline = time.monotonic() + timeout
        last_log = last_row = time.monotonic()
        latest: dict[int, dict[str, Any]] = {}
        asked: dict[int, float] = {}
        answered: dict[int, float] = {}
        while True:
            now = time.monotonic()
            for d in self.drivers:
                if d.index not in asked and now - answered.get(d.index, 0.0) >= 0.1:
                    d.send({"cmd": "status", "since": since})
                    asked[d.index] = now
            waiting = [d for d in self.drivers if d.index in asked]
            select.select([d.proc.stdout for d in waiting if d.proc.stdout is not None], [], [], 0.05)
            for d in waiting:
                msg = d.poll_line()
                if msg is not None:
                    if msg.get("fatal"):
                        raise MeasureError(f"{what}: sites failed fatally, first: {msg.get('first_fatal')}")
                    latest[d.index] = msg
                    answered[d.index] = time.monotonic()
                    del asked[d.index]
                elif time.monotonic() - asked[d.index] > 120:
                    d.read(0)  # raises, with a py-spy dump of the driver
            now = time.monotonic()
            count = sum(m[key] for m in latest.values())
            done = len(latest) == len(self.drivers) and count >= self.n
            if timeline is not None and (now - last_row >= 0.5 or done or not timeline):
                last_row = now
                c = self.cpu()
                timeline.append([round(now - since, 2), count, c["server"], round(c["drivers"], 2)])
            if done:
                for d in self.drivers:  # collect the answers still owed, so the pipes stay in step
                    if d.index in asked:
                        d.read(120)
                return [latest[d.index] for d in self.drivers]
            if now > deadline:
                raise MeasureError(f"{what}: {count} of {self.n} sites after {timeout:.0f} s")
            if self.server is not None and not self.server.alive():
                raise MeasureError(
                    f"{what}: server exited ({self.server.proc and self.server.proc.returncode}): "
                    f"{tail(self.workdir / 'server.log')}"
                )
            if now - last_log > 10:
                log(f"  {what}: {count:,}/{self.n:,} after {now - since:.0f} s")
                last_log = now

    def times(self, since: float) -> tuple[list[float], list[float]]:
        for d in self.drivers:
            d.send({"cmd": "times", "since": since})
        up: list[float] = []
        enrolled: list[float] = []
        for d in self.drivers:
            r = d.read(60)
            up += [t - since for t in r["up"]]
            enrolled += [t - since for t in r["enrolled"]]
        return up, enrolled

    def events(self) -> dict[str, int]:
        """Warnings and errors the sites logged since the last call, summed over the drivers."""
        for d in self.drivers:
            d.send({"cmd": "events"})
        total: dict[str, int] = {}
        for d in self.drivers:
            for k, v in d.read(120)["counts"].items():
                total[k] = total.get(k, 0) + v
        return dict(sorted(total.items(), key=lambda kv: -kv[1]))

    def probe(self, label: str, trim: bool = False) -> None:
        """With --probe: ask the server (SIGUSR2, bench/fleet_probe.py) what its memory is made of."""
        s = self.server
        if self.args.probe == "off" or s is None or not s.alive():
            return
        out = self.workdir / f"probe-{label}.json"
        out.unlink(missing_ok=True)
        (self.workdir / "probe-request.json").write_text(json.dumps({"label": label, "trim": trim}))
        os.kill(s.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 300
        while not out.exists():
            if time.monotonic() > deadline or not s.alive():
                raise MeasureError(f"probe {label}: no answer from the server")
            time.sleep(0.1)
        data = json.loads(out.read_text())
        self.res["probes"][label] = data
        log(
            f"  probe {label}: RSS {data['rss_kib'] / 1024:.1f} MiB, {data['gc_objects']:,} gc objects, "
            f"{data['allocated_blocks']:,} pymalloc blocks"
            + (f", traced {data['traced_bytes'] / 2**20:.1f} MiB" if "traced_bytes" in data else "")
            + (
                f", malloc_trim {data['trim'][0] / 1024:.1f} -> {data['trim'][1] / 1024:.1f} MiB"
                if "trim" in data
                else ""
            )
            + f" ({data['probe_s']:.1f} s)"
        )

    def spy(self, label: str, pid: int, rate: int = 100) -> None:
        """With --pyspy: start sampling ``pid`` until ``unspy``."""
        if not self.args.pyspy:
            return
        out = self.workdir / f"pyspy-{label}.txt"
        p = fleet_profile.start(pid, out, rate=rate)
        if p is not None:
            _started.append(p)
        self._spies.append((label, out, p))

    def unspy(self) -> None:
        for label, out, p in self._spies:
            fleet_profile.stop(p)
            if out.exists():
                summary = fleet_profile.summarize(out)
                out.with_suffix(".summary.txt").write_text(summary)
                self.res["profiles"][label] = str(out.relative_to(REPO))
                log(f"  py-spy {label}: " + summary.splitlines()[0])
        self._spies = []

    @staticmethod
    def spread(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        return {"p50": pct(values, 50), "p90": pct(values, 90), "p99": pct(values, 99), "max": max(values)}

    # -- phases
    def run(self) -> dict[str, Any]:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        (self.workdir / "keyfiles").mkdir(parents=True)
        (self.workdir / "sites").mkdir()
        k = max(1, min(self.args.forwards, self.n))
        # forward k leads to a site in the middle of driver k's share (spread over drivers)
        per = -(-self.n // self.args.drivers)
        fwd_sites = [
            self.names[min(self.n - 1, (i % self.args.drivers) * per + per // 2 + i // self.args.drivers)]
            for i in range(k)
        ]
        self.server = Server(
            self.workdir,
            [(free_port(), s) for s in fwd_sites],
            self.args.backlog,
            self.args.probe,
            self.args.server_arg,
        )
        try:
            self.phase_zero()
            self.phase_keyfiles()
            self.start_drivers()
            self.phase_enroll()
            self.phase_idle("idle_after_enroll")
            self.phase_restart("sigterm", signal.SIGTERM)
            self.phase_restart("kill9", signal.SIGKILL)
            self.phase_idle("idle_steady")
            self.phase_echo()
            self.phase_admin()
        finally:
            server_log_events(self.workdir, self.res["phases"])
            for _, _, spy in self._spies:
                fleet_profile.stop(spy)
            for d in self.drivers:
                d.end()
            if self.server.proc is not None:
                end_process(self.server.proc, timeout=30)
            if not self.args.keep:
                shutil.rmtree(self.workdir / "sites", ignore_errors=True)
                shutil.rmtree(self.workdir / "keyfiles", ignore_errors=True)
        return self.res

    def phase_zero(self) -> None:
        s = self.server
        assert s is not None
        s.start()
        t = s.wait_listening()
        self.res["server_argv"] = " ".join(a if " " not in a else "'...twistd run...'" for a in s.argv()[1:])
        self.res["tunnel_backlog"] = listen_backlog(s.port)
        self.res["forward_backlog"] = listen_backlog(s.forwards[0][0]) if s.forwards else None
        time.sleep(max(0.0, t + 2.0 - time.monotonic()))  # let start-up allocations finish
        c0, t0 = procstats.cpu_seconds(s.pid), time.monotonic()
        time.sleep(self.plan["zero_s"])
        c1, t1 = procstats.cpu_seconds(s.pid), time.monotonic()
        self.res["rss0_kib"] = self.rss_kib()
        self.res["cpu0_pct"] = 100 * (c1 - c0) / (t1 - t0)
        self.probe("zero")
        log(
            f"N={self.n:,}: server pid {s.pid} on 127.0.0.1:{s.port} (accept backlog {self.res['tunnel_backlog']}); "
            f"RSS with 0 sites {self.res['rss0_kib'] / 1024:.1f} MiB, CPU {self.res['cpu0_pct']:.2f} %"
        )

    def phase_keyfiles(self) -> None:
        assert self.server is not None
        secs = create_keyfiles(
            self.server.state, self.names, self.workdir / "keyfiles", f"127.0.0.1:{self.server.port}"
        )
        self.res["keyfiles_s"] = secs
        log(f"  {self.n:,} tokens + keyfiles in-process: {secs:.1f} s ({self.n / secs:,.0f}/s)")

    def start_drivers(self) -> None:
        d = self.args.drivers
        shares = [self.names[i * len(self.names) // d : (i + 1) * len(self.names) // d] for i in range(d)]
        t0 = time.monotonic()
        for i, share in enumerate(shares):
            sites = [
                [name, str(self.workdir / "sites" / name), str(self.workdir / "keyfiles" / f"{name}.rtkey")]
                for name in share
            ]
            self.drivers.append(Driver(i, self.workdir, sites, self.args.nice))
        for drv in self.drivers:
            ready = drv.read(300)
            if ready.get("ev") != "ready":
                raise MeasureError(f"driver {drv.index}: unexpected first line {ready}")
        log(f"  {d} drivers ready with {self.n:,} sites loaded ({time.monotonic() - t0:.1f} s)")

    def phase_enroll(self) -> None:
        assert self.server is not None
        self.events()
        self.spy("enroll-server", self.server.pid)
        before_c, before_l, wall0 = self.cpu(), listen_counters(), time.time()
        timeline: list[list[float]] = []
        t0 = time.monotonic()
        for d in self.drivers:
            d.send({"cmd": "start", "batch": 50})
        for d in self.drivers:
            d.read(120)  # "starting": each driver starts its sites over the next reactor turns
        sts = self.wait_all_up(t0, max(180.0, self.n * 0.05), "enrollment", timeline=timeline)
        t_end = time.monotonic()
        after_c, after_l = self.cpu(), listen_counters()
        self.unspy()
        last_enrolled = max(s["last_enrolled"] for s in sts) - t0
        last_up = max(s["last_up"] for s in sts) - t0
        up, enrolled = self.times(t0)
        ph = {
            "all_enrolled_s": last_enrolled,
            "all_up_s": last_up,
            "enroll_per_s": self.n / last_enrolled,
            "enrolled_spread": self.spread(enrolled),
            "up_spread": self.spread(up),
            "server_cpu_s": after_c["server"] - before_c["server"],
            "drivers_cpu_s": after_c["drivers"] - before_c["drivers"],
            "wall_s": t_end - t0,
            "listen": counter_delta(before_l, after_l),
            "sessions": sum(s["sessions"] for s in sts),
            "timeline": timeline,
            "site_events": self.events(),
            "wall": [wall0, time.time()],
        }
        ph["server_ms_per_site"] = 1000 * ph["server_cpu_s"] / self.n
        self.res["phases"]["enroll"] = ph
        log(
            f"  enrollment: all {self.n:,} enrolled in {last_enrolled:.1f} s ({ph['enroll_per_s']:,.0f}/s), "
            f"all connected in {last_up:.1f} s; server CPU {ph['server_cpu_s']:.1f} s "
            f"({ph['server_ms_per_site']:.2f} ms/site), drivers {ph['drivers_cpu_s']:.1f} s; listen {ph['listen']}"
        )

    def phase_idle(self, name: str) -> None:
        """Settle, then the idle window: nothing is asked of the drivers during it."""
        assert self.server is not None
        sts = self.status(0.0)
        sessions0 = sum(s["sessions"] for s in sts)
        time.sleep(self.plan["settle_s"])
        rss_a = self.rss_kib()
        self.events()
        self.spy(f"{name}-server", self.server.pid, rate=200)
        a0 = activity(self.server.pid)
        c0, l0, t0, wall0 = self.cpu(), listen_counters(), time.monotonic(), time.time()
        time.sleep(self.plan["idle_s"])
        c1, l1, t1, wall1 = self.cpu(), listen_counters(), time.monotonic(), time.time()
        a1 = activity(self.server.pid)
        rss_b = self.rss_kib()
        self.unspy()
        sts = self.status(0.0)
        up = sum(s["up"] for s in sts)
        sessions1 = sum(s["sessions"] for s in sts)
        if up < self.n:
            raise MeasureError(f"{name}: only {up} of {self.n} sites up at the end of the idle window")
        ph = {
            "window_s": t1 - t0,
            "settle_s": self.plan["settle_s"],
            "server_cpu_pct": 100 * (c1["server"] - c0["server"]) / (t1 - t0),
            "drivers_cpu_pct": 100 * (c1["drivers"] - c0["drivers"]) / (t1 - t0),
            "rss_kib_start": rss_a,
            "rss_kib": rss_b,
            "kib_per_site": (rss_b - self.res["rss0_kib"]) / self.n,
            "server_fds": fd_count(self.server.pid),
            "new_sessions": sessions1 - sessions0,
            "listen": counter_delta(l0, l1),
            "drivers_rss_kib": sum(procstats.rss_kib(d.proc.pid) for d in self.drivers),
            "site_events": self.events(),
            "wall": [wall0, wall1],
            "per_s": {k: (a1[k] - a0.get(k, 0)) / (t1 - t0) for k in a1},
        }
        self.res["phases"][name] = ph
        self.probe(name, trim=name == "idle_steady")
        log(
            f"  {name}: server CPU {ph['server_cpu_pct']:.2f} % of a core over {ph['window_s']:.0f} s "
            f"(drivers {ph['drivers_cpu_pct']:.1f} %); RSS {rss_b / 1024:.1f} MiB = "
            f"{ph['kib_per_site']:.1f} KiB/site; {ph['new_sessions']} new sessions meanwhile"
        )

    def phase_restart(self, name: str, sig: int) -> None:
        s = self.server
        assert s is not None
        self.events()
        self.spy(f"{name}-driver0", self.drivers[0].proc.pid)
        if sig == signal.SIGTERM:
            self.spy(f"{name}-oldserver", s.pid)  # the drain
        before_l, wall0 = listen_counters(), time.time()
        d_cpu0 = sum(procstats.cpu_seconds(d.proc.pid) for d in self.drivers)
        timeline: list[list[float]] = []
        t0 = time.monotonic()
        t_exit, rc = s.signal_and_wait(sig, timeout=120)
        s.start()
        t_listen = s.wait_listening()
        self.spy(f"{name}-server", s.pid)
        sts = self.wait_all_up(t0, 300, f"{name} restart", timeline=timeline)
        t_end = time.monotonic()
        after_l = listen_counters()
        self.unspy()
        up, _ = self.times(t0)
        ph = {
            "exit_s": t_exit - t0,
            "exit_status": rc,
            "listening_s": t_listen - t0,
            "restart_to_listen_s": t_listen - t_exit,
            "all_back_s": max(st["last_up"] for st in sts) - t0,
            "back_spread": self.spread(up),
            "server_cpu_s": procstats.cpu_seconds(s.pid),  # the new process: its whole life so far
            "drivers_cpu_s": sum(procstats.cpu_seconds(d.proc.pid) for d in self.drivers) - d_cpu0,
            "wall_s": t_end - t0,
            "listen": counter_delta(before_l, after_l),
            "timeline": timeline,
            "site_events": self.events(),
            "wall": [wall0, time.time()],
        }
        ph["all_back_after_listen_s"] = ph["all_back_s"] - ph["listening_s"]
        self.res["phases"][name] = ph
        log(
            f"  {name}: server gone after {ph['exit_s']:.2f} s (status {rc}), listening again at "
            f"{ph['listening_s']:.2f} s, all {self.n:,} back at {ph['all_back_s']:.2f} s "
            f"(p50 {ph['back_spread'].get('p50', 0):.2f} s); new server CPU {ph['server_cpu_s']:.1f} s; "
            f"listen {ph['listen']}"
        )

    def phase_echo(self) -> None:
        s = self.server
        assert s is not None
        ports = [p for p, _ in s.forwards]
        count = self.plan["echo"] if self.args.echo is None else self.args.echo
        msg = bytes(range(64))
        lat: list[float] = []
        errors: list[str] = []
        deadline = time.monotonic() + max(60.0, count * 0.05)
        self.spy("echo-server", s.pid, rate=200)
        c0 = self.cpu()
        t0 = time.monotonic()
        for i in range(count + 50):  # the first 50 warm up and are not counted
            if time.monotonic() > deadline:
                errors.append(f"time limit reached after {i} connections")
                break
            port = ports[i % len(ports)]
            try:
                elapsed = echo_once(port, msg)
            except (OSError, MeasureError) as e:
                errors.append(f"connection {i}: {e}")
                continue
            if i >= 50:
                lat.append(elapsed * 1000)
        t1 = time.monotonic()
        c1 = self.cpu()
        self.unspy()
        ph = {
            "count": len(lat),
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "forwards": len(ports),
            "p50_ms": pct(lat, 50) if lat else None,
            "p99_ms": pct(lat, 99) if lat else None,
            "max_ms": max(lat) if lat else None,
            "per_s": len(lat) / (t1 - t0),
            "server_cpu_ms_per_conn": 1000 * (c1["server"] - c0["server"]) / max(1, len(lat) + 50),
        }
        self.res["phases"]["echo"] = ph
        if not lat:
            raise MeasureError(f"echo: no successful connection ({errors[:1]})")
        log(
            f"  echo: {len(lat):,} sequential connect+64 B echo+close over {len(ports)} forwards: "
            f"p50 {ph['p50_ms']:.2f} ms, p99 {ph['p99_ms']:.2f} ms, max {ph['max_ms']:.1f} ms; "
            f"{len(errors)} errors"
        )

    def phase_admin(self) -> None:
        """Scrape the admin endpoint with all N sites connected (bench/fleet_admin.py says what and why).

        It runs after the echo phase, not before it: the echo figures (a
        target) stay measured as in earlier runs, with no scrape's leftovers
        in the server (Twisted's thread pool started by /metrics, freed
        megabytes, objects the collector promoted); the forwards' sites then
        carry non-zero stream and byte counters, as a working fleet does; and
        the echo phase's p50 is there to read the echoes during a scrape against.
        """
        s = self.server
        assert s is not None
        if s.admin_port is None:
            self.res["phases"]["admin"] = {"n": self.n, "skipped": "--server-arg sets --admin"}
            log("  admin: skipped (--server-arg sets --admin)")
            return
        deadline = time.monotonic() + 30
        while not listening(s.admin_port):  # it listens after the forwards, which wait_listening saw
            if time.monotonic() > deadline or not s.alive():
                raise MeasureError(f"admin: nothing listens on 127.0.0.1:{s.admin_port} after 30 s")
            time.sleep(0.05)
        base = f"http://127.0.0.1:{s.admin_port}"
        sts = self.status(0.0)
        up0, sessions0 = sum(st["up"] for st in sts), sum(st["sessions"] for st in sts)
        if up0 < self.n:
            raise MeasureError(f"admin: only {up0} of {self.n} sites up before the scrapes")
        idle_pct = self.res["phases"].get("idle_steady", {}).get("server_cpu_pct")
        self.events()
        self.spy("admin-server", s.pid, rate=200)
        wall0, t0, c0 = time.time(), time.monotonic(), self.cpu()
        deadline = t0 + 600  # every request is bounded too (fleet_admin.TIMEOUT_S)
        scrapes: dict[str, dict[str, Any]] = {}
        bodies: dict[str, bytes] = {}
        for label, path, count in fleet_admin.PAGES:
            scrapes[label], bodies[label] = fleet_admin.scrape_series(
                base + path, count, deadline, lambda: procstats.cpu_seconds(s.pid)
            )
            if idle_pct is not None:  # what the server would have spent meanwhile had nobody asked
                scrapes[label]["idle_cpu_s"] = idle_pct / 100 * scrapes[label]["wall_s"]
        during = {
            label: self.echo_during_scrape(base + path, deadline)
            for label, path, _ in fleet_admin.PAGES
            if label in ("metrics", "history")
        }
        t1, c1 = time.monotonic(), self.cpu()
        self.unspy()
        sts = self.status(0.0)
        up1, sessions1 = sum(st["up"] for st in sts), sum(st["sessions"] for st in sts)
        ph: dict[str, Any] = {
            "n": self.n,
            "url": base,
            "scrapes": scrapes,
            "during": during,
            "wall_s": t1 - t0,
            "server_cpu_s": c1["server"] - c0["server"],
            "idle_cpu_pct": idle_pct,
            "rss_kib": self.rss_kib(),
            "server_threads": thread_count(s.pid),
            "up_before": up0,
            "up_after": up1,
            "new_sessions": sessions1 - sessions0,
            "site_events": self.events(),
            "wall": [wall0, time.time()],
        }
        self.res["phases"]["admin"] = ph
        problems = [
            f"{sc['url']}: {sc['errors']} of {sc['errors'] + sc['count']} scrapes failed, first: {sc['first_error']}"
            for sc in scrapes.values()
            if sc["errors"]
        ]
        try:
            if bodies["metrics"]:
                ph["metrics"] = fleet_admin.metrics_figures(bodies["metrics"])
            if bodies["sites"]:
                ph["sites"] = fleet_admin.sites_figures(bodies["sites"])
            if bodies["history"]:
                ph["history"] = fleet_admin.sites_figures(bodies["history"])
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"a page did not parse: {e!r}")
        log(f"  admin: {fleet_admin.summary(ph)}")
        # The drivers saw every site up before and after, with no new session: every page must count N connected.
        steady = up1 == self.n and ph["new_sessions"] == 0
        m = ph.get("metrics")
        if m is not None:
            if m["sites_connected"] != self.n:
                problems.append(f"rtunnel_sites_connected is {m['sites_connected']}, not {self.n}")
            if m["site_up_series"] != self.n or m["site_up_sum"] != self.n:
                problems.append(
                    f"rtunnel_site_up: {m['site_up_series']} series summing to {m['site_up_sum']:.0f}, not {self.n}"
                )
        for key in ("sites", "history"):
            j = ph.get(key)
            if j is not None and (j["sites"] != self.n or j["connected"] != self.n):
                problems.append(
                    f"{scrapes[key]['url']}: {j['connected']} of {j['sites']} sites connected, not {self.n}"
                )
        if ph.get("history") is not None and ph["history"]["with_throughput"] != self.n:
            problems.append(f"?history=1: {ph['history']['with_throughput']} of {self.n} sites with a throughput")
        for label, d in during.items():
            if d["scrape_error"] or d["errors"]:
                problems.append(
                    f"echo during {scrapes[label]['url']}: {d['errors']} echo errors, scrape "
                    f"{d['scrape_error'] or 'ok'}" + (f" (first echo error: {d['first_error']})" if d["errors"] else "")
                )
        if problems and not steady:
            problems.append(f"(sites up after the scrapes: {up1} of {self.n}, {ph['new_sessions']} new sessions)")
        ph["problems"] = problems
        if problems:
            raise MeasureError("admin: " + "; ".join(problems))

    def echo_during_scrape(self, url: str, deadline: float) -> dict[str, Any]:
        """Sequential echoes through the forwards for as long as a scrape of ``url`` runs, over a few scrapes.

        The admin endpoint shares the server's reactor with the tunnels, so
        the longest echo is about the longest stretch a page held that
        reactor. A small fleet's scrape lasts a few echoes only, hence
        several scrapes (fleet_admin.ECHO_SCRAPES), one after the other.
        Bounded by each scrape's own timeout and ``deadline``.
        """
        s = self.server
        assert s is not None
        ports = [p for p, _ in s.forwards]
        msg = bytes(range(64))
        lat: list[float] = []
        errors: list[str] = []
        scrape_s: list[float] = []
        scrape_errors: list[str] = []
        i = 0
        for _ in range(fleet_admin.ECHO_SCRAPES):
            if time.monotonic() > deadline:
                scrape_errors.append("phase time limit reached")
                break
            scrape = fleet_admin.Background(url)
            stop = min(deadline, time.monotonic() + fleet_admin.TIMEOUT_S + 5)
            scrape.start()
            while scrape.running() and time.monotonic() < stop:
                try:
                    lat.append(1000 * echo_once(ports[i % len(ports)], msg))
                except (OSError, MeasureError) as e:
                    errors.append(f"connection {i}: {e}")
                i += 1
            scrape.join(max(0.0, stop - time.monotonic()))
            if scrape.running():
                scrape_errors.append("still running at the time limit")
                break  # its thread is a daemon with a socket timeout: it ends on its own
            if scrape.error is not None:
                scrape_errors.append(scrape.error)
            elif scrape.seconds is not None:
                scrape_s.append(scrape.seconds)
        return {
            "scrapes": len(scrape_s),
            "scrape_median_s": statistics.median(scrape_s) if scrape_s else None,
            "scrape_error": scrape_errors[0] if scrape_errors else None,
            "count": len(lat),
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "p50_ms": pct(lat, 50) if lat else None,
            "max_ms": max(lat) if lat else None,
        }


# ------------------------------------------------------------------ report
def machine_info(args: argparse.Namespace) -> dict[str, str]:
    info: dict[str, str] = {}
    cpu = "?"
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    info["CPU"] = f"{cpu}, {os.cpu_count()} cores"
    try:
        mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        info["memory"] = f"{int(mem.split()[1]) / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration):
        pass
    info["kernel / Python"] = f"Linux {platform.release()} / {platform.python_version()}"
    try:
        import OpenSSL
        from OpenSSL import SSL

        import twisted

        info["Twisted / pyOpenSSL / OpenSSL"] = (
            f"{twisted.__version__} / {OpenSSL.__version__} / {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}"
        )
    except ImportError:
        pass
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "rtunnel", "twisted"], capture_output=True, text=True
    ).stdout.split("\n")
    dirty = [ln[3:] for ln in dirty if ln.strip()]
    info["rtunnel"] = f"commit {head.stdout.strip() or '?'}" + (
        f", with uncommitted changes in {', '.join(dirty)}" if dirty else ""
    )
    info["network"] = (
        "own network namespace (loopback only; listen counters and ports are the benchmark's alone)"
        if os.environ.get(NETNS_ENV)
        else "host network namespace (listen counters are system-wide: other programs' drops count too)"
    )
    info["sysctls"] = (
        f"somaxconn {sysctl('net.core.somaxconn')}, tcp_max_syn_backlog "
        f"{sysctl('net.ipv4.tcp_max_syn_backlog')}, tcp_syncookies {sysctl('net.ipv4.tcp_syncookies')}"
    )
    info["open files limit"] = " / ".join(str(x) for x in resource.getrlimit(resource.RLIMIT_NOFILE)) + " (soft / hard)"
    return info


def f1(x: float | None, unit: str = "", digits: int = 1) -> str:
    if x is None:
        return "–"
    return f"{x:,.{digits}f}{unit}"


def exit_text(rc: int | None) -> str:
    if rc is not None and rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exit status {rc}"


def drops_text(listen: dict[str, int] | None) -> str:
    if listen is None:
        return "not measured"
    return f"{listen.get('ListenDrops', 0):,} / {listen.get('ListenOverflows', 0):,}"


def timeline_rows(timeline: list[list[float]], label: str) -> list[str]:
    """A compact table: sites up at each step, and the CPU each side used in the step before it."""
    if len(timeline) < 2:
        return []
    end = timeline[-1][0]
    width = 5.0 if end <= 60 else 10.0
    marks: list[float] = []
    t = width
    while t < end:
        marks.append(t)
        t += width
    marks.append(end)

    def at(t: float) -> list[float]:
        return min(timeline, key=lambda row: abs(row[0] - t))

    first = timeline[0][0]

    head = [label] + [f"{m:.0f}" if m != end else f"{m:.1f} (all)" for m in marks]
    up = ["sites up"]
    srv = ["server CPU, % of a core"]
    drv = ["drivers' CPU, % of a core"]
    prev = timeline[0]
    for m in marks:
        if m < first:  # not polled yet: the server was not listening again
            for r in (up, srv, drv):
                r.append("–")
            continue
        row = timeline[-1] if m == end else at(m)
        span = max(row[0] - prev[0], 1e-6)
        up.append(f"{int(row[1]):,}")
        srv.append(f"{100 * (row[2] - prev[2]) / span:.0f}")
        drv.append(f"{100 * (row[3] - prev[3]) / span:.0f}")
        prev = row
    return (
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        + ["| " + " | ".join(r) + " |" for r in (up, srv, drv)]
        + [""]
    )


def admin_lines(a: dict[str, Any]) -> list[str]:
    """The admin phase in the Phases section: what each page cost and what it said."""
    parts = []
    for label, path, _ in fleet_admin.PAGES:
        sc = a["scrapes"].get(label)
        if not sc or not sc["count"]:
            parts.append(f"`{path}` no answer ({sc and sc['first_error']})")
            continue
        idle = f" (~{1000 * sc['idle_cpu_s'] / sc['count']:.1f} ms of it the idle rate)" if "idle_cpu_s" in sc else ""
        took = (
            f"{f1(1000 * sc['median_s'], ' ms', 1)} (median of {sc['count']}; max {f1(1000 * sc['max_s'], ' ms', 1)})"
            if sc["count"] > 1
            else f1(1000 * sc["max_s"], " ms", 1)
        )
        parts.append(
            f"`{path}` {sc['bytes']:,} bytes in {took}, server CPU "
            f"{f1(1000 * sc['server_cpu_s_per_scrape'], ' ms', 1)} per scrape{idle}"
            + (f", {sc['errors']} failed (first: {sc['first_error']})" if sc["errors"] else "")
        )
    line = f"- Admin endpoint ({a['url']}, after the echo phase): " + "; ".join(parts) + "."
    m = a.get("metrics")
    if m:
        line += (
            f" The `/metrics` body holds {m['samples']:,} samples in {m['families']} families; "
            f"`rtunnel_sites_connected` {m['sites_connected']:,.0f}, `rtunnel_site_up` {m['site_up_series']:,} "
            f"series summing to {m['site_up_sum']:,.0f}, RTT measured for {m['site_rtt_series']:,} sites"
        )
        j = a.get("sites")
        if j:
            line += f"; `/api/v1/sites` lists {j['sites']:,} sites, {j['connected']:,} connected"
        line += f" (N = {a['n']:,})."
    for label, d in a.get("during", {}).items():
        path = dict((lb, p) for lb, p, _ in fleet_admin.PAGES)[label]
        median = None if d["scrape_median_s"] is None else 1000 * d["scrape_median_s"]
        line += (
            f" During {d['scrapes']} more `{path}` scrapes (median {f1(median, ' ms', 0)}): "
            f"{d['count']} sequential echoes, p50 {f1(d['p50_ms'], ' ms', 2)}, max {f1(d['max_ms'], ' ms', 1)}"
            + (f", {d['errors']} errors" if d["errors"] else "")
            + (f", scrape {d['scrape_error']}" if d["scrape_error"] else "")
            + "."
        )
    line += (
        f" Server CPU over the phase {a['server_cpu_s']:.2f} s in {a['wall_s']:.1f} s; RSS after it "
        f"{a['rss_kib'] / 1024:.1f} MiB, {a['server_threads']} threads; {a['new_sessions']} sessions (re)made "
        "meanwhile."
    )
    return (
        [line]
        + event_lines(a.get("site_events"), "logged by the sites")
        + (event_lines(a.get("server_events"), "logged by the server") if "server_events" in a else [])
    )


def event_lines(events: dict[str, int] | None, who: str, top: int = 6) -> list[str]:
    if not events:
        return [f"  - {who}: no warnings or errors"]
    out = [f"  - {who}: " + ", ".join(f"{n:,} × `{k[:150]}`" for k, n in list(events.items())[:top])]
    if len(events) > top:
        out[-1] += f" (and {len(events) - top} more kinds)"
    return out


def report(
    results: list[dict[str, Any]],
    failures: dict[int, str],
    info: dict[str, str],
    mode: str,
    plan: dict[str, Any],
    args: argparse.Namespace,
    elapsed: float,
) -> str:
    out = [f"# rtunnel fleet benchmark ({mode} run, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')})", ""]
    out += [f"- **{k}**: {v}" for k, v in info.items()]
    backlog = (
        f"`backlog={args.backlog}` in `--listen`"
        if args.backlog
        else "as the server sets it (no `backlog=` in `--listen`)"
    )
    out += [
        f"- **settings**: {args.drivers} driver processes (epoll reactor, sites split evenly); "
        f"{args.forwards} forwards to {args.forwards} sites; default keepalive ({KEEPALIVE_S:.0f} s); "
        f"settle {plan['settle_s']:.0f} s, idle window {plan['idle_s']:.0f} s; "
        f"tunnel listener backlog {backlog}"
        + (f"; extra server options `{' '.join(args.server_arg)}`" if args.server_arg else "")
        + (f"; drivers at nice {args.nice}" if args.nice else "")
        + f"; run took {elapsed / 60:.1f} min",
        "",
    ]
    by_n = {r["n"]: r for r in results}
    ns = sorted(by_n)

    def ph(n: int, name: str) -> dict[str, Any]:
        phase: dict[str, Any] = by_n[n]["phases"].get(name, {})
        return phase

    def cell(n: int, get: Callable[[int], tuple[str, float | None]]) -> tuple[str, float | None]:
        try:
            return get(n)
        except (KeyError, TypeError):
            return "–", None

    def v(x: float | None, unit: str = "", digits: int = 1) -> tuple[str, float | None]:
        return f1(x, unit, digits), x

    metrics = [
        (
            "server RSS per idle site, steady state (after the kill -9 restart)",
            "≤ 48 KiB",
            "kib_site",
            lambda n: v(ph(n, "idle_steady")["kib_per_site"], " KiB"),
        ),
        (
            "server RSS per idle site, after enrollment (same process)",
            "≤ 48 KiB",
            "kib_site",
            lambda n: v(ph(n, "idle_after_enroll")["kib_per_site"], " KiB"),
        ),
        (
            "server CPU at idle, steady state",
            "≤ 10 % of a core",
            "cpu_idle_pct",
            lambda n: v(ph(n, "idle_steady")["server_cpu_pct"], " %", 2),
        ),
        (
            "server CPU at idle, after enrollment",
            "≤ 10 % of a core",
            "cpu_idle_pct",
            lambda n: v(ph(n, "idle_after_enroll")["server_cpu_pct"], " %", 2),
        ),
        (
            "all sites back after kill -9 + restart (from the kill)",
            "≤ 30 s",
            "back_s",
            lambda n: v(ph(n, "kill9")["all_back_s"], " s", 2),
        ),
        (
            "listen drops / overflows during kill -9 + restart",
            "0",
            "drops",
            lambda n: (drops_text(ph(n, "kill9")["listen"]), (ph(n, "kill9")["listen"] or {}).get("ListenDrops")),
        ),
        (
            "all sites back after SIGTERM + restart (from the signal)",
            "≤ 30 s",
            "back_s",
            lambda n: v(ph(n, "sigterm")["all_back_s"], " s", 2),
        ),
        (
            "listen drops / overflows during SIGTERM + restart",
            "0",
            "drops",
            lambda n: (drops_text(ph(n, "sigterm")["listen"]), (ph(n, "sigterm")["listen"] or {}).get("ListenDrops")),
        ),
        (
            "connect + 64 B echo + close through a forward, p50",
            "–",
            None,
            lambda n: v(ph(n, "echo")["p50_ms"], " ms", 2),
        ),
        (
            "connect + 64 B echo + close through a forward, p99",
            "≤ 5 ms",
            "echo_p99_ms",
            lambda n: v(ph(n, "echo")["p99_ms"], " ms", 2),
        ),
        ("enrollments per second (all N at once)", "–", None, lambda n: v(ph(n, "enroll")["enroll_per_s"], "/s", 0)),
        (
            "listen drops / overflows during enrollment",
            "–",
            None,
            lambda n: (drops_text(ph(n, "enroll")["listen"]), None),
        ),
    ]
    head = ["metric", "target (N = 10,000)"] + [f"N = {n:,}" for n in ns] + ["met at N = 10,000?"]
    out += ["## Against the targets", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, target_text, key, get in metrics:
        cells = [cell(n, get) for n in ns]
        verdict = "–"
        if key is not None and 10000 in by_n:
            val = cell(10000, get)[1]
            if val is not None:
                verdict = "yes" if val <= TARGETS[key] else "**no**"
        elif key is not None:
            verdict = "not run at 10,000"
        out.append("| " + " | ".join([label, target_text] + [c[0] for c in cells] + [verdict]) + " |")
    out.append("")

    admin = {n: ph(n, "admin") for n in ns}
    if any(a and "scrapes" in a for a in admin.values()):
        out += [
            "## Admin endpoint (issue 12)",
            "",
            "Scrapes from the benchmark's process after the echo phase, every site connected; the target was set "
            "for N = 1,000.",
            "",
        ]
        out += fleet_admin.report_rows(admin, ns)

    out += ["## Phases", ""]
    for n in ns:
        r = by_n[n]
        out += [f"### N = {n:,}", ""]
        out.append(
            f"- Server with 0 sites: RSS {r['rss0_kib'] / 1024:.1f} MiB, CPU {r['cpu0_pct']:.2f} % of a core; "
            f"accept backlog of the tunnel listener {r.get('tunnel_backlog')} (forwards "
            f"{r.get('forward_backlog')}), read with `ss -ltn`."
        )
        out.append(
            f"- {n:,} tokens + keyfiles in-process (the library calls of `rtunnel keyfile create`): "
            f"{r['keyfiles_s']:.1f} s ({n / r['keyfiles_s']:,.0f}/s)."
        )
        e = ph(n, "enroll")
        if e:
            es, us = e["enrolled_spread"], e["up_spread"]
            out.append(
                f"- Enrollment, all {n:,} sites started at once: all enrolled after {e['all_enrolled_s']:.1f} s "
                f"({e['enroll_per_s']:,.0f}/s; per site p50 {es['p50']:.1f} s, p90 {es['p90']:.1f} s), all "
                f"connected with mutual TLS after {e['all_up_s']:.1f} s (p50 {us['p50']:.1f} s); server CPU "
                f"{e['server_cpu_s']:.1f} s ({e['server_ms_per_site']:.2f} ms per site, enrollment + first "
                f"session), drivers {e['drivers_cpu_s']:.1f} s; listen drops / overflows "
                f"{drops_text(e['listen'])}."
            )
            out += event_lines(e.get("site_events"), "logged by the sites")
            out += event_lines(e.get("server_events"), "logged by the server")
            out += [""] + timeline_rows(e.get("timeline", []), "s after start")
        for name, label in (("idle_after_enroll", "Idle after enrollment"), ("idle_steady", "Idle, steady state")):
            i = ph(n, name)
            if i:
                out.append(
                    f"- {label} (after {i['settle_s']:.0f} s settling, {i['window_s']:.0f}-s window): server "
                    f"CPU {i['server_cpu_pct']:.2f} % of a core, drivers {i['drivers_cpu_pct']:.1f} %; server "
                    f"RSS {i['rss_kib'] / 1024:.1f} MiB ({i['rss_kib_start'] / 1024:.1f} at the window's start) "
                    f"= {i['kib_per_site']:.1f} KiB per site over the 0-site RSS; {i['server_fds']:,} fds open "
                    f"in the server; {i['new_sessions']} sessions (re)made during settle + window; drivers' RSS "
                    f"{i['drivers_rss_kib'] / 1024:.0f} MiB together."
                    + (
                        f" The server's reactor slept (voluntary context switches) "
                        f"{i['per_s'].get('wakeups', 0):,.0f} times per second."
                        if i.get("per_s")
                        else ""
                    )
                )
        for name, label in (("sigterm", "SIGTERM"), ("kill9", "kill -9")):
            p = ph(n, name)
            if p:
                b = p["back_spread"]
                out.append(
                    f"- {label}: server gone after {p['exit_s']:.2f} s ({exit_text(p['exit_status'])}), "
                    f"listening again {p['listening_s']:.2f} s after the signal ({p['restart_to_listen_s']:.2f} "
                    f"s of start-up); all {n:,} sites back {p['all_back_s']:.2f} s after the signal, "
                    f"{p['all_back_after_listen_s']:.2f} s after listening (per site p50 {b['p50']:.2f} s, p90 "
                    f"{b['p90']:.2f} s, p99 {b['p99']:.2f} s); the new server's CPU until then "
                    f"{p['server_cpu_s']:.1f} s ({1000 * p['server_cpu_s'] / n:.2f} ms per site incl. start-up); "
                    f"listen drops / overflows {drops_text(p['listen'])}."
                )
                out += event_lines(p.get("site_events"), "logged by the sites")
                out += event_lines(p.get("server_events"), "logged by the server")
                out += [""] + timeline_rows(p.get("timeline", []), f"s after {label}")
        c = ph(n, "echo")
        if c:
            out.append(
                f"- Echo: {c['count']:,} sequential connect + 64 B echo + close (Python client, TCP_NODELAY) "
                f"round-robin over {c['forwards']} forwards to {c['forwards']} sites, {c['per_s']:,.0f}/s: p50 "
                f"{f1(c['p50_ms'], ' ms', 2)}, p99 {f1(c['p99_ms'], ' ms', 2)}, max {f1(c['max_ms'], ' ms', 1)}; "
                f"server CPU {c['server_cpu_ms_per_conn']:.2f} ms per connection; {c['errors']} errors"
                + (f" (first: {c['first_error']})" if c["first_error"] else "")
                + "."
            )
        a = ph(n, "admin")
        if a.get("skipped"):
            out.append(f"- Admin endpoint: not scraped ({a['skipped']}).")
        elif a:
            out += admin_lines(a)
        out.append("")
    if failures:
        out += ["## Failures", ""]
        out += [f"- N = {n:,}: {why}" for n, why in failures.items()]
        out.append("")
    out += [
        "## Notes",
        "",
        "- RSS is `VmRSS` of the server process; per site = (RSS with N idle sites − RSS of a fresh server with "
        '0 sites) / N. "Steady state" is the server started after the kill -9, which only ever saw mutual-TLS '
        'reconnects; "after enrollment" is the first server process, which also did the N enrollments.',
        "- CPU is `utime + stime` from `/proc/PID/stat` over the window, in % of one core; the drivers share the "
        "same 2 cores and are reported for context only.",
        '- "Back" means: the site\'s `TunnelClientService` has a session whose HELLO arrived without a refusal, begun '
        "after the signal (driver-side, `time.monotonic()`); times are from the signal to the last site's.",
        "- Listen drops / overflows: `nstat` TcpExtListenDrops / TcpExtListenOverflows, difference over the phase.",
        "- Admin endpoint: the server runs with `--admin tcp:PORT:interface=127.0.0.1` on a free port. After the "
        f"echo phase, {fleet_admin.SCRAPES} sequential GETs each of `/metrics` and `/api/v1/sites` and one of "
        "`/api/v1/sites?history=1` (urllib, a new connection each, no gzip; wall time from the request to the "
        "body's last byte); server CPU per scrape is the server's `utime + stime` over the series divided by the "
        f"scrapes, idle work included, read in clock ticks ({1000 // procstats.CLK_TCK} ms: coarse for one fast "
        "scrape). The `/metrics` body is parsed with `prometheus_client.parser`: "
        "`rtunnel_sites_connected` and the `rtunnel_site_up` series must count N, as must the connected sites of "
        f"both JSON pages (the drivers saw all N up). Then {fleet_admin.ECHO_SCRAPES} more scrapes each of "
        "`/metrics` and of `?history=1`, one at a time, with sequential echoes through the forwards for as long "
        "as each runs: the admin pages share the reactor with the tunnels, and the longest echo is about the "
        "longest stretch a page held it.",
    ]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ main
def in_own_netns(argv: list[str], mode: str) -> int | None:
    """Re-run this script in a new network namespace (as root); None if not done here."""
    if os.environ.get(NETNS_ENV) or mode == "off":
        return None
    usable = (
        os.geteuid() == 0
        and shutil.which("unshare")
        and shutil.which("ip")
        and subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=30).returncode == 0
    )
    if not usable:
        if mode == "on":
            raise SystemExit("fleet: --netns on needs root, unshare and ip")
        log("no own network namespace (needs root, unshare, ip): listen counters are system-wide")
        return None
    env = dict(os.environ, **{NETNS_ENV: "1"})
    child = subprocess.Popen(["unshare", "--net", "--", sys.executable, str(Path(__file__).resolve()), *argv], env=env)
    # unshare execs the script: child.pid is the orchestrator, which ends what it started.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child.pid, signal.SIGTERM))
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:  # the child got the SIGINT too (same process group)
            continue


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        description="rtunnel fleet benchmark: one tunnel server, N sites",
        epilog="See docs/performance.md, section Fleet.",
    )
    ap.add_argument("--quick", action="store_true", help="N = 500, shorter windows (~1 min)")
    ap.add_argument("--sizes", help="comma list of N (default: full 1000,10000; quick 500)")
    ap.add_argument("--drivers", type=int, default=4, help="driver processes (default 4)")
    ap.add_argument("--forwards", type=int, default=4, help="forwards (each to its own site) for the echo test")
    ap.add_argument("--echo", type=int, help="sequential connections in the echo test (default: full 2000)")
    ap.add_argument("--settle", type=float, help="seconds between all sites up and the idle window")
    ap.add_argument("--idle", type=float, help="seconds of the idle CPU window")
    ap.add_argument("--backlog", type=int, help="set backlog=B in the server's --listen (default: not set)")
    ap.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra twistd rtunnel-server option, e.g. --server-arg=--max-preauth=20000 (repeatable)",
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the drivers at this nice level (sites of a real fleet do not share the server's CPU)",
    )
    ap.add_argument(
        "--netns",
        choices=("auto", "on", "off"),
        default="auto",
        help="run in an own network namespace (auto: when root)",
    )
    ap.add_argument("--keep", action="store_true", help="keep site state directories and keyfiles")
    ap.add_argument(
        "--probe",
        choices=("off", "objects", "tracemalloc"),
        default="off",
        help="start the server through bench/fleet_probe.py and dump what its memory is made of "
        "(objects by type, mallinfo; tracemalloc: also Python's allocations by line, at a cost)",
    )
    ap.add_argument(
        "--pyspy",
        action="store_true",
        help="sample the server (and driver 0 in the restarts) with py-spy in each phase "
        "(.venv/bin/pip install py-spy)",
    )
    ap.add_argument("--out", type=Path, help="write the Markdown report here")
    args = ap.parse_args(argv)

    rc = in_own_netns(argv, args.netns)
    if rc is not None:
        return rc if rc >= 0 else 128 - rc
    if os.environ.get(NETNS_ENV):
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)

    mode = "quick" if args.quick else "full"
    plan = dict(PLANS[mode])
    if args.sizes:
        plan["sizes"] = [int(x.replace("_", "")) for x in args.sizes.split(",") if x.strip()]
    for key, val in (("settle_s", args.settle), ("idle_s", args.idle)):
        if val is not None:
            plan[key] = val
    canonical = (
        mode == "full"
        and not args.sizes
        and args.settle is None
        and args.idle is None
        and args.echo is None
        and args.backlog is None
        and args.drivers == 4
        and args.forwards == 4
        and args.probe == "off"
        and not args.pyspy
        and not args.server_arg
        and not args.nice
    )
    if args.pyspy and fleet_profile.pyspy_binary() is None:
        ap.error("--pyspy needs py-spy: .venv/bin/pip install py-spy")
    if args.drivers < 1 or min(plan["sizes"]) < args.drivers:
        ap.error("need at least one site per driver")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the server and drivers
    need = max(plan["sizes"]) + 1000
    if hard < need:
        log(f"WARNING: open files hard limit {hard} < {need}: the server cannot hold every site")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: blocks
    WORK.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    load_before = os.getloadavg()[0]
    results: list[dict[str, Any]] = []
    failures: dict[int, str] = {}
    try:
        for n in plan["sizes"]:
            log(f"=== N = {n:,} sites, {args.drivers} drivers ===")
            t0 = time.monotonic()
            fleet = Fleet(n, args, plan)
            try:
                fleet.run()
            except MeasureError as e:
                failures[n] = str(e)
                log(f"N={n:,} FAILED: {e}")
            fleet.res["run_s"] = time.monotonic() - t0
            results.append(fleet.res)
            log(f"N={n:,} took {fleet.res['run_s'] / 60:.1f} min")
    finally:
        for p in reversed(_started):
            try:
                end_process(p, timeout=10)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
    info = machine_info(args)
    # Other sessions' jobs on these shared 2-core machines take CPU from the server and the drivers.
    info["load average (1 min)"] = (
        f"{load_before:.2f} before the run, {os.getloadavg()[0]:.2f} at its end (includes the benchmark)"
    )
    for r in results:
        info[f"run time at N = {r['n']:,}"] = f"{r['run_s'] / 60:.1f} min"
    label = mode if canonical or mode == "quick" else "custom"
    md = report([r for r in results if "rss0_kib" in r], failures, info, label, plan, args, time.monotonic() - t_start)
    out = args.out or (RESULTS_MD if canonical else REPO / "_bench" / f"fleet-results-{mode}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    raw = json.dumps(
        {"mode": mode, "plan": plan, "machine": info, "argv": argv, "results": results, "failures": failures}, indent=1
    )
    (WORK / "last-run.json").write_text(raw)
    (WORK / f"run-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json").write_text(raw)
    print()
    print(md)
    log(f"report written to {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\n[fleet] interrupted; all started processes ended", file=sys.stderr)
        sys.exit(130)
