"""
Receive-window growth by bandwidth-delay probing (WindowTuning).

A probe spans two round trips (see MuxSession._probe_answered). The link is
modelled in round trips: in each round the sender sends all its
credit allows, the receiver gets it (and consumes it, or not), and the
receiver's answers (WINDOW_UPDATEs, the probe's PING ACK) reach the sender.
A window-limited sender therefore moves exactly one window per round, as on a
long path; the tests watch how that grows and where it stops.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from rtunnel.mux import events as ev
from rtunnel.mux.session import MuxSession
from rtunnel.mux.settings import KIB, MIB, Settings, WindowTuning

INITIAL = 64 * KIB


class Link:
    def __init__(self, tuning: WindowTuning | None, initial: int = INITIAL) -> None:
        settings = Settings(initial_window=initial)
        self.sender = MuxSession(initiator=True, settings=settings)
        self.receiver = MuxSession(initiator=False, settings=settings, tuning=tuning)
        self.sender.start()
        self.receiver.start()
        self.receiver.receive_data(self.sender.data_to_send())
        self.sender.receive_data(self.receiver.data_to_send())

    def open(self) -> int:
        stream_id = self.sender.open_stream("127.0.0.1", 9)
        [request] = self.receiver.receive_data(self.sender.data_to_send())
        assert isinstance(request, ev.StreamRequested)
        self.receiver.accept_stream(stream_id)
        self.sender.receive_data(self.receiver.data_to_send())
        return stream_id

    def round(self, stream_ids: list[int], consume: bool = True) -> dict[int, int]:
        """One round trip; return the bytes each stream moved in it."""
        moved = {}
        for stream_id in stream_ids:
            size = self.sender.send_window(stream_id)
            if size:
                self.sender.send_data(stream_id, b"x" * size)
            moved[stream_id] = size
        for event in self.receiver.receive_data(self.sender.data_to_send()):
            if consume and isinstance(event, ev.DataReceived):
                self.receiver.consumed(event.stream_id, len(event.data))
        self.sender.receive_data(self.receiver.data_to_send())
        return moved


class WindowGrowthTests(SynchronousTestCase):
    def test_without_tuning_a_long_path_moves_one_initial_window_per_round_trip(self):
        """The plain protocol never grants more than the initial window per round trip."""
        link = Link(tuning=None)
        sid = link.open()
        moved = [link.round([sid])[sid] for _ in range(20)]
        self.assertEqual(moved, [INITIAL] * 20)
        self.assertEqual(link.receiver.session_window_growth, 0)

    def test_window_limited_stream_grows_to_the_maximum_and_no_further(self):
        """
        A stream whose reader keeps up but whose sender waits for credit every
        round doubles its window until max_window, then stays there.
        """
        tuning = WindowTuning(max_window=2 * MIB, session_budget=64 * MIB, probe_gap=1)
        link = Link(tuning)
        sid = link.open()
        moved = [link.round([sid])[sid] for _ in range(30)]
        self.assertEqual(moved[0], INITIAL)
        self.assertEqual(max(moved), 2 * MIB)
        self.assertEqual(moved[-1], 2 * MIB)
        # Doubling, not a jump: some round moved an intermediate amount.
        self.assertTrue(any(INITIAL < m < 2 * MIB for m in moved), moved)

    def test_a_reader_that_does_not_keep_up_gets_no_larger_window(self):
        """
        When the receiver does not consume, the window is not the limit: it
        stays at its initial size, and so does the memory the reader holds.
        """
        link = Link(WindowTuning(probe_gap=1))
        sid = link.open()
        for _ in range(10):
            link.round([sid], consume=False)
        self.assertEqual(link.receiver.receive_window(sid), 0)
        self.assertEqual(link.receiver.session_window_growth, 0)

    def test_growth_of_all_streams_together_stays_within_the_session_budget(self):
        """Four window-limited streams together grow by at most session_budget."""
        budget = 1 * MIB
        link = Link(WindowTuning(max_window=4 * MIB, session_budget=budget, probe_gap=1))
        sids = [link.open() for _ in range(4)]
        for _ in range(30):
            moved = link.round(sids)
        self.assertLessEqual(sum(moved.values()), 4 * INITIAL + budget)
        self.assertEqual(link.receiver.session_window_growth, budget)

    def test_closed_streams_return_their_growth_to_the_budget(self):
        """A stream's extra window is returned to the session budget when it closes."""
        link = Link(WindowTuning(max_window=1 * MIB, session_budget=1 * MIB, probe_gap=1))
        sid = link.open()
        for _ in range(15):
            link.round([sid])
        self.assertGreater(link.receiver.session_window_growth, 0)
        link.sender.reset_stream(sid, 7, "done")
        link.receiver.receive_data(link.sender.data_to_send())
        self.assertEqual(link.receiver.session_window_growth, 0)

    def test_probes_back_off_on_a_path_the_window_does_not_limit(self):
        """
        When each round trip moves far less than the window (a LAN), probes
        find nothing to grow and are sent ever more rarely.
        """
        link = Link(WindowTuning(probe_gap=16 * KIB), initial=1 * MIB)
        sid = link.open()
        pings = 0
        for _ in range(400):
            link.sender.send_data(sid, b"y" * (8 * KIB))
            out = link.sender.data_to_send()
            for event in link.receiver.receive_data(out):
                if isinstance(event, ev.DataReceived):
                    link.receiver.consumed(sid, len(event.data))
            answer = link.receiver.data_to_send()
            pings += answer.count(b"\x07\x00\x00\x00\x00\x00\x00\x00\x00\x08")
            link.sender.receive_data(answer)
        self.assertEqual(link.receiver.session_window_growth, 0)
        # 400 x 8 KiB = 3.2 MiB received; with a fixed 16 KiB gap that would be
        # ~200 probes (two PINGs each); backing off to 64 x 16 KiB makes it a
        # handful.
        self.assertLess(pings, 24)
        self.assertGreater(pings, 0)


