"""
The JSON API of the admin endpoint: the pure snapshot-to-JSON functions,
then the resource through a real twisted.web Site in memory (routing,
methods, headers, strict site names, HEAD).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from rtunnel.observe.api import api_resource, forward_json, iso_time, refusal_json, site_json, throughput_json
from rtunnel.observe.view import ForwardSnapshot, Refusal, Throughput
from tests.observe_web_helpers import T0, FakeView, Response, request, snapshot

SITE_KEYS = {
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
        self.assertEqual(body, {"error": "/api/v1/sites takes no query parameter 'histroy' (it takes: history)"})
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
