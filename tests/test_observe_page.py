"""
The status page as served: self-contained (nothing from elsewhere, a
policy that forbids it), read-only, mountable as the endpoint's root, and
fetching only paths the JSON API serves. (Its behaviour in a browser is
tests/test_e2e_status_page.py.)
"""

from __future__ import annotations

import base64
import hashlib
import re

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from rtunnel.observe.api import MAX_HISTORY_NAMES, api_resource
from rtunnel.observe.page import content_security_policy, page_html, status_page
from tests.observe_web_helpers import T0, FakeView, request, snapshot

#: Every JSON API path the page's script names.
API_PATHS = ["api/v1/sites", "api/v1/sites?history=1&names=", "api/v1/forwards", "api/v1/refusals"]


def _api_paths(html: str) -> list[str]:
    return re.findall(r'"(api/[^"]*)"', html)


def _policy(header: str) -> dict[str, list[str]]:
    directives = {}
    for part in header.split(";"):
        name, *values = part.split()
        directives[name] = values
    return directives


class PageContentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.html = page_html().decode("utf-8")

    def test_no_external_reference(self) -> None:
        """
        No URL with a scheme or a protocol-relative one anywhere in a src,
        href, url() or fetch; no web font, no import. The one absolute URL
        allowed is the SVG namespace, which is a name and never fetched.
        """
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+[^\s\"'`)]*", self.html))
        self.assertEqual(urls, {"http://www.w3.org/2000/svg"})
        for pattern in (r"\bsrc\s*=", r"<link\b", r"@import", r"@font-face", r"url\(", r"<iframe", r"<img\b"):
            self.assertIsNone(re.search(pattern, self.html, re.IGNORECASE), pattern)

    def test_data_never_becomes_markup(self) -> None:
        """The page builds DOM with textContent; nothing parses strings as HTML."""
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            self.assertNotIn(sink, self.html)

    def test_nothing_changes_state(self) -> None:
        """No form, and every request the script makes is a plain GET of the JSON API (through getJSON)."""
        self.assertNotIn("<form", self.html)
        self.assertNotIn("method:", self.html)
        self.assertEqual(self.html.count("fetch("), 1)
        self.assertEqual(_api_paths(self.html), API_PATHS)
        self.assertEqual(
            re.findall(r"(?<!function )getJSON\(([^,]+),", self.html),
            ["path", '"api/v1/forwards"', '"api/v1/refusals"'],
        )

    def test_history_only_when_sampled(self) -> None:
        """
        The history is asked for only for the rows drawn (no more than the
        API takes), and only once a sample interval has passed since the
        last one read (the interval the API reports) or a row drawn has
        none yet; the plain list on the other refreshes (the timing itself
        is checked in a browser: tests/test_e2e_status_page.py).
        """
        self.assertIn('const SITES = "api/v1/sites";', self.html)
        self.assertIn('const SITES_HISTORY = "api/v1/sites?history=1&names=";', self.html)
        self.assertIn(f"const MAX_ROWS = {MAX_HISTORY_NAMES};", self.html)
        self.assertIn("drawn = shown.map((s) => s.site);", self.html)
        self.assertIn("historyAt === null || Date.now() - historyAt >= sampleMs || missingHistory()", self.html)
        self.assertIn('SITES_HISTORY + names.map(encodeURIComponent).join(",")', self.html)
        self.assertIn("num(sampled.throughput.interval_seconds) * 1000", self.html)

    def test_policy_hashes_the_inline_blocks(self) -> None:
        """The policy allows exactly the page's own style and script, by digest, and nothing from elsewhere."""
        policy = _policy(content_security_policy(page_html()))
        script = re.search(r"<script>(.*?)</script>", self.html, re.DOTALL)
        assert script is not None
        digest = base64.b64encode(hashlib.sha256(script.group(1).encode()).digest()).decode()
        self.assertEqual(policy["script-src"], [f"'sha256-{digest}'"])
        self.assertEqual(len(policy["style-src"]), 1)
        self.assertTrue(policy["style-src"][0].startswith("'sha256-"))
        self.assertEqual(policy["default-src"], ["'none'"])
        self.assertEqual(policy["connect-src"], ["'self'"])
        self.assertEqual(policy["form-action"], ["'none'"])
        self.assertEqual(policy["base-uri"], ["'none'"])
        for values in policy.values():
            self.assertFalse({"'unsafe-inline'", "'unsafe-eval'", "*", "http:", "https:", "data:"} & set(values))

    def test_policy_refuses_a_second_script(self) -> None:
        """An edit that adds an inline block would be blocked silently by browsers: fail at load instead."""
        html = page_html().replace(b"</body>", b"<script>1</script></body>")
        with self.assertRaises(ValueError) as caught:
            content_security_policy(html)
        self.assertEqual(str(caught.exception), "the status page must have exactly one inline <script> block, not 2")

    def test_page_is_modest(self) -> None:
        """Hand-written and light enough for a phone on a slow link."""
        self.assertLess(len(page_html()), 32 * 1024)


class PageResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.view = FakeView(site_list=[snapshot("alpha")])

    def test_served_with_its_policy(self) -> None:
        response = request(status_page(), "GET", "/")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, page_html())
        self.assertEqual(response.headers["content-type"], "text/html; charset=utf-8")
        self.assertEqual(response.headers["content-security-policy"], content_security_policy(page_html()))
        self.assertEqual(response.headers["x-content-type-options"], "nosniff")
        self.assertEqual(response.headers["x-frame-options"], "DENY")
        self.assertEqual(response.headers["referrer-policy"], "no-referrer")

    def test_head(self) -> None:
        response = request(status_page(), "HEAD", "/")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"")
        self.assertEqual(int(response.headers["content-length"]), len(page_html()))

    def test_read_only(self) -> None:
        for method in ("POST", "PUT", "DELETE"):
            response = request(status_page(), method, "/")
            self.assertEqual(response.status, 405, method)
            self.assertEqual(response.headers["allow"], "GET, HEAD")

    def test_as_root_with_the_api_as_a_child(self) -> None:
        """
        Mounted as the endpoint's root, the page answers C{/}, its children
        (the API) answer their paths, and anything else is a 404; the
        paths the page fetches are all served.
        """
        root = status_page()
        root.putChild(b"api", api_resource(self.view, self.clock))
        self.assertEqual(request(root, "GET", "/").body, page_html())
        for path in _api_paths(page_html().decode()):
            path += "alpha" if path.endswith("names=") else ""
            response = request(root, "GET", "/" + path, self.clock)
            self.assertEqual(response.status, 200, path)
            self.assertEqual(response.headers["content-type"], "application/json")
        for path in ("/index.html", "/status", "/x/", "/favicon.ico/x"):
            self.assertEqual(request(root, "GET", path).status, 404, path)

    def test_as_a_child_of_another_root(self) -> None:
        root = Resource()
        root.putChild(b"", status_page())
        self.assertEqual(request(root, "GET", "/").body, page_html())
