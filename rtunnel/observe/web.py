"""
The admin endpoint: a small read-only twisted.web site on the roles' own
reactor, serving C{/metrics}, C{/healthz}, C{/readyz} and, on the tunnel
server, the JSON API (C{/api}) and the status page (C{/}).

It shares the reactor with the tunnels, so nothing it does may hold that
reactor up, whoever connects:

 - B{read-only}: only GET and HEAD are served, every other method is
   refused with 405 before any resource sees it, and a request body is
   never kept (it is counted and dropped; one larger than
   L{MAX_REQUEST_BODY} ends the connection), so an upload cannot cost
   memory or a temporary file;
 - B{bounded}: at most L{MAX_CONNECTIONS} admin connections at once (the
   excess are closed at accept, before any parsing), each closed after
   L{IDLE_TIMEOUT} seconds of silence, and aborted a few seconds later if
   it does not read what is left;
 - B{little synchronous work}: the metrics are gathered on the reactor (so
   that no role object is read from another thread) and formatted in
   Twisted's thread pool by prometheus_client's own Twisted resource; the
   JSON API likewise takes its snapshots on the reactor (a large fleet's a
   few hundred sites a reactor turn) and makes the JSON in the pool
   (L{rtunnel.observe.api}); the status page is a file read at start.

No access log, and no line when an idle connection is closed: a
Prometheus scrape and two Kubernetes probes every few seconds would bury
the log lines that matter.

It has no authentication, and on loopback (the default) a browser on the
same host can reach it: a web page could make one of its own names
resolve to 127.0.0.1 (DNS rebinding) and read the figures as its own
origin. On a loopback bind a request is therefore answered only if its
C{Host} names the endpoint as no such page can: C{localhost} or an IP
address (L{local_host}); any other is a 421. A bind beyond loopback
accepts any C{Host}, since operators put it behind a proxy of their own
name (and the warning at start says what it exposes).

Responses say C{Server: rtunnel}, not Twisted's name and version: the
version is on C{/metrics} (C{rtunnel_build_info}) for whoever scrapes it.

The builders in L{rtunnel.services} call L{add_server_admin} and
L{add_site_admin}; C{--admin} (L{admin_option}) says where to listen.
"""

from __future__ import annotations

import io
import ipaddress
import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, Protocol, cast

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IDelayedCall, IListeningPort, IReactorFromThreads, IReactorTime
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from ..adapter.address import describe
from ..adapter.net import split_description
from ..logs import Logger
from ..logsafe import LogBudget, printable
from ..roles.server import ExtraListener, TunnelServerService
from ..roles.site import TunnelClientService
from .api import api_resource, in_thread_pool
from .live import ADMIN_URL_KEY, format_admin_url, replica_url_key
from .metrics import ServerCollector, SiteCollector, metrics_registry
from .page import status_page
from .server_view import ServerView

__all__ = [
    "ABORT_TIMEOUT",
    "ADMIN_URL_KEY",
    "COLLECT_TIMEOUT",
    "DEFAULT_SERVER_ADMIN",
    "IDLE_TIMEOUT",
    "MISDIRECTED",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_BODY",
    "SERVER_HEADER",
    "AdminEndpointError",
    "AdminService",
    "AdminSite",
    "OnReactor",
    "add_server_admin",
    "add_site_admin",
    "admin_endpoint",
    "admin_option",
    "admin_root",
    "admin_url",
    "exposed_interface",
    "host_checked",
    "local_host",
    "metrics_resource",
    "site_not_ready",
]

#: Where C{twistd rtunnel-server} serves its admin endpoint unless told
#: otherwise (C{--admin none} turns it off): loopback only.
DEFAULT_SERVER_ADMIN = "tcp:5501:interface=127.0.0.1"

#: Seconds an admin connection may stay silent before it is closed: long
#: enough for a status page polling every few seconds to keep its
#: connection, short enough that forgotten connections do not pile up.
IDLE_TIMEOUT = 10.0

