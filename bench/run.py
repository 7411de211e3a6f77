"""rtunnel benchmark: the same loads through direct TCP, ``ssh -R`` and rtunnel, in one run.

``ssh -R`` runs three ways: aes128-gcm, the default chacha20-poly1305, and
aes128-gcm with TCP_NODELAY forced by an LD_PRELOAD shim (bench/nodelay.c;
OpenSSH with -N leaves Nagle on).  The last column is only measured where Nagle
matters (64 B echo RTT, new connections) and has its own ratio column, since the
connection-rate target is against ssh with TCP_NODELAY.

The cost of metrics: two more rtunnel columns measure bulk throughput and the
tunnel's CPU per GB only, one with the server's admin endpoint off
(``--admin none``) and one with it on and ``/metrics`` fetched every second, as
a Prometheus server would (bench/tunnels.py, ``MetricsScraper``); they move the
same calibrated transfer sizes and run interleaved with the others, and a
section of the report gives the difference (target: under 3 %).

Usage (from the repo root)::

    make bench                          # full: 5 repetitions, ~6-8 min on 2 cores
    make bench BENCH_ARGS=--quick       # smoke: 2 repetitions, ~1-2 min
    make bench BENCH_ARGS="--only direct,ssh --reps 3 --no-wan"
    make bench BENCH_ARGS="--quick --only rtunnel-admin --no-wan"   # the metrics-cost pair alone

Why it is built this way:

* One run, tunnels interleaved: all LAN tunnels are up at once and each
  repetition visits them in turn (rotating the order), so drift on these shared
  machines hits every column alike.  Compare ratios inside one run, not
  absolute numbers across runs (measured on these machines: 10-25 % from run
  to run).
* The load generator is C (bench/loadgen.c) and every stream's bytes are
  counted and pattern-checked; the direct-TCP column shows its headroom.
* Transfer sizes are calibrated per tunnel and metric (a warm-up transfer
  measures the rate), so each measured transfer lasts about the same time
  whatever the tunnel's speed; the warm-up is not counted.
* Medians with min-max over repetitions; MB = 10^6 bytes.

Outputs: a Markdown report printed and written to bench/results/latest.md
(only for a default full run: no --quick/--only/--reps; else to _bench/),
the marked section of docs/performance.md refreshed from it (same condition),
and raw numbers in _bench/last-run.json.  Keys, configs, logs: _bench/ (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import procstats, tunnels  # noqa: E402
from bench.tunnels import Tunnel, TunnelUnavailable  # noqa: E402

WORK = REPO / "_bench"
LOADGEN = WORK / "loadgen"
NODELAY_SO = tunnels.NODELAY_SO
RESULTS_MD = REPO / "bench" / "results" / "latest.md"
DOCS_MD = REPO / "docs" / "performance.md"
DOCS_BEGIN = "<!-- bench:results:begin (written by bench/run.py; edit outside these markers) -->"
DOCS_END = "<!-- bench:results:end -->"
MB = 1e6
MiB = 1 << 20

PLANS = {
    # bulk_s: target length of one measured transfer; conn_s/rtt_s: length of a latency run
    # wan_s: long enough that a tunnel which sizes its window to the path
    # (rtunnel) is measured mostly in its steady state, as a video stream is.
    "full": dict(
        reps=5, bulk_s=1.2, rtt_s=1.0, conn_s=1.2, hold_n=1000, hold_reps=3, wan_reps=3, wan_s=6.0, wan_rtt_s=1.0
    ),
    "quick": dict(
        reps=2, bulk_s=0.4, rtt_s=0.4, conn_s=0.4, hold_n=1000, hold_reps=1, wan_reps=1, wan_s=1.2, wan_rtt_s=0.5
    ),
}
WAN_DELAY_MS = 50.0

# (key, label, unit, better)  better: "up" = higher is better, "down" = lower is better
LAN_METRICS = [
    ("up1", "1 stream upload (cloud → site)", "MB/s", "up"),
    ("down1", "1 stream download (site → cloud)", "MB/s", "up"),
    ("agg16", "16 streams download, aggregate", "MB/s", "up"),
    ("agg64", "64 streams download, aggregate", "MB/s", "up"),
    ("rtt_p50", "64 B echo RTT p50", "µs", "down"),
    ("rtt_p99", "64 B echo RTT p99", "µs", "down"),
    ("cseq", "new connections, sequential", "conn/s", "up"),
    ("cseq_p50", "sequential: connect+echo+close p50", "µs", "down"),
    ("cseq_p99", "sequential: connect+echo+close p99", "µs", "down"),
    ("c16", "new connections, 16 concurrent", "conn/s", "up"),
    ("c16_p50", "16 concurrent: connect+echo+close p50", "µs", "down"),
    ("c16_p99", "16 concurrent: connect+echo+close p99", "µs", "down"),
    ("rss_idle", "RSS idle (fresh tunnel)", "MiB", "down"),
    ("rss_held", "RSS with 1,000 idle streams", "MiB", "down"),
    ("kib_stream", "RSS per idle stream", "KiB", "down"),
    ("cpu_gb", "tunnel CPU per GB moved (1 stream up+down)", "s/GB", "down"),
]
# What a ``latency_only`` tunnel (ssh -R + TCP_NODELAY) measures: what Nagle affects.
LATENCY_METRICS = {"rtt_p50", "rtt_p99", "cseq", "cseq_p50", "cseq_p99", "c16", "c16_p50", "c16_p99"}
# The cost of metrics: the admin endpoint scraped every second against --admin none.
METRICS_COST_PAIR = ("rtunnel-admin-off", "rtunnel-admin-scraped")
METRICS_COST_JUDGED = ("up1", "down1", "agg16", "agg64", "cpu_gb")  # rss_idle is shown, not judged
METRICS_COST_ROWS = (*METRICS_COST_JUDGED, "rss_idle")
METRICS_COST_TARGET_PCT = 3.0
WAN_METRICS = [
    ("wan_rtt", "64 B echo RTT p50", "ms", "down"),
    ("wan_down1", "1 stream download (site → cloud)", "MB/s", "up"),
    ("wan_up1", "1 stream upload (cloud → site)", "MB/s", "up"),
    ("wan_window", "per-stream flow-control window", "KiB", ""),
    ("wan_bound", "window / RTT (throughput ceiling)", "MB/s", "up"),
    ("wan_eff", "measured download / ceiling", "%", "up"),
]


class MeasureError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ setup
def build_c(name: str, out: Path, flags: list[str], libs: tuple[str, ...] = ()) -> None:
    """Compile bench/NAME into _bench/ (never committed) when it is missing or stale."""
    src = REPO / "bench" / name
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return
    WORK.mkdir(exist_ok=True)
    log(f"compiling bench/{name} -> {out.relative_to(REPO)}")
    subprocess.run(["gcc", "-O2", "-Wall", *flags, "-o", str(out), str(src), *libs], check=True, timeout=120)


def build_loadgen() -> None:
    build_c("loadgen.c", LOADGEN, ["-pthread"])


def build_nodelay() -> None:
    """The LD_PRELOAD shim of the ssh -R + TCP_NODELAY column."""
    build_c("nodelay.c", NODELAY_SO, ["-shared", "-fPIC"], ("-ldl",))


def raise_nofile() -> None:
    """1,000 held streams need ~2,000+ fds in ssh/sshd/twistd, which inherit our limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_site_service() -> tuple[subprocess.Popen, int]:
    p = tunnels.spawn(
        [str(LOADGEN), "serve", "--listen", "127.0.0.1:0", "--timeout", "1800"],
        WORK / "site-service.log",
        stdout=subprocess.PIPE,
    )
    return p, int(tunnels.read_ready_line(p, "loadgen serve")["port"])


