"""
The tunnel-server role: accept sites on one TLS port, authenticate them, keep
the registry of live sessions, and cut revoked sites.

Every accepted TLS connection starts as a L{TunnelConnection}. Once the TLS
handshake is done it knows who is calling:
 - a client with a valid site certificate (verified by OpenSSL against our
   CA) whose site is enrolled, not revoked and whose certificate is the
   current one becomes a mux session in the registry;
 - a client without a certificate may only enroll (redeem a one-time token);
 - anything else is told why (GOAWAY NOT_AUTHORIZED) and disconnected.
Until a connection is an authenticated session it is I{pre-auth}: it costs a
socket and a TLS object but has proven nothing. Each pre-auth connection is
aborted (never politely closed: a TLS close waits for the peer's
close_notify, which a silent peer never sends) once the handshake timeout
has passed since it was accepted, whatever it is doing then: in the TLS
handshake, enrolling, waiting to read an enrollment reply, or refused. And
at most C{max_preauth} may exist at once: L{AdmissionGate} closes the excess
at accept, before any TLS work, so that silent or slow clients (slowloris)
can never take the descriptors that sites and forward clients need.

L{TunnelServerService} runs the role: the tunnel listener behind the gate,
the forward ports, the revocation poll and the drain at stop (the builder in
L{rtunnel.services} makes it from a config, as L{rtunnel.roles.site} holds
its twin, the site's C{TunnelClientService}).
"""

from __future__ import annotations

import enum
import functools
import threading
from collections import deque
from collections.abc import Callable, Generator, Mapping
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar, cast
from typing import Protocol as TypingProtocol

from attrs import frozen
from OpenSSL import SSL
from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorFromThreads,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ..adapter.address import describe
from ..adapter.net import listen, set_nodelay
from ..adapter.protocol import Keepalive, MuxProtocol
from ..adapter.stream import MuxStream
from ..adapter.tls import BulkTLSFactory
from ..adapter.wheel import KeepaliveWheel
from ..address import HostPort
from ..identity.errors import PeerVerificationFailed, SiteRejected, StateError
from ..identity.keyfile import DEFAULT_PORT, PUBLIC_PORT_KEY, parse_address
from ..identity.state import ServerState
from ..identity.store import ADMISSION_COUNTER, AdmissionSnapshot, SiteAdmission
from ..identity.tlsconfig import client_refusal, peer_identity, server_tls_options
from ..logs import Logger
from ..logsafe import LogBudget, printable
from ..mux.errors import ErrorCode
from ..mux.settings import ROLE_SETTINGS, FloodLimits, Settings, WindowTuning
from .descriptors import RESERVED, DescriptorWatch, soft_limit
from .enrollment import EnrollmentResponder
from .forward import ForwardFactory, ForwardSpec
from .live_forwards import LiveForwards
from .registry import SiteRegistry
from .replicas import ReplicaMembership, default_replica_id, listen_port

#: The server's keepalive: ping a site only after 25 s of silence, give up
#: after 30. Sites ping after 10 s of silence (L{Keepalive}'s defaults), so
#: a live site is never silent that long and the server only answers: with
#: equal intervals both ends take turns pinging, and on a server with ten
#: thousand sites the PINGs it sent were most of its idle CPU. A dead site
#: is still found within 30 s, as with 10/30; a site that runs without
#: keepalive gets the server's PING 5 s before the timeout to answer it.
SERVER_KEEPALIVE = Keepalive(interval=25.0, timeout=30.0)

#: Seconds between two keepalive round-trip measurements of a site. Sites
#: ping the server and not the other way round (L{SERVER_KEEPALIVE}), so
#: the server learns a site's round trip only from PINGs of its own: a
#: share of the sessions each second, each once per this interval (at
#: 10,000 sites, 167 PINGs a second, about half a percent of a core).
RTT_PROBE_INTERVAL = 60.0

_P = ParamSpec("_P")
_T = TypeVar("_T")


@frozen
class ServerPolicy:
    """
    Timeouts and limits of the server role (docs/operations.md lists each).

    @ivar handshake_timeout: TLS handshake plus authentication (or a whole
        enrollment) must finish within this many seconds.
    @ivar keepalive: see L{SERVER_KEEPALIVE}.
    @ivar max_preauth_bytes: bytes a connection may send before it is
        authenticated; more is an attack or a confused peer.
    @ivar max_preauth: connections that are not (yet) authenticated sessions
        that may exist at once, those waiting for a handshake slot included;
        more are closed at accept. Sites reconnecting after a restart are
        pre-auth for one handshake (about a millisecond of server CPU each),
        so this bounds a burst, not the fleet. A waiting connection costs a
        descriptor and a small object (no TLS state), so the cap is set for
        a fleet's reconnect storm; the descriptor limit caps it further.
    @ivar max_handshakes: TLS handshakes worked on at once; further
        connections wait their turn, unread (L{AdmissionGate}).
    """

    settings: Settings = ROLE_SETTINGS
    tuning: WindowTuning = WindowTuning()
    keepalive: Keepalive | None = SERVER_KEEPALIVE
    handshake_timeout: float = 30.0
    max_preauth_bytes: int = 256 * 1024
    max_preauth: int = 4096
    max_handshakes: int = 16


def _refuse_site_streams(stream: MuxStream) -> None:
    # Sites do not open streams into the cloud in this version.
    stream.refuse(ErrorCode.TARGET_NOT_ALLOWED, "the tunnel server accepts no streams from sites")


def _maybe_stale(admission: SiteAdmission | None, fingerprint: str) -> bool:
    """
    Whether a refusal of this certificate by the snapshot could come from
    the snapshot being behind the database: the site unknown, or known
    with another certificate. A revoked certificate stays refused (a site
    is re-admitted by enrolling again, with a new certificate), so a
    revoked site presenting this one is refused from memory.
    """
    return admission is None or not admission.enrolled or admission.certificate_fingerprint != fingerprint


