"""
End to end, in a real browser: a tunnel server (real twistd, its admin
endpoint on a loopback port) and two sites; the status page opened in
Debian's headless chromium through chromedriver shows both sites up, then
one of them down within 5 s of it stopping, asks for the throughput history
of the rows it draws only every sample interval (the plain list in between,
the graphs kept),
gets an empty answer for the favicon, logs no error at all, and says it is
stale when the server is gone. A screenshot is saved as a test artifact
(directory C{$RTUNNEL_ARTIFACTS}, default C{test-artifacts/} in the
repository).

Only Debian's browser and driver are used, by their paths: selenium is
never left to look for (or download) a driver of its own.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rtunnel.identity.state import DATABASE
from rtunnel.identity.store import StateStore
from rtunnel.observe.live import ADMIN_URL_KEY
from tests.e2e_support import EchoServer, closed_port, read_until_closed
from tools.harness import ROOT, Deployment, free_port, wait_until

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
NEEDS = (
    "needs Debian's chromium and chromium-driver: make test installs them (apt-get install chromium chromium-driver)"
)


def artifacts() -> Path:
    path = Path(os.environ.get("RTUNNEL_ARTIFACTS") or ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(NEEDS)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # With both paths given selenium has nothing to look for; offline mode
    # makes sure its manager would not reach out even if it were asked.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def admin_url(d: Deployment) -> str:
    """Where the server's admin endpoint answers, as the server recorded it in its state database."""
    found: list[str] = []

    def recorded() -> bool:
        store = StateStore(d.server_state / DATABASE, create=False)
        try:
            found[:] = [store.get_meta(ADMIN_URL_KEY) or ""]
        finally:
            store.close()
        return bool(found[0])

    wait_until(recorded, 30, "the server to record its admin URL")
    return found[0]


def rows(driver: Any) -> dict[str, str]:
    """Each site row on the page: name -> state shown (one round trip to the browser)."""
    states: dict[str, str] = driver.execute_script(
        "return Object.fromEntries(Array.from(document.querySelectorAll('#sites tr[data-site]'),"
        " (tr) => [tr.dataset.site, tr.dataset.state]));"
    )
    return states


#: The start times (ms) of the page's fetches of each API path so far, how
#: many plain sites fetches started after the last history fetch, and the
#: names each history fetch asked for.
FETCHES = """
const entries = performance.getEntriesByType("resource");
const starts = (test) => entries.filter((e) => test(new URL(e.name))).map((e) => e.startTime);
const sites = (u) => u.pathname === "/api/v1/sites";
const history = starts((u) => sites(u) && u.searchParams.get("history") === "1");
const plain = starts((u) => sites(u) && !u.search);
const last = history.length ? history[history.length - 1] : Infinity;
const names = entries.map((e) => new URL(e.name)).filter((u) => sites(u) && u.searchParams.has("names"))
  .map((u) => u.searchParams.get("names"));
return {history, plain, names, forwards: starts((u) => u.pathname === "/api/v1/forwards"),
        plain_since_history: plain.filter((t) => t > last).length};
"""

#: Whether the row of the site named by the argument has its graph.
GRAPH = "return document.querySelector(`#sites tr[data-site='${arguments[0]}'] svg.spark`) !== null;"

#: The status of a GET of the argument, from the page.
FETCH_STATUS = """
const done = arguments[arguments.length - 1];
fetch(arguments[0], {cache: "no-store"}).then((r) => done(r.status), (e) => done(String(e)));
"""


def fetched(driver: Any) -> dict[str, Any]:
    found: dict[str, Any] = driver.execute_script(FETCHES)
    return found


def fresh(driver: Any) -> str | None:
    value: str | None = driver.execute_script("return document.body.dataset.fresh || null;")
    return value