class ContinuousLinkTests(SynchronousTestCase):
    def test_window_grows_on_a_delay_line_whatever_the_probe_alignment(self):
        """
        On a simulated 50 ms-each-way path with a continuous sender (frames
        of 64 KiB, data and answers interleaved as they really are), the
        window grows from 256 KiB to max_window, so throughput reaches
        window/RTT: probes that start in the middle of a burst still see the
        window is the limit.
        """
        import heapq

        delay = 0.05
        sender = MuxSession(initiator=True)
        receiver = MuxSession(initiator=False, tuning=WindowTuning(max_window=8 * MIB))
        sender.start()
        receiver.start()
        queue: list[tuple[float, int, MuxSession, bytes]] = []
        order = 0

        def post(now: float, to: MuxSession, data: bytes) -> None:
            nonlocal order
            if data:
                heapq.heappush(queue, (now + delay, order, to, data))
                order += 1

        post(0.0, receiver, sender.data_to_send())
        post(0.0, sender, receiver.data_to_send())
        stream_id = None
        received_by_second: dict[int, int] = {}
        chunk = b"x" * (64 * KIB)
        now = 0.0
        while queue and now < 3.0:
            now, _, to, data = heapq.heappop(queue)
            for event in to.receive_data(data):
                if isinstance(event, ev.StreamRequested):
                    receiver.accept_stream(event.stream_id)
                elif isinstance(event, ev.DataReceived):
                    receiver.consumed(event.stream_id, len(event.data))
                    second = int(now)
                    received_by_second[second] = received_by_second.get(second, 0) + len(event.data)
            if stream_id is None and sender.ready:
                stream_id = sender.open_stream("h", 1)
            if stream_id is not None:
                while sender.send_window(stream_id):
                    sender.send_data(stream_id, chunk[: sender.send_window(stream_id)])
            post(now, receiver, sender.data_to_send())
            post(now, sender, receiver.data_to_send())
        self.assertEqual(receiver.stream_window(stream_id), 8 * MIB)
        # Window / RTT = 8 MiB / 0.1 s = 84 MB/s; the last full second moves
        # at least 80% of that (without growth it would be 2.6 MB/s).
        self.assertGreater(received_by_second[2], 0.8 * 8 * MIB / 0.1)


class LearnedWindowTests(SynchronousTestCase):
    def test_new_streams_start_with_the_window_the_path_needed(self):
        """
        Once probing found that the path needs a larger window, a stream
        opened later on the same session gets it from the start (within
        the session budget) instead of probing up from the initial window.
        """
        link = Link(WindowTuning(max_window=1 * MIB, session_budget=8 * MIB, probe_gap=1))
        first = link.open()
        for _ in range(20):
            link.round([first])
        self.assertEqual(link.receiver.stream_window(first), 1 * MIB)
        second = link.open()
        self.assertEqual(link.receiver.stream_window(second), 1 * MIB)
        self.assertEqual(link.round([second])[second], 1 * MIB)

    def test_learned_window_is_capped_by_the_remaining_budget(self):
        """A new stream gets no more extra window than the session budget has left."""
        link = Link(WindowTuning(max_window=1 * MIB, session_budget=1 * MIB, probe_gap=1))
        first = link.open()
        for _ in range(20):
            link.round([first])
        second = link.open()
        # The first stream's growth (1 MiB - 64 KiB) leaves 64 KiB of budget.
        self.assertEqual(link.receiver.stream_window(second), INITIAL + INITIAL)
        self.assertLessEqual(link.receiver.session_window_growth, 1 * MIB)
