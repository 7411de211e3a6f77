"""
Tests for L{rtunnel.mux.session.MuxSession}: the HELLO exchange, stream
life cycles, the stream state table, session rules, GOAWAY and PING, run
through two engines joined by a fake link (L{SessionPair}) or against a
scripted peer that writes raw frames.
"""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.mux import events as ev
from rtunnel.mux.errors import ErrorCode, MuxUsageError, SessionClosing, StreamLimitReached
from rtunnel.mux.frames import (
    HEADER,
    MAX_STREAM_ID,
    Data,
    FrameType,
    GoAway,
    Hello,
    Open,
    OpenFail,
    OpenOk,
    Ping,
    Reset,
    WindowUpdate,
    encode,
)
from rtunnel.mux.session import MuxSession
from rtunnel.mux.settings import KIB, MIB, Settings
from rtunnel.mux.streams import TRANSITIONS, Input, StreamState
from tests import strategies as s
from tests.mux_helpers import (
    SessionPair,
    decode_all,
    feed,
    of_type,
    ready_session,
    received_bytes,
    sent_frames,
    stream_payload,
)

S = StreamState
DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def hello(settings: Settings | None = None, **changes: int) -> Hello:
    p = settings or Settings()
    fields = dict(
        version=p.version,
        max_frame_size=p.max_frame_size,
        initial_window=p.initial_window,
        max_streams=p.max_streams,
    )
    fields.update(changes)
    return Hello(**fields)


def started(initiator: bool = True, settings: Settings | None = None) -> MuxSession:
    """A session that sent its HELLO (taken from the output) and heard nothing yet."""
    session = MuxSession(initiator=initiator, settings=settings)
    session.start()
    session.data_to_send()
    return session


class SessionFailureAssertions:
    def assertSessionFailed(self, session: MuxSession, events: list[ev.Event], code: ErrorCode) -> None:
        """
        C{events} end with L{SessionFailed} for C{code}, the session queued
        exactly one GOAWAY with that code as its last frame, and it ignores
        any further input.
        """
        self.assertIsInstance(events[-1], ev.SessionFailed)
        self.assertEqual(events[-1].code, code)
        self.assertEqual(of_type(events, ev.SessionFailed), [events[-1]])
        frames = sent_frames(session)
        self.assertIsInstance(frames[-1], GoAway)
        self.assertEqual(frames[-1].code, code)
        self.assertEqual(len(of_type(frames, GoAway)), 1)
        self.assertTrue(session.failed)
        self.assertFalse(session.ready)
        self.assertEqual(feed(session, Ping(b"stillok?")), [])
        self.assertEqual(session.data_to_send(), b"")


class HelloTests(SessionFailureAssertions, SynchronousTestCase):
    def test_hello_exchange(self):
        """Both ends send HELLO at once, each becomes ready on the other's
        HELLO and reports the peer's settings and the session version."""
        client_settings = Settings(max_frame_size=32 * KIB, initial_window=128 * KIB, max_streams=10)
        pair = SessionPair(client_settings, Settings(), handshake=False)
        self.assertFalse(pair.client.ready)
        pair.client.start()
        pair.server.start()
        to_server, to_client = pair.client.data_to_send(), pair.server.data_to_send()
        self.assertEqual(decode_all(to_server), [hello(client_settings)])
        self.assertEqual(decode_all(to_client), [hello()])
        self.assertFalse(pair.client.ready or pair.server.ready)
        client_events = pair.client.receive_data(to_client)
        server_events = pair.server.receive_data(to_server)
        self.assertEqual(client_events, [ev.SessionReady(Settings(), 1)])
        self.assertEqual(server_events, [ev.SessionReady(client_settings, 1)])
        self.assertTrue(pair.client.ready and pair.server.ready)
        self.assertTrue(pair.client.accepting_streams and pair.server.accepting_streams)
        self.assertEqual(pair.server.peer_settings, client_settings)
        self.assertEqual((pair.client.version, pair.server.version), (1, 1))

    def test_first_frame_not_hello(self):
        """Any frame other than HELLO as the first frame ends the session with
        PROTOCOL_ERROR."""
        for frame in [Ping(b"12345678"), Open(1, "a", 1), Data(1, b"x"), GoAway(0, 0, ""), OpenOk(2)]:
            session = started(initiator=False)
            self.assertSessionFailed(session, feed(session, frame), ErrorCode.PROTOCOL_ERROR)

    def test_second_hello(self):
        """A second HELLO ends the session with PROTOCOL_ERROR."""
        session = ready_session()
        self.assertSessionFailed(session, feed(session, hello()), ErrorCode.PROTOCOL_ERROR)

    def test_bad_magic(self):
        """A HELLO without the RTMX magic ends the session with PROTOCOL_ERROR."""
        session = started()
        wire = bytearray(encode(hello()))
        wire[10:14] = b"HTTP"
        self.assertSessionFailed(session, session.receive_data(bytes(wire)), ErrorCode.PROTOCOL_ERROR)

    def test_big_first_frame(self):
        """Before the peer's HELLO, a frame above 1,024 bytes is refused at its
        header (FRAME_SIZE_ERROR) without waiting for its payload."""
        session = started()
        events = session.receive_data(HEADER.pack(FrameType.HELLO, 0, 0, 1025))
        self.assertSessionFailed(session, events, ErrorCode.FRAME_SIZE_ERROR)

    def test_settings_out_of_range(self):
        """A HELLO with a setting outside its range ends the session with
        PROTOCOL_ERROR."""
        bad = [
            dict(max_frame_size=16 * KIB - 1),
            dict(max_frame_size=16 * MIB + 1),
            dict(initial_window=KIB - 1),
            dict(initial_window=1024 * MIB + 1),
            dict(max_streams=0),
            dict(max_streams=2**31),
            dict(version=0),
        ]
        for change in bad:
            session = started()
            self.assertSessionFailed(session, feed(session, hello(**change)), ErrorCode.PROTOCOL_ERROR)

    def test_settings_at_range_ends(self):
        """Settings at the ends of their ranges are accepted."""
        good = [
            dict(max_frame_size=16 * KIB),
            dict(max_frame_size=16 * MIB),
            dict(initial_window=KIB),
            dict(initial_window=1024 * MIB),
            dict(max_streams=1),
            dict(max_streams=2**31 - 1),
            dict(version=0xFFFF),
        ]
        for change in good:
            session = started()
            [ready] = feed(session, hello(**change))
            self.assertIsInstance(ready, ev.SessionReady)
            self.assertTrue(session.ready)

    def test_version_negotiation(self):
        """The session runs at the lower of the two versions."""
        pair = SessionPair(Settings(version=7), Settings(version=1))
        self.assertEqual((pair.client.version, pair.server.version), (1, 1))
        self.assertEqual(pair.server.peer_settings.version, 7)
        self.assertEqual(pair.events[pair.client], [ev.SessionReady(Settings(), 1)])

    def test_version_mismatch(self):
        """Ends whose common version is one they do not speak fail with
        VERSION_MISMATCH."""
        pair = SessionPair(Settings(version=3), Settings(version=2), handshake=False)
        pair.client.start()
        pair.server.start()
        to_server, to_client = pair.client.data_to_send(), pair.server.data_to_send()
        self.assertSessionFailed(pair.server, pair.server.receive_data(to_server), ErrorCode.VERSION_MISMATCH)
        self.assertSessionFailed(pair.client, pair.client.receive_data(to_client), ErrorCode.VERSION_MISMATCH)

    def test_start_twice(self):
        """Starting a session twice is a usage error."""
        session = started()
        self.assertRaises(MuxUsageError, session.start)

    def test_receive_before_start(self):
        """Receiving before our own HELLO is queued is a usage error: anything
        we answered would precede our HELLO."""
        session = MuxSession(initiator=True)
        self.assertRaises(MuxUsageError, session.receive_data, encode(hello()))

    def test_open_before_ready(self):
        """Opening a stream before the peer's HELLO arrived is a usage error."""
        session = started()
        self.assertRaises(MuxUsageError, session.open_stream, "example.com", 80)
        self.assertEqual(session.data_to_send(), b"")


