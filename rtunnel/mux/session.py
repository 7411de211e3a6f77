"""
The multiplexing engine: all protocol state and rules, no I/O.

Bytes from the peer go into L{MuxSession.receive_data}, which returns events;
commands (open, send, end, reset, consume, ping, go away) only queue bytes, which
L{MuxSession.data_to_send} hands out. The same engine runs on both ends: the
role only picks stream-id parity (initiator odd, acceptor even) and, unless
given, which L{FloodLimits} apply. A peer that breaks a stream rule gets that
stream reset; one that breaks a session rule gets a GOAWAY and a
L{SessionFailed} event. Nothing the peer sends raises.

Flood protection (docs/protocol.md, "Flood protection"): frames that do
nothing useful (PINGs, empty DATA, refused OPENs) are counted per kind against
token buckets over the time the caller passes in; replies the peer's frames
elicit are counted while the caller reports that the peer reads nothing
(L{MuxSession.set_peer_reading}). Past a limit the session ends with GOAWAY
ENHANCE_YOUR_CALM, reported as L{FloodDetected} then L{SessionFailed}.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType

from ..address import AddressError, HostPort, wire_host_error
from . import events as ev
from .errors import (
    ErrorCode,
    MuxUsageError,
    ProtocolError,
    SessionClosing,
    StreamLimitReached,
    code_name,
)
from .flood import EMPTY_DATA, PING, REFUSED_OPEN, FloodMeter
from .frames import (
    FLAG_FIN,
    HEADER,
    MAX_STREAM_ID,
    MAX_WINDOW,
    PING_SIZE,
    Data,
    Frame,
    FrameDecoder,
    FrameType,
    GoAway,
    Hello,
    Open,
    OpenFail,
    OpenOk,
    Ping,
    Replicas,
    Reset,
    Services,
    WindowUpdate,
    encode,
    services_payload,
)
from .settings import CAP_REPLICAS, CAP_SERVICES, FloodLimits, Settings, WindowTuning
from .streams import TRANSITIONS, Input, StreamRecord, StreamState

SUPPORTED_VERSIONS = frozenset({1})
_DEFAULT_SETTINGS = Settings()
#: Credit is returned once this much (or half the window, if less) was consumed.
UPDATE_BATCH = 512 * 1024
_GRACEFUL = (ErrorCode.NO_ERROR, ErrorCode.GOING_AWAY)
_MAX_PENDING_PINGS = 64


class _Flood(ProtocolError):
    """
    Raised inside frame handling when the peer went past a flood limit.
    """

    def __init__(self, event: ev.FloodDetected) -> None:
        if event.seconds is None:
            reason = (
                f"too many unanswered control replies: {event.detail} queued while the peer reads nothing"
                f" (limit {event.limit})"
            )
        else:
            during = f"in {event.seconds:.3f}s" if event.seconds else "in one read"
            reason = f"too many {event.what} frames: {event.count} {during} (allowed {event.limit})"
        super().__init__(ErrorCode.ENHANCE_YOUR_CALM, reason)
        self.event = event


class _StreamError(Exception):
    """
    Raised inside frame handling when the peer broke a rule of one stream.
    """

    def __init__(self, code: ErrorCode, reason: str) -> None:
        self.code = code
        self.reason = reason


def _check_code(code: int) -> None:
    if not (isinstance(code, int) and 0 <= code <= 0xFFFF):
        raise MuxUsageError(f"code {code!r} does not fit in 16 bits")


def _check_target(host: str, port: int) -> None:
    # The same grammar as the receiving end's (frames.py): an OPEN this end
    # sends can never be the protocol error that ends the session there.
    problem = wire_host_error(host)
    if problem is not None:
        raise MuxUsageError(f"target host {host!r} is not a DNS name or IP literal: {problem}")
    if not (isinstance(port, int) and 1 <= port <= 65535):
        raise MuxUsageError(f"target port {port!r} is not in 1-65535")


class MuxSession:
    """
    One end of a multiplexed session.

    @param initiator: C{True} on the end that dialed the connection (odd ids).
    @param settings: what this end accepts; sent in our HELLO.
    @param tuning: how receive windows grow; without it they stay at
        C{initial_window}.
    @param flood_limits: what this end tolerates from a flooding peer;
        without it, those of this end's role (L{FloodLimits.for_role}: the
        tunnel server's on the acceptor, the site's on the initiator).
    @param services: the named services this end announces (a site's
        C{--service}), sent in one SERVICES frame right after the peer's
        HELLO when both HELLOs offer L{CAP_SERVICES}; never sent to a peer
        that does not (it would take the frame for a protocol error).
        Checked here: L{ValueError} if the frame could not carry them.

    Replicas (docs/protocol.md, "REPLICAS"): when both HELLOs offer
    L{CAP_REPLICAS}, the acceptor (the tunnel server) tells the initiator
    (the site) which replica it reached and the whole replica set with
    L{send_replicas}, as often as the set changes; the initiator reports
    each as L{ev.ReplicasAnnounced} and keeps the last in L{peer_replicas}.
    """

    # A server holds one session per site: slots save the instance dictionary.
    __slots__ = (
        "initiator",
        "local_settings",
        "tuning",
        "peer_settings",
        "version",
        "_out",
        "_decoder",
        "_streams",
        "_next_local_id",
        "_peer_parity",
        "_highest_peer_id",
        "_last_processed_peer_id",
        "_peer_opened",
        "_local_opened",
        "_started",
        "_goaway_sent",
        "_fatal_sent",
        "_goaway_received",
        "_failed",
        "_pings",
        "_probe",
        "_probe_sample",
        "_probe_second",
        "_probe_wait",
        "_probe_gap",
        "_window_growth",
        "_learned_window",
        "_flood",
        "_announce",
        "peer_services",
        "peer_replicas",
    )

    def __init__(
        self,
        *,
        initiator: bool,
        settings: Settings | None = None,
        tuning: WindowTuning | None = None,
        flood_limits: FloodLimits | None = None,
        services: Mapping[str, HostPort] | None = None,
    ) -> None:
        self.initiator = initiator
        self.local_settings = settings if settings is not None else Settings()
        limits = flood_limits if flood_limits is not None else FloodLimits.for_role(initiator)
        # Without tuning, windows stay at initial_window: the plain protocol.
        self.tuning = tuning if tuning is not None else WindowTuning(enabled=False)
        self.peer_settings: Settings | None = None
        self.version: int | None = None
        self._out = bytearray()
        self._decoder = FrameDecoder(self.local_settings.max_frame_size)
        self._streams: dict[int, StreamRecord] = {}
        self._next_local_id = 1 if initiator else 2
        self._peer_parity = 0 if initiator else 1
        self._highest_peer_id = 0
        self._last_processed_peer_id = 0
        self._peer_opened = 0
        self._local_opened = 0
        self._started = False
        self._goaway_sent = False
        self._fatal_sent = False
        self._goaway_received = False
        self._failed = False
        #: Opaque bytes of our PINGs not answered yet, with their counts.
        self._pings: dict[bytes, int] | None = None  # made by the first PING (a server sends few)
        # Bandwidth-delay probing (see WindowTuning).
        self._probe: bytes | None = None
        self._probe_sample: dict[int, int] | None = None  # while a probe runs
        self._probe_second = False
        self._probe_wait = 0
        self._probe_gap = self.tuning.probe_gap
        self._window_growth = 0
        #: the largest window probing found useful on this session's path
        self._learned_window = 0
        # Flood protection: the time of the current input (None: no rate
        # caps), useless frames per kind, and replies the peer left unread;
        # one attribute (see FloodMeter).
        self._flood = FloodMeter(limits)
        entries = tuple((name, hp.host, hp.port) for name, hp in sorted((services or {}).items()))
        services_payload(entries)  # raises ValueError for what the peer would refuse
        self._announce = Services(entries)
        #: the services the peer announced, once its SERVICES frame arrived
        self.peer_services: Mapping[str, HostPort] | None = None
        #: the replica set the peer (the tunnel server) announced last
        self.peer_replicas: Replicas | None = None

    # -- state -------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The peer's HELLO arrived and the session has not failed."""
        return self.peer_settings is not None and not self._failed

    @property
    def services_negotiated(self) -> bool:
        """Both HELLOs offered L{CAP_SERVICES}: each end sends one SERVICES."""
        peer = self.peer_settings
        return peer is not None and bool(peer.capabilities & self.local_settings.capabilities & CAP_SERVICES)

    @property
    def services_pending(self) -> bool:
        """The peer's SERVICES frame is due (negotiated) and has not arrived."""
        return self.services_negotiated and self.peer_services is None and not self._failed

    @property
    def replicas_negotiated(self) -> bool:
        """
        Both HELLOs offered L{CAP_REPLICAS}: the acceptor may send REPLICAS
        (L{send_replicas}). C{False} until the peer's HELLO arrived.
        """
        peer = self.peer_settings
        return peer is not None and bool(peer.capabilities & self.local_settings.capabilities & CAP_REPLICAS)

    @property
    def failed(self) -> bool:
        """A fatal GOAWAY was sent or received: the session is over."""
        return self._failed

    @property
    def accepting_streams(self) -> bool:
        """New streams may be opened from this end."""
        return self.ready and not (self._goaway_sent or self._goaway_received)

    @property
    def goaway_received(self) -> bool:
        return self._goaway_received

    @property
    def goaway_sent(self) -> bool:
        return self._goaway_sent

    @property
    def open_streams(self) -> int:
        """Streams currently live, opened by either end."""
        return len(self._streams)

    @property
    def local_streams(self) -> int:
        """Live streams that this end opened (limited by the peer's max_streams)."""
        return self._local_opened

    @property
    def session_window_growth(self) -> int:
        """How far all live streams' windows exceed the initial window, together."""
        return self._window_growth

    def stream_window(self, stream_id: int) -> int:
        """The receive window (credit target) of a stream, 0 if gone."""
        record = self._streams.get(stream_id)
        return record.window if record is not None else 0

    def stream_state(self, stream_id: int) -> StreamState | None:
        """The state of a live stream, or C{None} once it is gone."""
        record = self._streams.get(stream_id)
        return record.state if record is not None else None

    def stream_target(self, stream_id: int) -> tuple[str, int] | None:
        record = self._streams.get(stream_id)
        return (record.host, record.port) if record is not None else None

    def send_window(self, stream_id: int) -> int:
        """How many bytes may be sent on C{stream_id} right now (0 if gone)."""
        record = self._streams.get(stream_id)
        return record.send_window if record is not None else 0

    def receive_window(self, stream_id: int) -> int:
        """How many more bytes the peer may send on C{stream_id} now."""
        record = self._streams.get(stream_id)
        return record.recv_window if record is not None else 0

    @property
    def flood_limits(self) -> FloodLimits:
        """What this end tolerates from a flooding peer."""
        return self._flood.limits

    @property
    def reply_debt(self) -> int:
        """
        Replies elicited by the peer's own frames (PING ACKs, OPEN_FAIL
        refusals, RESETs answering a broken stream rule) queued since the
        caller reported that the peer stopped reading (L{set_peer_reading}).
        """
        return self._flood.reply_debt

    @property
    def reading_should_pause(self) -> bool:
        """
        The peer reads nothing and its frames made us queue at least
        C{flood_limits.reply_pause} replies meanwhile: stop reading from it
        until it reads again. (Never merely because the peer reads nothing:
        two ends that both stopped reading whenever their own writes were
        blocked would deadlock.)
        """
        return self._flood.reply_debt >= self._flood.limits.reply_pause

    def set_peer_reading(self, reading: bool) -> None:
        """
        Tell the session whether the peer reads what we send: C{False} once
        our transport paused us (its buffer is full), C{True} once it
        resumed. Only meanwhile do replies the peer elicits count as unread
        (L{reply_debt}); resuming clears the count.
        """
        self._flood.set_peer_reading(reading)

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- commands ----------------------------------------------------------

    def start(self) -> None:
        """Queue our HELLO. Call once, first."""
        if self._started:
            raise MuxUsageError("session already started")
        self._started = True
        s = self.local_settings
        self._queue(Hello(s.version, s.max_frame_size, s.initial_window, s.max_streams, s.capabilities))
        if self.services_negotiated:
            self._queue(self._announce)  # the peer's HELLO came first

    def open_stream(self, host: str, port: int) -> int:
        """
        Queue an OPEN to C{host}:C{port}; return the new stream id. DATA may
        follow at once (early data), within the peer's initial window.

        @raise SessionClosing: a GOAWAY passed, or the session failed.
        @raise StreamLimitReached: the peer's max_streams are all in use.
        """
        if self.peer_settings is None:
            raise MuxUsageError("session not ready: the peer's HELLO has not arrived")
        if self._failed or self._goaway_sent or self._goaway_received:
            raise SessionClosing("session is going away; no new streams")
        if self._local_opened >= self.peer_settings.max_streams:
            raise StreamLimitReached(f"peer allows {self.peer_settings.max_streams} concurrent streams")
        if self._next_local_id > MAX_STREAM_ID:
            self.go_away(ErrorCode.NO_ERROR, "stream ids exhausted")
            raise SessionClosing("stream ids exhausted")
        _check_target(host, port)
        stream_id = self._next_local_id
        self._next_local_id += 2
        self._add_stream(stream_id, StreamState.OPENING_OUT, True, host, port)
        self._queue(Open(stream_id, host, port))
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Answer the peer's OPEN with OPEN_OK: the target is connected."""
        self._send_transition(stream_id, Input.SEND_OPEN_OK)
        self._queue(OpenOk(stream_id))

    def refuse_stream(self, stream_id: int, code: int, reason: str) -> list[ev.Event]:
        """
        Answer the peer's OPEN with OPEN_FAIL; the stream is gone.

        A refused OPEN is a useless frame of the peer's
        (C{flood_limits.refused_opens}): past the allowance the session
        fails, and the events saying so are returned (L{FloodDetected},
        then every live stream's L{StreamReset} and L{SessionFailed}, as
        from L{receive_data}); normally the list is empty.
        """
        _check_code(code)
        self._send_transition(stream_id, Input.SEND_OPEN_FAIL)
        self._queue(OpenFail(stream_id, code, reason))
        events: list[ev.Event] = []
        try:
            self._refused_open()
        except _Flood as e:
            events.append(e.event)
            self._fail(e.code, e.reason, events)
        return events

    def send_data(self, stream_id: int, data: bytes, fin: bool = False) -> bool:
        """
        Queue C{data} (and FIN if asked) on a stream, cut into frames of the
        peer's max_frame_size.

        @return: C{True} if the stream is now closed in both directions.
        @raise MuxUsageError: more data than the send window allows, or the
            stream cannot send (gone, or our FIN already sent).
        """
        record = self._streams.get(stream_id)
        if record is None:
            raise MuxUsageError(f"stream {stream_id} is not open")
        size = len(data)
        if size:
            if (record.state, Input.SEND_DATA) not in TRANSITIONS:
                raise MuxUsageError(f"cannot send DATA on stream {stream_id} in state {record.state.label}")
            if size > record.send_window:
                raise MuxUsageError(
                    f"{size} bytes exceed the send window of {record.send_window} on stream {stream_id}"
                )
            record.send_window -= size
            assert self.peer_settings is not None
            chunk = self.peer_settings.max_frame_size
            out = self._out
            view = memoryview(data)
            for start in range(0, size, chunk):
                piece = view[start : start + chunk]
                last = start + chunk >= size
                out += HEADER.pack(FrameType.DATA, FLAG_FIN if (fin and last) else 0, stream_id, len(piece))
                out += piece
            view.release()
        if fin:
            record.state = self._next_state(record, Input.SEND_FIN)
            if not size:
                self._out += HEADER.pack(FrameType.DATA, FLAG_FIN, stream_id, 0)
            if record.state is StreamState.CLOSED:
                self._remove(record)
                return True
        return False

    def end_stream(self, stream_id: int) -> bool:
        """Queue FIN: we send no more. @return: C{True} if now fully closed."""
        return self.send_data(stream_id, b"", fin=True)

    def reset_stream(self, stream_id: int, code: int, reason: str) -> None:
        """
        Queue RESET and forget the stream. Resetting a stream that is already
        gone does nothing: the peer may have ended it first.
        """
        _check_code(code)
        record = self._streams.get(stream_id)
        if record is None:
            return
        self._remove(record)
        self._queue(Reset(stream_id, code, reason))

    def consumed(self, stream_id: int, size: int) -> None:
        """
        The local consumer took C{size} received bytes: return credit to the
        peer once half a window has accumulated, so updates stay few.

        @raise MuxUsageError: C{size} is more than was received and not yet
            reported consumed (returning it would let the peer exceed the
            window).
        """
        record = self._streams.get(stream_id)
        if record is None or size <= 0:
            return
        # recv_window + held + unacked == window: what the peer may still
        # send, what the consumer holds, what awaits a WINDOW_UPDATE.
        held = record.window - record.recv_window - record.unacked
        if size > held:
            raise MuxUsageError(f"consumed {size} bytes on stream {stream_id}, but only {held} were received")
        record.unacked += size
        # Half a window, but at most UPDATE_BATCH: with a large (grown)
        # window, credit returned in half-window lumps would leave the pipe
        # a quarter empty on average.
        if (
            record.unacked >= min(record.window // 2, UPDATE_BATCH)
            and (
                record.state,
                Input.SEND_WINDOW_UPDATE,
            )
            in TRANSITIONS
        ):
            self._grant(record, record.unacked)

    def grow_window(self, stream_id: int, window: int) -> None:
        """
        Raise the credit target of a stream (receive-side window tuning):
        the difference is granted at once, or, on a stream we opened that
        the peer has not accepted yet, with its OPEN_OK.
        """
        record = self._streams.get(stream_id)
        if record is None or window <= record.window:
            return
        window = min(window, MAX_WINDOW)
        extra = window - record.window
        self._window_growth += extra
        record.window = window
        # Held back as unacked until a WINDOW_UPDATE is allowed, so the
        # credit is never lost.
        record.unacked += extra
        if (record.state, Input.SEND_WINDOW_UPDATE) in TRANSITIONS:
            self._grant(record, record.unacked)

    def ping(self, opaque: bytes | None = None) -> bytes:
        """Queue a PING; return its opaque bytes (random if not given)."""
        if not self._started:
            raise MuxUsageError("session not started: a PING may not precede our HELLO")
        if opaque is None:
            opaque = os.urandom(PING_SIZE)
        if len(opaque) != PING_SIZE:
            raise MuxUsageError(f"PING carries exactly {PING_SIZE} bytes")
        pings = self._pings
        if pings is None:
            pings = self._pings = {}
        pings[opaque] = pings.get(opaque, 0) + 1
        if len(pings) > _MAX_PENDING_PINGS:  # a peer that never answers
            del pings[next(iter(pings))]
        self._queue(Ping(opaque))
        return opaque

    def send_replicas(self, replicas: Replicas) -> None:
        """
        Queue a REPLICAS frame: the replica this session reached and the
        whole replica set, replacing whatever was sent before (send one
        whenever the set changes). Nothing is queued once the session
        failed: the peer reads nothing after a fatal GOAWAY.

        @raise MuxUsageError: this end is the initiator (only the tunnel
            server announces replicas), or the capability is not
            negotiated (L{replicas_negotiated}): a peer that did not offer
            it would take the frame for a protocol error.
        """
        if self.initiator:
            raise MuxUsageError("only the acceptor (the tunnel server) sends REPLICAS")
        if not self.replicas_negotiated:
            if self.peer_settings is None:
                raise MuxUsageError("cannot send REPLICAS before the peer's HELLO arrived")
            raise MuxUsageError("cannot send REPLICAS: not both HELLOs offer the capability")
        if not isinstance(replicas, Replicas):
            raise MuxUsageError(f"not a Replicas value: {replicas!r}")
        if self._failed:
            return
        self._queue(replicas)

    def go_away(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """
        Queue GOAWAY. A graceful code (NO_ERROR, GOING_AWAY) starts a drain:
        no new streams, live ones continue. Any other code is fatal: the
        session processes nothing more and the caller should close the
        connection once the bytes are written.
        """
        _check_code(code)
        fatal = code not in _GRACEFUL
        if self._fatal_sent or (self._goaway_sent and not fatal):
            return
        self._goaway_sent = True
        if fatal:
            self._fatal_sent = True
            self._failed = True
        self._queue(GoAway(self._last_processed_peer_id, code, reason))

    # -- input -------------------------------------------------------------

    def receive_data(self, data: bytes, now: float | None = None) -> list[ev.Event]:
        """
        Process bytes from the peer; return what happened, in order. Never
        raises for anything the peer sends.

        @param now: the time the bytes arrived, in seconds (any origin, the
            same for every call): the allowances of L{FloodLimits} are rates
            over it. Without it, useless frames are not rate-capped.
        @raise MuxUsageError: L{start} was not called first.
        """
        if not self._started:
            raise MuxUsageError("session not started: call start() before receive_data()")
        if self._failed:
            return []
        if now is not None:
            self._flood.now = now
        events: list[ev.Event] = []
        decoder = self._decoder
        try:
            for frame in decoder.feed(data):
                self._handle(frame, events)
                if self._failed:
                    return events
        except ProtocolError as e:
            if isinstance(e, _Flood):
                events.append(e.event)
            self._fail(e.code, e.reason, events)
            return events
        if decoder.error is not None:
            self._fail(decoder.error.code, decoder.error.reason, events)
        return events

    # -- internals ---------------------------------------------------------

    def _queue(self, frame: Frame) -> None:
        self._out += encode(frame)

    def _spend(self, kind: str) -> None:
        """Count one useless frame of C{kind}; raise L{_Flood} past its allowance."""
        flood = self._flood.spend(kind)
        if flood is not None:
            raise _Flood(flood)

    def _owe(self, kind: str) -> None:
        """
        A reply of C{kind}, elicited by the peer's frame, was queued; if the
        peer reads nothing, count it, and raise L{_Flood} past the reply limit.
        """
        if not self._flood.peer_reading:
            flood = self._flood.owe(kind)
            if flood is not None:
                raise _Flood(flood)

    def _refused_open(self) -> None:
        # After an OPEN_FAIL answering the peer's OPEN was queued.
        self._owe("OPEN_FAIL")
        self._spend(REFUSED_OPEN)

    def _fail(self, code: ErrorCode, reason: str, events: list[ev.Event]) -> None:
        self.go_away(code, reason)
        self._failed = True
        self._end_all_streams(code, reason, False, events)
        events.append(ev.SessionFailed(code, reason))

    def _end_all_streams(self, code: int, reason: str, by_peer: bool, events: list[ev.Event]) -> None:
        # The session is over: every live stream gets its terminal event.
        for record in list(self._streams.values()):
            self._remove(record)
            events.append(ev.StreamReset(record.stream_id, code, reason, by_peer))

    def _add_stream(self, stream_id: int, state: StreamState, local: bool, host: str, port: int) -> None:
        assert self.peer_settings is not None
        window = self.local_settings.initial_window
        self._streams[stream_id] = StreamRecord(
            stream_id=stream_id,
            state=state,
            local=local,
            host=host,
            port=port,
            send_window=self.peer_settings.initial_window,
            recv_window=window,
            window=window,
        )
        if local:
            self._local_opened += 1
        else:
            self._peer_opened += 1
        if self._learned_window > window:
            # The path is known to need a larger window: start there (within
            # the session budget) instead of probing up from scratch, so a
            # new video stream on a long path is fast from its first second.
            room = self.tuning.session_budget - self._window_growth
            self.grow_window(stream_id, min(self._learned_window, window + max(room, 0)))

    def _remove(self, record: StreamRecord) -> None:
        self._window_growth -= record.window - self.local_settings.initial_window
        record.window = self.local_settings.initial_window
        record.state = StreamState.CLOSED
        if self._streams.pop(record.stream_id, None) is not None:
            if record.local:
                self._local_opened -= 1
            else:
                self._peer_opened -= 1

    def _grant(self, record: StreamRecord, increment: int) -> None:
        increment = min(increment, MAX_WINDOW - record.recv_window)
        if increment <= 0:
            return
        record.recv_window += increment
        record.unacked = 0
        self._queue(WindowUpdate(record.stream_id, increment))

    @staticmethod
    def _next_state(record: StreamRecord, inp: Input) -> StreamState:
        try:
            return TRANSITIONS[record.state, inp]
        except KeyError:
            if inp.received:
                raise _StreamError(
                    ErrorCode.STREAM_STATE_ERROR,
                    f"{inp.label} not allowed on stream {record.stream_id} in state {record.state.label}",
                ) from None
            raise MuxUsageError(
                f"cannot {inp.label} on stream {record.stream_id} in state {record.state.label}"
            ) from None

    def _send_transition(self, stream_id: int, inp: Input) -> None:
        record = self._streams.get(stream_id)
        if record is None:
            raise MuxUsageError(f"stream {stream_id} is not open")
        record.state = self._next_state(record, inp)
        if record.state is StreamState.CLOSED:
            self._remove(record)

    def _is_idle(self, stream_id: int) -> bool:
        if stream_id % 2 == self._peer_parity:
            return stream_id > self._highest_peer_id
        return stream_id >= self._next_local_id

    def _handle(self, frame: Frame, events: list[ev.Event]) -> None:
        if self.peer_settings is None:
            if not isinstance(frame, Hello):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "the first frame must be HELLO")
            self._on_hello(frame, events)
            return
        if isinstance(frame, Data):
            record = self._streams.get(frame.stream_id)
            if record is None:
                if not frame.data and not frame.fin:
                    self._spend(EMPTY_DATA)
                self._check_not_idle(frame)
                return
            try:
                self._on_data(record, frame, events)
            except _StreamError as e:
                self._stream_error(record, e, events)
            return
        if isinstance(frame, (OpenOk, OpenFail, WindowUpdate, Reset)):
            record = self._streams.get(frame.stream_id)
            if record is None:
                self._check_not_idle(frame)
                return
            try:
                self._on_stream_control(record, frame, events)
            except _StreamError as e:
                self._stream_error(record, e, events)
            return
        if isinstance(frame, Open):
            self._on_open(frame, events)
        elif isinstance(frame, Ping):
            if frame.ack:
                if frame.opaque == self._probe:
                    self._probe_answered()
                    return
                # Only an answer to one of our PINGs is news; others are
                # ignored, and count as useless.
                pings = self._pings
                pending = pings.get(frame.opaque, 0) if pings else 0
                if pending:
                    assert pings is not None
                    if pending == 1:
                        del pings[frame.opaque]
                    else:
                        pings[frame.opaque] = pending - 1
                    events.append(ev.PongReceived(frame.opaque))
                else:
                    self._spend(PING)
            else:
                # Counted before it is answered: the PING past the allowance
                # gets the GOAWAY instead.
                self._spend(PING)
                self._queue(Ping(frame.opaque, ack=True))
                events.append(ev.PingReceived(frame.opaque))
                self._owe("PING ACK")
        elif isinstance(frame, GoAway):
            self._on_goaway(frame, events)
        elif isinstance(frame, Services):
            self._on_services(frame, events)
        elif isinstance(frame, Replicas):
            self._on_replicas(frame, events)
        elif isinstance(frame, Hello):
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "second HELLO")

    def _on_services(self, frame: Services, events: list[ev.Event]) -> None:
        if not self.services_negotiated:
            # What a peer that predates the frame does with it (an unknown type).
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SERVICES frame without the capability in both HELLOs")
        if self.peer_services is not None:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "second SERVICES frame")
        services: dict[str, HostPort] = {}
        for name, host, port in frame.entries:
            if name in services:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"SERVICES names service {name} twice")
            try:
                services[name] = HostPort.of(host, port)
            except AddressError as e:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"SERVICES service {name}: {e}") from None
        self.peer_services = MappingProxyType(services)
        events.append(ev.ServicesAnnounced(self.peer_services))

    def _on_replicas(self, frame: Replicas, events: list[ev.Event]) -> None:
        # The frame's contents were checked by the decoder (a Replicas value
        # is valid by construction); what is left are the session's rules.
        if not self.replicas_negotiated:
            # What a peer that predates the frame does with it (an unknown type).
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "REPLICAS frame without the capability in both HELLOs")
        if not self.initiator:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR, "REPLICAS frame from the initiator (only the tunnel server sends them)"
            )
        self.peer_replicas = frame
        events.append(ev.ReplicasAnnounced(frame))

    def _check_not_idle(self, frame: Frame) -> None:
        # A frame for a closed stream is normal (it crossed our RESET); one for
        # a stream never opened means the peer lost track of the session.
        if self._is_idle(frame.stream_id):
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR,
                f"{type(frame).__name__} frame on idle stream {frame.stream_id}",
            )

    def _on_hello(self, frame: Hello, events: list[ev.Event]) -> None:
        try:
            peer = Settings(
                max_frame_size=frame.max_frame_size,
                initial_window=frame.initial_window,
                max_streams=frame.max_streams,
                version=frame.version,
                capabilities=frame.capabilities,
            )
        except ValueError as e:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"HELLO setting out of range: {e.args[0]}") from None
        if peer == _DEFAULT_SETTINGS:
            peer = _DEFAULT_SETTINGS  # one object for the many peers that announce the defaults
        version = min(self.local_settings.version, peer.version)
        if version not in SUPPORTED_VERSIONS:
            raise ProtocolError(
                ErrorCode.VERSION_MISMATCH, f"no common protocol version (peer speaks up to {peer.version})"
            )
        self.peer_settings = peer
        self.version = version
        events.append(ev.SessionReady(peer, version))
        if self._started and self.services_negotiated:
            self._queue(self._announce)

    def _on_open(self, frame: Open, events: list[ev.Event]) -> None:
        stream_id = frame.stream_id
        if stream_id % 2 != self._peer_parity:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"OPEN with stream id {stream_id} of our parity")
        if stream_id <= self._highest_peer_id:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR,
                f"OPEN stream id {stream_id} does not increase (last {self._highest_peer_id})",
            )
        self._highest_peer_id = stream_id
        if self._goaway_sent:
            self._queue(OpenFail(stream_id, ErrorCode.GOING_AWAY, "going away: no new streams"))
            self._refused_open()
            return
        if self._peer_opened >= self.local_settings.max_streams:
            self._queue(
                OpenFail(
                    stream_id,
                    ErrorCode.REFUSED_STREAM,
                    f"too many streams (limit {self.local_settings.max_streams})",
                )
            )
            self._refused_open()
            return
        problem = wire_host_error(frame.host)
        if problem is not None:
            # Well framed, but no host: refuse this stream only (a peer's
            # slip must not cost the tunnel's other streams).
            self._queue(OpenFail(stream_id, ErrorCode.TARGET_NOT_ALLOWED, f"target host refused: {problem}"))
            self._refused_open()
            return
        self._last_processed_peer_id = stream_id
        self._add_stream(stream_id, StreamState.OPENING_IN, False, frame.host, frame.port)
        events.append(ev.StreamRequested(stream_id, frame.host, frame.port))

    def _on_data(self, record: StreamRecord, frame: Data, events: list[ev.Event]) -> None:
        size = len(frame.data)
        if size or not frame.fin:
            # An empty DATA without FIN is still DATA: only a FIN-only frame
            # is a bare FIN.
            record.state = self._next_state(record, Input.RECV_DATA)
        if size:
            if size > record.recv_window:
                raise _StreamError(
                    ErrorCode.FLOW_CONTROL_ERROR,
                    f"{size} bytes exceed the window of {record.recv_window} on stream {record.stream_id}",
                )
            record.recv_window -= size
            if self.tuning.enabled:
                self._sample(record, size)
            events.append(ev.DataReceived(record.stream_id, frame.data))
        elif not frame.fin:
            # Neither bytes nor FIN: a frame that does nothing (counted
            # only here, off the path of DATA that carries bytes).
            self._spend(EMPTY_DATA)
        if frame.fin:
            record.state = self._next_state(record, Input.RECV_FIN)
            events.append(ev.StreamEnded(record.stream_id))
            if record.state is StreamState.CLOSED:
                self._remove(record)
                events.append(ev.StreamClosed(record.stream_id))

    def _on_stream_control(
        self, record: StreamRecord, frame: OpenOk | OpenFail | WindowUpdate | Reset, events: list[ev.Event]
    ) -> None:
        if isinstance(frame, WindowUpdate):
            record.state = self._next_state(record, Input.RECV_WINDOW_UPDATE)
            if record.send_window + frame.increment > MAX_WINDOW:
                raise _StreamError(ErrorCode.FLOW_CONTROL_ERROR, f"send window of stream {record.stream_id} overflows")
            record.send_window += frame.increment
            events.append(ev.SendWindowAvailable(record.stream_id, record.send_window))
        elif isinstance(frame, OpenOk):
            record.state = self._next_state(record, Input.RECV_OPEN_OK)
            events.append(ev.StreamAccepted(record.stream_id))
            if record.unacked and (record.state, Input.SEND_WINDOW_UPDATE) in TRANSITIONS:
                self._grant(record, record.unacked)  # grow_window() before OPEN_OK
        elif isinstance(frame, OpenFail):
            self._next_state(record, Input.RECV_OPEN_FAIL)
            self._remove(record)
            events.append(ev.StreamRefused(record.stream_id, frame.code, frame.reason))
        else:
            self._remove(record)
            events.append(ev.StreamReset(record.stream_id, frame.code, frame.reason, by_peer=True))

    def _on_goaway(self, frame: GoAway, events: list[ev.Event]) -> None:
        self._goaway_received = True
        fatal = frame.code not in _GRACEFUL
        if fatal:
            self._failed = True
            self._end_all_streams(frame.code, frame.reason, True, events)
        else:
            # Streams we opened that the peer never processed: refused, and
            # safe to retry on another session.
            for record in [r for r in self._streams.values() if r.local and r.stream_id > frame.last_stream_id]:
                self._remove(record)
                events.append(
                    ev.StreamRefused(record.stream_id, ErrorCode.GOING_AWAY, "peer is going away: not processed")
                )
        events.append(ev.GoAwayReceived(frame.last_stream_id, frame.code, frame.reason, fatal))

    def _sample(self, record: StreamRecord, size: int) -> None:
        if self._probe is None:
            self._probe_wait -= size
            if self._probe_wait > 0 or not self._started:
                return
            self._probe_sample = {}
            self._probe_second = False
            self._send_probe()
        sample = self._probe_sample
        if sample is None:
            sample = self._probe_sample = {}
        sample[record.stream_id] = sample.get(record.stream_id, 0) + size

    def _send_probe(self) -> None:
        self._probe = os.urandom(PING_SIZE)
        self._queue(Ping(self._probe))

    def _probe_answered(self) -> None:
        """
        A probe spans two round trips (a second PING goes out when the first
        is answered): a window-limited stream receives its window once per
        round trip, so in two it receives between 1.5 and 2 windows wherever
        the probe started within the sender's bursts, while one that is not
        window-limited receives less. Streams that received at least one
        window in the two round trips grow, unless their reader holds half a
        window unconsumed (then the reader, not the window, is what limits,
        and a larger window would only hold more memory).
        """
        if not self._probe_second:
            self._probe_second = True
            self._send_probe()
            return
        self._probe = None
        grew = False
        tuning = self.tuning
        for stream_id, received in (self._probe_sample or {}).items():
            record = self._streams.get(stream_id)
            if record is None or received < record.window or record.window >= tuning.max_window:
                continue
            held = record.window - record.recv_window - record.unacked
            if held * 2 > record.window:
                continue
            wanted = min(max(record.window, received) * 2, tuning.max_window)
            room = tuning.session_budget - self._window_growth
            wanted = min(wanted, record.window + max(room, 0))
            if wanted > record.window:
                self.grow_window(stream_id, wanted)
                self._learned_window = max(self._learned_window, wanted)
                grew = True
        self._probe_sample = None
        self._probe_gap = tuning.probe_gap if grew else min(self._probe_gap * 2, tuning.probe_gap * 64)
        self._probe_wait = self._probe_gap

    def _stream_error(self, record: StreamRecord, error: _StreamError, events: list[ev.Event]) -> None:
        self._remove(record)
        self._queue(Reset(record.stream_id, error.code, error.reason))
        events.append(ev.StreamReset(record.stream_id, error.code, error.reason, by_peer=False))
        self._owe("RESET")


__all__ = ["MuxSession", "SUPPORTED_VERSIONS", "code_name"]
