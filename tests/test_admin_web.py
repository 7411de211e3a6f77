"""
The admin endpoint's HTTP side (L{rtunnel.observe.web}): paths, health and
readiness, read-only, bounded connections, idle timeout, dropped bodies,
C{--admin} parsing, the recorded URL, metrics gathered on the reactor.

Most of it runs a real L{AdminSite} on in-memory transports with a
L{Clock}; the metrics resource of prometheus_client runs its WSGI app in
the global reactor's thread pool, so its test listens on loopback with
the real reactor.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from rtunnel.cli import server_tap, site_tap
from rtunnel.logs import current_level, set_level
from rtunnel.observe import web
from rtunnel.observe.live import ADMIN_URL_KEY, replica_url_key
from rtunnel.observe.page import status_page
from rtunnel.observe.web import (
    ABORT_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_REQUEST_BODY,
    MISDIRECTED,
    AdminChannel,
    AdminEndpointError,
    AdminService,
    AdminSite,
    OnReactor,
    admin_endpoint,
    admin_option,
    admin_root,
    admin_url,
    exposed_interface,
    host_checked,
    local_host,
    metrics_resource,
    site_not_ready,
)
from rtunnel.roles.site import SitePolicy
from rtunnel.services import ServerConfig, SiteConfig, build_server_service, build_site_service
from tests.roles_helpers import ServerFixture

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class LogCapture:
    def __init__(self, case: unittest.SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, containing: str) -> list[str]:
        return [t for t in (formatEvent(e) for e in self.events) if containing in t]


class FakeMetrics(Resource):
    """Stands in for /metrics where prometheus_client's thread-pool resource cannot run (a Clock)."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4")
        return b"fake_metric 1\n"


