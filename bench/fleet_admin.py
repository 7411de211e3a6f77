"""The admin-endpoint phase of the fleet benchmark (bench/fleet.py): scrapes at scale.

Issue 12 set its target with 1,000 sites: a ``/metrics`` scrape stays under 1 s.
With every site of the fleet connected, the orchestrator here times a few
scrapes of ``/metrics`` and ``/api/v1/sites`` and one of
``/api/v1/sites?history=1`` over plain HTTP/1.1 (urllib, one connection per
request, no compression: what ``curl`` sees; a Prometheus server asks for gzip,
which costs the server more CPU and the wire fewer bytes), and checks what the
pages say against what the drivers know: the scrape must count all N sites
connected.  Scraping these pages at scale is what the counters and their
formatting cost; the rest of the endpoint (probes, the status page's HTML)
does not grow with the fleet.

Nothing here talks to the drivers or the server process: fleet.py passes the
URL and a CPU reader, and gets plain dicts for its results and its report.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

__all__ = [
    "ECHO_SCRAPES",
    "SCRAPES",
    "TARGET_S",
    "TIMEOUT_S",
    "Background",
    "fetch",
    "metrics_figures",
    "report_rows",
    "scrape_series",
    "sites_figures",
    "summary",
]

#: Timed scrapes of /metrics and of /api/v1/sites each (/api/v1/sites?history=1: one).
SCRAPES = 5
#: Scrapes of /metrics and of ?history=1 with echoes through the forwards alongside.
ECHO_SCRAPES = 3
#: Seconds one request may wait on its socket (urllib's timeout, per operation).
TIMEOUT_S = 60.0
#: Issue 12: a scrape under 1 s, set for 1,000 sites.
TARGET_S = 1.0

#: The pages and how often each is timed, in the order they run.
PAGES: tuple[tuple[str, str, int], ...] = (
    ("metrics", "/metrics", SCRAPES),
    ("sites", "/api/v1/sites", SCRAPES),
    ("history", "/api/v1/sites?history=1", 1),
)

# No proxy, whatever http_proxy says: the server is on loopback in this
# process's own network namespace, and a proxy would time itself, not rtunnel.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

#: What a failed request raises: URLError and timeouts are OSErrors; a cut or
#: malformed response is an HTTPException.
FetchError = (OSError, http.client.HTTPException)


def fetch(url: str, timeout: float = TIMEOUT_S) -> tuple[bytes, float]:
    """GET ``url``: the body and the seconds from the request to the body's last byte."""
    start = time.perf_counter()
    with _OPENER.open(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body, time.perf_counter() - start


def scrape_series(url: str, count: int, deadline: float, cpu: Callable[[], float]) -> tuple[dict[str, Any], bytes]:
    """Time ``count`` sequential GETs of ``url`` (fewer if the monotonic ``deadline`` passes).

    ``cpu`` reads the server's CPU seconds so far; the difference over the
    series is the server's work for it (with the idle work it did meanwhile).
    Returns the figures and the last body that arrived (``b""`` if none).
    """
    times: list[float] = []
    sizes: list[int] = []
    errors: list[str] = []
    body = b""
    c0, t0 = cpu(), time.monotonic()
    for i in range(count):
        if time.monotonic() > deadline:
            errors.append(f"time limit reached after {i} scrapes")
            break
        try:
            got, secs = fetch(url)
        except FetchError as e:
            errors.append(f"scrape {i}: {e!r}")
            continue
        body = got
        times.append(secs)
        sizes.append(len(got))
    c1, t1 = cpu(), time.monotonic()
    figures: dict[str, Any] = {
        "url": url,
        "count": len(times),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "bytes": sizes[-1] if sizes else None,
        "bytes_each": sizes,
        "seconds_each": times,
        "median_s": statistics.median(times) if times else None,
        "max_s": max(times) if times else None,
        "wall_s": t1 - t0,
        "server_cpu_s": c1 - c0,
        "server_cpu_s_per_scrape": (c1 - c0) / len(times) if times else None,
    }
    return figures, body


class Background:
    """One GET of a URL in a thread, so that the caller can do something else meanwhile."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.body = b""
        self.seconds: float | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="fleet-scrape", daemon=True)

    def _run(self) -> None:
        try:
            self.body, self.seconds = fetch(self.url)
        except FetchError as e:
            self.error = repr(e)

    def start(self) -> None:
        self._thread.start()

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def metrics_figures(body: bytes) -> dict[str, Any]:
    """What a /metrics scrape says about the fleet, parsed by prometheus_client's own parser.

    A malformed exposition raises ValueError (the parser's); a missing
    family gives ``None`` for its figure.
    """
    from prometheus_client.parser import text_string_to_metric_families

    families = 0
    samples = 0
    connected: float | None = None
    up_total = 0.0
    up_series = 0
    rtt_series = 0
    for family in text_string_to_metric_families(body.decode("utf-8")):
        families += 1
        samples += len(family.samples)
        if family.name == "rtunnel_sites_connected":
            connected = family.samples[0].value if family.samples else None
        elif family.name == "rtunnel_site_up":
            up_series = len(family.samples)
            up_total = sum(s.value for s in family.samples)
        elif family.name == "rtunnel_site_rtt_seconds":
            rtt_series = len(family.samples)
    return {
        "families": families,
        "samples": samples,
        "sites_connected": connected,
        "site_up_series": up_series,
        "site_up_sum": up_total,
        "site_rtt_series": rtt_series,
    }


def sites_figures(body: bytes) -> dict[str, Any]:
    """What /api/v1/sites (with or without ``?history=1``) says: sites listed, connected, with a throughput."""
    doc = json.loads(body)
    sites = doc["sites"]
    return {
        "sites": len(sites),
        "connected": sum(1 for s in sites if s.get("connected")),
        "with_throughput": sum(1 for s in sites if s.get("throughput") is not None),
    }


def summary(ph: dict[str, Any]) -> str:
    """One console line for the phase."""
    parts = []
    for label, path, _ in PAGES:
        s = ph["scrapes"].get(label)
        if not s or not s["count"]:
            parts.append(f"{path}: no answer ({s and s['first_error']})")
            continue
        parts.append(
            f"{path} {s['bytes'] / 1024:,.0f} KiB, median {1000 * s['median_s']:.0f} ms, max "
            f"{1000 * s['max_s']:.0f} ms of {s['count']}, server CPU {1000 * s['server_cpu_s_per_scrape']:.0f} ms each"
        )
    m = ph.get("metrics") or {}
    during = ph.get("during", {}).get("metrics") or {}
    return (
        "; ".join(parts)
        + f"; rtunnel_sites_connected {_count(m.get('sites_connected'))} of {ph['n']:,}"
        + (
            f"; echoes during {during['scrapes']} /metrics scrapes: {during['count']}, max {during['max_ms']:.1f} ms"
            if during.get("count")
            else ""
        )
    )


def _count(x: float | None) -> str:
    return "missing" if x is None else f"{x:,.0f}"


def _ms(x: float | None) -> str:
    if x is None:
        return "–"
    if x < 0.1:
        return f"{1000 * x:.1f} ms"
    return f"{1000 * x:.0f} ms" if x < 1 else f"{x:,.2f} s"


def _size(x: int | None) -> str:
    if x is None:
        return "–"
    return f"{x / 2**20:,.2f} MiB" if x >= 2**20 else f"{x / 1024:,.0f} KiB"


def _verdict(x: float | None) -> str:
    if x is None:
        return ""
    return " (met)" if x < TARGET_S else " (**not met**)"


def report_rows(phases: dict[int, dict[str, Any]], ns: list[int]) -> list[str]:
    """The Markdown table of the admin phase: one column per N (``phases[n]`` is ``{}`` where it did not run)."""
    rows: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = []
    for label, path, count in PAGES:
        timed = f"median / max of {count}" if count > 1 else "one scrape"
        target = f"< {TARGET_S:.0f} s (issue 12, set at N = 1,000)" if label == "metrics" else "–"
        rows += [
            (f"`{path}`: size", "–", _size_cell(label)),
            (f"`{path}`: wall time, {timed}", target, _time_cell(label)),
            (f"`{path}`: server CPU per scrape", "–", _cpu_cell(label)),
        ]
    rows += [
        (
            "`rtunnel_sites_connected` in the scrape",
            "= N",
            lambda ph: _count_check(ph["metrics"]["sites_connected"], ph["n"]),
        ),
        (
            "connect + 64 B echo + close during `/metrics` scrapes: max",
            "–",
            lambda ph: _during(ph["during"]["metrics"]),
        ),
        (
            "connect + 64 B echo + close during `/api/v1/sites?history=1` scrapes: max",
            "–",
            lambda ph: _during(ph["during"]["history"]),
        ),
    ]
    head = ["scrape, all N sites connected", "target"] + [f"N = {n:,}" for n in ns]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, target, get_cell in rows:
        cells = []
        for n in ns:
            try:
                cells.append(get_cell(phases[n]))
            except (KeyError, TypeError):
                cells.append("–")
        out.append("| " + " | ".join([label, target, *cells]) + " |")
    return out + [""]


def _size_cell(label: str) -> Callable[[dict[str, Any]], str]:
    def cell(ph: dict[str, Any]) -> str:
        return _size(ph["scrapes"][label]["bytes"])

    return cell


def _time_cell(label: str) -> Callable[[dict[str, Any]], str]:
    def cell(ph: dict[str, Any]) -> str:
        sc = ph["scrapes"][label]
        text = f"{_ms(sc['median_s'])} / {_ms(sc['max_s'])}" if sc["count"] > 1 else _ms(sc["max_s"])
        if label == "metrics":
            text += _verdict(sc["max_s"])
        return text + (f", {sc['errors']} failed" if sc["errors"] else "")

    return cell


def _cpu_cell(label: str) -> Callable[[dict[str, Any]], str]:
    def cell(ph: dict[str, Any]) -> str:
        return _ms(ph["scrapes"][label]["server_cpu_s_per_scrape"])

    return cell


def _count_check(value: float | None, n: int) -> str:
    if value is None:
        return "**missing**"
    return f"{value:,.0f} (= N)" if value == n else f"**{value:,.0f} ≠ {n:,}**"


def _during(d: dict[str, Any]) -> str:
    if not d.get("count"):
        return "no echo completed" + (f" ({d['first_error']})" if d.get("first_error") else "")
    return f"{d['max_ms']:,.1f} ms (p50 {d['p50_ms']:,.2f} ms of {d['count']} over {d['scrapes']} scrapes)"
