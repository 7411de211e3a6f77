"""
Sessions through the Twisted adapter over in-memory transports: opening and
refusing streams, data, half-close, reset, drain, ping, keepalive, limits,
early data and the loss of the tunnel connection.
"""

from __future__ import annotations

import struct

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.adapter import Keepalive, MuxProtocol, MuxStream, StreamAddress, StreamOpenFailed, StreamReset
from rtunnel.mux import ErrorCode, SessionClosing, Settings, StreamLimitReached
from rtunnel.mux.frames import GoAway, Open, OpenFail, Ping
from tests.adapter_helpers import (
    TEST_SETTINGS,
    Acceptor,
    HalfCloseEcho,
    HalfCloseRecorder,
    Holder,
    RawPeer,
    Recorder,
    iosim_pair,
    make_mux,
)


def opened_result(testcase: SynchronousTestCase, stream: MuxStream) -> MuxStream:
    return testcase.successResultOf(stream.opened)


def open_failure(testcase: SynchronousTestCase, stream: MuxStream) -> StreamOpenFailed:
    failure = testcase.failureResultOf(stream.opened, StreamOpenFailed)
    return failure.value  # type: ignore[return-value]


def assert_reset(
    testcase: SynchronousTestCase, reason: Failure | None, code: int, reason_text: str | None = None
) -> None:
    testcase.assertIsNotNone(reason)
    assert reason is not None
    testcase.assertIsInstance(reason.value, StreamReset)
    testcase.assertEqual(reason.value.code, code)
    if reason_text is not None:
        testcase.assertEqual(reason.value.reason, reason_text)


def assert_clean(testcase: SynchronousTestCase, reason: Failure | None) -> None:
    testcase.assertIsNotNone(reason)
    assert reason is not None
    testcase.assertIsInstance(reason.value, ConnectionDone)


class SessionStartTests(SynchronousTestCase):
    def test_ready_after_hellos(self) -> None:
        """
        Neither end is ready before the peer's HELLO arrives; once the HELLOs
        have crossed, C{when_ready} fires on both with the protocol itself.
        """
        clock = Clock()
        client, server, pump = connectedServerAndClient(
            lambda: make_mux(False, clock), lambda: make_mux(True, clock), greet=False, clock=clock
        )
        waiting = [client.when_ready(), server.when_ready()]
        self.assertFalse(client.ready)
        self.assertNoResult(waiting[0])
        self.assertNoResult(waiting[1])
        pump.flush()
        self.assertTrue(client.ready and server.ready)
        self.assertIs(self.successResultOf(waiting[0]), client)
        self.assertIs(self.successResultOf(waiting[1]), server)
        self.assertIs(self.successResultOf(client.when_ready()), client)

    def test_lost_before_ready_fails_waiters(self) -> None:
        """
        If the tunnel connection goes away before the peer's HELLO, waiters
        on C{when_ready} get the reason and C{when_closed} fires.
        """
        mux = make_mux(True, Clock())
        mux.makeConnection(StringTransport())
        ready = mux.when_ready()
        mux.connectionLost(Failure(ConnectionDone("gone")))
        self.failureResultOf(ready, ConnectionDone)
        self.failureResultOf(mux.when_ready(), ConnectionDone)
        self.assertIsInstance(self.successResultOf(mux.when_closed()), ConnectionDone)


