"""
The JSON API of the admin endpoint: the pure snapshot-to-JSON functions,
then the resource through a real twisted.web Site in memory (routing,
methods, headers, strict site names, HEAD).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from rtunnel.observe import api
from rtunnel.observe.api import api_resource, forward_json, iso_time, refusal_json, site_json, throughput_json
from rtunnel.observe.view import ForwardSnapshot, Refusal, SiteSnapshot, Throughput
from tests.observe_web_helpers import T0, FakeView, Response, request, snapshot, turn

SITE_KEYS = {
    "replica",
    "site",
    "connected",
    "enrolled",
    "revoked",
    "since",
    "peer",
    "services",
    "streams",
    "bytes_to_site",
    "bytes_from_site",
    "rtt_seconds",
    "last_refusal",
}


class EncodingTests(SynchronousTestCase):
    def test_iso_time_is_utc_to_the_second_with_z(self) -> None:
        """The one time format of the contract, fractions dropped."""
        self.assertEqual(iso_time(T0), "2026-12-05T23:14:05Z")
        self.assertEqual(iso_time(T0 + 0.999), "2026-12-05T23:14:05Z")
        self.assertEqual(iso_time(0), "1970-01-01T00:00:00Z")

    def test_connected_site(self) -> None:
        """Every field of SITE, under its contract name, with contract types."""
        refusal = Refusal(T0 - 5, "alpha", "stream", "target not allowed")
        services = {"web": "127.0.0.1:80", "db": "10.0.0.2:5432"}
        value = site_json(snapshot("alpha", services=services, last_refusal=refusal))
        self.assertEqual(
            value,
            {
                "site": "alpha",
                "connected": True,
                "enrolled": True,
                "revoked": False,
                "since": "2026-12-05T23:13:00Z",
                "peer": "192.0.2.7:40123",
                "services": {"db": "10.0.0.2:5432", "web": "127.0.0.1:80"},
                "streams": 2,
                "bytes_to_site": 1000,
                "bytes_from_site": 250000,
                "rtt_seconds": 0.0125,
                "last_refusal": {"time": "2026-12-05T23:14:00Z", "kind": "stream", "reason": "target not allowed"},
                "replica": "cloud-1:5500",
            },
        )
        self.assertEqual(list(value["services"]), ["db", "web"])

    def test_site_never_seen_has_nulls(self) -> None:
        """No session ever: since, peer and RTT are null, not empty strings or zeros."""
        value = site_json(snapshot("beta", connected=False, since=None, peer="", rtt=None, streams=0))
        self.assertIsNone(value["since"])
        self.assertIsNone(value["peer"])
        self.assertIsNone(value["rtt_seconds"])
        self.assertNotIn("throughput", value)
        self.assertEqual(set(value), SITE_KEYS)

    def test_non_finite_rtt_is_null(self) -> None:
        """JSON has no NaN: a figure gone wrong is null, not an unparseable response."""
        self.assertIsNone(site_json(snapshot("a", rtt=float("nan")))["rtt_seconds"])
        self.assertIsNone(site_json(snapshot("a", rtt=float("inf")))["rtt_seconds"])

    def test_rtt_to_the_microsecond(self) -> None:
        self.assertEqual(site_json(snapshot("a", rtt=0.0007143020629882812))["rtt_seconds"], 0.000714)
        self.assertEqual(site_json(snapshot("a", rtt=2.5))["rtt_seconds"], 2.5)

    def test_throughput(self) -> None:
        """Rates to a tenth, oldest first, the interval as a float."""
        rates = Throughput(10, [0.0, 1234.56, 7.04], [5.0, 0.25, 1e9])
        self.assertEqual(
            throughput_json(rates),
            {"interval_seconds": 10.0, "to_site": [0.0, 1234.6, 7.0], "from_site": [5.0, 0.2, 1e9]},
        )
        self.assertIsInstance(throughput_json(rates)["interval_seconds"], float)

    def test_site_with_throughput(self) -> None:
        """with_throughput carries the key, null when the view had none."""
        rates = Throughput(5.0, [1.0], [2.0])
        self.assertEqual(site_json(snapshot("a"), rates, with_throughput=True)["throughput"], throughput_json(rates))
        self.assertIsNone(site_json(snapshot("a"), None, with_throughput=True)["throughput"])

    def test_sites_body_in_pieces(self) -> None:
        """
        The pieces of C{/api/v1/sites}, joined, are exactly the one JSON
        document the contract describes, however many pieces the sites
        make (none, one, a full piece, one more, several).
        """
        for count in (0, 1, api.ENCODE_STEP, api.ENCODE_STEP + 1, 2 * api.ENCODE_STEP + 5):
            sites = [snapshot(f"s{i:03d}") for i in range(count)]
            rates = {s.name: Throughput(5.0, [float(i)], [0.5]) for i, s in enumerate(sites) if i % 2}
            for history in (False, True):
                pieces = api.sites_body("2026-12-05T23:14:05Z", sites, history, rates)
                expected = {
                    "generated": "2026-12-05T23:14:05Z",
                    "sites": [
                        site_json(s, rates.get(s.name), with_throughput=history and s.name in rates) for s in sites
                    ],
                }
                self.assertEqual(
                    b"".join(pieces), json.dumps(expected, separators=(",", ":")).encode() + b"\n", (count, history)
                )
                self.assertEqual(len(pieces), 2 + -(-count // api.ENCODE_STEP))

    def test_forward(self) -> None:
        forward = ForwardSnapshot("127.0.0.1:8022:alpha:127.0.0.1:22", "database", "failed: port in use", 0, 7)
        self.assertEqual(
            forward_json(forward),
            {
                "forward": "127.0.0.1:8022:alpha:127.0.0.1:22",
                "source": "database",
                "state": "failed: port in use",
                "connections": 0,
                "connections_total": 7,
            },
        )

    def test_refusal(self) -> None:
        self.assertEqual(
            refusal_json(Refusal(T0, "", "handshake", "no client certificate")),
            {"time": "2026-12-05T23:14:05Z", "site": "", "kind": "handshake", "reason": "no client certificate"},
        )


class ResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.view = FakeView(
            site_list=[snapshot("beta", connected=False, peer="", streams=0), snapshot("alpha")],
            rates={"alpha": Throughput(10.0, [1.0, 2.0], [3.0, 4.0]), "beta": Throughput(10.0, [0.0, 0.0], [0.0, 0.0])},
            forward_list=[ForwardSnapshot("8022:alpha:127.0.0.1:22", "command line", "listening", 1, 3)],
            refusal_list=[
                Refusal(T0 - 1, "beta", "stream", "target not allowed"),
                Refusal(T0 - 9, "", "handshake", "certificate revoked"),
            ],
        )
        self.root = Resource()
        self.root.putChild(b"api", api_resource(self.view, self.clock))

    def get(self, target: str, method: str = "GET") -> Response:
        return request(self.root, method, target, self.clock)

    def json(self, target: str, status: int = 200) -> Any:
        response = self.get(target)
        self.assertEqual(response.status, status, response.body)
        self.assertEqual(response.headers["content-type"], "application/json")
        self.assertEqual(response.headers["cache-control"], "no-store")
        self.assertEqual(response.headers["x-content-type-options"], "nosniff")
        return json.loads(response.body)

    def test_sites_sorted_by_name_without_history(self) -> None:
        """The list is sorted by name whatever order the view gave; no throughput unless asked."""
        body = self.json("/api/v1/sites")
        self.assertEqual(body["generated"], "2026-12-05T23:14:05Z")
        self.assertEqual(body["replica"], "cloud-1:5500")  # the view's, for the page's header
        self.assertEqual(list(body), ["generated", "replica", "sites"])
        self.assertEqual([s["site"] for s in body["sites"]], ["alpha", "beta"])
        self.assertEqual([s["connected"] for s in body["sites"]], [True, False])
        for entry in body["sites"]:
            self.assertEqual(set(entry), SITE_KEYS)
        self.assertNotIn("throughput alpha", self.view.calls)

    def test_sites_with_history(self) -> None:
        body = self.json("/api/v1/sites?history=1")
        alpha = body["sites"][0]
        self.assertEqual(
            alpha["throughput"], {"interval_seconds": 10.0, "to_site": [1.0, 2.0], "from_site": [3.0, 4.0]}
        )
        self.assertEqual(set(body["sites"][1]), SITE_KEYS | {"throughput"})
        self.assertNotIn("throughput", self.json("/api/v1/sites?history=0")["sites"][0])

    def test_bad_history_flag(self) -> None:
        """A flag that is neither 0 nor 1 is refused, not read as true or false."""
        for query in ("history=yes", "history=1&history=0", "history="):
            body = self.json(f"/api/v1/sites?{query}", status=400)
            self.assertEqual(body, {"error": "query parameter 'history' must be 0 or 1, given once"}, query)

    def test_unknown_query_parameter(self) -> None:
        body = self.json("/api/v1/sites?histroy=1", status=400)
        self.assertEqual(body, {"error": "/api/v1/sites takes no query parameter 'histroy' (it takes: history, names)"})
        body = self.json("/api/v1/forwards?history=1", status=400)
        self.assertEqual(body, {"error": "/api/v1/forwards takes no query parameter 'history' (it takes: none)"})

    def test_one_site_always_has_throughput(self) -> None:
        body = self.json("/api/v1/sites/alpha")
        self.assertEqual(set(body), SITE_KEYS | {"throughput"})
        self.assertEqual(body["site"], "alpha")
        self.assertEqual(body["throughput"]["to_site"], [1.0, 2.0])

    def test_unknown_site(self) -> None:
        self.assertEqual(self.json("/api/v1/sites/gamma", status=404), {"error": "no site named 'gamma'"})

    def test_site_names_are_checked_before_lookup(self) -> None:
        """
        A name that breaks the naming rule is a 400 saying which rule, and
        the view is never asked about it; percent-escapes are decoded
        first, so an escaped slash is a bad character, not a path.
        """
        cases = {
            "/api/v1/sites/Alpha": "site name 'Alpha' has upper-case letters; use 'alpha'",
            "/api/v1/sites/a%2Fb": "site name 'a/b' contains '/'; allowed are a-z, 0-9, '.', '_' and '-'",
            "/api/v1/sites/%3Cscript%3E": "site name '<script>' must start with a lower-case letter or a digit",
            "/api/v1/sites/": "site name is empty",
            "/api/v1/sites/%FF%FE": "site name in the path is not valid UTF-8",
            "/api/v1/sites/" + "a" * 64: f"site name {'a' * 64!r} is 64 characters long; the limit is 63",
        }
        for target, error in cases.items():
            self.assertEqual(self.json(target, status=400), {"error": error}, target)
        self.assertEqual([c for c in self.view.calls if c.startswith("site ")], [])

    def test_forwards(self) -> None:
        body = self.json("/api/v1/forwards")
        self.assertEqual(
            body,
            {
                "generated": "2026-12-05T23:14:05Z",
                "forwards": [
                    {
                        "forward": "8022:alpha:127.0.0.1:22",
                        "source": "command line",
                        "state": "listening",
                        "connections": 1,
                        "connections_total": 3,
                    }
                ],
            },
        )

    def test_refusals_in_the_view_order(self) -> None:
        """Newest first, as the view keeps them."""
        body = self.json("/api/v1/refusals")
        self.assertEqual(
            body["refusals"],
            [
                {"time": "2026-12-05T23:14:04Z", "site": "beta", "kind": "stream", "reason": "target not allowed"},
                {"time": "2026-12-05T23:13:56Z", "site": "", "kind": "handshake", "reason": "certificate revoked"},
            ],
        )

    def test_generated_follows_the_clock(self) -> None:
        self.clock.advance(60)
        self.assertEqual(self.json("/api/v1/refusals")["generated"], "2026-12-05T23:15:05Z")

    def test_unknown_paths(self) -> None:
        for target in ("/api", "/api/", "/api/v2/sites", "/api/v1/sites/alpha/streams", "/api/v1/metrics"):
            body = self.json(target, status=404)
            self.assertIn("no such path", body["error"], target)
            self.assertIn("the API serves /api/v1/sites, /api/v1/sites/NAME", body["error"])
        self.assertEqual(
            self.json("/api/v1/nope", status=404)["error"],
            "no such path '/api/v1/nope'; the API serves /api/v1/sites, /api/v1/sites/NAME, /api/v1/forwards, "
            "/api/v1/refusals",
        )

    def test_only_get_and_head(self) -> None:
        """Read-only: every other method is a 405 with Allow, and reaches no view method."""
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            self.view.calls.clear()
            response = self.get("/api/v1/sites", method=method)
            self.assertEqual(response.status, 405, method)
            self.assertEqual(response.headers["allow"], "GET, HEAD")
            self.assertEqual(response.headers["content-type"], "application/json")
            self.assertEqual(
                json.loads(response.body),
                {"error": f"method {method} is not allowed: the admin endpoint is read-only (GET, HEAD)"},
            )
            self.assertEqual(self.view.calls, [])

    def test_head(self) -> None:
        """HEAD answers the GET's headers and length, with no body."""
        get = self.get("/api/v1/sites")
        head = self.get("/api/v1/sites", method="HEAD")
        self.assertEqual(head.status, 200)
        self.assertEqual(head.body, b"")
        self.assertEqual(head.headers["content-length"], get.headers["content-length"])
        self.assertEqual(head.headers["content-type"], "application/json")

    def test_peer_strings_come_out_as_json_strings(self) -> None:
        """Peer-influenced text is only ever a JSON string value, escaped by the encoder."""
        self.view.refusal_list = [Refusal(T0, "", "handshake", 'bad "name" </script><b>\n')]
        raw = self.get("/api/v1/refusals").body
        self.assertEqual(json.loads(raw)["refusals"][0]["reason"], 'bad "name" </script><b>\n')
        self.assertNotIn(b"\n", raw.rstrip(b"\n"))

    def test_a_thousand_sites_with_history(self) -> None:
        """A large fleet's history is one well-formed response, every site in it."""
        self.view.site_list = [snapshot(f"site-{i:04d}") for i in range(1000)]
        self.view.rates = {s.name: Throughput(10.0, [1.5] * 30, [2.5] * 30) for s in self.view.site_list}
        body = self.json("/api/v1/sites?history=1")
        self.assertEqual(len(body["sites"]), 1000)
        self.assertEqual(body["sites"][999]["throughput"]["from_site"], [2.5] * 30)


