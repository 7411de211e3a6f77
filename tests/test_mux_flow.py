"""
Flow control in the multiplexer core: per-stream windows in each direction,
credit returned only for consumed bytes, and one slow stream never holding
up another.
"""

from __future__ import annotations

from hypothesis import given, settings
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.mux import events as ev
from rtunnel.mux.errors import ErrorCode, MuxUsageError
from rtunnel.mux.frames import MAX_WINDOW, Data, Open, Reset, WindowUpdate
from rtunnel.mux.settings import KIB, MIB, Settings
from rtunnel.mux.streams import StreamState
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
    transfer,
)

SMALL = Settings(max_frame_size=16 * KIB, initial_window=16 * KIB)


class SendWindowTests(SynchronousTestCase):
    def test_cannot_exceed_window(self):
        """Sending more than the send window is a usage error that queues
        nothing; exactly the window is fine, and then not one byte more."""
        pair = SessionPair(server_settings=SMALL)
        sid = pair.open(pair.client)
        self.assertEqual(pair.client.send_window(sid), 16 * KIB)
        self.assertRaises(MuxUsageError, pair.client.send_data, sid, bytes(16 * KIB + 1))
        self.assertEqual(pair.client.data_to_send(), b"")
        self.assertEqual(pair.client.send_window(sid), 16 * KIB)
        pair.client.send_data(sid, bytes(16 * KIB))
        self.assertEqual(pair.client.send_window(sid), 0)
        self.assertRaises(MuxUsageError, pair.client.send_data, sid, b"x")

    def test_fin_costs_nothing(self):
        """FIN needs no credit: a stream with an empty send window can end."""
        pair = SessionPair(server_settings=SMALL)
        sid = pair.open(pair.client)
        pair.client.send_data(sid, bytes(16 * KIB))
        pair.client.end_stream(sid)
        self.assertEqual(pair.send(pair.client)[-1], ev.StreamEnded(sid))

    def test_early_data_within_initial_window(self):
        """Before OPEN_OK the opener may send up to the peer's initial window."""
        pair = SessionPair(server_settings=SMALL)
        sid = pair.client.open_stream("a", 1)
        self.assertRaises(MuxUsageError, pair.client.send_data, sid, bytes(16 * KIB + 1))
        pair.client.send_data(sid, bytes(16 * KIB))
        self.assertEqual(len(received_bytes(pair.send(pair.client), sid)), 16 * KIB)

    def test_windows_per_direction(self):
        """Each direction has its own window, set by its receiver's HELLO."""
        pair = SessionPair(Settings(initial_window=64 * KIB), Settings(initial_window=32 * KIB))
        sid = pair.open(pair.client)
        self.assertEqual(pair.client.send_window(sid), 32 * KIB)
        self.assertEqual(pair.server.send_window(sid), 64 * KIB)
        pair.client.send_data(sid, bytes(32 * KIB))
        pair.send(pair.client)
        self.assertEqual(pair.server.send_window(sid), 64 * KIB)
        self.assertEqual(pair.server.receive_window(sid), 0)

    def test_data_cut_to_peer_frame_size(self):
        """A large write goes out in frames of the peer's max_frame_size, FIN
        only on the last."""
        pair = SessionPair(server_settings=Settings(max_frame_size=16 * KIB))
        sid = pair.open(pair.client)
        payload = stream_payload(7, 100_000)
        pair.client.send_data(sid, payload, fin=True)
        frames = sent_frames(pair.client)
        self.assertEqual([len(f.data) for f in frames], [16 * KIB] * 6 + [100_000 - 6 * 16 * KIB])
        self.assertEqual([f.fin for f in frames], [False] * 6 + [True])
        self.assertEqual(b"".join(f.data for f in frames), payload)