class StreamLifeTests(SynchronousTestCase):
    def test_open_accept(self):
        """The target end sees the opener's host and port; its OPEN_OK reaches
        the opener as StreamAccepted and both ends are OPEN."""
        pair = SessionPair()
        sid = pair.client.open_stream("db.internal", 5432)
        self.assertEqual(pair.client.stream_state(sid), S.OPENING_OUT)
        self.assertEqual(pair.send(pair.client), [ev.StreamRequested(sid, "db.internal", 5432)])
        self.assertEqual(pair.server.stream_target(sid), ("db.internal", 5432))
        self.assertEqual(pair.server.stream_state(sid), S.OPENING_IN)
        pair.server.accept_stream(sid)
        self.assertEqual(pair.send(pair.server), [ev.StreamAccepted(sid)])
        self.assertEqual((pair.client.stream_state(sid), pair.server.stream_state(sid)), (S.OPEN, S.OPEN))

    def test_open_refused(self):
        """OPEN_FAIL carries its code and reason to the opener; the stream is
        gone at both ends."""
        pair = SessionPair()
        sid = pair.client.open_stream("10.0.0.1", 22)
        pair.send(pair.client)
        pair.server.refuse_stream(sid, ErrorCode.TARGET_NOT_ALLOWED, "not on the allowlist")
        self.assertEqual(
            pair.send(pair.server),
            [ev.StreamRefused(sid, ErrorCode.TARGET_NOT_ALLOWED, "not on the allowlist")],
        )
        self.assertIsNone(pair.client.stream_state(sid))
        self.assertIsNone(pair.server.stream_state(sid))
        self.assertEqual((pair.client.open_streams, pair.server.open_streams), (0, 0))

    def test_data_both_ways(self):
        """Bytes written at either end arrive in order at the other."""
        pair = SessionPair()
        sid = pair.open(pair.client)
        pair.client.send_data(sid, b"GET / HTTP/1.0\r\n")
        pair.client.send_data(sid, b"\r\n")
        self.assertEqual(received_bytes(pair.send(pair.client), sid), b"GET / HTTP/1.0\r\n\r\n")
        pair.server.send_data(sid, b"HTTP/1.0 200 OK\r\n")
        self.assertEqual(pair.send(pair.server), [ev.DataReceived(sid, b"HTTP/1.0 200 OK\r\n")])

    def test_early_data(self):
        """Data sent right after OPEN reaches the target end before it answers,
        and the stream works normally after OPEN_OK."""
        pair = SessionPair()
        sid = pair.client.open_stream("example.com", 80)
        pair.client.send_data(sid, b"early")
        self.assertEqual(
            pair.send(pair.client),
            [ev.StreamRequested(sid, "example.com", 80), ev.DataReceived(sid, b"early")],
        )
        pair.server.accept_stream(sid)
        pair.server.send_data(sid, b"reply")
        self.assertEqual(pair.send(pair.server), [ev.StreamAccepted(sid), ev.DataReceived(sid, b"reply")])

    def test_fin_before_open_ok(self):
        """A FIN sent before OPEN_OK (early data then end) reaches the target,
        which can still accept, reply and close; the stream ends cleanly."""
        pair = SessionPair()
        sid = pair.client.open_stream("example.com", 7)
        self.assertFalse(pair.client.send_data(sid, b"ping\n", fin=True))
        self.assertEqual(pair.client.stream_state(sid), S.OPENING_OUT_FIN)
        self.assertEqual(
            pair.send(pair.client),
            [ev.StreamRequested(sid, "example.com", 7), ev.DataReceived(sid, b"ping\n"), ev.StreamEnded(sid)],
        )
        self.assertEqual(pair.server.stream_state(sid), S.OPENING_IN_FIN)
        pair.server.accept_stream(sid)
        self.assertEqual(pair.server.stream_state(sid), S.HALF_CLOSED_REMOTE)
        self.assertEqual(pair.send(pair.server), [ev.StreamAccepted(sid)])
        self.assertEqual(pair.client.stream_state(sid), S.HALF_CLOSED_LOCAL)
        self.assertTrue(pair.server.send_data(sid, b"pong\n", fin=True))
        self.assertEqual(
            pair.send(pair.server),
            [ev.DataReceived(sid, b"pong\n"), ev.StreamEnded(sid), ev.StreamClosed(sid)],
        )
        self.assertEqual((pair.client.open_streams, pair.server.open_streams), (0, 0))

    def test_early_data_after_refusal_discarded(self):
        """Early data that arrives after the target refused the stream is
        dropped silently; the session carries on."""
        pair = SessionPair()
        sid = pair.client.open_stream("example.com", 80)
        pair.send(pair.client)
        pair.client.send_data(sid, b"too late", fin=True)
        pair.server.refuse_stream(sid, ErrorCode.TARGET_REFUSED, "connection refused")
        self.assertEqual(pair.send(pair.client), [])
        self.assertEqual(pair.server.data_to_send(), encode(OpenFail(sid, 33, "connection refused")))
        self.assertTrue(pair.server.ready)

    def test_half_close_opener_first(self):
        """After the opener's FIN the target keeps sending; the stream closes
        at the target's FIN."""
        self._half_close(first_fin_by_client=True)

    def test_half_close_target_first(self):
        """After the target's FIN the opener keeps sending; the stream closes
        at the opener's FIN."""
        self._half_close(first_fin_by_client=False)

    def _half_close(self, first_fin_by_client: bool) -> None:
        pair = SessionPair()
        sid = pair.open(pair.client)
        first, second = (pair.client, pair.server) if first_fin_by_client else (pair.server, pair.client)
        self.assertFalse(first.end_stream(sid))
        self.assertEqual(first.stream_state(sid), S.HALF_CLOSED_LOCAL)
        self.assertEqual(pair.send(first), [ev.StreamEnded(sid)])
        self.assertEqual(second.stream_state(sid), S.HALF_CLOSED_REMOTE)
        self.assertRaises(MuxUsageError, first.send_data, sid, b"more")
        for n in range(3):
            second.send_data(sid, b"still %d" % n)
        self.assertEqual(received_bytes(pair.send(second), sid), b"still 0still 1still 2")
        self.assertTrue(second.send_data(sid, b"last", fin=True))
        self.assertIsNone(second.stream_state(sid))
        self.assertEqual(pair.send(second), [ev.DataReceived(sid, b"last"), ev.StreamEnded(sid), ev.StreamClosed(sid)])
        self.assertIsNone(first.stream_state(sid))
        self.assertEqual((pair.client.open_streams, pair.server.open_streams), (0, 0))

    def test_reset_by_opener(self):
        """A RESET from the opener reaches the target with its code and reason."""
        pair = SessionPair()
        sid = pair.open(pair.client)
        pair.client.reset_stream(sid, ErrorCode.CANCEL, "user gave up")
        self.assertIsNone(pair.client.stream_state(sid))
        self.assertEqual(pair.send(pair.client), [ev.StreamReset(sid, ErrorCode.CANCEL, "user gave up", True)])
        self.assertIsNone(pair.server.stream_state(sid))

    def test_reset_by_target(self):
        """A RESET from the target reaches the opener with its code and reason,
        also before OPEN_OK."""
        pair = SessionPair()
        sid = pair.client.open_stream("example.com", 80)
        pair.send(pair.client)
        pair.server.reset_stream(sid, ErrorCode.CONNECTION_RESET, "target reset")
        self.assertEqual(
            pair.send(pair.server), [ev.StreamReset(sid, ErrorCode.CONNECTION_RESET, "target reset", True)]
        )
        self.assertEqual((pair.client.open_streams, pair.server.open_streams), (0, 0))

    def test_frames_crossing_reset_ignored(self):
        """Data, FIN and WINDOW_UPDATE the peer sent before it saw our RESET
        are ignored: no events, no answer, the session continues."""
        pair = SessionPair()
        sid = pair.open(pair.client)
        other = pair.open(pair.client)
        pair.client.send_data(sid, b"x" * 200_000)
        pair.send(pair.client)
        pair.server.consumed(sid, 200_000)
        pair.server.send_data(sid, b"in flight", fin=True)
        pair.client.reset_stream(sid, ErrorCode.CANCEL, "")
        self.assertEqual(pair.send(pair.server), [])
        self.assertEqual(pair.client.data_to_send(), encode(Reset(sid, ErrorCode.CANCEL, "")))
        pair.server.send_data(other, b"alive")
        self.assertEqual(pair.send(pair.server), [ev.DataReceived(other, b"alive")])

    def test_resets_cross(self):
        """When both ends reset a stream at once each sees only the peer's
        RESET being ignored, and the session continues."""
        pair = SessionPair()
        sid = pair.open(pair.server)
        pair.client.reset_stream(sid, ErrorCode.CANCEL, "a")
        pair.server.reset_stream(sid, ErrorCode.CANCEL, "b")
        client_events, server_events = pair.pump()
        self.assertEqual((client_events, server_events), ([], []))
        self.assertTrue(pair.client.ready and pair.server.ready)

    def test_reset_unknown_stream_noop(self):
        """Resetting a stream that is already gone queues nothing."""
        pair = SessionPair()
        sid = pair.open(pair.client)
        pair.send(pair.client)
        pair.server.reset_stream(sid, ErrorCode.CANCEL, "")
        pair.send(pair.server)
        pair.client.reset_stream(sid, ErrorCode.CANCEL, "")
        self.assertEqual(pair.client.data_to_send(), b"")

    def test_closed_stream_frames_ignored(self):
        """Any stream frame for a stream that has closed is ignored."""
        pair = SessionPair()
        sid = pair.open(pair.client)
        pair.client.end_stream(sid)
        pair.server.end_stream(sid)
        pair.pump()
        self.assertEqual(pair.client.open_streams, 0)
        frames = [
            Data(sid, b"x"),
            Data(sid, b"", True),
            OpenOk(sid),
            OpenFail(sid, 1, ""),
            WindowUpdate(sid, 5),
            Reset(sid, 1, ""),
        ]
        self.assertEqual(feed(pair.client, *frames), [])
        self.assertEqual(pair.client.data_to_send(), b"")
        self.assertTrue(pair.client.ready)

    def test_empty_data_is_data(self):
        """An empty DATA frame without FIN counts as DATA for the state table:
        after the peer's FIN it resets the stream; while DATA is allowed it
        is accepted and reports nothing."""
        session = ready_session(initiator=False)
        feed(session, Open(1, "a", 1), Open(3, "a", 1), Data(1, b"", True))
        self.assertEqual(session.stream_state(1), S.OPENING_IN_FIN)
        [reset] = feed(session, Data(1, b""))
        self.assertEqual(reset, ev.StreamReset(1, ErrorCode.STREAM_STATE_ERROR, reset.reason, False))
        self.assertEqual(feed(session, Data(3, b"")), [])
        self.assertEqual(session.stream_state(3), S.OPENING_IN)

    def test_bad_targets_refused(self):
        """open_stream refuses hosts that are not DNS names or IP literals and
        ports outside 1-65535, queueing nothing."""
        session = ready_session()
        for host, port in [("", 80), ("a b", 80), ("é.com", 80), ("x" * 256, 80), ("ok", 0), ("ok", 65536)]:
            self.assertRaises(MuxUsageError, session.open_stream, host, port)
        self.assertEqual(session.data_to_send(), b"")
        self.assertEqual(session.open_stream("fe80::1%eth0", 65535), 1)

    def test_codes_out_of_range(self):
        """OPEN_FAIL, RESET and GOAWAY codes must fit in 16 bits; a bad code is
        a usage error that leaves the stream and the output untouched."""
        session = ready_session()
        feed(session, Open(2, "h", 1))
        self.assertRaises(MuxUsageError, session.refuse_stream, 2, 0x10000, "")
        self.assertRaises(MuxUsageError, session.reset_stream, 2, -1, "")
        self.assertRaises(MuxUsageError, session.go_away, 0x10000, "")
        self.assertEqual(session.stream_state(2), S.OPENING_IN)
        self.assertEqual(session.data_to_send(), b"")
        self.assertFalse(session.goaway_sent)