@implementer(IHandshakeListener)
class TunnelConnection(Protocol):
    """
    The first protocol on every TLS connection from a site; it becomes a
    mux session or an enrollment exchange once the peer is known.
    """

    _log = Logger()

    # One per connected site for the life of its session: slots, not a dictionary.
    __slots__ = (
        "factory",
        "peer",
        "inner",
        "site",
        "fingerprint",
        "_held",
        "_held_size",
        "_timer",
        "_lost",
        "_handshaken",
        "accepted_at",
        "_preauth",
        "_deadline",
        "_counted",
        "_judged",
    )

    def __init__(self, factory: TunnelServerFactory, addr: IAddress | None) -> None:
        self.factory = factory
        self.peer = describe(addr)
        self.inner: Protocol | None = None
        self.site: str | None = None
        self.fingerprint: str | None = None
        #: bytes that arrived before the handshake completed (rarely any)
        self._held: list[bytes] | None = None
        self._held_size = 0
        self._deadline = 0.0
        self._timer: IDelayedCall | None = None
        self._lost = False
        self._handshaken = False
        #: when the socket was accepted (set by the L{AdmissionGate} that let
        #: it wait), else when the connection is made: the deadline counts from it
        self.accepted_at: float | None = None
        #: counted in the factory's pre-auth connections until authenticated or gone
        self._preauth = True
        factory.preauth += 1
        #: counted in the factory's connections (until the session observer takes over)
        self._counted = True
        factory.connections += 1
        #: this connection's handshake outcome is counted (L{ServerFigures.handshakes})
        self._judged = False

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        now = self.factory.clock.seconds()
        self._deadline = (now if self.accepted_at is None else self.accepted_at) + self.factory.policy.handshake_timeout
        self._timer = self.factory.clock.callLater(max(self._deadline - now, 0.0), self._timed_out)

    def handshakeCompleted(self) -> None:
        if self._lost:
            return
        self._handshaken = True
        identity = peer_identity(self.transport)
        if identity is None:
            self._log.info("enrollment connection from {peer}", peer=self.peer)
            # The whole exchange, TLS included, gets one handshake timeout.
            # Our own timer stays armed: the responder's ends with its reply,
            # and a client that then never closes must not keep the socket.
            remaining = max(self._deadline - self.factory.clock.seconds(), 0.001)
            responder = EnrollmentResponder(
                self.factory, clock=self.factory.clock, peer=self.peer, timeout=remaining, figures=self.factory.figures
            )
            self._become(responder)
            return
        site, fingerprint = identity
        self.site, self.fingerprint = site, fingerprint
        if _maybe_stale(self.factory.admission.get(site), fingerprint):
            # Another replica sharing the database may have enrolled this
            # site (or enrolled it again) after our snapshot was loaded: a
            # site dials at once after enrolling, and through a balancer it
            # lands on any replica, whose revocation poll would learn of the
            # enrollment only within a second. Ask the database before
            # refusing; what the site sends meanwhile is held, and the
            # handshake deadline still runs. Only a certificate our CA
            # signed gets here.
            self.factory.database.run(self.factory.state.store.admission, site).addCallbacks(
                self._looked_up, self._lookup_failed, callbackArgs=(site, fingerprint), errbackArgs=(site, fingerprint)
            )
            return
        self._admit(site, fingerprint)

    def _looked_up(self, admission: SiteAdmission | None, site: str, fingerprint: str) -> None:
        self.factory.admission.update(site, admission)
        if not self._lost:
            self._admit(site, fingerprint)

    def _lookup_failed(self, failure: Failure, site: str, fingerprint: str) -> None:
        # The database is down: decide from the snapshot (a refusal).
        if not self._lost:
            self._admit(site, fingerprint)

    def _admit(self, site: str, fingerprint: str) -> None:
        mux = self._new_mux(site)
        refusal = self._refusal(site, fingerprint)
        if refusal is not None:
            mux.refuse_session(*refusal)
            self._become(mux)
            return
        self._become(mux)
        mux.when_ready().addCallbacks(lambda _: self._authenticated(site, mux), self._no_session)

    def _no_session(self, failure: Failure) -> None:
        """TLS succeeded but no session followed (the site left, or ended it before its HELLO)."""
        if not self._judged:  # (a timeout was counted as such)
            self._judged = True
            self.factory.figures.handshake("session-failed")

    def _refusal(self, site: str, fingerprint: str) -> tuple[int, str] | None:
        """
        Whether this site certificate may connect, from the admission
        snapshot in memory (never the database: see L{AdmissionSnapshot}):
        C{None} if it may, else the GOAWAY code and reason that tell the
        site why not.
        """
        try:
            self.factory.admission.check(site, fingerprint)
        except SiteRejected as e:
            allowed, suppressed = self.factory.log_budget.allow(("rejected", site), self.factory.clock.seconds())
            if allowed:
                self._log.warn(
                    "site {site} from {peer} rejected: {code}: {reason}{not_logged}",
                    site=site,
                    peer=self.peer,
                    code=e.code,
                    reason=e.message,
                    suppressed=suppressed,
                    not_logged=f" ({suppressed} similar not logged)" if suppressed else "",
                )
            figures = self.factory.figures
            figures.handshake(e.code)
            figures.refuse(site, "handshake", f"rejected from {self.peer}: {e.code}: {e.message}", keep=allowed)
            return ErrorCode.NOT_AUTHORIZED, f"{e.code}: {e.message}"
        return None

    def _new_mux(self, site: str) -> MuxProtocol:
        policy = self.factory.policy
        return MuxProtocol(
            initiator=False,
            clock=self.factory.clock,
            settings=policy.settings,
            tuning=policy.tuning,
            stream_handler=_refuse_site_streams,
            keepalive=policy.keepalive,
            label=site,
            flood_limits=FloodLimits.for_server(),
            keepalive_wheel=self.factory.keepalive_wheel,
        )

    def _authenticated(self, site: str, mux: MuxProtocol) -> None:
        assert self.fingerprint is not None
        # Again: a revocation committed between the handshake and this HELLO
        # found nothing registered to cut, and would be missed.
        refusal = self._refusal(site, self.fingerprint)
        if refusal is not None:
            mux.terminate(*refusal)  # still pre-auth: the deadline aborts a peer that never closes
            return
        self._cancel_timer()
        self._leave_preauth()
        self.factory.figures.handshake("ok")
        self._log.info("site {site} connected from {peer}", site=site, peer=self.peer)
        self.factory.registry.register(site, mux, self.peer, self.fingerprint)
        if self.factory.on_session is not None:
            self.factory.on_session(mux)
        registry = self.factory.registry
        mux.when_services().addCallback(lambda services: registry.announce(site, mux, services))
        # The session's end is counted and logged without us from now on,
        # and the TLS protocol talks to the session directly where it can:
        # this object, a few hundred bytes, is then freed (one per site).
        self._counted = False
        mux.on_closed(_session_closed, self.factory, site, self.peer)
        transport = self.transport
        if getattr(transport, "wrappedProtocol", None) is self:
            transport.wrappedProtocol = mux  # type: ignore[union-attr]

    def _become(self, protocol: Protocol) -> None:
        self.inner = protocol
        protocol.makeConnection(self.transport)
        held, self._held = self._held, None
        for data in held or ():
            protocol.dataReceived(data)

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self._held_size += len(data)
        if self._held_size > self.factory.policy.max_preauth_bytes:
            self._log.warn("dropping {peer}: too much data before authentication", peer=self.peer)
            self._judged = True
            self.factory.figures.handshake("too-much-data")
            self.factory.figures.refuse("", "handshake", f"dropped {self.peer}: too much data before authentication")
            self._abort()
            return
        if self._held is None:
            self._held = []
        self._held.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._counted:
            self._counted = False
            self.factory.connections -= 1
        self._lost = True
        self._cancel_timer()
        self._leave_preauth()
        if not self._handshaken:
            self._report_failed_handshake(reason)
        if self.inner is not None:
            self.inner.connectionLost(reason)

    def _leave_preauth(self) -> None:
        if self._preauth:
            self._preauth = False
            self.factory.preauth -= 1

    def _report_failed_handshake(self, reason: Failure) -> None:
        """
        A TLS handshake that failed is worth a line: a refused client
        certificate (wrong CA, wrong purpose, expired) is a site with the
        wrong credentials or someone trying. Rate-limited per kind and peer
        host, since anyone can cause these at will.
        """
        value = client_refusal(self.transport) or reason.value
        figures = self.factory.figures
        if isinstance(value, PeerVerificationFailed):
            kind, level, what = "certificate", "warn", str(value)
            result = "bad-certificate"
        elif isinstance(value, SSL.Error):
            kind, level, what = "tls", "info", _ssl_reason(value)
            result = "tls-error"
        else:
            if not self._judged:  # (a timeout or too much data was counted as such)
                figures.handshake("closed")
            return  # closed before or during the handshake: nothing to say
        host = self.peer.rpartition(":")[0]
        allowed, suppressed = self.factory.log_budget.allow((kind, host), self.factory.clock.seconds())
        figures.handshake(result)
        figures.refuse("", "handshake", f"refused TLS connection from {self.peer}: {printable(what)}", keep=allowed)
        if not allowed:
            return
        log = self._log.warn if level == "warn" else self._log.info
        log(
            "refused TLS connection from {peer}: {reason}{not_logged}",
            peer=self.peer,
            reason=printable(what),
            suppressed=suppressed,
            not_logged=f" ({suppressed} similar from this host not logged)" if suppressed else "",
        )

    def _timed_out(self) -> None:
        self._timer = None
        if not self._preauth:
            return  # an authenticated session: its keepalive watches it now
        inner = self.inner
        if isinstance(inner, EnrollmentResponder) and inner.reply is not None:
            what = "enrollment answered but the client did not close"
        elif isinstance(inner, EnrollmentResponder) and inner.deciding:
            what = "enrollment not decided (the state database did not answer in time)"
        elif self._handshaken:
            what = "no authenticated session"
        else:
            what = "TLS handshake not finished"
        allowed, suppressed = self.factory.log_budget.allow(
            ("timeout", self.peer.rpartition(":")[0]), self.factory.clock.seconds()
        )
        figures = self.factory.figures
        reason = f"dropped {self.peer}: {what} within {self.factory.policy.handshake_timeout}s"
        if isinstance(inner, EnrollmentResponder):
            if inner.reply is None:  # an answered enrollment was counted with its answer
                figures.enrollment("timeout")
                figures.refuse("", "enrollment", reason, keep=allowed)
        else:
            self._judged = True
            figures.handshake("timeout")
            figures.refuse(self.site or "", "handshake", reason, keep=allowed)
        if allowed:
            self._log.warn(
                "dropping {peer}: {what} within {timeout}s{not_logged}",
                peer=self.peer,
                what=what,
                timeout=self.factory.policy.handshake_timeout,
                suppressed=suppressed,
                not_logged=f" ({suppressed} similar from this host not logged)" if suppressed else "",
            )
        self._abort()

    def _abort(self) -> None:
        transport = self.transport
        if transport is not None:
            abort = getattr(transport, "abortConnection", None)
            (abort or transport.loseConnection)()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def _session_closed(reason: BaseException, factory: TunnelServerFactory, site: str, peer: str) -> None:
    """The end of an authenticated session: counted, and logged unless the server is stopping."""
    factory.connections -= 1
    if factory.stopping:
        return  # the server is draining every session: it logs one line for all
    TunnelConnection._log.info(
        "site {site} from {peer} disconnected: {reason}", site=site, peer=peer, reason=str(reason)
    )


