"""
Replicas on L{MuxProtocol} (issue 13 section 2): the server's end sends its
replica set (L{MuxProtocol.send_replicas}), the site's end keeps the last
(L{MuxProtocol.peer_replicas}) and tells its observers at the end of the
input batch that brought it, as the protocol settles its other outcomes;
mixed versions in both directions keep everything else working.

Pairs are two L{MuxProtocol}s joined in memory (iosim, on a L{Clock}); the
ordering tests drive one protocol with hand-made reads (L{RawPeer}).
"""

from __future__ import annotations

from attrs import evolve
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.adapter import MuxProtocol, TunnelState
from rtunnel.address import HostPort
from rtunnel.mux import ErrorCode, MuxUsageError, Settings
from rtunnel.mux.frames import GoAway, Hello, ReplicaEntry, Replicas, encode
from rtunnel.mux.settings import ALL_CAPABILITIES, CAP_SERVICES
from tests.adapter_helpers import TEST_SETTINGS, Acceptor, RawPeer, make_mux
from tests.common import Echo, Recorder, joined_muxes, pump_all

FULL = evolve(TEST_SETTINGS, capabilities=ALL_CAPABILITIES)
#: The release before replicas: named services, no REPLICAS.
SERVICES_ONLY = evolve(TEST_SETTINGS, capabilities=CAP_SERVICES)
WEB = {"web": HostPort("127.0.0.1", 8080)}

A = Replicas("a:7000", [ReplicaEntry("a:7000"), ReplicaEntry("b:7000")])
B = Replicas("a:7000", [ReplicaEntry("a:7000"), ReplicaEntry("b:7000"), ReplicaEntry("c:7000", "10.0.0.3:7000")])


def hello(capabilities: int = ALL_CAPABILITIES) -> Hello:
    s = TEST_SETTINGS
    return Hello(s.version, s.max_frame_size, s.initial_window, s.max_streams, capabilities)


def one_read(*frames: object) -> bytes:
    return b"".join(encode(frame) for frame in frames)  # type: ignore[arg-type]


class Pair:
    """A site (initiator, accepting streams with echoes) and a tunnel server joined in memory, greeted."""

    def __init__(self, site: Settings = FULL, server: Settings = FULL) -> None:
        self.clock = Clock()
        self.acceptor = Acceptor(Echo)
        self.site, self.server, self.pump = joined_muxes(
            self.clock,
            lambda: MuxProtocol(
                initiator=True,
                clock=self.clock,
                settings=site,
                stream_handler=self.acceptor,
                services=WEB,
                label="site",
            ),
            lambda: MuxProtocol(initiator=False, clock=self.clock, settings=server, label="server"),
        )
        self.seen: list[Replicas] = []
        self.site.add_replicas_observer(self.seen.append)

    def flush(self) -> None:
        pump_all(self.pump)

    def echo(self, data: bytes) -> bytes:
        """Send C{data} on a new stream from the server to the site's echo; return what came back."""
        recorder = Recorder()
        stream = self.server.open_stream("10.0.0.5", 554)
        stream.attach(recorder)
        stream.write(data)
        self.flush()
        return recorder.received