class StreamIdTests(SessionFailureAssertions, SynchronousTestCase):
    def test_parity_and_order(self):
        """The initiator opens odd ids, the acceptor even ids, each strictly
        increasing and never reused."""
        pair = SessionPair()
        client_ids = [pair.client.open_stream("a", 1) for _ in range(4)]
        server_ids = [pair.server.open_stream("a", 1) for _ in range(4)]
        self.assertEqual(client_ids, [1, 3, 5, 7])
        self.assertEqual(server_ids, [2, 4, 6, 8])
        for sid in client_ids:
            pair.client.reset_stream(sid, ErrorCode.CANCEL, "")
        self.assertEqual(pair.client.open_stream("a", 1), 9)

    def test_simultaneous_opens(self):
        """Both ends opening streams at the same moment get distinct ids; all
        streams work."""
        pair = SessionPair()
        a = pair.client.open_stream("a", 1)
        b = pair.server.open_stream("b", 2)
        pair.client.send_data(a, b"from client")
        pair.server.send_data(b, b"from server")
        client_events, server_events = pair.pump()
        self.assertEqual(client_events, [ev.StreamRequested(b, "b", 2), ev.DataReceived(b, b"from server")])
        self.assertEqual(server_events, [ev.StreamRequested(a, "a", 1), ev.DataReceived(a, b"from client")])
        pair.client.accept_stream(b)
        pair.server.accept_stream(a)
        client_events, server_events = pair.pump()
        self.assertEqual((client_events, server_events), ([ev.StreamAccepted(a)], [ev.StreamAccepted(b)]))

    def test_open_wrong_parity(self):
        """An OPEN with an id of the receiver's parity ends the session."""
        session = ready_session(initiator=False)
        self.assertSessionFailed(session, feed(session, Open(2, "a", 1)), ErrorCode.PROTOCOL_ERROR)

    def test_open_not_increasing(self):
        """An OPEN whose id does not exceed every earlier one of the peer ends
        the session, also when that earlier stream is closed."""
        session = ready_session(initiator=False)
        feed(session, Open(5, "a", 1))
        session.refuse_stream(5, ErrorCode.TARGET_REFUSED, "")
        self.assertSessionFailed(session, feed(session, Open(3, "a", 1)), ErrorCode.PROTOCOL_ERROR)
        session = ready_session(initiator=False)
        feed(session, Open(5, "a", 1))
        self.assertSessionFailed(session, feed(session, Open(5, "a", 1)), ErrorCode.PROTOCOL_ERROR)

    def test_open_skipping_ids(self):
        """Peer ids may skip values; the skipped ids count as closed."""
        session = ready_session(initiator=False)
        self.assertEqual(feed(session, Open(7, "a", 1)), [ev.StreamRequested(7, "a", 1)])
        self.assertEqual(feed(session, Data(3, b"x"), Reset(5, 0, "")), [])
        self.assertTrue(session.ready)

    def test_idle_streams(self):
        """Every stream frame naming an idle stream (a peer id above any it
        opened, or one of our ids we never used) ends the session with
        PROTOCOL_ERROR."""
        kinds = [
            lambda i: Data(i, b"x"),
            lambda i: Data(i, b"", True),
            lambda i: OpenOk(i),
            lambda i: OpenFail(i, 1, ""),
            lambda i: WindowUpdate(i, 1),
            lambda i: Reset(i, 1, ""),
        ]
        for make in kinds:
            for idle in (4, 3):  # peer parity above the highest seen; own parity never opened
                session = ready_session(initiator=True)
                feed(session, Open(2, "a", 1))
                session.open_stream("a", 1)
                session.data_to_send()
                self.assertSessionFailed(session, feed(session, make(idle)), ErrorCode.PROTOCOL_ERROR)

    def test_ids_exhausted(self):
        """An end that runs out of stream ids sends GOAWAY and opens no more
        streams."""
        session = ready_session(initiator=True)
        session._next_local_id = MAX_STREAM_ID  # skip 2^30 opens
        self.assertEqual(session.open_stream("a", 1), MAX_STREAM_ID)
        session.data_to_send()
        self.assertRaises(SessionClosing, session.open_stream, "a", 1)
        [goaway] = sent_frames(session)
        self.assertIsInstance(goaway, GoAway)
        self.assertEqual(goaway.code, ErrorCode.NO_ERROR)
        self.assertEqual(session.stream_state(MAX_STREAM_ID), S.OPENING_OUT)


