"""
Flow control and backpressure through the adapter: per-stream windows bound
memory at a stalled reader without stalling other streams, stream producers
follow the send window and the tunnel transport, and many streams share a
session.
"""

from __future__ import annotations

import hashlib
import random
import tracemalloc

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from rtunnel.adapter import MuxStream
from tests.adapter_helpers import (
    KIB,
    MIB,
    TEST_SETTINGS,
    Acceptor,
    HalfCloseEcho,
    HalfCloseRecorder,
    HashSink,
    Holder,
    Link,
    PatternSource,
    Recorder,
    StreamingWriter,
    iosim_pair,
    pump_all,
)

WINDOW = TEST_SETTINGS.initial_window  # 256 KiB
FRAME = TEST_SETTINGS.max_frame_size  # 64 KiB


class StalledSink(HashSink):
    """
    A sink whose consumer (a forwarded socket, here a StringTransport that
    the stream produces into) has paused the stream from the start.
    """

    def connectionMade(self) -> None:
        self.leg = StringTransport()
        self.leg.registerProducer(self.transport, True)
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        assert self.transport is not None
        self.transport.resumeProducing()  # type: ignore[attr-defined]


def held_inbound(stream: MuxStream) -> int:
    """Bytes a receiving stream holds for its paused consumer."""
    return sum(len(chunk) for chunk in stream._inbuf)


class StalledReaderTests(SynchronousTestCase):
    def test_stalled_reader_bounds_memory_and_spares_other_streams(self) -> None:
        """
        A writer pushes 50 MB into a stream whose reader never reads: the
        sender's stream buffer, the bytes handed to the sender's transport
        and the bytes held at the receiver each stay within one window (plus
        one frame), while a second stream on the same session completes its
        transfer. Resuming the reader lets all 50 MB through, intact, with
        the same bound holding throughout.
        """
        sinks: dict[int, HashSink] = {}
        remote: dict[int, MuxStream] = {}

        def handler(stream: MuxStream) -> None:
            sink = StalledSink() if stream.port == 1 else HashSink()
            sinks[stream.port] = sink
            remote[stream.port] = stream
            stream.accept(sink)

        link = Link(server_handler=handler)
        slow_source = PatternSource(50 * MIB, FRAME, salt=1)
        fast_source = PatternSource(8 * MIB, FRAME, salt=2)
        slow = link.client.open_stream("bulk", 1)
        fast = link.client.open_stream("bulk", 2)
        slow.attach(Recorder())
        fast.attach(Recorder())
        slow_writer = StreamingWriter(slow, slow_source)
        fast_writer = StreamingWriter(fast, fast_source)
        tap = link.taps[link.client]
        worst = {"sender buffer": 0, "in flight": 0, "receiver held": 0}

        def measure() -> None:
            worst["sender buffer"] = max(worst["sender buffer"], slow._outlen)
            in_flight = tap.data_bytes.get(slow.stream_id, 0) - sinks[1].count if 1 in sinks else 0
            worst["in flight"] = max(worst["in flight"], in_flight)
            if 1 in remote:
                worst["receiver held"] = max(worst["receiver held"], held_inbound(remote[1]))

        slow_writer.start()
        fast_writer.start()
        link.pump_all(each=measure)

        # Stalled: exactly one window crossed, nothing consumed, writer paused.
        self.assertEqual(tap.data_bytes[slow.stream_id], WINDOW)
        self.assertEqual(sinks[1].count, 0)
        self.assertEqual(held_inbound(remote[1]), WINDOW)
        self.assertTrue(slow_writer.paused)
        self.assertEqual(sinks[1].leg.producer, remote[1])
        # The other stream finished meanwhile.
        self.assertEqual(sinks[2].count, 8 * MIB)
        self.assertEqual(sinks[2].hash.digest(), fast_source.digest())
        self.assertIsInstance(sinks[2].lost.value, ConnectionDone)  # type: ignore[union-attr]

        sinks[1].resume()  # type: ignore[attr-defined]
        link.pump_all(each=measure)

        self.assertEqual(sinks[1].count, 50 * MIB)
        self.assertEqual(sinks[1].hash.digest(), slow_source.digest())
        self.assertIsInstance(sinks[1].lost.value, ConnectionDone)  # type: ignore[union-attr]
        self.assertLessEqual(worst["sender buffer"], WINDOW + FRAME)
        self.assertLessEqual(worst["in flight"], WINDOW + FRAME)
        self.assertLessEqual(worst["receiver held"], WINDOW + FRAME)
        self.assertGreater(worst["in flight"], 0)
        self.assertLessEqual(link.client_transport.most_pending, 2 * (WINDOW + FRAME))

    def test_eof_waits_for_paused_reader(self) -> None:
        """
        Data and FIN that arrive while the consumer has paused the stream are
        held: C{readConnectionLost} comes only after the consumer resumes
        and has been given every byte.
        """
        holder = Holder()
        client, server, pump, _ = iosim_pair(server_handler=holder)
        stream = client.open_stream("h", 1)
        stream.attach(HalfCloseRecorder())
        pump.flush()
        [remote] = holder.streams
        theirs = HalfCloseRecorder()
        remote.accept(theirs)
        remote.pauseProducing()
        stream.write(b"held ")
        stream.write(b"back")
        stream.loseConnection()
        pump.flush()
        self.assertEqual(bytes(theirs.data), b"")
        self.assertFalse(theirs.read_closed)
        remote.resumeProducing()
        self.assertEqual(bytes(theirs.data), b"held back")
        self.assertTrue(theirs.read_closed)


