"""
The JSON API of the admin endpoint: C{/api/v1/sites}, C{/api/v1/sites/NAME},
C{/api/v1/forwards} and C{/api/v1/refusals}.

It is what the status page draws and what C{rtunnel sites list} reads, and
an operator's scripts may read it too, so its shape is a contract (times
ISO 8601 UTC with C{Z}, durations in seconds, bytes as integers; see
docs/operations.md). The functions that turn snapshots into JSON values are
pure, so that contract is tested without a server; the resource only
routes, refuses, and encodes.

Nothing here changes state: GET and HEAD only. Site names in paths come
from whoever can reach the endpoint, so they are decoded strictly and
checked against the site naming rule before any lookup.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request

from ..identity.certs import validate_site_name
from ..identity.errors import InvalidSiteName
from .view import FleetView, ForwardSnapshot, Refusal, SiteSnapshot, Throughput

__all__ = [
    "api_resource",
    "forward_json",
    "iso_time",
    "refusal_json",
    "site_json",
    "throughput_json",
]

JSONValue = Any

#: What the API serves, for the error that answers a path it does not.
_PATHS = "/api/v1/sites, /api/v1/sites/NAME, /api/v1/forwards, /api/v1/refusals"


def iso_time(seconds: float) -> str:
    """
    Seconds since the epoch as ISO 8601 UTC to the second, C{Z}-suffixed:
    the one time format of the API, which every JSON parser and C{date -d}
    read without a timezone table.
    """
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _finite(value: float | None) -> float | None:
    """A float JSON can carry: NaN and infinities have no JSON form, so they become C{null}."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _seconds(value: float | None) -> float | None:
    """
    A duration to the microsecond: the clock's float noise
    (C{0.0007143020629882812}) is no information, and JSON has no NaN.
    """
    value = _finite(value)
    return None if value is None else round(value, 6)


def _rate(value: float) -> float:
    """
    A rate in bytes per second, to a tenth: a finer figure means nothing on
    a graph and would only swell C{?history=1} for a large fleet.
    """
    return round(value, 1) if math.isfinite(value) else 0.0


def refusal_json(refusal: Refusal) -> dict[str, JSONValue]:
    """One entry of C{/api/v1/refusals}."""
    return {
        "time": iso_time(refusal.time),
        "site": refusal.site,
        "kind": refusal.kind,
        "reason": refusal.reason,
    }


def throughput_json(throughput: Throughput) -> dict[str, JSONValue]:
    """A site's recent throughput, oldest first, in bytes per second each way."""
    return {
        "interval_seconds": float(throughput.interval),
        "to_site": [_rate(rate) for rate in throughput.to_site],
        "from_site": [_rate(rate) for rate in throughput.from_site],
    }


def site_json(
    site: SiteSnapshot, throughput: Throughput | None = None, with_throughput: bool = False
) -> dict[str, JSONValue]:
    """
    One SITE object. C{throughput} is carried when C{with_throughput} is
    set (C{null} if the view had none: the site may have gone between the
    two reads).
    """
    last = site.last_refusal
    value: dict[str, JSONValue] = {
        "site": site.name,
        "connected": site.connected,
        "enrolled": site.enrolled,
        "revoked": site.revoked,
        "since": None if site.since is None else iso_time(site.since),
        "peer": site.peer or None,
        "services": dict(sorted(site.services.items())),
        "streams": int(site.streams),
        "bytes_to_site": int(site.bytes_to_site),
        "bytes_from_site": int(site.bytes_from_site),
        "rtt_seconds": _seconds(site.rtt),
        "last_refusal": None
        if last is None
        else {"time": iso_time(last.time), "kind": last.kind, "reason": last.reason},
    }
    if with_throughput:
        value["throughput"] = None if throughput is None else throughput_json(throughput)
    return value


def forward_json(forward: ForwardSnapshot) -> dict[str, JSONValue]:
    """One entry of C{/api/v1/forwards}."""
    return {
        "forward": forward.spec,
        "source": forward.source,
        "state": forward.state,
        "connections": int(forward.connections),
        "connections_total": int(forward.connections_total),
    }