class StreamLimitTests(SynchronousTestCase):
    def test_open_beyond_limit_refused(self):
        """An OPEN beyond our max_streams is answered OPEN_FAIL REFUSED_STREAM;
        its early data is ignored, the session and live streams continue, and
        a freed slot can be used again."""
        session = ready_session(initiator=False, settings=Settings(max_streams=2))
        self.assertEqual(len(feed(session, Open(1, "a", 1), Open(3, "a", 1))), 2)
        events = feed(session, Open(5, "a", 1), Data(5, b"early", fin=True))
        self.assertEqual(events, [])
        [refusal] = sent_frames(session)
        self.assertIsInstance(refusal, OpenFail)
        self.assertEqual((refusal.stream_id, refusal.code), (5, ErrorCode.REFUSED_STREAM))
        self.assertEqual(feed(session, Data(1, b"ok")), [ev.DataReceived(1, b"ok")])
        session.refuse_stream(3, ErrorCode.TARGET_REFUSED, "")
        self.assertEqual(feed(session, Open(7, "a", 1)), [ev.StreamRequested(7, "a", 1)])
        self.assertTrue(session.ready)

    def test_open_naming_no_host_refused_for_that_stream_only(self):
        """An OPEN whose host is made of the wire's characters but is no host
        (an empty label, a malformed IPv4 or IPv6) is answered OPEN_FAIL
        TARGET_NOT_ALLOWED naming the fault; the session and its other
        streams go on."""
        session = ready_session(initiator=False)
        self.assertEqual(feed(session, Open(1, "a", 1)), [ev.StreamRequested(1, "a", 1)])
        for stream_id, host, fault in ((3, "a..b", "empty label"), (5, "999.1.1.1", "999"), (7, "1::x", "1::x")):
            self.assertEqual(feed(session, Open(stream_id, host, 80), Data(stream_id, b"early")), [])
            [refusal] = sent_frames(session)
            self.assertIsInstance(refusal, OpenFail)
            self.assertEqual((refusal.stream_id, refusal.code), (stream_id, ErrorCode.TARGET_NOT_ALLOWED))
            self.assertIn(fault, refusal.reason)
        self.assertEqual(feed(session, Data(1, b"ok")), [ev.DataReceived(1, b"ok")])
        self.assertEqual(feed(session, Open(9, "b", 2)), [ev.StreamRequested(9, "b", 2)])
        self.assertTrue(session.ready)

    def test_open_stream_beyond_peer_limit(self):
        """open_stream beyond the peer's max_streams raises StreamLimitReached
        without queueing anything; a stream closing frees a slot."""
        pair = SessionPair(server_settings=Settings(max_streams=3))
        ids = [pair.client.open_stream("a", 1) for _ in range(3)]
        pair.client.data_to_send()
        self.assertRaises(StreamLimitReached, pair.client.open_stream, "a", 1)
        self.assertEqual(pair.client.data_to_send(), b"")
        self.assertEqual(pair.client.local_streams, 3)
        pair.client.reset_stream(ids[0], ErrorCode.CANCEL, "")
        self.assertEqual(pair.client.open_stream("a", 1), 7)

    def test_limit_counts_only_peer_streams(self):
        """max_streams limits the streams the peer opened; our own do not count."""
        pair = SessionPair(Settings(max_streams=1), Settings(max_streams=1))
        a = pair.client.open_stream("a", 1)
        b = pair.server.open_stream("b", 1)
        client_events, server_events = pair.pump()
        self.assertEqual(client_events, [ev.StreamRequested(b, "b", 1)])
        self.assertEqual(server_events, [ev.StreamRequested(a, "a", 1)])


