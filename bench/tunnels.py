"""The tunnels the bench compares, one class each, behind one small interface.

Topology, the same for every tunnel::

    loadgen client ──▶ forward_port ══ tunnel ══▶ 127.0.0.1:site_port (loadgen serve)

* ``DirectTunnel``: no tunnel, ``forward_port == site_port``; the baseline and
  the proof that the load generator is not the bottleneck.
* ``SshTunnel``: OpenSSH ``ssh -R`` against a private ``sshd`` that the bench
  runs itself (own config, host key, authorized_keys, PidFile, port); the
  system's sshd and ~/.ssh are never touched.  With ``nodelay=True`` (column
  ``ssh-nodelay``) both run with ``bench/nodelay.c`` preloaded, which forces
  TCP_NODELAY on every TCP socket they connect or accept; the bench checks that
  it took effect and measures only what Nagle affects there (RTT, new connections).
* ``RtunnelTunnel``: ``twistd rtunnel-server`` + ``twistd rtunnel``, started
  exactly by the CLI contract (see the class); skipped with a reason while the
  plugins do not exist yet.
* ``RtunnelAdminOffTunnel`` / ``RtunnelAdminScrapedTunnel``: the same, bulk
  throughput and CPU only, with the server's admin endpoint off
  (``--admin none``) and on with ``/metrics`` fetched every second by a
  ``MetricsScraper`` thread (as a Prometheus server would): the cost of metrics.

``wan_delay_ms`` puts ``bench/relay.py`` (a delay line) on the tunnel's own TCP
connection: between ssh and sshd, between ``twistd rtunnel`` and the server's
listen port, and for direct TCP in front of the site service.

Every process is started here with ``start_new_session=True`` and recorded;
``stop()`` ends exactly those PIDs (TERM, then KILL after a bounded wait), and
``stop_all_started()`` is the last-resort cleanup run.py calls in ``finally``.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import procstats

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
SITE_NAME = "bench"
SSHD = "/usr/sbin/sshd"
#: LD_PRELOAD shim built from bench/nodelay.c by run.py (into _bench/, like loadgen)
NODELAY_SO = REPO / "_bench" / "nodelay.so"
SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (unified syscall table, Linux 5.6+)

_started: list[subprocess.Popen] = []  # every process this module started, for cleanup


class TunnelUnavailable(Exception):
    """The tunnel cannot run here (not installed / not built yet); the bench skips it."""


# ---------------------------------------------------------------- helpers
def free_port() -> int:
    """A currently free loopback port (tiny race with other programs; acceptable here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll until 127.0.0.1:port accepts a TCP connection (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not accepting after {timeout:.0f} s")


def echo_once(port: int, timeout: float = 5.0) -> bool:
    """One end-to-end echo through ``port`` using loadgen's ECHO header."""
    msg = bytes(range(64))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"ECHO" + bytes(12) + msg)
            got = b""
            while len(got) < 64:
                chunk = s.recv(64 - len(got))
                if not chunk:
                    return False
                got += chunk
            return got == msg
    except OSError:
        return False


def wait_echo(port: int, timeout: float, procs: list[subprocess.Popen]) -> None:
    """Readiness: the forward port accepts AND an echo comes back through the tunnel."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"process {p.pid} ({p.args[0]}) exited with {p.returncode}")
        if echo_once(port, timeout=max(0.5, min(5.0, deadline - time.monotonic()))):
            return
        time.sleep(0.1)
    raise RuntimeError(f"no echo through port {port} after {timeout:.0f} s")


def spawn(
    argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None, stdout=None
) -> subprocess.Popen:
    """Start a process in its own session, stderr (and stdout unless given) to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as lf:
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else lf,
            stderr=lf,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    _started.append(p)
    return p


def end_process(p: subprocess.Popen, timeout: float = 5.0) -> None:
    """End one process we started, by its PID: SIGTERM, then SIGKILL after ``timeout``."""
    if p.poll() is not None:
        return
    try:
        os.kill(p.pid, signal.SIGTERM)
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(5)
    except ProcessLookupError:
        pass


def end_pid(pid: int, expect: str, timeout: float = 5.0) -> None:
    """End a descendant PID (not our direct child) if it still runs ``expect``."""
    deadline = time.monotonic() + timeout
    sig = signal.SIGTERM
    while expect in procstats.cmdline(pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            if sig == signal.SIGKILL:
                return
            sig, deadline = signal.SIGKILL, time.monotonic() + 2
        time.sleep(0.05)


def stop_all_started() -> None:
    for p in reversed(_started):
        try:
            end_process(p, timeout=3)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def read_ready_line(p: subprocess.Popen, what: str, timeout: float = 15.0) -> dict:
    """The JSON line a helper (loadgen serve, relay) prints once listening; bounded wait."""
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    line = p.stdout.readline() if ready else b""
    if not line:
        end_process(p)
        raise RuntimeError(f"{what} did not report ready within {timeout:.0f} s")
    return json.loads(line)


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Relay:
    """bench/relay.py as a child process: loopback delay line in front of ``target_port``."""

    def __init__(self, target_port: int, delay_ms: float, workdir: Path) -> None:
        log = workdir / "relay.log"
        self.proc = spawn(
            [
                sys.executable,
                str(REPO / "bench" / "relay.py"),
                "--listen",
                "127.0.0.1:0",
                "--target",
                f"127.0.0.1:{target_port}",
                "--delay-ms",
                str(delay_ms),
                "--timeout",
                "1800",
            ],
            log,
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        self.port = int(read_ready_line(self.proc, f"relay (log: {log})")["port"])

    def stop(self) -> None:
        end_process(self.proc)


def _with_preload(env: dict[str, str], so: Path) -> dict[str, str]:
    old = env.get("LD_PRELOAD", "")
    return dict(env, LD_PRELOAD=f"{so} {old}".strip())


# Run under LD_PRELOAD=nodelay.so: a blocking connect, a non-blocking one (EINPROGRESS) and an
# accept, each socket's TCP_NODELAY read back (0 without the shim: Linux's default).
_NODELAY_PROBE = """
import errno, socket
opt = lambda s: s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(2)
c = socket.create_connection(ls.getsockname()); a, _ = ls.accept()
n = socket.socket(); n.setblocking(False)
e = n.connect_ex(ls.getsockname())
assert e in (0, errno.EINPROGRESS), e
print(opt(c), opt(a), opt(n))
"""


def probe_nodelay_shim(so: Path) -> None:
    """Raise TunnelUnavailable unless a test program under ``LD_PRELOAD=so`` gets TCP_NODELAY=1."""
    r = subprocess.run(
        [sys.executable, "-c", _NODELAY_PROBE],
        capture_output=True,
        text=True,
        timeout=30,
        env=_with_preload(dict(os.environ), so),
    )
    if r.returncode != 0 or r.stdout.split() != ["1", "1", "1"]:
        raise TunnelUnavailable(
            f"TCP_NODELAY shim {so} not effective in a test program (connect, non-blocking "
            f"connect, accept read back {r.stdout.strip() or '-'}; rc {r.returncode}; "
            f"{r.stderr.strip()[-300:]})"
        )


def maps_library(pid: int, name: str) -> bool:
    """Whether ``name`` is mapped into process ``pid`` (i.e. the preloaded library is loaded)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(line.rstrip().endswith(name) for line in f)
    except OSError:
        return False


def tcp_nodelay_of(pid: int) -> dict[int, int]:
    """socket inode -> TCP_NODELAY of each connected TCP socket of ``pid`` (one of our descendants).

    Reads the real sockets: each fd is duplicated into this process with
    pidfd_getfd(2) and asked with getsockopt; the duplicate is closed again
    (the target's socket is not affected).  OSError if the kernel refuses.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    out: dict[int, int] = {}
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if not link.startswith("socket:["):
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"pidfd_getfd({pid}, {name}): {os.strerror(err)}")
            with socket.socket(fileno=fd) as s:
                if (
                    s.family in (socket.AF_INET, socket.AF_INET6)
                    and s.type == socket.SOCK_STREAM
                    and not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                ):
                    out[int(link[8:-1])] = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        os.close(pidfd)
    return out


#: Back-to-back scrapes timed on the server's CPU clock at each start of the
#: scraped column (about a second of scraping; the clock ticks every 10 ms).
SCRAPE_CPU_SAMPLE = 200


class MetricsScraper:
    """``GET /metrics`` on an admin endpoint once every ``interval`` seconds, from a thread.

    What a Prometheus server does to a scraped rtunnel-server: one keep-alive
    HTTP/1.1 connection (http.client: no proxy from the environment), a new one
    after an error.  The loop is bounded (``max_seconds``) and ends with ``stop()``.
    Its own CPU is the bench process's, not the tunnel's: only the server's work
    to answer is counted.  A scrape counts as ok on HTTP 200 with a body in the
    Prometheus text format (a ``# TYPE`` line).
    """

    def __init__(self, port: int, interval: float = 1.0, max_seconds: float = 3600.0) -> None:
        self.port = port
        self.interval = interval
        self.max_seconds = max_seconds
        self.ok = 0
        self.failed = 0
        self.first_error = ""
        self.last_bytes = 0
        self.times_ms: list[float] = []
        self._conn: http.client.HTTPConnection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scrape_once(self) -> None:
        """One scrape; RuntimeError saying what was wrong if it failed."""
        t0 = time.perf_counter()
        try:
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self._conn.request("GET", "/metrics")
            r = self._conn.getresponse()
            body = r.read()
        except (OSError, http.client.HTTPException) as e:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            raise RuntimeError(f"GET http://127.0.0.1:{self.port}/metrics: {e!r}") from e
        if r.status != 200 or b"# TYPE " not in body:
            raise RuntimeError(
                f"GET http://127.0.0.1:{self.port}/metrics: HTTP {r.status}, {len(body)} bytes, "
                f"{'Prometheus text' if b'# TYPE ' in body else 'not Prometheus text'}: {body[:120]!r}"
            )
        self.times_ms.append((time.perf_counter() - t0) * 1000)
        self.last_bytes = len(body)

    def _loop(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.wait(self.interval) and time.monotonic() < deadline:
            try:
                self.scrape_once()
                self.ok += 1
            except RuntimeError as e:
                self.failed += 1
                self.first_error = self.first_error or str(e)[:300]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"scrape-{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        if self._conn is not None:
            self._conn.close()
            self._conn = None


_admin_support: dict[str, bool] = {}


def server_has_admin(twistd: str, env: dict[str, str]) -> bool:
    """Whether ``twistd rtunnel-server`` has the ``--admin`` option (issue 12), asked once per twistd."""
    if twistd not in _admin_support:
        r = subprocess.run(
            [twistd, "rtunnel-server", "--help"], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
        )
        _admin_support[twistd] = "--admin" in r.stdout
    return _admin_support[twistd]


# ---------------------------------------------------------------- tunnels
class Tunnel:
    """Interface: ``start(site_port)``, ``stop()``, ``pids()``, ``forward_port``."""

    key = "?"  # column id
    label = "?"  # column title
    family = "?"  # direct | ssh | rtunnel
    #: flow-control window per stream in bytes (bounds WAN throughput at window/RTT), if known
    window_bytes: int | None = None
    window_source = ""
    #: measure only the 64 B echo RTT and new connections (no bulk, idle RSS, CPU or WAN)
    latency_only = False
    #: measure only bulk throughput, CPU per GB and idle RSS (no RTT, new connections, held streams or WAN)
    bulk_only = False
    #: columns of one group move the same calibrated transfer sizes (an A/B pair); "": the column's own
    calibration_group = ""

    def __init__(self, workdir: Path, wan_delay_ms: float = 0.0) -> None:
        self.workdir = workdir.resolve()  # sshd wants absolute paths in its config
        self.wan_delay_ms = wan_delay_ms
        self.forward_port = 0
        #: extra loadgen options for the RTT and connection runs (``socks``: through a SOCKS5 front door)
        self.loadgen_opts: dict[str, str] = {}
        self.relay: Relay | None = None
        self.info: dict[str, str] = {}

    def check_available(self) -> None:
        """Raise TunnelUnavailable with a reason when this tunnel cannot run here."""

    def start(self, site_port: int) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.stop()
            self.relay = None

    def pids(self) -> list[int]:
        """The tunnel's own processes now (for RSS and CPU); not the loadgen or the relay."""
        return []

    def _fresh_workdir(self) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        os.chmod(self.workdir, 0o700)


class DirectTunnel(Tunnel):
    key, label, family = "direct", "direct TCP", "direct"

    def start(self, site_port: int) -> None:
        self._fresh_workdir()
        if self.wan_delay_ms:
            self.relay = Relay(site_port, self.wan_delay_ms, self.workdir)
            self.forward_port = self.relay.port
        else:
            self.forward_port = site_port
        wait_echo(self.forward_port, 10, [])


def ensure_openssh() -> str:
    """Install openssh-server/-client from Debian if missing; return ``ssh -V``.

    ``apt-get update`` only runs when the first install attempt fails.
    Debian images carry /usr/sbin/policy-rc.d (exit 101), so installing does
    not start the system sshd; the bench never starts, stops or configures it.
    """
    need = [b for b in (SSHD, "/usr/bin/ssh", "/usr/bin/ssh-keygen") if not os.path.exists(b)]
    if need:
        if os.geteuid() != 0:
            raise TunnelUnavailable(f"missing {need} and not root to apt-get install openssh")
        print(f"[bench] installing openssh-server openssh-client (missing {', '.join(need)})", flush=True)
        if not os.path.exists("/usr/sbin/policy-rc.d"):
            print("[bench] note: no policy-rc.d: the package may start the system sshd", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "openssh-server", "openssh-client"]
        if subprocess.run(cmd, env=env, timeout=300).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, timeout=300, check=True)
            subprocess.run(cmd, env=env, timeout=300, check=True)
    r = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10)
    return (r.stderr or r.stdout).strip()


class SshTunnel(Tunnel):
    """``ssh -R FWD:127.0.0.1:SITE`` against a private sshd on 127.0.0.1.

    PIDs measured: the ssh client plus every descendant of the listening sshd
    (per SSH connection it forks a privileged monitor and a session process;
    the listener itself only waits for new connections and is left out).
    Left as users run it: ``-N`` keeps Nagle on the SSH connection (each new
    stream waits on a 40 ms delayed ACK: measured on this machine, ~25-28
    sequential new connections a second, ~2,600 with TCP_NODELAY forced).

    ``nodelay=True``: the same aes128-gcm setup with ``LD_PRELOAD=_bench/nodelay.so``
    in the environment of sshd (inherited by its re-exec and per-connection
    children) and of ssh, so every TCP socket either connects or accepts gets
    TCP_NODELAY.  ``check_available`` runs a test program under the shim;
    ``start`` then checks the running tunnel (see ``_verify_nodelay``).
    """

    family = "ssh"
    # OpenSSH channels.h: CHAN_TCP_WINDOW_DEFAULT = 64 * CHAN_TCP_PACKET_DEFAULT (32 KiB)
    window_bytes = 2 * 1024 * 1024
    window_source = "OpenSSH CHAN_TCP_WINDOW_DEFAULT"
    HOST_ALIAS = "rtunnel-bench-sshd"

    def __init__(self, workdir: Path, cipher: str | None, wan_delay_ms: float = 0.0, nodelay: bool = False) -> None:
        super().__init__(workdir, wan_delay_ms)
        self.cipher = cipher
        self.nodelay = nodelay
        self.latency_only = nodelay  # Nagle only affects small messages and new connections
        short = (cipher or "chacha20-poly1305@openssh.com").split("@")[0]
        self.key = "ssh-" + ("aes128-gcm" if cipher and "aes128-gcm" in cipher else short.split("-")[0])
        self.label = f"ssh -R {short}" + ("" if cipher else " (default)")
        if nodelay:
            self.key, self.label = "ssh-nodelay", f"ssh -R {short} + TCP_NODELAY"
        self.env = _with_preload(dict(os.environ), NODELAY_SO) if nodelay else None
        self.sshd: subprocess.Popen | None = None
        self.client: subprocess.Popen | None = None
        self._seen: set[int] = set()

    def check_available(self) -> None:
        self.info["openssh"] = ensure_openssh()
        if self.nodelay:
            if not NODELAY_SO.exists():
                raise TunnelUnavailable(f"{NODELAY_SO} not built (gcc bench/nodelay.c)")
            probe_nodelay_shim(NODELAY_SO)

    def _client_argv(self, port: int, extra: list[str]) -> list[str]:
        d = self.workdir
        argv = [
            "ssh",
            "-F",
            "/dev/null",
            "-o",
            f"UserKnownHostsFile={d / 'known_hosts'}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"HostKeyAlias={self.HOST_ALIAS}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "ConnectTimeout=10",
            "-i",
            str(d / "id_ed25519"),
            "-p",
            str(port),
        ]
        if self.cipher:
            argv += ["-c", self.cipher]
        return argv + extra

    def start(self, site_port: int) -> None:
        self._fresh_workdir()
        d = self.workdir
        for name in ("host_ed25519", "id_ed25519"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rtunnel-bench", "-f", str(d / name)],
                check=True,
                timeout=30,
            )
        (d / "authorized_keys").write_text((d / "id_ed25519.pub").read_text())
        host_pub = (d / "host_ed25519.pub").read_text().split()
        (d / "known_hosts").write_text(f"{self.HOST_ALIAS} {host_pub[0]} {host_pub[1]}\n")
        sshd_port = free_port()
        user = os.environ.get("USER") or "root"
        if os.geteuid() == 0:
            user = "root"
        (d / "sshd_config").write_text(
            f"Port {sshd_port}\nListenAddress 127.0.0.1\n"
            f"HostKey {d / 'host_ed25519'}\nPidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
            "StrictModes no\nUsePAM no\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "AllowTcpForwarding remote\nGatewayPorts no\nX11Forwarding no\nPrintMotd no\n"
            "PermitTTY no\nClientAliveInterval 0\nLogLevel INFO\n"
        )
        # sshd's privilege separation needs its empty chroot dir (normally made by the service unit).
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        t = subprocess.run([SSHD, "-t", "-f", str(d / "sshd_config")], capture_output=True, text=True, timeout=10)
        if t.returncode != 0:
            raise RuntimeError(f"sshd -t: {t.stderr.strip()}")
        self.sshd = spawn([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], d / "sshd.log", env=self.env)
        wait_port(sshd_port, 10, self.sshd)
        port = sshd_port
        if self.wan_delay_ms:
            self.relay = Relay(sshd_port, self.wan_delay_ms, d)
            port = self.relay.port
        # Which cipher these options really negotiate: one short verbose login (not the tunnel, whose
        # -v logging would cost CPU on every forwarded connection).
        probe = subprocess.run(
            self._client_argv(port, ["-v", f"{user}@127.0.0.1", "true"]),
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        ciphers = [
            ln.split("cipher:")[1].split()[0] for ln in probe.stderr.splitlines() if "kex: server->client cipher:" in ln
        ]
        if probe.returncode != 0 or not ciphers:
            raise RuntimeError(f"ssh login probe failed (rc {probe.returncode}): {probe.stderr.strip()[-800:]}")
        self.info["negotiated_cipher"] = ciphers[0]
        self.forward_port = free_port()
        self.client = spawn(
            self._client_argv(port, ["-N", "-R", f"{self.forward_port}:127.0.0.1:{site_port}", f"{user}@127.0.0.1"]),
            d / "ssh.log",
            env=self.env,
        )
        self.info["command"] = (f"LD_PRELOAD={NODELAY_SO} " if self.nodelay else "") + " ".join(self.client.args)
        wait_echo(self.forward_port, 30, [self.sshd, self.client])
        if self.nodelay:
            self._verify_nodelay()

    def _verify_nodelay(self) -> None:
        """Raise RuntimeError unless the shim is in effect in ssh and in sshd and its children.

        With one forwarded stream held open (so that both of its legs exist):
        nodelay.so must be mapped in the ssh client, the sshd listener and every
        child of it, and TCP_NODELAY must read 1 on every connected TCP socket of
        ssh (to sshd, to the site) and of sshd's children (from ssh, from the
        forward-port client), read through pidfd_getfd + getsockopt.  If the
        kernel refuses pidfd_getfd, the mapping check and the test program of
        ``check_available`` have to do, and the report says so.
        """
        assert self.sshd is not None and self.client is not None
        so = NODELAY_SO.name
        with socket.create_connection(("127.0.0.1", self.forward_port), timeout=10) as held:
            held.sendall(b"ECHO" + bytes(12) + b"x" * 64)
            got = b""
            while len(got) < 64:
                chunk = held.recv(64 - len(got))
                if not chunk:
                    raise RuntimeError("TCP_NODELAY check: the held echo stream closed")
                got += chunk
            kids = procstats.descendants(self.sshd.pid)
            missing = [pid for pid in [self.client.pid, self.sshd.pid] + kids if not maps_library(pid, so)]
            if missing or not kids:
                raise RuntimeError(
                    f"TCP_NODELAY shim: {so} not loaded in PIDs {missing} "
                    f"(ssh {self.client.pid}, sshd {self.sshd.pid}, children {kids})"
                )
            try:
                client = tcp_nodelay_of(self.client.pid)
                server: dict[int, int] = {}
                for pid in kids:
                    server.update(tcp_nodelay_of(pid))
            except OSError as e:
                self.info["nodelay_check"] = (
                    f"{so} mapped in ssh, the sshd listener and its children ({len(kids)}); a test program under "
                    f"the shim read TCP_NODELAY=1 after connect and accept; the live sockets could not be "
                    f"read ({e})"
                )
                return
        off = {ino for ino, v in {**client, **server}.items() if not v}
        if off or len(client) < 2 or len(server) < 2:
            raise RuntimeError(
                f"TCP_NODELAY shim not in effect: connected TCP sockets ssh {client}, sshd children "
                f"{server} (inode -> TCP_NODELAY; want >= 2 each, all 1)"
            )
        self.info["nodelay_check"] = (
            f"{so} mapped in ssh, the sshd listener and its children ({len(kids)}); with a forwarded stream open, "
            f"TCP_NODELAY read 1 (pidfd_getfd + getsockopt) on all {len(client)} connected TCP sockets of ssh "
            f"and all {len(server)} of sshd's children"
        )

    def pids(self) -> list[int]:
        out: list[int] = []
        if self.sshd is not None and self.sshd.poll() is None:
            out += procstats.descendants(self.sshd.pid)
        if self.client is not None and self.client.poll() is None:
            out.append(self.client.pid)
        self._seen.update(out)
        return out

    def stop(self) -> None:
        if self.client is not None:
            end_process(self.client)
        if self.sshd is not None:
            # Session processes (of *our* sshd only) end once the client is gone; wait for that while the
            # listener is alive to reap them (killed after it, they would stay zombies under PID 1).
            deadline = time.monotonic() + 5
            while self.sshd.poll() is None and time.monotonic() < deadline:
                kids = procstats.descendants(self.sshd.pid)
                if not kids:
                    break
                if time.monotonic() > deadline - 3:
                    for pid in kids:
                        end_pid(pid, expect="sshd", timeout=1)
                time.sleep(0.05)
            end_process(self.sshd)
            for pid in self._seen:  # anything left over
                if self.client is None or pid != self.client.pid:
                    end_pid(pid, expect="sshd", timeout=1)
        super().stop()


class RtunnelTunnel(Tunnel):
    """rtunnel through its CLI contract (no other flags are used)::

        twistd -n --pidfile= --logfile=LOG rtunnel-server --state SDIR \\
            --listen tcp:PORT:interface=127.0.0.1 --public-address 127.0.0.1 \\
            --forward 127.0.0.1:FWDPORT:SITE:127.0.0.1:SITEPORT
        rtunnel keyfile create --state SDIR --site SITE --output KF --address 127.0.0.1:PORT
        twistd -n --pidfile= --logfile=LOG rtunnel --keyfile KF --state TDIR --allow 127.0.0.1:SITEPORT

    twistd runs as ``PYTHONPATH=<repo> .venv/bin/twistd`` from the repo root (the
    dropin lives in the source tree).  With a WAN delay the keyfile's
    ``--address`` is the relay, which forwards to the server's listen port.
    PIDs measured: both twistd processes.

    The admin endpoint (``--admin``, once the server has it): on, as by
    default, but on a free loopback port (``--admin tcp:PORT:interface=127.0.0.1``),
    since the rtunnel columns run at once and the default port would be taken by
    the first; not scraped.  ``admin = "off"`` passes ``--admin none``;
    ``admin = "scraped"`` also fetches ``/metrics`` every second while the
    tunnel is up (``MetricsScraper``), after one scrape at start that must succeed.
    """

    key, label, family = "rtunnel", "rtunnel", "rtunnel"
    #: "default" (on, not scraped), "off" (--admin none) or "scraped"
    admin = "default"
    #: ``--workers N`` on the server (RtunnelWorkersTunnel)
    workers = 1
    #: also serve the SOCKS5 front door, and measure through it (RtunnelSocksTunnel)
    socks = False
    # Windows start at 256 KiB and grow by bandwidth-delay probing up to
    # WindowTuning.max_window (docs/protocol.md, "Window growth"): on the WAN
    # path the window in use is that maximum once grown.
    window_bytes = 16 * 1024 * 1024
    window_source = "rtunnel WindowTuning.max_window (grown from 256 KiB by probing)"

    def __init__(self, workdir: Path, wan_delay_ms: float = 0.0) -> None:
        super().__init__(workdir, wan_delay_ms)
        self.server: subprocess.Popen | None = None
        self.site: subprocess.Popen | None = None
        self.env = dict(os.environ, PYTHONPATH=str(REPO))
        self.twistd = str(VENV_BIN / "twistd")
        self.admin_port = 0
        self.scraper: MetricsScraper | None = None
        self.scrapes = {"ok": 0, "failed": 0}
        #: server CPU ms per scrape, one figure per start (``SCRAPE_CPU_SAMPLE`` back-to-back scrapes)
        self.scrape_cpu_ms: list[float] = []

    def _admin(self) -> list[str]:
        script = VENV_BIN / "rtunnel"
        return [str(script)] if script.exists() else [str(VENV_BIN / "python"), "-m", "rtunnel"]

    def check_available(self) -> None:
        try:
            r = subprocess.run(
                [self.twistd, "--help"], capture_output=True, text=True, timeout=60, env=self.env, cwd=REPO
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise TunnelUnavailable(f"cannot run {self.twistd}: {e}") from e
        if "rtunnel-server" not in r.stdout:
            raise TunnelUnavailable("`twistd --help` does not list rtunnel-server yet (rtunnel not built)")
        if self.admin != "default" and not server_has_admin(self.twistd, self.env):
            raise TunnelUnavailable("`twistd rtunnel-server --help` has no --admin option yet (issue 12)")

    def _admin_args(self) -> list[str]:
        self.admin_port = 0
        if self.admin == "off":
            args = ["--admin", "none"]
        elif not server_has_admin(self.twistd, self.env):
            return []
        else:
            self.admin_port = free_port()
            args = ["--admin", f"tcp:{self.admin_port}:interface=127.0.0.1"]
        self.info["admin"] = " ".join(args)
        return args

    def start(self, site_port: int) -> None:
        self._fresh_workdir()
        d = self.workdir
        sdir, tdir, kf = d / "server-state", d / "site-state", d / "site.rtkey"
        listen_port, fwd_port = free_port(), free_port()
        socks_port = free_port() if self.socks else 0
        self.server = spawn(
            [
                self.twistd,
                "-n",
                "--pidfile=",
                f"--logfile={d / 'server.log'}",
                "rtunnel-server",
                "--state",
                str(sdir),
                "--listen",
                f"tcp:{listen_port}:interface=127.0.0.1",
                "--public-address",
                "127.0.0.1",
                "--forward",
                f"127.0.0.1:{fwd_port}:{SITE_NAME}:127.0.0.1:{site_port}",
                *(["--socks", f"tcp:{socks_port}"] if self.socks else []),
                *self._admin_args(),
                *(["--workers", str(self.workers)] if self.workers > 1 else []),
            ],
            d / "server.stderr",
            env=self.env,
            cwd=REPO,
        )
        self.info["server_command"] = " ".join(self.server.args)
        wait_port(listen_port, 30, self.server)
        address_port = listen_port
        if self.wan_delay_ms:
            self.relay = Relay(listen_port, self.wan_delay_ms, d)
            address_port = self.relay.port
        kf_cmd = self._admin() + [
            "keyfile",
            "create",
            "--state",
            str(sdir),
            "--site",
            SITE_NAME,
            "--output",
            str(kf),
            "--address",
            f"127.0.0.1:{address_port}",
        ]
        self.info["keyfile_command"] = " ".join(kf_cmd)
        r = subprocess.run(kf_cmd, capture_output=True, text=True, timeout=60, env=self.env, cwd=REPO)
        if r.returncode != 0:
            raise RuntimeError(f"keyfile create failed (rc {r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
        self.site = spawn(
            [
                self.twistd,
                "-n",
                "--pidfile=",
                f"--logfile={d / 'site.log'}",
                "rtunnel",
                "--keyfile",
                str(kf),
                "--state",
                str(tdir),
                "--allow",
                f"127.0.0.1:{site_port}",
            ],
            d / "site.stderr",
            env=self.env,
            cwd=REPO,
        )
        self.info["site_command"] = " ".join(self.site.args)
        self.forward_port = fwd_port
        try:
            wait_port(fwd_port, 30, self.server)
            wait_echo(fwd_port, 30, [self.server, self.site])
            if self.workers > 1:
                self._wait_sessions(sdir, self.workers, 60)
        except RuntimeError as e:
            raise RuntimeError(
                f"{e}\n--- server.log\n{tail(d / 'server.log')}\n--- site.log\n{tail(d / 'site.log')}"
            ) from e
        if self.socks:
            # The forward proved the tunnel up; the measured runs go through the front door by name.
            self.forward_port = socks_port
            self.loadgen_opts = {"socks": f"127.0.0.1.{SITE_NAME}.rtunnel.internal:{site_port}"}
        if self.admin == "scraped":
            wait_port(self.admin_port, 30, self.server)
            self.scraper = MetricsScraper(self.admin_port)
            try:
                self.scraper.scrape_once()
            except RuntimeError as e:
                raise RuntimeError(f"first scrape failed: {e}\n--- server.log\n{tail(d / 'server.log')}") from e
            self.info["metrics_bytes"] = str(self.scraper.last_bytes)
            # What one scrape costs the server, read from its own CPU clock:
            # back-to-back scrapes on the idle tunnel, so nearly all the time
            # the server spends meanwhile is answering them.  Unlike the
            # throughput pair, this does not drown in run-to-run noise.
            assert self.server is not None
            before = procstats.cpu_seconds(self.server.pid)
            for _ in range(SCRAPE_CPU_SAMPLE):
                self.scraper.scrape_once()
            spent = procstats.cpu_seconds(self.server.pid) - before
            self.scrape_cpu_ms.append(1000 * spent / SCRAPE_CPU_SAMPLE)
            self.info["scrape_cpu_ms"] = f"{statistics.median(self.scrape_cpu_ms):.3f}"
            self.info["scrape_cpu_samples"] = str(len(self.scrape_cpu_ms))
            self.scraper.start()

    def pids(self) -> list[int]:
        pids = [p.pid for p in (self.server, self.site) if p is not None and p.poll() is None]
        if self.workers > 1 and self.server is not None:
            pids += procstats.descendants(self.server.pid)  # the workers: they move the bytes
        return pids

    def _wait_sessions(self, sdir: Path, count: int, timeout: float) -> None:
        """Until the site holds a session with ``count`` replicas (``rtunnel sites list --json``)."""
        deadline = time.monotonic() + timeout
        seen: object = None
        while time.monotonic() < deadline:
            r = subprocess.run(
                [*self._admin(), "sites", "list", "--json", "--state", str(sdir)],
                capture_output=True,
                text=True,
                timeout=60,
                env=self.env,
                cwd=REPO,
            )
            if r.returncode == 0:
                seen = [len(row["sessions"]) for row in json.loads(r.stdout) if row["name"] == SITE_NAME]
                if seen and seen[0] >= count:
                    return
            time.sleep(0.2)  # polling another process's state, bounded by the deadline
        raise RuntimeError(f"the site did not hold {count} sessions within {timeout:g} s (sessions seen: {seen})")

    def stop(self) -> None:
        if self.scraper is not None:
            s, self.scraper = self.scraper, None
            s.stop()
            self.scrapes["ok"] += s.ok
            self.scrapes["failed"] += s.failed
            if s.first_error and "scrape_error" not in self.info:
                self.info["scrape_error"] = s.first_error
            if s.times_ms:
                self.info["scrape_ms_median"] = f"{statistics.median(s.times_ms):.1f}"
            self.info["metrics_bytes"] = str(s.last_bytes)
            self.info["scrapes_ok"] = str(self.scrapes["ok"])
            self.info["scrapes_failed"] = str(self.scrapes["failed"])
        for p in (self.site, self.server):
            if p is not None:
                end_process(p)
        super().stop()


class RtunnelSocksTunnel(RtunnelTunnel):
    """The same server and site, also started with ``--socks tcp:PORT``; every connection of the
    RTT and connection runs goes through the SOCKS5 front door by name
    (``127.0.0.1.SITE.rtunnel.internal:SITEPORT``, loadgen ``--socks``), the SOCKS handshake
    counted in each new connection's time. Measured on the RTT and new-connection rows only
    (after the handshake the stream is a forward's, so bulk, RSS and CPU would repeat its column)."""

    key, label = "rtunnel-socks", "rtunnel SOCKS5 front door"
    socks = True
    latency_only = True


class RtunnelAdminOffTunnel(RtunnelTunnel):
    """The cost-of-metrics baseline: the server with ``--admin none``; bulk throughput and CPU only."""

    key, label = "rtunnel-admin-off", "rtunnel, --admin none"
    admin = "off"
    bulk_only = True
    calibration_group = "rtunnel-admin"


class RtunnelAdminScrapedTunnel(RtunnelAdminOffTunnel):
    """The same with the admin endpoint on and ``/metrics`` scraped every second (``MetricsScraper``)."""

    key, label = "rtunnel-admin-scraped", "rtunnel, admin on, /metrics every 1 s"
    admin = "scraped"


class RtunnelWorkersTunnel(RtunnelTunnel):
    """The same server with ``--workers 2`` (issue 13): two worker processes share the tunnel
    port and the forward's port (SO_REUSEPORT), and the site holds a session with each; the
    kernel spreads the forward's clients over the workers.  Measured once the site holds both
    sessions (``rtunnel sites list --json``).  PIDs measured: the supervisor, its workers and the
    site.  The admin endpoint is off (each worker would need its own port)."""

    key, label = "rtunnel-workers2", "rtunnel, --workers 2"
    admin = "off"
    workers = 2

    def check_available(self) -> None:
        super().check_available()
        r = subprocess.run(
            [self.twistd, "rtunnel-server", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
            cwd=REPO,
        )
        if "--workers" not in r.stdout:
            raise TunnelUnavailable("`twistd rtunnel-server --help` has no --workers option yet (issue 13)")


def make_tunnels(selection: list[str], root: Path, wan_delay_ms: float = 0.0) -> list[Tunnel]:
    """Tunnel objects for ``--only`` names: direct, ssh (all three ssh columns), ssh-aes128-gcm,
    ssh-nodelay (aes128-gcm + TCP_NODELAY shim; LAN only), ssh-chacha20, rtunnel (with rtunnel-socks
    and the rtunnel-admin pair), rtunnel-socks (the SOCKS5 front door; RTT and new connections, LAN
    only), rtunnel-admin (rtunnel-admin-off and rtunnel-admin-scraped: bulk and CPU only, LAN only),
    rtunnel-workers (the server with --workers 2; LAN only)."""
    suffix = "-wan" if wan_delay_ms else ""
    out: list[Tunnel] = []
    for name in selection:
        if name == "direct":
            out.append(DirectTunnel(root / f"direct{suffix}", wan_delay_ms))
        if name in ("ssh", "ssh-aes128-gcm"):
            out.append(SshTunnel(root / f"ssh-aes{suffix}", "aes128-gcm@openssh.com", wan_delay_ms))
        if name in ("ssh", "ssh-nodelay") and not wan_delay_ms:
            out.append(SshTunnel(root / "ssh-nodelay", "aes128-gcm@openssh.com", nodelay=True))
        if name in ("ssh", "ssh-chacha20"):
            out.append(SshTunnel(root / f"ssh-chacha{suffix}", None, wan_delay_ms))
        if name == "rtunnel":
            out.append(RtunnelTunnel(root / f"rtunnel{suffix}", wan_delay_ms))
        if name in ("rtunnel", "rtunnel-socks") and not wan_delay_ms:
            out.append(RtunnelSocksTunnel(root / "rtunnel-socks"))
        if name in ("rtunnel", "rtunnel-workers") and not wan_delay_ms:
            out.append(RtunnelWorkersTunnel(root / "rtunnel-workers2"))
        if name in ("rtunnel", "rtunnel-admin") and not wan_delay_ms:
            out.append(RtunnelAdminOffTunnel(root / "rtunnel-admin-off"))
            out.append(RtunnelAdminScrapedTunnel(root / "rtunnel-admin-scraped"))
    unique: dict[str, Tunnel] = {}  # "ssh,ssh-aes128-gcm" names one column once
    for t in out:
        unique.setdefault(t.key, t)
    return list(unique.values())
