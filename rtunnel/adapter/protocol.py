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

from collections.abc import Callable
from typing import cast

from attrs import define, field, frozen, validators
from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel.logs import Logger

from ..logsafe import LogBudget, printable
from ..mux import events as ev
from ..mux.errors import ErrorCode, SessionClosing, code_name
from ..mux.session import MuxSession
from ..mux.settings import FloodLimits, Settings, WindowTuning
from .address import describe
from .stream import CLEAN_CLOSE, MuxStream, StreamReset
from .wheel import KeepaliveWheel

#: Called for each stream the peer opens; it must eventually call
#: C{stream.accept(protocol)} or C{stream.refuse(code, reason)}.
StreamHandler = Callable[[MuxStream], None]


def _exception_of(reason: Failure) -> BaseException:
    """The exception a Failure carries (always set for a connection's end)."""
    value = reason.value
    assert value is not None
    return value


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
    #: unregistered as the transport's producer (closing)
    unregistered: bool = False
    close_call: IDelayedCall | None = None
    #: we paused our transport's reading: replies the peer does not read
    #: piled up (resumed with the transport), or it flooded us (for good)
    reading_paused: bool = False
    flooded: bool = False
    stall_call: IDelayedCall | None = None
    #: per-session budget for log lines the peer can trigger at will, made
    #: when the first such line comes (most sessions never log one)
    log_budget: LogBudget | None = None


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
        "_ready_waiters",
        "_closed_waiters",
        "_in_receive",
        "_last_received",
        "_ping_sent",
        "_keepalive_call",
        "_wheel",
        "_keepalive_slot",
        "_drain_call",
        "_draining",
        "_rotation",
        "_lost",
        "_refusal",
        "_closing",
        "_close_wanted",
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
    ) -> None:
        if close_timeout is not None and not close_timeout > 0:
            raise ValueError(f"close_timeout must be positive or None, not {close_timeout!r}")
        self.session = MuxSession(initiator=initiator, settings=settings, tuning=tuning, flood_limits=flood_limits)
        self._edges = _Edges(close_timeout)
        self.clock = clock
        self.stream_handler = stream_handler
        self.keepalive = keepalive
        self.label = label
        self.paused = False
        self.streams: dict[int, MuxStream] = {}
        #: streams whose producer was paused because the tunnel was
        self._held: dict[int, MuxStream] | None = None
        self.last_rtt: float | None = None
        self.close_reason: Failure | None = None
        #: (code, reason) of the peer's GOAWAY, once one arrived
        self.peer_goaway: tuple[int, str] | None = None
        #: called with (code, reason) when the peer starts a graceful drain.
        self.on_goaway: Callable[[int, str], None] | None = None
        # (made when first needed: a server keeps ten thousand sessions,
        # most of which never use them)
        self._ready_waiters: list[defer.Deferred[MuxProtocol]] | None = None
        #: what to call, and with what, once the connection is gone
        # (callback, *args) in one tuple: a server keeps two per session
        self._closed_waiters: list[tuple[Callable[..., object], *tuple[object, ...]]] = []
        self._in_receive = False
        self._last_received = 0.0
        self._ping_sent: dict[bytes, float] | None = None
        self._keepalive_call: IDelayedCall | None = None
        #: keepalive checks through a wheel shared with other sessions, and
        #: the slot of ours in it
        self._wheel = keepalive_wheel
        self._keepalive_slot: int | None = None
        self._drain_call: IDelayedCall | None = None
        self._draining = False
        self._rotation = 0
        self._lost = False
        self._refusal: tuple[int, str] | None = None
        self._closing = False
        self._close_wanted: bool | None = None  # close (True: abort) once the current input is handled

    # -- observers -----------------------------------------------------------

    def when_ready(self) -> defer.Deferred[MuxProtocol]:
        """Fires with this protocol once the peer's HELLO arrived."""
        if self.session.ready:
            return defer.succeed(self)
        if self._lost:
            return defer.fail(self.close_reason or CLEAN_CLOSE)
        d: defer.Deferred[MuxProtocol] = defer.Deferred()
        if self._ready_waiters is None:
            self._ready_waiters = []
        self._ready_waiters.append(d)
        return d

    def when_closed(self) -> defer.Deferred[BaseException]:
        """
        Fires once the tunnel connection is gone, with the reason's
        exception (a Deferred cannot carry a Failure as a success).
        """
        if self._lost:
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
        if self._lost:
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
    def ready(self) -> bool:
        return self.session.ready and not self._lost

    @property
    def accepting_streams(self) -> bool:
        return self.session.accepting_streams and not self._lost

    # -- Protocol ------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        # Small frames (PING, OPEN, interactive bytes) must not wait for Nagle.
        set_nodelay = getattr(transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except Exception:
                pass
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
        now = self._last_received = self.clock.seconds()
        self._in_receive = True
        try:
            for event in self.session.receive_data(data, now):
                if self._closing:
                    break  # terminated meanwhile: act on nothing more of this input
                self._dispatch(event)
        finally:
            self._in_receive = False
        self._flush()
        if self.paused and self.session.reading_should_pause and not self._closing:
            self._pause_reading_for_replies()
        # A close asked for (terminate) or a drain finished during this input
        # happens only now that the frames it produced have been written.
        if self._close_wanted is not None:
            self._close_transport(self._close_wanted)
        self._maybe_finish_drain()

    def connectionLost(self, reason: Failure = CLEAN_CLOSE) -> None:
        if self._lost:
            return
        self._lost = True
        self.close_reason = reason
        self._cancel_timers()
        why = reason.getErrorMessage()
        for stream in list(self.streams.values()):
            stream._terminate(Failure(StreamReset(ErrorCode.CONNECTION_RESET, f"tunnel lost: {why}")))
        self.streams.clear()
        ready_waiters, self._ready_waiters = self._ready_waiters, None
        for d in ready_waiters or ():
            d.errback(reason)
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
        for index, stream in enumerate(held[self._rotation :] + held[: self._rotation]):
            if self.paused:
                # Paused again meanwhile: the rest stay held for next time.
                for rest in (held[self._rotation :] + held[: self._rotation])[index:]:
                    self._hold(rest)
                break
            stream._update_producer()

    def stopProducing(self) -> None:
        self._close_transport()

    # -- commands ------------------------------------------------------------

    def open_stream(self, host: str, port: int) -> MuxStream:
        """
        Open a stream to C{host}:C{port} at the peer. Bytes may be written to
        it at once (they travel as early data); C{stream.opened} fires on
        OPEN_OK.

        @raise rtunnel.mux.SessionClosing: the session is going away.
        @raise rtunnel.mux.StreamLimitReached: the peer's stream limit is reached.
        """
        if self._lost:
            # The session cannot know; without this the stream would never open nor fail.
            raise SessionClosing("the tunnel connection is gone; no new streams")
        stream_id = self.session.open_stream(host, port)
        stream = MuxStream(self, stream_id, host, port, local=True)
        self.streams[stream_id] = stream
        self._flush()
        return stream

    def ping(self) -> None:
        """Send a PING; its answer updates L{last_rtt}."""
        if not self.session.ready or self._lost:
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
        for up to C{grace} seconds, then close. Fires when the connection is gone.
        """
        done = self.when_closed()
        if self._lost:
            return done
        if not self._draining:
            self._draining = True
            self.session.go_away(ErrorCode.GOING_AWAY, reason)
            self._flush()
            self._maybe_finish_drain()
            if not self._closing:
                # Streams are still open (or the close waits for this input's
                # end): they get the grace period. A session with nothing open
                # closed above and needs no timer, which a server draining ten
                # thousand idle sessions would only schedule and cancel.
                self._drain_call = self.clock.callLater(grace, self._drain_expired)
        return done

    def abort(self) -> None:
        """Drop the connection at once (no TLS close): the path is dead."""
        self._close_transport(abort=True)

    def terminate(self, code: int, reason: str) -> None:
        """
        End the session now: fatal GOAWAY, every stream reset, connection closed.
        """
        if self._lost:
            return
        # RESET each stream first: after a fatal GOAWAY the peer reads nothing
        # more, and a graceful code (drain expiry) sends no second GOAWAY, so
        # without these the peer's streams would only see "tunnel lost".
        for stream_id in list(self.streams):
            self.session.reset_stream(stream_id, code, reason)
        self.session.go_away(code, reason)
        self._flush()
        for stream in list(self.streams.values()):
            stream._terminate(Failure(StreamReset(code, reason)))
        self._close_transport()

    # -- called by MuxStream ------------------------------------------------

    def _flush(self) -> None:
        if self._in_receive or self.transport is None:
            return
        out = self.session.data_to_send()
        if out and not self._lost:
            self.transport.write(out)

    def _send(self, stream: MuxStream, data: bytes) -> None:
        window = self.session.send_window(stream.stream_id)
        if len(data) <= window:
            self.session.send_data(stream.stream_id, data)
        else:
            rest: bytes | memoryview = data
            if window > 0:
                # Views: the rest of a large write is buffered without a copy.
                view = memoryview(data)
                self.session.send_data(stream.stream_id, view[:window])  # type: ignore[arg-type]
                rest = view[window:]
            stream._buffer_outbound(rest)
        self._flush()

    def _flush_stream(self, stream: MuxStream) -> None:
        """Send what credit allows of the stream's buffer, then a wanted FIN."""
        sid = stream.stream_id
        if stream.send_blocked:
            data = stream._take_outbound(self.session.send_window(sid))
            if data:
                self.session.send_data(sid, data)
        if stream._fin_wanted and not stream.send_blocked and not stream._fin_sent:
            stream._fin_sent = True
            closed = self.session.stream_state(sid) is not None and self.session.end_stream(sid)
            stream._write_closed()
            if closed:
                stream._closed(CLEAN_CLOSE)
        stream._update_producer()
        self._flush()
        self._maybe_finish_drain()

    def _accept(self, stream: MuxStream) -> None:
        self.session.accept_stream(stream.stream_id)
        stream.accepted = True
        self._flush()
        if not stream.opened.called:
            stream.opened.callback(stream)

    def _refuse(self, stream: MuxStream, code: int, reason: str) -> None:
        # One line per OPEN the peer sends: rate-limited per session.
        suppressed = self._log_allowance("refused")
        if suppressed is not None:
            self._log.debug(
                "refused stream {streamID} to {target} from {peer}: {code}: {reason}"
                + (" ({suppressed} similar suppressed)" if suppressed else ""),
                streamID=stream.stream_id,
                target=f"{stream.host}:{stream.port}",
                peer=self.who,
                code=code_name(code),
                reason=printable(reason),
                suppressed=suppressed,
            )
        failure: list[ev.Event] = []
        if self.session.stream_state(stream.stream_id) is not None:
            failure = self.session.refuse_stream(stream.stream_id, code, reason)
        stream._terminate(Failure(StreamReset(code, reason)))
        self._flush()
        # A refusal past the allowance of refused OPENs ended the session.
        for event in failure:
            self._dispatch(event)

    def _reset(self, stream: MuxStream, code: int, reason: str) -> None:
        self.session.reset_stream(stream.stream_id, code, reason)
        self._flush()

    def _consumed(self, stream: MuxStream, size: int) -> None:
        self.session.consumed(stream.stream_id, size)
        self._flush()

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

    def _hold(self, stream: MuxStream) -> None:
        """Remember C{stream}, paused because the tunnel is: resumed with it."""
        held = self._held
        if held is None:
            held = self._held = {}
        held[stream.stream_id] = stream

    def _forget(self, stream: MuxStream) -> None:
        self.streams.pop(stream.stream_id, None)
        if self._held:
            self._held.pop(stream.stream_id, None)
        self._maybe_finish_drain()

    # -- events ------------------------------------------------------------

    def _dispatch(self, event: ev.Event) -> None:
        if isinstance(event, ev.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._data_received(event.data)
        elif isinstance(event, ev.SendWindowAvailable):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._flush_stream(stream)
        elif isinstance(event, ev.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._eof()
        elif isinstance(event, ev.StreamClosed):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._closed(CLEAN_CLOSE)
        elif isinstance(event, ev.StreamRequested):
            self._on_stream_requested(event)
        elif isinstance(event, ev.StreamAccepted):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.opened.called:
                stream.accepted = True
                stream.opened.callback(stream)
        elif isinstance(event, (ev.StreamRefused, ev.StreamReset)):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._terminate(Failure(StreamReset(event.code, event.reason)))
        elif isinstance(event, ev.PongReceived):
            sent = self._ping_sent.pop(event.opaque, None) if self._ping_sent else None
            if sent is not None:
                self.last_rtt = self.clock.seconds() - sent
        elif isinstance(event, ev.SessionReady):
            waiters, self._ready_waiters = self._ready_waiters, None
            for d in waiters or ():
                d.callback(self)
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
            self._end_all_streams(event.code, event.reason)
            self._close_after_flush()

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
            self._end_all_streams(event.code, event.reason)
            self._close_after_flush()
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
        if self._edges.reading_paused or transport is None or self._lost:
            return
        self._edges.reading_paused = True
        cast(IPushProducer, transport).pauseProducing()

    def _resume_reading(self) -> None:
        edges = self._edges
        if edges.stall_call is not None and edges.stall_call.active():
            edges.stall_call.cancel()
        edges.stall_call = None
        transport = self.transport
        if not edges.reading_paused or edges.flooded or transport is None or self._lost:
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
        if self._lost or not self._edges.reading_paused:
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
        for stream in list(self.streams.values()):
            stream._terminate(Failure(StreamReset(code, reason)))

    def _close_after_flush(self) -> None:
        self._in_receive = False
        self._flush()
        self._close_transport()

    # -- timers --------------------------------------------------------------

    def _schedule_keepalive(self) -> None:
        if self.keepalive is None or self._lost:
            return
        self._keepalive_after(self.keepalive.interval)

    def _keepalive_after(self, delay: float) -> None:
        if self._wheel is not None:
            self._keepalive_slot = self._wheel.schedule(self, delay)
        else:
            self._keepalive_call = self.clock.callLater(delay, self._keepalive_tick)

    def _keepalive_due(self, slot: int) -> None:
        """The wheel's call: our check, unless it was cancelled meanwhile."""
        if slot != self._keepalive_slot or self._lost:
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
        if self._in_receive:
            return  # dataReceived calls again once this input's output is written
        if self._draining and not self.streams and not self._lost and self.transport is not None:
            self._flush()
            self._close_transport()

    def _close_transport(self, abort: bool = False) -> None:
        """
        Close the tunnel connection. We unregister as its producer first:
        a TLS transport does not start its shutdown while a producer is
        registered, and would otherwise wait forever. A polite close (TLS
        sends close_notify and waits for the peer's) is aborted if the
        connection is not gone within C{close_timeout} seconds.
        """
        transport = self.transport
        if transport is None or self._lost:
            return
        self._closing = True
        if self._in_receive:
            # Output is written when the input has been handled; close after it.
            self._close_wanted = abort or bool(self._close_wanted)
            return
        self._close_wanted = None
        if not self._edges.unregistered:
            self._edges.unregistered = True
            cast(IConsumer, transport).unregisterProducer()
        if abort:
            abort_connection = getattr(transport, "abortConnection", None)
            if abort_connection is not None:
                abort_connection()
                return
        transport.loseConnection()
        edges = self._edges
        if edges.close_timeout is not None and edges.close_call is None and not self._lost:
            edges.close_call = self.clock.callLater(edges.close_timeout, self._close_expired)

    def _close_expired(self) -> None:
        self._edges.close_call = None
        transport = self.transport
        if self._lost or transport is None:
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


__all__ = ["Keepalive", "MuxProtocol", "StreamHandler"]
