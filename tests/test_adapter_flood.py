"""
Flood protection and the close deadline in the Twisted adapter
(L{MuxProtocol}): reading from a peer that reads nothing and keeps asking
for replies is paused (watched through C{producerState}) and resumed when
the transport resumes; past the limits the session ends with GOAWAY
ENHANCE_YOUR_CALM and a warning naming the peer; log lines a peer can
trigger per stream are rate-limited per session; a polite close that the
peer never completes is aborted after C{close_timeout}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rtunnel import logs
from rtunnel.adapter import Keepalive, MuxProtocol
from rtunnel.mux.errors import ErrorCode
from rtunnel.mux.frames import Data, FrameDecoder, GoAway, Hello, Open, OpenFail, Ping, encode
from rtunnel.mux.settings import MIB, Allowance, FloodLimits, Settings
from tests.adapter_helpers import KIB, TEST_SETTINGS, HashSink, Link, PatternSource, StreamingWriter

PING = encode(Ping(b"pingpong"))
NAMESPACE = "rtunnel.adapter.protocol.MuxProtocol"


class RecordingTransport(StringTransport):
    """A StringTransport that records aborts, with a TCP-like peer address."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class LogCapture:
    """Every event MuxProtocol logs while installed (removed at cleanup)."""

    def __init__(self, case: SynchronousTestCase, level: LogLevel | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self._observe)
        case.addCleanup(globalLogPublisher.removeObserver, self._observe)
        if level is not None:
            before = logs.current_level()
            logs.set_level(level)
            case.addCleanup(logs.set_level, before)

    def _observe(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == NAMESPACE:
            self.events.append(event)

    def lines(self, containing: str = "") -> list[str]:
        return [text for text in map(formatEvent, self.events) if containing in text]


class Peer:
    """
    One L{MuxProtocol} under test on a L{RecordingTransport}, with a
    scripted peer that has sent its HELLO; decodes what the protocol wrote.
    """

    def __init__(self, clock: Clock, initiator: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("label", "flooder")
        self.mux = MuxProtocol(initiator=initiator, clock=clock, settings=TEST_SETTINGS, **kwargs)
        self.transport = RecordingTransport()
        self.mux.makeConnection(self.transport)
        s = Settings()
        self.mux.dataReceived(encode(Hello(s.version, s.max_frame_size, s.initial_window, s.max_streams)))
        self._decoder = FrameDecoder(16 * MIB)

    def frames(self) -> list[object]:
        data = self.transport.value()
        self.transport.clear()
        return list(self._decoder.feed(data))

    def goaway_codes(self) -> list[int]:
        return [f.code for f in self.frames() if isinstance(f, GoAway)]


class ReadingPauseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)

    def test_pings_while_paused_pause_reading_until_resumed(self):
        """
        While our transport has paused us (the peer reads nothing), the
        peer's PINGs make PING ACKs pile up: at 128 of them reading from the
        peer is paused; when the transport resumes us, reading resumes.
        """
        peer = Peer(self.clock)
        peer.mux.dataReceived(PING * 500)  # answered while the peer reads: fine
        self.assertEqual(peer.transport.producerState, "producing")
        peer.mux.pauseProducing()
        peer.mux.dataReceived(PING * 100)
        self.assertEqual(peer.transport.producerState, "producing")
        self.clock.advance(1)
        peer.mux.dataReceived(PING * 100)
        self.assertEqual(peer.transport.producerState, "paused")
        self.assertTrue(peer.mux.reading_paused)
        peer.mux.resumeProducing()
        self.assertEqual(peer.transport.producerState, "producing")
        self.assertFalse(peer.mux.reading_paused)
        self.assertEqual(peer.mux.session.reply_debt, 0)
        self.assertEqual(peer.goaway_codes(), [])
        # The stall timer was cancelled: nothing ends the session later.
        self.clock.advance(3600)
        self.assertFalse(peer.transport.disconnecting)

    def test_paused_transport_alone_never_pauses_reading(self):
        """
        Our transport being paused does not pause reading by itself: DATA,
        a FIN and keepalive PINGs for twenty minutes keep being read (two
        ends that both stopped reading whenever their writes were blocked
        would deadlock).
        """
        peer = Peer(self.clock, stream_handler=lambda stream: stream.accept(HashSink()))
        peer.mux.pauseProducing()
        peer.mux.dataReceived(encode(Open(1, "example.com", 80)))
        for _ in range(120):
            self.clock.advance(10)
            peer.mux.dataReceived(PING + encode(Data(1, b"x" * 1000)))
        peer.mux.dataReceived(encode(Data(1, b"", fin=True)))
        self.assertEqual(peer.transport.producerState, "producing")
        self.assertEqual(peer.mux.session.reply_debt, 120)

    def test_unread_replies_past_the_limit_end_the_session(self):
        """
        Past reply_limit unread replies within one read, the session ends:
        GOAWAY ENHANCE_YOUR_CALM, a warning naming the peer and what was
        queued, reading stopped for good, the connection closed.
        """
        limits = FloodLimits(pings=Allowance(rate=1e6, burst=10**6))
        log = LogCapture(self)
        peer = Peer(self.clock, flood_limits=limits)
        peer.mux.pauseProducing()
        peer.mux.dataReceived(PING * 5000)
        self.assertEqual(peer.goaway_codes(), [ErrorCode.ENHANCE_YOUR_CALM])
        self.assertEqual(peer.transport.producerState, "paused")
        self.assertTrue(peer.transport.disconnecting)
        [line] = log.lines("reads nothing")
        self.assertIn("tunnel peer flooder (192.168.1.1:54321) reads nothing: 4097 PING ACKs queued", line)
        self.assertEqual(log.lines("failed"), [])  # one line for the flood, not two
        peer.mux.resumeProducing()
        self.assertEqual(peer.transport.producerState, "paused")  # for good

    def test_stalled_peer_ends_the_session_after_the_stall_timeout(self):
        """
        Reading paused for unread replies, and the peer still reads nothing
        after stall_timeout (30 s): GOAWAY ENHANCE_YOUR_CALM and the
        connection is aborted. Keepalive does not call the peer silent
        meanwhile: we are the ones not reading.
        """
        log = LogCapture(self)
        peer = Peer(self.clock, keepalive=Keepalive(interval=10, timeout=20))
        peer.mux.pauseProducing()
        peer.mux.dataReceived(PING * 200)
        self.assertEqual(peer.transport.producerState, "paused")
        peer.frames()
        self.clock.advance(29)
        self.assertFalse(peer.transport.disconnecting)
        self.assertEqual(log.lines("silent"), [])
        self.clock.advance(1)
        self.assertEqual(peer.goaway_codes(), [ErrorCode.ENHANCE_YOUR_CALM])
        self.assertTrue(peer.transport.aborted)
        [line] = log.lines("read nothing for")
        self.assertIn("tunnel peer flooder (192.168.1.1:54321) read nothing for 30.0s while 200 control replies", line)

    def test_refusals_while_paused_count(self):
        """OPEN_FAIL refusals of the peer's OPENs are replies as well."""
        peer = Peer(self.clock, flood_limits=FloodLimits(refused_opens=None))
        peer.mux.pauseProducing()
        peer.mux.dataReceived(b"".join(encode(Open(2 * n + 1, "127.0.0.1", 22)) for n in range(128)))
        self.assertEqual(peer.transport.producerState, "paused")
        self.assertEqual(sum(isinstance(f, OpenFail) for f in peer.frames()), 128)


class RateFloodTests(SynchronousTestCase):
    def test_ping_flood_is_cut_with_a_warning(self):
        """
        A million-PING flood, as an enrolled site might send: after the
        1,000 allowed at once the session ends with GOAWAY ENHANCE_YOUR_CALM;
        one warning names the site, the kind of frame and the rate; reading
        stops, and the polite close is aborted after close_timeout when the
        peer does not complete it.
        """
        clock = Clock()
        log = LogCapture(self)
        peer = Peer(clock, close_timeout=3.0)
        peer.mux.dataReceived(PING * 2000)
        frames = peer.frames()
        self.assertEqual(sum(isinstance(f, Ping) for f in frames), 1000)
        self.assertEqual([f.code for f in frames if isinstance(f, GoAway)], [ErrorCode.ENHANCE_YOUR_CALM])
        [warning] = [e for e in log.events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warning["peer"], "flooder (192.168.1.1:54321)")
        self.assertEqual((warning["what"], warning["count"]), ("PING", 1001))
        self.assertIn(
            "tunnel peer flooder (192.168.1.1:54321) flooded the session with PING frames: 1001 in one read",
            formatEvent(warning),
        )
        self.assertIn("allowed 1000 at once, then 200/s", formatEvent(warning))
        self.assertEqual(log.lines("failed"), [])
        self.assertEqual(peer.transport.producerState, "paused")
        self.assertTrue(peer.transport.disconnecting)
        self.assertFalse(peer.transport.aborted)
        clock.advance(3.0)
        self.assertTrue(peer.transport.aborted)

    def test_refused_open_flood_on_the_server(self):
        """A site's OPENs, all refused by the server's handler, beyond 100
        at once: the session ends (the refusal past the allowance fails it)."""
        clock = Clock()
        peer = Peer(clock)  # acceptor: the server's limits
        peer.mux.dataReceived(b"".join(encode(Open(2 * n + 1, "127.0.0.1", 22)) for n in range(300)))
        frames = peer.frames()
        self.assertEqual(sum(isinstance(f, OpenFail) for f in frames), 101)
        self.assertEqual([f.code for f in frames if isinstance(f, GoAway)], [ErrorCode.ENHANCE_YOUR_CALM])
        self.assertTrue(peer.transport.disconnecting)


class CloseDeadlineTests(SynchronousTestCase):
    def test_polite_close_is_aborted_after_the_timeout(self):
        """
        terminate() closes politely (loseConnection: TLS would send
        close_notify and wait for the peer's); a peer that never completes
        the close is aborted after close_timeout.
        """
        clock = Clock()
        peer = Peer(clock, close_timeout=5.0)
        peer.mux.terminate(ErrorCode.INTERNAL_ERROR, "test")
        self.assertTrue(peer.transport.disconnecting)
        clock.advance(4.9)
        self.assertFalse(peer.transport.aborted)
        clock.advance(0.1)
        self.assertTrue(peer.transport.aborted)

    def test_a_close_that_completes_is_not_aborted(self):
        """Once the connection is gone the deadline is cancelled."""
        clock = Clock()
        peer = Peer(clock, close_timeout=5.0)
        peer.mux.terminate(ErrorCode.INTERNAL_ERROR, "test")
        peer.mux.connectionLost()
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10)
        self.assertFalse(peer.transport.aborted)

    def test_drain_close_has_the_deadline_too(self):
        """A drain that ends politely (no streams) is bounded the same way;
        C{None} waits forever."""
        clock = Clock()
        peer = Peer(clock, close_timeout=2.0)
        peer.mux.drain(10)
        clock.advance(2)
        self.assertTrue(peer.transport.aborted)
        forever = Peer(clock, close_timeout=None)
        forever.mux.drain(10)
        clock.advance(3600)
        self.assertFalse(forever.transport.aborted)

    def test_close_timeout_validated(self):
        """A close timeout must be positive (or None)."""
        self.assertRaises(ValueError, MuxProtocol, initiator=True, clock=Clock(), close_timeout=0)


