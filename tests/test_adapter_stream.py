"""
L{MuxStream} on its own, against a fake of the one interface it uses of its
tunnel connection (L{StreamConnection}): credit and buffering, the pending
FIN, being held while the tunnel is paused, delivery and credit for received
bytes, and every way a stream ends. Also checks that neither side of the
seam reaches into the other's private members.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from rtunnel.adapter import MuxProtocol, MuxStream, StreamAddress, StreamOpenFailed, StreamReset
from rtunnel.adapter.stream import CLEAN_CLOSE, StreamConnection
from rtunnel.mux import ErrorCode
from tests.adapter_helpers import HalfCloseRecorder, Recorder

ADAPTER = Path(__file__).resolve().parent.parent / "rtunnel" / "adapter"


class FakeConnection:
    """
    The tunnel connection as a stream sees it, and nothing more: it has no
    attribute beyond the interface (slots), records every call, and grants
    credit as the test says.
    """

    __slots__ = ("paused", "peer_label", "host_label", "windows", "calls", "held", "fin_closes")

    def __init__(self, window: int = 1000) -> None:
        self.paused = False
        self.peer_label = "192.0.2.7:443"
        self.host_label = "192.0.2.1:5000"
        self.windows = {1: window}
        self.calls: list[tuple[object, ...]] = []
        self.held: list[MuxStream] = []
        #: what end_stream answers: the peer's FIN came first
        self.fin_closes = False

    def send_window(self, stream_id: int) -> int:
        return self.windows.get(stream_id, 0)

    def send_data(self, stream_id: int, data: bytes) -> int:
        sent = min(len(data), self.windows.get(stream_id, 0))
        if sent:
            self.windows[stream_id] -= sent
            self.calls.append(("send", stream_id, bytes(data[:sent])))
        return sent

    def end_stream(self, stream_id: int) -> bool:
        self.calls.append(("fin", stream_id))
        return self.fin_closes

    def consumed(self, stream_id: int, size: int) -> None:
        self.calls.append(("consumed", stream_id, size))

    def accept_stream(self, stream_id: int) -> None:
        self.calls.append(("accept", stream_id))

    def refuse_stream(self, stream_id: int, code: int, reason: str) -> None:
        self.calls.append(("refuse", stream_id, code, reason))

    def reset_stream(self, stream_id: int, code: int, reason: str) -> None:
        self.calls.append(("reset", stream_id, code, reason))

    def hold_stream(self, stream: MuxStream) -> None:
        self.held.append(stream)

    def forget_stream(self, stream_id: int) -> None:
        self.calls.append(("forget", stream_id))

    def sent(self) -> bytes:
        return b"".join(call[2] for call in self.calls if call[0] == "send")  # type: ignore[misc]

    def kinds(self) -> list[object]:
        return [call[0] for call in self.calls]


@implementer(IPushProducer)
class Producer:
    """A push producer that records whether it is paused or stopped."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class RaisingRecorder(Recorder):
    def dataReceived(self, data: bytes) -> None:
        raise RuntimeError("application bug")


class CreditRecorder(Recorder):
    """Notes, at each delivery, how much credit the connection had been told of."""

    def __init__(self, conn: FakeConnection) -> None:
        super().__init__()
        self.conn = conn
        self.credit_seen: list[int] = []

    def dataReceived(self, data: bytes) -> None:
        self.credit_seen.append(sum(c[2] for c in self.conn.calls if c[0] == "consumed"))  # type: ignore[misc]
        super().dataReceived(data)


def make_stream(conn: StreamConnection, local: bool = False) -> MuxStream:
    return MuxStream(conn, 1, "10.0.0.5", 554, local=local)


class TypingTests(SynchronousTestCase):
    def test_fake_and_protocol_both_provide_the_interface(self) -> None:
        """
        Every member of L{StreamConnection} exists on L{MuxProtocol} (mypy
        checks the types where MuxProtocol makes its streams) and on the
        fake these tests use.
        """
        members = {name for name in vars(StreamConnection) if not name.startswith("_")}
        self.assertTrue({"send_window", "send_data", "consumed", "reset_stream", "forget_stream"} <= members)
        for name in members:
            self.assertTrue(hasattr(MuxProtocol, name), name)
            self.assertTrue(hasattr(FakeConnection, name), name)

    def test_no_private_members_across_the_seam(self) -> None:
        """
        stream.py reads no private member of its connection (C{self._mux._x})
        and protocol.py none of a stream's (C{stream._x}): each talks to the
        other through public names only.
        """

        def crossings(path: Path, owner: str) -> list[str]:
            found = []
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")):
                    continue
                if node.attr.startswith("__"):
                    continue
                value = node.value
                if owner == "stream" and isinstance(value, ast.Attribute) and value.attr == "_mux":
                    found.append(f"line {node.lineno}: self._mux.{node.attr}")
                if owner == "protocol" and isinstance(value, ast.Name) and value.id in ("stream", "rest"):
                    found.append(f"line {node.lineno}: {value.id}.{node.attr}")
            return found

        self.assertEqual(crossings(ADAPTER / "stream.py", "stream"), [])
        self.assertEqual(crossings(ADAPTER / "protocol.py", "protocol"), [])