class PingTests(SynchronousTestCase):
    def test_ping_pong(self):
        """A PING is answered at once with the same bytes; the pinger sees a
        PongReceived, the pinged end a PingReceived."""
        pair = SessionPair()
        opaque = pair.client.ping(b"\x00\x01\x02\x03\x04\x05\x06\x07")
        self.assertEqual(pair.send(pair.client), [ev.PingReceived(opaque)])
        self.assertEqual(pair.send(pair.server), [ev.PongReceived(opaque)])

    def test_random_opaque(self):
        """ping() without bytes picks 8 random ones and returns them."""
        pair = SessionPair()
        opaque = pair.server.ping()
        self.assertEqual(len(opaque), 8)
        pair.send(pair.server)
        self.assertEqual(pair.send(pair.client), [ev.PongReceived(opaque)])

    def test_unsolicited_pong_ignored(self):
        """A PING+ACK that answers none of our PINGs is ignored, as is a second
        answer to the same PING."""
        session = ready_session()
        self.assertEqual(feed(session, Ping(b"nobody??", ack=True)), [])
        session.ping(b"asked-me")
        self.assertEqual(feed(session, Ping(b"asked-me", ack=True)), [ev.PongReceived(b"asked-me")])
        self.assertEqual(feed(session, Ping(b"asked-me", ack=True)), [])
        self.assertTrue(session.ready)

    def test_same_opaque_twice(self):
        """Two PINGs with the same bytes may each be answered once."""
        session = ready_session()
        session.ping(b"samesame")
        session.ping(b"samesame")
        answers = [feed(session, Ping(b"samesame", ack=True)) for _ in range(3)]
        self.assertEqual(answers, [[ev.PongReceived(b"samesame")]] * 2 + [[]])

    def test_unanswered_pings_bounded(self):
        """Only the latest 64 unanswered PINGs are remembered: an answer to an
        older one is ignored, one to a recent one is reported."""
        session = ready_session()
        for n in range(65):
            session.ping(n.to_bytes(8, "big"))
        self.assertEqual(feed(session, Ping((0).to_bytes(8, "big"), ack=True)), [])
        self.assertEqual(
            feed(session, Ping((1).to_bytes(8, "big"), ack=True)), [ev.PongReceived((1).to_bytes(8, "big"))]
        )

    def test_ping_size(self):
        """A PING carries exactly 8 bytes; anything else is a usage error."""
        session = ready_session()
        self.assertRaises(MuxUsageError, session.ping, b"short")

    def test_ping_needs_start(self):
        """Pinging before our HELLO is queued is a usage error."""
        self.assertRaises(MuxUsageError, MuxSession(initiator=True).ping)


class GoAwayTests(SynchronousTestCase):
    def test_graceful_drain(self):
        """After a graceful GOAWAY no new streams open (from either end), while
        streams already open run to completion."""
        pair = SessionPair()
        sid = pair.open(pair.client)
        pair.server.go_away(ErrorCode.GOING_AWAY, "maintenance")
        self.assertFalse(pair.server.accepting_streams)
        self.assertEqual(pair.send(pair.server), [ev.GoAwayReceived(sid, ErrorCode.GOING_AWAY, "maintenance", False)])
        self.assertTrue(pair.client.goaway_received)
        self.assertFalse(pair.client.accepting_streams)
        self.assertRaises(SessionClosing, pair.client.open_stream, "a", 1)
        self.assertRaises(SessionClosing, pair.server.open_stream, "a", 1)
        pair.client.send_data(sid, b"finish", fin=True)
        pair.server.send_data(sid, b"done", fin=True)
        client_events, server_events = pair.pump()
        self.assertEqual(client_events, [ev.DataReceived(sid, b"done"), ev.StreamEnded(sid), ev.StreamClosed(sid)])
        self.assertEqual(server_events, [ev.DataReceived(sid, b"finish"), ev.StreamEnded(sid), ev.StreamClosed(sid)])
        self.assertFalse(pair.client.failed or pair.server.failed)

    def test_unprocessed_streams_refused(self):
        """Streams opened above the GOAWAY's last_stream_id (crossing it on the
        wire) are reported refused with GOING_AWAY; the sender answers their
        OPENs with OPEN_FAIL GOING_AWAY, which the opener ignores."""
        pair = SessionPair()
        kept = pair.open(pair.client)
        pair.server.go_away(ErrorCode.NO_ERROR, "")
        crossing = pair.client.open_stream("a", 1)
        pair.client.send_data(crossing, b"early")
        client_events = pair.send(pair.server)
        self.assertEqual(client_events[0], ev.StreamRefused(crossing, ErrorCode.GOING_AWAY, client_events[0].reason))
        self.assertEqual(client_events[1:], [ev.GoAwayReceived(kept, ErrorCode.NO_ERROR, "", False)])
        self.assertEqual(pair.send(pair.client), [])
        [refusal] = decode_all(pair.server.data_to_send())
        self.assertEqual((refusal.stream_id, refusal.code), (crossing, ErrorCode.GOING_AWAY))
        self.assertEqual(feed(pair.client, refusal), [])
        self.assertEqual(pair.client.stream_state(kept), S.OPEN)

    def test_one_goaway_of_each_kind(self):
        """An end sends at most one graceful and one fatal GOAWAY."""
        session = ready_session()
        session.go_away(ErrorCode.NO_ERROR, "a")
        session.go_away(ErrorCode.GOING_AWAY, "b")
        session.go_away(ErrorCode.INTERNAL_ERROR, "c")
        session.go_away(ErrorCode.PROTOCOL_ERROR, "d")
        self.assertEqual(
            sent_frames(session), [GoAway(0, ErrorCode.NO_ERROR, "a"), GoAway(0, ErrorCode.INTERNAL_ERROR, "c")]
        )

    def test_last_stream_id(self):
        """GOAWAY names the highest peer stream processed, not ones refused."""
        session = ready_session(initiator=False, settings=Settings(max_streams=1))
        feed(session, Open(1, "a", 1), Open(3, "a", 1))
        session.data_to_send()
        session.go_away()
        self.assertEqual(sent_frames(session), [GoAway(1, ErrorCode.NO_ERROR, "")])

    def test_fatal_goaway(self):
        """A fatal GOAWAY resets every stream with its code, fails the session
        at both ends, and the receiver processes no more input."""
        pair = SessionPair()
        a = pair.open(pair.client)
        b = pair.open(pair.server)
        pair.server.go_away(ErrorCode.NOT_AUTHORIZED, "revoked")
        self.assertTrue(pair.server.failed)
        events = pair.send(pair.server)
        self.assertEqual(
            sorted(of_type(events, ev.StreamReset), key=lambda e: e.stream_id),
            [
                ev.StreamReset(a, ErrorCode.NOT_AUTHORIZED, "revoked", True),
                ev.StreamReset(b, ErrorCode.NOT_AUTHORIZED, "revoked", True),
            ],
        )
        self.assertEqual(events[-1], ev.GoAwayReceived(a, ErrorCode.NOT_AUTHORIZED, "revoked", True))
        self.assertTrue(pair.client.failed)
        self.assertEqual(pair.client.open_streams, 0)
        self.assertRaises(SessionClosing, pair.client.open_stream, "a", 1)
        self.assertEqual(feed(pair.client, Ping(b"anyone??")), [])
        self.assertEqual(pair.server.receive_data(encode(Ping(b"anyone??"))), [])

    def test_open_after_goaway_sent(self):
        """An OPEN arriving after we sent GOAWAY gets OPEN_FAIL GOING_AWAY."""
        session = ready_session(initiator=False)
        session.go_away(ErrorCode.GOING_AWAY, "")
        session.data_to_send()
        self.assertEqual(feed(session, Open(1, "a", 1)), [])
        [refusal] = sent_frames(session)
        self.assertEqual((refusal.stream_id, refusal.code), (1, ErrorCode.GOING_AWAY))