@implementer(IPushProducer)
class OrderRecorder:
    """A push producer that logs when it is resumed."""

    def __init__(self, name: int, log: list[int]) -> None:
        self.name = name
        self.log = log
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.log.append(self.name)

    def stopProducing(self) -> None:
        pass


class ProducerTests(SynchronousTestCase):
    def test_producer_follows_send_window(self) -> None:
        """
        A streaming producer registered on a stream (a forwarded socket) is
        paused when its writes exceed the send window, stays paused while
        the receiver holds back credit, and is resumed when credit returns.
        """
        holder = Holder()
        client, server, pump, _ = iosim_pair(server_handler=holder)
        stream = client.open_stream("h", 1)
        stream.attach(Recorder())
        leg = StringTransport()
        stream.registerProducer(leg, True)
        pump.flush()
        [remote] = holder.streams
        sink = HashSink()
        remote.accept(sink)
        remote.pauseProducing()
        pump.flush()
        stream.write(b"a" * WINDOW)
        self.assertEqual(leg.producerState, "producing")
        stream.write(b"b" * FRAME)
        self.assertEqual(leg.producerState, "paused")
        pump.flush()
        self.assertEqual(leg.producerState, "paused")  # no credit: the reader is paused
        remote.resumeProducing()
        pump.flush()
        self.assertEqual(leg.producerState, "producing")
        self.assertEqual(sink.count, WINDOW + FRAME)

    def test_transport_pause_pauses_each_stream_as_it_writes(self) -> None:
        """
        The MuxProtocol is a streaming producer on its transport: while the
        transport has it paused, a stream's producer is paused as soon as
        that stream writes (or registers), so each adds at most one write to
        the buffer; a stream that stays idle is left alone (no needless
        epoll changes). On resume all held producers resume, except one
        whose bytes still wait for credit.
        """
        acceptor = Acceptor(Recorder)
        client, server, pump, _ = iosim_pair(server_handler=acceptor)
        self.assertIs(client.transport.producer, client)  # type: ignore[union-attr]
        self.assertTrue(client.transport.streamingProducer)  # type: ignore[union-attr]
        streams = [client.open_stream("h", port) for port in (1, 2, 3)]
        legs = []
        for stream in streams:
            stream.attach(Recorder())
            leg = StringTransport()
            stream.registerProducer(leg, True)
            legs.append(leg)
        pump.flush()
        client.pauseProducing()
        streams[1].write(b"y")
        self.assertEqual([leg.producerState for leg in legs], ["producing", "paused", "producing"])
        late = client.open_stream("h", 4)
        late_leg = StringTransport()
        late.registerProducer(late_leg, True)
        self.assertEqual(late_leg.producerState, "paused")
        streams[0].write(b"x" * (WINDOW + 1))  # one byte waits for credit
        self.assertEqual(legs[0].producerState, "paused")
        client.resumeProducing()
        self.assertEqual(
            [leg.producerState for leg in legs + [late_leg]], ["paused", "producing", "producing", "producing"]
        )

    def test_socket_backpressure_reaches_stream_producers(self) -> None:
        """
        With a transport that pauses the mux when its send buffer passes a
        high-water mark (as TCP does), bulk writers on several streams are
        paused by it and resumed as the buffer drains; all data arrives.
        """
        acceptor = Acceptor(HashSink)
        link = Link(server_handler=acceptor, high_water=64 * KIB)
        sources = [PatternSource(2 * MIB, 16 * KIB, salt=i) for i in range(3)]
        writers = []
        for i, source in enumerate(sources):
            stream = link.client.open_stream("h", i + 1)
            stream.attach(Recorder())
            writers.append(StreamingWriter(stream, source))
        for writer in writers:
            writer.start()
        self.assertTrue(link.client.paused)
        self.assertTrue(all(w.paused for w in writers))
        link.pump_all()
        self.assertGreater(link.client_transport.pauses, 1)
        digests = sorted(p.hash.digest() for p in acceptor.protocols)  # type: ignore[attr-defined]
        self.assertEqual(digests, sorted(s.digest() for s in sources))

    def test_resume_rotates_between_streams(self) -> None:
        """
        When the tunnel transport resumes the mux, stream producers are
        resumed starting from a different stream each time, so no stream is
        always served first.
        """
        client, server, pump, _ = iosim_pair(server_handler=Acceptor(Recorder))
        log: list[int] = []
        streams = []
        for port in (1, 2, 3):
            stream = client.open_stream("h", port)
            stream.attach(Recorder())
            stream.registerProducer(OrderRecorder(port, log), True)
            streams.append(stream)
        firsts = []
        for _ in range(3):
            client.pauseProducing()
            for stream in streams:
                stream.write(b"z")  # each is paused as it writes
            del log[:]
            client.resumeProducing()
            self.assertEqual(sorted(log), [1, 2, 3])
            firsts.append(log[0])
        self.assertEqual(sorted(firsts), [1, 2, 3])