class Response:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status.split()[1])
        self.reason = status.split(" ", 2)[2]
        self.headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        if self.headers.get("transfer-encoding") == "chunked":
            self.body = _unchunk(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


class Endpoint:
    """An L{AdminSite} on a Clock, driven through in-memory connections."""

    def __init__(self, ready: Callable[[], str | None] = lambda: None, page: bool = False, **kwargs: Any) -> None:
        self.clock = Clock()
        self.ready_calls = 0

        def check() -> str | None:
            self.ready_calls += 1
            return ready()

        self.root = admin_root(
            ready=check,
            metrics=FakeMetrics(),
            api=FakeMetrics() if page else None,
            page=status_page() if page else None,
        )
        self.site = AdminSite(self.root, self.clock, **kwargs)
        self.site.doStart()

    def connect(self) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(PEER)
        assert channel is not None
        transport = StringTransport(peerAddress=PEER)
        channel.makeConnection(transport)
        return channel, transport

    def request(
        self, method: str, path: str, body: bytes = b"", headers: str = "", host: str = "127.0.0.1:5501"
    ) -> Response:
        channel, transport = self.connect()
        length = f"Content-Length: {len(body)}\r\n" if body else ""
        channel.dataReceived(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{length}{headers}\r\n".encode() + body)
        return Response(transport.value())


class PathsTests(unittest.SynchronousTestCase):
    def test_healthz(self) -> None:
        """/healthz: 200 ok, plain text, never cached."""
        response = Endpoint().request("GET", "/healthz")
        self.assertEqual((response.status, response.body), (200, b"ok\n"))
        self.assertEqual(response.header("Content-Type"), "text/plain; charset=utf-8")
        self.assertEqual(response.header("Cache-Control"), "no-store")

    def test_readyz(self) -> None:
        """/readyz: 200 ready when the check has no reason, else 503 and the reason on one line."""
        ready = Endpoint().request("GET", "/readyz")
        self.assertEqual((ready.status, ready.body), (200, b"ready\n"))
        reason = "tunnel listener not up\n  yet"
        response = Endpoint(ready=lambda: reason).request("GET", "/readyz")
        self.assertEqual((response.status, response.body), (503, b"not ready: tunnel listener not up yet\n"))
        self.assertEqual(response.header("Cache-Control"), "no-store")

    def test_readyz_asks_each_time(self) -> None:
        """Readiness is judged per request, not cached: a probe sees a change at once."""
        state: list[str | None] = ["starting"]
        endpoint = Endpoint(ready=lambda: state[0])
        self.assertEqual(endpoint.request("GET", "/readyz").status, 503)
        state[0] = None
        self.assertEqual(endpoint.request("GET", "/readyz").status, 200)
        self.assertEqual(endpoint.ready_calls, 2)

    def test_head(self) -> None:
        """HEAD answers the status and headers of GET without a body."""
        response = Endpoint(ready=lambda: "down").request("HEAD", "/readyz")
        self.assertEqual((response.status, response.body), (503, b""))
        response = Endpoint().request("HEAD", "/healthz")
        self.assertEqual((response.status, response.body), (200, b""))

    def test_unknown_paths(self) -> None:
        """Without a status page (the site role), / and unknown paths are a plain 404 naming the paths."""
        endpoint = Endpoint()
        for path in ("/", "/nope", "/api/v1/sites"):
            response = endpoint.request("GET", path)
            self.assertEqual(response.status, 404, path)
            self.assertIn(b"/metrics, /healthz, /readyz", response.body, path)
        self.assertEqual(endpoint.request("GET", "/healthz/extra").body, b"no such path '/healthz/extra'\n")
        self.assertEqual(endpoint.request("GET", "/healthz/").status, 200)

    def test_server_paths(self) -> None:
        """With the status page, / is the page and /api, /metrics, /healthz, /readyz its children."""
        endpoint = Endpoint(page=True)
        page = endpoint.request("GET", "/")
        self.assertEqual(page.status, 200)
        self.assertTrue(
            page.header(
                "Content-Type",
            ).startswith("text/html")
        )  # type: ignore[union-attr]
        self.assertEqual(endpoint.request("GET", "/api/v1/sites").body, b"fake_metric 1\n")
        self.assertEqual(endpoint.request("GET", "/metrics").body, b"fake_metric 1\n")
        self.assertEqual(endpoint.request("GET", "/healthz").body, b"ok\n")
        self.assertEqual(endpoint.request("GET", "/nope").status, 404)

    def test_favicon(self) -> None:
        """
        /favicon.ico, which browsers ask for unprompted, is an empty 204 on
        both roles (with and without the status page as the root), so the
        browser's console shows no 404; nothing below it is a page.
        """
        for page in (True, False):
            endpoint = Endpoint(page=page)
            for method in ("GET", "HEAD"):
                response = endpoint.request(method, "/favicon.ico")
                self.assertEqual((response.status, response.body), (204, b""), (page, method))
                self.assertEqual(response.header("Cache-Control"), "max-age=86400")
            self.assertEqual(endpoint.request("GET", "/favicon.ico/x").status, 404, page)


class ReadOnlyTests(unittest.SynchronousTestCase):
    def test_other_methods_refused(self) -> None:
        """
        Anything but GET and HEAD is 405 with Allow, before any resource
        runs (the readiness check is never asked), on every path.
        """
        endpoint = Endpoint()
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"):
            for path in ("/readyz", "/metrics", "/", "/nope"):
                response = endpoint.request(method, path, body=b"x=1" if method != "TRACE" else b"")
                self.assertEqual(response.status, 405, (method, path))
                self.assertEqual(response.header("Allow"), "GET, HEAD")
                self.assertEqual(
                    response.body,
                    f"method {method} is not allowed: the admin endpoint is read-only (GET, HEAD)\n".encode(),
                )
        self.assertEqual(endpoint.ready_calls, 0)

    def test_api_refusal_is_json(self) -> None:
        """Under /api the refusal is JSON, as every answer of the API is."""
        response = Endpoint(page=True).request("POST", "/api/v1/sites")
        self.assertEqual(response.status, 405)
        self.assertEqual(response.header("Content-Type"), "application/json")
        self.assertEqual(
            json.loads(response.body),
            {"error": "method POST is not allowed: the admin endpoint is read-only (GET, HEAD)"},
        )

    def test_body_is_dropped(self) -> None:
        """A request body is never kept; a GET with a small one is still served."""
        endpoint = Endpoint()
        seen: list[bytes] = []
        original = web.AdminRequest.process

        def spy(request: web.AdminRequest) -> None:
            seen.append(request.content.read())
            original(request)

        self.patch(web.AdminRequest, "process", spy)
        response = endpoint.request("GET", "/healthz", body=b"y" * 1000)
        self.assertEqual((response.status, seen), (200, [b""]))

    def test_large_body_cuts_the_connection(self) -> None:
        """More than MAX_REQUEST_BODY bytes of body: the connection is aborted, nothing answered."""
        endpoint = Endpoint()
        channel, transport = endpoint.connect()
        head = f"POST /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: {10 * MAX_REQUEST_BODY}\r\n\r\n".encode()
        channel.dataReceived(head + b"z" * (MAX_REQUEST_BODY // 2))
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"z" * MAX_REQUEST_BODY)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")


MISDIRECTED_TEXT = (
    "misdirected request: Host {host} is not answered here; this admin endpoint listens on loopback and answers "
    "only Host localhost or an IP address (a guard against DNS rebinding, docs/operations.md)"
)


class HostTests(unittest.SynchronousTestCase):
    """The Host rule of a loopback endpoint, against DNS rebinding."""

    def test_local_host(self) -> None:
        """localhost or an IP literal (IPv6 in brackets), with or without a port; nothing else."""
        accepted = [
            b"localhost",
            b"LocalHost",
            b"localhost:5501",
            b"localhost:",  # RFC 9110 allows an empty port
            b"127.0.0.1",
            b"127.0.0.1:5501",
            b"192.0.2.10:80",
            b"[::1]",
            b"[::1]:5501",
            b"[2001:db8::7]:1",
            b" localhost ",
        ]
        refused = [
            b"",
            b"rebind.example",
            b"rebind.example:5501",
            b"localhost.rebind.example",
            b"127.0.0.1.nip.io",
            b"localhost.",
            b"127.1",
            b"2130706433",
            b"0x7f.0.0.1",
            b"::1",
            b"[::1",
            b"[127.0.0.1]",
            b"[localhost]",
            b"[::1]x",
            b"[::1]:5501:1",
            b"localhost:http",
            b"localhost:123456",
            b"127.0.0.1:5501:1",
            b"localhost:5501/x",
            b"l\xc3\xb6calhost",
            b"localhost\x00",
        ]
        for value in accepted:
            self.assertTrue(local_host(value), value)
        for value in refused:
            self.assertFalse(local_host(value), value)

    def test_host_checked(self) -> None:
        """The rule holds on a loopback TCP or TLS bind; beyond loopback and on a unix socket any Host is answered."""
        for given in ("5501", "tcp:0", "tcp6:5501", "ssl:5501:privateKey=k.pem", "tcp:5501:interface=localhost"):
            self.assertTrue(host_checked(admin_endpoint(given)), given)
        for given in ("tcp:5501:interface=0.0.0.0", "tcp:5501:interface=192.0.2.1", "tcp6:5501:interface=\\:\\:"):
            self.assertFalse(host_checked(admin_endpoint(given)), given)
        self.assertFalse(host_checked(admin_endpoint("unix:/run/rtunnel/admin.sock")))

    def test_misdirected(self) -> None:
        """
        Another Host is a 421 with one line saying why, on every path and
        method, before anything else runs (the readiness check is never
        asked, a POST is not told about methods); JSON under /api.
        """
        endpoint = Endpoint(page=True)
        for method in ("GET", "HEAD", "POST"):
            for path in ("/", "/readyz", "/metrics", "/favicon.ico", "/nope"):
                response = endpoint.request(method, path, host="rebind.example:5501")
                self.assertEqual((response.status, response.reason), (421, "Misdirected Request"), (method, path))
                self.assertEqual(response.header("Content-Type"), "text/plain; charset=utf-8")
                self.assertEqual(response.header("Server"), "rtunnel")
                self.assertIsNotNone(response.header("Date"))
                expected = MISDIRECTED_TEXT.format(host="rebind.example:5501").encode() + b"\n"
                self.assertEqual(response.body, b"" if method == "HEAD" else expected, (method, path))
        api = endpoint.request("GET", "/api/v1/sites", host="rebind.example")
        self.assertEqual(api.status, MISDIRECTED)
        self.assertEqual(api.header("Content-Type"), "application/json")
        self.assertEqual(json.loads(api.body), {"error": MISDIRECTED_TEXT.format(host="rebind.example")})
        self.assertEqual(endpoint.ready_calls, 0)
        self.assertEqual(endpoint.site.misdirected_requests, 16)

    def test_local_names_served(self) -> None:
        """localhost and the addresses a local client uses are served as before."""
        endpoint = Endpoint()
        for host in ("localhost", "localhost:5501", "127.0.0.1:5501", "[::1]:5501"):
            self.assertEqual(endpoint.request("GET", "/healthz", host=host).status, 200, host)
        self.assertEqual(endpoint.site.misdirected_requests, 0)

    def test_no_host(self) -> None:
        """A request without Host (HTTP/1.0) is served: browsers, the clients rebinding steers, always send one."""
        endpoint = Endpoint()
        channel, transport = endpoint.connect()
        channel.dataReceived(b"GET /healthz HTTP/1.0\r\n\r\n")
        response = Response(transport.value())
        self.assertEqual((response.status, response.body), (200, b"ok\n"))

    def test_two_hosts(self) -> None:
        """Two Host headers are refused, even if one is local (which one would a proxy have used?)."""
        endpoint = Endpoint()
        response = endpoint.request("GET", "/healthz", host="localhost\r\nHost: rebind.example")
        self.assertEqual(response.status, MISDIRECTED)
        self.assertIn(b"Host localhost, rebind.example is not answered here", response.body)

    def test_peer_text_made_printable(self) -> None:
        """The Host is the client's text: escaped and cut short in the answer and the log line."""
        log = LogCapture(self)
        endpoint = Endpoint()
        host = "a\x1b[31m" + "b" * 300
        response = endpoint.request("GET", "/healthz", host=host)
        self.assertEqual(response.status, MISDIRECTED)
        self.assertNotIn(b"\x1b", response.body)
        self.assertIn(b"a\\x1b[31mbbb", response.body)
        self.assertIn("b…(306 chars) is not".encode(), response.body)
        [line] = log.lines("refused a request from")
        self.assertNotIn("\x1b", line)

    def test_beyond_loopback_any_host(self) -> None:
        """A site made for a bind beyond loopback answers whatever Host a proxy in front sends."""
        endpoint = Endpoint(check_host=False)
        response = endpoint.request("GET", "/healthz", host="status.example.org")
        self.assertEqual((response.status, response.body), (200, b"ok\n"))
        self.assertEqual(endpoint.site.misdirected_requests, 0)

    def test_logged_rate_limited(self) -> None:
        """
        Each refusal is counted; the warning names the peer and the Host,
        three at once, then about one a minute saying how many were left
        out.
        """
        log = LogCapture(self)
        endpoint = Endpoint()
        for i in range(5):
            endpoint.request("GET", "/api/v1/sites", host=f"rebind{i}.example")
        lines = log.lines("admin endpoint: refused a request from")
        self.assertEqual(len(lines), 3)
        self.assertIn("refused a request from 127.0.0.1:40000 for Host rebind0.example (421)", lines[0])
        self.assertIn("(DNS rebinding)", lines[0])
        self.assertIn("a proxy in front of it must send one of those", lines[0])
        warnings = [e for e in log.events if "refused a request" in formatEvent(e)]
        self.assertEqual({e["log_level"] for e in warnings}, {LogLevel.warn})
        self.assertEqual([e["suppressed"] for e in warnings], [0, 0, 0])
        endpoint.clock.advance(60)
        endpoint.request("GET", "/", host="rebind5.example")
        lines = log.lines("admin endpoint: refused a request from")
        self.assertEqual(len(lines), 4)
        self.assertTrue(lines[3].endswith("for Host rebind5.example (421): " + lines[3].split("(421): ")[1]))
        self.assertTrue(lines[3].endswith(" (2 similar not logged)"), lines[3])
        self.assertEqual(endpoint.site.misdirected_requests, 6)


class ConnectionTests(unittest.SynchronousTestCase):
    def test_cap_refuses_at_accept(self) -> None:
        """
        Past max_connections, buildProtocol returns None (the port closes
        the socket at accept); a closed connection frees its place; one
        warning per minute says so.
        """
        log = LogCapture(self)
        endpoint = Endpoint(max_connections=2)
        first, _ = endpoint.connect()
        endpoint.connect()
        self.assertEqual(endpoint.site.connections, 2)
        self.assertIsNone(endpoint.site.buildProtocol(PEER))
        self.assertIsNone(endpoint.site.buildProtocol(PEER))
        self.assertEqual(endpoint.site.refused, 2)
        self.assertEqual(len(log.lines("admin endpoint: 2 connections open already")), 1)
        first.connectionLost(Exception("gone"))
        self.assertEqual(endpoint.site.connections, 1)
        self.assertIsNotNone(endpoint.site.buildProtocol(PEER))
        endpoint.clock.advance(60)
        self.assertIsNone(endpoint.site.buildProtocol(PEER))
        self.assertEqual(len(log.lines("connections open already")), 2)

    def test_idle_timeout(self) -> None:
        """
        A silent connection is closed after IDLE_TIMEOUT, and aborted
        ABORT_TIMEOUT later if it still has not gone (a client that does
        not read).
        """
        endpoint = Endpoint()
        _, transport = endpoint.connect()
        endpoint.clock.advance(IDLE_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnecting)
        endpoint.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        endpoint.clock.advance(ABORT_TIMEOUT)
        self.assertTrue(transport.disconnected)

    def test_idle_timeout_is_quiet(self) -> None:
        """
        Closing an idle connection (after every scrape of a keep-alive
        Prometheus server) and aborting a stuck one log at debug level
        only: no "Timing out client" line from Twisted.
        """
        log = LogCapture(self)
        for level in (LogLevel.info, LogLevel.debug):
            self.addCleanup(set_level, current_level())
            set_level(level)
            endpoint = Endpoint()
            channel, _ = endpoint.connect()
            channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            endpoint.clock.advance(IDLE_TIMEOUT)
            endpoint.clock.advance(ABORT_TIMEOUT)
            if level == LogLevel.info:
                self.assertEqual(log.events, [])
        self.assertIsInstance(channel, AdminChannel)
        self.assertIsNot(AdminChannel.timeoutConnection, HTTPChannel.timeoutConnection)
        self.assertEqual([formatEvent(e) for e in log.events if e["log_level"] > LogLevel.debug], [])
        self.assertEqual(log.lines("Timing out client"), [])
        self.assertEqual(
            log.lines("admin endpoint:"),
            [
                "admin endpoint: closing 127.0.0.1:40000, silent for 10s",
                "admin endpoint: aborting 127.0.0.1:40000, which did not take the rest of its answer",
            ],
        )

    def test_gone_before_the_abort(self) -> None:
        """A timed-out connection that goes in time is not aborted, and leaves no timer behind."""
        endpoint = Endpoint()
        channel, transport = endpoint.connect()
        endpoint.clock.advance(IDLE_TIMEOUT)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(endpoint.clock.getDelayedCalls()), 1)
        channel.connectionLost(Exception("closed"))
        self.assertEqual(endpoint.clock.getDelayedCalls(), [])
        self.assertFalse(transport.disconnected)  # StringTransport: only abortConnection sets it
        self.assertEqual(endpoint.site.connections, 0)

    def test_idle_after_a_response(self) -> None:
        """A kept-alive connection is timed out once its response is written and it goes silent."""
        endpoint = Endpoint()
        channel, transport = endpoint.connect()
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        self.assertFalse(transport.disconnecting)
        endpoint.clock.advance(IDLE_TIMEOUT)
        self.assertTrue(transport.disconnecting)

    def test_no_access_log_nor_timer(self) -> None:
        """Serving leaves no timer behind (no access log clock) and logs no line per request."""
        log = LogCapture(self)
        endpoint = Endpoint()
        channel, _ = endpoint.connect()
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        channel.connectionLost(Exception("done"))
        self.assertEqual(endpoint.clock.getDelayedCalls(), [])
        self.assertEqual(log.lines("GET /healthz"), [])

    def test_stop_callback(self) -> None:
        """on_stop runs when the site stops listening (the server clears its recorded URL then)."""
        stopped: list[bool] = []
        site = AdminSite(Resource(), Clock(), on_stop=lambda: stopped.append(True))
        site.doStart()
        self.assertEqual(stopped, [])
        site.doStop()
        self.assertEqual(stopped, [True])


class ServerHeaderTests(unittest.SynchronousTestCase):
    def test_server_is_rtunnel(self) -> None:
        """
        Every answer says Server: rtunnel, not TwistedWeb and its version:
        pages, 404s, refusals, HEAD, the empty favicon and the page.
        """
        endpoint = Endpoint(page=True)
        cases = [
            ("GET", "/healthz", "localhost"),
            ("HEAD", "/readyz", "localhost"),
            ("GET", "/", "localhost"),
            ("GET", "/nope", "localhost"),
            ("GET", "/healthz/x", "localhost"),
            ("GET", "/favicon.ico", "localhost"),
            ("POST", "/metrics", "localhost"),
            ("GET", "/metrics", "rebind.example"),
        ]
        for method, path, host in cases:
            response = endpoint.request(method, path, host=host)
            self.assertEqual(response.header("Server"), "rtunnel", (method, path))
            self.assertNotIn("twisted", json.dumps(response.headers).lower(), (method, path))


class OptionTests(unittest.SynchronousTestCase):
    def test_endpoints(self) -> None:
        """A bare port and tcp/tcp6/ssl without an interface are bound to loopback; explicit ones are kept."""
        cases = {
            "5501": "tcp:5501:interface=127.0.0.1",
            " tcp:0 ": "tcp:0:interface=127.0.0.1",
            "tcp6:5501": "tcp6:5501:interface=\\:\\:1",
            "ssl:5501:privateKey=k.pem": "ssl:5501:privateKey=k.pem:interface=127.0.0.1",
            "tcp:5501:interface=0.0.0.0": "tcp:5501:interface=0.0.0.0",
            "tcp:5501:192.0.2.1": "tcp:5501:192.0.2.1",
            "unix:/run/rtunnel/admin.sock": "unix:/run/rtunnel/admin.sock",
        }
        for given, listened in cases.items():
            self.assertEqual(admin_endpoint(given), listened, given)

    def test_bad_endpoints(self) -> None:
        for bad in ("", "tcp", "tcp:", "udp:5501", "systemd:domain=INET:index=0", "localhost:5501"):
            with self.assertRaises(AdminEndpointError) as raised:
                admin_endpoint(bad)
            self.assertIn(f"{bad!r} is not an admin endpoint", str(raised.exception))

    def test_option(self) -> None:
        """none (any case) and None turn it off; anything else is checked and kept as given."""
        for off in (None, "none", "NONE", " None "):
            self.assertIsNone(admin_option(off))
        self.assertEqual(admin_option("5501"), "5501")
        self.assertRaises(AdminEndpointError, admin_option, "nowhere")


class FakePort:
    def __init__(self, address: Any) -> None:
        self.address = address

    def getHost(self) -> Any:
        return self.address


class UrlTests(unittest.SynchronousTestCase):
    def test_admin_url(self) -> None:
        """The URL carries the port actually bound; every-interface binds are reached on loopback."""
        self.assertEqual(admin_url(FakePort(IPv4Address("TCP", "127.0.0.1", 43210)), "tcp:0"), "http://127.0.0.1:43210")
        self.assertEqual(admin_url(FakePort(IPv4Address("TCP", "0.0.0.0", 5501)), "tcp:5501"), "http://127.0.0.1:5501")
        self.assertEqual(admin_url(FakePort(IPv6Address("TCP", "::1", 5501)), "tcp6:5501"), "http://[::1]:5501")
        self.assertEqual(
            admin_url(FakePort(IPv4Address("TCP", "127.0.0.1", 1)), "ssl:1:privateKey=k"), "https://127.0.0.1:1"
        )
        self.assertEqual(admin_url(FakePort(UNIXAddress(b"/run/a.sock")), "unix:/run/a.sock"), "unix:/run/a.sock")

    def test_exposed_interface(self) -> None:
        """What counts as beyond loopback, read from the endpoint as listened on."""
        cases = {
            "tcp:5501:interface=127.0.0.1": None,
            "tcp:5501:interface=127.0.0.2": None,
            "tcp6:5501:interface=\\:\\:1": None,
            "tcp:5501:interface=localhost": None,
            "unix:/run/a.sock": None,
            "tcp:5501:interface=0.0.0.0": "every interface",
            "tcp6:5501:interface=\\:\\:": "every interface",
            "tcp:5501:interface=192.0.2.1": "192.0.2.1",
            "tcp:5501:192.0.2.1": "192.0.2.1",
            "tcp:5501": "every interface",
        }
        for description, exposed in cases.items():
            self.assertEqual(exposed_interface(description), exposed, description)
        for given in ("5501", "tcp:0", "tcp6:5501", "ssl:5501:privateKey=k.pem"):
            self.assertIsNone(exposed_interface(admin_endpoint(given)), given)

    def test_exposure_warning(self) -> None:
        """A bind beyond loopback logs what it exposes; loopback and unix sockets log nothing."""
        log = LogCapture(self)
        for description in ("tcp:1:interface=127.0.0.1", "unix:/x"):
            web._warn_if_exposed(description, "server")
        self.assertEqual(log.lines("not loopback"), [])
        web._warn_if_exposed("tcp:5501:interface=0.0.0.0", "server")
        web._warn_if_exposed("tcp:5501:interface=192.0.2.1", "site")
        every, one = log.lines("not loopback")
        self.assertIn("admin endpoint listens on every interface, not loopback", every)
        self.assertIn("every site's name, peer address, services and traffic figures", every)
        self.assertIn("read-only", every)
        self.assertIn("listens on 192.0.2.1", one)
        self.assertIn("this site's tunnel state and traffic figures", one)


class SiteReadinessTests(unittest.SynchronousTestCase):
    def service(self, **kwargs: Any) -> Any:
        factory = kwargs.get("factory")
        factories = [factory] if factory is not None else []
        return SimpleNamespace(**{"running": True, "factory": None, "sessions": {}, "factories": factories, **kwargs})

    def test_reasons(self) -> None:
        """Ready while a tunnel session is open (any replica's); otherwise the reason, the last attempt's if known."""
        self.assertEqual(site_not_ready(self.service(running=False)), "the site is not running")
        self.assertIn("no tunnel session yet", site_not_ready(self.service()) or "")
        factory = SimpleNamespace(stopping=False, current=None, last_outcome=None)
        self.assertEqual(site_not_ready(self.service(factory=factory)), "no tunnel session with the tunnel server yet")
        factory.last_outcome = SimpleNamespace(reason="connection refused")
        self.assertEqual(
            site_not_ready(self.service(factory=factory)),
            "no tunnel session with the tunnel server (the last connection ended: connection refused)",
        )
        # Another slot's reason when the first slot has none.
        other = SimpleNamespace(stopping=False, current=None, last_outcome=SimpleNamespace(reason="reset"))
        factory.last_outcome = None
        self.assertEqual(
            site_not_ready(self.service(factory=factory, factories=[factory, other])),
            "no tunnel session with the tunnel server (the last connection ended: reset)",
        )
        self.assertIsNone(site_not_ready(self.service(factory=factory, sessions={"b": object()})))
        factory.stopping = True
        self.assertEqual(site_not_ready(self.service(factory=factory)), "the site is shutting down")


class Recorder:
    """A collector that notes the thread it is collected on."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def collect(self) -> Iterable[Metric]:
        self.threads.append(threading.current_thread())
        yield GaugeMetricFamily("rtunnel_test_gauge", "A gauge for the test.", value=7)


class FakeThreadedReactor:
    def __init__(self) -> None:
        self.calls: list[Callable[[], object]] = []
        self.arrived = threading.Event()

    def callFromThread(self, f: Callable[[], object]) -> None:
        self.calls.append(f)
        self.arrived.set()


class OnReactorTests(unittest.SynchronousTestCase):
    def test_collect_hops_to_the_reactor(self) -> None:
        """From a pool thread, the figures are gathered by a call the reactor runs, not in the thread."""
        recorder = Recorder()
        fake = FakeThreadedReactor()
        gathered: list[list[Metric]] = []
        worker = threading.Thread(target=lambda: gathered.append(OnReactor(recorder, fake, 5).collect()))  # type: ignore[arg-type]
        worker.start()
        self.assertTrue(fake.arrived.wait(5))
        self.assertEqual(recorder.threads, [])
        fake.calls[0]()  # the reactor's turn, on this thread
        worker.join(5)
        self.assertEqual([m.name for m in gathered[0]], ["rtunnel_test_gauge"])
        self.assertEqual(recorder.threads, [threading.current_thread()])

    def test_collect_times_out(self) -> None:
        """A reactor that never runs the call: the scrape fails after the timeout instead of hanging."""
        failures: list[BaseException] = []

        def scrape() -> None:
            try:
                OnReactor(Recorder(), FakeThreadedReactor(), 0.05).collect()  # type: ignore[arg-type]
            except BaseException as e:
                failures.append(e)

        worker = threading.Thread(target=scrape)
        worker.start()
        worker.join(5)
        self.assertIsInstance(failures[0], TimeoutError)
        self.assertIn("did not gather the metrics within 0.05s", str(failures[0]))

    def test_large_families_let_the_lock_go(self) -> None:
        """
        Formatted in the pool, a family of many samples lets the interpreter
        lock go every SAMPLES_PER_RELEASE samples, and the text is exactly
        what prometheus_client makes of the plain family.
        """
        from prometheus_client.exposition import generate_latest

        sites = 3 * web.SAMPLES_PER_RELEASE + 7

        class PerSite:
            def collect(self) -> Iterable[Metric]:
                family = GaugeMetricFamily("rtunnel_test_up", "One per site.", labels=["site"])
                for i in range(sites):
                    family.add_metric([f"site-{i:05d}"], i % 2)
                yield family
                yield GaugeMetricFamily("rtunnel_test_small", "A small one.", value=1)

        class Plain:
            def __init__(self, collector: PerSite) -> None:
                self.collector = collector

            def collect(self) -> Iterable[Metric]:
                return self.collector.collect()

        released: list[float] = []
        self.patch(web, "time", SimpleNamespace(sleep=released.append))
        fake = FakeThreadedReactor()
        texts: list[bytes] = []
        worker = threading.Thread(target=lambda: texts.append(generate_latest(OnReactor(PerSite(), fake, 5))))  # type: ignore[arg-type]
        worker.start()
        self.assertTrue(fake.arrived.wait(5))
        fake.calls[0]()
        worker.join(5)
        self.assertEqual(texts, [generate_latest(Plain(PerSite()))])  # type: ignore[arg-type]
        self.assertIn(b'rtunnel_test_up{site="site-00306"} 0.0', texts[0])
        # 307 samples: let go after each full hundred and after the last 7; the small family never.
        self.assertEqual(released, [0, 0, 0, 0])

    def test_restricted(self) -> None:
        """?name[]= restricts through the wrapped registry."""
        registry = CollectorRegistry()
        Counter("rtunnel_a", "a", registry=registry).inc()
        Counter("rtunnel_b", "b", registry=registry).inc()
        restricted = OnReactor(registry, FakeThreadedReactor()).restricted_registry(["rtunnel_a_total"])  # type: ignore[arg-type]
        self.patch(web, "isInIOThread", lambda: True)
        self.assertEqual([m.name for m in restricted.collect()], ["rtunnel_a"])


class MetricsOverHTTPTests(unittest.TestCase):
    """/metrics through prometheus_client's Twisted resource, on loopback with the real reactor."""

    @defer.inlineCallbacks
    def test_scrape(self) -> Any:
        recorder = Recorder()
        registry = CollectorRegistry()
        registry.register(recorder)  # type: ignore[arg-type]
        counter = Counter("rtunnel_test_things", "Things counted for the test.", registry=registry)
        counter.inc(3)
        root = admin_root(ready=lambda: None, metrics=metrics_resource(registry, reactor))
        port = reactor.listenTCP(0, AdminSite(root, reactor), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/metrics".encode()
        agent = Agent(reactor)
        response = yield agent.request(b"GET", url)
        body = yield readBody(response)
        self.assertEqual(response.code, 200)
        self.assertIn(b"rtunnel_test_things_total 3.0", body)
        self.assertIn(b"rtunnel_test_gauge 7.0", body)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        # gathered on the reactor thread, though the WSGI app runs in the pool
        self.assertEqual(recorder.threads, [threading.current_thread()])
        head = yield agent.request(b"HEAD", url)
        self.assertEqual(head.code, 200)
        self.assertEqual(len(recorder.threads), 1)  # HEAD gathers nothing
        post = yield agent.request(b"POST", url)
        yield readBody(post)
        self.assertEqual(post.code, 405)
        # Server: rtunnel on the thread pool's answer as well
        self.assertEqual(response.headers.getRawHeaders(b"server"), [b"rtunnel"])

    @defer.inlineCallbacks
    def test_forged_host_on_loopback(self) -> Any:
        """
        A real request over loopback, as a browser sends it after a DNS
        rebinding (its Host the attacker's name), is a 421 and reads
        nothing; the same request with the address as Host is answered.
        """
        description = admin_endpoint("tcp:0")
        root = admin_root(ready=lambda: None, metrics=FakeMetrics(), api=FakeMetrics(), page=status_page())
        site = AdminSite(root, reactor, check_host=host_checked(description))
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        url = f"http://127.0.0.1:{number}/api/v1/sites".encode()
        agent = Agent(reactor)
        forged = Headers({b"Host": [f"rebind.example:{number}".encode()]})
        response = yield agent.request(b"GET", url, forged)
        body = yield readBody(response)
        self.assertEqual((response.code, response.phrase), (421, b"Misdirected Request"))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(json.loads(body), {"error": MISDIRECTED_TEXT.format(host=f"rebind.example:{number}")})
        self.assertEqual(site.misdirected_requests, 1)
        response = yield agent.request(b"GET", url)  # Agent sends Host 127.0.0.1:PORT
        body = yield readBody(response)
        self.assertEqual((response.code, body), (200, b"fake_metric 1\n"))
        self.assertEqual(response.headers.getRawHeaders(b"server"), [b"rtunnel"])
        self.assertEqual(site.misdirected_requests, 1)


def memory_request(site: Any, path: str, host: str = "localhost:5501") -> Response:
    channel = site.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    channel.makeConnection(transport)
    channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return Response(transport.value())


class ServerWiringTests(unittest.SynchronousTestCase):
    """build_server_service with --admin, on a memory reactor."""

    def build(self, admin: str | None, reactor: Any = None) -> Any:
        self.reactor = reactor or MemoryReactorClock()
        self.fixture = ServerFixture(self)
        config = ServerConfig(
            state_dir=self.fixture.directory, listen="tcp:5500:interface=127.0.0.1", admin=admin, name="admin-test"
        )
        self.fatal: list[str] = []
        service = build_server_service(config, self.reactor, on_fatal=self.fatal.append)
        self.addCleanup(service.state.close)
        return service

    def test_listens_and_records_its_url(self) -> None:
        """
        The admin endpoint listens after the tunnel port, on loopback, and
        the URL with the port bound is recorded for the CLI; /readyz is 503
        until the tunnel port listens, then 200; / is the status page.
        """
        service = self.build("tcp:0")
        [listener] = [x for x in service.listeners if x.label == "admin endpoint"]
        self.assertEqual(listener.description, "tcp:0:interface=127.0.0.1")
        site = listener.factory
        self.assertIsInstance(site, AdminSite)
        self.assertTrue(site.check_host)
        self.assertEqual(memory_request(site, "/healthz", host="rebind.example").status, MISDIRECTED)
        self.assertIn(b"the tunnel port is not listening yet", memory_request(site, "/readyz").body)
        service.startService()
        self.addCleanup(service.stopService)
        port, factory, _, interface = self.reactor.tcpServers[-1]
        self.assertEqual((port, interface, factory), (0, "127.0.0.1", site))
        store = service.state.store
        self.assertEqual(store.get_meta(ADMIN_URL_KEY), "http://127.0.0.1:0")
        self.assertEqual(store.get_meta(replica_url_key(service.replica_id)), "http://127.0.0.1:0")
        self.assertEqual(memory_request(site, "/readyz").body, b"ready\n")
        self.assertEqual(memory_request(site, "/healthz").status, 200)
        self.assertIn(b"<title>rtunnel status</title>", memory_request(site, "/").body)
        self.assertEqual(self.fatal, [])
        # Another replica wrote the shared URL since: at stop this one clears its own only.
        store.set_meta(ADMIN_URL_KEY, "http://127.0.0.1:5601")
        site.stopFactory()  # as the port does when it stops listening (the memory reactor's does not)
        self.assertEqual(store.get_meta(replica_url_key(service.replica_id)), "")
        self.assertEqual(store.get_meta(ADMIN_URL_KEY), "http://127.0.0.1:5601")

    def test_beyond_loopback_any_host(self) -> None:
        """Bound beyond loopback, the endpoint answers any Host (a proxy's name)."""
        service = self.build("tcp:0:interface=0.0.0.0")
        [listener] = [x for x in service.listeners if x.label == "admin endpoint"]
        self.assertFalse(listener.factory.check_host)
        self.assertEqual(memory_request(listener.factory, "/healthz", host="status.example.org").status, 200)

    def test_none(self) -> None:
        """--admin none: no admin listener, nothing recorded."""
        service = self.build(None)
        self.assertEqual([x.label for x in service.listeners if x.label == "admin endpoint"], [])
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([p for p, *_ in self.reactor.tcpServers], [5500])
        self.assertIsNone(service.state.store.get_meta(ADMIN_URL_KEY))

    def test_cannot_listen_is_fatal(self) -> None:
        """A port the admin endpoint cannot listen on is fatal, like a forward's."""

        class Refusing(MemoryReactorClock):
            def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
                if port == 5501:
                    raise CannotListenError(interface, port, OSError("in use"))
                return super().listenTCP(port, factory, backlog, interface)

        service = self.build("5501", Refusing())
        service.startService()
        self.addCleanup(service.stopService)
        [message] = self.fatal
        self.assertIn("cannot listen on tcp:5501:interface=127.0.0.1", message)

    def test_bad_endpoint(self) -> None:
        self.assertRaises(AdminEndpointError, self.build, "carrier-pigeon:5501")


class SiteWiringTests(unittest.SynchronousTestCase):
    def test_site_admin(self) -> None:
        """
        The site's --admin is a child service: it listens at start (before
        the tunnel is dialed), serves /metrics, /healthz and /readyz (503
        without a session), no status page, and stops listening at stop.
        """
        fixture = ServerFixture(self)
        state = fixture.enrolled_site_state(self, "alpha", ("127.0.0.1:5598",))
        reactor = MemoryReactorClock()
        config = SiteConfig(state_dir=state.directory.path, policy=SitePolicy(keepalive=None), admin="tcp:0")
        service = build_site_service(config, reactor, on_fatal=self.fail)
        [child] = [c for c in service if isinstance(c, AdminService)]
        service.startService()
        [(port, site, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (0, "127.0.0.1"))
        response = memory_request(site, "/readyz")
        self.assertEqual(response.status, 503)
        self.assertIn(b"not ready: no tunnel session with the tunnel server", response.body)
        self.assertEqual(memory_request(site, "/").status, 404)
        self.assertEqual(memory_request(site, "/api/v1/sites").status, 404)
        self.assertEqual(memory_request(site, "/readyz", host="rebind.example").status, MISDIRECTED)
        self.assertIsNotNone(child.port)
        service.stopService()
        self.assertIsNone(child.port)

    def test_beyond_loopback_any_host(self) -> None:
        fixture = ServerFixture(self)
        state = fixture.enrolled_site_state(self, "alpha", ("127.0.0.1:5598",))
        config = SiteConfig(state_dir=state.directory.path, admin="tcp:0:interface=0.0.0.0")
        service = build_site_service(config, MemoryReactorClock(), on_fatal=self.fail)
        [child] = [c for c in service if isinstance(c, AdminService)]
        self.assertFalse(child.site.check_host)

    def test_off_by_default(self) -> None:
        fixture = ServerFixture(self)
        state = fixture.enrolled_site_state(self, "alpha", ("127.0.0.1:5598",))
        reactor = MemoryReactorClock()
        service = build_site_service(SiteConfig(state_dir=state.directory.path), reactor, on_fatal=self.fail)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(reactor.tcpServers, [])


class TapTests(unittest.SynchronousTestCase):
    def test_server_option(self) -> None:
        """twistd rtunnel-server: --admin defaults to loopback 5501; none turns it off; nonsense is a usage error."""
        options = server_tap.Options()
        options.parseOptions(["--state=/s"])
        self.assertEqual(options.config.admin, "tcp:5501:interface=127.0.0.1")
        options = server_tap.Options()
        options.parseOptions(["--state=/s", "--admin", "none"])
        self.assertIsNone(options.config.admin)
        options = server_tap.Options()
        options.parseOptions(["--state=/s", "--admin", "tcp:9100:interface=0.0.0.0"])
        self.assertEqual(options.config.admin, "tcp:9100:interface=0.0.0.0")
        with self.assertRaises(usage.UsageError) as raised:
            server_tap.Options().parseOptions(["--state=/s", "--admin", "udp:9"])
        self.assertIn("--admin: 'udp:9' is not an admin endpoint", str(raised.exception))

    def test_site_option(self) -> None:
        """twistd rtunnel: no admin endpoint unless --admin is given."""
        options = site_tap.Options()
        options.parseOptions(["--state=/s"])
        self.assertIsNone(options.config.admin)
        options = site_tap.Options()
        options.parseOptions(["--state=/s", "--admin", "9101"])
        self.assertEqual(options.config.admin, "9101")
        self.assertRaises(usage.UsageError, site_tap.Options().parseOptions, ["--state=/s", "--admin", "x"])