class SessionFailureTests(SessionFailureAssertions, SynchronousTestCase):
    def test_failure_resets_streams(self):
        """A session error reports every live stream reset with its code
        before SessionFailed, and leaves no stream behind."""
        session = ready_session(initiator=False)
        feed(session, Open(1, "a", 1), Open(3, "a", 1))
        session.accept_stream(1)
        events = feed(session, Data(1, b"before"), Open(1, "a", 1))
        self.assertEqual(events[0], ev.DataReceived(1, b"before"))
        resets = of_type(events, ev.StreamReset)
        self.assertEqual(sorted(r.stream_id for r in resets), [1, 3])
        self.assertTrue(all(r.code == ErrorCode.PROTOCOL_ERROR and not r.by_peer for r in resets))
        self.assertSessionFailed(session, events, ErrorCode.PROTOCOL_ERROR)
        self.assertEqual((session.open_streams, session.local_streams), (0, 0))

    def test_over_long_frame_at_header(self):
        """A frame longer than our max_frame_size fails the session as soon as
        its header arrives."""
        session = ready_session(settings=Settings(max_frame_size=16 * KIB))
        events = session.receive_data(HEADER.pack(FrameType.DATA, 0, 2, 16 * KIB + 1))
        self.assertSessionFailed(session, events, ErrorCode.FRAME_SIZE_ERROR)

    @settings(max_examples=250, deadline=None)
    @given(s.garbage, st.data())
    def test_hostile_bytes(self, blob, data):
        """Arbitrary bytes, cut anywhere, into a ready session never raise: the
        only failure is one SessionFailed with a defined code, last, after
        which nothing more is processed; stream errors use defined codes."""
        session = ready_session(initiator=False, settings=Settings(max_frame_size=16 * KIB, max_streams=4))
        events = []
        for chunk in data.draw(s.chunked(blob)):
            events += session.receive_data(chunk)
        failures = of_type(events, ev.SessionFailed)
        for event in events:
            self.assertIsInstance(event, ev.Event.__args__)
            if isinstance(event, (ev.SessionFailed,)) or (isinstance(event, ev.StreamReset) and not event.by_peer):
                self.assertIsInstance(event.code, ErrorCode)
        fatal = [e for e in events if isinstance(e, ev.GoAwayReceived) and e.fatal]
        if failures or fatal:
            self.assertEqual(failures + fatal, [events[-1]])
            self.assertTrue(session.failed)
            self.assertEqual(session.open_streams, 0)
            self.assertEqual(session.receive_data(encode(Ping(b"12345678"))), [])
        else:
            self.assertTrue(session.ready)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(s.session_frames, max_size=10), st.data())
    def test_chunking_does_not_matter(self, frames, data):
        """Whatever the frames, a session reports the same events and output
        however the bytes are cut."""
        wire = b"".join(map(encode, frames))
        whole = ready_session(initiator=False)
        whole_events = whole.receive_data(wire)
        cut = ready_session(initiator=False)
        cut_events = []
        for chunk in data.draw(s.chunked(wire)):
            cut_events += cut.receive_data(chunk)
        self.assertEqual(cut_events, whole_events)
        self.assertEqual(cut.data_to_send(), whole.data_to_send())


def _scenario(pair: SessionPair) -> None:
    """A little of everything, through both ends."""
    a = pair.client.open_stream("example.com", 443)
    pair.client.send_data(a, stream_payload(1, 40_000))
    b = pair.server.open_stream("10.1.2.3", 22)
    pair.pump()
    pair.server.accept_stream(a)
    pair.client.refuse_stream(b, ErrorCode.TARGET_NOT_ALLOWED, "no")
    pair.server.consumed(a, 40_000)
    pair.server.send_data(a, b"reply", fin=True)
    pair.client.ping(b"pingpong")
    c = pair.client.open_stream("c", 1)
    pair.pump()
    pair.client.reset_stream(c, ErrorCode.CANCEL, "bye")
    pair.client.send_data(a, stream_payload(2, 30_000), fin=True)
    pair.server.go_away(ErrorCode.GOING_AWAY, "drain")
    pair.pump()