class LogFloodTests(SynchronousTestCase):
    def _refuse_many(self, count: int) -> tuple[Peer, Clock]:
        clock = Clock()
        # The site's end: the server opens, the site refuses (no handler:
        # every target refused), and refused OPENs are not capped there.
        peer = Peer(clock, initiator=True)
        for n in range(count):
            peer.mux.dataReceived(encode(Open(2 * n + 2, "127.0.0.1", 22)))
        return peer, clock

    def test_refusals_logged_at_a_bounded_rate(self):
        """
        10,000 refused OPENs at debug level produce 5 refusal lines, not
        10,000; once time has passed the next one says how many were left out.
        """
        log = LogCapture(self, LogLevel.debug)
        peer, clock = self._refuse_many(10_000)
        self.assertFalse(peer.transport.disconnecting)
        self.assertEqual(len(log.lines("refused stream")), 5)
        clock.advance(1)
        peer.mux.dataReceived(encode(Open(20_002, "127.0.0.1", 22)))
        lines = log.lines("refused stream")
        self.assertEqual(len(lines), 6)
        self.assertIn("refused stream 20002 to 127.0.0.1:22 from flooder", lines[-1])
        self.assertTrue(lines[-1].endswith("(9995 similar suppressed)"), lines[-1])

    def test_no_refusal_lines_at_the_default_level(self):
        """At the default level (info) refusals log nothing at all."""
        log = LogCapture(self, LogLevel.info)
        self._refuse_many(100)
        self.assertEqual(log.events, [])