class CloseObserverTests(SynchronousTestCase):
    def test_on_closed_calls_each_observer_once_with_its_arguments(self) -> None:
        """
        C{on_closed(callback, *args)} calls C{callback(exception, *args)}
        once the connection is gone, in the order registered, alongside
        C{when_closed}; one that raises is logged and the others are still
        called; registered after the end, it is called at once.
        """
        mux = make_mux(True, Clock())
        mux.makeConnection(StringTransport())
        calls: list[tuple[object, ...]] = []
        errors: list[dict] = []  # type: ignore[type-arg]
        globalLogPublisher.addObserver(errors.append)
        self.addCleanup(globalLogPublisher.removeObserver, errors.append)

        def broken(reason: BaseException) -> None:
            raise RuntimeError("observer bug")

        mux.on_closed(lambda reason, *args: calls.append((type(reason), *args)), "first", 1)
        mux.on_closed(broken)
        closed = mux.when_closed()
        mux.on_closed(lambda reason: calls.append((type(reason), "second")))
        self.assertEqual(calls, [])
        mux.connectionLost(Failure(ConnectionDone("gone")))
        self.assertEqual(calls, [(ConnectionDone, "first", 1), (ConnectionDone, "second")])
        self.assertIsInstance(self.successResultOf(closed), ConnectionDone)
        [failure] = [e for e in errors if e.get("log_failure") is not None]
        self.assertIsInstance(failure["log_failure"].value, RuntimeError)
        self.flushLoggedErrors(RuntimeError)
        mux.on_closed(lambda reason: calls.append((type(reason), "late")))
        self.assertEqual(calls[-1], (ConnectionDone, "late"))
        mux.connectionLost(Failure(ConnectionDone("again")))
        self.assertEqual(len(calls), 3)

    def test_labels_follow_the_transport(self) -> None:
        """The peer and host labels describe the transport's addresses; empty before there is one."""
        mux = make_mux(True, Clock())
        self.assertEqual((mux.peer_label, mux.host_label), ("", ""))
        mux.makeConnection(
            StringTransport(
                peerAddress=IPv4Address("TCP", "192.0.2.7", 40123), hostAddress=IPv6Address("TCP", "::1", 5500)
            )
        )
        self.assertEqual((mux.peer_label, mux.host_label), ("192.0.2.7:40123", "[::1]:5500"))


