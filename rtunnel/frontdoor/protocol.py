"""
The front door over Twisted: a listening factory for SOCKS5 or HTTP CONNECT
whose every connection is one handshake, one route by name, and then one
stream to a site, spliced exactly as a forward's connection is.

One connection, in order:

 1. B{Handshake.} Bytes go to the sans-IO machine
    (L{rtunnel.frontdoor.socks5}, L{rtunnel.frontdoor.http_connect}); its
    replies are written as they come. The whole handshake must finish within
    C{handshake_timeout} (a client that sends nothing, or half a request, is
    dropped). A password is checked with scrypt in C{thread_pool} (inline
    without one: tests); reading is paused meanwhile, and at most
    C{max_pending_checks} checks may wait at once (beyond: refused, L{LIMITS
    <rtunnel.frontdoor.refusals.RefusalKind.LIMITS>}), so the reactor never
    runs scrypt and a crowd of clients cannot queue unbounded work.
 2. B{Route.} L{rtunnel.frontdoor.names.route} over the current snapshot of
    sites and services (C{directory()}).
 3. B{Open.} C{opener(site, host, port, open_timeout)}, which is
    L{SiteRegistry.open <rtunnel.roles.registry.SiteRegistry.open>}: it waits
    up to the open timeout for an absent site, enforces the stream limits,
    and sends OPEN. Reading stays paused until the site answered, so one
    read at most waits here, as for a forward.
 4. B{Answer.} Only once the site accepted the stream (OPEN_OK) is the
    success reply written, and the bytes the client sent after its request
    follow into the stream: the client learns the truth (a target the site
    refuses gets the protocol's refusal code, not a success and a closed
    connection), and bytes of a refused request never reach a site. Then
    the connection is joined to the stream by L{TCPSide.join
    <rtunnel.roles.splice.TCPSide.join>}, the splice forwards use: half-close,
    backpressure both ways and resets behave as through a forward.

Every refusal is the protocol's own reply, then a close, and one log line
with the reason (rate-limited per kind and client host with
L{LogBudget <rtunnel.logsafe.LogBudget>}, since any client can cause them at
will; whatever the client sent is escaped with
L{printable <rtunnel.logsafe.printable>}).

Wiring (the server's service): build a factory per listening endpoint,
C{FrontDoorFactory(DoorKind.SOCKS5, directory=..., opener=registry.open,
reactor=reactor, open_timeout=config.open_timeout, users=store,
thread_pool=pool)}.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import cast

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorFromThreads, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..adapter.stream import MuxStream, StreamOpenFailed, StreamReset
from ..address import describe
from ..logs import Logger
from ..logsafe import LogBudget, printable
from ..mux.errors import code_name
from ..observe.stats import DoorFigures
from ..roles.registry import SiteUnavailable
from ..roles.splice import TCPSide
from .http_connect import HttpConnectHandshake
from .names import DEFAULT_DOMAIN, Route, SiteDirectory, parse_domain, route
from .refusals import Refusal, RefusalKind, refusal_for_open_failure
from .socks5 import Socks5Handshake
from .steps import DEFAULT_MAX_EARLY_DATA, CheckCredentials, Handshake, Refused, Request, Step
from .users import UserStore

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_PENDING_CHECKS",
    "DoorKind",
    "FrontDoorFactory",
    "FrontDoorProtocol",
    "Opener",
    "refusal_for_unavailable",
]

#: Seconds a client has to complete its request (password check included).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Password checks that may wait for the thread pool at once, for all clients.
DEFAULT_MAX_PENDING_CHECKS = 64

#: How a stream is opened: C{(site, host, port, open_timeout)} -> the stream,
#: returned once OPEN is sent (L{rtunnel.roles.registry.SiteRegistry.open}).
Opener = Callable[[str, str, int, float], "defer.Deferred[MuxStream]"]


class DoorKind(enum.Enum):
    """Which protocol a front-door port speaks."""

    SOCKS5 = "socks5"
    HTTP_CONNECT = "http-connect"


class _State(enum.Enum):
    NEGOTIATING = "negotiating"  # feeding the handshake
    CHECKING = "checking"  # a password check is running; reading paused
    OPENING = "opening"  # routed; waiting for the site and its OPEN_OK; reading paused
    SPLICED = "spliced"  # joined to the stream, a forward's connection from now on
    DONE = "done"  # refused, or the client left before the splice


def refusal_for_unavailable(error: SiteUnavailable) -> Refusal:
    """
    The refusal for the registry's L{SiteUnavailable}: the site not
    connected within the open timeout, or a limit (streams per site, opens
    waiting for it, its session going away).
    """
    if error.reason.startswith("not connected"):
        return Refusal(RefusalKind.SITE_NOT_CONNECTED, f"site {error.site}: {error.reason}")
    return Refusal(RefusalKind.LIMITS, f"site {error.site}: {error.reason}")


class FrontDoorProtocol(TCPSide):
    """
    One client connection of a front door: a handshake, then a forward's
    connection (a L{TCPSide}).
    """

    _log = Logger()

    def __init__(self, factory: FrontDoorFactory, peer: IAddress | None) -> None:
        super().__init__(on_closed=self._pipe_closed)
        self.factory = factory
        self.peer = peer
        self.handshake = factory.new_handshake()
        self.state = _State.NEGOTIATING
        #: the complete request and where it goes, once known
        self.request: Request | None = None
        self.route: Route | None = None
        self._deadline: IDelayedCall | None = None
        self._checking: defer.Deferred[bool] | None = None
        self._opening: defer.Deferred[MuxStream] | None = None
        #: the stream asked for, until the site accepted it
        self._unopened: MuxStream | None = None

    # -- connection events ----------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._deadline = self.factory.reactor.callLater(self.factory.handshake_timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state is _State.SPLICED:
            super().dataReceived(data)
            return
        if state is _State.DONE:
            return
        self._step(self.handshake.receive(data))

    def readConnectionLost(self) -> None:
        if self.state in (_State.NEGOTIATING, _State.CHECKING):
            self._refuse(Refusal(RefusalKind.MALFORMED, "the client closed its side before the request was complete"))
            return
        if self.state is not _State.DONE:
            # Opening or spliced: the splice carries EOF (kept until the join).
            super().readConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connections -= 1
        self._cancel_deadline()
        if self.state is not _State.SPLICED:
            self.state = _State.DONE
            # Gone while its site was awaited: give up the place in the queue.
            opening, self._opening = self._opening, None
            if opening is not None and not opening.called:
                opening.cancel()
            # Gone while the site decided: nobody will use the stream.
            unopened, self._unopened = self._unopened, None
            if unopened is not None:
                unopened.abortConnection()
        super().connectionLost(reason)

    # -- the handshake ----------------------------------------------------------

    def _step(self, step: Step) -> None:
        """Write what the handshake has to say, then act on its step."""
        self._flush()
        if isinstance(step, Refused):
            self._refused(step.refusal)
        elif isinstance(step, CheckCredentials):
            self._check(step)
        elif isinstance(step, Request):
            self._requested(step)

    def _flush(self) -> None:
        out = self.handshake.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def _check(self, step: CheckCredentials) -> None:
        users = self.factory.users
        assert users is not None, "the handshake asks for credentials only when users are configured"
        if users.check_cached(step.user, step.password, self.factory.reactor.seconds()):
            self._step(self.handshake.credentials_checked(True))
            return
        factory = self.factory
        if factory.pending_checks >= factory.max_pending_checks:
            self._refuse(Refusal(RefusalKind.LIMITS, f"{factory.pending_checks} password checks already waiting"))
            return
        self.state = _State.CHECKING
        self._reading().pauseProducing()
        factory.pending_checks += 1
        if factory.thread_pool is None:
            checking: defer.Deferred[bool] = defer.maybeDeferred(users.verify, step.user, step.password)
        else:
            threads = cast(IReactorFromThreads, factory.reactor)
            checking = deferToThreadPool(threads, factory.thread_pool, users.verify, step.user, step.password)
        self._checking = checking
        checking.addBoth(self._checked, step)

    def _checked(self, result: bool | Failure, step: CheckCredentials) -> None:
        self.factory.pending_checks -= 1
        self._checking = None
        if self.state is not _State.CHECKING:
            return  # the client left, or ran out of time, meanwhile
        if isinstance(result, Failure):
            self._log.failure("front door {door}: password check failed", result, door=self.factory.kind.value)
            self._refuse(Refusal(RefusalKind.INTERNAL, "the password check failed"))
            return
        users = self.factory.users
        if result and users is not None:
            users.remember(step.user, step.password, self.factory.reactor.seconds())
        self.state = _State.NEGOTIATING
        self._step(self.handshake.credentials_checked(bool(result)))
        if self.state is _State.NEGOTIATING:
            self._reading().resumeProducing()

    def _timed_out(self) -> None:
        self._deadline = None
        if self.state in (_State.NEGOTIATING, _State.CHECKING):
            self._refuse(
                Refusal(
                    RefusalKind.CLIENT_TIMEOUT,
                    f"no complete request within {self.factory.handshake_timeout:g}s",
                )
            )

    # -- routing and opening ------------------------------------------------------

    def _requested(self, request: Request) -> None:
        self._cancel_deadline()
        self.request = request
        factory = self.factory
        try:
            where = route(request.name, request.port, factory.domain, factory.directory())
        except Exception:
            self._log.failure("front door {door}: routing failed", door=factory.kind.value)
            self._refuse(Refusal(RefusalKind.INTERNAL, "routing failed"))
            return
        if isinstance(where, Refusal):
            self._refuse(where)
            return
        self.route = where
        self.state = _State.OPENING
        # Nothing more is read until the site answered: one read at most
        # waits in the handshake, as for a forward.
        self._reading().pauseProducing()
        try:
            opening = factory.opener(where.site, where.host, where.port, factory.open_timeout)
        except Exception:
            self._log.failure("front door {door}: opening a stream failed", door=factory.kind.value)
            self._refuse(Refusal(RefusalKind.INTERNAL, "opening the stream failed"))
            return
        self._opening = opening
        opening.addCallbacks(self._stream_sent, self._open_failed)

    def _stream_sent(self, stream: MuxStream) -> None:
        """OPEN is on its way: wait for the site's answer."""
        self._opening = None
        if self.state is not _State.OPENING:
            stream.opened.addErrback(lambda _: None)  # nobody waits for it
            stream.abortConnection()
            return
        self._unopened = stream
        stream.opened.addCallbacks(self._accepted, self._not_accepted)

    def _accepted(self, stream: MuxStream) -> None:
        self._unopened = None
        if self.state is not _State.OPENING:
            return
        self.handshake.accept()
        self._flush()
        early = self.handshake.take_early_data()
        self.state = _State.SPLICED
        if early:
            super().dataReceived(early)  # kept by the TCP side until the join
        # Resume before joining, as a forward does: joining registers the
        # stream's throttle, which pauses us again if the tunnel is congested.
        self._reading().resumeProducing()
        self.join(stream)
        self._log.debug(
            "front door {door}: {client}{user} -> {route}",
            door=self.factory.kind.value,
            client=describe(self.peer),
            user=self._user_text(),
            route=self.route.describe() if self.route is not None else "",
        )

    def _not_accepted(self, failure: Failure) -> None:
        self._unopened = None
        if self.state is not _State.OPENING:
            return None
        value = failure.value
        if not isinstance(value, StreamOpenFailed):
            self._log.failure("front door {door}: opening a stream failed", failure, door=self.factory.kind.value)
            self._refuse(Refusal(RefusalKind.INTERNAL, "opening the stream failed"))
            return None
        refusal = refusal_for_open_failure(value.code, printable(value.reason))
        where = self.route
        if where is not None:
            detail = f"{where.describe()}: {code_name(value.code)}: {refusal.reason}"
            if where.single_label and refusal.kind in (RefusalKind.TARGET_NOT_ALLOWED, RefusalKind.TARGET_DNS_FAILURE):
                detail += f" ({where.host} is not a declared service of {where.site} either)"
            refusal = Refusal(refusal.kind, detail)
        self._refuse(refusal, door_decided=False)
        return None

    def _open_failed(self, failure: Failure) -> None:
        self._opening = None
        if isinstance(failure.value, defer.CancelledError) or self.state is not _State.OPENING:
            return  # the client left first
        if isinstance(failure.value, SiteUnavailable):
            self._refuse(refusal_for_unavailable(failure.value), door_decided=False)
            return
        self._log.failure("front door {door}: opening a stream failed", failure, door=self.factory.kind.value)
        self._refuse(Refusal(RefusalKind.INTERNAL, "opening the stream failed"))

    # -- refusals ------------------------------------------------------------

    def _refuse(self, refusal: Refusal, door_decided: bool = True) -> None:
        self._refused(self.handshake.refuse(refusal).refusal, door_decided)

    def _refused(self, refusal: Refusal, door_decided: bool = True) -> None:
        """
        The handshake queued its refusal: write it, log it, count it, close.
        A refusal the registry or the site decided (C{door_decided} false)
        is kept among the server's refusals as theirs, not again as ours.
        """
        self._flush()
        self.state = _State.DONE
        self._cancel_deadline()
        factory = self.factory
        host = getattr(self.peer, "host", None)
        allowed, suppressed = factory.log_budget.allow((refusal.kind, host), factory.reactor.seconds())
        request = self.request
        asked = f" asking for {request.name}:{request.port}" if request is not None else ""
        reason = (
            f"{factory.kind.value} refused {describe(self.peer)}{self._user_text()}{asked}: {refusal}"
            if door_decided
            else None
        )
        factory.figures.refused(
            refusal.kind.value, self.route.site if self.route is not None else "", reason, keep=allowed
        )
        if allowed:
            self._log.warn(
                "front door {door}: refused {client}{user}{asked}: {refusal}{not_logged}",
                door=factory.kind.value,
                client=describe(self.peer),
                user=self._user_text(),
                asked=asked,
                refusal=str(refusal),
                kind=refusal.kind.value,
                suppressed=suppressed,
                not_logged=f" ({suppressed} similar from this host not logged)" if suppressed else "",
            )
        if self.transport is not None:
            self.transport.loseConnection()

    # -- helpers ---------------------------------------------------------------

    def _user_text(self) -> str:
        user = self.request.user if self.request is not None else None
        return f" (user '{printable(user)}')" if user is not None else ""

    def _reading(self) -> IPushProducer:
        # A TCP transport is its own push producer; Protocol.transport is
        # typed only as ITransport.
        return cast(IPushProducer, self.transport)

    def _cancel_deadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _pipe_closed(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, StreamReset) and self.stream is not None and self.stream.accepted:
            self._log.debug(
                "front door {door}: stream of client {client} reset: {reason}",
                door=self.factory.kind.value,
                client=describe(self.peer),
                reason=f"{code_name(value.code)}: {value.reason}",
            )