class DeliveryTests(SynchronousTestCase):
    def test_byte_at_a_time(self):
        """Delivering every byte separately gives exactly the events of
        whole-chunk delivery, at both ends."""
        small = Settings(max_frame_size=16 * KIB, initial_window=64 * KIB)
        whole = SessionPair(small, small)
        _scenario(whole)
        single = SessionPair(small, small, byte_at_a_time=True)
        _scenario(single)
        self.assertEqual(single.events[single.client], whole.events[whole.client])
        self.assertEqual(single.events[single.server], whole.events[whole.server])
        self.assertIn(ev.GoAwayReceived(3, ErrorCode.GOING_AWAY, "drain", False), whole.events[whole.client])
        self.assertGreater(len(whole.events[whole.server]), 8)

    def test_thousand_streams(self):
        """1,000 concurrent streams, opened from both ends and interleaved,
        each carry their own bytes both ways intact."""
        pair = SessionPair()
        sizes = {}
        ids = []
        for n in range(1000):
            opener = pair.client if n % 5 else pair.server
            sid = opener.open_stream(f"host-{n}", 1 + n)
            ids.append(sid)
            sizes[sid] = 1000 + (n * 37) % 3000
        client_events, server_events = pair.pump()
        for end, events in ((pair.client, client_events), (pair.server, server_events)):
            for request in of_type(events, ev.StreamRequested):
                end.accept_stream(request.stream_id)
        pair.pump()
        self.assertEqual(pair.client.open_streams, 1000)
        self.assertEqual(pair.server.open_streams, 1000)
        payloads = {
            (end, sid): stream_payload(sid if end is pair.client else -sid, sizes[sid])
            for sid in ids
            for end in pair.ends
        }
        # Interleave: every round moves one slice of every stream each way.
        for start in range(0, max(sizes.values()), 500):
            for sid in ids:
                if start < sizes[sid]:
                    for end in pair.ends:
                        piece = payloads[end, sid][start : start + 500]
                        end.send_data(sid, piece, fin=start + 500 >= sizes[sid])
            pair.pump()
        got_server = {sid: received_bytes(pair.events[pair.server], sid) for sid in ids}
        got_client = {sid: received_bytes(pair.events[pair.client], sid) for sid in ids}
        for sid in ids:
            self.assertEqual(got_server[sid], payloads[pair.client, sid])
            self.assertEqual(got_client[sid], payloads[pair.server, sid])
        # Both FINs crossed, so each end saw the stream close.
        for end in pair.ends:
            closed = {e.stream_id for e in of_type(pair.events[end], ev.StreamClosed)}
            self.assertEqual(closed, set(ids))
        self.assertEqual((pair.client.open_streams, pair.server.open_streams), (0, 0))


# -- the stream state table ---------------------------------------------------

#: How each state is reached: (state, opened by us?) -> steps on a session
#: (an initiator, so our ids are odd) talking to a scripted peer.
LOCAL, REMOTE = "opened by us", "opened by the peer"
SETUPS = {
    (S.OPENING_OUT, LOCAL): ["open"],
    (S.OPENING_OUT_FIN, LOCAL): ["open", "fin"],
    (S.OPENING_IN, REMOTE): ["peer open"],
    (S.OPENING_IN_FIN, REMOTE): ["peer open", "peer fin"],
    (S.OPEN, LOCAL): ["open", "peer ok"],
    (S.OPEN, REMOTE): ["peer open", "accept"],
    (S.HALF_CLOSED_LOCAL, LOCAL): ["open", "peer ok", "fin"],
    (S.HALF_CLOSED_LOCAL, REMOTE): ["peer open", "accept", "fin"],
    (S.HALF_CLOSED_REMOTE, LOCAL): ["open", "peer ok", "peer fin"],
    (S.HALF_CLOSED_REMOTE, REMOTE): ["peer open", "peer fin", "accept"],
}
BYSTANDER = 2  # a stream the peer opened and we accepted, in OPEN throughout
SUBJECT = {LOCAL: 1, REMOTE: 4}


def in_state(state: StreamState, origin: str) -> tuple[MuxSession, int]:
    """A ready session with a stream C{sid} in C{state}, and a bystander stream."""
    session = ready_session(initiator=True)
    feed(session, Open(BYSTANDER, "bystander", 1))
    session.accept_stream(BYSTANDER)
    sid = SUBJECT[origin]
    for step in SETUPS[state, origin]:
        if step == "open":
            assert session.open_stream("subject", 2) == sid
        elif step == "fin":
            session.end_stream(sid)
        elif step == "accept":
            session.accept_stream(sid)
        else:
            frame = {"peer open": Open(sid, "subject", 2), "peer ok": OpenOk(sid), "peer fin": Data(sid, b"", True)}[
                step
            ]
            feed(session, frame)
    assert session.stream_state(sid) is state, (session.stream_state(sid), state)
    session.data_to_send()
    return session, sid


RECV_FRAMES = {
    Input.RECV_OPEN_OK: lambda sid: OpenOk(sid),
    Input.RECV_OPEN_FAIL: lambda sid: OpenFail(sid, ErrorCode.TARGET_REFUSED, "refused"),
    Input.RECV_DATA: lambda sid: Data(sid, b"x"),
    Input.RECV_FIN: lambda sid: Data(sid, b"", True),
    Input.RECV_WINDOW_UPDATE: lambda sid: WindowUpdate(sid, 1),
    Input.RECV_RESET: lambda sid: Reset(sid, ErrorCode.CANCEL, "bye"),
}


def expected_recv_events(inp: Input, sid: int, session: MuxSession, closes: bool) -> list[ev.Event]:
    if inp is Input.RECV_OPEN_OK:
        return [ev.StreamAccepted(sid)]
    if inp is Input.RECV_OPEN_FAIL:
        return [ev.StreamRefused(sid, ErrorCode.TARGET_REFUSED, "refused")]
    if inp is Input.RECV_DATA:
        return [ev.DataReceived(sid, b"x")]
    if inp is Input.RECV_FIN:
        return [ev.StreamEnded(sid)] + ([ev.StreamClosed(sid)] if closes else [])
    if inp is Input.RECV_WINDOW_UPDATE:
        return [ev.SendWindowAvailable(sid, session.send_window(sid) + 1)]
    return [ev.StreamReset(sid, ErrorCode.CANCEL, "bye", True)]


def _send(session: MuxSession, sid: int, inp: Input) -> object:
    if inp is Input.SEND_OPEN_OK:
        return session.accept_stream(sid)
    if inp is Input.SEND_OPEN_FAIL:
        return session.refuse_stream(sid, ErrorCode.TARGET_REFUSED, "no")
    if inp is Input.SEND_DATA:
        return session.send_data(sid, b"y")
    if inp is Input.SEND_FIN:
        return session.end_stream(sid)
    if inp is Input.SEND_RESET:
        return session.reset_stream(sid, ErrorCode.CANCEL, "bye")
    return session.grow_window(sid, session.local_settings.initial_window * 2)


