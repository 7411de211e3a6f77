"""
C{rtunnel sites list} with live figures from the server's admin endpoint
(L{rtunnel.observe.live}), and its fallback to the state database alone.

The admin endpoint is played by a small HTTP server on loopback in a
thread, answering what the JSON API would; the server process is "running"
because this test process records itself as the server (as
test_admin_cli does).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rtunnel.cli import admin
from rtunnel.observe.live import (
    ADMIN_URL_KEY,
    LiveUnavailable,
    fetch_sites,
    format_admin_url,
    merge_sites,
    replica_url_key,
)
from tests.test_admin_cli import NOW, _CLITestCase

LIVE = ("streams", "bytes_to_site", "bytes_from_site", "rtt_seconds")

SITES: dict[str, Any] = {
    "generated": "2030-01-02T03:04:05Z",
    "sites": [
        {
            "site": "alpha",
            "connected": True,
            "enrolled": True,
            "revoked": False,
            "since": "2030-01-02T03:04:05Z",
            "peer": "198.51.100.4:50000",
            "services": {},
            "streams": 3,
            "bytes_to_site": 1536,
            "bytes_from_site": 5 * 1024 * 1024,
            "rtt_seconds": 0.0123,
            "last_refusal": None,
        }
    ],
}


class FakeAdmin:
    """An HTTP server on loopback answering every GET with C{respond(path)}."""

    def __init__(self, respond: Callable[[str], tuple[int, bytes]]) -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.paths.append(self.path)
                status, body = respond(self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class LiveSitesTests(_CLITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.enroll("alpha")
        self.create_keyfile("beta")  # pending: the server reports no figures for it
        self.server = self.open_state()
        self.server.store.record_server_start(os.getpid(), NOW)
        self.server.store.mark_connected("alpha", "198.51.100.4:50000", NOW)

    def serve(self, respond: Callable[[str], tuple[int, bytes]]) -> FakeAdmin:
        fake = FakeAdmin(respond)
        self.addCleanup(fake.close)
        self.server.store.set_meta(ADMIN_URL_KEY, fake.url)
        return fake

    def test_table_with_live_columns(self) -> None:
        """
        When the recorded admin URL answers, the table gains STREAMS, BYTES
        (to the site / from it, in short binary units) and RTT before
        CONNECTED, dashes for a site the server does not report, and
        nothing is said on stderr.
        """
        fake = self.serve(lambda path: (200, json.dumps(SITES).encode()))
        status, out, err = self.run_cli("sites", "list", "--state", str(self.state))
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(fake.paths, ["/api/v1/sites"])
        header, alpha, beta = out.splitlines()
        self.assertEqual(
            header.split(),
            ["SITE", "ENROLLED", "REVOKED", "SERVICES", "STREAMS", "BYTES", "RTT", "REPLICAS", "CONNECTED"],
        )
        self.assertEqual(alpha.split()[6:9], ["3", "1.5K/5.0M", "12.3ms"])
        self.assertIn("yes, from 198.51.100.4:50000 since 2030-01-02 03:04:05 UTC", alpha)
        self.assertEqual(beta.split()[-4:], ["-", "-", "-", "no"])
        # the columns line up: each cell starts where its header does
        self.assertEqual(alpha.index("1.5K/5.0M"), header.index("BYTES"))
        self.assertEqual(beta.index("no", header.index("CONNECTED")), header.index("CONNECTED"))

    def test_json_with_live_fields(self) -> None:
        """--json adds streams, bytes each way and RTT to each site; null for a site without figures."""
        self.serve(lambda path: (200, json.dumps(SITES).encode()))
        status, out, err = self.run_cli("sites", "list", "--state", str(self.state), "--json")
        self.assertEqual((status, err), (0, ""))
        alpha, beta = json.loads(out)
        self.assertEqual(
            {k: alpha[k] for k in LIVE},
            {"streams": 3, "bytes_to_site": 1536, "bytes_from_site": 5 * 1024 * 1024, "rtt_seconds": 0.0123},
        )
        self.assertEqual(alpha["peer"], "198.51.100.4:50000")  # the database's fields stay as they were
        self.assertEqual(alpha["name"], "alpha")
        self.assertEqual([beta[k] for k in LIVE], [None] * 4)

    def assertFallback(self, fragment: str) -> None:
        """The table and --json fall back to the database and say why in one line on stderr."""
        status, out, err = self.run_cli("sites", "list", "--state", str(self.state))
        self.assertEqual(status, 0)
        self.assertEqual(
            out.splitlines()[0].split(), ["SITE", "ENROLLED", "REVOKED", "SERVICES", "REPLICAS", "CONNECTED"]
        )
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.startswith("rtunnel: no live figures: "), err)
        self.assertIn(fragment, err)
        self.assertTrue(err.rstrip().endswith("listing the state database alone"), err)
        status, out, err_json = self.run_cli("sites", "list", "--state", str(self.state), "--json")
        self.assertEqual((status, err_json), (0, err))
        for entry in json.loads(out):
            self.assertEqual(
                [entry[k] for k in ("streams", "bytes_to_site", "bytes_from_site", "rtt_seconds")], [None] * 4
            )

    def test_refused(self) -> None:
        """A recorded URL where nothing listens: the line names the URL and the refusal."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server.store.set_meta(ADMIN_URL_KEY, f"http://127.0.0.1:{port}")
        self.assertFallback(f"http://127.0.0.1:{port}/api/v1/sites: connection refused")

    def test_timeout(self) -> None:
        """An endpoint that accepts and never answers costs at most the timeout, then the fallback."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        self.patch(admin, "LIVE_TIMEOUT", 0.2)
        self.server.store.set_meta(ADMIN_URL_KEY, f"http://127.0.0.1:{listener.getsockname()[1]}")
        self.assertFallback("no answer within 0.2s")

    def test_error_status_and_garbage(self) -> None:
        """An error status, or a body that is not the sites API, is no live figures either."""
        fake = self.serve(lambda path: (503, b'{"error": "busy"}'))
        self.assertFallback(f"{fake.url}/api/v1/sites: it answered 503")
        self.serve(lambda path: (200, b"<html>not json</html>"))
        self.assertFallback("its answer is not the sites list of the JSON API")
        self.serve(lambda path: (200, b'{"sites": [{"name": "x"}]}'))
        self.assertFallback("its answer is not the sites list of the JSON API")

    def test_admin_off(self) -> None:
        """A running server that recorded no admin URL (or cleared it): the line says so."""
        self.assertFallback("the running tunnel server has no admin endpoint (--admin none)")
        self.server.store.set_meta(ADMIN_URL_KEY, "")
        self.assertFallback("has no admin endpoint")

    def test_server_not_running(self) -> None:
        """A server that is not running is not asked, even if a URL was left behind (killed)."""
        fake = self.serve(lambda path: (200, json.dumps(SITES).encode()))
        self.server.store.record_server_stop(NOW)
        self.assertFallback("the tunnel server is not running")
        self.assertEqual(fake.paths, [])

    def test_replicas_each_asked_and_summed(self) -> None:
        """
        With several live replicas, each one's own admin URL is asked and a
        site's streams and bytes are the sum of its sessions, its RTT the
        best; a replica that does not answer is named on stderr while the
        others' figures are shown; a replica's URL cleared (it stopped) is
        not asked, and the shared URL another replica wrote last stays.
        """
        other = json.loads(json.dumps(SITES))
        other["sites"][0].update(streams=2, bytes_to_site=100, bytes_from_site=200, rtt_seconds=0.005)
        first = self.serve(lambda path: (200, json.dumps(SITES).encode()))
        second = FakeAdmin(lambda path: (200, json.dumps(other).encode()))
        self.addCleanup(second.close)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        store = self.server.store
        for replica, url in (("r1", first.url), ("r2", second.url), ("r3", dead)):
            store.replica_started(replica, "", os.getpid(), "cloud", NOW)
            store.set_meta(replica_url_key(replica), url)
        status, out, err = self.run_cli("sites", "list", "--state", str(self.state))
        self.assertEqual(status, 0)
        self.assertEqual(
            err,
            f"rtunnel: live figures incomplete: only 2 of 3 replicas answered "
            f"({dead}/api/v1/sites: connection refused)\n",
        )
        alpha = out.splitlines()[1]
        self.assertEqual(alpha.split()[6:9], ["5", "1.6K/5.0M", "5.0ms"])
        self.assertEqual((first.paths, second.paths), (["/api/v1/sites"], ["/api/v1/sites"]))
        # r3 stops: it clears its own URL and only that; the shared one is first's.
        store.set_meta(ADMIN_URL_KEY, first.url)
        store.set_meta(replica_url_key("r3"), "")
        self.assertFalse(store.clear_meta_if(ADMIN_URL_KEY, dead))
        self.assertEqual(store.get_meta(ADMIN_URL_KEY), first.url)
        status, out, err = self.run_cli("sites", "list", "--state", str(self.state), "--json")
        self.assertEqual((status, err), (0, ""))
        [entry] = [e for e in json.loads(out) if e["name"] == "alpha"]
        self.assertEqual(
            {k: entry[k] for k in LIVE},
            {"streams": 5, "bytes_to_site": 1636, "bytes_from_site": 5 * 1024 * 1024 + 200, "rtt_seconds": 0.005},
        )
        self.assertTrue(store.clear_meta_if(ADMIN_URL_KEY, first.url))
        self.assertEqual(store.get_meta(ADMIN_URL_KEY), "")


class MergeTests(_CLITestCase):
    def test_merge_sites(self) -> None:
        """Sums of what the replicas report, the best RTT, None where none reported."""
        merged = merge_sites(
            [
                {"a": {"streams": 1, "bytes_to_site": 10, "bytes_from_site": 20, "rtt_seconds": None}},
                {"a": {"streams": 2, "bytes_to_site": 1, "bytes_from_site": 2, "rtt_seconds": 0.2}, "b": {}},
                {"a": {"streams": None, "rtt_seconds": 0.1}},
            ]
        )
        self.assertEqual(
            merged,
            {
                "a": {"streams": 3, "bytes_to_site": 11, "bytes_from_site": 22, "rtt_seconds": 0.1},
                "b": {"streams": None, "bytes_to_site": None, "bytes_from_site": None, "rtt_seconds": None},
            },
        )


class FetchTests(_CLITestCase):
    def test_unusable_url(self) -> None:
        """A recorded URL of another scheme is refused with the reason, never fetched."""
        for url in ("ftp://127.0.0.1:21", "http://", "http://127.0.0.1:notaport"):
            with self.assertRaises(LiveUnavailable) as raised:
                fetch_sites(url, 0.5)
            self.assertIn(repr(url), str(raised.exception))

    def test_unix_socket(self) -> None:
        """An admin endpoint on a unix socket (unix:PATH) is asked over that socket."""
        path = os.path.join(self.mktemp() + "-s")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.listen(1)
        body = json.dumps(SITES).encode()

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        sites = fetch_sites(f"unix:{path}", 2.0)
        thread.join(5)
        self.assertEqual(list(sites), ["alpha"])
        self.assertEqual(sites["alpha"]["streams"], 3)

    def test_format_admin_url(self) -> None:
        """Every-interface binds are reached on loopback; IPv6 goes in brackets."""
        self.assertEqual(format_admin_url("http", "0.0.0.0", 5501), "http://127.0.0.1:5501")
        self.assertEqual(format_admin_url("http", "::", 5501), "http://[::1]:5501")
        self.assertEqual(format_admin_url("https", "192.0.2.7", 443), "https://192.0.2.7:443")
        self.assertEqual(format_admin_url("http", "::1", 80), "http://[::1]:80")
