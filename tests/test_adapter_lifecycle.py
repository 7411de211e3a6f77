"""
The tunnel connection's lifecycle (L{TunnelState}) and when its outcomes
are told: L{MuxProtocol.when_ready} settles once per input batch, after
every event of that batch was dispatched, or in C{connectionLost}; the
closed observers come after it. No test here needs a reactor turn to pass
(no zero-delay calls): the ordering is the protocol's own.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.adapter import MuxProtocol, MuxStream, SessionEnded, TunnelState
from rtunnel.mux import ErrorCode, SessionClosing, Settings
from rtunnel.mux.frames import Data, GoAway, Hello, Open, Ping, Reset, encode
from tests.adapter_helpers import Acceptor, HalfCloseRecorder, Holder, RawPeer, iosim_pair, make_mux

_S = Settings()
HELLO = Hello(_S.version, _S.max_frame_size, _S.initial_window, _S.max_streams)


def one_read(*frames: object) -> bytes:
    """The frames as one socket read delivers them: one C{dataReceived}."""
    return b"".join(encode(frame) for frame in frames)  # type: ignore[arg-type]


def ended(testcase: SynchronousTestCase, d: object) -> SessionEnded:
    failure = testcase.failureResultOf(d, SessionEnded)  # type: ignore[arg-type]
    assert isinstance(failure.value, SessionEnded)
    return failure.value


class Watch:
    """Records, in order, how a protocol's outcomes were told, and what it looked like then."""

    def __init__(self, mux: MuxProtocol) -> None:
        self.mux = mux
        self.events: list[tuple[str, object, object]] = []
        mux.when_ready().addCallbacks(self._ready, self._not_ready)
        mux.on_closed(self._closed)

    def _ready(self, mux: MuxProtocol) -> None:
        self.events.append(("ready", self.mux.state, self.mux.peer_goaway))

    def _not_ready(self, failure: Failure) -> None:
        self.events.append(("not ready", self.mux.state, failure.value))

    def _closed(self, reason: BaseException) -> None:
        self.events.append(("closed", self.mux.state, reason))