#: Admin connections open at once; more are closed at accept. A Prometheus
#: server, two probes and a few browser tabs (six connections each) fit.
MAX_CONNECTIONS = 64

#: Seconds a timed-out connection gets to take what is left of its response
#: before it is aborted.
ABORT_TIMEOUT = 5

#: Bytes of request body read (and dropped) before the connection is cut:
#: GET and HEAD carry none, so anything larger is not a client of ours.
MAX_REQUEST_BODY = 64 * 1024

#: Seconds the metrics thread waits for the reactor to gather the figures;
#: a reactor that busy (or shutting down) gets a failed scrape, not a
#: thread blocked for ever.
COLLECT_TIMEOUT = 5.0

#: The status of a request whose C{Host} a loopback endpoint does not
#: answer (RFC 9110: "Misdirected Request", the server is not configured
#: to answer for that authority).
MISDIRECTED = 421

#: The C{Server} header of every response.
SERVER_HEADER = b"rtunnel"

_READ_METHODS = (b"GET", b"HEAD")
_PORT_SUFFIX = re.compile(r":[0-9]{0,5}")
_TEXT = b"text/plain; charset=utf-8"
_KINDS = ("tcp", "tcp6", "ssl", "unix")
_LOOPBACK_INTERFACE = {"tcp": "127.0.0.1", "tcp6": "::1", "ssl": "127.0.0.1"}


class AdminEndpointError(ValueError):
    """An C{--admin} value that cannot be listened on (the message says why)."""


def admin_endpoint(description: str) -> str:
    """
    The endpoint description an C{--admin} value is listened on: a bare
    port is C{tcp:PORT}, and a C{tcp}, C{tcp6} or C{ssl} endpoint that names
    no interface is bound to loopback, as the front doors are. Exposing the
    figures of every site must be written on the command line.

    @raise AdminEndpointError: an empty value or another endpoint type.
    """
    text = description.strip()
    if text.isdigit():
        text = f"tcp:{text}"
    parts = split_description(text)
    kind = parts[0].lower()
    if kind not in _KINDS or len(parts) < 2 or not parts[1]:
        raise AdminEndpointError(
            f"{description!r} is not an admin endpoint: give a port, a tcp:, tcp6:, ssl: or unix: endpoint "
            f"(like {DEFAULT_SERVER_ADMIN}), or none"
        )
    if kind == "unix":
        return text
    named = any(p.startswith("interface=") for p in parts[1:])
    positional = [p for p in parts[1:] if "=" not in p]
    if not named and len(positional) < 2:
        text += ":interface=" + _LOOPBACK_INTERFACE[kind].replace(":", "\\:")
    return text