class HistoryNamesTests(SynchronousTestCase):
    """
    C{?history=1&names=a,b,c}: the whole list, the throughput of the named
    sites only (what the status page draws), names checked strictly.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        names = ["alpha", "beta", "gamma"]
        self.view = FakeView(
            site_list=[snapshot(name) for name in names],
            rates={name: Throughput(5.0, [float(i)], [float(i + 1)]) for i, name in enumerate(names)},
        )
        self.root = Resource()
        self.root.putChild(b"api", api_resource(self.view, self.clock))

    def json(self, target: str, status: int = 200) -> Any:
        response = request(self.root, "GET", target, self.clock)
        self.assertEqual(response.status, status, response.body)
        self.assertEqual(response.headers["content-type"], "application/json")
        return json.loads(response.body)

    def test_only_the_named_carry_throughput(self) -> None:
        """Every site is listed; the named ones, and only they, carry "throughput"; the others are plain SITEs."""
        self.view.calls.clear()
        body = self.json("/api/v1/sites?history=1&names=gamma,alpha")
        self.assertEqual([s["site"] for s in body["sites"]], ["alpha", "beta", "gamma"])
        by_name = {s["site"]: s for s in body["sites"]}
        self.assertEqual(
            by_name["alpha"]["throughput"], {"interval_seconds": 5.0, "to_site": [0.0], "from_site": [1.0]}
        )
        self.assertEqual(by_name["gamma"]["throughput"]["to_site"], [2.0])
        self.assertEqual(set(by_name["beta"]), SITE_KEYS)
        # Only the named sites' history was taken from the view.
        self.assertEqual(
            sorted(c for c in self.view.calls if c.startswith("throughput")), ["throughput alpha", "throughput gamma"]
        )

    def test_a_hundred_names(self) -> None:
        """The most it takes; duplicates count once in the answer."""
        self.view.site_list = [snapshot(f"s{i:03d}") for i in range(150)]
        self.view.rates = {s.name: Throughput(5.0, [1.0], [2.0]) for s in self.view.site_list}
        names = [f"s{i:03d}" for i in range(0, 100)]
        body = self.json("/api/v1/sites?history=1&names=" + ",".join(names))
        self.assertEqual(len(body["sites"]), 150)
        self.assertEqual([s["site"] for s in body["sites"] if "throughput" in s], names)
        body = self.json("/api/v1/sites?history=1&names=s001,s001")
        self.assertEqual([s["site"] for s in body["sites"] if "throughput" in s], ["s001"])

    def test_unknown_names_are_ignored(self) -> None:
        """
        A name the server does not know (a site removed since the client
        read the list) is no error: it is simply not in the answer.
        """
        body = self.json("/api/v1/sites?history=1&names=alpha,zeta")
        self.assertEqual([s["site"] for s in body["sites"]], ["alpha", "beta", "gamma"])
        self.assertEqual([s["site"] for s in body["sites"] if "throughput" in s], ["alpha"])
        self.assertNotIn("throughput zeta", self.view.calls)

    def test_refused(self) -> None:
        """Too many, a bad name, an empty one, given twice, or without history=1: a 400 that says which."""
        many = ",".join(f"s{i}" for i in range(101))
        cases = {
            f"history=1&names={many}": "query parameter 'names' lists 101 sites; it takes at most 100 (ask for the "
            "history of the sites shown, or leave names out for every site's)",
            "history=1&names=alpha,Beta": "query parameter 'names': site name 'Beta' has upper-case letters; use "
            "'beta'",
            "history=1&names=alpha,a%2Fb": "query parameter 'names': site name 'a/b' contains '/'; allowed are a-z, "
            "0-9, '.', '_' and '-'",
            "history=1&names=": "query parameter 'names': site name is empty",
            "history=1&names=alpha,,beta": "query parameter 'names': site name is empty",
            "history=1&names=%FF": "query parameter 'names' is not valid UTF-8",
            "history=1&names=alpha&names=beta": "query parameter 'names' must be given once, the names separated by "
            "commas",
            "names=alpha": "query parameter 'names' goes with history=1: it says whose throughput to carry",
            "history=0&names=alpha": "query parameter 'names' goes with history=1: it says whose throughput to carry",
        }
        for query, error in cases.items():
            self.view.calls.clear()
            self.assertEqual(self.json(f"/api/v1/sites?{query}", status=400), {"error": error}, query)
            self.assertEqual(self.view.calls, [], query)


class LargeFleetTests(SynchronousTestCase):
    """
    How C{/api/v1/sites} stays light on the reactor: its snapshots taken a
    few sites a reactor turn, the JSON made by the offload, the answer
    written as the connection takes it, and a client that goes away
    costing nothing more.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.view = FakeView(
            site_list=[snapshot(f"site-{i}") for i in (4, 1, 3, 0, 2)],
            rates={f"site-{i}": Throughput(5.0, [1.0] * 60, [2.0] * 60) for i in range(5)},
        )
        self.offloaded: list[object] = []

        def offload(work: Callable[[], list[bytes]]) -> Deferred[list[bytes]]:
            self.offloaded.append(work)
            return maybeDeferred(work)

        self.root = Resource()
        self.root.putChild(b"api", api_resource(self.view, self.clock, offload, step=2))

    def test_snapshots_in_steps(self) -> None:
        """
        Five sites at two a turn: the names when the request comes, then
        three turns of snapshots, each site asked once; the answer the same
        as taken at once, sorted by name. A site's history counts as two
        more (HISTORY_COST): one site with it a turn.
        """
        response = request(self.root, "GET", "/api/v1/sites", self.clock)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.turns, 3)
        body = json.loads(response.body)
        self.assertEqual([s["site"] for s in body["sites"]], [f"site-{i}" for i in range(5)])
        self.assertNotIn("throughput", body["sites"][0])
        self.assertEqual(request(self.root, "GET", "/api/v1/sites?history=1", self.clock).turns, 5)
        self.view.calls.clear()
        response = request(self.root, "GET", "/api/v1/sites?history=1&names=site-3", self.clock)
        self.assertEqual(response.turns, 3)
        body = json.loads(response.body)
        self.assertEqual(body["sites"][3]["throughput"]["from_site"], [2.0] * 60)
        self.assertEqual(self.view.calls.count("names"), 1)
        self.assertEqual(
            sorted(c for c in self.view.calls if c.startswith("site ")), [f"site site-{i}" for i in range(5)]
        )
        self.assertEqual(len(self.offloaded), 3)
        self.assertEqual(int(response.headers["content-length"]), len(response.body))

    def test_a_site_gone_between_turns_is_left_out(self) -> None:
        """A site the view no longer knows when its turn comes is not listed (nor an error)."""
        self.view.site_list = [snapshot(f"site-{i}") for i in range(5)]
        site = Site(self.root, reactor=self.clock)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5501))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /api/v1/sites HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        del self.view.site_list[4]
        while turn(self.clock):
            pass
        body = json.loads(transport.value().partition(b"\r\n\r\n")[2])
        self.assertEqual([s["site"] for s in body["sites"]], [f"site-{i}" for i in range(4)])

    def test_client_gone_while_snapshots_are_taken(self) -> None:
        """A client that goes away stops the snapshots: no more sites asked, nothing encoded or written."""
        site = Site(self.root, reactor=self.clock)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5501))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /api/v1/sites HTTP/1.1\r\nHost: localhost\r\n\r\n")
        turn(self.clock)  # the first two sites
        asked = [c for c in self.view.calls if c.startswith("site ")]
        self.assertEqual(len(asked), 2)
        channel.connectionLost(Failure(ConnectionDone()))
        while turn(self.clock):
            pass
        self.assertEqual([c for c in self.view.calls if c.startswith("site ")], asked)
        self.assertEqual(self.offloaded, [])
        self.assertEqual(transport.value(), b"")

    def test_client_gone_while_encoding(self) -> None:
        """An answer made after its client went away is dropped, not written to a closed connection."""
        pending: list[Deferred[list[bytes]]] = []

        def offload(work: Callable[[], list[bytes]]) -> Deferred[list[bytes]]:
            pending.append(Deferred())
            self.offloaded.append(work)
            return pending[-1]

        root = Resource()
        root.putChild(b"api", api_resource(self.view, self.clock, offload, step=100))
        site = Site(root, reactor=self.clock)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5501))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /api/v1/sites HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertEqual(len(pending), 1)
        channel.connectionLost(Failure(ConnectionDone()))
        work = self.offloaded[0]
        assert callable(work)
        pending[0].callback(work())  # the thread finishes after all
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_client_gone_while_written(self) -> None:
        """A large answer is written a piece a turn at most; the writing stops when the client goes."""
        self.patch(api, "WRITE_STEP", 1)
        self.patch(api, "ENCODE_STEP", 1)
        site = Site(self.root, reactor=self.clock)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5501))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /api/v1/sites HTTP/1.1\r\nHost: localhost\r\n\r\n")
        for _ in range(3):  # the snapshots of five sites two a turn, and the first piece
            turn(self.clock)
        written = len(transport.value())
        self.assertIn(b"Content-Length: ", transport.value())
        turn(self.clock)  # one more piece
        self.assertGreater(len(transport.value()), written)
        channel.connectionLost(Failure(ConnectionDone()))
        written = len(transport.value())
        while turn(self.clock):
            pass
        self.assertEqual(len(transport.value()), written)
        self.assertFalse(transport.value().endswith(b"]}\n"))

    def test_encoding_failed(self) -> None:
        """A bug in the encoding is a 500 in JSON and a logged failure, not a request left hanging."""

        def broken(*args: object) -> list[bytes]:
            raise ValueError("out of range float values are not JSON compliant")

        self.patch(api, "sites_body", broken)
        response = request(self.root, "GET", "/api/v1/sites", self.clock)
        self.assertEqual(response.status, 500)
        self.assertEqual(
            json.loads(response.body), {"error": "the answer could not be made; the tunnel server's log says why"}
        )
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class InThreadPoolTests(unittest.TestCase):
    """The tunnel server's offload: the snapshots on the reactor thread, the JSON in the reactor's thread pool."""

    def test_encoded_off_the_reactor_thread(self) -> Deferred[None]:
        from twisted.internet import reactor

        snapshots_in_io_thread: list[bool] = []

        class Recording(FakeView):
            def site(self, name: str) -> SiteSnapshot | None:
                snapshots_in_io_thread.append(isInIOThread())
                return super().site(name)

        view = Recording(site_list=[snapshot(f"site-{i:04d}") for i in range(600)])
        encoded_in: list[threading.Thread] = []
        real_body = api.sites_body

        def sites_body(*args: Any) -> list[bytes]:
            encoded_in.append(threading.current_thread())
            return real_body(*args)

        self.patch(api, "sites_body", sites_body)
        root = Resource()
        root.putChild(b"api", api_resource(view, reactor, api.in_thread_pool(reactor)))
        requests: list[Request] = []

        class Recorded(Request):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                requests.append(self)

        site = Site(root, reactor=reactor)
        site.requestFactory = Recorded
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5501))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /api/v1/sites HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        self.assertEqual(len(requests), 1)

        def finished(_: object) -> None:
            body = json.loads(transport.value().partition(b"\r\n\r\n")[2])
            self.assertEqual(len(body["sites"]), 600)
            self.assertEqual(len(snapshots_in_io_thread), 600)
            self.assertTrue(all(snapshots_in_io_thread))
            self.assertEqual(len(encoded_in), 1)
            self.assertIsNot(encoded_in[0], threading.current_thread())
            self.assertIn(encoded_in[0].name, {t.name for t in reactor.getThreadPool().threads})
            channel.connectionLost(Failure(ConnectionDone()))

        done: Deferred[None] = requests[0].notifyFinish()
        return done.addCallback(finished)