def test_status_page_shows_sites_turn_down_and_goes_stale(tmp_path: Path, browser: Any) -> None:
    echo = EchoServer()
    d = Deployment(tmp_path)
    through, refused = free_port(), free_port()
    try:
        d.start_server(
            forwards=[
                f"127.0.0.1:{through}:alpha:127.0.0.1:{echo.port}",
                f"127.0.0.1:{refused}:beta:127.0.0.1:{closed_port()}",
            ]
        )
        sites = {
            name: d.start_site(name, allow=[echo.target], keyfile=d.create_keyfile(name)) for name in ("alpha", "beta")
        }
        for name, process in sites.items():
            d.wait_connected(name, watch=process)
        # Some traffic for the graph, and a stream the site refuses for the refusals.
        with socket.create_connection(("127.0.0.1", through), timeout=10) as s:
            s.sendall(os.urandom(512 * 1024))
            s.shutdown(socket.SHUT_WR)
            data, ended = read_until_closed(s, timeout=30)
        assert ended and len(data) == 512 * 1024
        with socket.create_connection(("127.0.0.1", refused), timeout=10) as s:
            read_until_closed(s, timeout=10)

        url = admin_url(d)
        browser.get(url + "/")
        wait_until(lambda: rows(browser) == {"alpha": "up", "beta": "up"}, 10, "both sites shown up")
        assert fresh(browser) == "yes"
        assert browser.title == "rtunnel status"
        forwards = browser.find_element("id", "forwards").text
        assert f"127.0.0.1:{through}:alpha:127.0.0.1:{echo.port}" in forwards
        assert "listening" in forwards

        sites["beta"].signal(signal.SIGTERM)
        stopped = time.monotonic()
        wait_until(lambda: rows(browser).get("beta") == "down", 5, "beta shown down within 5 s of its stop")
        took = time.monotonic() - stopped
        assert sites["beta"].wait(15) == 0
        assert rows(browser) == {"alpha": "up", "beta": "down"}
        summary = browser.find_element("id", "summary").text
        assert summary.startswith("2 sites: 1 up, 1 down"), summary
        browser.save_screenshot(str(artifacts() / "status-page.png"))
        print(f"beta shown down {took:.2f} s after SIGTERM")

        # The history is asked for only when the server can have a new
        # sample (every 5 s), and only for the rows drawn; the plain list on
        # the refreshes between; the graphs stay drawn from the last history
        # read.
        wait_until(lambda: len(fetched(browser)["history"]) >= 2, 15, "the page to ask for the history twice")
        wait_until(lambda: fetched(browser)["plain_since_history"] >= 1, 5, "a plain refresh after the history")
        times = fetched(browser)
        gaps = [b - a for a, b in zip(times["history"], times["history"][1:], strict=False)]
        assert min(gaps) >= 4900, times
        assert len(times["plain"]) >= len(times["history"]), times
        assert abs(len(times["plain"]) + len(times["history"]) - len(times["forwards"])) <= 1, times
        assert times["names"] and all(sorted(n.split(",")) == ["alpha", "beta"] for n in times["names"]), times
        assert browser.execute_script(GRAPH, "alpha"), "alpha's graph is gone after a refresh without history"
        print(f"history fetched {len(times['history'])} times {gaps} ms apart, the plain list {len(times['plain'])}")

        # The favicon a browser asks for is an empty answer, not a 404.
        assert browser.execute_async_script(FETCH_STATUS, "/favicon.ico") == 204

        # Nothing blocked by the page's policy, no script error, no failed fetch.
        log = browser.get_log("browser")
        problems = [e for e in log if e["level"] == "SEVERE"]
        assert problems == [], problems

        assert d.server is not None
        assert d.server.stop() == 0
        wait_until(lambda: fresh(browser) == "no", 10, "the page to say it is stale once the server is gone")
        assert browser.find_element("id", "status").text.startswith("stale: no answer for")
        assert rows(browser) == {"alpha": "up", "beta": "down"}, "the last figures stay on the page"
        browser.save_screenshot(str(artifacts() / "status-page-stale.png"))
    finally:
        statuses = d.stop_all()
        echo.close()
    assert statuses == {"server": 0, "site-alpha": 0, "site-beta": 0}, statuses