class ObserverTests(SynchronousTestCase):
    def test_told_and_kept(self) -> None:
        """Each REPLICAS the server sends is told to the site's observers and kept as peer_replicas."""
        pair = Pair()
        self.assertTrue(pair.site.replicas_negotiated and pair.server.replicas_negotiated)
        self.assertIsNone(pair.site.peer_replicas)
        pair.server.send_replicas(A)
        pair.flush()
        self.assertEqual(pair.seen, [A])
        self.assertEqual(pair.site.peer_replicas, A)
        pair.server.send_replicas(B)
        pair.flush()
        self.assertEqual(pair.seen, [A, B])
        self.assertEqual(pair.site.peer_replicas, B)
        self.assertIsNone(pair.server.peer_replicas)
        self.assertEqual(pair.site.state, TunnelState.OPEN)

    def test_after_the_whole_batch(self) -> None:
        """
        Observers hear of each REPLICAS of a read in order, once the whole
        read was processed: here a graceful GOAWAY that came after both is
        already known, and peer_replicas is already the last set.
        """
        mux = make_mux(True, Clock(), settings=FULL)
        RawPeer(mux)
        told: list[tuple[Replicas, object, object]] = []
        mux.add_replicas_observer(lambda r: told.append((r, mux.peer_goaway, mux.peer_replicas)))
        mux.dataReceived(one_read(hello(), A, B, GoAway(0, ErrorCode.NO_ERROR, "draining")))
        self.assertEqual(told, [(A, (ErrorCode.NO_ERROR, "draining"), B), (B, (ErrorCode.NO_ERROR, "draining"), B)])

    def test_with_the_hello(self) -> None:
        """
        A REPLICAS in the read of the HELLO is told after when_ready fired,
        so an observer added by a when_ready callback hears of it too.
        """
        mux = make_mux(True, Clock(), settings=FULL)
        RawPeer(mux)
        order: list[object] = []
        mux.add_replicas_observer(lambda r: order.append(("early", r)))

        def ready(m: MuxProtocol) -> None:
            order.append("ready")
            m.add_replicas_observer(lambda r: order.append(("late", r)))

        mux.when_ready().addCallback(ready)
        mux.dataReceived(one_read(hello(), A))
        self.assertEqual(order, ["ready", ("early", A), ("late", A)])

    def test_observer_closes_a_duplicate(self) -> None:
        """
        An observer may end the session it is told about (a site closing a
        second session to a replica it already holds): the server sees
        GOAWAY NO_ERROR with the reason, and the connection closes.
        """
        pair = Pair()
        pair.site.add_replicas_observer(
            lambda r: pair.site.terminate(ErrorCode.NO_ERROR, f"already connected to replica {r.own}")
        )
        pair.server.send_replicas(A)
        pair.flush()
        self.assertEqual(pair.seen, [A])
        self.assertEqual(pair.server.peer_goaway, (ErrorCode.NO_ERROR, "already connected to replica a:7000"))
        self.assertEqual((pair.site.state, pair.server.state), (TunnelState.CLOSED, TunnelState.CLOSED))

    def test_not_told_again(self) -> None:
        """An observer added after a REPLICAS is told only of later ones (peer_replicas has the last)."""
        pair = Pair()
        pair.server.send_replicas(A)
        pair.flush()
        late: list[Replicas] = []
        pair.site.add_replicas_observer(late.append)
        pair.flush()
        self.assertEqual(late, [])
        pair.server.send_replicas(B)
        pair.flush()
        self.assertEqual(late, [B])

    def test_failing_observer(self) -> None:
        """An observer that raises is logged; the other observers and the session go on."""
        pair = Pair()
        calls: list[Replicas] = []

        def broken(replicas: Replicas) -> None:
            calls.append(replicas)
            raise ZeroDivisionError("observer bug")

        pair.site.add_replicas_observer(broken)
        after: list[Replicas] = []
        pair.site.add_replicas_observer(after.append)
        pair.server.send_replicas(A)
        pair.flush()
        pair.server.send_replicas(B)
        pair.flush()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        self.assertEqual((pair.seen, calls, after), ([A, B], [A, B], [A, B]))
        self.assertEqual(pair.site.state, TunnelState.OPEN)
        self.assertEqual(pair.echo(b"still flowing"), b"still flowing")


