"""
L{MuxProtocol}: runs a L{MuxSession} over any Twisted transport (TLS in
production) and presents its streams as L{MuxStream} transports.

The protocol only moves bytes and dispatches events; every protocol rule is
the core's. It is an L{IPushProducer} on its transport: when the transport's
buffer is full every stream's producer is paused, and on resume they are
resumed in a rotating order so that no stream is always served first.

It pauses reading from the tunnel in one case only: the peer does not read
(our transport paused us) *and* its own frames made us queue at least
C{FloodLimits.reply_pause} replies meanwhile (PING ACKs, OPEN_FAIL refusals,
RESETs answering a broken rule). Reading resumes when the transport resumes
us. Data never pauses reading: memory for it is bounded by the windows, and
one slow stream must not stall the others (see L{MuxProtocol} for why this
rule cannot deadlock two ends).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Protocol as TypingProtocol
from typing import cast

from attrs import define, field, frozen, validators
from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel.logs import Logger

from ..address import HostPort
from ..logsafe import LogBudget, printable
from ..mux import events as ev
from ..mux.errors import ErrorCode, SessionClosing, code_name
from ..mux.frames import Replicas
from ..mux.session import MuxSession
from ..mux.settings import FloodLimits, Settings, WindowTuning
from .address import describe
from .net import set_nodelay
from .stream import CLEAN_CLOSE, MuxStream, StreamReset
from .wheel import KeepaliveWheel

#: Called for each stream the peer opens; it must eventually call
#: C{stream.accept(protocol)} or C{stream.refuse(code, reason)}.
StreamHandler = Callable[[MuxStream], None]


class OpenOutcomes(TypingProtocol):
    """
    Where a L{MuxProtocol} counts how stream opens were answered
    (L{MuxProtocol.figures}; the figures of L{rtunnel.observe.stats} have
    it). Called once per answered open, never per byte.
    """

    def local_open(self, code: int, reason: str) -> None:
        """The peer answered an OPEN of ours: C{code} 0 for OPEN_OK, else why not (or why it ended unanswered)."""

    def remote_open(self, code: int, reason: str) -> None:
        """We answered the peer's OPEN: C{code} 0 for OPEN_OK, else the OPEN_FAIL code."""


def _exception_of(reason: Failure) -> BaseException:
    """The exception a Failure carries (always set for a connection's end)."""
    value = reason.value
    assert value is not None
    return value


class TunnelState(enum.Enum):
    """
    Where a tunnel connection is in its life (L{MuxProtocol.state}).

    Moves only forward, in this order, possibly skipping states::

        CONNECTING ──HELLO──▶ OPEN ──drain()──▶ DRAINING
            │                   │                   │ last stream ended,
            │                   │                   │ or grace over
            ▼                   ▼                   ▼
        ───────────────────── CLOSING ─────────────────── (transport asked to close)
                                   │
        (from any state)   connectionLost
                                   ▼
                                CLOSED

    CLOSING is entered by L{MuxProtocol.terminate}, L{MuxProtocol.abort},
    a drain that finished (or L{MuxProtocol.drain} before HELLO, with
    nothing to wait for), a broken rule or flood (our fatal GOAWAY), the
    peer's fatal GOAWAY, a keepalive timeout, a stalled peer, or the
    transport's C{stopProducing}. The peer's I{graceful} GOAWAY changes no
    state: it only stops new streams (L{MuxProtocol.accepting_streams}); the
    peer closes when its streams are done.
    """

    #: connected or not yet; the peer's HELLO has not arrived
    CONNECTING = "connecting"
    #: the session is up: streams flow and may be opened
    OPEN = "open"
    #: we sent GOAWAY (L{MuxProtocol.drain}): open streams finish, then we close
    DRAINING = "draining"
    #: we asked the transport to close (or will, at the end of this input batch)
    CLOSING = "closing"
    #: the connection is gone (C{connectionLost})
    CLOSED = "closed"


_CONNECTING = TunnelState.CONNECTING
_OPEN = TunnelState.OPEN
_DRAINING = TunnelState.DRAINING
_CLOSING = TunnelState.CLOSING
_CLOSED = TunnelState.CLOSED
#: when_services: the outcome is not known yet
_PENDING = object()


class SessionEnded(ConnectionError):
    """
    The session ended, or began to end, before it could be used: what
    L{MuxProtocol.when_ready} fails with when a GOAWAY (either end's) came
    before or with the peer's HELLO, or this end closed first.

    @ivar code: the GOAWAY's code (L{ErrorCode}), or the one this end ended
        the session with.
    @ivar reason: its reason, as received (not yet made printable).
    @ivar by_peer: C{True} if the peer sent it.
    """

    def __init__(self, code: int, reason: str, by_peer: bool) -> None:
        super().__init__(code, reason, by_peer)
        self.code = code
        self.reason = reason
        self.by_peer = by_peer

    def __str__(self) -> str:
        who = "the peer" if self.by_peer else "this end"
        return f"{who} ended the session: {code_name(self.code)}: {printable(self.reason)}"


@frozen
class Keepalive:
    """
    Liveness checking of an idle session.

    Every C{interval} seconds without anything received we send a PING; a
    peer from which nothing at all arrived for C{timeout} seconds is dead.
    The check is timed to the moment the timeout would expire, so a silently
    broken path is detected within C{timeout}. The timeout must allow at
    least one ping to be answered, hence C{timeout >= interval}.
    """

    interval: float = field(default=10.0, validator=validators.gt(0))
    timeout: float = field(default=30.0)

    @timeout.validator
    def _check_timeout(self, attribute: object, value: float) -> None:
        if not value >= self.interval:
            raise ValueError(f"keepalive timeout {value}s is shorter than the ping interval {self.interval}s")