class OutboundTests(SynchronousTestCase):
    def test_write_within_the_window_is_sent_at_once(self) -> None:
        """A write the window covers goes to the connection whole; nothing waits."""
        conn = FakeConnection(window=100)
        stream = make_stream(conn)
        stream.write(b"hello")
        self.assertEqual(conn.calls, [("send", 1, b"hello")])
        self.assertFalse(stream.send_blocked)

    def test_excess_waits_for_credit_and_pauses_the_producer(self) -> None:
        """
        What the window does not cover stays in the stream, and its producer
        is paused; when the window opens the rest goes out in order (only as
        much as the new credit covers) and the producer resumes once nothing
        waits.
        """
        conn = FakeConnection(window=4)
        stream = make_stream(conn)
        producer = Producer()
        stream.registerProducer(producer, True)
        stream.write(b"abcdefgh")
        stream.write(b"ij")
        self.assertEqual(conn.sent(), b"abcd")
        self.assertTrue(stream.send_blocked)
        self.assertTrue(producer.paused)
        conn.windows[1] = 3
        stream.window_opened()
        self.assertEqual(conn.sent(), b"abcdefg")
        self.assertTrue(producer.paused)
        conn.windows[1] = 100
        stream.window_opened()
        self.assertEqual(conn.sent(), b"abcdefghij")
        self.assertFalse(stream.send_blocked)
        self.assertFalse(producer.paused)

    def test_nothing_is_sent_without_credit(self) -> None:
        """With a closed window a write is kept whole; the connection sends nothing."""
        conn = FakeConnection(window=0)
        stream = make_stream(conn)
        stream.write(bytearray(b"xyz"))
        self.assertEqual(conn.calls, [])
        conn.windows[1] = 10
        stream.window_opened()
        self.assertEqual(conn.calls, [("send", 1, b"xyz")])

    def test_fin_waits_for_buffered_bytes(self) -> None:
        """
        C{loseConnection} with bytes waiting sends FIN only after them; a
        half-closeable protocol hears C{writeConnectionLost} then, and
        writes after the FIN was asked for are ignored.
        """
        conn = FakeConnection(window=2)
        stream = make_stream(conn)
        protocol = HalfCloseRecorder()
        written: list[bool] = []
        protocol.writeConnectionLost = lambda: written.append(True)  # type: ignore[method-assign]
        stream.attach(protocol)
        stream.write(b"abcd")
        stream.loseConnection()
        stream.write(b"late")
        self.assertEqual(conn.kinds(), ["send"])
        self.assertEqual(written, [])
        conn.windows[1] = 10
        stream.window_opened()
        self.assertEqual(conn.calls, [("send", 1, b"ab"), ("send", 1, b"cd"), ("fin", 1)])
        self.assertEqual(written, [True])
        stream.window_opened()
        stream.loseConnection()
        self.assertEqual(conn.kinds().count("fin"), 1)
        self.assertIsNone(protocol.lost)

    def test_fin_after_the_peers_closes_the_stream(self) -> None:
        """
        When our FIN is the second (the connection says it closed the
        stream), the stream ends cleanly: its protocol gets
        C{connectionLost} with C{ConnectionDone} and the connection
        forgets it.
        """
        conn = FakeConnection()
        conn.fin_closes = True
        stream = make_stream(conn)
        protocol = HalfCloseRecorder()
        stream.attach(protocol)
        stream.input_ended()
        self.assertTrue(protocol.read_closed)
        stream.loseWriteConnection()
        self.assertEqual(conn.kinds(), ["fin", "forget"])
        self.assertIsInstance(protocol.lost.value, ConnectionDone)  # type: ignore[union-attr]
        self.assertTrue(stream.disconnected)

    def test_paused_tunnel_holds_the_producer_once(self) -> None:
        """
        While the tunnel is paused a write pauses the stream's producer and
        tells the connection once, however many writes follow; when the
        tunnel resumes the stream, the producer resumes.
        """
        conn = FakeConnection()
        stream = make_stream(conn)
        producer = Producer()
        stream.registerProducer(producer, True)
        conn.paused = True
        stream.write(b"a")
        stream.write(b"b")
        self.assertTrue(producer.paused)
        self.assertEqual(conn.held, [stream])
        conn.paused = False
        stream.tunnel_resumed()
        self.assertFalse(producer.paused)
        conn.paused = True
        stream.write(b"c")
        self.assertEqual(conn.held, [stream, stream])

    def test_resumed_tunnel_keeps_a_credit_pause(self) -> None:
        """A stream resumed by the tunnel stays paused while its bytes still wait for credit."""
        conn = FakeConnection(window=1)
        stream = make_stream(conn)
        producer = Producer()
        stream.registerProducer(producer, True)
        conn.paused = True
        stream.write(b"a")
        stream.write(b"bc")
        conn.paused = False
        stream.tunnel_resumed()
        self.assertTrue(producer.paused)

    def test_producer_registered_on_an_ended_stream_is_stopped(self) -> None:
        """A producer registered after the stream ended is told to stop at once."""
        conn = FakeConnection()
        stream = make_stream(conn)
        stream.reset(ErrorCode.CANCEL, "gone")
        producer = Producer()
        stream.registerProducer(producer, True)
        self.assertTrue(producer.stopped)


