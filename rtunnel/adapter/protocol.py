"""
L{MuxProtocol}: runs a L{MuxSession} over any Twisted transport (TLS in
production) and presents its streams as L{MuxStream} transports.

The protocol only moves bytes and dispatches events; every protocol rule is
the core's. It is an L{IPushProducer} on its transport: when the transport's
buffer is full every stream's producer is paused, and on resume they are
resumed in a rotating order so that no stream is always served first. It never
pauses reading from the tunnel: memory is bounded by the windows, and one slow
stream must not stall the others.
"""

from __future__ import annotations

from typing import Callable, cast

from attrs import field, frozen, validators
from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from rtunnel.logs import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..mux import events as ev
from ..mux.errors import ErrorCode, SessionClosing, code_name
from ..mux.session import MuxSession
from ..mux.settings import Settings, WindowTuning
from .address import describe
from .stream import CLEAN_CLOSE, MuxStream, StreamReset

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


@implementer(IPushProducer)
class MuxProtocol(Protocol):
    """
    One end of a multiplexed tunnel connection.

    @param initiator: C{True} on the end that dialed (it uses odd stream ids).
    @param clock: for keepalive timers; injected so tests use L{Clock}.
    @param stream_handler: decides on streams the peer opens; without one,
        every such open is refused.
    @param keepalive: ping/timeout policy, or C{None} for none.
    """

    _log = Logger()

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
    ) -> None:
        self.session = MuxSession(initiator=initiator, settings=settings, tuning=tuning)
        self.clock = clock
        self.stream_handler = stream_handler
        self.keepalive = keepalive
        self.label = label
        self.peer_label = ""
        self.host_label = ""
        self.paused = False
        self.streams: dict[int, MuxStream] = {}
        #: streams whose producer was paused because the tunnel was
        self._held: dict[int, MuxStream] = {}
        self.last_rtt: float | None = None
        self.close_reason: Failure | None = None
        #: (code, reason) of the peer's GOAWAY, once one arrived
        self.peer_goaway: tuple[int, str] | None = None
        #: called with (code, reason) when the peer starts a graceful drain.
        self.on_goaway: Callable[[int, str], None] | None = None
        self._ready_waiters: list[defer.Deferred[MuxProtocol]] = []
        self._closed_waiters: list[defer.Deferred[BaseException]] = []
        self._in_receive = False
        self._last_received = 0.0
        self._ping_sent: dict[bytes, float] = {}
        self._keepalive_call: IDelayedCall | None = None
        self._drain_call: IDelayedCall | None = None
        self._draining = False
        self._rotation = 0
        self._lost = False
        self._unregistered = False
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
        self._closed_waiters.append(d)
        return d

    @property
    def who(self) -> str:
        """The peer for log lines: its label (the site name) and address."""
        return f"{self.label} ({self.peer_label})" if self.label else self.peer_label

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
        for what, getter in (("peer_label", "getPeer"), ("host_label", "getHost")):
            try:
                setattr(self, what, describe(getattr(transport, getter)()))
            except Exception:
                setattr(self, what, "")
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
        self._last_received = self.clock.seconds()
        self._in_receive = True
        try:
            for event in self.session.receive_data(data):
                if self._closing:
                    break  # terminated meanwhile: act on nothing more of this input
                self._dispatch(event)
        finally:
            self._in_receive = False
        self._flush()
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
        for d in self._ready_waiters:
            d.errback(reason)
        self._ready_waiters.clear()
        for waiter in self._closed_waiters:
            waiter.callback(_exception_of(reason))
        self._closed_waiters.clear()

    # -- IPushProducer: our transport's buffer filled or drained ------------

    def pauseProducing(self) -> None:
        # Lazily: a stream's producer is paused when it next writes (each can
        # add at most one more read to the transport's buffer). Pausing every
        # stream here would cost two epoll changes per stream per cycle, and
        # with a thousand mostly idle streams that is most of the work.
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        held = list(self._held.values())
        self._held.clear()
        if not held:
            return
        # Rotate the starting point so the first streams do not always win.
        self._rotation = (self._rotation + 1) % len(held)
        for index, stream in enumerate(held[self._rotation :] + held[: self._rotation]):
            if self.paused:
                # Paused again meanwhile: the rest stay held for next time.
                for rest in (held[self._rotation :] + held[: self._rotation])[index:]:
                    self._held[rest.stream_id] = rest
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
        self._ping_sent[opaque] = self.clock.seconds()
        if len(self._ping_sent) > 16:  # unanswered pings: keep the map bounded
            self._ping_sent.pop(next(iter(self._ping_sent)))
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
            self._drain_call = self.clock.callLater(grace, self._drain_expired)
            self._maybe_finish_drain()
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
        self._log.debug(
            "refused stream {streamID} to {target} from {peer}: {code}: {reason}",
            streamID=stream.stream_id,
            target=f"{stream.host}:{stream.port}",
            peer=self.who,
            code=code_name(code),
            reason=reason,
        )
        if self.session.stream_state(stream.stream_id) is not None:
            self.session.refuse_stream(stream.stream_id, code, reason)
        stream._terminate(Failure(StreamReset(code, reason)))
        self._flush()

    def _reset(self, stream: MuxStream, code: int, reason: str) -> None:
        self.session.reset_stream(stream.stream_id, code, reason)
        self._flush()

    def _consumed(self, stream: MuxStream, size: int) -> None:
        self.session.consumed(stream.stream_id, size)
        self._flush()

    def _forget(self, stream: MuxStream) -> None:
        self.streams.pop(stream.stream_id, None)
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
            sent = self._ping_sent.pop(event.opaque, None)
            if sent is not None:
                self.last_rtt = self.clock.seconds() - sent
        elif isinstance(event, ev.SessionReady):
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                d.callback(self)
        elif isinstance(event, ev.GoAwayReceived):
            self._on_goaway(event)
        elif isinstance(event, ev.SessionFailed):
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
            self._log.failure("stream handler failed for stream {streamID}", streamID=event.stream_id)
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
        self._keepalive_call = self.clock.callLater(self.keepalive.interval, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        self._keepalive_call = None
        assert self.keepalive is not None
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
        delay = min(self.keepalive.interval, max(self.keepalive.timeout - idle, 0.001))
        self._keepalive_call = self.clock.callLater(delay, self._keepalive_tick)

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
        registered, and would otherwise wait forever.
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
        if not self._unregistered:
            self._unregistered = True
            cast(IConsumer, transport).unregisterProducer()
        if abort:
            abort_connection = getattr(transport, "abortConnection", None)
            if abort_connection is not None:
                abort_connection()
                return
        transport.loseConnection()

    def _cancel_timers(self) -> None:
        for name in ("_keepalive_call", "_drain_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)


__all__ = ["Keepalive", "MuxProtocol", "StreamHandler"]
