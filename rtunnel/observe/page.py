"""
The status page of the admin endpoint: one hand-written HTML file
(C{page/status.html}) with its CSS and JavaScript inline, which draws the
fleet from the JSON API (L{rtunnel.observe.api}) and refreshes itself.

Sites and clouds are often air-gapped, so the page loads nothing from
anywhere else; its C{Content-Security-Policy} says so to the browser too:
only the page's own inline style and script (by their SHA-256, not
C{'unsafe-inline'}) run, and it may fetch only from its own origin. A
name or reason a peer sent that somehow reached the page as markup would
still run nothing.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files

from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

__all__ = ["content_security_policy", "page_html", "status_page"]

_INLINE = {
    "style": re.compile(r"<style>(.*?)</style>", re.DOTALL),
    "script": re.compile(r"<script>(.*?)</script>", re.DOTALL),
}


def page_html() -> bytes:
    """The page as shipped in the package."""
    return files("rtunnel.observe").joinpath("page/status.html").read_bytes()


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def content_security_policy(html: bytes) -> str:
    """
    The policy for C{html}: nothing from elsewhere, and of the inline
    code only the exact blocks the page has.

    @raise ValueError: if the page has not exactly one C{<style>} and one
        C{<script>} block (an edit that adds one would otherwise be
        blocked by the browser without a word).
    """
    text = html.decode("utf-8")
    sources = {}
    for tag, pattern in _INLINE.items():
        blocks = pattern.findall(text)
        if len(blocks) != 1:
            raise ValueError(f"the status page must have exactly one inline <{tag}> block, not {len(blocks)}")
        sources[tag] = _digest(blocks[0])
    return "; ".join(
        [
            "default-src 'none'",
            f"style-src {sources['style']}",
            f"script-src {sources['script']}",
            "connect-src 'self'",
            "img-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


class _StatusPage(Resource):
    """
    The page at the path it is mounted on. It may be the admin endpoint's
    root with the other resources as its children (C{/favicon.ico} among
    them: L{rtunnel.observe.web.admin_root}), so a request for the root
    itself (an empty last segment) is the page and any other unknown
    child is a 404.
    """

    def __init__(self, html: bytes) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Resource.__init__ is unannotated in Twisted
        self._html = html
        self._policy = content_security_policy(html).encode("ascii")

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"" and not request.postpath:
            return self
        return notFound("No such page", "The admin endpoint has no page here.")

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, HEAD")
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"The admin endpoint is read-only: GET and HEAD only.\n"
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Security-Policy", self._policy)
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"X-Frame-Options", b"DENY")
        return self._html


def status_page() -> Resource:
    """The status page, to mount at C{/} of the admin endpoint."""
    return _StatusPage(page_html())