class InboundTests(SynchronousTestCase):
    def test_credit_only_after_delivery(self) -> None:
        """
        Received bytes reach the protocol at once, and credit for them is
        reported only after its C{dataReceived} returned.
        """
        conn = FakeConnection()
        stream = make_stream(conn)
        protocol = CreditRecorder(conn)
        stream.attach(protocol)
        stream.data_received(b"abc")
        stream.data_received(b"de")
        self.assertEqual(bytes(protocol.data), b"abcde")
        self.assertEqual(protocol.credit_seen, [0, 3])
        self.assertEqual(conn.calls, [("consumed", 1, 3), ("consumed", 1, 2)])

    def test_paused_consumer_keeps_bytes_without_credit(self) -> None:
        """
        While the consumer has paused the stream, bytes wait in it and no
        credit goes back; on resume they are delivered in order and
        credited, and an end of input that came meanwhile follows them.
        """
        conn = FakeConnection()
        stream = make_stream(conn)
        protocol = HalfCloseRecorder()
        stream.attach(protocol)
        stream.pauseProducing()
        stream.data_received(b"one")
        stream.data_received(b"two")
        stream.input_ended()
        self.assertEqual(bytes(protocol.data), b"")
        self.assertFalse(protocol.read_closed)
        self.assertEqual(conn.calls, [])
        stream.resumeProducing()
        self.assertEqual(bytes(protocol.data), b"onetwo")
        self.assertTrue(protocol.read_closed)
        self.assertEqual(conn.calls, [("consumed", 1, 3), ("consumed", 1, 3)])

    def test_early_data_waits_for_a_protocol(self) -> None:
        """Bytes that arrive before a protocol is attached are delivered, and credited, on attach."""
        conn = FakeConnection()
        stream = make_stream(conn, local=False)
        stream.data_received(b"early")
        self.assertEqual(conn.calls, [])
        protocol = Recorder()
        stream.accept(protocol)
        self.assertEqual(bytes(protocol.data), b"early")
        self.assertEqual(conn.calls, [("accept", 1), ("consumed", 1, 5)])
        self.assertTrue(stream.accepted)
        self.assertIs(self.successResultOf(stream.opened), stream)

    def test_end_of_input_on_a_plain_protocol_ends_our_direction(self) -> None:
        """A protocol that cannot half-close gets the peer's FIN as our FIN, as on TCP."""
        conn = FakeConnection()
        stream = make_stream(conn)
        stream.attach(Recorder())
        stream.input_ended()
        self.assertEqual(conn.kinds(), ["fin"])

    def test_clean_close_delivers_what_is_buffered_first(self) -> None:
        """
        A clean close while bytes wait (the consumer paused) ends the stream
        only after they were delivered; a reset drops them.
        """
        conn = FakeConnection()
        stream = make_stream(conn)
        protocol = HalfCloseRecorder()
        stream.attach(protocol)
        stream.pauseProducing()
        stream.data_received(b"last words")
        stream.input_ended()
        stream.closed(CLEAN_CLOSE)
        self.assertIsNone(protocol.lost)
        stream.resumeProducing()
        self.assertEqual(bytes(protocol.data), b"last words")
        self.assertIsInstance(protocol.lost.value, ConnectionDone)  # type: ignore[union-attr]

        other = make_stream(FakeConnection())
        dropped = Recorder()
        other.attach(dropped)
        other.pauseProducing()
        other.data_received(b"never")
        other.closed(Failure(StreamReset(ErrorCode.CANCEL, "peer cancelled")))
        self.assertEqual(bytes(dropped.data), b"")
        self.assertIsInstance(dropped.lost.value, StreamReset)  # type: ignore[union-attr]

    def test_raising_protocol_resets_only_this_stream(self) -> None:
        """
        A protocol whose C{dataReceived} raises gets its stream reset with
        INTERNAL_ERROR; no credit is reported for the bytes it failed on.
        """
        conn = FakeConnection()
        stream = make_stream(conn)
        protocol = RaisingRecorder()
        stream.attach(protocol)
        stream.data_received(b"boom")
        self.assertEqual(conn.calls, [("reset", 1, ErrorCode.INTERNAL_ERROR, "application error"), ("forget", 1)])
        self.assertIsInstance(protocol.lost.value, RuntimeError)  # type: ignore[union-attr]
        self.flushLoggedErrors(RuntimeError)