class ReadyOutcomeTests(SynchronousTestCase):
    def test_hello_and_fatal_goaway_in_one_read(self) -> None:
        """
        A HELLO and a fatal GOAWAY in one read (a server refusing the site):
        C{when_ready} never succeeds, not even for a moment; it fails once,
        with the GOAWAY, after the GOAWAY was handled, and the connection is
        closing. The closed observers follow at C{connectionLost}.
        """
        mux = make_mux(True, Clock())
        peer = RawPeer(mux)
        watch = Watch(mux)
        ready = mux.when_ready()
        mux.dataReceived(one_read(HELLO, GoAway(0, ErrorCode.NOT_AUTHORIZED, "site-revoked: gone")))
        error = ended(self, ready)
        self.assertEqual(
            (error.code, error.reason, error.by_peer), (ErrorCode.NOT_AUTHORIZED, "site-revoked: gone", True)
        )
        self.assertIn("NOT_AUTHORIZED", str(error))
        [(kind, state, value)] = watch.events
        self.assertEqual((kind, state), ("not ready", TunnelState.CLOSING))
        self.assertIsInstance(value, SessionEnded)
        self.assertTrue(peer.transport.disconnecting)
        self.assertEqual(mux.state, TunnelState.CLOSING)
        mux.connectionLost(Failure(ConnectionDone("closed")))
        self.assertEqual([e[0] for e in watch.events], ["not ready", "closed"])
        self.assertEqual(mux.state, TunnelState.CLOSED)
        self.failureResultOf(mux.when_ready(), ConnectionDone)

    def test_hello_and_graceful_goaway_in_one_read(self) -> None:
        """
        A HELLO with a graceful GOAWAY (a server draining as we arrive)
        fails C{when_ready} too: the session can take no new work. The
        connection stays up for the peer to close.
        """
        mux = make_mux(True, Clock())
        peer = RawPeer(mux)
        ready = mux.when_ready()
        mux.dataReceived(one_read(HELLO, GoAway(0, ErrorCode.GOING_AWAY, "restarting")))
        error = ended(self, ready)
        self.assertEqual((error.code, error.by_peer), (ErrorCode.GOING_AWAY, True))
        self.assertEqual(mux.state, TunnelState.OPEN)
        self.assertFalse(mux.accepting_streams)
        self.assertFalse(peer.transport.disconnecting)
        self.assertEqual(ended(self, mux.when_ready()).code, ErrorCode.GOING_AWAY)

    def test_ready_after_the_whole_batch(self) -> None:
        """
        C{when_ready} fires at the end of the read that brought the HELLO,
        after every other frame of that read was dispatched (here: an OPEN
        the stream handler already saw), with the state OPEN; a second read
        does not fire it again.
        """
        holder = Holder()
        mux = make_mux(True, Clock(), holder)
        RawPeer(mux)
        seen: list[tuple[int, TunnelState]] = []
        mux.when_ready().addCallback(lambda m: seen.append((len(holder.streams), m.state)))
        mux.dataReceived(one_read(HELLO, Open(2, "10.0.0.5", 554)))
        self.assertEqual(seen, [(1, TunnelState.OPEN)])
        mux.dataReceived(one_read(Data(2, b"more")))
        self.assertEqual(len(seen), 1)
        self.assertIs(self.successResultOf(mux.when_ready()), mux)

    def test_ready_waits_for_a_whole_hello(self) -> None:
        """A HELLO split over two reads makes the session ready only with the second."""
        mux = make_mux(True, Clock())
        RawPeer(mux)
        ready = mux.when_ready()
        data = one_read(HELLO)
        mux.dataReceived(data[:5])
        self.assertNoResult(ready)
        self.assertEqual(mux.state, TunnelState.CONNECTING)
        mux.dataReceived(data[5:])
        self.assertIs(self.successResultOf(ready), mux)

    def test_asked_during_a_batch_settles_at_its_end(self) -> None:
        """
        C{when_ready} asked for while a batch is dispatched (by a stream
        handler) has no result until the batch is over, even on a session
        open since an earlier read.
        """
        during: list[bool] = []
        answers = []

        def handler(stream: MuxStream) -> None:
            d = mux.when_ready()
            during.append(d.called)
            answers.append(d)

        mux = make_mux(True, Clock(), handler)
        RawPeer(mux)
        mux.dataReceived(one_read(HELLO))
        mux.dataReceived(one_read(Open(2, "10.0.0.5", 554)))
        self.assertEqual(during, [False])
        self.assertIs(self.successResultOf(answers[0]), mux)

    def test_broken_rule_with_the_hello(self) -> None:
        """
        A peer that breaks a rule in the read that brought its HELLO (a
        second HELLO) gets our fatal GOAWAY; C{when_ready} fails with our
        code, not the peer's.
        """
        mux = make_mux(True, Clock())
        peer = RawPeer(mux)
        ready = mux.when_ready()
        mux.dataReceived(one_read(HELLO, HELLO))
        error = ended(self, ready)
        self.assertEqual((error.code, error.by_peer), (ErrorCode.PROTOCOL_ERROR, False))
        self.assertEqual(mux.state, TunnelState.CLOSING)
        self.assertTrue(peer.transport.disconnecting)
        [goaway] = [f for f in peer.received() if isinstance(f, GoAway)]
        self.assertEqual(goaway.code, ErrorCode.PROTOCOL_ERROR)


class ConnectionLostTests(SynchronousTestCase):
    def test_lost_while_connecting(self) -> None:
        """
        The connection lost before the peer's HELLO: C{when_ready} fails
        with the connection's reason, once, with the state already CLOSED;
        only then are the closed observers called. Observers asked for
        from the errback see the end at once.
        """
        mux = make_mux(True, Clock())
        RawPeer(mux)
        watch = Watch(mux)
        late: list[BaseException] = []
        mux.when_ready().addErrback(lambda f: mux.when_closed().addCallback(late.append))
        self.assertEqual(watch.events, [])
        reason = Failure(ConnectionDone("dropped before HELLO"))
        mux.connectionLost(reason)
        self.assertEqual(
            [(kind, state) for kind, state, _ in watch.events],
            [
                ("not ready", TunnelState.CLOSED),
                ("closed", TunnelState.CLOSED),
            ],
        )
        self.assertIs(watch.events[0][2], reason.value)
        self.assertEqual(late, [reason.value])
        mux.connectionLost(Failure(ConnectionDone("again")))
        self.assertEqual(len(watch.events), 2)

    def test_close_of_ours_settles_at_connection_lost(self) -> None:
        """
        C{abort} before HELLO does not settle C{when_ready} inside the call
        (the caller is not called back from its own call): it fails when
        the transport reports the connection gone.
        """
        mux = make_mux(True, Clock())
        peer = RawPeer(mux)
        ready = mux.when_ready()
        mux.abort()
        self.assertNoResult(ready)
        self.assertEqual(mux.state, TunnelState.CLOSING)
        self.assertTrue(peer.transport.disconnected)  # StringTransport's mark of an abort
        later = mux.when_ready()
        mux.connectionLost(Failure(ConnectionAborted()))
        self.failureResultOf(ready, ConnectionAborted)
        self.failureResultOf(later, ConnectionAborted)

    def test_streams_end_before_observers(self) -> None:
        """
        At C{connectionLost} every stream has ended (reset) before any
        closed observer runs, and opening a stream fails from then on.
        """
        acceptor = Acceptor(HalfCloseRecorder)
        client, server, pump, _ = iosim_pair(server_handler=acceptor)
        stream = client.open_stream("h", 1)
        mine = HalfCloseRecorder()
        stream.attach(mine)
        pump.flush()
        seen: list[object] = []
        client.on_closed(lambda reason: seen.append(mine.lost))
        client.connectionLost(Failure(ConnectionDone("gone")))
        self.assertIsNotNone(seen[0])
        self.assertEqual(client.state, TunnelState.CLOSED)
        self.assertRaises(SessionClosing, client.open_stream, "h", 2)