class ManyStreamsTests(SynchronousTestCase):
    def test_thousand_concurrent_streams(self) -> None:
        """
        1,000 streams open at once on one session, each with its own data:
        every target end receives exactly its stream's bytes, echoes them
        back, and every stream closes cleanly at both ends.
        """
        acceptor = Acceptor(HalfCloseEcho)
        client, server, pump, _ = iosim_pair(server_handler=acceptor)
        rng = random.Random(1000)
        streams: list[tuple[MuxStream, HalfCloseRecorder, bytes]] = []
        for i in range(1000):
            stream = client.open_stream("svc.internal", 1 + i)
            mine = HalfCloseRecorder()
            stream.attach(mine)
            payload = b"%d:" % i + rng.randbytes(rng.randrange(1, 4096))
            stream.write(payload)
            stream.loseConnection()
            streams.append((stream, mine, payload))
        self.assertEqual(len(client.streams), 1000)
        pump_all(pump)
        self.assertEqual(len(acceptor.streams), 1000)
        by_port = {s.port: p for s, p in zip(acceptor.streams, acceptor.protocols, strict=False)}
        for stream, mine, payload in streams:
            self.assertEqual(bytes(by_port[stream.port].data), payload)  # type: ignore[attr-defined]
            self.assertEqual(bytes(mine.data), payload)
            self.assertIsInstance(mine.lost.value, ConnectionDone)  # type: ignore[union-attr]
        self.assertEqual((client.streams, server.streams), ({}, {}))
        self.assertEqual(client.session.open_streams + server.session.open_streams, 0)


class LargeWriteTests(SynchronousTestCase):
    def test_one_large_write_is_not_copied(self) -> None:
        """
        A single 32 MB C{write} is delivered intact, and waiting for credit
        does not copy what is left of it: the memory allocated while it
        drains stays far below its size (a copy per window update made it
        quadratic in time and doubled memory).
        """
        sink = HashSink()
        client, server, pump, _ = iosim_pair(server_handler=lambda s: s.accept(sink))
        stream = client.open_stream("h", 1)
        stream.attach(Recorder())
        pump.flush()
        payload = random.Random(32).randbytes(32 * MIB)
        tracemalloc.start()
        try:
            stream.write(payload)
            pump_all(pump)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(sink.count, len(payload))
        self.assertEqual(sink.hash.digest(), hashlib.sha256(payload).digest())
        self.assertLess(peak, 4 * MIB)

    def test_bytearray_write_leaves_caller_buffer_free(self) -> None:
        """
        Writing a C{bytearray} larger than the window and then reusing it
        works: the stream keeps its own copy, and the bytes sent are those
        written, not the buffer's later content.
        """
        sink = HashSink()
        client, server, pump, _ = iosim_pair(server_handler=lambda s: s.accept(sink))
        stream = client.open_stream("h", 1)
        stream.attach(Recorder())
        pump.flush()
        buffer = bytearray(b"a" * (WINDOW * 2))
        stream.write(buffer)
        del buffer[:]  # a view of it would make this raise BufferError
        buffer += b"b" * 10
        pump_all(pump)
        self.assertEqual(sink.hash.digest(), hashlib.sha256(b"a" * (WINDOW * 2)).digest())