class SendTests(SynchronousTestCase):
    def test_caller_errors(self) -> None:
        """The site's end cannot send REPLICAS, nor a server's end to a site without the capability."""
        pair = Pair()
        with self.assertRaises(MuxUsageError):
            pair.site.send_replicas(A)
        old = Pair(site=SERVICES_ONLY)
        with self.assertRaises(MuxUsageError) as raised:
            old.server.send_replicas(A)
        self.assertIn("capability", str(raised.exception))
        server = make_mux(False, Clock(), settings=FULL)
        RawPeer(server)
        with self.assertRaises(MuxUsageError) as raised:
            server.send_replicas(A)  # before the site's HELLO
        self.assertIn("HELLO", str(raised.exception))

    def test_quiet_once_closing_or_gone(self) -> None:
        """Once the session is closing or the connection gone, send_replicas does nothing and raises nothing."""
        pair = Pair()
        pair.server.terminate(ErrorCode.NOT_AUTHORIZED, "revoked")
        self.assertEqual(pair.server.state, TunnelState.CLOSING)
        pair.server.send_replicas(A)
        pair.flush()
        self.assertEqual(pair.server.state, TunnelState.CLOSED)
        pair.server.send_replicas(A)
        self.assertEqual(pair.seen, [])
        self.assertIsNone(pair.site.peer_replicas)

    def test_during_a_drain(self) -> None:
        """A draining server still tells the site (its streams go on meanwhile)."""
        pair = Pair()
        pair.server.open_stream("10.0.0.5", 554)
        pair.flush()
        pair.server.drain(30.0)
        self.assertEqual(pair.server.state, TunnelState.DRAINING)
        pair.server.send_replicas(A)
        pair.flush()
        self.assertEqual(pair.seen, [A])


class RefusalTests(SynchronousTestCase):
    def test_received_by_the_server(self) -> None:
        """A REPLICAS from a site ends the session: GOAWAY PROTOCOL_ERROR, observers not told."""
        server = make_mux(False, Clock(), settings=FULL)
        peer = RawPeer(server)
        told: list[Replicas] = []
        server.add_replicas_observer(told.append)
        server.dataReceived(one_read(hello(), A))
        goaways = [f for f in peer.received() if isinstance(f, GoAway)]
        self.assertEqual(
            [(g.code, g.reason) for g in goaways],
            [(ErrorCode.PROTOCOL_ERROR, "REPLICAS frame from the initiator (only the tunnel server sends them)")],
        )
        self.assertEqual(server.state, TunnelState.CLOSING)
        self.assertEqual(told, [])
        server.connectionLost(Failure(ConnectionError("closed")))

    def test_received_without_the_capability(self) -> None:
        """A site that did not offer the capability takes a REPLICAS for a protocol error."""
        site = make_mux(True, Clock(), settings=SERVICES_ONLY)
        peer = RawPeer(site)
        told: list[Replicas] = []
        site.add_replicas_observer(told.append)
        site.dataReceived(one_read(hello(), A))
        goaways = [f for f in peer.received() if isinstance(f, GoAway)]
        self.assertEqual(
            [(g.code, g.reason) for g in goaways],
            [(ErrorCode.PROTOCOL_ERROR, "REPLICAS frame without the capability in both HELLOs")],
        )
        self.assertEqual(told, [])
        self.assertIsNone(site.peer_replicas)


class MixedVersionTests(SynchronousTestCase):
    """One end without CAP_REPLICAS (Settings(capabilities=CAP_SERVICES)), in both directions."""

    def check(self, pair: Pair) -> None:
        self.assertFalse(pair.site.replicas_negotiated or pair.server.replicas_negotiated)
        self.assertRaises(MuxUsageError, pair.server.send_replicas, A)
        # SERVICES still travel.
        self.assertEqual(dict(self.successResultOf(pair.server.when_services()) or {}), WEB)
        # Streams still work: an echo through the site.
        self.assertEqual(pair.echo(b"ping"), b"ping")
        self.assertEqual(pair.seen, [])
        self.assertIsNone(pair.site.peer_replicas)
        self.assertEqual((pair.site.state, pair.server.state), (TunnelState.OPEN, TunnelState.OPEN))

    def test_old_site_new_server(self) -> None:
        self.check(Pair(site=SERVICES_ONLY))

    def test_new_site_old_server(self) -> None:
        self.check(Pair(server=SERVICES_ONLY))