class DrainTests(SynchronousTestCase):
    def test_drain_while_streams_are_open(self) -> None:
        """
        C{drain} with a stream open moves to DRAINING: no new streams, the
        session is no longer offered as ready, the open stream still
        flows; its end moves to CLOSING and the transport is closed, and
        C{connectionLost} to CLOSED, when the drain's Deferred fires.
        """
        acceptor = Acceptor(HalfCloseRecorder)
        client, server, pump, clock = iosim_pair(server_handler=acceptor)
        stream = client.open_stream("h", 1)
        mine = HalfCloseRecorder()
        stream.attach(mine)
        pump.flush()
        self.assertEqual(client.state, TunnelState.OPEN)
        done = client.drain(30.0, "maintenance")
        self.assertEqual(client.state, TunnelState.DRAINING)
        self.assertTrue(client.ready)
        self.assertFalse(client.accepting_streams)
        self.assertRaises(SessionClosing, client.open_stream, "h", 2)
        error = ended(self, client.when_ready())
        self.assertEqual((error.code, error.reason, error.by_peer), (ErrorCode.GOING_AWAY, "maintenance", False))
        calls = len(clock.getDelayedCalls())
        again = client.drain(1.0)
        self.assertEqual((client.state, len(clock.getDelayedCalls())), (TunnelState.DRAINING, calls))
        stream.write(b"still flowing")
        pump.flush()
        self.assertEqual(bytes(acceptor.protocols[0].data), b"still flowing")  # type: ignore[attr-defined]
        stream.loseConnection()
        pump.flush()
        self.assertEqual(client.state, TunnelState.DRAINING)  # the peer's direction is still open
        acceptor.streams[0].loseConnection()
        pump.flush()
        self.assertIsInstance(self.successResultOf(done), ConnectionDone)
        self.assertIsInstance(self.successResultOf(again), ConnectionDone)
        self.assertEqual(client.state, TunnelState.CLOSED)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_drain_before_hello_closes_at_once(self) -> None:
        """Draining before the peer's HELLO has nothing to wait for: CLOSING at once."""
        mux = make_mux(True, Clock())
        peer = RawPeer(mux)
        mux.drain(30.0)
        self.assertEqual(mux.state, TunnelState.CLOSING)
        self.assertTrue(peer.transport.disconnecting)
        self.assertIsInstance(peer.received()[-1], GoAway)

    def test_drain_ending_inside_a_batch_closes_after_it(self) -> None:
        """
        The last stream of a drain ending inside an input batch (the peer's
        RESET) closes the connection only after that batch's output (here
        a PING's answer) is written.
        """
        holder = Holder()
        mux = make_mux(True, Clock(), holder)
        peer = RawPeer(mux)
        mux.dataReceived(one_read(HELLO, Open(2, "10.0.0.5", 554)))
        holder.streams[0].accept(HalfCloseRecorder())
        mux.drain(30.0)
        self.assertEqual(mux.state, TunnelState.DRAINING)
        peer.received()
        writes: list[tuple[bool, bytes]] = []
        original = peer.transport.write

        def write(data: bytes) -> None:
            writes.append((peer.transport.disconnecting, data))
            original(data)

        peer.transport.write = write  # type: ignore[method-assign]
        mux.dataReceived(one_read(Reset(2, ErrorCode.CANCEL, "bye"), Ping(b"12345678")))
        self.assertEqual(mux.state, TunnelState.CLOSING)
        self.assertTrue(peer.transport.disconnecting)
        self.assertEqual([closed for closed, _ in writes], [False])
        self.assertEqual(peer.received(), [Ping(b"12345678", ack=True)])