class EndingTests(SynchronousTestCase):
    def test_reset(self) -> None:
        """
        C{reset} sends RESET, drops buffered bytes, stops the producer, ends
        the protocol with L{StreamReset}, fails C{opened} with
        L{StreamOpenFailed} and has the connection forget the stream; a
        second reset does nothing.
        """
        conn = FakeConnection(window=0)
        stream = make_stream(conn, local=True)
        protocol = Recorder()
        producer = Producer()
        stream.attach(protocol)
        stream.registerProducer(producer, True)
        stream.write(b"waiting")
        stream.reset(ErrorCode.TARGET_ERROR, "broken")
        stream.reset(ErrorCode.CANCEL, "again")
        self.assertEqual(conn.calls, [("reset", 1, ErrorCode.TARGET_ERROR, "broken"), ("forget", 1)])
        self.assertFalse(stream.send_blocked)
        self.assertTrue(producer.stopped)
        self.assertEqual(protocol.lost.value.code, ErrorCode.TARGET_ERROR)  # type: ignore[union-attr]
        failure = self.failureResultOf(stream.opened, StreamOpenFailed)
        self.assertEqual(failure.value.code, ErrorCode.TARGET_ERROR)  # type: ignore[attr-defined]

    def test_refuse(self) -> None:
        """
        C{refuse} asks the connection for OPEN_FAIL, then the stream ends;
        on a stream the peer opened, nobody waits on C{opened}, so its
        failure is not left unhandled.
        """
        conn = FakeConnection()
        stream = make_stream(conn, local=False)
        stream.refuse(ErrorCode.TARGET_NOT_ALLOWED, "not on the list")
        self.assertEqual(conn.calls, [("refuse", 1, ErrorCode.TARGET_NOT_ALLOWED, "not on the list"), ("forget", 1)])
        self.assertTrue(stream.disconnected)
        self.assertIsNone(self.successResultOf(stream.opened))

    def test_open_accepted(self) -> None:
        """The peer's OPEN_OK fires C{opened} once and marks the stream accepted."""
        stream = make_stream(FakeConnection())
        stream.open_accepted()
        stream.open_accepted()
        self.assertTrue(stream.accepted)
        self.assertIs(self.successResultOf(stream.opened), stream)

    def test_accept_after_the_stream_ended(self) -> None:
        """
        Accepting a stream that already ended sends nothing; the protocol is
        connected and at once told why the stream ended.
        """
        conn = FakeConnection()
        stream = make_stream(conn, local=False)
        stream.closed(Failure(StreamReset(ErrorCode.CANCEL, "opener gave up")))
        protocol = Recorder()
        stream.accept(protocol)
        self.assertTrue(protocol.made)
        self.assertEqual(protocol.lost.value.reason, "opener gave up")  # type: ignore[union-attr]
        self.assertEqual(conn.calls, [("forget", 1)])

    def test_stop_producing(self) -> None:
        """
        A consumer that goes away resets the stream while the peer may
        still send, and only ends our direction once the peer has finished.
        """
        conn = FakeConnection()
        stream = make_stream(conn)
        stream.attach(Recorder())
        stream.stopProducing()
        self.assertEqual(conn.calls[0], ("reset", 1, ErrorCode.CANCEL, "local consumer closed"))

        conn = FakeConnection()
        stream = make_stream(conn)
        stream.attach(HalfCloseRecorder())
        stream.input_ended()
        stream.stopProducing()
        self.assertEqual(conn.kinds(), ["fin"])

    def test_addresses_name_the_tunnel(self) -> None:
        """Both addresses are the stream's target, on the tunnel's own addresses."""
        stream = make_stream(FakeConnection())
        self.assertEqual(stream.getPeer(), StreamAddress("10.0.0.5", 554, 1, "192.0.2.7:443"))
        self.assertEqual(stream.getHost(), StreamAddress("10.0.0.5", 554, 1, "192.0.2.1:5000"))
