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
A connection that has not got that far within the handshake timeout is
dropped, so idle or slow connections (slowloris) cannot pile up.
"""

from __future__ import annotations

from datetime import datetime, timezone

from attrs import frozen
from twisted.internet.interfaces import IAddress, IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from rtunnel.logs import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..adapter.address import describe
from ..adapter.protocol import Keepalive, MuxProtocol
from ..adapter.stream import MuxStream
from ..identity.errors import SiteRejected
from ..identity.state import ServerState
from ..identity.tlsconfig import peer_identity
from ..mux.errors import ErrorCode
from ..mux.settings import Settings, WindowTuning
from .enrollment import EnrollmentResponder
from .registry import SiteRegistry
from .splice import set_nodelay


@frozen
class ServerPolicy:
    """
    Timeouts and limits of the server role (docs/operations.md lists each).

    @ivar handshake_timeout: TLS handshake plus authentication (or a whole
        enrollment) must finish within this many seconds.
    @ivar max_preauth_bytes: bytes a connection may send before it is
        authenticated; more is an attack or a confused peer.
    """

    settings: Settings = Settings()
    tuning: WindowTuning = WindowTuning()
    keepalive: Keepalive | None = Keepalive()
    handshake_timeout: float = 30.0
    max_preauth_bytes: int = 256 * 1024


def _refuse_site_streams(stream: MuxStream) -> None:
    # Sites do not open streams into the cloud in this version.
    stream.refuse(ErrorCode.TARGET_NOT_ALLOWED, "the tunnel server accepts no streams from sites")


@implementer(IHandshakeListener)
class TunnelConnection(Protocol):
    """
    The first protocol on every TLS connection from a site; it becomes a
    mux session or an enrollment exchange once the peer is known.
    """

    _log = Logger()

    def __init__(self, factory: TunnelServerFactory, addr: IAddress | None) -> None:
        self.factory = factory
        self.peer = describe(addr)
        self.inner: Protocol | None = None
        self.site: str | None = None
        self.fingerprint: str | None = None
        self._held: list[bytes] = []
        self._held_size = 0
        self._timer: IDelayedCall | None = None
        self._lost = False

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self._deadline = self.factory.clock.seconds() + self.factory.policy.handshake_timeout
        self._timer = self.factory.clock.callLater(self.factory.policy.handshake_timeout, self._timed_out)

    def handshakeCompleted(self) -> None:
        if self._lost:
            return
        identity = peer_identity(self.transport)
        if identity is None:
            self._log.info("enrollment connection from {peer}", peer=self.peer)
            # The whole exchange, TLS included, gets one handshake timeout.
            remaining = max(self._deadline - self.factory.clock.seconds(), 0.001)
            responder = EnrollmentResponder(self.factory.state, clock=self.factory.clock, peer=self.peer, timeout=remaining)
            self._cancel_timer()  # the responder enforces its own deadline
            self._become(responder)
            return
        site, fingerprint = identity
        self.site, self.fingerprint = site, fingerprint
        mux = self._new_mux(site)
        refusal = self._refusal(site, fingerprint)
        if refusal is not None:
            mux.refuse_session(*refusal)
            self._become(mux)
            return
        self._become(mux)
        mux.when_ready().addCallbacks(lambda _: self._authenticated(site, mux), lambda f: None)

    def _refusal(self, site: str, fingerprint: str) -> tuple[int, str] | None:
        """
        Ask the state store whether this site certificate may connect:
        C{None} if it may, else the GOAWAY code and reason that tell the
        site why not.
        """
        try:
            self.factory.state.store.check_site(site, fingerprint)
        except SiteRejected as e:
            self._log.warn(
                "site {site} from {peer} rejected: {code}: {reason}", site=site, peer=self.peer, code=e.code, reason=e.message
            )
            return ErrorCode.NOT_AUTHORIZED, f"{e.code}: {e.message}"
        except Exception:
            # The database failed (locked, disk error): refuse this attempt;
            # the site backs off and retries.
            self._log.failure("could not check site {site} from {peer}; closing", site=site, peer=self.peer)
            return ErrorCode.INTERNAL_ERROR, "the tunnel server could not check this site; try again"
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
        )

    def _authenticated(self, site: str, mux: MuxProtocol) -> None:
        self._cancel_timer()
        assert self.fingerprint is not None
        # Again: a revocation committed between the handshake and this HELLO
        # found nothing registered to cut, and would be missed.
        refusal = self._refusal(site, self.fingerprint)
        if refusal is not None:
            mux.terminate(*refusal)
            return
        self._log.info("site {site} connected from {peer}", site=site, peer=self.peer)
        self.factory.registry.register(site, mux, self.peer, self.fingerprint)
        mux.when_closed().addCallback(self._session_closed, site)

    def _session_closed(self, reason: BaseException, site: str) -> None:
        self._log.info("site {site} from {peer} disconnected: {reason}", site=site, peer=self.peer, reason=str(reason))

    def _become(self, protocol: Protocol) -> None:
        self.inner = protocol
        protocol.makeConnection(self.transport)
        held, self._held = self._held, []
        for data in held:
            protocol.dataReceived(data)

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self._held_size += len(data)
        if self._held_size > self.factory.policy.max_preauth_bytes:
            self._log.warn("dropping {peer}: too much data before authentication", peer=self.peer)
            self._abort()
            return
        self._held.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._cancel_timer()
        if self.inner is not None:
            self.inner.connectionLost(reason)

    def _timed_out(self) -> None:
        self._timer = None
        inner = self.inner
        if isinstance(inner, MuxProtocol) and inner.ready:
            return
        self._log.warn(
            "dropping {peer}: no authenticated session within {timeout}s",
            peer=self.peer,
            timeout=self.factory.policy.handshake_timeout,
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


class TunnelServerFactory(Factory):
    """
    The factory behind the server's TLS listener (wrap it with
    C{TLSMemoryBIOFactory(server_tls_options(state), False, factory)}).
    """

    protocol = TunnelConnection
    noisy = False

    def __init__(
        self, state: ServerState, registry: SiteRegistry, clock: IReactorTime, policy: ServerPolicy = ServerPolicy()
    ) -> None:
        self.state = state
        self.registry = registry
        self.clock = clock
        self.policy = policy

    def buildProtocol(self, addr: IAddress | None) -> TunnelConnection:
        return TunnelConnection(self, addr)


class RevocationWatch:
    """
    Cuts live sessions whose site was revoked or re-enrolled (by the
    C{rtunnel sites revoke} command or a new keyfile), within one poll
    interval. Polling a SQLite change counter every second costs nothing and
    needs no signal plumbing between the CLI and the server process.
    """

    _log = Logger()

    def __init__(self, state: ServerState, registry: SiteRegistry) -> None:
        self.state = state
        self.registry = registry
        self._last = state.store.changes_token()

    def check(self) -> None:
        """
        One poll. Never raises: a database error is logged and the next poll
        tries again (a LoopingCall stops for good on an exception).
        """
        try:
            token = self.state.store.changes_token()
            if token == self._last:
                return
            for site, fingerprint, _ in self.registry.live():
                try:
                    self.state.store.check_site(site, fingerprint)
                except SiteRejected as e:
                    self._log.warn("cutting site {site}: {code}: {reason}", site=site, code=e.code, reason=e.message)
                    self.registry.cut(site, ErrorCode.NOT_AUTHORIZED, f"{e.code}: {e.message}")
            self._last = token
        except Exception:
            self._log.failure("revocation check failed; retrying at the next poll")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