def machine_info() -> dict[str, str]:
    """Gathered on every run so each table says where it was measured."""
    info: dict[str, str] = {}
    cpu, flags = "?", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    info["CPU"] = f"{cpu}, {os.cpu_count()} cores" + (", AES-NI" if " aes " in flags else ", no AES-NI")
    try:
        mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        info["memory"] = f"{int(mem.split()[1]) / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration):
        pass
    osname = ""
    try:
        osname = next(
            ln.split("=", 1)[1].strip('"')
            for ln in Path("/etc/os-release").read_text().splitlines()
            if ln.startswith("PRETTY_NAME=")
        )
    except (OSError, StopIteration):
        pass
    info["OS / kernel"] = f"{osname} / Linux {platform.release()}"
    info["Python"] = platform.python_version()
    try:
        import twisted

        info["Twisted"] = twisted.__version__
    except ImportError:
        info["Twisted"] = "not installed"
    try:
        import OpenSSL
        from OpenSSL import SSL

        info["pyOpenSSL / OpenSSL"] = f"{OpenSSL.__version__} / {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}"
    except ImportError:
        info["pyOpenSSL / OpenSSL"] = "not installed"
    try:
        r = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10)
        info["OpenSSH"] = (r.stderr or r.stdout).strip()
    except OSError:
        info["OpenSSH"] = "not installed"
    try:
        r = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True, timeout=10)
        info["gcc (loadgen)"] = r.stdout.strip()
    except OSError:
        pass
    try:
        import rtunnel

        ver = getattr(rtunnel, "__version__", "?")
    except ImportError:
        ver = "not importable"
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    info["rtunnel"] = f"{ver} (commit {r.stdout.strip() or '?'})"
    return info


# ------------------------------------------------------------------ running loadgen
def loadgen(mode: str, port: int, timeout: float = 90, **opts: object) -> dict:
    """Run one loadgen client; its JSON result, or MeasureError if it failed or did not verify."""
    argv = [str(LOADGEN), mode, "--port", str(port), "--timeout", str(int(timeout))]
    for k, v in opts.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 15)
    except subprocess.TimeoutExpired as e:
        raise MeasureError(f"{mode} timed out after {timeout + 15:.0f} s") from e
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise MeasureError(f"{mode}: no result (rc {r.returncode}) {r.stderr.strip()[-300:]}")
    res = json.loads(lines[-1])
    if r.returncode != 0 or not res.get("ok"):
        raise MeasureError(f"{mode}: failed verification or errors: {lines[-1]}")
    return res


