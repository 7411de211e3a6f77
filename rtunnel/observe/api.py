"""
The JSON API of the admin endpoint: C{/api/v1/sites}, C{/api/v1/sites/NAME},
C{/api/v1/forwards} and C{/api/v1/refusals}.

It is what the status page draws and what C{rtunnel sites list} reads, and
an operator's scripts may read it too, so its shape is a contract (times
ISO 8601 UTC with C{Z}, durations in seconds, bytes as integers; see
docs/operations.md). The functions that turn snapshots into JSON values are
pure, so that contract is tested without a server; the resource routes,
refuses, takes the snapshots on the reactor and has the JSON made in the
reactor's thread pool: at ten thousand sites C{/api/v1/sites} is about
3 MB, and making it on the reactor held every tunnel up for over 100 ms.

Nothing here changes state: GET and HEAD only. Site names in paths and
queries come from whoever can reach the endpoint, so they are decoded
strictly and checked against the site naming rule before any lookup.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, cast

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorFromThreads,
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from ..identity.certs import validate_site_name
from ..identity.errors import InvalidSiteName
from ..logs import Logger
from ..logsafe import printable
from .view import FleetView, ForwardSnapshot, Refusal, SiteSnapshot, Throughput

__all__ = [
    "ENCODE_STEP",
    "HISTORY_COST",
    "MAX_HISTORY_NAMES",
    "SNAPSHOT_STEP",
    "WRITE_STEP",
    "Offload",
    "api_resource",
    "forward_json",
    "in_thread_pool",
    "iso_time",
    "refusal_json",
    "site_json",
    "sites_body",
    "throughput_json",
]

JSONValue = Any

#: What the API serves, for the error that answers a path it does not.
_PATHS = "/api/v1/sites, /api/v1/sites/NAME, /api/v1/forwards, /api/v1/refusals"

#: Sites whose snapshots are taken in one reactor turn: about 1 ms of the
#: reactor (measured: 3.5 to 5 µs a site at ten thousand sites on a busy
#: two-core machine, bench/api_scale.py), so that a large fleet's list never
#: holds the tunnels up for longer.
SNAPSHOT_STEP = 250

#: What a site's throughput history adds to its snapshot, in sites (about
#: 1 to 3 µs on the same machine: one array slice).
HISTORY_COST = 1

#: Sites made into JSON between two yields of the interpreter lock (see
#: L{sites_body}): 0.1 ms of work, 1 ms with their history.
ENCODE_STEP = 20

#: Bytes of a large answer written in one reactor turn when the connection
#: takes them faster than that (L{_Writer}).
WRITE_STEP = 256 * 1024

#: Sites C{?history=1&names=} takes: the rows a status page draws.
MAX_HISTORY_NAMES = 100


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
        "replica": site.replica,
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


def _history_names(args: Mapping[bytes, list[bytes]], history: bool) -> frozenset[str] | None:
    """
    C{names=a,b,c}: the sites whose throughput C{?history=1} carries
    (C{None}: every site's). At most L{MAX_HISTORY_NAMES}, each a valid
    site name; one the server does not know is no error (a site may have
    been removed since the client read the list), it is simply not there.
    """
    values = args.get(b"names")
    if values is None:
        return None
    if not history:
        raise _Refused(400, "query parameter 'names' goes with history=1: it says whose throughput to carry")
    if len(values) != 1:
        raise _Refused(400, "query parameter 'names' must be given once, the names separated by commas")
    raw = values[0]
    if raw.count(b",") >= MAX_HISTORY_NAMES:
        raise _Refused(
            400,
            f"query parameter 'names' lists {raw.count(b',') + 1} sites; it takes at most {MAX_HISTORY_NAMES} "
            "(ask for the history of the sites shown, or leave names out for every site's)",
        )
    try:
        text = raw.decode("utf-8", "strict")
    except UnicodeDecodeError:
        raise _Refused(400, "query parameter 'names' is not valid UTF-8") from None
    try:
        return frozenset(validate_site_name(name) for name in text.split(","))
    except InvalidSiteName as e:
        raise _Refused(400, f"query parameter 'names': {e}") from None


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


def sites_body(
    generated: str,
    sites: Sequence[SiteSnapshot],
    history: bool,
    rates: Mapping[str, Throughput | None],
    replica: str | None = None,
) -> list[bytes]:
    """
    The body of C{/api/v1/sites}, in pieces to be sent in order: a pure
    function of frozen snapshots, so it may run in any thread. With
    C{history}, the sites in C{rates} carry their throughput (C{null} where
    the view had none), the others none. C{replica}, the id of the server
    replica answering, is carried beside the list when given (the status
    page's header shows it even when there is no site).

    Made and kept in pieces of L{ENCODE_STEP} sites, never joined, and the
    interpreter lock let go after each: the reactor thread needs that lock
    for every event it handles, and a thread that computes keeps it until
    the interpreter's switch interval (5 ms) forces it out, so every tunnel
    event would wait up to that long while the JSON is made; measured at
    ten thousand sites, the reactor waited 5 ms (median) each time it woke,
    0.1 to 0.3 ms with a C{sleep(0)} after each piece. A single
    C{json.dumps} of a whole fleet, or joining or encoding megabytes, is
    one C call that holds the lock throughout (5 to 9 ms apiece for ten
    megabytes here, mostly the page faults of a fresh buffer).
    """
    top: dict[str, JSONValue] = {"generated": generated}
    if replica is not None:
        top["replica"] = replica
    top["sites"] = []
    head = _dumps(top)[:-2]  # up to and with the list's "["
    pieces = [head.encode("utf-8")]
    for start in range(0, len(sites), ENCODE_STEP):
        values = [
            site_json(site, rates.get(site.name), with_throughput=history and site.name in rates)
            for site in sites[start : start + ENCODE_STEP]
        ]
        text = _dumps(values)[1:-1]
        pieces.append((text if start == 0 else "," + text).encode("utf-8"))
        time.sleep(0)  # let a waiting reactor thread in
    pieces.append(b"]}\n")
    return pieces


def _list_body(key: str, generated: str, values: Callable[[], list[JSONValue]]) -> list[bytes]:
    """The body of a list path other than the sites (forwards, refusals), from C{values()}, a pure function."""
    return [_encode({"generated": generated, key: values()})]


#: Runs a pure function away from the reactor thread and fires with its
#: result on the reactor thread (L{in_thread_pool}).
Offload = Callable[[Callable[[], list[bytes]]], Deferred[list[bytes]]]


def in_thread_pool(reactor: IReactorFromThreads) -> Offload:
    """
    An L{Offload} in C{reactor}'s thread pool (twistd's, which serves
    C{/metrics} too), its results back on the reactor thread. The pool is
    asked for at the first answer, not before: a reactor makes it on demand.
    """

    def offload(work: Callable[[], list[bytes]]) -> Deferred[list[bytes]]:
        return deferToThreadPool(reactor, cast(IReactorThreads, reactor).getThreadPool(), work)

    return offload


def _inline(work: Callable[[], list[bytes]]) -> Deferred[list[bytes]]:
    return maybeDeferred(work)


class _API(Resource):
    """
    Routes the four paths by the segments after the mount point; a leaf, so
    twisted.web hands it the whole rest of the path.

    The lists are answered in three parts, so that none holds the reactor
    (and every tunnel) for long whatever the size of the fleet. On the
    reactor thread, where the roles keep them, the view's snapshots are
    taken, the sites' a few at a time (L{SNAPSHOT_STEP} sites a reactor
    turn); the JSON is made from them by C{offload} (the reactor's thread
    pool); back on the reactor its pieces are written as the connection
    takes them (L{_Writer}). A client that goes away meanwhile stops the
    snapshots and the writing, and its answer is dropped. One site and
    every error are small, and answered at once.
    """

    isLeaf = True

    def __init__(self, view: FleetView, clock: IReactorTime, offload: Offload, step: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Resource.__init__ is unannotated in Twisted
        self._view = view
        self._clock = clock
        self._offload = offload
        self._step = step

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        try:
            if request.method not in (b"GET", b"HEAD"):
                request.setHeader(b"Allow", b"GET, HEAD")
                method = (request.method or b"").decode("ascii", "replace")
                raise _Refused(405, f"method {method} is not allowed: the admin endpoint is read-only (GET, HEAD)")
            value = self._route(request)
        except _Refused as refused:
            request.setResponseCode(refused.status)
            return _encode({"error": refused.message})
        if isinstance(value, _Answer):
            value.start()
            return NOT_DONE_YET
        request.setResponseCode(200)
        return _encode(value)

    def _route(self, request: Request) -> JSONValue:
        segments = list(request.postpath or [])
        args: Mapping[bytes, list[bytes]] = request.args or {}
        view = self._view
        match segments:
            case [b"v1", b"sites"]:
                _only(args, frozenset({b"history", b"names"}), "/api/v1/sites")
                history = _flag(args, b"history")
                return _Sites(self, request, history, _history_names(args, history))
            case [b"v1", b"sites", raw]:
                _only(args, frozenset(), "/api/v1/sites/NAME")
                return self._site(_site_name(raw))
            case [b"v1", b"forwards"]:
                _only(args, frozenset(), "/api/v1/forwards")
                forwards = view.forwards()
                return _Answer(
                    self, request, partial(_list_body, "forwards", self._now(), partial(_forwards, forwards))
                )
            case [b"v1", b"refusals"]:
                _only(args, frozenset(), "/api/v1/refusals")
                refusals = view.refusals()
                return _Answer(
                    self, request, partial(_list_body, "refusals", self._now(), partial(_refusals, refusals))
                )
        path = (request.path or b"").decode("utf-8", "replace")
        raise _Refused(404, f"no such path {path!r}; the API serves {_PATHS}")

    def _now(self) -> str:
        return iso_time(self._clock.seconds())

    def _site(self, name: str) -> JSONValue:
        site = self._view.site(name)
        if site is None:
            raise _Refused(404, f"no site named {name!r}")
        return site_json(site, self._view.throughput(name), with_throughput=True)


def _forwards(forwards: Sequence[ForwardSnapshot]) -> list[JSONValue]:
    return [forward_json(f) for f in forwards]


def _refusals(refusals: Sequence[Refusal]) -> list[JSONValue]:
    return [refusal_json(r) for r in refusals]


class _Answer:
    """
    One list answer: its snapshots taken (here already; L{_Sites} takes
    them a few at a time), its body made by the API's offload, written if
    the client is still there.
    """

    _log = Logger()

    def __init__(self, api: _API, request: Request, body: Callable[[], list[bytes]] | None = None) -> None:
        self.api = api
        self.request = request
        self.body = body
        #: the client went away: take nothing more, write nothing
        self.gone = False
        self._writer: _Writer | None = None
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, reason: Failure) -> None:
        self.gone = True
        # The request does not stop its producer when its connection is lost.
        if self._writer is not None:
            self._writer.stopProducing()

    def start(self) -> None:
        body, self.body = self.body, None
        assert body is not None
        self.encode(body)

    def encode(self, body: Callable[[], list[bytes]]) -> None:
        self.api._offload(body).addCallbacks(self._write, self._failed)

    def _write(self, pieces: list[bytes]) -> None:
        if self.gone:
            return
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"Content-Length", b"%d" % sum(map(len, pieces)))
        if request.method == b"HEAD":
            request.write(b"")  # the headers alone
            request.finish()
            return
        self._writer = _Writer(request, pieces, self.api._clock)
        self._writer.start()

    def _failed(self, failure: Failure) -> None:
        self._log.failure(
            "admin endpoint: making the answer to {path} failed", failure, path=_printable_path(self.request)
        )
        if self.gone:
            return
        request = self.request
        request.setResponseCode(500)
        body = _encode({"error": "the answer could not be made; the tunnel server's log says why"})
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()


def _printable_path(request: Request) -> str:
    return printable((request.path or b"").decode("utf-8", "replace"), 200)


class _Sites(_Answer):
    """C{/api/v1/sites}: the snapshots taken L{SNAPSHOT_STEP} sites a reactor turn, then encoded."""

    def __init__(self, api: _API, request: Request, history: bool, names: frozenset[str] | None) -> None:
        super().__init__(api, request)
        self.history = history
        self.names = names
        self.generated = api._now()
        self.order: Sequence[str] = ()
        self.sites: list[SiteSnapshot] = []
        self.rates: dict[str, Throughput | None] = {}

    def start(self) -> None:
        # Sorted already by the contract of names(), which makes this cheap.
        self.order = sorted(self.api._view.names())
        if len(self.order) <= self.api._step:
            self._step(0)
        else:
            # Listing ten thousand names is a reactor turn's work of its own.
            self.api._clock.callLater(0, self._step, 0)

    def _step(self, start: int) -> None:
        if self.gone:
            return
        view, order, names = self.api._view, self.order, self.names
        rates = self.rates if self.history else None
        budget = self.api._step
        index = start
        while index < len(order) and budget > 0:
            name = order[index]
            index += 1
            site = view.site(name)
            if site is None:
                continue  # gone since the list was read
            self.sites.append(site)
            budget -= 1
            if rates is not None and (names is None or name in names):
                rates[name] = view.throughput(name)
                budget -= HISTORY_COST
        if index < len(order):
            self.api._clock.callLater(0, self._step, index)
            return
        # The snapshots go to the thread, and are freed there: a fleet's
        # (a million objects with the history) took 17 ms to free here.
        sites, rates = self.sites, self.rates
        self.sites, self.rates = [], {}
        self.encode(partial(sites_body, self.generated, sites, self.history, rates, self.api._view.replica_id))


@implementer(IPushProducer)
class _Writer:
    """
    Writes a body's pieces as the connection takes them: the next piece
    when the transport has sent the last (it pauses this producer once it
    holds more than its buffer), at most L{WRITE_STEP} bytes a reactor turn
    when it never does. Written at once, ten megabytes would be joined into
    one buffer on the reactor by the transport before the first send.
    """

    def __init__(self, request: Request, pieces: list[bytes], clock: IReactorTime) -> None:
        self._request = request
        self._pieces = deque(pieces)
        self._clock = clock
        self._paused = False
        self._done = False
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._write()

    def _write(self) -> None:
        self._call = None
        pieces, written = self._pieces, 0
        while pieces and not (self._paused or self._done) and written < WRITE_STEP:
            piece = pieces.popleft()
            written += len(piece)
            self._request.write(piece)
        if self._done or self._paused:
            return
        if pieces:
            self._call = self._clock.callLater(0, self._write)
            return
        self._done = True
        self._request.unregisterProducer()
        self._request.finish()

    def pauseProducing(self) -> None:
        self._paused = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def resumeProducing(self) -> None:
        self._paused = False
        if self._call is None and not self._done:
            self._write()

    def stopProducing(self) -> None:
        """The connection is gone."""
        self._done = True
        self._pieces.clear()
        if self._call is not None:
            self._call.cancel()
            self._call = None


def _dumps(value: JSONValue) -> str:
    # allow_nan=False: a NaN slipping through would make the whole response
    # unreadable to strict parsers; better a loud 500 in the test suite.
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _encode(value: JSONValue) -> bytes:
    return _dumps(value).encode("utf-8") + b"\n"


def api_resource(
    view: FleetView, clock: IReactorTime, offload: Offload | None = None, *, step: int = SNAPSHOT_STEP
) -> Resource:
    """
    The JSON API, to mount at C{/api} of the admin endpoint.

    @param view: where the figures come from, read on each request.
    @param clock: the reactor, for the C{generated} time of each response
        and the turns a large answer is taken and written in.
    @param offload: where the JSON of the lists is made: the tunnel server
        passes L{in_thread_pool}; by default, at once in the calling thread
        (tests, tools).
    @param step: sites snapshotted a reactor turn (L{SNAPSHOT_STEP}).
    """
    return _API(view, clock, offload if offload is not None else _inline, step)
