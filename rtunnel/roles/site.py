"""
The tunnel role, run at the site: enroll once with a keyfile, then keep one
mutually authenticated TLS connection to the tunnel server up, forever.

A site behind a firewall is often reachable only through its tunnel, so it
gives up only on a refusal that provably comes from its own, authenticated
tunnel server: an enrollment refusal (sent over TLS after the server was
verified), a GOAWAY NOT_AUTHORIZED (a multiplexer frame, so inside mutual
TLS), or a TLS alert rejecting its certificate that arrived after the
handshake completed (encrypted, so from the server). Then it logs why and
stops the process with a non-zero status.

Everything else is retried with exponential backoff and jitter (first retry
within about a second): network faults, and also TLS failures that anyone on
the path could cause (a plaintext alert in answer to the ClientHello is seven
bytes). A server that fails verification may be an impostor on the path or a
misconfiguration; it is logged as an error naming the cause and retried with
a longer cap (L{SitePolicy.verify_retry_cap}), so a passing attack never
turns into a visit on site.

A tunnel server that is several replicas (docs/protocol.md, REPLICAS) gets
one session per replica: the service dials through slots, each a
L{ReconnectingService} of its own, as L{rtunnel.roles.replica_set} decides.
A server without the capability gets one session, as before.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, cast

from attrs import frozen
from OpenSSL import SSL
from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel.logs import Logger

from ..adapter.protocol import Keepalive, MuxProtocol
from ..adapter.tls import BulkTLSClientEndpoint
from ..address import HostPort
from ..identity.errors import EnrollmentRefused, PeerVerificationFailed
from ..identity.keyfile import Keyfile, parse_address
from ..identity.state import SiteState
from ..identity.tlsconfig import site_tls_options
from ..logsafe import printable
from ..mux.errors import ErrorCode, code_name
from ..mux.frames import Replicas
from ..mux.settings import ROLE_SETTINGS, FloodLimits, Settings, WindowTuning
from ..observe.stats import ClientFigures
from .enrollment import enroll
from .reconnect import ReconnectingService
from .replica_set import (
    KEYFILE,
    NO_REPLICAS,
    Claim,
    ReplicaSet,
    SlotView,
    duplicate_delay,
)
from .target import TargetConnector, tcp_endpoints


@frozen
class SitePolicy:
    """
    Timeouts of the tunnel role (docs/operations.md lists each).

    @ivar retry_initial: first reconnect delay (spread up to twice as long;
        see L{TunnelClientService._retry_delay}).
    @ivar retry_cap: the longest delay between reconnect attempts.
    @ivar verify_retry_cap: the longest delay after the server failed
        verification (an impostor, or a keyfile for another server): such a
        failure does not pass in seconds, and each attempt costs the real
        server nothing but costs us a handshake.
    @ivar connect_timeout: TCP connect to the server.
    @ivar handshake_timeout: TLS handshake and the server's HELLO.
    @ivar drain_grace: on shutdown, how long open streams may finish.
    """

    settings: Settings = ROLE_SETTINGS
    #: named services announced to the server (C{--service NAME=HOST:PORT})
    services: tuple[tuple[str, HostPort], ...] = ()
    tuning: WindowTuning = WindowTuning()
    keepalive: Keepalive | None = Keepalive()
    retry_initial: float = 1.0
    retry_cap: float = 30.0
    verify_retry_cap: float = 300.0
    connect_timeout: float = 10.0
    handshake_timeout: float = 30.0
    drain_grace: float = 10.0


class AuthenticationFailed(Exception):
    """The server or this site failed authentication; retrying cannot help."""


class Verdict(enum.Enum):
    """What a failed connection or enrollment attempt means for the site."""

    #: the authenticated server said no: give up
    REFUSED = "refused"
    #: the server could not prove the pinned identity: retry, slowly
    VERIFICATION = "verification"
    #: TLS failed in a way anyone on the path could cause: retry
    TLS = "tls"
    #: the network: retry
    NETWORK = "network"
    #: this site closed the session: a replica it has a session with already
    #: (L{rtunnel.roles.replica_set}); retry soon, for the replicas it lacks
    DUPLICATE = "duplicate"


@frozen
class Outcome:
    verdict: Verdict
    reason: str


#: After the replica set is told again, a slot in duplicate backoff dials
#: within this many seconds plus up to as many again of jitter (the spread
#: of a reconnect storm's first retries).
HURRY_DELAY = 1.0

# Alerts a server sends when it rejects the client's certificate.
_CERTIFICATE_ALERTS = ("certificate", "unknown ca", "access denied")
# TLS "errors" that are the connection ending under the handshake: the network.
_EOF_ERRORS = ("unexpected eof", "connection reset", "eof while reading")


def _ssl_text(error: SSL.Error) -> str:
    items = error.args[0] if error.args and isinstance(error.args[0], list) else []
    reasons = [str(item[2]) for item in items if isinstance(item, tuple) and len(item) > 2]
    return "; ".join(reasons) if reasons else str(error)


def judge(failure: Failure, tls_established: bool = False) -> Outcome:
    """
    Say what a failed attempt means.

    @param tls_established: the TLS handshake had completed (the server's
        certificate and Finished were verified) before the failure, so a
        TLS alert received now was encrypted by the server itself.
    """
    try:
        from service_identity.exceptions import VerificationError
    except ImportError:  # pragma: no cover
        VerificationError = ()  # type: ignore[assignment,misc]
    value = failure.value
    if isinstance(value, EnrollmentRefused):
        return Outcome(Verdict.REFUSED, f"enrollment refused: {printable(value)}")
    if isinstance(value, AuthenticationFailed):
        return Outcome(Verdict.REFUSED, str(value))
    if isinstance(value, PeerVerificationFailed):
        return Outcome(
            Verdict.VERIFICATION, f"the tunnel server could not prove the identity pinned by the keyfile: {value}"
        )
    if isinstance(value, VerificationError):  # false for the () stand-in
        return Outcome(Verdict.VERIFICATION, f"the tunnel server's certificate does not match the pinned name: {value}")
    if isinstance(value, SSL.Error):
        text = printable(_ssl_text(value))
        if "certificate verify failed" in text:
            return Outcome(
                Verdict.VERIFICATION,
                "the tunnel server could not prove the identity pinned by the keyfile (certificate verify failed)",
            )
        if "alert" in text and any(a in text for a in _CERTIFICATE_ALERTS):
            if tls_established:
                return Outcome(Verdict.REFUSED, f"the tunnel server rejected this site's certificate ({text})")
            return Outcome(
                Verdict.TLS,
                f"TLS alert before the server was authenticated ({text}): from the server or from anyone on the path",
            )
        if any(e in text.lower() for e in _EOF_ERRORS):
            return Outcome(Verdict.NETWORK, f"connection closed during the TLS handshake ({text})")
        return Outcome(Verdict.TLS, f"TLS failed: {text}")
    return Outcome(Verdict.NETWORK, printable(failure.getErrorMessage()))


def authentication_problem(failure: Failure, tls_established: bool = False) -> str | None:
    """
    Why C{failure} means giving up, or C{None} if the attempt should be
    retried (see L{judge}).
    """
    outcome = judge(failure, tls_established)
    return outcome.reason if outcome.verdict is Verdict.REFUSED else None


@implementer(IStreamClientEndpoint)
class RotatingEndpoint:
    """
    Each connection attempt goes to the next server address in turn, so a
    site with several addresses in its keyfile finds whichever is up.
    """

    _log = Logger()

    def __init__(
        self,
        endpoints: Sequence[IStreamClientEndpoint],
        names: Sequence[str] | None = None,
        figures: ClientFigures | None = None,
        first: int = 0,
    ) -> None:
        """
        @param first: the index of the address tried first (modulo their
            number): the site's slots start at different ones, so that a
            keyfile listing each replica's address reaches them all at once.
        """
        if not endpoints:
            raise ValueError("no server address")
        self._endpoints = list(endpoints)
        self._names = list(names) if names is not None else [repr(e) for e in endpoints]
        self._next = first % len(self._endpoints)
        #: told that an attempt ended in a failed connect (the next reconnect's reason)
        self.figures = figures

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        index = self._next % len(self._endpoints)
        self._next += 1

        def failed(failure: Failure) -> Failure:
            # The retry policy is told only how many attempts failed; the
            # operator wants to know why.
            self._log.warn(
                "cannot connect to tunnel server {server}: {reason}",
                server=self._names[index],
                reason=failure.getErrorMessage(),
            )
            if self.figures is not None:
                self.figures.ended = "connect"
            return failure

        return self._endpoints[index].connect(factory).addErrback(failed)


@implementer(IHandshakeListener)
class SiteTunnelProtocol(MuxProtocol):
    """
    The site end of a tunnel connection. It also notes when TLS was
    established: only an alert received after that can be trusted to come
    from the server (see L{judge}).
    """

    tls_established = False
    #: the replica this site has a session with already, when it closes this
    #: one as a duplicate (its end is then no failure, and quiet)
    duplicate_of: str | None = None

    def handshakeCompleted(self) -> None:
        self.tls_established = True


class SiteMuxFactory(Factory):
    """
    Builds the site end of each tunnel connection and watches how it ends.
    """

    noisy = False

    _log = Logger()

    def __init__(
        self,
        site: str,
        clock: IReactorTime,
        connector: TargetConnector,
        policy: SitePolicy,
        on_fatal: Callable[[str], None],
        figures: ClientFigures | None = None,
    ) -> None:
        self.site = site
        self.clock = clock
        self.connector = connector
        self.policy = policy
        self.on_fatal = on_fatal
        #: what the tunnel counts (L{TunnelClientService.figures})
        self.figures = figures if figures is not None else ClientFigures()
        self.current: MuxProtocol | None = None
        #: the connection the handshake deadline dropped (its end's reason)
        self._timed_out: MuxProtocol | None = None
        #: set when the service stops: an ending tunnel is then expected
        self.stopping = False
        #: how the last attempt ended (the retry policy picks its cap by it)
        self.last_outcome: Outcome | None = None
        #: told of each connection's protocol as it is built (the service
        #: watches its replica announcements and its end)
        self.on_built: Callable[[SiteTunnelProtocol], object] | None = None

    def _handshake_deadline(self, mux: MuxProtocol) -> None:
        if not mux.ready and mux.transport is not None and mux.close_reason is None:
            self._log.warn(
                "site {site}: no tunnel session with {server} within {timeout}s; dropping the connection",
                site=self.site,
                server=mux.peer_label,
                timeout=self.policy.handshake_timeout,
            )
            self._timed_out = mux
            mux.abort()

    def buildProtocol(self, addr: IAddress | None) -> MuxProtocol:
        self.last_outcome = None
        mux = SiteTunnelProtocol(
            initiator=True,
            clock=self.clock,
            settings=self.policy.settings,
            tuning=self.policy.tuning,
            stream_handler=self.connector,
            keepalive=self.policy.keepalive,
            label=self.site,
            flood_limits=FloodLimits.for_site(),
            services=dict(self.policy.services),
        )
        self.current = mux
        mux.figures = self.figures
        self.figures.attach(mux)
        # TLS and HELLO must complete in time even with keepalive off: a
        # path that accepts TCP and then black-holes would hang us forever.
        deadline = self.clock.callLater(self.policy.handshake_timeout, self._handshake_deadline, mux)
        mux.when_ready().addBoth(self._settled, mux, deadline)
        # Observed before the reconnecting service observes the same end (it
        # does once connected): the retry policy reads last_outcome.
        mux.on_closed(self._closed, mux, deadline)
        if self.on_built is not None:
            self.on_built(mux)
        return mux

    def _settled(self, result: object, mux: MuxProtocol, deadline: IDelayedCall) -> None:
        if deadline.active():
            deadline.cancel()
        # when_ready fails when a refusal came with the HELLO (a server that
        # refuses us sends both in one write): "connected" only otherwise.
        if result is mux:
            self.figures.opened()
            self._log.info("site {site} connected to tunnel server {server}", site=self.site, server=mux.peer_label)

    def _closed(self, exception: BaseException, mux: MuxProtocol, deadline: IDelayedCall) -> None:
        if deadline.active():
            deadline.cancel()
        reason = Failure(exception)
        if self.current is mux:
            self.current = None
        figures = self.figures
        figures.up = False
        figures.detach(mux)
        goaway = mux.peer_goaway
        if goaway is not None and goaway[0] == ErrorCode.NOT_AUTHORIZED:
            # A multiplexer frame: it came through mutual TLS, from our server.
            figures.ended = "refused"
            self.on_fatal(f"tunnel server refused site {self.site}: {printable(goaway[1])}")
            return
        duplicate = getattr(mux, "duplicate_of", None)
        if duplicate is not None:
            # Closed by the service, which said why (at info level): the
            # balancer sent us to a replica we have. No failure to log.
            self.last_outcome = Outcome(Verdict.DUPLICATE, f"already connected to replica {duplicate}")
            figures.ended = "duplicate"
            return
        outcome = judge(reason, getattr(mux, "tls_established", False))
        self.last_outcome = outcome
        if self._timed_out is mux:
            self._timed_out = None
            figures.ended = "handshake-timeout"
        elif goaway is not None:
            figures.ended = "goaway"
        else:
            figures.ended = outcome.verdict.value
        if outcome.verdict is Verdict.REFUSED:
            self.on_fatal(outcome.reason)
            return
        if outcome.verdict is Verdict.VERIFICATION:
            self._log.error(
                "site {site}: tunnel server {server} failed verification: {reason}; retrying with backoff up to "
                "{cap:g}s (an impostor on the path, or a keyfile for another server)",
                site=self.site,
                server=mux.peer_label,
                reason=outcome.reason,
                cap=self.policy.verify_retry_cap,
            )
            return
        if outcome.verdict is Verdict.TLS:
            self._log.error(
                "site {site}: TLS with tunnel server {server} failed: {reason}; retrying with backoff",
                site=self.site,
                server=mux.peer_label,
                reason=outcome.reason,
            )
            return
        why = f"{code_name(goaway[0])}: {printable(goaway[1])}" if goaway is not None else outcome.reason
        if self.stopping:
            self._log.info(
                "site {site}: tunnel to {server} closed: {reason}", site=self.site, server=mux.peer_label, reason=why
            )
        else:
            self._log.warn(
                "site {site}: tunnel to {server} lost: {reason}", site=self.site, server=mux.peer_label, reason=why
            )


class _Slot:
    """
    One dialling slot of the site (L{rtunnel.roles.replica_set}): a
    reconnecting service with a factory of its own, dialling C{target}.

    @ivar mux: the protocol of its current connection, until it is gone.
    @ivar duplicates: its sessions closed as duplicates in a row (the
        backoff of L{duplicate_delay}); a replica reached resets it.
    """

    __slots__ = ("key", "target", "factory", "client", "mux", "duplicates")

    def __init__(self, key: int, target: str, factory: SiteMuxFactory, client: ReconnectingService) -> None:
        self.key = key
        self.target = target
        self.factory = factory
        self.client = client
        self.mux: SiteTunnelProtocol | None = None
        self.duplicates = 0

    def view(self, holds: bool) -> SlotView:
        mux = self.mux
        # Open, but its replica not known yet: still on its way to one.
        pending = not holds and mux is not None and mux.accepting_streams
        return SlotView(self.target, pending)


@frozen
class ReplicaFigures:
    """
    The site's sessions per replica, for the metrics (replaced whole, so a
    scrape in another thread reads one consistent value; see
    L{rtunnel.observe.stats} on threads).

    @ivar sessions: open sessions this site holds (a duplicate being closed
        is not one).
    @ivar replicas: (replica id, a session is held) for every replica
        announced or held, by id; a server without the capability has none.
    """

    sessions: int = 0
    replicas: tuple[tuple[str, bool], ...] = ()


class TunnelClientService(MultiService):
    """
    The site's tunnel: enrollment (if a keyfile asks for it), then one
    L{ReconnectingService} per dialling slot (one, unless the server is
    several replicas) keeping the connections up.

    @param on_fatal: called with a message on an authentication failure;
        the twistd builder stops the process with a non-zero status.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTCP,
        state: SiteState,
        keyfile: Keyfile | None,
        connector: TargetConnector,
        policy: SitePolicy,
        on_fatal: Callable[[str], None],
        jitter: Callable[[], float] = random.random,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # MultiService.__init__ is unannotated in Twisted
        self.reactor = reactor
        self.state = state
        self.keyfile = keyfile
        self.connector = connector
        self.policy = policy
        self.on_fatal = self._fatal_once(on_fatal)
        self.jitter = jitter
        #: what the tunnel counts, for the admin endpoint (L{rtunnel.observe}):
        #: sessions, reconnects by reason, streams and their opens, bytes each way
        self.figures = ClientFigures()
        #: the sessions per replica, for the metrics (L{ReplicaFigures})
        self.replica_figures = ReplicaFigures()
        #: the announced replicas and which slot holds which
        self.replicas = ReplicaSet()
        self._slots: dict[int, _Slot] = {}
        self._next_slot = 0
        self._keyfile_endpoints: list[IStreamClientEndpoint] = []
        self._creator: Any = None
        self._planning: IDelayedCall | None = None
        self._enrolling: defer.Deferred[None] | None = None
        self._failed = False

    @property
    def _clock(self) -> IReactorTime:
        # The reactor provides IReactorTime as well as IReactorTCP; zope
        # interfaces have no intersection type to say so in the signature.
        return cast(IReactorTime, self.reactor)

    @property
    def client(self) -> ReconnectingService | None:
        """The first slot's reconnecting service (the only one with a server without replicas)."""
        slot = self._first_slot()
        return slot.client if slot is not None else None

    @property
    def factory(self) -> SiteMuxFactory | None:
        """The first slot's factory (the only one with a server without replicas)."""
        slot = self._first_slot()
        return slot.factory if slot is not None else None

    @property
    def factories(self) -> list[SiteMuxFactory]:
        """Every slot's factory, oldest slot first."""
        return [self._slots[key].factory for key in sorted(self._slots)]

    def _first_slot(self) -> _Slot | None:
        return self._slots[min(self._slots)] if self._slots else None

    @property
    def sessions(self) -> dict[str, MuxProtocol]:
        """
        Replica id -> this site's live session with it (key C{""}: a server
        without the REPLICAS capability). A session whose replica is not
        known yet, or that is being closed as a duplicate, is not here.
        """
        live: dict[str, MuxProtocol] = {}
        for replica, key in sorted(self.replicas.holders.items()):
            slot = self._slots.get(key)
            mux = slot.mux if slot is not None else None
            if mux is not None and mux.ready:
                live[replica] = mux
        return live

    @property
    def session(self) -> MuxProtocol | None:
        """The first live session (by replica id), if any."""
        return next(iter(self.sessions.values()), None)

    def _fatal_once(self, on_fatal: Callable[[str], None]) -> Callable[[str], None]:
        def fatal(message: str) -> None:
            if self._failed:
                return
            self._failed = True
            for slot in list(self._slots.values()):
                if slot.client.running:
                    slot.client.stopService()
            on_fatal(message)

        return fatal

    # -- lifecycle ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service.startService is unannotated in Twisted
        if self.state.needs_enrollment(self.keyfile):
            if self.keyfile is None:
                self.on_fatal(
                    f"site state in {self.state.directory.path} is not enrolled: start once with --keyfile FILE"
                )
                return
            self._enrolling = self._enroll(self.keyfile)
            self._enrolling.addCallback(lambda _: self._start_tunnel())
            self._enrolling.addErrback(self._enroll_failed)
        else:
            if self.keyfile is not None:
                self._log.info(
                    "site {site} already enrolled with this keyfile; using the stored credentials",
                    site=self.state.site_name,
                )
            self._start_tunnel()

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop: enrollment is cancelled, every slot stopped and its open
        session drained (see L{_close_tunnel}). Fires once every tunnel
        connection is gone.
        """
        if self._enrolling is not None and not self._enrolling.called:
            self._enrolling.cancel()
        if self._planning is not None and self._planning.active():
            self._planning.cancel()
        self._planning = None
        for slot in self._slots.values():
            slot.factory.stopping = True
        stopped: defer.Deferred[Any] = super().stopService()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        return stopped.addCallback(lambda _: None)

    def _close_tunnel(self, mux: MuxProtocol) -> None:
        """
        End an open session when its slot stops: GOAWAY, then open streams
        may finish for C{drain_grace} seconds. A session ending already
        (the server refused us, and the stop is the fatal error's) is only
        dropped. A slot stops on shutdown, or while the site runs when it
        is not wanted any more (its session says nothing yet of its replica,
        and every replica is held meanwhile).
        """
        if not mux.ready:
            mux.abort()
            return
        if not self.running:
            self._log.info(
                "site {site}: draining the tunnel (grace {grace}s)",
                site=self.state.site_name,
                grace=self.policy.drain_grace,
            )
            mux.drain(self.policy.drain_grace, "site shutting down")
        else:
            mux.drain(self.policy.drain_grace, "not needed: connected to every replica")

    # -- enrollment ---------------------------------------------------------

    def _server_endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        """
        TCP to the tunnel server. An IP literal is connected to directly, as
        targets are (L{tcp_endpoints}): HostnameEndpoint would "resolve" it
        through getaddrinfo in the reactor's thread pool on every attempt
        (12-19 % of the work of a process running thousands of sites in a
        reconnect storm, in the fleet benchmark).
        """
        return tcp_endpoints(self.reactor, self.policy.connect_timeout)(host, port)

    def _retry_delay(self, attempt: int, slow: bool = False) -> float:
        """
        The delay before retry number C{attempt + 1}: exponential backoff
        from C{retry_initial}, spread over the doubling itself. Retry k
        waits between D and 2D, D = C{retry_initial} x 2^k, with D at most
        half the cap (C{verify_retry_cap} if C{slow}, else C{retry_cap}):
        1-2 s, 2-4 s, 4-8 s, 8-16 s, then 15-30 s with the default cap.

        A single site back after a blip still retries within 1-2 s. Many
        sites cut off at once (a server restart) must not come back in
        step: with a fixed second of jitter, those refused in one wave
        (the server's waiting room full) returned together 2, 4, 8 and
        16 s later, each wave as dense as the first; spread over the whole
        doubling, each wave is as wide as the delay. A site that keeps
        failing waits 22.5 s on average at the cap (30.5 s before), and
        never longer than the cap.
        """
        # The exponent is bounded: 2.0**1024 overflows, which a site cut off
        # for about nine hours reached, and the next retry was never scheduled.
        growth = 2.0 ** min(attempt, 64)
        cap = max(self.policy.verify_retry_cap, self.policy.retry_cap) if slow else self.policy.retry_cap
        base = min(self.policy.retry_initial * growth, cap / 2)
        return base * (1.0 + self.jitter())

    def _enroll(self, keyfile: Keyfile) -> defer.Deferred[None]:
        addresses = [parse_address(a) for a in keyfile.addresses]
        csr = self.state.enrollment_request(keyfile.site, keyfile.token_digest)
        creator = site_tls_options(keyfile.ca_certificate_pem, keyfile.server_name)
        attempt = 0

        @defer.inlineCallbacks
        def run() -> Generator[defer.Deferred[Any], Any, None]:
            nonlocal attempt
            while True:
                host, port = addresses[attempt % len(addresses)]
                endpoint = BulkTLSClientEndpoint(creator, self._server_endpoint(host, port), self.reactor)
                self._log.info("site {site}: enrolling with {host}:{port}", site=keyfile.site, host=host, port=port)
                try:
                    certificate = yield enroll(endpoint, keyfile.site, keyfile.token, csr, clock=self._clock)
                except defer.CancelledError:
                    raise
                except Exception:
                    failure = Failure()
                    outcome = judge(failure)
                    if outcome.verdict is Verdict.REFUSED:
                        raise
                    slow = outcome.verdict is Verdict.VERIFICATION
                    delay = self._retry_delay(attempt, slow)
                    attempt += 1
                    if outcome.verdict is Verdict.NETWORK:
                        self._log.warn(
                            "site {site}: enrollment attempt failed: {reason}; retrying in {delay:.1f}s",
                            site=keyfile.site,
                            reason=outcome.reason,
                            delay=delay,
                        )
                    else:
                        self._log.error(
                            "site {site}: enrollment attempt with {host}:{port} failed: {reason}; the token was not "
                            "sent; retrying in {delay:.1f}s",
                            site=keyfile.site,
                            host=host,
                            port=port,
                            reason=outcome.reason,
                            delay=delay,
                        )
                    yield task.deferLater(self._clock, delay, lambda: None)
                    continue
                self.state.complete_enrollment(keyfile, certificate)
                return

        return run()

    def _enroll_failed(self, failure: Failure) -> None:
        if isinstance(failure.value, defer.CancelledError):
            return
        problem = authentication_problem(failure) or f"enrollment failed: {printable(failure.getErrorMessage())}"
        self.on_fatal(problem)

    # -- the tunnel ---------------------------------------------------------

    def prepare_connection(self, protocol: IProtocol) -> defer.Deferred[None]:
        """
        A connection counts as made once the server's HELLO arrived and no
        refusal came with it (L{MuxProtocol.when_ready} fails when a GOAWAY
        came in the same read): a server that accepts TCP and then drops us
        (overloaded, refusing our certificate), or that sends HELLO and
        GOAWAY together (its database failed), is backed off from like any
        other failure (the reconnecting service counts a failure here as a
        failed attempt). Only a made connection resets the backoff.
        """
        # Endpoints type what they connected as IProtocol; our factory
        # builds only MuxProtocols.
        return cast(MuxProtocol, protocol).when_ready().addCallback(lambda _: None)

    def _start_tunnel(self) -> None:
        if not self.running or self._failed:
            return
        state = self.state
        assert state.site_name is not None and state.server_name is not None
        assert state.ca_certificate_pem is not None
        # One identity for every replica: they share the server's key and
        # certificate (docs/scaling.md), so one pinned TLS context serves all.
        self._creator = site_tls_options(
            state.ca_certificate_pem, state.server_name, client_key=state.private_key, client_cert=state.certificate
        )
        self._keyfile_endpoints = [self._tunnel_endpoint(address) for address in state.addresses]
        self._plan()

    def _tunnel_endpoint(self, address: str) -> IStreamClientEndpoint:
        """TLS with the pinned server identity to C{address} (HOST:PORT: the keyfile's, or a replica's own)."""
        host, port = parse_address(address)
        return BulkTLSClientEndpoint(self._creator, self._server_endpoint(host, port), self.reactor)

    # -- slots ----------------------------------------------------------------

    def _add_slot(self, target: str) -> None:
        state = self.state
        site = state.site_name
        assert site is not None
        key = self._next_slot
        self._next_slot += 1
        if target == KEYFILE:
            endpoint = RotatingEndpoint(self._keyfile_endpoints, list(state.addresses), self.figures, first=key)
        else:
            # The frame's parser took only a canonical HOST:PORT.
            endpoint = RotatingEndpoint([self._tunnel_endpoint(target)], [target], self.figures)
        factory = SiteMuxFactory(site, self._clock, self.connector, self.policy, self.on_fatal, figures=self.figures)
        figures = self.figures

        def retry_policy(failures: int) -> float:
            figures.reconnect()
            last = factory.last_outcome
            if last is not None and last.verdict is Verdict.DUPLICATE:
                delay = duplicate_delay(max(slot.duplicates, 1), self.jitter())
                self._log.info(
                    "site {site}: dialling again for a replica not connected yet in {delay:.2f}s",
                    site=site,
                    delay=delay,
                )
                return delay
            delay = self._retry_delay(failures - 1, slow=last is not None and last.verdict is Verdict.VERIFICATION)
            self._log.info(
                "site {site}: reconnect attempt {attempt} in {delay:.1f}s", site=site, delay=delay, attempt=failures
            )
            return delay

        client = ReconnectingService(
            endpoint,
            factory,
            clock=self._clock,
            retry_policy=retry_policy,
            prepare=self.prepare_connection,
            close=self._close_tunnel,
        )
        slot = _Slot(key, target, factory, client)
        factory.on_built = lambda mux: self._built(slot, mux)
        self._slots[key] = slot
        client.setServiceParent(self)  # type: ignore[no-untyped-call]  # Service.setServiceParent is unannotated in Twisted

    def _plan_soon(self) -> None:
        """Match the slots to the replicas once this reactor turn is over (one plan for many changes)."""
        self._publish()
        if self._planning is None and self.running and not self._failed:
            self._planning = self._clock.callLater(0, self._plan)

    def _plan(self) -> None:
        self._planning = None
        self._publish()
        if not self.running or self._failed:
            return
        replicas = self.replicas
        plan = replicas.plan({key: slot.view(replicas.held_by(key) is not None) for key, slot in self._slots.items()})
        if not plan:
            return
        for key in plan.stop:
            slot = self._slots.pop(key)
            replicas.released(key)
            # Its session (if any) ending now is expected: not "lost".
            slot.factory.stopping = True
            slot.client.disownServiceParent()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        if plan.start and replicas.announced is not None:
            missing = replicas.missing()
            self._log.info(
                "site {site}: no session yet with {count} of {total} replicas ({missing}); dialling {targets}",
                site=self.state.site_name,
                count=len(missing),
                total=len(replicas.announced),
                missing=", ".join(missing) or "-",
                targets=", ".join(target or "the keyfile's addresses" for target in plan.start),
            )
        for target in plan.start:
            self._add_slot(target)

    def _built(self, slot: _Slot, mux: SiteTunnelProtocol) -> None:
        slot.mux = mux
        mux.when_ready().addCallbacks(self._session_open, lambda _: None, callbackArgs=(slot,))
        mux.add_replicas_observer(lambda replicas: self._announced(slot, mux, replicas))
        mux.on_closed(self._session_closed, slot, mux)

    def _holder_live(self, key: int) -> bool:
        slot = self._slots.get(key)
        return slot is not None and slot.mux is not None and slot.mux.accepting_streams

    def _session_open(self, mux: MuxProtocol, slot: _Slot) -> None:
        if slot.mux is not mux or self._slots.get(slot.key) is not slot or mux.replicas_negotiated:
            # With the capability, the session is placed once it says which
            # replica it is (its REPLICAS, told after this).
            self._plan_soon()
            return
        if self.replicas.unannounced(slot.key, self._holder_live) is Claim.DUPLICATE:
            self._close_duplicate(slot, slot.mux, "the tunnel server (without replicas)")
        self._plan_soon()

    def _announced(self, slot: _Slot, mux: SiteTunnelProtocol, announcement: Replicas) -> None:
        if slot.mux is not mux or self._slots.get(slot.key) is not slot or not mux.ready:
            return
        replicas = self.replicas
        before = replicas.announced
        held = replicas.held_by(slot.key)
        members = {entry.replica_id: entry.advertise for entry in announcement.replicas}
        own = announcement.own
        if held == own:
            self._hurry_duplicates()
        if replicas.announce(slot.key, own, members, self._holder_live) is Claim.DUPLICATE:
            self._close_duplicate(slot, mux, f"replica {own}")
        elif held != own:
            slot.duplicates = 0
            self._log.info(
                "site {site}: session with replica {replica} ({server})",
                site=self.state.site_name,
                replica=own,
                server=mux.peer_label,
            )
        if before != members:
            self._log.info(
                "site {site}: the tunnel server has {count} replica(s): {replicas}",
                site=self.state.site_name,
                count=len(members),
                replicas=", ".join(f"{r} ({a})" if a else r for r, a in sorted(members.items())),
            )
        self._plan_soon()

    def _hurry_duplicates(self) -> None:
        """
        A replica we hold told the set again: the set changed, or a replica
        of it started again under the same id (a worker restarted, a
        replica back after a crash). The slots waiting out a duplicate
        backoff dial within one to two seconds (spread as a reconnect storm's
        first retries are) instead of after up to 15 s: while
        the replica was down every dial landed on the others, and clients
        the balancer gives the returning replica wait for the site there.
        """
        for slot in self._slots.values():
            if slot.duplicates and self.replicas.held_by(slot.key) is None:
                slot.duplicates = 0
                if slot.client.retry_soon(HURRY_DELAY + self.jitter() * HURRY_DELAY):
                    self._log.info(
                        "site {site}: the replica set was told again; dialling for a replica not connected yet now",
                        site=self.state.site_name,
                    )

    def _close_duplicate(self, slot: _Slot, mux: SiteTunnelProtocol, what: str) -> None:
        """
        The balancer sent this slot to a replica another slot has a session
        with: close this one quietly (GOAWAY NO_ERROR); the slot dials again
        after a short delay of its own (L{duplicate_delay}).
        """
        slot.duplicates += 1
        mux.duplicate_of = what.removeprefix("replica ")
        self._log.info(
            "site {site}: already connected to {what}; closing the extra session with {server}",
            site=self.state.site_name,
            what=what,
            server=mux.peer_label,
        )
        mux.terminate(ErrorCode.NO_ERROR, f"already connected to {what}")

    def _session_closed(self, _: BaseException, slot: _Slot, mux: SiteTunnelProtocol) -> None:
        if slot.mux is not mux:
            return
        slot.mux = None
        replica = self.replicas.released(slot.key)
        if replica is not None and replica != NO_REPLICAS:
            self._log.info(
                "site {site}: no session with replica {replica} now", site=self.state.site_name, replica=replica
            )
        self.figures.up = bool(self.sessions)
        self._plan_soon()

    def _publish(self) -> None:
        """The metrics' view of the replicas (L{ReplicaFigures}), replaced whole."""
        sessions = self.sessions
        announced: Mapping[str, str] = self.replicas.announced or {}
        ids = (announced.keys() | sessions.keys()) - {NO_REPLICAS}
        self.replica_figures = ReplicaFigures(len(sessions), tuple((r, r in sessions) for r in sorted(ids)))