@define
class _Edges:
    """
    A L{MuxProtocol}'s state used only at the session's edges: closing,
    floods, log lines the peer triggers. Kept in one attribute so that the
    protocol's own stay within the 30 for which CPython 3.11 shares instance
    dictionary keys: past that every attribute access, on the data path
    too, is slower.
    """

    close_timeout: float | None
    #: why this end is ending the session (code, reason), from the moment
    #: it began to (drain, terminate, a failed session, abort)
    close_cause: tuple[int, str] | None = None
    #: the transport was told to close (and we unregistered as its
    #: producer); until then a close decided during an input batch waits
    #: for the batch's end
    close_issued: bool = False
    #: the close decided must be an abort (no TLS close_notify)
    abort_wanted: bool = False
    close_call: IDelayedCall | None = None
    #: we paused our transport's reading: replies the peer does not read
    #: piled up (resumed with the transport), or it flooded us (for good)
    reading_paused: bool = False
    flooded: bool = False
    stall_call: IDelayedCall | None = None
    #: per-session budget for log lines the peer can trigger at will, made
    #: when the first such line comes (most sessions never log one)
    log_budget: LogBudget | None = None
    #: who hears of the peer's REPLICAS (L{MuxProtocol.add_replicas_observer})
    replicas_observers: list[Callable[[Replicas], object]] | None = None
    #: the REPLICAS of the current input batch, told at its end
    replicas_pending: list[Replicas] | None = None