class NoDeadlockTests(SynchronousTestCase):
    def test_bulk_both_ways_with_full_buffers_never_pauses_reading(self):
        """
        Two ends sending bulk data to each other through transports that
        keep filling (both paused again and again), with keepalive pings
        going both ways: neither ever stops reading, and both transfers
        complete.
        """
        clock = Clock()
        sinks: list[HashSink] = []

        def accept(stream):
            sink = HashSink()
            sinks.append(sink)
            stream.accept(sink)
            StreamingWriter(stream, PatternSource(8 * MIB, 16 * KIB, salt=2), finish=False).start()

        link = Link(server_handler=accept, high_water=64 * KIB, clock=clock)
        stream = link.client.open_stream("example.com", 80)
        back = HashSink()
        stream.attach(back)
        StreamingWriter(stream, PatternSource(8 * MIB, 16 * KIB, salt=1), finish=False).start()
        paused_reading = []

        def each() -> None:
            clock.advance(0.01)
            link.client.ping()
            link.server.ping()
            paused_reading.append(link.client.reading_paused or link.server.reading_paused)

        for _ in range(100_000):
            link.pump()
            each()
            if back.count == 8 * MIB and sinks and sinks[0].count == 8 * MIB:
                break
        self.assertGreater(link.client_transport.pauses + link.server_transport.pauses, 10)
        self.assertEqual(back.count, 8 * MIB)
        self.assertEqual(sinks[0].count, 8 * MIB)
        self.assertNotIn(True, paused_reading)


class FloodRateLineTests(SynchronousTestCase):
    def test_flood_over_time_logs_its_rate(self):
        """A flood spread over reads is logged with its duration and rate."""
        clock = Clock()
        log = LogCapture(self)
        peer = Peer(clock)
        for _ in range(20):
            clock.advance(0.1)
            peer.mux.dataReceived(PING * 100)
        [warning] = [e for e in log.events if e["log_level"] == LogLevel.warn]
        text = formatEvent(warning)
        # 100 a read every 0.1 s: 1,000 allowed at once plus 20 per 0.1 s.
        self.assertIn("flooded the session with PING frames: 1241 in 1.200s (1034/s; allowed 1000 at once", text)