class FrontDoorFactory(Factory):
    """
    The listening factory of one front door (one endpoint, one protocol).

    @param kind: SOCKS5 or HTTP CONNECT.
    @param directory: the current known sites and their announced services
        (L{rtunnel.frontdoor.names.SiteDirectory}), asked once per request.
    @param opener: opens a stream (L{Opener}: C{SiteRegistry.open}).
    @param reactor: for timers; with C{thread_pool}, also for results
        coming back from the pool (an L{IReactorFromThreads}).
    @param open_timeout: how long a request waits for an absent site.
    @param domain: the names served (C{--domain}).
    @param users: who may use the front door (C{--proxy-users}); C{None}:
        anyone who can connect (the server allows that on loopback only).
    @param thread_pool: where passwords are checked; C{None}: inline (tests).
    @param figures: where connections and refusals are counted (the
        server's L{DoorFigures} for this door); by default figures of its own.
    @ivar connections: client connections open now (one descriptor each).
    @ivar pending_checks: password checks submitted and not finished.
    """

    noisy = False

    def __init__(
        self,
        kind: DoorKind,
        *,
        directory: Callable[[], SiteDirectory],
        opener: Opener,
        reactor: IReactorTime,
        open_timeout: float,
        domain: str = DEFAULT_DOMAIN,
        users: UserStore | None = None,
        thread_pool: ThreadPool | None = None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_pending_checks: int = DEFAULT_MAX_PENDING_CHECKS,
        max_early_data: int = DEFAULT_MAX_EARLY_DATA,
        figures: DoorFigures | None = None,
    ) -> None:
        if thread_pool is not None and not IReactorFromThreads.providedBy(reactor):
            raise TypeError("a thread pool needs a reactor that takes calls from threads (IReactorFromThreads)")
        self.kind = kind
        self.directory = directory
        self.opener = opener
        self.reactor = reactor
        self.open_timeout = open_timeout
        self.domain = parse_domain(domain)
        self.users = users
        self.thread_pool = thread_pool
        self.handshake_timeout = handshake_timeout
        self.max_pending_checks = max_pending_checks
        self.max_early_data = max_early_data
        self.connections = 0
        self.pending_checks = 0
        self.figures = figures if figures is not None else DoorFigures(kind.value)
        #: one budget for the refusal lines any client can cause
        self.log_budget = LogBudget(rate=1.0, burst=5.0)

    def new_handshake(self) -> Handshake:
        """A fresh handshake machine for one connection."""
        require_auth = self.users is not None
        if self.kind is DoorKind.SOCKS5:
            return Socks5Handshake(require_auth=require_auth, max_early_data=self.max_early_data)
        return HttpConnectHandshake(require_auth=require_auth, max_early_data=self.max_early_data)

    def buildProtocol(self, addr: IAddress | None) -> FrontDoorProtocol:
        self.connections += 1
        self.figures.accepted += 1
        return FrontDoorProtocol(self, addr)