class OpenTests(SynchronousTestCase):
    def test_open_and_accept(self) -> None:
        """
        A stream opened at one end reaches the other's stream handler with
        its target; accepting it connects the protocol there and fires
        C{opened} at the opener, with odd ids for the initiator.
        """
        acceptor = Acceptor()
        client, server, pump, _ = iosim_pair(server_handler=acceptor)
        stream = client.open_stream("db.internal", 5432)
        self.assertNoResult(stream.opened)
        pump.flush()
        self.assertIs(opened_result(self, stream), stream)
        self.assertEqual(stream.stream_id % 2, 1)
        [remote] = acceptor.streams
        self.assertEqual((remote.host, remote.port, remote.stream_id), ("db.internal", 5432, stream.stream_id))
        self.assertTrue(acceptor.protocols[0].made)  # type: ignore[attr-defined]
        self.assertIs(acceptor.protocols[0].transport, remote)
        self.assertTrue(remote.connected)
        peer = remote.getPeer()
        self.assertIsInstance(peer, StreamAddress)
        self.assertEqual((peer.host, peer.port, peer.stream_id), ("db.internal", 5432, stream.stream_id))

    def test_refuse(self) -> None:
        """
        A handler that refuses makes C{opened} fail with L{StreamOpenFailed}
        carrying the code and reason it gave; the stream is gone on both ends.
        """
        client, server, pump, _ = iosim_pair(
            server_handler=lambda s: s.refuse(ErrorCode.TARGET_REFUSED, "connection refused by 10.0.0.5:22")
        )
        stream = client.open_stream("10.0.0.5", 22)
        pump.flush()
        failure = open_failure(self, stream)
        self.assertEqual(failure.code, ErrorCode.TARGET_REFUSED)
        self.assertEqual(failure.reason, "connection refused by 10.0.0.5:22")
        self.assertEqual(client.streams, {})
        self.assertEqual(server.streams, {})
        self.assertEqual(client.session.open_streams + server.session.open_streams, 0)

    def test_refused_without_handler(self) -> None:
        """
        An end without a stream handler refuses every stream the peer opens
        (TARGET_NOT_ALLOWED).
        """
        client, server, pump, _ = iosim_pair()
        stream = client.open_stream("example.com", 80)
        pump.flush()
        self.assertEqual(open_failure(self, stream).code, ErrorCode.TARGET_NOT_ALLOWED)
        self.assertEqual(server.streams, {})

    def test_failing_handler_refuses(self) -> None:
        """
        A stream handler that raises gets its stream refused with
        INTERNAL_ERROR; the failure is logged and the session goes on.
        """

        def broken(stream: MuxStream) -> None:
            raise ValueError("handler bug")

        client, server, pump, _ = iosim_pair(server_handler=broken)
        stream = client.open_stream("example.com", 80)
        pump.flush()
        self.assertEqual(open_failure(self, stream).code, ErrorCode.INTERNAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertTrue(client.ready and server.ready)

    def test_both_ends_open_at_once(self) -> None:
        """
        Both ends open streams in the same instant: ids never collide (odd
        from the initiator, even from the acceptor) and each stream carries
        its own data.
        """
        client_side, server_side = Acceptor(Recorder), Acceptor(Recorder)
        client, server, pump, _ = iosim_pair(server_handler=server_side, client_handler=client_side)
        from_client = [client.open_stream("a.example", 1000 + i) for i in range(3)]
        from_server = [server.open_stream("b.example", 2000 + i) for i in range(3)]
        for stream in from_client + from_server:
            stream.attach(Recorder())
            stream.write(f"{stream.host}:{stream.port}".encode())
        pump.flush()
        self.assertEqual([s.stream_id for s in from_client], [1, 3, 5])
        self.assertEqual([s.stream_id for s in from_server], [2, 4, 6])
        for stream in from_client + from_server:
            opened_result(self, stream)
        got = sorted(bytes(p.data) for p in server_side.protocols + client_side.protocols)  # type: ignore[attr-defined]
        self.assertEqual(got, sorted(f"{s.host}:{s.port}".encode() for s in from_client + from_server))

    def test_stream_limit_at_opener(self) -> None:
        """
        The peer's max_streams is enforced at the opener:
        C{open_stream} raises L{StreamLimitReached} while that many of our
        streams are live, and works again once one has closed.
        """
        acceptor = Acceptor(HalfCloseEcho)
        client, server, pump, _ = iosim_pair(server_handler=acceptor, server_settings=Settings(max_streams=2))
        streams = [client.open_stream("h", 1), client.open_stream("h", 2)]
        self.assertRaises(StreamLimitReached, client.open_stream, "h", 3)
        for s in streams:
            s.attach(HalfCloseRecorder())
        pump.flush()
        streams[0].loseConnection()
        pump.flush()
        assert_clean(self, streams[0].protocol.lost)  # type: ignore[union-attr]
        third = client.open_stream("h", 3)
        pump.flush()
        opened_result(self, third)

    def test_stream_limit_at_target(self) -> None:
        """
        An OPEN beyond this end's max_streams (a peer that ignored the limit)
        is answered OPEN_FAIL REFUSED_STREAM without reaching the handler,
        and the session continues; at the opener, such an answer fails
        C{opened} with REFUSED_STREAM.
        """
        holder = Holder()
        peer = RawPeer(make_mux(False, Clock(), holder, Settings(max_streams=1)))
        peer.hello()
        peer.send(Open(1, "h", 1), Open(3, "h", 2))
        self.assertEqual([s.stream_id for s in holder.streams], [1])
        refusals = [f for f in peer.received() if isinstance(f, OpenFail)]
        self.assertEqual([(f.stream_id, f.code) for f in refusals], [(3, ErrorCode.REFUSED_STREAM)])
        self.assertTrue(peer.mux.ready)

        opener = RawPeer(make_mux(True, Clock()))
        opener.hello()
        stream = opener.mux.open_stream("h", 1)
        opener.send(OpenFail(stream.stream_id, ErrorCode.REFUSED_STREAM, "too many streams (limit 1)"))
        failure = open_failure(self, stream)
        self.assertEqual((failure.code, failure.reason), (ErrorCode.REFUSED_STREAM, "too many streams (limit 1)"))


class DataTests(SynchronousTestCase):
    def test_data_both_ways(self) -> None:
        """
        Ordinary protocols on both ends of a stream exchange bytes in order,
        in both directions, across several writes.
        """
        acceptor = Acceptor(Recorder)
        client, server, pump, _ = iosim_pair(server_handler=acceptor)
        stream = client.open_stream("h", 1)
        mine = Recorder()
        stream.attach(mine)
        pump.flush()
        theirs = acceptor.protocols[0]
        stream.write(b"GET / HTTP/1.0\r\n")
        stream.writeSequence([b"Host: h\r\n", b"\r\n"])
        pump.flush()
        assert theirs.transport is not None
        theirs.transport.write(b"HTTP/1.0 200 OK\r\n\r\n")
        theirs.transport.write(b"body")
        pump.flush()
        self.assertEqual(bytes(theirs.data), b"GET / HTTP/1.0\r\nHost: h\r\n\r\n")  # type: ignore[attr-defined]
        self.assertEqual(bytes(mine.data), b"HTTP/1.0 200 OK\r\n\r\nbody")
        self.assertIsNone(mine.lost)

    def test_half_close_from_opener(self) -> None:
        """
        The opener ends its direction (FIN): the target's half-closeable
        protocol gets C{readConnectionLost} after all data, keeps sending,
        and both sides see a clean C{connectionLost} only after the target's
        own FIN.
        """
        acceptor = Acceptor(HalfCloseRecorder)
        client, server, pump, _ = iosim_pair(server_handler=acceptor)
        stream = client.open_stream("h", 1)
        mine = HalfCloseRecorder()
        stream.attach(mine)
        stream.write(b"request")
        stream.loseConnection()
        pump.flush()
        theirs = acceptor.protocols[0]
        self.assertEqual(bytes(theirs.data), b"request")  # type: ignore[attr-defined]
        self.assertTrue(theirs.read_closed)  # type: ignore[attr-defined]
        self.assertIsNone(theirs.lost)  # type: ignore[attr-defined]
        assert theirs.transport is not None
        for part in (b"reply 1;", b"reply 2;"):
            theirs.transport.write(part)
            pump.flush()
        self.assertEqual(bytes(mine.data), b"reply 1;reply 2;")
        self.assertFalse(mine.read_closed)
        self.assertIsNone(mine.lost)
        stream.write(b"ignored after FIN")
        theirs.transport.loseConnection()
        pump.flush()
        self.assertTrue(mine.read_closed)
        assert_clean(self, mine.lost)
        assert_clean(self, theirs.lost)  # type: ignore[attr-defined]
        self.assertEqual(bytes(theirs.data), b"request")  # type: ignore[attr-defined]
        self.assertEqual(client.streams, {})
        self.assertEqual(server.streams, {})

    def test_half_close_from_target(self) -> None:
        """
        The target ends its direction first: the opener's half-closeable
        protocol gets C{readConnectionLost} and can still send; the stream
        closes cleanly after the opener's FIN.
        """
        acceptor = Acceptor(HalfCloseRecorder)
        client, server, pump, _ = iosim_pair(server_handler=acceptor)
        stream = client.open_stream("h", 1)
        mine = HalfCloseRecorder()
        stream.attach(mine)
        pump.flush()
        theirs = acceptor.protocols[0]
        assert theirs.transport is not None
        theirs.transport.write(b"banner")
        theirs.transport.loseConnection()
        pump.flush()
        self.assertEqual(bytes(mine.data), b"banner")
        self.assertTrue(mine.read_closed)
        self.assertIsNone(mine.lost)
        stream.write(b"still talking")
        pump.flush()
        self.assertEqual(bytes(theirs.data), b"still talking")  # type: ignore[attr-defined]
        self.assertFalse(theirs.read_closed)  # type: ignore[attr-defined]
        stream.loseConnection()
        pump.flush()
        self.assertTrue(theirs.read_closed)  # type: ignore[attr-defined]
        assert_clean(self, mine.lost)
        assert_clean(self, theirs.lost)  # type: ignore[attr-defined]

    def test_eof_closes_plain_protocol(self) -> None:
        """
        A protocol that is not half-closeable is closed on the peer's FIN,
        like on TCP: it gets C{connectionLost(ConnectionDone)} after the
        data, and the peer sees our FIN follow.
        """
        acceptor = Acceptor(Recorder)
        client, server, pump, _ = iosim_pair(server_handler=acceptor)
        stream = client.open_stream("h", 1)
        mine = HalfCloseRecorder()
        stream.attach(mine)
        stream.write(b"last words")
        stream.loseConnection()
        pump.flush()
        theirs = acceptor.protocols[0]
        self.assertEqual(bytes(theirs.data), b"last words")  # type: ignore[attr-defined]
        assert_clean(self, theirs.lost)  # type: ignore[attr-defined]
        self.assertTrue(mine.read_closed)
        assert_clean(self, mine.lost)
        self.assertEqual(server.streams, {})


class FaultyProtocolTests(SynchronousTestCase):
    def test_raising_protocol_resets_only_its_stream(self) -> None:
        """
        A stream protocol whose C{dataReceived} raises gets its stream reset
        (the peer sees INTERNAL_ERROR, the protocol C{connectionLost} with
        the exception, which is logged), as TCP would drop just that
        connection; other streams in the same input and the tunnel go on.
        """
        holder = Holder()
        client, server, pump, _ = iosim_pair(server_handler=holder)

        class Broken(Recorder):
            def dataReceived(self, data: bytes) -> None:
                raise ZeroDivisionError("application bug")

        streams = [client.open_stream("h", port) for port in (1, 2)]
        mine = [Recorder(), HalfCloseRecorder()]
        for stream, protocol in zip(streams, mine, strict=False):
            stream.attach(protocol)
        pump.flush()
        broken, fine = Broken(), HalfCloseRecorder()
        holder.streams[0].accept(broken)
        holder.streams[1].accept(fine)
        streams[0].write(b"boom")
        streams[1].write(b"unharmed")
        streams[1].loseConnection()
        pump.flush()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        assert_reset(self, mine[0].lost, ErrorCode.INTERNAL_ERROR)
        self.assertIsInstance(broken.lost.value, ZeroDivisionError)  # type: ignore[union-attr]
        self.assertEqual(bytes(fine.data), b"unharmed")
        self.assertTrue(fine.read_closed)
        self.assertTrue(client.ready and server.ready)
        self.assertNoResult(client.when_closed())


class ResetTests(SynchronousTestCase):
    def _open(self) -> tuple[MuxProtocol, MuxProtocol, object, MuxStream, Recorder, Recorder]:
        acceptor = Acceptor(Recorder)
        client, server, pump, _ = iosim_pair(server_handler=acceptor)
        stream = client.open_stream("h", 1)
        mine = Recorder()
        stream.attach(mine)
        pump.flush()
        return client, server, pump, stream, mine, acceptor.protocols[0]  # type: ignore[return-value]

    def test_reset_from_opener(self) -> None:
        """
        C{reset(code, reason)} at the opener ends both protocols with
        L{StreamReset} carrying that code and reason.
        """
        client, server, pump, stream, mine, theirs = self._open()
        stream.reset(ErrorCode.CONNECTION_RESET, "leg reset by peer")
        pump.flush()  # type: ignore[attr-defined]
        assert_reset(self, theirs.lost, ErrorCode.CONNECTION_RESET, "leg reset by peer")
        assert_reset(self, mine.lost, ErrorCode.CONNECTION_RESET, "leg reset by peer")
        self.assertEqual((client.streams, server.streams), ({}, {}))

    def test_reset_from_target(self) -> None:
        """
        A reset from the target end reaches the opener's protocol with its
        code and reason; data written afterwards is dropped silently.
        """
        client, server, pump, stream, mine, theirs = self._open()
        assert theirs.transport is not None
        theirs.transport.reset(ErrorCode.TARGET_ERROR, "backend crashed")  # type: ignore[attr-defined]
        stream.write(b"too late")
        pump.flush()  # type: ignore[attr-defined]
        assert_reset(self, mine.lost, ErrorCode.TARGET_ERROR, "backend crashed")
        assert_reset(self, theirs.lost, ErrorCode.TARGET_ERROR)
        self.assertEqual(bytes(theirs.data), b"")

    def test_abort_connection(self) -> None:
        """
        C{abortConnection} resets the stream with CANCEL, dropping bytes
        still waiting for credit; the peer's protocol sees the reset.
        """
        client, server, pump, stream, mine, theirs = self._open()
        stream.write(b"x" * (2 * TEST_SETTINGS.initial_window))  # more than one window: some waits
        self.assertTrue(stream.send_blocked)
        stream.abortConnection()
        pump.flush()  # type: ignore[attr-defined]
        assert_reset(self, theirs.lost, ErrorCode.CANCEL)
        assert_reset(self, mine.lost, ErrorCode.CANCEL)
        self.assertLessEqual(len(theirs.data), TEST_SETTINGS.initial_window)
        self.assertFalse(stream.send_blocked)


class DrainTests(SynchronousTestCase):
    def test_drain_lets_streams_finish(self) -> None:
        """
        C{drain(grace)} sends GOAWAY: the peer is told (C{on_goaway}), can
        open no more streams, an OPEN already in flight is refused with
        GOING_AWAY, existing streams keep flowing and finish cleanly, and
        the connection closes as soon as the last one is done.
        """
        acceptor = Acceptor(HalfCloseEcho)
        client, server, pump, clock = iosim_pair(server_handler=acceptor)
        told: list[tuple[int, str]] = []
        client.on_goaway = lambda code, reason: told.append((code, reason))
        stream = client.open_stream("h", 1)
        mine = HalfCloseRecorder()
        stream.attach(mine)
        pump.flush()
        in_flight = client.open_stream("h", 2)
        done = server.drain(30.0, "maintenance")
        pump.flush()
        self.assertEqual(told, [(ErrorCode.GOING_AWAY, "maintenance")])
        self.assertEqual(client.peer_goaway, (ErrorCode.GOING_AWAY, "maintenance"))
        self.assertEqual(open_failure(self, in_flight).code, ErrorCode.GOING_AWAY)
        self.assertRaises(SessionClosing, client.open_stream, "h", 3)
        self.assertFalse(client.accepting_streams)
        stream.write(b"still served")
        pump.flush()
        self.assertEqual(bytes(mine.data), b"still served")
        self.assertNoResult(done)
        stream.loseConnection()
        pump.flush()
        assert_clean(self, mine.lost)
        self.assertTrue(mine.read_closed)
        self.assertIsInstance(self.successResultOf(done), ConnectionDone)
        self.successResultOf(client.when_closed())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_drain_grace_expires(self) -> None:
        """
        Streams still open when the grace period runs out are reset with
        GOING_AWAY and the connection is closed.
        """
        acceptor = Acceptor(HalfCloseRecorder)
        client, server, pump, clock = iosim_pair(server_handler=acceptor)
        stream = client.open_stream("h", 1)
        mine = HalfCloseRecorder()
        stream.attach(mine)
        pump.flush()
        done = server.drain(10.0)
        pump.flush()
        clock.advance(9.9)
        pump.flush()
        self.assertNoResult(done)
        self.assertIsNone(mine.lost)
        clock.advance(0.1)
        pump.flush()
        self.successResultOf(done)
        assert_reset(self, acceptor.protocols[0].lost, ErrorCode.GOING_AWAY)  # type: ignore[attr-defined]
        assert_reset(self, mine.lost, ErrorCode.GOING_AWAY)
        self.successResultOf(client.when_closed())

    def test_drain_without_streams_closes_at_once(self) -> None:
        """
        Draining an idle session closes it straight away, without even
        scheduling the grace timer (a server draining thousands of idle
        sessions would only schedule and cancel them).
        """
        client, server, pump, clock = iosim_pair()
        now = clock.seconds()
        done = server.drain(60.0)
        self.assertNotIn(now + 60.0, [call.getTime() for call in clock.getDelayedCalls()])
        pump.flush()
        self.successResultOf(done)
        self.successResultOf(client.when_closed())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_terminate(self) -> None:
        """
        C{terminate(code, reason)} ends the session at once: every stream on
        both ends is reset with that code, and the connection closes.
        """
        acceptor = Acceptor(Recorder)
        client, server, pump, _ = iosim_pair(server_handler=acceptor)
        stream = client.open_stream("h", 1)
        mine = Recorder()
        stream.attach(mine)
        pump.flush()
        client.terminate(ErrorCode.SESSION_REPLACED, "newer session")
        pump.flush()
        assert_reset(self, mine.lost, ErrorCode.SESSION_REPLACED)
        assert_reset(self, acceptor.protocols[0].lost, ErrorCode.SESSION_REPLACED, "newer session")  # type: ignore[attr-defined]
        self.successResultOf(server.when_closed())
        self.successResultOf(client.when_closed())

    def test_terminate_from_inside_data_received(self) -> None:
        """
        C{terminate} called by a stream's protocol while the mux is
        delivering input still gets its RESETs and GOAWAY to the peer
        before the connection closes: the peer's streams see the code, not
        a lost tunnel, and no later event of that input is acted on.
        """
        holder = Holder()
        client, server, pump, _ = iosim_pair(server_handler=holder)

        class Terminator(Recorder):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                server.terminate(ErrorCode.NOT_AUTHORIZED, "credentials revoked")

        stream = client.open_stream("h", 1)
        mine = Recorder()
        stream.attach(mine)
        pump.flush()
        holder.streams[0].accept(Terminator())
        stream.write(b"trigger")
        late = client.open_stream("h", 2)  # its OPEN follows in the same input
        pump.flush()
        assert_reset(self, mine.lost, ErrorCode.NOT_AUTHORIZED, "credentials revoked")
        self.assertEqual(open_failure(self, late).code, ErrorCode.NOT_AUTHORIZED)
        self.assertEqual(len(holder.streams), 1)
        self.successResultOf(client.when_closed())
        self.successResultOf(server.when_closed())

    def test_protocol_error_ends_session(self) -> None:
        """
        Garbage from the peer ends the session: streams are reset with
        PROTOCOL_ERROR, a GOAWAY goes out and the connection is closed.
        """
        acceptor = Acceptor(Recorder)
        peer = RawPeer(make_mux(False, Clock(), acceptor))
        peer.hello()
        peer.send(Open(1, "h", 1))
        peer.mux.dataReceived(struct.pack(">BBII", 0x7F, 0, 0, 0))  # unknown frame type
        self.flushLoggedErrors()
        assert_reset(self, acceptor.protocols[0].lost, ErrorCode.PROTOCOL_ERROR)  # type: ignore[attr-defined]
        self.assertIn(ErrorCode.PROTOCOL_ERROR, [f.code for f in peer.received() if isinstance(f, GoAway)])
        self.assertTrue(peer.transport.disconnecting)


class PingTests(SynchronousTestCase):
    def test_ping_measures_rtt(self) -> None:
        """
        C{ping()} sends a PING; its answer sets C{last_rtt} to the time
        between the two by the injected clock.
        """
        client, server, pump, clock = iosim_pair()
        self.assertIsNone(client.last_rtt)
        client.ping()
        pump.pump()  # PING reaches the server; its PONG is queued
        clock.advance(0.25)
        pump.flush()
        self.assertEqual(client.last_rtt, 0.25)
        self.assertIsNone(server.last_rtt)

    def test_unsolicited_pong_ignored(self) -> None:
        """A PING+ACK that answers nothing leaves C{last_rtt} alone."""
        peer = RawPeer(make_mux(True, Clock()))
        peer.hello()
        peer.send(Ping(b"12345678", ack=True))
        self.assertIsNone(peer.mux.last_rtt)
        self.assertTrue(peer.mux.ready)


class KeepaliveTests(SynchronousTestCase):
    def test_idle_session_pings_and_lives(self) -> None:
        """
        An idle session pings every interval; a peer that answers keeps it
        alive far beyond the timeout.
        """
        client, server, pump, clock = iosim_pair(keepalive=Keepalive(interval=10, timeout=30))
        for _ in range(12):
            clock.advance(10)
            pump.flush()
        self.assertEqual(client.last_rtt, 0.0)
        self.assertTrue(client.ready and server.ready)
        self.assertNoResult(client.when_closed())

    def test_silent_peer_declared_dead(self) -> None:
        """
        A peer from which nothing arrives is pinged after one interval and
        declared dead after the timeout: GOAWAY KEEPALIVE_TIMEOUT, streams
        reset, transport aborted.
        """
        clock = Clock()
        peer = RawPeer(make_mux(True, clock, keepalive=Keepalive(interval=10, timeout=30)))
        peer.hello()
        stream = peer.mux.open_stream("h", 1)
        mine = Recorder()
        stream.attach(mine)
        peer.received()
        clock.advance(10)
        self.assertEqual([type(f) for f in peer.received()], [Ping])
        clock.advance(19.9)
        self.assertIsNone(mine.lost)
        self.assertFalse(peer.transport.disconnecting)
        clock.advance(0.1)
        self.assertIn(ErrorCode.KEEPALIVE_TIMEOUT, [f.code for f in peer.received() if isinstance(f, GoAway)])
        self.assertTrue(peer.transport.disconnected)  # aborted, not a graceful close
        assert_reset(self, mine.lost, ErrorCode.KEEPALIVE_TIMEOUT)
        self.assertEqual(open_failure(self, stream).code, ErrorCode.KEEPALIVE_TIMEOUT)

    def test_any_bytes_count_as_life(self) -> None:
        """
        Any frame from the peer counts as life, not only answers to our
        PINGs: a peer that never answers but sends something every 20 s
        is never declared dead with a 30 s timeout, and a session that
        receives every 5 s does not ping at all.
        """
        clock = Clock()
        peer = RawPeer(make_mux(True, clock, keepalive=Keepalive(interval=10, timeout=30)))
        peer.hello()
        for _ in range(10):
            clock.advance(20)
            peer.send(Ping(b"peer-pin"))
        self.assertTrue(peer.mux.ready)
        self.assertFalse(peer.transport.disconnecting)
        peer.received()
        for _ in range(10):
            clock.advance(5)
            peer.send(Ping(b"peer-pin"))
        self.assertEqual([f for f in peer.received() if isinstance(f, Ping) and not f.ack], [])


class EarlyDataTests(SynchronousTestCase):
    def test_early_data_delivered_after_accept(self) -> None:
        """
        Bytes and FIN written before OPEN_OK travel as early data, wait at
        the target end while it decides, and reach the protocol it accepts
        with, followed by C{readConnectionLost}; bytes beyond the initial
        window follow once credit returns.
        """
        holder = Holder()
        client, server, pump, _ = iosim_pair(server_handler=holder)
        stream = client.open_stream("h", 1)
        mine = HalfCloseRecorder()
        stream.attach(mine)
        payload = bytes(range(256)) * 4096  # 1 MiB: four initial windows
        stream.write(payload)
        stream.loseConnection()
        pump.flush()
        [remote] = holder.streams
        self.assertNoResult(stream.opened)
        theirs = HalfCloseRecorder()
        remote.accept(theirs)
        pump.flush()
        opened_result(self, stream)
        self.assertEqual(bytes(theirs.data), payload)
        self.assertTrue(theirs.read_closed)

    def test_early_data_discarded_on_refusal(self) -> None:
        """
        Early data held for a stream that is then refused is dropped: no
        protocol ever sees it, the opener's protocol sees the refusal, and
        nothing of the stream remains at either end.
        """
        holder = Holder()
        client, server, pump, _ = iosim_pair(server_handler=holder)
        stream = client.open_stream("h", 1)
        mine = Recorder()
        stream.attach(mine)
        stream.write(b"secret early bytes")
        pump.flush()
        [remote] = holder.streams
        remote.refuse(ErrorCode.TARGET_NOT_ALLOWED, "not on the allowlist")
        pump.flush()
        self.assertEqual(open_failure(self, stream).code, ErrorCode.TARGET_NOT_ALLOWED)
        assert_reset(self, mine.lost, ErrorCode.TARGET_NOT_ALLOWED, "not on the allowlist")
        self.assertIsNone(remote.protocol)
        self.assertFalse(remote._inbuf)
        self.assertEqual((client.streams, server.streams), ({}, {}))
        self.assertEqual(server.session.open_streams, 0)

    def test_accept_after_opener_cancelled(self) -> None:
        """
        If the opener gives up (RESET CANCEL) while the target end is still
        connecting, a later C{accept} does not raise: the protocol is
        connected and at once told the stream was reset, so it can close
        its own leg.
        """
        holder = Holder()
        client, server, pump, _ = iosim_pair(server_handler=holder)
        stream = client.open_stream("h", 1)
        pump.flush()
        stream.abortConnection()
        self.assertEqual(open_failure(self, stream).code, ErrorCode.CANCEL)
        pump.flush()
        [remote] = holder.streams
        self.assertTrue(remote.disconnected)
        late = Recorder()
        remote.accept(late)
        self.assertTrue(late.made)
        self.assertFalse(remote.connected)
        assert_reset(self, late.lost, ErrorCode.CANCEL)
        remote.refuse(ErrorCode.TARGET_ERROR, "no-op once gone")
        self.assertEqual(server.streams, {})


class TunnelLostTests(SynchronousTestCase):
    def test_connection_lost_resets_streams(self) -> None:
        """
        When the tunnel connection goes away every open stream's protocol
        gets L{StreamReset} CONNECTION_RESET, pending opens fail with
        L{StreamOpenFailed}, and C{when_closed} fires with the reason.
        """
        acceptor = Acceptor(Recorder)
        client, server, pump, _ = iosim_pair(server_handler=acceptor)
        established = client.open_stream("h", 1)
        mine = Recorder()
        established.attach(mine)
        pump.flush()
        pending = client.open_stream("h", 2)
        closed = client.when_closed()
        client.connectionLost(Failure(ConnectionDone("cable cut")))
        assert_reset(self, mine.lost, ErrorCode.CONNECTION_RESET)
        self.assertIn("cable cut", mine.lost.value.reason)  # type: ignore[union-attr]
        self.assertEqual(open_failure(self, pending).code, ErrorCode.CONNECTION_RESET)
        self.assertIn("cable cut", str(self.successResultOf(closed)))
        self.assertEqual(client.streams, {})
        self.assertFalse(client.ready)

    def test_no_open_after_connection_lost(self) -> None:
        """
        Opening a stream on a session whose connection is gone raises
        L{SessionClosing} instead of returning a stream that never opens.
        """
        client, server, pump, _ = iosim_pair()
        client.connectionLost(Failure(ConnectionDone()))
        self.assertRaises(SessionClosing, client.open_stream, "h", 1)
