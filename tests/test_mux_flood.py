"""
Flood protection in the sans-IO core (L{FloodLimits}): frames that do
nothing useful are rate-capped per kind, replies the peer leaves unread are
counted and capped, and past any limit the session ends with GOAWAY
ENHANCE_YOUR_CALM. Legitimate patterns (keepalive for hours, window
probing during a bulk transfer, many accepted streams, a site refusing a
client that retries forever) never trip them.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.mux import events as ev
from rtunnel.mux.errors import ErrorCode
from rtunnel.mux.frames import Data, GoAway, Open, OpenFail, Ping, WindowUpdate, encode
from rtunnel.mux.session import MuxSession
from rtunnel.mux.settings import KIB, MIB, Allowance, FloodLimits, Settings, WindowTuning
from tests import strategies as s
from tests.mux_helpers import SessionPair, feed, of_type, ready_session, sent_frames

PING = encode(Ping(b"pingpong"))
SERVER = FloodLimits.for_server()
SITE = FloodLimits.for_site()


def goaways(frames: list) -> list[GoAway]:
    return [f for f in frames if isinstance(f, GoAway)]


def pongs(frames: list) -> int:
    return sum(1 for f in frames if isinstance(f, Ping) and f.ack)


class LimitValueTests(SynchronousTestCase):
    def test_role_defaults(self):
        """
        Without explicit limits a session takes its role's: the acceptor
        (tunnel server) counts refused OPENs, the initiator (site) does not
        and tolerates more unread replies; both cap PINGs and empty DATA.
        """
        self.assertEqual(MuxSession(initiator=False).flood_limits, SERVER)
        self.assertEqual(MuxSession(initiator=True).flood_limits, SITE)
        self.assertIsNotNone(SERVER.refused_opens)
        self.assertIsNone(SITE.refused_opens)
        self.assertGreater(SITE.reply_limit, SERVER.reply_limit)
        self.assertEqual(SITE.pings, SERVER.pings)
        self.assertEqual(SITE.empty_data, SERVER.empty_data)

    def test_reply_limit_not_below_pause(self):
        """The hard limit on unread replies cannot be below the point where reading stops."""
        self.assertRaises(ValueError, FloodLimits, reply_pause=10, reply_limit=9)
        self.assertRaises(ValueError, Allowance, rate=0, burst=1)
        self.assertRaises(ValueError, Allowance, rate=1, burst=0)


class PingFloodTests(SynchronousTestCase):
    def test_ping_flood_ends_the_session(self):
        """
        PINGs beyond the allowance (1,000 at once) in one read: the first
        1,000 are answered, the next one gets GOAWAY ENHANCE_YOUR_CALM saying
        what and how many, and nothing after it is processed.
        """
        session = ready_session(initiator=False)
        events = session.receive_data(PING * 5000, now=100.0)
        flood = of_type(events, ev.FloodDetected)
        self.assertEqual(len(flood), 1)
        self.assertEqual((flood[0].what, flood[0].count, flood[0].seconds), ("PING", 1001, 0.0))
        self.assertEqual(flood[0].limit, "1000 at once, then 200/s")
        failed = of_type(events, ev.SessionFailed)
        self.assertEqual([f.code for f in failed], [ErrorCode.ENHANCE_YOUR_CALM])
        self.assertIn("too many PING frames: 1001 in one read (allowed 1000 at once, then 200/s)", failed[0].reason)
        self.assertIsInstance(events[-1], ev.SessionFailed)
        out = sent_frames(session)
        self.assertEqual(pongs(out), 1000)
        [goaway] = goaways(out)
        self.assertEqual(goaway.code, ErrorCode.ENHANCE_YOUR_CALM)
        self.assertTrue(session.failed)
        self.assertEqual(session.receive_data(PING, now=101.0), [])

    @settings(max_examples=30, deadline=None)
    @given(st.data())
    def test_ping_flood_any_chunking(self, data):
        """However the flood is cut into reads, exactly the allowance is
        answered before the GOAWAY."""
        session = ready_session(initiator=False)
        events = []
        for chunk in data.draw(s.chunked(PING * 1200)):
            events += session.receive_data(chunk, now=5.0)
        self.assertEqual(len(of_type(events, ev.FloodDetected)), 1)
        out = sent_frames(session)
        self.assertEqual(pongs(out), 1000)
        self.assertEqual([g.code for g in goaways(out)], [ErrorCode.ENHANCE_YOUR_CALM])

    def test_unsolicited_ping_acks_count(self):
        """PING ACKs that answer none of ours are useless PINGs too."""
        session = ready_session()
        events = session.receive_data(encode(Ping(b"12345678", ack=True)) * 1001, now=0.0)
        self.assertEqual([e.what for e in of_type(events, ev.FloodDetected)], ["PING"])

    def test_ping_rate_at_the_allowance_is_fine(self):
        """200 PINGs a second, sustained for ten minutes, is within the allowance."""
        session = ready_session(initiator=False)
        for second in range(600):
            events = session.receive_data(PING * 200, now=float(second))
            self.assertEqual(of_type(events, ev.FloodDetected), [], second)
        self.assertFalse(session.failed)

    def test_ping_rate_above_the_allowance_trips_after_the_burst(self):
        """At 300 PINGs a second, 100/s over the rate, the burst of 1,000
        (700 left after the first second) runs out in the ninth second."""
        session = ready_session(initiator=False)
        for second in range(60):
            events = session.receive_data(PING * 300, now=float(second))
            if of_type(events, ev.FloodDetected):
                break
        self.assertEqual(second, 8)
        [flood] = of_type(events, ev.FloodDetected)
        self.assertEqual(flood.what, "PING")
        self.assertGreater(flood.rate, 250)

    def test_no_time_no_rate_cap(self):
        """A caller that passes no time gets no rate caps (documented): a
        session driven without a clock cannot tell a flood from hours of
        keepalive."""
        session = ready_session(initiator=False)
        self.assertEqual(of_type(session.receive_data(PING * 5000), ev.FloodDetected), [])
        self.assertFalse(session.failed)

    def test_clock_going_back_does_not_refill(self):
        """A wall clock set back refills nothing: a flood stays a flood."""
        session = ready_session(initiator=False)
        session.receive_data(PING * 900, now=1000.0)
        events = session.receive_data(PING * 200, now=10.0)
        self.assertEqual(len(of_type(events, ev.FloodDetected)), 1)


class KeepaliveForHoursTests(SynchronousTestCase):
    @settings(max_examples=20, deadline=None)
    @given(st.lists(st.floats(5.0, 15.0), min_size=10, max_size=40))
    def test_keepalive_pings_never_trip(self, intervals):
        """
        Both ends ping every ~10 s (jittered) for six simulated hours,
        answering each other: more PINGs than the burst, never a flood.
        """
        pair = SessionPair()
        pair.now = 0.0
        count = 0
        while pair.now < 6 * 3600:
            for end in pair.ends:
                end.ping()
            client_events, server_events = pair.pump()
            self.assertEqual(of_type(client_events + server_events, ev.FloodDetected), [])
            pair.now += intervals[count % len(intervals)]
            count += 1
        self.assertGreater(count, 1000)
        self.assertFalse(pair.client.failed or pair.server.failed)


class BulkTransferTests(SynchronousTestCase):
    def test_window_probing_at_line_rate_stays_within_the_ping_allowance(self):
        """
        A bulk transfer at 700 MB/s on a 0.1 ms path with window growth on
        (the default WindowTuning, which pings to probe), from 16 streams at
        once and then from new streams as old ones end: the data sender
        sees the receiver's probe PINGs and never counts a flood; their
        rate stays well under the allowance.
        """
        rate, rtt = 700e6, 1e-4
        settings_ = Settings()
        sender = MuxSession(initiator=False, settings=settings_)
        receiver = MuxSession(initiator=True, settings=settings_, tuning=WindowTuning())
        sender.start()
        receiver.start()
        now = 0.0
        receiver.receive_data(sender.data_to_send(), now=now)
        sender.receive_data(receiver.data_to_send(), now=now)
        pings_seen: list[float] = []
        streams: dict[int, int] = {}  # id -> bytes left

        def open_stream() -> None:
            sid = sender.open_stream("127.0.0.1", 9)
            [request] = receiver.receive_data(sender.data_to_send(), now=now)
            assert isinstance(request, ev.StreamRequested)
            receiver.accept_stream(sid)
            sender.receive_data(receiver.data_to_send(), now=now)
            streams[sid] = 64 * MIB

        for _ in range(16):
            open_stream()
        chunk = b"x" * (16 * MIB)
        total = 0
        while total < 2 * 1024 * MIB:
            moved = 0
            for sid in list(streams):
                size = min(sender.send_window(sid), streams[sid])
                if size:
                    sender.send_data(sid, chunk[:size] if size <= len(chunk) else b"x" * size, fin=size == streams[sid])
                    streams[sid] -= size
                    moved += size
            for event in receiver.receive_data(sender.data_to_send(), now=now):
                if isinstance(event, ev.DataReceived):
                    receiver.consumed(event.stream_id, len(event.data))
            now += moved / rate + rtt
            events = sender.receive_data(receiver.data_to_send(), now=now)
            self.assertEqual(of_type(events, ev.FloodDetected), [])
            pings_seen += [now] * len(of_type(events, ev.PingReceived))
            total += moved
            for sid in [sid for sid, left in streams.items() if not left]:
                del streams[sid]
                open_stream()
        self.assertFalse(sender.failed)
        self.assertGreater(len(pings_seen), 10)  # probing did happen
        per_second: dict[int, int] = {}
        for t in pings_seen:
            per_second[int(t)] = per_second.get(int(t), 0) + 1
        assert SERVER.pings is not None
        self.assertLess(max(per_second.values()), SERVER.pings.rate / 2, per_second)


class EmptyDataFloodTests(SynchronousTestCase):
    def test_empty_data_flood_ends_the_session(self):
        """DATA frames with neither bytes nor FIN, beyond 100 at once, on a
        live stream: GOAWAY ENHANCE_YOUR_CALM."""
        session = ready_session(initiator=False)
        feed(session, Open(1, "example.com", 80), now=0.0)
        session.accept_stream(1)
        session.data_to_send()
        events = feed(session, *[Data(1, b"")] * 150, now=0.0)
        [flood] = of_type(events, ev.FloodDetected)
        self.assertEqual((flood.what, flood.count), ("empty DATA", 101))
        self.assertEqual([g.code for g in goaways(sent_frames(session))], [ErrorCode.ENHANCE_YOUR_CALM])
        # The stream was reset with the session's code.
        self.assertEqual([e.code for e in of_type(events, ev.StreamReset)], [ErrorCode.ENHANCE_YOUR_CALM])

    def test_empty_data_on_closed_streams_counts(self):
        """Empty DATA aimed at a stream that is gone counts as well."""
        session = ready_session(initiator=False)
        feed(session, Open(1, "example.com", 80), now=0.0)
        session.reset_stream(1, ErrorCode.CANCEL, "")
        events = feed(session, *[Data(1, b"")] * 101, now=0.0)
        self.assertEqual([e.what for e in of_type(events, ev.FloodDetected)], ["empty DATA"])

    def test_fin_and_data_are_not_counted(self):
        """A bare FIN is not an empty frame, and DATA with bytes is never
        counted: thousands of small DATA frames are fine."""
        pair = SessionPair(server_settings=Settings(initial_window=1024 * KIB))
        pair.now = 0.0
        sid = pair.open(pair.client)
        for _ in range(5000):
            pair.client.send_data(sid, b"x")
        pair.client.end_stream(sid)
        events = pair.send(pair.client)
        self.assertEqual(len(of_type(events, ev.DataReceived)), 5000)
        self.assertEqual(of_type(events, ev.FloodDetected), [])
        self.assertEqual(of_type(events, ev.StreamEnded), [ev.StreamEnded(sid)])


class RefusedOpenTests(SynchronousTestCase):
    def test_refused_open_flood_on_the_server(self):
        """
        With the tunnel server's limits, OPENs that the caller refuses (all
        of a site's) beyond 100 at once end the session: the refusal past
        the allowance returns the failure events.
        """
        session = ready_session(initiator=False)
        results = []
        for n in range(150):
            sid = 2 * n + 1
            [request] = feed(session, Open(sid, "127.0.0.1", 22), now=0.0)
            self.assertIsInstance(request, ev.StreamRequested)
            results.append(session.refuse_stream(sid, ErrorCode.TARGET_NOT_ALLOWED, "no"))
            if session.failed:
                break
        self.assertEqual(len(results), 101)
        self.assertEqual(results[:100], [[]] * 100)
        flood, failed = results[100]
        self.assertEqual((flood.what, flood.count), ("refused OPEN", 101))
        self.assertEqual(failed, ev.SessionFailed(ErrorCode.ENHANCE_YOUR_CALM, failed.reason))
        self.assertIn("too many refused OPEN frames: 101", failed.reason)
        self.assertEqual([g.code for g in goaways(sent_frames(session))], [ErrorCode.ENHANCE_YOUR_CALM])

    def test_refusals_by_the_session_count(self):
        """OPENs beyond max_streams, refused by the session itself, count too."""
        session = ready_session(initiator=False, settings=Settings(max_streams=1))
        feed(session, Open(1, "example.com", 80), now=0.0)
        events = feed(session, *[Open(2 * n + 3, "example.com", 80) for n in range(200)], now=0.0)
        [flood] = of_type(events, ev.FloodDetected)
        self.assertEqual(flood.what, "refused OPEN")
        out = sent_frames(session)
        self.assertEqual(sum(isinstance(f, OpenFail) for f in out), 101)

    def test_the_site_refuses_a_retrying_client_forever(self):
        """
        With the site's limits, OPENs from the server that the site refuses
        (a cloud client retrying a target not allowed, in a loop) never end
        the tunnel, however many and however fast.
        """
        session = ready_session(initiator=True)
        for n in range(20_000):
            sid = 2 * n + 2
            feed(session, Open(sid, "127.0.0.1", 22), now=n / 10_000)
            self.assertEqual(session.refuse_stream(sid, ErrorCode.TARGET_NOT_ALLOWED, "not allowed"), [])
        self.assertFalse(session.failed)

    def test_many_accepted_opens_are_fine(self):
        """Streams the server accepts and closes cost nothing of the
        allowance: 20,000 in two seconds."""
        pair = SessionPair()
        pair.now = 0.0
        for n in range(20_000):
            pair.now = n / 10_000
            sid = pair.open(pair.client)
            pair.client.end_stream(sid)
            pair.server.end_stream(sid)
            client_events, server_events = pair.pump()
            if n % 1000 == 0:
                self.assertEqual(of_type(server_events + client_events, ev.FloodDetected), [])
        self.assertFalse(pair.server.failed or pair.client.failed)
        self.assertEqual(pair.server.open_streams, 0)


class ReplyDebtTests(SynchronousTestCase):
    def test_debt_grows_only_while_the_peer_reads_nothing(self):
        """
        Replies the peer's frames elicit count as unread only between
        set_peer_reading(False) and set_peer_reading(True), which clears them.
        """
        session = ready_session(initiator=False)
        session.receive_data(PING * 500)
        self.assertEqual(session.reply_debt, 0)
        session.set_peer_reading(False)
        session.receive_data(PING * 100)
        self.assertEqual(session.reply_debt, 100)
        self.assertFalse(session.reading_should_pause)
        session.receive_data(PING * 28)
        self.assertTrue(session.reading_should_pause)
        session.set_peer_reading(True)
        self.assertEqual(session.reply_debt, 0)
        self.assertFalse(session.reading_should_pause)
        session.receive_data(PING * 500)
        self.assertEqual(session.reply_debt, 0)

    def test_unread_replies_past_the_limit_end_the_session(self):
        """
        Past reply_limit unread replies (here PING ACKs, refusals and a
        RESET answering a broken rule) the session ends with
        ENHANCE_YOUR_CALM, and the reason says what was queued.
        """
        limits = FloodLimits(pings=None, refused_opens=None, reply_pause=4, reply_limit=10)
        session = ready_session(initiator=False, flood_limits=limits)
        session.set_peer_reading(False)
        events = feed(
            session,
            *[Ping(b"pingpong")] * 5,
            Open(1, "a", 1),
            Data(1, b"", fin=True),
            Data(1, b"x"),  # DATA after FIN: RESET STREAM_STATE_ERROR
            Open(3, "a", 1),
        )
        self.assertEqual(session.reply_debt, 6)
        session.refuse_stream(3, ErrorCode.TARGET_NOT_ALLOWED, "no")
        events = feed(session, *[Ping(b"pingpong")] * 10)
        [flood] = of_type(events, ev.FloodDetected)
        self.assertEqual((flood.what, flood.count, flood.seconds), ("unread replies", 11, None))
        self.assertEqual(flood.detail, "9 PING ACKs, 1 RESETs, 1 OPEN_FAILs")
        [failed] = of_type(events, ev.SessionFailed)
        self.assertEqual(failed.code, ErrorCode.ENHANCE_YOUR_CALM)
        self.assertEqual(
            failed.reason,
            "too many unanswered control replies: 9 PING ACKs, 1 RESETs, 1 OPEN_FAILs queued"
            " while the peer reads nothing (limit 10 replies)",
        )
        self.assertEqual([g.code for g in goaways(sent_frames(session))], [ErrorCode.ENHANCE_YOUR_CALM])

    def test_our_own_frames_are_not_debt(self):
        """What we send of our own accord (DATA, WINDOW_UPDATE, our PINGs,
        OPENs) is never counted, however long the peer does not read."""
        pair = SessionPair()
        sid = pair.open(pair.server)
        pair.server.set_peer_reading(False)
        for _ in range(10_000):
            pair.server.ping()
        pair.server.send_data(sid, b"x" * 1000)
        pair.server.open_stream("example.com", 80)
        self.assertEqual(pair.server.reply_debt, 0)
        # Credit returned for the peer's DATA is not a reply either.
        pair.client.send_data(sid, b"y" * (200 * KIB))
        for event in pair.send(pair.client):
            if isinstance(event, ev.DataReceived):
                pair.server.consumed(sid, len(event.data))
        self.assertTrue(any(isinstance(f, WindowUpdate) for f in sent_frames(pair.server)))
        self.assertEqual(pair.server.reply_debt, 0)