def _ssl_reason(error: SSL.Error) -> str:
    """OpenSSL's reason strings out of the nested list pyOpenSSL gives."""
    reasons = [
        str(item[2])
        for item in (error.args[0] if error.args and isinstance(error.args[0], list) else [])
        if len(item) > 2
    ]
    return "TLS error: " + ("; ".join(reasons) if reasons else str(error))


class TunnelServerFactory(Factory):
    """
    The factory behind the server's TLS listener (wrap it with
    C{TLSMemoryBIOFactory(server_tls_options(state), False, factory)}, and
    that with L{AdmissionGate} to cap pre-auth connections).

    @ivar preauth: connections accepted that are not (yet) authenticated
        sessions: in the TLS handshake, enrolling, or refused and closing.
    @ivar connections: connections accepted and not yet gone, authenticated
        or not (one descriptor each).
    """

    protocol = TunnelConnection
    noisy = False

    def __init__(
        self,
        state: ServerState,
        registry: SiteRegistry,
        clock: IReactorTime,
        policy: ServerPolicy = ServerPolicy(),
        *,
        admission: AdmissionSnapshot | None = None,
        database: StateThread | None = None,
    ) -> None:
        """
        @param admission: what sites are admitted from; by default a
            snapshot loaded now that follows the commits of C{state}'s own
            store in the committing thread (right for a factory whose store
            is used on the reactor; L{TunnelServerService} passes its own).
        @param database: where the store is used (enrollments); by default
            inline, on the calling thread.
        """
        self.state = state
        self.registry = registry
        self.clock = clock
        self.policy = policy
        if admission is None:
            admission = AdmissionSnapshot(state.store.admission_table())
            state.store.on_admission_change(admission.update)
        self.admission = admission
        self.database = database if database is not None else StateThread(None)
        #: what the server counts (the registry's: one set of figures per server)
        self.figures = registry.figures
        self.preauth = 0
        self.connections = 0
        #: the server is shutting down: sessions end without a line each
        self.stopping = False
        #: one timer for the keepalive checks of every session (see KeepaliveWheel)
        self.keepalive_wheel = KeepaliveWheel(clock)
        #: one budget for the lines any client can cause (refused handshakes, timeouts)
        self.log_budget = LogBudget(rate=0.2, burst=5)
        #: called with each session once it is registered (the service tells it the replicas)
        self.on_session: Callable[[MuxProtocol], object] | None = None

    def buildProtocol(self, addr: IAddress | None) -> TunnelConnection:
        return TunnelConnection(self, addr)

    def enroll(self, site: str, token: str, csr_pem: str, now: datetime) -> defer.Deferred[str]:
        """
        The enrollment responder's L{Enroller}: check the request, redeem
        the token and sign the certificate, in the database thread.

        Why there and not on the reactor: redeeming is a write, and a CLI
        holding the write lock (or a slow disk) would stall every tunnel
        for up to the busy timeout, once per enrolling site (a fleet being
        rolled out enrolls thousands). It stays one transaction of
        L{StateStore.redeem_token}, so a token is still spent once, and
        every write of the server goes through the same one thread in
        order. The responder waits for the Deferred within the connection's
        handshake deadline; a decision that comes later finds the
        connection gone, and the site retries with the same key (which
        returns the same certificate). The admission snapshot learns of the
        enrollment before the reply is written (L{StateStore.on_admission_change}),
        so the site's next connection is admitted at once.
        """
        return self.database.run(self.state.enroll, site, token, csr_pem, now)


class _Turn(enum.Enum):
    """Where a connection stands in the tunnel port's waiting room."""

    WAITING = "waiting"  # accepted, not read, in line
    HANDSHAKE = "handshake"  # admitted; its first bytes not yet handled: holds a slot
    ADMITTED = "admitted"  # admitted, slot given back
    GONE = "gone"