def admin_option(value: str | None) -> str | None:
    """
    C{--admin} as given: C{None} or C{none} (any case) is off, anything
    else must be an endpoint L{admin_endpoint} accepts (checked here, so a
    mistake is a usage error, not a failure at start).

    @raise AdminEndpointError: see L{admin_endpoint}.
    """
    if value is None or value.strip().lower() == "none":
        return None
    admin_endpoint(value)
    return value.strip()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _plain(request: Request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", _TEXT)
    return (text + "\n").encode("utf-8")


class _Leaf(Resource):
    """A page of its own path only: C{/healthz/x} is no page, C{/healthz/} is C{/healthz}."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Resource.__init__ is unannotated in Twisted

    def render(self, request: Request) -> bytes | int:
        if [p for p in (request.postpath or []) if p]:
            return _plain(request, 404, f"no such path {_path(request)!r}")
        result: bytes | int = super().render(request)  # type: ignore[no-untyped-call]  # unannotated in Twisted
        return result


def _path(request: Request) -> str:
    return (request.path or b"").decode("utf-8", "replace")


class Health(_Leaf):
    """C{/healthz}: answered at all means the reactor runs, which is all liveness asks."""

    def render_GET(self, request: Request) -> bytes:
        return _plain(request, 200, "ok")


class Readiness(_Leaf):
    """
    C{/readyz}: 200 C{ready} when the role can do its job, else 503 and
    the one-line reason C{check} gives (a load balancer or a Kubernetes
    readiness probe keys on the status, an operator reads the line).
    """

    def __init__(self, check: Callable[[], str | None]) -> None:
        super().__init__()
        self._check = check

    def render_GET(self, request: Request) -> bytes:
        reason = self._check()
        if reason is None:
            return _plain(request, 200, "ready")
        return _plain(request, 503, f"not ready: {_one_line(reason)}")


class _NoIcon(_Leaf):
    """
    C{/favicon.ico}, which browsers ask for on their own: an empty answer
    (cached for a day), not a 404 in the browser's console. A child of the
    root, so it is there whatever the root is (the status page or not).
    """

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(204)
        request.setHeader(b"Cache-Control", b"max-age=86400")
        return b""


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _plain(request, 404, f"no such path {_path(request)!r}; this endpoint serves {self.paths}")

    def __init__(self, paths: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Resource.__init__ is unannotated in Twisted
        self.paths = paths


class _Root(Resource):
    """The admin endpoint's paths; anything else is a plain-text 404 naming them."""

    def __init__(self, paths: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Resource.__init__ is unannotated in Twisted
        self._missing = _NotFound(paths)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self._missing

    def render(self, request: Request) -> bytes:
        # "/" itself, when no status page is mounted (the site role).
        return self._missing.render(request)


def admin_root(
    *,
    ready: Callable[[], str | None],
    metrics: Resource,
    api: Resource | None = None,
    page: Resource | None = None,
) -> Resource:
    """
    The resource tree of an admin endpoint: C{/healthz}, C{/readyz},
    C{/metrics}, C{/favicon.ico} (empty), and (the tunnel server's)
    C{/api} and C{/}.

    With a status page, the page is the root and the rest its children
    (it answers C{/} itself, and its own 404 for other paths); without
    one, the root is a plain-text 404 naming the paths.
    """
    root: Resource = page if page is not None else _Root("/metrics, /healthz, /readyz")
    root.putChild(b"favicon.ico", _NoIcon())
    root.putChild(b"healthz", Health())
    root.putChild(b"readyz", Readiness(ready))
    root.putChild(b"metrics", metrics)
    if api is not None:
        root.putChild(b"api", api)
    return root


# -- metrics -------------------------------------------------------------------


class _Collecting(Protocol):
    def collect(self) -> Iterable[Metric]: ...


#: Samples formatted between two releases of the interpreter lock (about
#: 0.3 ms of formatting here; see L{_LettingGo}).
SAMPLES_PER_RELEASE = 100


class _LettingGo(list[Sample]):
    """
    A family's samples that let the interpreter lock go every
    L{SAMPLES_PER_RELEASE} while prometheus_client formats them in the
    thread pool (it reads them with C{for s in metric.samples}).

    A computing thread keeps the lock for the whole 5 ms switch interval
    each time the reactor asks for it, and a connection's round trip
    needs the lock several times: at 10,000 sites a C{/metrics} scrape
    (some 300 ms of formatting) raised the round trip of connections
    through the tunnel meanwhile to 50 ms at the median and 285 ms at
    most (bench/fleet.py's admin phase). Let go this often, the reactor
    waits a fraction of a millisecond instead.
    """

    __slots__ = ()

    def __iter__(self) -> Iterator[Sample]:
        items = list.__iter__(self)
        while chunk := list(itertools.islice(items, SAMPLES_PER_RELEASE)):
            yield from chunk
            time.sleep(0)  # lets the lock go: another thread waiting for it takes it


class OnReactor:
    """
    A registry as prometheus_client's Twisted resource reads it, from a
    thread of the pool: the figures are gathered on the reactor thread,
    where the roles keep them (a dictionary of sessions read from another
    thread can change size under the reader), and only the formatting is
    left to the thread.
    """

    def __init__(self, registry: _Collecting, reactor: IReactorFromThreads, timeout: float = COLLECT_TIMEOUT) -> None:
        self._registry = registry
        self._reactor = reactor
        self._timeout = timeout

    def collect(self) -> list[Metric]:
        if isInIOThread():
            return list(self._registry.collect())
        done = threading.Event()
        gathered: list[Metric] = []
        failed: list[BaseException] = []

        def gather() -> None:
            try:
                gathered.extend(self._registry.collect())
            except BaseException as e:
                failed.append(e)
            finally:
                done.set()

        self._reactor.callFromThread(gather)
        if not done.wait(self._timeout):
            raise TimeoutError(f"the reactor did not gather the metrics within {self._timeout:g}s")
        if failed:
            raise failed[0]
        for family in gathered:
            if len(family.samples) > SAMPLES_PER_RELEASE:
                family.samples = _LettingGo(family.samples)
        return gathered

    def restricted_registry(self, names: Iterable[str]) -> OnReactor:
        """C{?name[]=...}, as prometheus_client's WSGI app asks for it."""
        restricted = self._registry.restricted_registry(names)  # type: ignore[attr-defined]
        return OnReactor(restricted, self._reactor, self._timeout)


class _Metrics(Resource):
    """
    C{/metrics}: prometheus_client's Twisted resource for GET. HEAD gets
    the headers alone, without gathering anything (the library's app
    refuses HEAD, and a HEAD probe should cost nothing).
    """

    isLeaf = True

    def __init__(self, wrapped: IResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Resource.__init__ is unannotated in Twisted
        self._wrapped = wrapped

    def render_GET(self, request: Request) -> bytes | int:
        result: bytes | int = self._wrapped.render(request)
        return result

    def render_HEAD(self, request: Request) -> bytes:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return b""


def metrics_resource(registry: CollectorRegistry | _Collecting, reactor: IReactorFromThreads) -> Resource:
    """
    C{/metrics} for C{registry}, made by prometheus_client's Twisted
    resource (a WSGI app in the global reactor's thread pool: twistd's
    reactor, the roles' own), with the figures gathered on the reactor
    (L{OnReactor}).
    """
    # Imported here: it imports the global reactor, which must not be
    # installed as a side effect of importing rtunnel.
    from prometheus_client.twisted import MetricsResource

    wsgi: IResource = MetricsResource(OnReactor(registry, reactor))  # type: ignore[no-untyped-call]  # a lambda
    return _Metrics(wsgi)


# -- the site (HTTP) ------------------------------------------------------------


class AdminRequest(Request):
    """
    A request of the admin endpoint: refused if its C{Host} is not one a
    loopback endpoint answers (when its site checks), or unless GET or
    HEAD; never cached, its body dropped, its C{Server} ours (see the
    module doc).
    """

    _body_seen = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._body_seen += len(data)
        transport = self.channel.transport if self.channel is not None else None
        if self._body_seen > MAX_REQUEST_BODY and transport is not None:
            getattr(transport, "abortConnection", transport.loseConnection)()

    def process(self) -> None:
        request: Request = self  # the typed view of Twisted's methods
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        # The Host first: a misdirected request learns nothing else, not
        # even which methods there are.
        misdirected = self._misdirected()
        if misdirected is not None:
            # Twisted has no reason phrase for 421 ("Unknown Status").
            self._refuse(MISDIRECTED, misdirected, b"Misdirected Request")
            return
        if self.method in _READ_METHODS:
            super().process()  # type: ignore[no-untyped-call]  # unannotated in Twisted
            return
        method = (self.method or b"").decode("ascii", "replace")
        request.setHeader(b"Allow", b"GET, HEAD")
        self._refuse(405, f"method {method} is not allowed: the admin endpoint is read-only (GET, HEAD)")

    def _misdirected(self) -> str | None:
        """
        Why this request's C{Host} is not answered here, or C{None}. No
        C{Host} at all is answered: HTTP/1.0 clients may send none, and a
        browser (the one client DNS rebinding can steer) always sends one.
        """
        site = getattr(self.channel, "site", None)
        if not isinstance(site, AdminSite) or not site.check_host:
            return None
        hosts: Sequence[bytes] = self.requestHeaders.getRawHeaders(b"Host") or []
        if not hosts or (len(hosts) == 1 and local_host(hosts[0])):
            return None
        shown = ", ".join(printable(h.decode("latin-1"), 100) for h in hosts)
        site.misdirected(shown, describe(self.getClientAddress()))  # type: ignore[no-untyped-call]  # unannotated
        return (
            f"misdirected request: Host {shown} is not answered here; this admin endpoint listens on loopback and "
            "answers only Host localhost or an IP address (a guard against DNS rebinding, docs/operations.md)"
        )

    def _refuse(self, code: int, message: str, phrase: bytes | None = None) -> None:
        request: Request = self
        request.setResponseCode(code, phrase)
        # Twisted's process(), which sets it, is not reached.
        request.setHeader(b"Date", http.datetimeToString())
        if (self.path or b"").startswith(b"/api"):
            # The JSON API answers every error in JSON (rtunnel.observe.api).
            request.setHeader(b"Content-Type", b"application/json")
            request.write(b'{"error":' + _json_string(message) + b"}\n")
        else:
            request.setHeader(b"Content-Type", _TEXT)
            request.write(message.encode("utf-8") + b"\n")
        request.finish()

    def write(self, data: bytes) -> None:
        """
        Twisted's C{Server: TwistedWeb/VERSION} replaced by L{SERVER_HEADER}
        as the headers go out (the first write; C{finish} writes too when
        nothing was): whatever a resource set or Twisted added on the way.
        """
        if not self.startedWriting:
            self.responseHeaders.setRawHeaders(b"Server", [SERVER_HEADER])
        super().write(data)  # type: ignore[no-untyped-call]  # unannotated in Twisted


def _json_string(text: str) -> bytes:
    return json.dumps(text).encode("utf-8")


class AdminChannel(HTTPChannel):
    """
    An admin connection: counted by its L{AdminSite} until it is gone,
    closed quietly when idle.
    """

    abortTimeout = ABORT_TIMEOUT
    _aborting: IDelayedCall | None = None

    def timeoutConnection(self) -> None:
        """
        What Twisted's HTTPChannel does when the connection has been idle
        for C{timeOut} seconds (close it, abort it C{abortTimeout} seconds
        later if it has not gone), without its C{Timing out client} line
        at info level: a Prometheus server keeps its connection alive
        between scrapes, so that line came once per scrape. This is
        TimeoutMixin's documented hook, and the override uses only public
        members of the channel, so a Twisted release cannot silently
        bring the line back or break the close (a test checks both).
        """
        _log.debug("admin endpoint: closing {peer}, silent for {timeout:g}s", peer=self._peer(), timeout=self.timeOut)
        if self.abortTimeout is not None:
            self._aborting = self.callLater(self.abortTimeout, self._abort)  # type: ignore[no-untyped-call]
        self.loseConnection()  # type: ignore[no-untyped-call]  # unannotated in Twisted

    def _abort(self) -> None:
        self._aborting = None
        _log.debug("admin endpoint: aborting {peer}, which did not take the rest of its answer", peer=self._peer())
        transport = self.transport
        if transport is not None:
            getattr(transport, "abortConnection", transport.loseConnection)()

    def _peer(self) -> str:
        return describe(self.transport.getPeer()) if self.transport is not None else "?"

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._aborting is not None:
            self._aborting.cancel()
            self._aborting = None
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # unannotated in Twisted
        site = getattr(self, "site", None)
        if isinstance(site, AdminSite):
            site.connection_closed()


class AdminSite(Site):
    """
    The admin endpoint's HTTP factory: L{AdminRequest}s on
    L{AdminChannel}s, at most C{max_connections} at once, an idle timeout,
    no access log.

    @ivar check_host: whether requests are answered only for a C{Host}
        L{local_host} accepts (a loopback bind: L{host_checked}). On by
        default, so that a site made without saying is the safe one.
    @ivar connections: admin connections open now (the tunnel server counts
        them among the descriptors it holds).
    @ivar refused: connections closed at accept because all were taken.
    @ivar misdirected_requests: requests refused for their C{Host}.
    """

    # An HTTP/1.1 channel of ours, not Twisted's HTTP/2-negotiating proxy.
    protocol = AdminChannel  # type: ignore[assignment]
    requestFactory = AdminRequest
    noisy = False

    _log = Logger()

    def __init__(
        self,
        root: Resource,
        reactor: IReactorTime,
        *,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
        on_stop: Callable[[], object] | None = None,
        check_host: bool = True,
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]  # unannotated in Twisted
            root, timeout=idle_timeout, reactor=reactor, parsePOSTFormSubmission=False
        )
        self.max_connections = max_connections
        self.check_host = check_host
        self.connections = 0
        self.refused = 0
        self.misdirected_requests = 0
        self._on_stop = on_stop
        self._last_warning: float | None = None
        # A page in a browser can send these as fast as it likes.
        self._budget = LogBudget(rate=1 / 60, burst=3)

    def buildProtocol(self, addr: IAddress | None) -> HTTPChannel | None:  # type: ignore[override]
        if self.connections >= self.max_connections:
            self.refused += 1
            now = self.reactor.seconds()
            if self._last_warning is None or now - self._last_warning >= 60:
                self._last_warning = now
                self._log.warn(
                    "admin endpoint: {limit} connections open already; closing new ones at accept ({refused} so far)",
                    limit=self.max_connections,
                    refused=self.refused,
                )
            return None
        channel: HTTPChannel | None = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        if channel is not None:
            self.connections += 1
        return channel

    def connection_closed(self) -> None:
        self.connections -= 1

    def misdirected(self, host: str, peer: str) -> None:
        """Count a request refused for its C{Host} (already printable), and say so, at most about once a minute."""
        self.misdirected_requests += 1
        allowed, suppressed = self._budget.allow("misdirected", self.reactor.seconds())
        if not allowed:
            return
        self._log.warn(
            "admin endpoint: refused a request from {peer} for Host {host} (421): on loopback it answers only Host "
            "localhost or an IP address, so that a web page cannot read it through a name of its own resolved to "
            "this host (DNS rebinding); a proxy in front of it must send one of those{not_logged}",
            peer=peer,
            host=host,
            suppressed=suppressed,
            not_logged=f" ({suppressed} similar not logged)" if suppressed else "",
        )

    def getContentFile(self, length: int | None) -> IO[bytes]:
        """Where a body would go: nowhere (see L{AdminRequest.handleContentChunk})."""
        return io.BytesIO()

    def startFactory(self) -> None:
        # Not HTTPFactory's: it opens the access log and starts a timer
        # that refreshes the log's date every second, neither wanted here.
        pass

    def stopFactory(self) -> None:
        if self._on_stop is not None:
            self._on_stop()

    def log(self, request: http.Request) -> None:
        """No access log (see the module doc)."""


# -- where it listens ----------------------------------------------------------


def admin_url(port: IListeningPort, description: str) -> str:
    """
    The base URL local clients reach the admin endpoint on (what the state
    database records for C{rtunnel sites list}), with the port actually
    bound: C{tcp:0} listens on one the kernel picks.
    """
    address = port.getHost()
    if isinstance(address, UNIXAddress):
        name = address.name
        return "unix:" + (name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name))
    if isinstance(address, IPv4Address | IPv6Address):
        scheme = "https" if description.strip().lower().startswith("ssl:") else "http"
        return format_admin_url(scheme, address.host, address.port)
    raise AdminEndpointError(f"the admin endpoint listens on {address!r}, which has no URL")


def exposed_interface(description: str) -> str | None:
    """
    The interface an admin endpoint description (as L{admin_endpoint}
    makes it) binds when that is not loopback, C{"every interface"} for
    C{0.0.0.0} or C{::}; C{None} for loopback and unix sockets.
    """
    parts = split_description(description.strip())
    if parts[0].lower() == "unix":
        return None
    named = [p.split("=", 1)[1] for p in parts[1:] if p.startswith("interface=")]
    positional = [p for p in parts[1:] if "=" not in p]
    interface = named[0] if named else positional[1] if len(positional) > 1 else ""
    host = interface.replace("\\:", ":").strip("[]").split("%")[0]
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        if host.lower().rstrip(".") == "localhost":
            return None
    return "every interface" if host in ("", "0.0.0.0", "::") else host


def host_checked(description: str) -> bool:
    """
    Whether an admin endpoint listening on C{description} (as
    L{admin_endpoint} makes it) answers only the C{Host} values
    L{local_host} accepts: a TCP or TLS bind to loopback, which a browser
    on the host can reach. Beyond loopback any C{Host} is answered (a
    proxy in front has a name of its own); a unix socket is out of a
    browser's reach.
    """
    kind = split_description(description.strip())[0].lower()
    return kind != "unix" and exposed_interface(description) is None


def local_host(value: bytes) -> bool:
    """
    Whether a C{Host} header names a loopback endpoint as only a local
    client would: C{localhost} or an IP literal (IPv4, or IPv6 in
    brackets), with or without a port. A page served from a DNS name
    that its owner makes resolve to 127.0.0.1 sends that name; it cannot
    make a browser send one of these for its own origin.
    """
    try:
        text = value.decode("ascii").strip(" \t")
    except UnicodeDecodeError:
        return False
    if text.startswith("["):
        address, bracket, port = text[1:].partition("]")
        if not bracket:
            return False
        name_ok = _is_ip(address, ipaddress.IPv6Address)
    else:
        address, colon, port = text.partition(":")
        port = colon + port
        name_ok = address.lower() == "localhost" or _is_ip(address, ipaddress.IPv4Address)
    return name_ok and (not port or _PORT_SUFFIX.fullmatch(port) is not None)


def _is_ip(text: str, kind: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


_log = Logger(namespace="rtunnel.observe.web")


def _warn_if_exposed(description: str, role: str) -> None:
    where = exposed_interface(description)
    if where is None:
        return
    if role == "server":
        what = "every site's name, peer address, services and traffic figures, the forwards and the recent refusals"
    else:
        what = "this site's tunnel state and traffic figures"
    _log.warn(
        "admin endpoint listens on {where}, not loopback: anyone who can reach it reads {what} (read-only: it "
        "changes nothing; docs/security.md)",
        where=where,
        what=what,
    )


# -- the tunnel server ---------------------------------------------------------


def add_server_admin(service: TunnelServerService, admin: str | None, reactor: Any) -> AdminSite | None:
    """
    Give the tunnel server its admin endpoint (C{--admin}; C{None}: none),
    before it starts: an L{ExtraListener}, so that it listens with the
    forwards and the front doors, its failure to listen is fatal like
    theirs, and it stops listening first at shutdown. The URL it answers
    on is recorded in the state database once it listens and cleared when
    it stops (through the database thread, like the public port).

    @raise AdminEndpointError: C{admin} is no endpoint (see L{admin_endpoint}).
    """
    if admin is None:
        return None
    description = admin_endpoint(admin)
    _warn_if_exposed(description, "server")
    view = ServerView(service)
    root = admin_root(
        ready=view.not_ready,
        metrics=metrics_resource(metrics_registry(ServerCollector(service)), reactor),
        api=api_resource(view, reactor, in_thread_pool(reactor)),
        page=status_page(),
    )

    recorded: list[str] = []

    def record(port: IListeningPort) -> None:
        url = admin_url(port, description)
        recorded[:] = [url]
        store = service.state.store
        service.database.write("recording the admin URL", store.set_meta, replica_url_key(service.replica_id), url)
        service.database.write("recording the admin URL", store.set_meta, ADMIN_URL_KEY, url)

    def clear() -> None:
        # Only what this replica wrote: another replica's URL stays usable.
        store = service.state.store
        service.database.write("clearing the admin URL", store.set_meta, replica_url_key(service.replica_id), "")
        if recorded:
            service.database.write("clearing the admin URL", store.clear_meta_if, ADMIN_URL_KEY, recorded[0])

    site = AdminSite(root, reactor, on_stop=clear, check_host=host_checked(description))
    listener = ExtraListener("admin endpoint", description, cast("Factory[Any]", site), on_listening=record)
    service.listeners.append(listener)
    return site


# -- the site ------------------------------------------------------------------


def site_not_ready(service: TunnelClientService) -> str | None:
    """
    The site's C{/readyz}: ready while it has at least one tunnel session
    (with a server that is several replicas, one with any of them).
    """
    if not service.running:
        return "the site is not running"
    factory = service.factory
    if factory is None:
        return "no tunnel session yet (enrolling, or not started)"
    if factory.stopping:
        return "the site is shutting down"
    if service.sessions:
        return None
    last = next((f.last_outcome for f in service.factories if f.last_outcome is not None), None)
    if last is not None:
        # The end of the last connection that became a session: connects
        # refused since then build none, so it is not "the last attempt".
        return f"no tunnel session with the tunnel server (the last connection ended: {last.reason})"
    return "no tunnel session with the tunnel server yet"


class AdminService(Service):
    """
    An admin endpoint as a child service (the site role's): listens at
    start, stops listening at stop; a failure to listen is handed to
    C{on_fatal}, as the roles treat a port they cannot listen on.
    """

    _log = Logger()

    def __init__(
        self,
        description: str,
        site: AdminSite,
        reactor: Any,
        on_fatal: Callable[[str], None],
        on_listening: Callable[[IListeningPort], object] | None = None,
    ) -> None:
        self.description = description
        self.site = site
        self.reactor = reactor
        self.on_fatal = on_fatal
        self.on_listening = on_listening
        self.port: IListeningPort | None = None
        self._listening: defer.Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service.startService is unannotated in Twisted
        listening: defer.Deferred[IListeningPort] = serverFromString(self.reactor, self.description).listen(self.site)
        self._listening = listening.addCallbacks(self._listened, self._failed)

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        self._log.info("admin endpoint listening on {address}", address=describe(port.getHost()))
        if self.on_listening is not None:
            self.on_listening(port)

    def _failed(self, failure: Failure) -> None:
        self.on_fatal(f"cannot listen on {self.description}: {failure.getErrorMessage()}")

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Service.stopService is unannotated in Twisted
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        stopped: defer.Deferred[Any] = defer.maybeDeferred(port.stopListening)
        return stopped.addCallback(lambda _: None)


def add_site_admin(service: TunnelClientService, admin: str | None, reactor: Any) -> AdminService | None:
    """
    Give the site its admin endpoint (C{--admin}; C{None}: none): a child
    service serving C{/metrics}, C{/healthz} and C{/readyz} (ready while
    the tunnel session is open).

    @raise AdminEndpointError: C{admin} is no endpoint (see L{admin_endpoint}).
    """
    if admin is None:
        return None
    description = admin_endpoint(admin)
    _warn_if_exposed(description, "site")
    root = admin_root(
        ready=lambda: site_not_ready(service),
        metrics=metrics_resource(metrics_registry(SiteCollector(service)), reactor),
    )
    site = AdminSite(root, reactor, check_host=host_checked(description))
    child = AdminService(description, site, reactor, service.on_fatal)
    child.setServiceParent(service)  # type: ignore[no-untyped-call]  # Service.setServiceParent is unannotated in Twisted
    return child
