"""
KeepaliveWheel: one timer for the keepalive checks of many sessions, and
MuxProtocol's keepalive through it.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.adapter import Keepalive, MuxProtocol
from rtunnel.adapter.wheel import KeepaliveWheel
from rtunnel.mux import ErrorCode
from rtunnel.mux.frames import GoAway, Ping
from tests.adapter_helpers import RawPeer


class Owner:
    def __init__(self, log: list[tuple[str, int, float]], name: str, clock: Clock) -> None:
        self.log, self.name, self.clock = log, name, clock

    def _keepalive_due(self, slot: int) -> None:
        self.log.append((self.name, slot, self.clock.seconds()))


class WheelTests(SynchronousTestCase):
    def test_one_timer_for_many_owners_rounded_up(self) -> None:
        """
        Owners due within the same second share one bucket and one timer,
        which fires at the end of that second; later buckets follow in
        order, each once, with one timer armed at a time.
        """
        clock = Clock()
        wheel = KeepaliveWheel(clock)
        log: list[tuple[str, int, float]] = []
        for name, delay in (("a", 10.2), ("b", 10.9), ("c", 25.0), ("d", 10.0)):
            wheel.schedule(Owner(log, name, clock), delay)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual(len(wheel), 4)
        clock.advance(10.0)
        self.assertEqual(log, [("d", 10, 10.0)])
        clock.advance(0.999)
        self.assertEqual(len(log), 1)
        clock.advance(0.001)
        self.assertEqual(log[1:], [("a", 11, 11.0), ("b", 11, 11.0)])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(14)
        self.assertEqual(log[3:], [("c", 25, 25.0)])
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(len(wheel), 0)

    def test_cancel(self) -> None:
        """A cancelled owner is not called; with nothing left, no timer remains."""
        clock = Clock()
        wheel = KeepaliveWheel(clock)
        log: list[tuple[str, int, float]] = []
        a, b = Owner(log, "a", clock), Owner(log, "b", clock)
        slot_a = wheel.schedule(a, 5)
        slot_b = wheel.schedule(b, 8)
        wheel.cancel(a, slot_a)
        wheel.cancel(a, slot_a)  # twice: nothing
        clock.advance(5)
        self.assertEqual(log, [])
        wheel.cancel(b, slot_b)
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10)
        self.assertEqual(log, [])

    def test_rescheduling_while_firing_and_a_failing_owner(self) -> None:
        """
        An owner may schedule itself again from its call (it lands in a
        later bucket); one whose call raises is logged and the others in
        its bucket are still called.
        """
        clock = Clock()
        wheel = KeepaliveWheel(clock)
        calls: list[float] = []

        class Again:
            def _keepalive_due(self, slot: int) -> None:
                calls.append(clock.seconds())
                if len(calls) < 3:
                    wheel.schedule(self, 0.001)

        class Broken:
            def _keepalive_due(self, slot: int) -> None:
                raise RuntimeError("broken check")

        wheel.schedule(Broken(), 1)
        wheel.schedule(Again(), 1)
        clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        clock.advance(1)
        clock.advance(1)
        self.assertEqual(calls, [1.0, 2.0, 3.0])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_resolution_must_be_positive(self) -> None:
        self.assertRaises(ValueError, KeepaliveWheel, Clock(), 0)


class WheelKeepaliveTests(SynchronousTestCase):
    def _peer(self, clock: Clock, wheel: KeepaliveWheel) -> RawPeer:
        mux = MuxProtocol(
            initiator=False, clock=clock, keepalive=Keepalive(interval=25, timeout=30), keepalive_wheel=wheel
        )
        peer = RawPeer(mux)
        peer.hello()
        peer.received()
        return peer

    def test_sessions_share_one_timer_and_dead_peers_are_found(self) -> None:
        """
        Sessions on one wheel keep one timer between them; a silent peer is
        pinged after the interval and declared dead within the timeout plus
        the wheel's resolution (one second), as with a timer of its own.
        """
        clock = Clock()
        clock.advance(0.5)  # sessions starting mid-second
        wheel = KeepaliveWheel(clock)
        peers = [self._peer(clock, wheel) for _ in range(5)]
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(25.5)
        for peer in peers:
            self.assertEqual([type(f) for f in peer.received()], [Ping])
        alive = peers[0]
        alive.send(Ping(b"12345678", ack=True))  # one peer answers
        clock.advance(4.5)  # 30 s of silence for the others, not yet checked
        self.assertFalse(peers[1].transport.disconnected)
        clock.advance(0.5)
        for peer in peers[1:]:
            self.assertIn(ErrorCode.KEEPALIVE_TIMEOUT, [f.code for f in peer.received() if isinstance(f, GoAway)])
            self.assertTrue(peer.transport.disconnected)
            peer.mux.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(alive.transport.disconnected)
        self.assertEqual(len(wheel), 1)
        alive.mux.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(wheel), 0)
        self.assertEqual(clock.getDelayedCalls(), [])