class GatedConnection(Protocol):
    """
    What the tunnel port's socket talks to: a place in L{AdmissionGate}'s
    waiting room, then a pass-through to the TLS protocol built on
    admission (C{inner}). Only reads pass through it; the TLS protocol
    writes to the socket directly.

    Once its slot is given back it steps aside where it can: a transport
    that delivers to its C{protocol} attribute (Twisted's TCP connections
    do; no interface promises it) is pointed at the TLS protocol, and this
    object, a few hundred bytes per site, is freed. Where the attribute is
    missing or names something else, it simply goes on passing reads
    through.
    """

    __slots__ = ("gate", "addr", "accepted_at", "admitted_at", "inner", "turn", "early")

    def __init__(self, gate: AdmissionGate, addr: IAddress) -> None:
        self.gate = gate
        self.addr: IAddress | None = addr
        self.accepted_at = 0.0
        self.admitted_at = 0.0
        self.inner: IProtocol | None = None
        self.turn = _Turn.WAITING
        #: bytes read before admission (transports that ignore pauseProducing)
        self.early: list[bytes] | None = None

    def connectionMade(self) -> None:
        self.gate._arrived(self)

    def dataReceived(self, data: bytes) -> None:
        inner = self.inner
        if inner is None:
            if self.turn is _Turn.WAITING:
                self.early = (self.early or []) + [data]
            return
        inner.dataReceived(data)
        if self.turn is _Turn.HANDSHAKE:
            self.gate._release(self)

    def _step_aside(self) -> None:
        """Let the transport deliver to the TLS protocol directly (see the class doc)."""
        transport = self.transport
        if self.inner is not None and getattr(transport, "protocol", None) is self:
            transport.protocol = self.inner  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        turn, self.turn = self.turn, _Turn.GONE
        if turn is _Turn.WAITING:
            self.gate.waiting -= 1
        elif turn is _Turn.HANDSHAKE:
            self.gate._release(self)
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.connectionLost(reason)