class ReceiveWindowTests(SynchronousTestCase):
    def test_peer_exceeding_window(self):
        """A peer sending past our window gets that stream reset with
        FLOW_CONTROL_ERROR; the session and other streams carry on."""
        session = ready_session(initiator=False, settings=SMALL)
        feed(session, Open(1, "a", 1), Open(3, "a", 1))
        session.accept_stream(1)
        session.accept_stream(3)
        session.data_to_send()
        self.assertEqual(len(feed(session, Data(1, bytes(16 * KIB)))), 1)
        [reset] = feed(session, Data(1, b"!"))
        self.assertEqual(reset, ev.StreamReset(1, ErrorCode.FLOW_CONTROL_ERROR, reset.reason, False))
        self.assertEqual(sent_frames(session), [Reset(1, ErrorCode.FLOW_CONTROL_ERROR, reset.reason)])
        self.assertEqual(feed(session, Data(3, bytes(16 * KIB))), [ev.DataReceived(3, bytes(16 * KIB))])
        self.assertTrue(session.ready)

    def test_early_data_exceeding_window(self):
        """Early data beyond the initial window resets the stream before it is
        even accepted."""
        session = ready_session(initiator=False, settings=SMALL)
        events = feed(session, Open(1, "a", 1), Data(1, bytes(16 * KIB)), Data(1, b"!"))
        self.assertEqual(events[-1].code, ErrorCode.FLOW_CONTROL_ERROR)
        self.assertIsNone(session.stream_state(1))
        self.assertTrue(session.ready)

    def test_credit_only_when_consumed(self):
        """Receipt returns no credit; consuming does, once at least half a
        window has been consumed since the last WINDOW_UPDATE, in one batch."""
        pair = SessionPair()
        sid = pair.open(pair.client)
        pair.client.send_data(sid, bytes(200_000))
        pair.send(pair.client)
        self.assertEqual(pair.server.data_to_send(), b"")
        self.assertEqual(pair.server.receive_window(sid), 256 * KIB - 200_000)
        pair.server.consumed(sid, 100_000)
        self.assertEqual(pair.server.data_to_send(), b"")
        pair.server.consumed(sid, 31_072)
        self.assertEqual(decode_all(pair.server.data_to_send()), [WindowUpdate(sid, 131_072)])
        pair.server.consumed(sid, 68_928)
        self.assertEqual(pair.server.data_to_send(), b"")
        self.assertEqual(pair.server.receive_window(sid), 256 * KIB - 200_000 + 131_072)

    def test_credit_reaches_sender(self):
        """A WINDOW_UPDATE raises the sender's window and tells it so."""
        pair = SessionPair(server_settings=SMALL)
        sid = pair.open(pair.client)
        pair.client.send_data(sid, bytes(16 * KIB))
        pair.send(pair.client)
        pair.server.consumed(sid, 8 * KIB)
        self.assertEqual(pair.send(pair.server), [ev.SendWindowAvailable(sid, 8 * KIB)])
        self.assertEqual(pair.client.send_window(sid), 8 * KIB)

    def test_consumed_beyond_received(self):
        """Reporting more bytes consumed than were received is a usage error
        (it would let the peer exceed the window)."""
        pair = SessionPair()
        sid = pair.open(pair.client)
        pair.client.send_data(sid, b"12345")
        pair.send(pair.client)
        pair.server.consumed(sid, 3)
        self.assertRaises(MuxUsageError, pair.server.consumed, sid, 3)
        pair.server.consumed(sid, 2)
        self.assertEqual(pair.server.data_to_send(), b"")

    def test_consume_early_data_before_accept(self):
        """The target end may return credit for early data before it answers
        the OPEN; the opener accepts that WINDOW_UPDATE."""
        pair = SessionPair(server_settings=SMALL)
        sid = pair.client.open_stream("a", 1)
        pair.client.send_data(sid, bytes(16 * KIB))
        pair.send(pair.client)
        pair.server.consumed(sid, 16 * KIB)
        self.assertEqual(pair.server.stream_state(sid), StreamState.OPENING_IN)
        self.assertEqual(pair.send(pair.server), [ev.SendWindowAvailable(sid, 16 * KIB)])

    def test_stalled_receiver_holds_one_window(self):
        """A receiver that never consumes holds at most one window of the
        stream: the sender runs out of credit and no WINDOW_UPDATE comes."""
        pair = SessionPair(server_settings=SMALL)
        sid = pair.open(pair.client)
        sent = 0
        for _ in range(10):
            n = pair.client.send_window(sid)
            if n:
                pair.client.send_data(sid, bytes(n))
                sent += n
            pair.send(pair.client)
            pair.send(pair.server)
        self.assertEqual(sent, 16 * KIB)
        self.assertEqual(len(received_bytes(pair.events[pair.server], sid)), 16 * KIB)
        self.assertEqual(of_type(pair.events[pair.client], ev.SendWindowAvailable), [])
        self.assertRaises(MuxUsageError, pair.client.send_data, sid, b"x")

    def test_stalled_stream_does_not_block_another(self):
        """With one stream stalled at a reader that consumes nothing, a second
        stream on the same session completes a 4 MiB transfer."""
        pair = SessionPair()
        stalled = pair.open(pair.client)
        pair.client.send_data(stalled, bytes(pair.client.send_window(stalled)))
        pair.send(pair.client)
        busy = pair.open(pair.client)
        payload = stream_payload(99, 4 * MIB)
        self.assertEqual(transfer(pair, pair.client, busy, payload), payload)
        self.assertEqual(pair.client.send_window(stalled), 0)
        self.assertEqual(len(received_bytes(pair.events[pair.server], stalled)), 256 * KIB)
        self.assertEqual(pair.server.stream_state(stalled), StreamState.OPEN)

    def test_transfer_both_ways(self):
        """Bulk data flows both ways at once on one stream under flow control."""
        pair = SessionPair(SMALL, SMALL)
        sid = pair.open(pair.server)
        up, down = stream_payload(1, 300_000), stream_payload(2, 300_000)
        self.assertEqual(transfer(pair, pair.client, sid, up), up)
        self.assertEqual(transfer(pair, pair.server, sid, down), down)

    @settings(max_examples=120, deadline=None)
    @given(s.flow_steps)
    def test_flow_invariants(self, steps):
        """Whatever the mix of writes, consumption and delivery: the receiver
        never holds more than one window, WINDOW_UPDATEs come only from
        consumption and in batches of at least half a window, and once the
        link is quiet the sender's window equals the receiver's."""
        pair = SessionPair(server_settings=SMALL)
        sid = pair.open(pair.client)
        window = SMALL.initial_window
        to_server, to_client = b"", b""
        held = 0
        for op, size in steps:
            if op == "write":
                n = min(size, pair.client.send_window(sid))
                pair.client.send_data(sid, bytes(n))
                to_server += pair.client.data_to_send()
            elif op == "consume":
                n = min(size, held)
                pair.server.consumed(sid, n)
                held -= n
            elif op == "deliver":
                held += len(received_bytes(pair.server.receive_data(to_server), sid))
                to_server = b""
            else:
                pair.client.receive_data(to_client)
                to_client = b""
            out = pair.server.data_to_send()
            updates = decode_all(out)
            if op != "consume":
                self.assertEqual(updates, [])
            for update in updates:
                self.assertIsInstance(update, WindowUpdate)
                self.assertGreaterEqual(update.increment, window // 2)
            to_client += out
            self.assertLessEqual(held, window)
        held += len(received_bytes(pair.server.receive_data(to_server), sid))
        pair.client.receive_data(to_client + pair.server.data_to_send())
        self.assertLessEqual(held, window)
        self.assertEqual(pair.client.send_window(sid), pair.server.receive_window(sid))


class WindowUpdateTests(SynchronousTestCase):
    def test_overflow(self):
        """A WINDOW_UPDATE raising a send window above 2^31-1 resets that
        stream with FLOW_CONTROL_ERROR; reaching exactly 2^31-1 is fine."""
        session = ready_session(initiator=True)
        a = session.open_stream("a", 1)
        b = session.open_stream("b", 1)
        session.data_to_send()
        room = MAX_WINDOW - session.send_window(a)
        self.assertEqual(feed(session, WindowUpdate(a, room)), [ev.SendWindowAvailable(a, MAX_WINDOW)])
        [reset] = feed(session, WindowUpdate(a, 1))
        self.assertEqual(reset, ev.StreamReset(a, ErrorCode.FLOW_CONTROL_ERROR, reset.reason, False))
        self.assertEqual(sent_frames(session), [Reset(a, ErrorCode.FLOW_CONTROL_ERROR, reset.reason)])
        self.assertEqual(feed(session, WindowUpdate(b, 1)), [ev.SendWindowAvailable(b, 256 * KIB + 1)])
        self.assertTrue(session.ready)

    def test_grow_window(self):
        """grow_window grants the difference at once (plus any consumed bytes
        not yet returned); the half-window batching follows the new size, and
        shrinking is ignored."""
        pair = SessionPair()
        sid = pair.open(pair.client)
        pair.client.send_data(sid, bytes(1000))
        pair.send(pair.client)
        pair.server.consumed(sid, 1000)
        self.assertEqual(pair.server.data_to_send(), b"")
        pair.server.grow_window(sid, 1 * MIB)
        update = pair.server.data_to_send()
        self.assertEqual(decode_all(update), [WindowUpdate(sid, 1 * MIB - 256 * KIB + 1000)])
        pair.client.receive_data(update)
        self.assertEqual(pair.client.send_window(sid), 1 * MIB)
        pair.server.grow_window(sid, 512 * KIB)
        self.assertEqual(pair.server.data_to_send(), b"")
        pair.client.send_data(sid, bytes(1 * MIB))
        pair.send(pair.client)
        pair.server.consumed(sid, 512 * KIB - 1)
        self.assertEqual(pair.server.data_to_send(), b"")
        pair.server.consumed(sid, 1)
        self.assertEqual(decode_all(pair.server.data_to_send()), [WindowUpdate(sid, 512 * KIB)])

    def test_grow_window_before_open_ok(self):
        """An opener growing its receive window before OPEN_OK grants the
        difference as soon as the stream is accepted."""
        pair = SessionPair()
        sid = pair.client.open_stream("a", 1)
        pair.client.grow_window(sid, 1 * MIB)
        pair.send(pair.client)
        pair.server.accept_stream(sid)
        pair.send(pair.server)
        self.assertEqual(decode_all(pair.client.data_to_send()), [WindowUpdate(sid, 1 * MIB - 256 * KIB)])
        self.assertEqual(pair.client.receive_window(sid), 1 * MIB)

    def test_grow_window_capped(self):
        """A window is never grown beyond 2^31-1."""
        pair = SessionPair()
        sid = pair.open(pair.client)
        pair.server.grow_window(sid, 2**40)
        pair.send(pair.server)
        self.assertEqual(pair.client.send_window(sid), MAX_WINDOW)
        self.assertTrue(pair.client.ready)