class _Refused(Exception):
    """A request the API answers with an error status and C{{"error": message}}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _flag(args: Mapping[bytes, list[bytes]], name: bytes) -> bool:
    """A C{0}/C{1} query flag; anything else is refused rather than guessed at."""
    values = args.get(name, [])
    if not values:
        return False
    if len(values) > 1 or values[0] not in (b"0", b"1"):
        raise _Refused(400, f"query parameter {name.decode()!r} must be 0 or 1, given once")
    return values[0] == b"1"


def _only(args: Mapping[bytes, list[bytes]], allowed: frozenset[bytes], path: str) -> None:
    """Refuse a query parameter the path does not take, so a typo is not silently ignored."""
    for key in sorted(args):
        if key not in allowed:
            takes = ", ".join(sorted(k.decode() for k in allowed)) or "none"
            shown = key.decode("utf-8", "replace")
            raise _Refused(400, f"{path} takes no query parameter {shown!r} (it takes: {takes})")


def _site_name(raw: bytes) -> str:
    """A site name from a path segment (already percent-decoded by twisted.web), or a 400."""
    try:
        text = raw.decode("utf-8", "strict")
    except UnicodeDecodeError:
        raise _Refused(400, "site name in the path is not valid UTF-8") from None
    try:
        return validate_site_name(text)
    except InvalidSiteName as e:
        raise _Refused(400, str(e)) from None


class _API(Resource):
    """
    Routes the four paths by the segments after the mount point; a leaf, so
    twisted.web hands it the whole rest of the path.
    """

    isLeaf = True

    def __init__(self, view: FleetView, clock: IReactorTime) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Resource.__init__ is unannotated in Twisted
        self._view = view
        self._clock = clock

    def render(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        try:
            if request.method not in (b"GET", b"HEAD"):
                request.setHeader(b"Allow", b"GET, HEAD")
                method = (request.method or b"").decode("ascii", "replace")
                raise _Refused(405, f"method {method} is not allowed: the admin endpoint is read-only (GET, HEAD)")
            value = self._route(request)
            request.setResponseCode(200)
        except _Refused as refused:
            request.setResponseCode(refused.status)
            value = {"error": refused.message}
        return _encode(value)

    def _route(self, request: Request) -> JSONValue:
        segments = list(request.postpath or [])
        args: Mapping[bytes, list[bytes]] = request.args or {}
        match segments:
            case [b"v1", b"sites"]:
                _only(args, frozenset({b"history"}), "/api/v1/sites")
                return self._sites(_flag(args, b"history"))
            case [b"v1", b"sites", raw]:
                _only(args, frozenset(), "/api/v1/sites/NAME")
                return self._site(_site_name(raw))
            case [b"v1", b"forwards"]:
                _only(args, frozenset(), "/api/v1/forwards")
                return {"generated": self._now(), "forwards": [forward_json(f) for f in self._view.forwards()]}
            case [b"v1", b"refusals"]:
                _only(args, frozenset(), "/api/v1/refusals")
                return {"generated": self._now(), "refusals": [refusal_json(r) for r in self._view.refusals()]}
        path = (request.path or b"").decode("utf-8", "replace")
        raise _Refused(404, f"no such path {path!r}; the API serves {_PATHS}")

    def _now(self) -> str:
        return iso_time(self._clock.seconds())

    def _sites(self, history: bool) -> JSONValue:
        sites = sorted(self._view.sites(), key=lambda s: s.name)
        view = self._view
        return {
            "generated": self._now(),
            "sites": [
                site_json(s, view.throughput(s.name) if history else None, with_throughput=history) for s in sites
            ],
        }

    def _site(self, name: str) -> JSONValue:
        site = self._view.site(name)
        if site is None:
            raise _Refused(404, f"no site named {name!r}")
        return site_json(site, self._view.throughput(name), with_throughput=True)


def _encode(value: JSONValue) -> bytes:
    # allow_nan=False: a NaN slipping through would make the whole response
    # unreadable to strict parsers; better a loud 500 in the test suite.
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


def api_resource(view: FleetView, clock: IReactorTime) -> Resource:
    """
    The JSON API, to mount at C{/api} of the admin endpoint.

    @param view: where the figures come from, read on each request.
    @param clock: the reactor, for the C{generated} time of each response.
    """
    return _API(view, clock)