@implementer(IProtocolFactory)
class AdmissionGate:
    """
    The outermost factory of the tunnel listener, and its waiting room.

    It refuses a connection at accept (the socket is closed before any TLS
    object exists) while C{limit} connections are already pre-auth, waiting
    ones included: a refused site sees its connection closed at once and
    backs off like after any failed attempt; a flood of silent clients
    costs us one C{accept} and one C{close} each beyond the limit.

    The others are accepted at once, and handshake in order of arrival, at
    most C{handshakes} at a time: a connection beyond that waits with its
    socket not read (so it costs no CPU, and epoll reports nothing for it)
    until a slot is free. Why: a TLS handshake costs the server about a
    millisecond of CPU, and after a restart ten thousand sites connect
    within seconds. Read all at once, hundreds of ClientHellos made one
    reactor turn last a second or more, during which nothing was accepted:
    the kernel's accept queue (1,024) overflowed and every SYN dropped cost
    its site one to seven seconds. With the slots each turn stays short, so
    the accept queue keeps draining. Short matters twice: Twisted's
    listening port accepts at most as many connections per turn as it did
    the turn before plus 20 (after a quiet spell, one), so a burst is
    taken in at a rate that grows with the number of turns per second.
    Throughput does not need many slots: each admitted connection's work
    follows in the next turns, and one core does about as many handshakes
    a second whether 16 or 64 start per turn.

    A slot is held from admission until the connection's first bytes have
    been handled (the ClientHello: the expensive half of the server's
    handshake work), it is gone, or C{grace} seconds have passed. A client
    that sends nothing costs no CPU and must not keep others waiting; a
    site's ClientHello follows its TCP handshake at once, and is there to
    read when it is admitted. Silent clients can therefore hold up the line
    only by connecting C{handshakes / grace} times a second (64), about as
    often as filling the C{limit} once per handshake timeout takes.
    A waiting connection is aborted once the handshake timeout has passed
    since it was accepted, like any pre-auth connection; one that is
    admitted gets what is left of that timeout.
    """

    _log = Logger()

    def __init__(
        self,
        wrapped: IProtocolFactory,
        server: TunnelServerFactory,
        limit: int,
        handshakes: int = 16,
        grace: float = 0.25,
    ) -> None:
        if handshakes < 1:
            raise ValueError(f"handshakes must be at least 1, not {handshakes}")
        self.wrapped = wrapped
        self.server = server
        self.limit = limit
        self.handshakes = handshakes
        self.grace = grace
        self.refused = 0
        #: connections waiting for a slot, and those dropped at the deadline
        self.waiting = 0
        self.expired = 0
        #: slots taken
        self.in_handshake = 0
        self._line: deque[GatedConnection] = deque()
        #: slot holders in order of admission (a dict as an ordered set)
        self._holders: dict[GatedConnection, None] = {}
        self._line_timer: IDelayedCall | None = None
        self._grace_timer: IDelayedCall | None = None
        self._budget = LogBudget(rate=0.1, burst=1)

    @property
    def preauth(self) -> int:
        """Connections not (yet) authenticated: waiting, or past admission."""
        return self.server.preauth + self.waiting

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        if self.preauth >= self.limit:
            self.refused += 1
            allowed, suppressed = self._budget.allow("full", self.server.clock.seconds())
            figures = self.server.figures
            figures.handshake("preauth-limit")
            figures.refuse(
                "",
                "handshake",
                f"refused {describe(addr)} at accept: {self.preauth} connections not authenticated yet "
                f"(--max-preauth {self.limit})",
                keep=allowed,
            )
            if allowed:
                self._log.warn(
                    "refusing connections on the tunnel port (from {peer} and others): {count} connections are not "
                    "authenticated yet, the limit (--max-preauth) is {limit}; {refused} refused so far",
                    peer=describe(addr),
                    count=self.preauth,
                    limit=self.limit,
                    refused=self.refused,
                )
            return None
        return GatedConnection(self, addr)

    # -- the waiting room ----------------------------------------------------

    def _arrived(self, connection: GatedConnection) -> None:
        connection.accepted_at = self.server.clock.seconds()
        if self.waiting == 0 and self.in_handshake < self.handshakes:
            self._admit(connection)
            return
        transport = connection.transport
        assert transport is not None
        cast(IPushProducer, transport).pauseProducing()
        self.waiting += 1
        self._line.append(connection)
        if self._line_timer is None:
            self._arm_line_timer()

    def _admit(self, connection: GatedConnection) -> None:
        transport = connection.transport
        assert transport is not None and connection.addr is not None
        connection.turn = _Turn.HANDSHAKE
        connection.admitted_at = self.server.clock.seconds()
        self.in_handshake += 1
        self._holders[connection] = None
        if self._grace_timer is None:
            self._grace_timer = self.server.clock.callLater(self.grace, self._grace_over)
        inner = self.wrapped.buildProtocol(connection.addr)
        connection.addr = None
        if inner is None:
            self._release(connection)
            connection.turn = _Turn.GONE
            transport.loseConnection()
            return
        tunnel = getattr(inner, "wrappedProtocol", None)
        if isinstance(tunnel, TunnelConnection):
            tunnel.accepted_at = connection.accepted_at  # its deadline counts from accept
        connection.inner = inner
        inner.makeConnection(transport)
        cast(IPushProducer, transport).resumeProducing()
        early, connection.early = connection.early, None
        for data in early or ():
            connection.dataReceived(data)

    def _release(self, connection: GatedConnection) -> None:
        """C{connection} gives its slot back; admit whoever is next in line."""
        if connection.turn is _Turn.HANDSHAKE:
            connection.turn = _Turn.ADMITTED
            connection._step_aside()
        if connection in self._holders:
            del self._holders[connection]
            self.in_handshake -= 1
        while self.in_handshake < self.handshakes and self._line:
            waiting = self._line.popleft()
            if waiting.turn is _Turn.WAITING:
                self.waiting -= 1
                self._admit(waiting)

    def _arm_line_timer(self) -> None:
        self._line_timer = None
        while self._line and self._line[0].turn is not _Turn.WAITING:
            self._line.popleft()
        if self._line:
            timeout = self.server.policy.handshake_timeout
            due = self._line[0].accepted_at + timeout - self.server.clock.seconds()
            self._line_timer = self.server.clock.callLater(max(due, 0.0), self._line_deadline)

    def _line_deadline(self) -> None:
        """Abort the connections that waited the whole handshake timeout."""
        self._line_timer = None
        now = self.server.clock.seconds()
        timeout = self.server.policy.handshake_timeout
        count = 0
        while self._line and self._line[0].accepted_at + timeout <= now:
            waiting = self._line.popleft()
            if waiting.turn is _Turn.WAITING:
                count += 1
                transport = waiting.transport
                if transport is not None:
                    abort = getattr(transport, "abortConnection", None)
                    (abort or transport.loseConnection)()
        if count:
            self.expired += count
            allowed, suppressed = self._budget.allow("expired", now)
            figures = self.server.figures
            figures.handshake("queue-timeout", count)
            figures.refuse(
                "",
                "handshake",
                f"dropped {count} connections that waited {timeout}s for their turn to handshake",
                keep=allowed,
                count=count,
            )
            if allowed:
                self._log.warn(
                    "dropping {count} connections on the tunnel port that waited {timeout}s for their turn to "
                    "handshake ({handshakes} at a time); {expired} dropped so far",
                    count=count,
                    timeout=timeout,
                    handshakes=self.handshakes,
                    expired=self.expired,
                )
        self._arm_line_timer()

    def _grace_over(self) -> None:
        """Slots held C{grace} seconds by clients that sent nothing are given back."""
        self._grace_timer = None
        now = self.server.clock.seconds()
        for holder in list(self._holders):
            if holder.admitted_at + self.grace > now:
                break
            self._release(holder)
        if self._holders:
            oldest = next(iter(self._holders))
            self._grace_timer = self.server.clock.callLater(oldest.admitted_at + self.grace - now, self._grace_over)

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()
        for timer in (self._line_timer, self._grace_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._line_timer = self._grace_timer = None

    def logPrefix(self) -> str:
        return "rtunnel"


@frozen
class _Poll:
    """What one revocation poll read in the database thread."""

    token: tuple[int, int]
    #: sites enrolled or revoked through the server's own connection
    own: frozenset[str]
    #: every site's admission, when another process changed the database
    table: dict[str, SiteAdmission] | None


class RevocationWatch:
    """
    Cuts live sessions whose site was revoked or re-enrolled (by the
    C{rtunnel sites revoke} command or a new keyfile), within one poll
    interval, and keeps the admission snapshot current with other
    processes' changes. Polling a SQLite change counter every second costs
    nothing and needs no signal plumbing between the CLI and the server
    process.

    The poll reads in the database thread and applies what it read on the
    reactor: when another process committed, the whole admission table is
    reloaded into the snapshot and every live session re-checked; when the
    only changes since the last poll are the server's own (enrollments it
    redeemed, which the store names and has already put in the snapshot),
    only those sites are re-checked.

    Replicas sharing the database commit every second (their heartbeats),
    and on SQLite every such commit moves the change token: the table is
    then reloaded only when the admission counter moved too (every
    enrollment and revocation, through any connection, bumps it), so that
    a replica does not read every site and re-check every session each
    second for nothing. A revocation through another replica or the CLI
    is still seen at the next poll.
    """

    _log = Logger()

    def __init__(
        self,
        state: ServerState,
        registry: SiteRegistry,
        admission: AdmissionSnapshot,
        database: StateThread | None = None,
    ) -> None:
        """
        Reads the store's change token now, in the calling thread: build
        the watch before the snapshot's table is loaded, so that a change
        between the two is seen by the first poll.
        """
        self.state = state
        self.registry = registry
        self.admission = admission
        self.database = database if database is not None else StateThread(None)
        self._last = state.store.changes_token()
        #: the admission counter when the table was last loaded (only the database thread reads it after this)
        self._counter = state.store.get_meta(ADMISSION_COUNTER)
        state.store.take_own_changes()  # what happened before is no change to us
        #: sites changed through our own connection, not yet re-checked
        self._pending: set[str] = set()

    def check(self) -> defer.Deferred[None]:
        """
        One poll. Its Deferred never fails (a LoopingCall stops for good on
        a failure): a database error is reported by the database thread
        (one line when it starts failing, one when it works again) and the
        next poll tries again. A LoopingCall waits for it, so polls never
        pile up behind a slow database.

        It reads ahead of the writes queued (L{StateThread.run_first}):
        a revocation must cut the site within two seconds also while
        thousands of sites reconnect and their session writes queue up.
        What it reads does not depend on them (an enrollment through our
        own connection is in the snapshot as soon as it commits, and named
        by the next poll).
        """
        d = self.database.run_first(self._read, self._last)
        return d.addCallbacks(self._apply, self._failed)

    def _read(self, last: tuple[int, int]) -> _Poll | None:
        """In the database thread: what changed since C{last}, if anything."""
        store = self.state.store
        token = store.changes_token()
        if token == last:
            return None
        table = None
        if token[0] != last[0]:
            counter = store.get_meta(ADMISSION_COUNTER)
            if counter != self._counter:
                table = store.admission_table()
                self._counter = counter
        return _Poll(token, store.take_own_changes(), table)

    def _apply(self, poll: _Poll | None) -> None:
        self.database.worked()
        if poll is None:
            return
        self._pending |= poll.own
        if poll.table is not None:
            # Another process committed: anything may have changed.
            self.admission.replace(poll.table)
            for site, fingerprint, _ in self.registry.live():
                self._recheck(site, fingerprint)
        else:
            for site in sorted(self._pending):
                live = self.registry.live_session(site)
                if live is not None:
                    self._recheck(site, live[0])
        self._pending.clear()
        self._last = poll.token

    def _failed(self, failure: Failure) -> None:
        self.database.failed("the revocation poll", failure)

    def _recheck(self, site: str, fingerprint: str) -> None:
        try:
            self.admission.check(site, fingerprint)
        except SiteRejected as e:
            self._log.warn("cutting site {site}: {code}: {reason}", site=site, code=e.code, reason=e.message)
            self.registry.cut(site, ErrorCode.NOT_AUTHORIZED, f"{e.code}: {e.message}")


#: How long a stopping server waits for the database thread to finish the
#: writes queued before it (the stop record among them): twice the store's
#: busy timeout, so that a CLI holding the write lock for one transaction
#: does not cost them.
STATE_FLUSH_TIMEOUT = 10.0


class _DaemonThread(threading.Thread):
    """A worker that never keeps the process alive (see L{StateThread.stop})."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, daemon=True, **kwargs)


class _StatePool(ThreadPool):
    threadFactory = _DaemonThread


def _nothing() -> None:
    """The job that makes the thread take the L{StateThread.run_first} jobs when nothing else is queued."""


class StateThread:
    """
    The one thread that uses the server's state database while it runs.

    The store's calls block (a CLI holding the write lock makes a write
    wait up to 5 s; a slow disk makes anything wait), and on the reactor
    that stalled every tunnel. So once the server starts, every use of its
    store is a job here: the bookkeeping writes (a site connected or
    disconnected, the public port, the stop record), the revocation poll's
    reads, and enrollments. Admission itself reads the snapshot in memory.

    One thread, hence one user of the store's one connection at a time
    (SQLite connections must not be shared by concurrent users; see
    L{StateStore} on the hand-over), and jobs run in the order they were
    submitted: a site's "connected" is written before its "disconnected".

    Background failures are reported through L{failed}/L{worked}: one line
    when the database starts failing and one when it works again, never a
    line per write (a locked database would otherwise log one per site
    connecting). A failed write never ends a session.

    With a reactor that cannot take calls from other threads (a test's
    C{Clock} or C{MemoryReactor}), or C{None}, or before L{start} and after
    a clean L{stop}, jobs run inline on the caller's thread, in order, as
    the store was used before there was a thread.
    """

    _log = Logger()

    def __init__(self, reactor: object | None, name: str = "rtunnel-state") -> None:
        self._reactor = reactor
        self.name = name
        #: results can be delivered from the thread to this reactor
        self.threaded = IReactorFromThreads.providedBy(reactor)
        self._pool: ThreadPool | None = None
        #: given up on at stop: queued jobs are skipped, new ones refused
        self._abandoned = False
        #: jobs submitted and not finished
        self.pending = 0
        #: the last background job failed; how many failed since it worked
        self.failing = False
        self.failures = 0
        #: L{run_first} jobs not taken yet, with their Deferreds (a deque: the
        #: reactor appends while the thread takes, each atomically)
        self._first: deque[tuple[Callable[[], Any], defer.Deferred[Any]]] = deque()

    def start(self) -> None:
        """Start the thread (with a threaded reactor); from now on only it uses the store."""
        if self.threaded and self._pool is None and not self._abandoned:
            self._pool = _StatePool(1, 1, self.name)
            self._pool.start()

    def run(self, f: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> defer.Deferred[_T]:
        """
        Run C{f(*args, **kwargs)} after every job submitted before it; its
        result (or failure) is delivered on the reactor.
        """
        if self._abandoned:
            return defer.fail(StateError("the state database thread was given up at stop"))
        self.pending += 1
        if self._pool is None:
            d = defer.maybeDeferred(f, *args, **kwargs)
        else:
            reactor = cast(IReactorFromThreads, self._reactor)
            d = deferToThreadPool(reactor, self._pool, self._job, functools.partial(f, *args, **kwargs))
        d.addBoth(self._finished)
        return d

    def run_first(self, f: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> defer.Deferred[_T]:
        """
        Run C{f(*args, **kwargs)} ahead of the jobs already queued: at the
        start of the next job the thread takes; its result (or failure) is
        delivered on the reactor. For the replica heartbeat: when ten
        thousand sites reconnect, their session writes queue up for
        seconds (about 0.15 ms each on SQLite, 0.35 ms on a local
        PostgreSQL, more over a network), and a heartbeat behind them
        would look stopped to the other replicas, which drop a replica
        whose heartbeat is older than REPLICA_TIMEOUT. Only for jobs whose
        order with the others does not matter.
        """
        if self._abandoned:
            return defer.fail(StateError("the state database thread was given up at stop"))
        if self._pool is None:
            return self.run(f, *args, **kwargs)
        self.pending += 1
        d: defer.Deferred[_T] = defer.Deferred()
        self._first.append((functools.partial(f, *args, **kwargs), d))
        # A job of its own, so that it runs when nothing else is queued;
        # whichever job the thread takes first runs it.
        reactor = cast(IReactorFromThreads, self._reactor)
        deferToThreadPool(reactor, self._pool, self._job, _nothing).addErrback(lambda _: None)
        d.addBoth(self._finished)
        return d

    def _job(self, call: Callable[[], _T]) -> _T:
        if self._abandoned:
            raise StateError("skipped: the state database thread was given up at stop")
        self._run_first()
        return call()

    def _run_first(self) -> None:
        """In the thread: the L{run_first} jobs waiting, in the order they came."""
        reactor = cast(IReactorFromThreads, self._reactor)
        while True:
            try:
                call, d = self._first.popleft()
            except IndexError:
                return
            try:
                result = call()
            except BaseException:
                reactor.callFromThread(d.errback, Failure())
            else:
                reactor.callFromThread(d.callback, result)

    def _finished(self, result: _T) -> _T:
        self.pending -= 1
        return result

    def write(self, what: str, f: Callable[_P, object], *args: _P.args, **kwargs: _P.kwargs) -> defer.Deferred[None]:
        """
        A background job whose failure is only reported (see L{failed});
        the Deferred never fails. C{what} says what it does, for that line.
        """

        def done(_: object) -> None:
            self.worked()

        def failed(failure: Failure) -> None:
            self.failed(what, failure)

        return self.run(f, *args, **kwargs).addCallbacks(done, failed)

    def worked(self) -> None:
        """A background job worked: say so if the database was failing."""
        if self.failing:
            self.failing = False
            self._log.info("state database works again ({count} operations failed meanwhile)", count=self.failures)
            self.failures = 0

    def failed(self, what: str, failure: Failure) -> None:
        """A background job failed: one line if it is the first since one worked."""
        self.failures += 1
        if self.failing:
            return
        self.failing = True
        text = (
            "state database: {what} failed: {error}; tunnels carry on (sites are admitted from memory) "
            "and no session is cut for it, but until it works again connection status is not recorded and "
            "revocations by other processes are not seen (one line follows when it works)"
        )
        if failure.check(StateError):  # locked, disk full, damaged: the message says it all
            self._log.warn(text, what=what, error=failure.getErrorMessage())
        else:  # a bug: the traceback too
            self._log.failure(text, failure, level=LogLevel.warn, what=what, error=failure.getErrorMessage())

    def to_reactor(self, f: Callable[_P, object]) -> Callable[_P, None]:
        """
        C{f}, called on the reactor whatever thread calls the result (for
        the store's listeners, which are called in the thread that commits).
        """
        if not self.threaded:

            def inline(*args: _P.args, **kwargs: _P.kwargs) -> None:
                f(*args, **kwargs)

            return inline
        reactor = cast(IReactorFromThreads, self._reactor)

        def hop(*args: _P.args, **kwargs: _P.kwargs) -> None:
            reactor.callFromThread(f, *args, **kwargs)

        return hop

    def stop(self, timeout: float = STATE_FLUSH_TIMEOUT) -> defer.Deferred[bool]:
        """
        Wait for the jobs submitted so far, then end the thread: C{True}.

        Bounded: after C{timeout} seconds (a database locked for longer, a
        hung disk) the jobs still queued are given up (skipped when their
        turn comes, with a warning saying how many), the thread is left to
        finish its current one, and this fires C{False}; the thread is a
        daemon, so it cannot keep the process from exiting. The next start
        clears the connection flags a lost write would have cleared.
        """
        pool = self._pool
        if pool is None:
            return defer.succeed(True)
        done: defer.Deferred[bool] = defer.Deferred()
        clock = cast(IReactorTime, self._reactor)

        def flushed(_: object) -> None:
            if done.called:
                return
            timer.cancel()
            self._pool = None
            pool.stop()  # idle now: the join returns at once
            done.callback(True)

        def expired() -> None:
            if done.called:
                return
            self._abandoned = True
            self._pool = None
            self._log.warn(
                "state database: {count} writes not done after {timeout}s at stop; stopping without them "
                "(the next start clears the connection flags)",
                count=max(self.pending - 1, 0),
                timeout=timeout,
            )
            # The pool ends its thread once the current job returns (the
            # rest are skipped); joining it here could wait for ever.
            threading.Thread(target=pool.stop, name=f"{self.name}-stopper", daemon=True).start()
            done.callback(False)

        timer = clock.callLater(timeout, expired)
        self.run(lambda: None).addBoth(flushed)
        return done


#: Listen backlog of the tunnel port unless its endpoint description sets
#: one. Twisted's default of 50 overflowed when a thousand sites came back
#: after a restart (384 SYNs dropped, each a one-second stall or worse); at
#: 10,000 sites a queue of 1,024 still dropped tens of thousands of SYNs.
#: Linux silently caps it at net.core.somaxconn (4,096 by default since 5.4).
TUNNEL_BACKLOG = 4096
_LOOPBACK = ("127.", "::1", "localhost")


def with_backlog(description: str, backlog: int = TUNNEL_BACKLOG) -> str:
    """
    C{description} with C{backlog=BACKLOG} added, for the endpoint types
    that take one (tcp, tcp6, unix, ssl), unless it already names one.
    """
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in {"tcp", "tcp6", "unix", "ssl"} or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


def effective_max_preauth(configured: int, fd_limit: int) -> int:
    """
    The pre-auth cap actually applied: at most a quarter of the descriptors
    the process may open, so that pre-auth connections alone can never take
    the descriptors sites and forward clients need.
    """
    return max(1, min(configured, (fd_limit - RESERVED) // 4))


class ServerSettings(TypingProtocol):
    """
    What L{TunnelServerService} reads of its configuration:
    L{rtunnel.services.ServerConfig} provides it (the roles import nothing
    from the entry points, so this says it by shape).
    """

    @property
    def listen(self) -> str: ...
    @property
    def public_addresses(self) -> tuple[str, ...]: ...
    @property
    def forwards(self) -> tuple[ForwardSpec, ...]: ...
    @property
    def open_timeout(self) -> float: ...
    @property
    def drain_grace(self) -> float: ...
    @property
    def revocation_poll(self) -> float: ...
    @property
    def max_streams_per_site(self) -> int: ...
    @property
    def max_pending_opens(self) -> int: ...
    @property
    def policy(self) -> ServerPolicy: ...
    @property
    def name(self) -> str: ...
    @property
    def replica_id(self) -> str | None: ...
    @property
    def advertise(self) -> str | None: ...


@frozen
class ExtraListener:
    """
    A port the service listens on beside the tunnel port and the forwards,
    for a layer above the roles (the front doors of L{rtunnel.frontdoor}):
    listened on after the forwards, stopped with them, its failure to
    listen fatal like theirs, its C{connections} in the descriptor estimate.

    @ivar label: how the "listening on" line names it.
    @ivar description: a Twisted server endpoint description.
    @ivar factory: the listening factory (its C{connections}, if it has one,
        counts as descriptors held).
    @ivar on_listening: called with the port once it listens, for a layer
        that must know the address actually bound (port 0 picks one).
    """

    label: str
    description: str
    factory: Factory
    on_listening: Callable[[IListeningPort], object] | None = None


class TunnelServerService(MultiService):
    """
    Listens for sites (TLS added here) and on each forward port; cuts
    revoked sites; drains every session on stop.

    The state database is read once, here (at build time): the admission
    snapshot and the revocation poll's starting point. From L{startService}
    on, only the L{StateThread} uses it: sites are admitted from the
    snapshot, and the connection status is written in the background, in
    order; a database that is locked or slow delays those writes and
    nothing else. L{stopService} waits for them (bounded).

    @param on_fatal: called with a message when the service cannot run (a
        port cannot be listened on); the twistd builder stops the process
        with a non-zero status.
    @param publish: called with the service's name and registry at start
        (and C{withdraw} at stop), so that C{rtunnel:} endpoint descriptions
        reach this server's sites; the builder passes the endpoints' table.
    """

    _log = Logger()

    def __init__(
        self,
        config: ServerSettings,
        state: ServerState,
        reactor: Any,
        on_fatal: Callable[[str], None],
        *,
        publish: Callable[[str, SiteRegistry], None] | None = None,
        withdraw: Callable[[str, SiteRegistry], None] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # MultiService.__init__ is unannotated in Twisted
        self.config = config
        self.on_fatal = on_fatal
        self._publish = publish
        self._withdraw = withdraw
        self.state = state
        self.reactor = reactor
        self.database = StateThread(reactor)
        port = listen_port(config.listen)
        #: this server's id among the replicas sharing its database; a
        #: default for a tunnel port chosen at listen time (port 0) is
        #: completed with the port bound, before anything is recorded
        self.replica_id = config.replica_id or default_replica_id(port or 0)
        self._id_pending = config.replica_id is None and port is None
        self.registry = SiteRegistry(
            reactor,
            on_connected=self._site_connected,
            on_disconnected=self._site_disconnected,
            max_pending_opens=config.max_pending_opens,
            max_streams_per_site=config.max_streams_per_site,
            on_services=self._site_services,
        )
        self.registry.seed_services(state.store.site_services())
        #: what the server counts, for its admin endpoint (L{rtunnel.observe})
        self.figures = self.registry.figures
        self.figures.seed_last_seen(
            (record.name, record.last_seen.timestamp())
            for record in state.store.list_sites()
            if record.last_seen is not None
        )
        self.admission = AdmissionSnapshot()
        # The watch reads the change token before the table is loaded: a
        # change in between is then seen by the first poll, never missed.
        self._watch = RevocationWatch(state, self.registry, self.admission, self.database)
        self.admission.replace(state.store.admission_table())
        state.store.on_admission_change(self.database.to_reactor(self.admission.update))
        self.factory = TunnelServerFactory(
            state, self.registry, reactor, config.policy, admission=self.admission, database=self.database
        )
        #: the replica set: heartbeats, and what sites are told of it
        self.membership = ReplicaMembership(
            state.store, self.database, reactor, self.replica_id, config.advertise or "", self.registry.sessions
        )
        self.factory.on_session = self.membership.tell
        self.gate: AdmissionGate | None = None
        self.forward_factories: list[ForwardFactory] = []
        # Listing /proc/self/fd every 2 s is costly with many sites: it is
        # read only when the connections we hold come near the warning level.
        self.descriptors = DescriptorWatch(reactor, estimate=self._connections)
        self.ports: list[IListeningPort] = []
        self.tunnel_port: IListeningPort | None = None
        self.forward_ports: dict[ForwardSpec, IListeningPort] = {}
        #: the factories of the command-line forwards (the database's are L{live_forwards}')
        self.command_line_forwards: dict[ForwardSpec, ForwardFactory] = {}
        #: ports of the layers above (front doors), added before the service starts
        self.listeners: list[ExtraListener] = []
        self._poll: task.LoopingCall | None = None
        self._ticker: task.LoopingCall | None = None
        self._ticks = 0
        self._probe_cursor = 0
        self._listening: defer.Deferred[None] | None = None
        # Forwards added and removed while we run (rtunnel forwards add/remove).
        self.live_forwards = LiveForwards(
            state,
            self.registry,
            reactor,
            self.database,
            config.open_timeout,
            self.forward_factories,
            poll_interval=config.revocation_poll,
            replica_id=self.replica_id,
        )

    def _connections(self) -> int:
        """Connections this server holds a descriptor for: sites (and would-be sites), forward clients."""
        forwards = sum(f.connections for f in self.forward_factories)
        return self.factory.connections + forwards + sum(getattr(x.factory, "connections", 0) for x in self.listeners)

    # -- the connection status, written in the database thread -------------

    def _site_connected(self, site: str, peer: str) -> None:
        self.database.write(
            f"recording that site {site} connected",
            self.state.store.session_opened,
            site,
            self.replica_id,
            peer,
            utcnow(),
        )

    def _site_services(self, site: str, services: Mapping[str, HostPort]) -> None:
        self.database.write(
            f"recording the services site {site} announced", self.state.store.record_services, site, services, utcnow()
        )

    def _site_disconnected(self, site: str) -> None:
        if self.factory.stopping:
            # One write per site made a drain of ten thousand sessions
            # seconds longer (and the sites with it); the replica's stop
            # record removes all its sessions at the end.
            return
        self.database.write(
            f"recording that site {site} disconnected",
            self.state.store.session_closed,
            site,
            self.replica_id,
            utcnow(),
        )

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service.startService is unannotated in Twisted
        self.database.start()
        if self._publish is not None:
            self._publish(self.config.name, self.registry)
        self._poll = task.LoopingCall(self._watch.check)
        self._poll.clock = self.reactor
        self._poll.start(self.config.revocation_poll, now=False)
        self._ticker = task.LoopingCall(self._tick)
        self._ticker.clock = self.reactor
        self._ticker.start(1.0, now=False)
        self.descriptors.start()
        self._listening = self._listen_all()

    @defer.inlineCallbacks
    def _listen_all(self) -> Generator[defer.Deferred[Any], Any, None]:
        description = with_backlog(self.config.listen)
        try:
            # Our reactor, not the global one, times its small-write batching.
            tls_factory = BulkTLSFactory(server_tls_options(self.state), False, self.factory, clock=self.reactor)
            limit = effective_max_preauth(self.config.policy.max_preauth, soft_limit())
            if limit < self.config.policy.max_preauth:
                self._log.warn(
                    "at most {limit} unauthenticated connections at once (--max-preauth {configured} lowered to a "
                    "quarter of the file descriptor limit)",
                    limit=limit,
                    configured=self.config.policy.max_preauth,
                )
            self.gate = AdmissionGate(tls_factory, self.factory, limit, self.config.policy.max_handshakes)
            port = yield listen(self.reactor, description, self.gate)
            self.tunnel_port = port
            self.ports.append(port)
            self._log.info("tunnel server listening for sites on {address}", address=_address(port))
            self._start_membership(port)
            self.database.write(
                "recording the public port", self.state.store.set_meta, PUBLIC_PORT_KEY, str(self._public_port(port))
            )
            for spec in self.config.forwards:
                description = spec.endpoint_description()
                factory = ForwardFactory(spec, self.registry, self.config.open_timeout)
                self.forward_factories.append(factory)
                self.command_line_forwards[spec] = factory
                port = yield listen(self.reactor, description, factory)
                self.forward_ports[spec] = port
                self.ports.append(port)
                self._log.info("forward {forward} listening on {address}", forward=str(spec), address=_address(port))
                if not spec.bind.startswith(_LOOPBACK):
                    self._log.warn(
                        "forward {forward} is bound to {bind}, not loopback: anyone who can reach that address "
                        "reaches {site}:{target} without authentication (docs/security.md, forward clients)",
                        forward=str(spec),
                        bind=spec.bind,
                        site=spec.site,
                        target=str(spec.target),
                    )
            for extra in self.listeners:
                description = extra.description
                port = yield listen(self.reactor, description, extra.factory)
                self.ports.append(port)
                self._log.info("{what} listening on {address}", what=extra.label, address=_address(port))
                if extra.on_listening is not None:
                    extra.on_listening(port)
            self.live_forwards.start(self.config.forwards)
        except Exception:
            failure = Failure()
            self.on_fatal(f"cannot listen on {description}: {failure.getErrorMessage()}")

    def _start_membership(self, port: IListeningPort) -> None:
        """
        Complete a default replica id with the port bound (C{--listen
        tcp:0}), then record this replica and start its heartbeat: the
        start record is the first database job of the run, so it clears
        what an earlier run under this id left before this one records a
        session.
        """
        if self._id_pending:
            self._id_pending = False
            bound = getattr(port.getHost(), "port", None)
            self.replica_id = default_replica_id(bound if bound is not None else _address(port))
            self.membership.rename(self.replica_id)
            self.live_forwards.replica_id = self.replica_id
        self._log.info(
            "replica {replica}{advertised}",
            replica=self.replica_id,
            advertised=f", advertised to sites at {self.membership.advertise}" if self.membership.advertise else "",
        )
        self.membership.start()

    def _tick(self) -> None:
        """
        Each second: the throughput sample when one is due, and the
        keepalive round trip of a share of the sites (L{RTT_PROBE_INTERVAL}).
        """
        self._ticks += 1
        if self._ticks % max(round(self.figures.interval), 1) == 0:
            self.figures.sample()
        sessions = self.registry.sessions()
        if not sessions:
            return
        total = len(sessions)
        count = -(-total // max(int(RTT_PROBE_INTERVAL), 1))
        start = self._probe_cursor % total
        end = start + count
        batch = sessions[start:end]
        if end > total:
            batch += sessions[: end - total]
        for session in batch:
            session.ping()
        self._probe_cursor = end

    def _public_port(self, port: IListeningPort) -> int:
        """The port sites dial: from --public-address HOST:PORT if given,
        else the one we listen on."""
        for address in self.config.public_addresses:
            try:
                host, public = parse_address(address, default_port=0)
            except ValueError:
                continue
            if public:
                return public
        return int(getattr(port.getHost(), "port", DEFAULT_PORT))

    @defer.inlineCallbacks
    def stopService(self) -> Generator[defer.Deferred[Any], object, None]:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self.descriptors.stop()
        if self._withdraw is not None:
            self._withdraw(self.config.name, self.registry)
        ports, self.ports = self.ports, []
        yield defer.gatherResults(
            [self.live_forwards.stop(), *(defer.maybeDeferred(p.stopListening) for p in ports)], consumeErrors=True
        )
        sessions = self.registry.sessions()
        # From now on sessions end without a line and a database write each
        # (see TunnelConnection._session_closed): one line says it all.
        self.factory.stopping = True
        if sessions:
            self._log.info(
                "draining {count} site sessions (grace {grace}s)", count=len(sessions), grace=self.config.drain_grace
            )
        started = self.reactor.seconds()
        yield defer.gatherResults(
            [s.drain(self.config.drain_grace, "tunnel server shutting down") for s in sessions], consumeErrors=True
        )
        if sessions:
            self._log.info(
                "drained {count} site sessions in {seconds:.1f}s",
                count=len(sessions),
                seconds=self.reactor.seconds() - started,
            )
        self.membership.stop()
        yield self.database.stop(STATE_FLUSH_TIMEOUT)
        self._log.info("tunnel server stopped")
        yield super().stopService()  # type: ignore[no-untyped-call]  # MultiService.stopService is unannotated in Twisted


def _address(port: IListeningPort) -> str:
    return describe(port.getHost())


def utcnow() -> datetime:
    return datetime.now(UTC)