@implementer(IPushProducer)
class MuxProtocol(Protocol):
    """
    One end of a multiplexed tunnel connection.

    Flood protection (docs/protocol.md, "Flood protection"): the session
    caps frames that do nothing useful over the clock's time and ends the
    session with GOAWAY ENHANCE_YOUR_CALM past a limit (logged as a warning
    naming the peer, the kind of frame and the rate). Replies elicited by
    the peer's frames that pile up while the peer reads nothing stop our
    reading:

     - Reading stops only while our transport has paused us (the peer is
       not reading what we send) and the peer's own frames made us queue
       C{flood_limits.reply_pause} replies since; it resumes as soon as the
       transport resumes us. After C{flood_limits.stall_timeout} seconds
       stopped, or past C{flood_limits.reply_limit} replies, the session
       ends (GOAWAY ENHANCE_YOUR_CALM, then the connection is aborted).
     - This cannot deadlock two ends running this protocol. Reading never
       stops merely because our writes are blocked (two ends doing that with
       full buffers would both wait forever); it stops only when the peer
       keeps asking for replies it does not read. A legitimate peer has at
       most a few reply-eliciting frames outstanding while it is not
       reading: it pings when idle (one per keepalive interval) and probes
       windows with one PING at a time, waiting for its answer; a site
       never opens streams. So a legitimate peer never makes us stop
       reading, and for both ends to stop, each would have to flood the
       other. Against a peer that does flood, the stop ends when it reads,
       or the session ends: never a hang.

    Lifecycle: one variable, L{state} (L{TunnelState}, which draws the
    transitions). Reading paused, the tunnel paused by its transport and a
    flood are flow control, not lifecycle, and are kept apart from it.
    Everything an input batch (one C{dataReceived}) brings is dispatched
    first; only then is the output written, a close decided meanwhile
    carried out, and the session's outcome told to L{when_ready} waiters.
    So a HELLO and a GOAWAY in one read never look like a usable session,
    not even for a moment.

    Streams see the connection only through
    L{rtunnel.adapter.stream.StreamConnection} (the methods under "called
    by MuxStream" below), and the connection drives them only through
    their public event methods.

    @param initiator: C{True} on the end that dialed (it uses odd stream ids).
    @param clock: for keepalive timers; injected so tests use L{Clock}.
    @param stream_handler: decides on streams the peer opens; without one,
        every such open is refused.
    @param keepalive: ping/timeout policy, or C{None} for none.
    @param flood_limits: what this end tolerates from a flooding peer;
        C{None} for those of its role (L{FloodLimits.for_role}: the tunnel
        server's on the acceptor, the site's on the initiator).
    @param close_timeout: seconds a polite close (TLS close_notify, then
        waiting for the peer's) may take before the connection is aborted:
        a peer that never answers must not keep the socket. C{None}: wait
        forever.
    @param keepalive_wheel: run the keepalive checks through this wheel,
        shared with other sessions (a server's), instead of a timer of the
        session's own; checks then run up to the wheel's resolution late.
    @param services: the named services this end announces when the peer
        offers the capability (L{MuxSession}); the peer's are
        L{when_services}.

    Replicas (docs/protocol.md, "REPLICAS"): the tunnel server's end sends
    its replica set with L{send_replicas} when both HELLOs offer the
    capability (L{replicas_negotiated}); the site's end keeps the last one
    received in L{peer_replicas} and tells the L{add_replicas_observer}
    callbacks of each.

    @ivar bytes_sent: stream payload bytes sent so far (what the window let
        out, framing not counted); C{bytes_received}: those received and
        handed to a stream. One integer add per DATA frame, so that the
        figures (L{rtunnel.observe.stats}) cost the data path nothing more.
    @ivar figures: told how each stream open was answered (L{OpenOutcomes}),
        if set.
    """

    _log = Logger()

    # In slots: with the two attributes Twisted's makeConnection adds
    # (connected, transport) an instance dictionary would hold more than the
    # 30 keys CPython 3.11 shares between instances, and cost 1.6 KiB per
    # session instead of a few hundred bytes (ten thousand sessions on one
    # server). Twisted's own attributes still go to the dictionary.
    __slots__ = (
        "session",
        "_edges",
        "clock",
        "stream_handler",
        "keepalive",
        "label",
        "paused",
        "streams",
        "_held",
        "last_rtt",
        "close_reason",
        "peer_goaway",
        "on_goaway",
        "_state",
        "_ready_waiters",
        "_closed_waiters",
        "_in_receive",
        "_last_received",
        "_ping_sent",
        "_keepalive_call",
        "_wheel",
        "_keepalive_slot",
        "_drain_call",
        "_rotation",
        "_refusal",
        "_services_waiters",
        "bytes_sent",
        "bytes_received",
        "figures",
    )

    def __init__(
        self,
        *,
        initiator: bool,
        clock: IReactorTime,
        settings: Settings | None = None,
        tuning: WindowTuning | None = None,
        stream_handler: StreamHandler | None = None,
        keepalive: Keepalive | None = None,
        label: str = "",
        flood_limits: FloodLimits | None = None,
        close_timeout: float | None = 5.0,
        keepalive_wheel: KeepaliveWheel | None = None,
        services: Mapping[str, HostPort] | None = None,
    ) -> None:
        if close_timeout is not None and not close_timeout > 0:
            raise ValueError(f"close_timeout must be positive or None, not {close_timeout!r}")
        self.session = MuxSession(
            initiator=initiator, settings=settings, tuning=tuning, flood_limits=flood_limits, services=services
        )
        self._edges = _Edges(close_timeout)
        self.clock = clock
        self.stream_handler = stream_handler
        self.keepalive = keepalive
        self.label = label
        self._state = _CONNECTING
        #: our transport paused us (flow control, not lifecycle)
        self.paused = False
        self.streams: dict[int, MuxStream] = {}
        #: streams that paused their producer because the tunnel was
        #: paused, to be told when it resumes (L{hold_stream})
        self._held: dict[int, MuxStream] | None = None
        self.last_rtt: float | None = None
        self.close_reason: Failure | None = None
        #: (code, reason) of the peer's GOAWAY, once one arrived
        self.peer_goaway: tuple[int, str] | None = None
        #: called with (code, reason) when the peer starts a graceful drain.
        self.on_goaway: Callable[[int, str], None] | None = None
        # (made when first needed: a server keeps ten thousand sessions,
        # most of which never use them)
        #: when_ready() Deferreds not yet settled (None: none waiting)
        self._ready_waiters: list[defer.Deferred[MuxProtocol]] | None = None
        #: what to call, and with what, once the connection is gone
        # (callback, *args) in one tuple: a server keeps two per session
        self._closed_waiters: list[tuple[Callable[..., object], *tuple[object, ...]]] = []
        #: an input batch is being dispatched: output, closes and outcomes wait for its end
        self._in_receive = False
        self._last_received = 0.0
        self._ping_sent: dict[bytes, float] | None = None
        self._keepalive_call: IDelayedCall | None = None
        #: keepalive checks through a wheel shared with other sessions, and
        #: the slot of ours in it
        self._wheel = keepalive_wheel
        self._keepalive_slot: int | None = None
        self._drain_call: IDelayedCall | None = None
        self._rotation = 0
        self._refusal: tuple[int, str] | None = None
        #: when_services() Deferreds not yet settled (None: none waiting)
        self._services_waiters: list[defer.Deferred[Mapping[str, HostPort] | None]] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.figures: OpenOutcomes | None = None

    # -- observers -----------------------------------------------------------

    def when_ready(self) -> defer.Deferred[MuxProtocol]:
        """
        A Deferred that fires exactly once: with this protocol once the
        session is open for use, or with the reason it will not be.

        While the peer's HELLO is awaited (L{TunnelState.CONNECTING}), the
        outcome is settled at one of two moments, never in the middle of
        an input batch and never inside a call of ours such as L{abort}:

         - At the end of the input batch (one C{dataReceived}: the
           session's C{receive_data} returned and every event it reported
           was dispatched) after which the state is no longer CONNECTING:
           success if the session is then L{TunnelState.OPEN} and no GOAWAY
           came from the peer; otherwise L{SessionEnded}, with the peer's
           GOAWAY if one came (a HELLO and a GOAWAY in one read never
           succeed), else with the code this end is ending the session
           with (a broken rule, a flood, L{terminate}, L{drain}).
         - In C{connectionLost}, if the connection ends before that: a
           failure with the connection's reason, once the state is
           L{TunnelState.CLOSED} and every stream has ended, and before the
           L{on_closed} observers and L{when_closed} are called. A close
           this end starts before HELLO (L{abort}, L{terminate}, L{drain})
           is settled this way too, or at the end of an input batch that
           comes before the connection is gone.

        Asked for during an input batch, it is settled at the batch's end;
        asked for while others wait, with them. Otherwise it has the
        outcome at once: this protocol while OPEN and no GOAWAY came from
        the peer, L{SessionEnded} once either end began ending the session,
        the connection's reason once it is gone.
        """
        d: defer.Deferred[MuxProtocol]
        if self._ready_waiters is not None or self._state is _CONNECTING or self._in_receive:
            d = defer.Deferred()
            if self._ready_waiters is None:
                self._ready_waiters = []
            self._ready_waiters.append(d)
            return d
        outcome = self._ready_outcome()
        return defer.succeed(self) if outcome is None else defer.fail(outcome)

    def _ready_outcome(self) -> Failure | None:
        """How L{when_ready} ends now that the state is past CONNECTING: C{None} for success."""
        state = self._state
        if state is _CLOSED:
            return self.close_reason or CLEAN_CLOSE
        goaway = self.peer_goaway
        if goaway is not None:
            return Failure(SessionEnded(goaway[0], goaway[1], by_peer=True))
        if state is _OPEN:
            return None
        code, reason = self._edges.close_cause or (ErrorCode.CANCEL, "closed by this end")
        return Failure(SessionEnded(code, reason, by_peer=False))

    def _settle_ready(self) -> None:
        """Tell every L{when_ready} waiter the outcome (see there for when this is called)."""
        waiters, self._ready_waiters = self._ready_waiters, None
        if not waiters:
            return
        outcome = self._ready_outcome()
        for d in waiters:
            if outcome is None:
                d.callback(self)
            else:
                d.errback(outcome)

    def when_services(self) -> defer.Deferred[Mapping[str, HostPort] | None]:
        """
        A Deferred that fires exactly once, never failing: with the named
        services the peer announced, or with C{None} once it is clear none
        will come (a HELLO without the capability, on either side, or the
        connection ended before the SERVICES frame). Settled at the end of
        an input batch, as L{when_ready}, or in C{connectionLost}.
        """
        outcome = self._services_outcome()
        if outcome is not _PENDING and not self._in_receive:
            return defer.succeed(cast("Mapping[str, HostPort] | None", outcome))
        d: defer.Deferred[Mapping[str, HostPort] | None] = defer.Deferred()
        if self._services_waiters is None:
            self._services_waiters = []
        self._services_waiters.append(d)
        return d

    def _services_outcome(self) -> Mapping[str, HostPort] | None | object:
        session = self.session
        if session.peer_services is not None:
            return session.peer_services
        if self._state is _CLOSED:
            return None
        if self._state is _CONNECTING or session.services_pending:
            return _PENDING
        return None

    def _settle_services(self) -> None:
        outcome = self._services_outcome()
        if outcome is _PENDING:
            return
        waiters, self._services_waiters = self._services_waiters, None
        for d in waiters or ():
            d.callback(cast("Mapping[str, HostPort] | None", outcome))

    def when_closed(self) -> defer.Deferred[BaseException]:
        """
        Fires once the tunnel connection is gone (in C{connectionLost},
        after the L{when_ready} waiters), with the reason's exception (a
        Deferred cannot carry a Failure as a success).
        """
        if self._state is _CLOSED:
            return defer.succeed(_exception_of(self.close_reason or CLEAN_CLOSE))
        d: defer.Deferred[BaseException] = defer.Deferred()
        self._closed_waiters.append((d.callback,))
        return d

    def on_closed(self, callback: Callable[..., object], *args: object) -> None:
        """
        Call C{callback(exception, *args)} once the tunnel connection is
        gone (at once if it is gone already), with the reason's exception.

        For observers that live as long as the session: a Deferred from
        L{when_closed} with a callback costs about 700 bytes, and a server
        keeps a few per session. An exception the callback raises is
        logged; the other observers are still called.
        """
        if self._state is _CLOSED:
            self._call_closed(callback, args, _exception_of(self.close_reason or CLEAN_CLOSE))
        else:
            self._closed_waiters.append((callback, *args))

    def _call_closed(self, callback: Callable[..., object], args: tuple[object, ...], reason: BaseException) -> None:
        try:
            callback(reason, *args)
        except Exception:
            self._log.failure("while telling an observer that the session with {peer} ended", peer=self.who)

    @property
    def peer_label(self) -> str:
        """
        The peer's address as log lines show it (empty before the
        connection is made). Worked out when asked, not kept: it is asked
        for in log lines only, and a server holds ten thousand sessions.
        """
        return self._address_label("getPeer")

    @property
    def host_label(self) -> str:
        """Our own address, as L{peer_label}."""
        return self._address_label("getHost")

    def _address_label(self, getter: str) -> str:
        transport = self.transport
        if transport is None:
            return ""
        try:
            return describe(getattr(transport, getter)())
        except Exception:
            return ""

    @property
    def who(self) -> str:
        """The peer for log lines: its label (the site name) and address."""
        return f"{self.label} ({self.peer_label})" if self.label else self.peer_label

    @property
    def close_timeout(self) -> float | None:
        """Seconds a polite close may take before it is aborted (C{None}: no limit)."""
        return self._edges.close_timeout

    @property
    def reading_paused(self) -> bool:
        """We stopped reading from the peer (unread replies, or a flood)."""
        return self._edges.reading_paused

    @property
    def state(self) -> TunnelState:
        """Where the connection is in its life."""
        return self._state

    @property
    def ready(self) -> bool:
        """
        The peer's HELLO arrived, the session has not failed and the
        connection is not gone (also while draining or closing politely).
        """
        return self.session.ready and self._state is not _CLOSED

    @property
    def accepting_streams(self) -> bool:
        """New streams may be opened now: OPEN, and no GOAWAY either way."""
        return self._state is _OPEN and self.session.accepting_streams

    @property
    def replicas_negotiated(self) -> bool:
        """
        Both HELLOs offered the REPLICAS capability: the tunnel server's
        end may L{send_replicas}, and the site's end may receive them.
        C{False} before the peer's HELLO, and always with a peer (or a
        local L{Settings}) without it: such a site keeps one session.
        """
        return self.session.replicas_negotiated

    @property
    def peer_replicas(self) -> Replicas | None:
        """The replica set the peer announced last (C{None}: none yet, or never)."""
        return self.session.peer_replicas

    def add_replicas_observer(self, callback: Callable[[Replicas], object]) -> None:
        """
        Call C{callback(replicas)} for every REPLICAS the peer sends from
        now on, on the reactor, at the end of the input batch it came in
        (as L{when_ready} and L{when_services} are settled: every frame of
        the batch was processed and its output written, so a REPLICAS that
        came with a HELLO is told after the HELLO's L{when_ready} waiters,
        and an observer those waiters add still hears of it). A frame that
        came after the session began closing in the same batch is not
        processed, so not told. A REPLICAS that arrived before the call is
        not told again: L{peer_replicas} has the last one.

        An exception the callback raises is logged; the session and the
        other observers go on.
        """
        edges = self._edges
        if edges.replicas_observers is None:
            edges.replicas_observers = []
        edges.replicas_observers.append(callback)

    def send_replicas(self, replicas: Replicas) -> None:
        """
        Send the peer (a site) this replica's id and the replica set,
        replacing what it was told before. Once the session is closing or
        gone this does nothing: the set is the connection's last concern,
        and a server that tells all its sessions need not ask first.

        @raise rtunnel.mux.MuxUsageError: the capability is not negotiated
            (L{replicas_negotiated}; also before the peer's HELLO), or this
            is the initiator's end.
        """
        state = self._state
        if state is _CLOSING or state is _CLOSED or self.session.failed:
            return
        self.session.send_replicas(replicas)
        self._flush()

    # -- Protocol ------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        # Small frames (PING, OPEN, interactive bytes) must not wait for Nagle.
        set_nodelay(transport)
        cast(IConsumer, transport).registerProducer(self, True)
        self._last_received = self.clock.seconds()
        self.session.start()
        if self._refusal is not None:
            # HELLO and the fatal GOAWAY leave in one write: the peer sees
            # the refusal in the same read as the HELLO, never a session
            # that looks established for a moment.
            self.terminate(*self._refusal)
            return
        self._flush()
        self._schedule_keepalive()

    def refuse_session(self, code: int, reason: str) -> None:
        """
        Before the connection is made: answer the peer's arrival with HELLO
        and a fatal GOAWAY C{code}, then close.
        """
        if self.transport is not None:
            raise RuntimeError("refuse_session() is for a protocol not yet connected; use terminate()")
        self._refusal = (code, reason)

    def dataReceived(self, data: bytes) -> None:
        """
        One input batch: dispatch every event the session reports for
        C{data}, then write the output, carry out a close decided meanwhile
        and settle L{when_ready}, in that order.
        """
        now = self._last_received = self.clock.seconds()
        closing = _CLOSING
        self._in_receive = True
        try:
            for event in self.session.receive_data(data, now):
                if self._state is closing:
                    break  # ended meanwhile: act on nothing more of this input
                self._dispatch(event)
        finally:
            self._in_receive = False
        self._flush()
        state = self._state
        if state is _CLOSING:
            # Closed during this input: now that its frames are written.
            if not self._edges.close_issued:
                self._close_transport()
        else:
            if self.paused and self.session.reading_should_pause:
                self._pause_reading_for_replies()
            if state is _DRAINING:
                self._maybe_finish_drain()
        if self._ready_waiters is not None and self._state is not _CONNECTING:
            self._settle_ready()
        if self._services_waiters is not None:
            self._settle_services()
        if self._edges.replicas_pending is not None:
            self._tell_replicas()

    def _tell_replicas(self) -> None:
        """Tell the replicas observers of each REPLICAS of the input batch that just ended, in order."""
        edges = self._edges
        pending, edges.replicas_pending = edges.replicas_pending, None
        for replicas in pending or ():
            for callback in list(edges.replicas_observers or ()):
                try:
                    callback(replicas)
                except Exception:
                    self._log.failure(
                        "while telling an observer of the session with {peer} its replica set", peer=self.who
                    )

    def connectionLost(self, reason: Failure = CLEAN_CLOSE) -> None:
        """
        The connection is gone: the state becomes CLOSED, timers stop,
        every stream ends with a reset; then L{when_ready} waiters fail
        (if the session never settled), then the L{on_closed} observers
        and L{when_closed} Deferreds are called, in the order registered.
        """
        if self._state is _CLOSED:
            return
        self._state = _CLOSED
        self.close_reason = reason
        self._cancel_timers()
        why = reason.getErrorMessage()
        self._count_unanswered(ErrorCode.CONNECTION_RESET, f"tunnel lost: {why}")
        for stream in list(self.streams.values()):
            stream.closed(Failure(StreamReset(ErrorCode.CONNECTION_RESET, f"tunnel lost: {why}")))
        self.streams.clear()
        self._held = None
        self._settle_ready()
        if self._services_waiters is not None:
            self._settle_services()
        waiters, self._closed_waiters = self._closed_waiters, []
        for callback, *args in waiters:
            self._call_closed(callback, tuple(args), _exception_of(reason))

    # -- IPushProducer: our transport's buffer filled or drained ------------

    def pauseProducing(self) -> None:
        # Lazily: a stream's producer is paused when it next writes (each can
        # add at most one more read to the transport's buffer). Pausing every
        # stream here would cost two epoll changes per stream per cycle, and
        # with a thousand mostly idle streams that is most of the work.
        self.paused = True
        # The peer is not reading: replies it elicits from now on are unread.
        self.session.set_peer_reading(False)

    def resumeProducing(self) -> None:
        self.paused = False
        self.session.set_peer_reading(True)
        if self._edges.reading_paused:
            self._resume_reading()
        if not self._held:
            return
        held = list(self._held.values())
        self._held = None
        # Rotate the starting point so the first streams do not always win.
        self._rotation = (self._rotation + 1) % len(held)
        order = held[self._rotation :] + held[: self._rotation]
        for index, stream in enumerate(order):
            if self.paused:
                # Paused again meanwhile: the rest stay held (they still
                # know they are) for next time.
                for rest in order[index:]:
                    self.hold_stream(rest)
                break
            stream.tunnel_resumed()

    def stopProducing(self) -> None:
        self._begin_close((ErrorCode.CANCEL, "the transport stopped"))

    # -- commands ------------------------------------------------------------

    def open_stream(self, host: str, port: int) -> MuxStream:
        """
        Open a stream to C{host}:C{port} at the peer. Bytes may be written to
        it at once (they travel as early data); C{stream.opened} fires on
        OPEN_OK.

        @raise rtunnel.mux.SessionClosing: the session is going away, or
            the connection is closing or gone.
        @raise rtunnel.mux.StreamLimitReached: the peer's stream limit is reached.
        """
        if self._state is _CLOSING or self._state is _CLOSED:
            # The session cannot know; without this the stream would never open nor fail.
            raise SessionClosing("the tunnel connection is closing or gone; no new streams")
        stream_id = self.session.open_stream(host, port)
        stream = MuxStream(self, stream_id, host, port, local=True)
        self.streams[stream_id] = stream
        self._flush()
        return stream

    def ping(self) -> None:
        """Send a PING; its answer updates L{last_rtt}."""
        if not self.session.ready or self._state is _CLOSED:
            return
        opaque = self.session.ping()
        sent = self._ping_sent
        if sent is None:
            sent = self._ping_sent = {}
        sent[opaque] = self.clock.seconds()
        if len(sent) > 16:  # unanswered pings: keep the map bounded
            sent.pop(next(iter(sent)))
        self._flush()

    def drain(self, grace: float, reason: str = "shutting down") -> defer.Deferred[BaseException]:
        """
        Graceful shutdown: GOAWAY, no new streams, let open streams finish
        for up to C{grace} seconds (L{TunnelState.DRAINING}), then close.
        With no stream open (or before the peer's HELLO) it closes at once.
        Fires when the connection is gone; called again, or once closing,
        it only returns that.
        """
        done = self.when_closed()
        state = self._state
        if state is not _CONNECTING and state is not _OPEN:
            return done
        self.session.go_away(ErrorCode.GOING_AWAY, reason)
        self._edges.close_cause = (ErrorCode.GOING_AWAY, reason)
        self._flush()
        if not self.streams:
            # A session with nothing open needs no timer, which a server
            # draining ten thousand idle sessions would only schedule and
            # cancel. (During an input batch the close waits for its end.)
            self._begin_close((ErrorCode.GOING_AWAY, reason))
            return done
        self._state = _DRAINING
        self._drain_call = self.clock.callLater(grace, self._drain_expired)
        return done

    def abort(self) -> None:
        """Drop the connection at once (no TLS close): the path is dead."""
        self._begin_close((ErrorCode.CANCEL, "connection aborted by this end"), abort=True)

    def terminate(self, code: int, reason: str) -> None:
        """
        End the session now: fatal GOAWAY, every stream reset, connection closed.
        """
        if self._state is _CLOSED:
            return
        # Closing from here on: a stream ending below must not finish a
        # drain as if it were the last one.
        self._enter_closing((code, reason))
        # RESET each stream first: after a fatal GOAWAY the peer reads nothing
        # more, and a graceful code (drain expiry) sends no second GOAWAY, so
        # without these the peer's streams would only see "tunnel lost".
        for stream_id in list(self.streams):
            self.session.reset_stream(stream_id, code, reason)
        self.session.go_away(code, reason)
        self._flush()
        self._count_unanswered(code, reason)
        for stream in list(self.streams.values()):
            stream.closed(Failure(StreamReset(code, reason)))
        self._close_transport()

    # -- called by MuxStream: the StreamConnection interface ------------------

    def _flush(self) -> None:
        if self._in_receive or self.transport is None:
            return
        out = self.session.data_to_send()
        if out and self._state is not _CLOSED:
            self.transport.write(out)

    def send_window(self, stream_id: int) -> int:
        """How many bytes stream C{stream_id} may send now. For L{MuxStream}."""
        return self.session.send_window(stream_id)

    def send_data(self, stream_id: int, data: bytes) -> int:
        """
        Send what the window allows of C{data} on stream C{stream_id};
        return how many bytes that was. For L{MuxStream}, which keeps the rest.
        """
        session = self.session
        size = len(data)
        window = session.send_window(stream_id)
        if size <= window:
            session.send_data(stream_id, data)
        elif window > 0:
            # A view: the part that fits is sent without a copy.
            session.send_data(stream_id, memoryview(data)[:window])  # type: ignore[arg-type]
            size = window
        else:
            return 0
        self.bytes_sent += size
        self._flush()
        return size

    def end_stream(self, stream_id: int) -> bool:
        """Send FIN on stream C{stream_id}; C{True} if that closed it. For L{MuxStream}."""
        closed = self.session.stream_state(stream_id) is not None and self.session.end_stream(stream_id)
        self._flush()
        return closed

    def consumed(self, stream_id: int, size: int) -> None:
        """C{size} bytes of stream C{stream_id} reached its consumer. For L{MuxStream}."""
        self.session.consumed(stream_id, size)
        self._flush()

    def accept_stream(self, stream_id: int) -> None:
        """Answer the peer's OPEN of C{stream_id} with OPEN_OK. For L{MuxStream}."""
        self.session.accept_stream(stream_id)
        if self.figures is not None:
            self.figures.remote_open(0, "")
        self._flush()

    def refuse_stream(self, stream_id: int, code: int, reason: str) -> None:
        """
        Answer the peer's OPEN of C{stream_id} with OPEN_FAIL and log it
        (rate-limited: the peer decides how often). For L{MuxStream}, which
        ends itself with the refusal after this returns; the stream leaves
        the table first, so that a refusal past the peer's allowance of
        refused OPENs, which ends the session here, does not end it with
        the session's reason instead.
        """
        stream = self.streams.pop(stream_id, None)
        if self.figures is not None:
            self.figures.remote_open(code, reason)
        suppressed = self._log_allowance("refused")
        if suppressed is not None:
            self._log.debug(
                "refused stream {streamID} to {target} from {peer}: {code}: {reason}"
                + (" ({suppressed} similar suppressed)" if suppressed else ""),
                streamID=stream_id,
                target=f"{stream.host}:{stream.port}" if stream is not None else "?",
                peer=self.who,
                code=code_name(code),
                reason=printable(reason),
                suppressed=suppressed,
            )
        failure: list[ev.Event] = []
        if self.session.stream_state(stream_id) is not None:
            failure = self.session.refuse_stream(stream_id, code, reason)
        self._flush()
        for event in failure:
            self._dispatch(event)

    def reset_stream(self, stream_id: int, code: int, reason: str) -> None:
        """Send RESET on stream C{stream_id} if the session still has it. For L{MuxStream}."""
        self.session.reset_stream(stream_id, code, reason)
        self._flush()

    def hold_stream(self, stream: MuxStream) -> None:
        """
        C{stream} paused its producer because the tunnel is paused: tell it
        when the tunnel resumes. For L{MuxStream}.
        """
        held = self._held
        if held is None:
            held = self._held = {}
        held[stream.stream_id] = stream

    def forget_stream(self, stream_id: int) -> None:
        """Stream C{stream_id} has ended. For L{MuxStream}."""
        self.streams.pop(stream_id, None)
        if self._held:
            self._held.pop(stream_id, None)
        if self._state is _DRAINING:
            self._maybe_finish_drain()

    def _log_allowance(self, key: str) -> int | None:
        """
        For a log line the peer can trigger at will: C{None} if it must be
        left out now (L{LogBudget}: 5 at once, then one a second, per
        session and C{key}); otherwise how many like it were left out
        since the last one logged.
        """
        edges = self._edges
        if edges.log_budget is None:
            edges.log_budget = LogBudget(rate=1.0, burst=5.0, max_keys=16)
        allowed, suppressed = edges.log_budget.allow(key, self.clock.seconds())
        return suppressed if allowed else None

    # -- events ------------------------------------------------------------

    def _dispatch(self, event: ev.Event) -> None:
        if isinstance(event, ev.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self.bytes_received += len(event.data)
                stream.data_received(event.data)
        elif isinstance(event, ev.SendWindowAvailable):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.window_opened()
        elif isinstance(event, ev.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.input_ended()
        elif isinstance(event, ev.StreamClosed):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.closed(CLEAN_CLOSE)
        elif isinstance(event, ev.StreamRequested):
            self._on_stream_requested(event)
        elif isinstance(event, ev.StreamAccepted):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                if self.figures is not None and not stream.accepted:
                    self.figures.local_open(0, "")
                stream.open_accepted()
        elif isinstance(event, (ev.StreamRefused, ev.StreamReset)):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                if self.figures is not None and stream.local and not stream.accepted:
                    self.figures.local_open(event.code, event.reason)
                stream.closed(Failure(StreamReset(event.code, event.reason)))
        elif isinstance(event, ev.PongReceived):
            pings = self._ping_sent
            sent = pings.pop(event.opaque, None) if pings else None
            if sent is not None:
                self.last_rtt = self.clock.seconds() - sent
                if not pings:
                    # An emptied dictionary keeps its table: a server that
                    # pings ten thousand sessions would keep one each.
                    self._ping_sent = None
        elif isinstance(event, ev.ReplicasAnnounced):
            # Told at the end of this input batch (add_replicas_observer).
            edges = self._edges
            if edges.replicas_pending is None:
                edges.replicas_pending = []
            edges.replicas_pending.append(event.replicas)
        elif isinstance(event, ev.SessionReady):
            # The waiters of when_ready hear of it at the end of this input
            # batch, once a GOAWAY that came with the HELLO was handled too.
            if self._state is _CONNECTING:
                self._state = _OPEN
        elif isinstance(event, ev.GoAwayReceived):
            self._on_goaway(event)
        elif isinstance(event, ev.FloodDetected):
            self._on_flood(event)
        elif isinstance(event, ev.SessionFailed):
            if not self._edges.flooded:  # a flood was logged as such just before
                self._log.error(
                    "tunnel session with {peer} failed: {code}: {reason}",
                    peer=self.who,
                    code=code_name(event.code),
                    reason=event.reason,
                )
            self._enter_closing((event.code, event.reason))
            self._end_all_streams(event.code, event.reason)
            self._close_transport()

    def _on_stream_requested(self, event: ev.StreamRequested) -> None:
        stream = MuxStream(self, event.stream_id, event.host, event.port, local=False)
        self.streams[event.stream_id] = stream
        if self.stream_handler is None:
            stream.refuse(ErrorCode.TARGET_NOT_ALLOWED, "this end accepts no streams")
            return
        try:
            self.stream_handler(stream)
        except Exception:
            suppressed = self._log_allowance("handler")
            if suppressed is not None:
                self._log.failure(
                    "stream handler failed for stream {streamID} from {peer}"
                    + (" ({suppressed} similar suppressed)" if suppressed else ""),
                    streamID=event.stream_id,
                    peer=self.who,
                    suppressed=suppressed,
                )
            if not stream.disconnected and stream.protocol is None:
                stream.refuse(ErrorCode.INTERNAL_ERROR, "internal error")

    def _on_goaway(self, event: ev.GoAwayReceived) -> None:
        self.peer_goaway = (event.code, event.reason)
        if event.fatal:
            self._log.warn(
                "tunnel peer {peer} ended the session: {code}: {reason}",
                peer=self.who,
                code=code_name(event.code),
                reason=event.reason,
            )
            self._enter_closing((event.code, event.reason))
            self._end_all_streams(event.code, event.reason)
            self._close_transport()
            return
        self._log.info(
            "tunnel peer {peer} is draining: {reason}", peer=self.who, reason=event.reason or code_name(event.code)
        )
        if self.on_goaway is not None:
            self.on_goaway(event.code, event.reason)

    def _on_flood(self, event: ev.FloodDetected) -> None:
        """
        The peer went past a flood limit; the session ends with the
        SessionFailed that follows. Read nothing more from it: its input
        would only be discarded, and reading it costs the other sessions.
        """
        self._edges.flooded = True
        if event.seconds is None:
            self._log.warn(
                "tunnel peer {peer} reads nothing: {detail} queued for it (limit {limit});"
                " ending the session with ENHANCE_YOUR_CALM",
                peer=self.who,
                what=event.what,
                count=event.count,
                detail=event.detail,
                limit=event.limit,
            )
        else:
            # All of them in one read (no time passed): no rate to speak of.
            self._log.warn(
                "tunnel peer {peer} flooded the session with {what} frames: {count} "
                + ("in {seconds:.3f}s ({rate:.0f}/s; " if event.rate is not None else "in one read (")
                + "allowed {limit}); ending it with ENHANCE_YOUR_CALM",
                peer=self.who,
                what=event.what,
                count=event.count,
                seconds=event.seconds,
                rate=event.rate,
                limit=event.limit,
            )
        self._pause_reading()

    def _pause_reading(self) -> None:
        transport = self.transport
        if self._edges.reading_paused or transport is None or self._state is _CLOSED:
            return
        self._edges.reading_paused = True
        cast(IPushProducer, transport).pauseProducing()

    def _resume_reading(self) -> None:
        edges = self._edges
        if edges.stall_call is not None and edges.stall_call.active():
            edges.stall_call.cancel()
        edges.stall_call = None
        transport = self.transport
        if not edges.reading_paused or edges.flooded or transport is None or self._state is _CLOSED:
            return
        edges.reading_paused = False
        cast(IPushProducer, transport).resumeProducing()

    def _pause_reading_for_replies(self) -> None:
        """
        The peer reads nothing and keeps asking for replies: stop reading
        until our transport resumes us (the peer read), for at most
        C{stall_timeout} seconds.
        """
        if self._edges.reading_paused:
            return
        suppressed = self._log_allowance("paused")
        if suppressed is not None:
            self._log.info(
                "tunnel peer {peer} reads nothing and {count} control replies wait for it: pausing reading from it"
                + (" ({suppressed} similar suppressed)" if suppressed else ""),
                peer=self.who,
                count=self.session.reply_debt,
                suppressed=suppressed,
            )
        self._pause_reading()
        self._edges.stall_call = self.clock.callLater(self.session.flood_limits.stall_timeout, self._stalled)

    def _stalled(self) -> None:
        self._edges.stall_call = None
        if self._state is _CLOSED or not self._edges.reading_paused:
            return
        timeout = self.session.flood_limits.stall_timeout
        count = self.session.reply_debt
        self._edges.flooded = True
        self._log.warn(
            "tunnel peer {peer} read nothing for {timeout}s while {count} control replies waited for it;"
            " ending the session with ENHANCE_YOUR_CALM",
            peer=self.who,
            timeout=timeout,
            count=count,
        )
        self.terminate(
            ErrorCode.ENHANCE_YOUR_CALM,
            f"too many unanswered control replies: {count} queued while the peer read nothing for {timeout:g}s",
        )
        # It reads nothing: a polite close would wait for nothing.
        self._close_transport(abort=True)

    def _end_all_streams(self, code: int, reason: str) -> None:
        self._count_unanswered(code, reason)
        for stream in list(self.streams.values()):
            stream.closed(Failure(StreamReset(code, reason)))

    def _count_unanswered(self, code: int, reason: str) -> None:
        """Our opens the peer never answered end with the session: an outcome for L{figures}."""
        figures = self.figures
        if figures is None:
            return
        for stream in self.streams.values():
            if stream.local and not stream.accepted and not stream.disconnected:
                figures.local_open(code, reason)

    # -- timers --------------------------------------------------------------

    def _schedule_keepalive(self) -> None:
        if self.keepalive is None or self._state is _CLOSED:
            return
        self._keepalive_after(self.keepalive.interval)

    def _keepalive_after(self, delay: float) -> None:
        if self._wheel is not None:
            self._keepalive_slot = self._wheel.schedule(self, delay)
        else:
            self._keepalive_call = self.clock.callLater(delay, self._keepalive_tick)

    def _keepalive_due(self, slot: int) -> None:
        """The wheel's call: our check, unless it was cancelled meanwhile."""
        if slot != self._keepalive_slot or self._state is _CLOSED:
            return
        self._keepalive_slot = None
        self._keepalive_tick()

    def _keepalive_tick(self) -> None:
        self._keepalive_call = None
        assert self.keepalive is not None
        if self._edges.reading_paused:
            # We stopped reading (a peer that reads nothing; see
            # _pause_reading_for_replies): its silence is ours, and the
            # stall timeout decides.
            self._keepalive_after(self.keepalive.interval)
            return
        idle = self.clock.seconds() - self._last_received
        if idle >= self.keepalive.timeout:
            self._log.warn(
                "tunnel peer {peer} silent for {idle:.1f}s (timeout {timeout}s): declaring it dead",
                peer=self.who,
                idle=idle,
                timeout=self.keepalive.timeout,
            )
            self.terminate(ErrorCode.KEEPALIVE_TIMEOUT, f"nothing received for {idle:.1f}s")
            # The path is dead: a TLS close would wait for an answer forever.
            self._close_transport(abort=True)
            return
        if idle >= self.keepalive.interval - 1e-9:
            self.ping()
        # Check again when the timeout would expire, or at the next interval.
        self._keepalive_after(min(self.keepalive.interval, max(self.keepalive.timeout - idle, 0.001)))

    def _drain_expired(self) -> None:
        self._drain_call = None
        if self.streams:
            self._log.warn(
                "drain grace over: resetting {count} streams to {peer}", count=len(self.streams), peer=self.who
            )
        self.terminate(ErrorCode.GOING_AWAY, "drain grace period over")

    def _maybe_finish_drain(self) -> None:
        """Close a draining connection once its last stream has ended."""
        if self._in_receive:
            return  # dataReceived calls again once this input's output is written
        if self._state is _DRAINING and not self.streams and self.transport is not None:
            self._flush()
            self._begin_close(self._edges.close_cause or (ErrorCode.GOING_AWAY, "drained"))

    def _enter_closing(self, cause: tuple[int, str]) -> None:
        """
        Decide to close, once: the state becomes CLOSING and C{cause} (the
        code and reason this end ends the session with) is kept for
        L{when_ready}. The transport is closed by L{_close_transport}.
        """
        state = self._state
        if state is _CLOSING or state is _CLOSED:
            return
        self._state = _CLOSING
        self._edges.close_cause = cause

    def _begin_close(self, cause: tuple[int, str], abort: bool = False) -> None:
        self._enter_closing(cause)
        self._close_transport(abort)

    def _close_transport(self, abort: bool = False) -> None:
        """
        Carry out the close decided (L{_enter_closing}): at once, or, during
        an input batch, at its end, once the output it produced is written.
        An abort asked for after a polite close replaces it.

        We unregister as the transport's producer first: a TLS transport
        does not start its shutdown while a producer is registered, and
        would otherwise wait forever. A polite close (TLS sends
        close_notify and waits for the peer's) is aborted if the connection
        is not gone within C{close_timeout} seconds.
        """
        transport = self.transport
        if transport is None or self._state is _CLOSED:
            return
        edges = self._edges
        if abort:
            edges.abort_wanted = True
        if self._in_receive:
            return  # dataReceived calls again after writing this input's output
        if not edges.close_issued:
            edges.close_issued = True
            cast(IConsumer, transport).unregisterProducer()
        elif not abort:
            return  # closing already
        if edges.abort_wanted:
            abort_connection = getattr(transport, "abortConnection", None)
            if abort_connection is not None:
                abort_connection()
                return
        transport.loseConnection()
        if edges.close_timeout is not None and edges.close_call is None:
            edges.close_call = self.clock.callLater(edges.close_timeout, self._close_expired)

    def _close_expired(self) -> None:
        self._edges.close_call = None
        transport = self.transport
        if self._state is _CLOSED or transport is None:
            return
        self._log.info(
            "tunnel peer {peer} did not finish closing within {timeout}s: aborting the connection",
            peer=self.who,
            timeout=self.close_timeout,
        )
        abort_connection = getattr(transport, "abortConnection", None)
        if abort_connection is not None:
            abort_connection()

    def _cancel_timers(self) -> None:
        if self._wheel is not None and self._keepalive_slot is not None:
            self._wheel.cancel(self, self._keepalive_slot)
            self._keepalive_slot = None
        for name in ("_keepalive_call", "_drain_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        edges = self._edges
        for call in (edges.close_call, edges.stall_call):
            if call is not None and call.active():
                call.cancel()
        edges.close_call = edges.stall_call = None


__all__ = ["Keepalive", "MuxProtocol", "OpenOutcomes", "SessionEnded", "StreamHandler", "TunnelState"]