SENT_FRAMES = {
    Input.SEND_OPEN_OK: lambda sid: [OpenOk(sid)],
    Input.SEND_OPEN_FAIL: lambda sid: [OpenFail(sid, ErrorCode.TARGET_REFUSED, "no")],
    Input.SEND_DATA: lambda sid: [Data(sid, b"y")],
    Input.SEND_FIN: lambda sid: [Data(sid, b"", True)],
    Input.SEND_RESET: lambda sid: [Reset(sid, ErrorCode.CANCEL, "bye")],
    Input.SEND_WINDOW_UPDATE: lambda sid: [WindowUpdate(sid, Settings().initial_window)],
}


class StreamTableTests(SynchronousTestCase):
    """
    One test per (state, input) pair of the stream table, for each way a
    state can be reached; the methods are generated below.
    """

    def assertBystanderFine(self, session: MuxSession) -> None:
        self.assertTrue(session.ready)
        self.assertEqual(session.stream_state(BYSTANDER), S.OPEN)
        self.assertEqual(feed(session, Data(BYSTANDER, b"b")), [ev.DataReceived(BYSTANDER, b"b")])
        session.send_data(BYSTANDER, b"c")
        self.assertEqual(sent_frames(session), [Data(BYSTANDER, b"c")])

    def check_recv(self, state: StreamState, origin: str, inp: Input) -> None:
        session, sid = in_state(state, origin)
        nxt = TRANSITIONS.get((state, inp))
        if nxt is not None:
            want = expected_recv_events(inp, sid, session, nxt is S.CLOSED)
            self.assertEqual(feed(session, RECV_FRAMES[inp](sid)), want)
            self.assertEqual(session.stream_state(sid), None if nxt is S.CLOSED else nxt)
            self.assertEqual(session.data_to_send(), b"")
        else:
            [reset] = feed(session, RECV_FRAMES[inp](sid))
            self.assertEqual(reset, ev.StreamReset(sid, ErrorCode.STREAM_STATE_ERROR, reset.reason, False))
            self.assertIsNone(session.stream_state(sid))
            self.assertEqual(sent_frames(session), [Reset(sid, ErrorCode.STREAM_STATE_ERROR, reset.reason)])
        self.assertBystanderFine(session)

    def check_send(self, state: StreamState, origin: str, inp: Input) -> None:
        session, sid = in_state(state, origin)
        nxt = TRANSITIONS.get((state, inp))
        if nxt is not None:
            result = _send(session, sid, inp)
            self.assertEqual(sent_frames(session), SENT_FRAMES[inp](sid))
            self.assertEqual(session.stream_state(sid), None if nxt is S.CLOSED else nxt)
            if inp is Input.SEND_FIN:
                self.assertEqual(result, nxt is S.CLOSED)
        elif inp is Input.SEND_WINDOW_UPDATE:
            # Credit is not a command of its own: it waits until allowed.
            _send(session, sid, inp)
            self.assertEqual(session.data_to_send(), b"")
            self.assertEqual(session.stream_state(sid), state)
        else:
            self.assertRaises(MuxUsageError, _send, session, sid, inp)
            self.assertEqual(session.data_to_send(), b"")
            self.assertEqual(session.stream_state(sid), state)
        self.assertBystanderFine(session)

    def test_closed_stream(self):
        """On a closed stream every received frame is ignored, every send
        command raises MuxUsageError, and a reset does nothing."""
        session, sid = in_state(S.OPEN, LOCAL)
        session.reset_stream(sid, ErrorCode.CANCEL, "")
        session.data_to_send()
        for make in RECV_FRAMES.values():
            self.assertEqual(feed(session, make(sid)), [])
        for inp in (Input.SEND_OPEN_OK, Input.SEND_OPEN_FAIL, Input.SEND_DATA, Input.SEND_FIN):
            self.assertRaises(MuxUsageError, _send, session, sid, inp)
        _send(session, sid, Input.SEND_RESET)
        _send(session, sid, Input.SEND_WINDOW_UPDATE)
        session.consumed(sid, 10)
        self.assertEqual(session.data_to_send(), b"")
        self.assertBystanderFine(session)

    def test_table_matches_docs(self):
        """The transition table in docs/protocol.md is exactly the one the code
        enforces."""
        self.assertEqual(_docs_transitions(), TRANSITIONS)

    def test_table_complete(self):
        """Every live state has SEND_RESET and RECV_RESET to CLOSED, CLOSED has
        no transitions, and the SETUPS cover every live state."""
        live = [state for state in StreamState if state is not S.CLOSED]
        for state in live:
            self.assertEqual(TRANSITIONS[state, Input.SEND_RESET], S.CLOSED)
            self.assertEqual(TRANSITIONS[state, Input.RECV_RESET], S.CLOSED)
        self.assertEqual([k for k in TRANSITIONS if k[0] is S.CLOSED], [])
        self.assertEqual({state for state, _ in SETUPS}, set(live))


def _docs_transitions() -> dict[tuple[StreamState, Input], StreamState]:
    text = DOCS.read_text()
    section = text[text.index("Transitions (send") :]
    table: dict[tuple[StreamState, Input], StreamState] = {}
    for line in section.splitlines()[1:]:
        if not line.startswith("|"):
            if table:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("state", "(idle)") or set(cells[0]) <= set("-"):
            continue
        state = StreamState[cells[0]]
        for direction, cell in zip(("SEND", "RECV"), cells[1:], strict=False):
            for item in filter(None, (i.strip() for i in cell.split(";"))):
                m = re.fullmatch(r"(.+?)\s+(?:→\s+(\w+)|same)", item)
                assert m, item
                nxt = StreamState[m.group(2)] if m.group(2) else state
                for name in m.group(1).split(","):
                    table[state, Input[f"{direction}_{name.strip()}"]] = nxt
    return table


def _add_table_tests() -> None:
    for state, origin in SETUPS:
        for inp in Input:
            kind = "recv" if inp.received else "send"
            nxt = TRANSITIONS.get((state, inp))
            if nxt is not None:
                outcome = f"moves it to {nxt.name}"
            elif inp.received:
                outcome = "resets only that stream with STREAM_STATE_ERROR"
            elif inp is Input.SEND_WINDOW_UPDATE:
                outcome = "queues no WINDOW_UPDATE"
            else:
                outcome = "raises MuxUsageError"
            name = f"test_{kind}_{state.name}_{'local' if origin is LOCAL else 'remote'}_{inp.name}".lower()

            def test(self, state=state, origin=origin, inp=inp, kind=kind):
                getattr(self, f"check_{kind}")(state, origin, inp)

            test.__name__ = name
            test.__doc__ = f"{inp.value} on a stream {origin} in {state.name} {outcome}."
            setattr(StreamTableTests, name, test)


_add_table_tests()