class Bench:
    def __init__(self, plan: dict, args: argparse.Namespace) -> None:
        self.plan = plan
        self.args = args
        # values[phase][tunnel key][metric] -> list of floats; failures likewise -> list of str
        self.values: dict[str, dict[str, dict[str, list[float]]]] = {"lan": {}, "wan": {}}
        self.failures: dict[str, dict[str, list[str]]] = {}
        self.sizes: dict[tuple[str, str], int] = {}
        self.skipped: dict[str, str] = {}
        self.labels: dict[str, str] = {}
        self.tinfo: dict[str, dict[str, str]] = {}
        self.windows: dict[str, tuple[int | None, str]] = {}
        self.latency_only: set[str] = set()  # columns measured on LATENCY_METRICS only
        self.bulk_only: set[str] = set()  # columns measured on bulk, CPU and idle RSS only (metrics cost)
        self.warmed: set[tuple[str, tuple[str, str]]] = set()  # (column, size key) that had a warm-up transfer

    def record(self, phase: str, t: Tunnel, metric: str, value: float) -> None:
        self.values[phase].setdefault(t.key, {}).setdefault(metric, []).append(value)

    def fail(self, t: Tunnel, metric: str, err: Exception) -> None:
        self.failures.setdefault(t.key, {}).setdefault(metric, []).append(str(err)[:400])
        log(f"  {t.key} {metric}: FAILED: {str(err)[:300]}")

    # -- measurements
    def calibrated(self, t: Tunnel, metric: str, mode: str, streams: int, target_s: float, probe: int) -> int:
        """Bytes for one transfer of about ``target_s`` seconds on this tunnel (warm-up, not counted)."""
        key = ((t.calibration_group or t.key) + ("-wan" if t.wan_delay_ms else ""), metric)
        if key not in self.sizes:
            size = probe
            for attempt in range(2):
                res = loadgen(mode, t.forward_port, bytes=size, streams=streams)
                rate = res["bytes"] / max(res["seconds"], 1e-6)
                # On the WAN path always take the second probe's rate: the first one
                # includes the growth of a path-sized window (rtunnel), so sizing from
                # it made the measured transfer a third of wan_s, mostly ramp-up.
                if res["seconds"] >= target_s / 4 and not (t.wan_delay_ms and attempt == 0):
                    break
                size = int(rate * target_s / 3)
            self.sizes[key] = int(min(max(rate * target_s, 4 * MiB), 40e9) // streams * streams)
        elif t.calibration_group and (t.key, key) not in self.warmed:
            # Sized by the other column of its group: the probes above were that
            # column's warm-up, so this one gets one unmeasured transfer of its own.
            loadgen(mode, t.forward_port, timeout=max(60, target_s * 20), bytes=self.sizes[key], streams=streams)
        self.warmed.add((t.key, key))
        return self.sizes[key]

    def bulk(
        self, phase: str, t: Tunnel, metric: str, mode: str, streams: int, target_s: float, probe: int
    ) -> tuple[float, float, int]:
        """One verified transfer; records MB/s; returns (cpu seconds of the tunnel, seconds, bytes)."""
        size = self.calibrated(t, metric, mode, streams, target_s, probe)
        before = procstats.cpu_snapshot(t.pids())
        res = loadgen(mode, t.forward_port, timeout=max(60, target_s * 20), bytes=size, streams=streams)
        cpu = procstats.cpu_delta(before, procstats.cpu_snapshot(t.pids()))
        self.record(phase, t, metric, res["bytes"] / res["seconds"] / MB)
        return cpu, res["seconds"], res["bytes"]

    def lan_rep(self, t: Tunnel) -> None:
        p = self.plan
        cpu_s = moved = 0.0
        bulk = (
            ()
            if t.latency_only
            else (("up1", "up", 1), ("down1", "down", 1), ("agg16", "down", 16), ("agg64", "down", 64))
        )
        for metric, mode, streams in bulk:
            try:
                cpu, _, nbytes = self.bulk("lan", t, metric, mode, streams, p["bulk_s"], 128 * MiB)
                if streams == 1:
                    cpu_s, moved = cpu_s + cpu, moved + nbytes
            except MeasureError as e:
                self.fail(t, metric, e)
        if moved and t.pids():
            self.record("lan", t, "cpu_gb", cpu_s / (moved / 1e9))
        if t.bulk_only:
            return
        try:
            r = loadgen("rtt", t.forward_port, seconds=p["rtt_s"], max_count=200000, **t.loadgen_opts)
            self.record("lan", t, "rtt_p50", r["p50_us"])
            self.record("lan", t, "rtt_p99", r["p99_us"])
        except MeasureError as e:
            self.fail(t, "rtt", e)
        for metric, conc in (("cseq", 1), ("c16", 16)):
            try:
                r = loadgen(
                    "conn", t.forward_port, seconds=p["conn_s"], concurrency=conc, max_count=200000, **t.loadgen_opts
                )
                self.record("lan", t, metric, r["per_s"])
                self.record("lan", t, metric + "_p50", r["p50_us"])
                self.record("lan", t, metric + "_p99", r["p99_us"])
            except MeasureError as e:
                self.fail(t, metric, e)

    def hold(self, t: Tunnel) -> None:
        """RSS of the tunnel's processes before and while N idle streams are open."""
        n = self.plan["hold_n"]
        base = procstats.total_rss_kib(t.pids())
        p = subprocess.Popen(
            [
                str(LOADGEN),
                "hold",
                "--port",
                str(t.forward_port),
                "--count",
                str(n),
                "--concurrency",
                "16",
                "--timeout",
                "300",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert p.stdout is not None and p.stdin is not None
            ready, _, _ = select.select([p.stdout], [], [], 120)
            if not ready:
                raise MeasureError(f"hold: {n} connections not open after 120 s")
            res = json.loads(p.stdout.readline() or "{}")
            if res.get("ready", 0) < n:
                raise MeasureError(f"hold: only {res.get('ready')} of {n} streams opened ({res})")
            time.sleep(1.0)  # let both ends settle their per-stream buffers
            held = procstats.total_rss_kib(t.pids())
            self.record("lan", t, "rss_held", held / 1024)
            self.record("lan", t, "kib_stream", (held - base) / res["ready"])
            p.stdin.close()
            p.wait(60)
        finally:
            tunnels.end_process(p)
        time.sleep(0.5)

    def hold_all(self, t: Tunnel, site_port: int) -> bool:
        """Idle-stream memory, first thing on a fresh tunnel, restarted for each repetition.

        Fresh because a process that already moved data keeps freed heap and
        would under-count what a new stream costs.  False if a restart failed.
        """
        if not t.pids() or t.latency_only or t.bulk_only:
            return True  # direct TCP: no tunnel process to measure; latency- and bulk-only columns skip it
        for i in range(self.plan["hold_reps"]):
            try:
                if i:
                    t.stop()
                    t.start(site_port)
                    self.record("lan", t, "rss_idle", procstats.total_rss_kib(t.pids()) / 1024)
                self.hold(t)
                log(
                    f"hold {i + 1}/{self.plan['hold_reps']} {t.key}: "
                    f"{self.values['lan'][t.key]['kib_stream'][-1]:.1f} KiB/stream"
                )
            except MeasureError as e:
                self.fail(t, "hold", e)
            except Exception as e:  # noqa: BLE001 - restart failed: drop this tunnel, keep the others
                self.skipped[t.key] = f"failed to restart: {e}"
                log(f"SKIP {t.label}: failed to restart: {e}")
                t.stop()
                return False
        return True

    def wan_rep(self, t: Tunnel) -> None:
        p = self.plan
        try:
            r = loadgen("rtt", t.forward_port, seconds=p["wan_rtt_s"], max_count=50, warmup=2)
            self.record("wan", t, "wan_rtt", r["p50_us"] / 1000)
        except MeasureError as e:
            self.fail(t, "wan_rtt", e)
        for metric, mode in (("wan_down1", "down"), ("wan_up1", "up")):
            try:
                # A 64 MiB warm-up: tunnels that size their windows to the path
                # (rtunnel) are measured once they have, as over any long transfer.
                self.bulk("wan", t, metric, mode, 1, p["wan_s"], 64 * MiB)
            except MeasureError as e:
                self.fail(t, metric, e)

    # -- phases
    def start_all(self, ts: list[Tunnel], site_port: int, phase: str) -> list[Tunnel]:
        up: list[Tunnel] = []
        for t in ts:
            self.labels[t.key] = t.label
            if t.latency_only:
                self.latency_only.add(t.key)
            if t.bulk_only:
                self.bulk_only.add(t.key)
            try:
                t.check_available()
                log(f"starting {t.label} ({phase})")
                t.start(site_port)
            except TunnelUnavailable as e:
                self.skipped[t.key] = str(e)
                log(f"SKIP {t.label}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - one broken tunnel must not stop the others
                self.skipped[t.key] = f"failed to start: {e}"
                log(f"SKIP {t.label}: failed to start: {e}")
                t.stop()
                continue
            self.tinfo.setdefault(t.key, {}).update(t.info)
            self.windows[t.key] = (t.window_bytes, t.window_source)
            if phase == "lan" and t.pids() and not t.latency_only:
                self.record("lan", t, "rss_idle", procstats.total_rss_kib(t.pids()) / 1024)
            up.append(t)
        return up

    def run_phase(self, phase: str, ts: list[Tunnel], site_port: int, reps: int) -> None:
        try:
            up = self.start_all(ts, site_port, phase)
            if phase == "lan":
                up = [t for t in up if self.hold_all(t, site_port)]
            for rep in range(reps):
                order = up[rep % len(up) :] + up[: rep % len(up)] if up else []
                for t in order:
                    t0 = time.monotonic()
                    (self.lan_rep if phase == "lan" else self.wan_rep)(t)
                    v = self.values[phase].get(t.key, {})
                    keys = (
                        ("up1", "down1", "agg64", "rtt_p50", "cseq", "c16")
                        if phase == "lan"
                        else ("wan_rtt", "wan_down1", "wan_up1")
                    )
                    summary = " ".join(f"{k}={v[k][-1]:.0f}" for k in keys if v.get(k))
                    log(f"{phase} rep {rep + 1}/{reps} {t.key}: {summary} ({time.monotonic() - t0:.1f} s)")
        finally:
            for t in ts:
                t.stop()
                if t.info:
                    self.tinfo.setdefault(t.key, {}).update(t.info)  # what stop() adds (scrape counts)


# ------------------------------------------------------------------ report
def fmt(x: float) -> str:
    if x != x:  # NaN
        return "–"
    ax = abs(x)
    if ax >= 100:
        return f"{x:,.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def cell(vals: list[float] | None) -> str:
    if not vals:
        return "–"
    med = statistics.median(vals)
    if len(vals) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(vals))}–{fmt(max(vals))})"


def med(vals: list[float] | None) -> float | None:
    return statistics.median(vals) if vals else None


def report(b: Bench, info: dict[str, str], mode: str, cols: list[str], elapsed: float) -> str:
    lan, wan = b.values["lan"], b.values["wan"]
    ssh_cols = [c for c in cols if c.startswith("ssh") and c in lan and c not in b.latency_only]
    best_ssh = max(ssh_cols, key=lambda c: med(lan[c].get("down1")) or 0) if ssh_cols else None
    # second ratio column: against ssh with TCP_NODELAY (the connection-rate target), where measured
    nd_ssh = next((c for c in cols if c in b.latency_only and c.startswith("ssh") and c in lan), None)
    out = [f"# rtunnel benchmark ({mode} run, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')})", ""]
    out += [f"- **{k}**: {v}" for k, v in info.items()]
    p = b.plan
    out += [
        f"- **settings**: {p['reps']} repetitions (hold test {p['hold_reps']}, WAN {p['wan_reps']}); "
        f"transfers sized to ~{p['bulk_s']} s each; cells are median (min–max); MB = 10^6 bytes; "
        f"run took {elapsed / 60:.1f} min",
        "",
    ]

    def table(phase: str, metrics: list, vals: dict, extra: dict[str, dict[str, str]] | None = None) -> list[str]:
        present = [c for c in cols if (c in vals or c in b.skipped or (extra and c in extra)) and c not in b.bulk_only]
        head = ["metric", "unit", "better"] + [b.labels.get(c, c) for c in present]
        ratio = "rtunnel" in present and best_ssh is not None
        if ratio:
            head.append(f"rtunnel / {b.labels[best_ssh]}")
        ratio_nd = "rtunnel" in present and nd_ssh is not None and nd_ssh in present
        if ratio_nd:
            head.append("rtunnel / ssh -R +NODELAY")
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key, label, unit, better in metrics:
            cells = []
            for c in present:
                if extra and c in extra and key in extra[c]:
                    cells.append(extra[c][key])
                elif c in b.skipped and c not in vals:
                    cells.append("skipped")
                elif c in b.latency_only and key not in LATENCY_METRICS:
                    cells.append("not measured")
                else:
                    v = vals.get(c, {}).get(key)
                    nfail = len(b.failures.get(c, {}).get(key, []))
                    cells.append(cell(v) + (f" ({nfail} failed)" if nfail else ""))
            if all(x in ("–", "skipped", "not measured") for x in cells):
                continue
            row = [label, unit, {"up": "↑", "down": "↓"}.get(better, "")] + cells
            r = med(vals.get("rtunnel", {}).get(key))
            for shown, other in ((ratio, best_ssh), (ratio_nd, nd_ssh)):
                if shown:
                    s = med(vals.get(other, {}).get(key))
                    row.append(f"{r / s:.2f}×" if r is not None and s else "–")
            rows.append("| " + " | ".join(row) + " |")
        return rows

    lan_table = table("lan", LAN_METRICS, lan)
    if len(lan_table[0].split(" | ")) > 3:  # some column besides the metrics-cost pair
        out += ["## Loopback (LAN)", ""] + lan_table + [""]
    out += metrics_cost_section(b)
    if wan:
        extra: dict[str, dict[str, str]] = {}
        for c in cols:
            if c not in wan and c not in b.skipped:
                continue
            win, src = b.windows.get(c, (None, ""))
            rtt = med(wan.get(c, {}).get("wan_rtt"))
            e: dict[str, str] = {}
            if c == "direct":
                e["wan_window"] = e["wan_bound"] = e["wan_eff"] = "n/a (no tunnel)"
            elif win is None:
                e["wan_window"] = e["wan_bound"] = e["wan_eff"] = "TODO (window unknown)"
            elif rtt:
                bound = win / (rtt / 1000) / MB
                e["wan_window"] = f"{win / 1024:,.0f}"
                e["wan_bound"] = fmt(bound)
                down = med(wan.get(c, {}).get("wan_down1"))
                e["wan_eff"] = f"{100 * down / bound:.0f}" if down else "–"
            extra[c] = e
        out += [
            f"## WAN: {WAN_DELAY_MS:.0f} ms each way (bench/relay.py delay line on the tunnel's own TCP "
            "connection; direct: in front of the site service)",
            "",
        ]
        out += table("wan", WAN_METRICS, wan, extra) + [""]
    out += ["## Notes", ""]
    direct = lan.get("direct", {})
    for metric in ("up1", "down1"):
        tun = {c: med(lan[c].get(metric)) for c in cols if c != "direct" and c in lan and lan[c].get(metric)}
        d = med(direct.get(metric))
        if d and tun:
            best = max(tun, key=lambda c: tun[c] or 0)
            ratio = d / (tun[best] or 1)
            verdict = "load generator is not the bottleneck" if ratio >= 2 else "WARNING: loadgen headroom < 2×"
            out.append(
                f"- Load generator headroom, {metric}: direct TCP {fmt(d)} MB/s = {ratio:.1f}× the fastest "
                f"tunnel ({b.labels[best]}, {fmt(tun[best] or 0)} MB/s): {verdict}."
            )
    for c in cols:
        ti = b.tinfo.get(c, {})
        if "negotiated_cipher" in ti:
            out.append(f"- {b.labels[c]}: negotiated cipher `{ti['negotiated_cipher']}`.")
    for c in cols:
        admin = b.tinfo.get(c, {}).get("admin")
        if admin and c not in b.bulk_only:
            what = "the admin endpoint off" if admin == "--admin none" else "the admin endpoint on, as by default"
            out.append(f"- {b.labels[c]}: server with `{admin}` ({what}; not scraped).")
    if "rtunnel-workers2" in cols and "rtunnel-workers2" not in b.skipped:
        out.append(
            "- rtunnel, --workers 2: the supervisor runs two worker processes on the same tunnel and forward "
            "ports (SO_REUSEPORT); the site holds a session with each and the kernel spreads the forward's "
            "clients over them. The site is still one process (one core), and the load generator shares the "
            "machine's cores: RSS and CPU count the supervisor, both workers and the site."
        )
    for c in cols:
        win, src = b.windows.get(c, (None, ""))
        if win and c not in b.latency_only and c not in b.bulk_only:
            out.append(f"- {b.labels[c]} window: {win:,} bytes ({src}).")
    if "rtunnel-socks" in lan:
        forward = lan.get("rtunnel", {})
        socks = lan["rtunnel-socks"]
        compared = [
            f"{label} {fmt(med(socks.get(key)) or 0)} vs {fmt(med(forward.get(key)) or 0)} {unit}"
            for key, label, unit, _ in LAN_METRICS
            if key in ("rtt_p50", "cseq", "c16") and med(forward.get(key))
        ]
        out.append(
            f"- {b.labels['rtunnel-socks']}: the rtunnel server and site with `--socks`; each connection does the "
            "SOCKS5 CONNECT by name (`127.0.0.1.bench.rtunnel.internal`), counted in its time, and the front "
            "door answers only once the site accepted the stream (one more tunnel round trip than a forward, "
            "which sends early data). RTT and new connections only."
            + (f" Front door vs forward: {'; '.join(compared)}." if compared else "")
        )
    for c in cols:
        if c in b.latency_only and c in lan and c.startswith("ssh"):
            out.append(
                f"- {b.labels[c]}: the same ssh and private sshd as ssh -R aes128-gcm with "
                "`LD_PRELOAD=_bench/nodelay.so` (bench/nodelay.c sets TCP_NODELAY on every TCP socket they "
                "connect or accept). Measured only where Nagle matters (64 B echo RTT, new connections); bulk "
                "throughput, RSS, CPU per GB and WAN are not measured for it (the targets compare those with "
                "ssh as users run it; skipping them keeps the full run under 10 minutes)."
            )
            if "nodelay_check" in b.tinfo.get(c, {}):
                out.append(f"- {b.labels[c]}, shim check at start: {b.tinfo[c]['nodelay_check']}.")
            cseq = med(lan[c].get("cseq"))
            if cseq is not None and cseq < 100:
                out.append(
                    f"- **WARNING**: {b.labels[c]} made only {fmt(cseq)} sequential conn/s, near the "
                    "Nagle-bound ~28/s: the shim may not have taken effect."
                )
    for c, why in b.skipped.items():
        if c not in METRICS_COST_PAIR:  # said in their own section
            out.append(f"- **{b.labels.get(c, c)} skipped**: {why}")
    for c, fails in b.failures.items():
        for metric, errs in fails.items():
            out.append(f"- {b.labels.get(c, c)} {metric}: {len(errs)} failed run(s), first: `{errs[0][:200]}`")
    if best_ssh and "rtunnel" in lan:
        out.append(
            f"- Ratio column: rtunnel median / {b.labels[best_ssh]} median (the faster ssh cipher by "
            "1-stream download); for ↓ rows below 1 is better."
        )
    if nd_ssh and "rtunnel" in lan:
        out.append(
            f'- Ratio column "rtunnel / ssh -R +NODELAY": rtunnel median / {b.labels[nd_ssh]} median, on the '
            "rows measured there; the connection-rate target is against ssh with TCP_NODELAY."
        )
    out.append(
        "- RSS and CPU: tunnel processes only (ssh: client + the private sshd's per-connection children; "
        "rtunnel: both twistd); the load generator and relay are not counted."
    )
    return "\n".join(out) + "\n"


def metrics_cost(b: Bench) -> dict:
    """Per row: the medians of both columns and the difference, scraped against off, in percent.

    ``cost_pct`` is the difference in the direction that is worse (less
    throughput, more CPU or memory), so one threshold fits every row.
    """
    off, on = (b.values["lan"].get(c, {}) for c in METRICS_COST_PAIR)
    rows: dict[str, dict] = {}
    for key, label, unit, better in LAN_METRICS:
        if key not in METRICS_COST_ROWS:
            continue
        a, s = med(off.get(key)), med(on.get(key))
        diff = 100 * (s / a - 1) if a and s is not None else None
        cost = None if diff is None else (-diff if better == "up" else diff)
        rows[key] = {"label": label, "unit": unit, "off": a, "scraped": s, "diff_pct": diff, "cost_pct": cost}
    info = b.tinfo.get(METRICS_COST_PAIR[1], {})
    return {
        "target_pct": METRICS_COST_TARGET_PCT,
        "rows": rows,
        "scrapes_ok": int(info.get("scrapes_ok", 0)),
        "scrapes_failed": int(info.get("scrapes_failed", 0)),
        "scrape_ms_median": float(info["scrape_ms_median"]) if "scrape_ms_median" in info else None,
        "metrics_bytes": int(info.get("metrics_bytes", 0)),
        "scrape_error": info.get("scrape_error", ""),
        "scrape_cpu_ms": float(info["scrape_cpu_ms"]) if "scrape_cpu_ms" in info else None,
        "scrape_cpu_samples": int(info.get("scrape_cpu_samples", 0)),
    }


def metrics_cost_section(b: Bench) -> list[str]:
    """The report's section on the cost of metrics (empty when neither column was selected)."""
    off_key, on_key = METRICS_COST_PAIR
    if off_key not in b.labels and on_key not in b.labels:
        return []
    out = ["## Cost of metrics: admin endpoint scraped every second vs `--admin none`", ""]
    skipped = [f"{b.labels.get(c, c)}: {b.skipped[c]}" for c in METRICS_COST_PAIR if c in b.skipped]
    if skipped:
        return out + [f"Not measured ({'; '.join(skipped)}).", ""]
    cost = metrics_cost(b)
    lan = b.values["lan"]
    head = ["metric", "unit", "better", b.labels[off_key], b.labels[on_key], "difference"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    over = []
    for key, label, unit, better in LAN_METRICS:
        row = cost["rows"].get(key)
        if row is None or (row["off"] is None and row["scraped"] is None):
            continue
        cells = []
        for c in METRICS_COST_PAIR:
            nfail = len(b.failures.get(c, {}).get(key, []))
            cells.append(cell(lan.get(c, {}).get(key)) + (f" ({nfail} failed)" if nfail else ""))
        diff = "–" if row["diff_pct"] is None else f"{row['diff_pct']:+.1f} %"
        if key in METRICS_COST_JUDGED and row["cost_pct"] is not None and row["cost_pct"] >= METRICS_COST_TARGET_PCT:
            over.append(label)
        out.append("| " + " | ".join([label, unit, {"up": "↑", "down": "↓"}[better], *cells, diff]) + " |")
    measured = [k for k in METRICS_COST_JUDGED if cost["rows"].get(k, {}).get("cost_pct") is not None]
    verdict = (
        "no row measured"
        if not measured
        else f"over the {METRICS_COST_TARGET_PCT:g} % target on: {', '.join(over)}"
        if over
        else f"every row within the {METRICS_COST_TARGET_PCT:g} % target"
    )
    scrapes = (
        f"{cost['scrapes_ok']} scrapes of `/metrics` answered (HTTP 200, Prometheus text, "
        f"{cost['metrics_bytes']:,} bytes, median {cost['scrape_ms_median'] or 0:.1f} ms)"
    )
    if cost["scrapes_failed"]:
        scrapes += f"; **{cost['scrapes_failed']} failed**, first: `{cost['scrape_error'][:200]}`"
    out += [
        "",
        f"- Difference: scraped median / off median − 1; for ↑ rows a negative difference is the cost, for ↓ "
        f"rows a positive one. Target: under {METRICS_COST_TARGET_PCT:g} % (idle RSS is shown, not judged): "
        f"{verdict}. Differences inside both columns' min–max ranges are within this run's noise.",
        f"- Both columns: the rtunnel server and site as in the rtunnel column, bulk transfers of the same "
        f"calibrated sizes, interleaved with the other columns; the scraped one fetches `/metrics` once a "
        f"second from a thread of the bench (not counted) while its tunnel is up: {scrapes}.",
    ]
    if cost["scrape_cpu_ms"] is not None:
        share = cost["scrape_cpu_ms"] / 10  # ms of CPU per 1,000 ms, in percent of one core
        samples = cost["scrape_cpu_samples"]
        samples_text = f"{samples} sample{'s' if samples != 1 else ''}"
        out.append(
            f"- Measured on the server's own CPU clock (not drowned by throughput noise): one scrape costs the "
            f"server {cost['scrape_cpu_ms']:.2f} ms of CPU (median of {samples_text} of "
            f"200 back-to-back scrapes on the idle tunnel), so a scrape every second takes {share:.2f} % of one "
            f"core: the most it can take from a transfer that keeps the server's core busy, against the "
            f"{METRICS_COST_TARGET_PCT:g} % target ({'met' if share < METRICS_COST_TARGET_PCT else 'missed'})."
        )
    out.append("")
    return out


def update_docs(md: str) -> None:
    """Replace the marked results section of docs/performance.md (if the markers are there)."""
    if not DOCS_MD.exists():
        return
    text = DOCS_MD.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        return
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    body = "\n".join("##" + ln if ln.startswith("#") else ln for ln in md.splitlines())  # under "## Latest results"
    DOCS_MD.write_text(f"{head}{DOCS_BEGIN}\n{body.strip()}\n{DOCS_END}{tail}")


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="rtunnel benchmark: direct TCP vs ssh -R vs rtunnel", epilog="See docs/performance.md."
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions, short transfers (~1-2 min)")
    ap.add_argument(
        "--only",
        default="direct,ssh,rtunnel",
        help="comma list of: direct, ssh (all ssh columns), ssh-aes128-gcm, ssh-chacha20, "
        "ssh-nodelay (aes128-gcm + TCP_NODELAY via an LD_PRELOAD shim; RTT and new "
        "connections only, LAN only), rtunnel (with rtunnel-socks, rtunnel-admin and "
        "rtunnel-workers), rtunnel-socks (through the SOCKS5 front door by name: RTT and new "
        "connections only, LAN only), rtunnel-admin (the cost of metrics: rtunnel-admin-off "
        "with --admin none and rtunnel-admin-scraped with /metrics fetched every second; bulk "
        "throughput, CPU per GB and idle RSS only, LAN only), rtunnel-workers (the server with "
        "--workers 2 beside the rtunnel column's one process; LAN only)",
    )
    ap.add_argument("--reps", type=int, help="repetitions (default: full 5, quick 2)")
    ap.add_argument("--no-wan", action="store_true", help="skip the 50 ms WAN phase")
    ap.add_argument("--out", type=Path, help="write the Markdown report here")
    args = ap.parse_args(argv)

    mode = "quick" if args.quick else "full"
    plan = dict(PLANS[mode])
    if args.reps:
        plan["reps"] = args.reps
        plan["wan_reps"] = min(plan["wan_reps"], args.reps)
        plan["hold_reps"] = min(plan["hold_reps"], args.reps)
    selection = [s.strip() for s in args.only.split(",") if s.strip()]
    known = {
        "direct",
        "ssh",
        "ssh-aes128-gcm",
        "ssh-chacha20",
        "ssh-nodelay",
        "rtunnel",
        "rtunnel-socks",
        "rtunnel-admin",
        "rtunnel-workers",
    }
    if set(selection) - known:
        ap.error(f"unknown --only names: {sorted(set(selection) - known)}")
    canonical = mode == "full" and not args.reps and args.only == ap.get_default("only")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: blocks
    t_start = time.monotonic()
    load_before = os.getloadavg()[0]
    WORK.mkdir(exist_ok=True)
    build_loadgen()
    if {"ssh", "ssh-nodelay"} & set(selection):
        build_nodelay()
    raise_nofile()
    bench = Bench(plan, args)
    site = None
    try:
        site, site_port = start_site_service()
        log(f"site service (loadgen serve) on 127.0.0.1:{site_port}; mode {mode}, {plan['reps']} reps")
        lan_ts = tunnels.make_tunnels(selection, WORK)
        cols = [t.key for t in lan_ts]
        bench.run_phase("lan", lan_ts, site_port, plan["reps"])
        if not args.no_wan:
            wan_ts = [t for t in tunnels.make_tunnels(selection, WORK, WAN_DELAY_MS) if t.key not in bench.skipped]
            bench.run_phase("wan", wan_ts, site_port, plan["wan_reps"])
    finally:
        if site is not None:
            tunnels.end_process(site)
        tunnels.stop_all_started()

    info = machine_info()
    # Other jobs on these shared 2-core machines move every number; say how busy it was.
    info["load average (1 min)"] = (
        f"{load_before:.2f} before the run, {os.getloadavg()[0]:.2f} at its end "
        f"(includes the bench itself){'; machine was busy before the run' if load_before > 1.0 else ''}"
    )
    md = report(bench, info, mode, cols, time.monotonic() - t_start)
    out = args.out or (RESULTS_MD if canonical else WORK / f"results-{mode}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    (WORK / "last-run.json").write_text(
        json.dumps(
            {
                "mode": mode,
                "plan": plan,
                "machine": info,
                "values": bench.values,
                "failures": bench.failures,
                "skipped": bench.skipped,
                "tunnels": bench.tinfo,
                "sizes": {f"{k[0]}/{k[1]}": v for k, v in bench.sizes.items()},
                "metrics_cost": metrics_cost(bench) if set(METRICS_COST_PAIR) <= set(bench.labels) else None,
            },
            indent=1,
        )
    )
    if canonical:
        update_docs(md)
    print()
    print(md)
    log(
        f"report written to {out.relative_to(REPO) if out.is_relative_to(REPO) else out}"
        + ("; docs/performance.md refreshed" if canonical and DOCS_MD.exists() else "")
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # processes were already ended by main's finally:
        print("\n[bench] interrupted; all started processes ended", file=sys.stderr)
        sys.exit(130)
