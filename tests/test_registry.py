"""
SiteRegistry: one live session per site, takeover, waiting opens, limits.

Sessions are real L{MuxProtocol} pairs joined in memory; time is a L{Clock}.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.adapter import MuxStream
from rtunnel.mux import ErrorCode, Settings
from rtunnel.roles.registry import SiteRegistry, SiteUnavailable
from tests.roles_helpers import Holder, Recorder, mux_pair, pump_all


class Events:
    def __init__(self) -> None:
        self.connected: list[tuple[str, str]] = []
        self.disconnected: list[str] = []

    def registry(self, clock: Clock, **kwargs: object) -> SiteRegistry:
        return SiteRegistry(
            clock,
            on_connected=lambda site, peer: self.connected.append((site, peer)),
            on_disconnected=self.disconnected.append,
            **kwargs,  # type: ignore[arg-type]
        )


class RegisterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events = Events()
        self.registry = self.events.registry(self.clock)

    def test_register_makes_the_session_live(self) -> None:
        """
        A registered session is the site's live session, reported to
        on_connected with its peer and listed in connected_sites.
        """
        server, _, _ = mux_pair(self.clock)
        self.assertIsNone(self.registry.session_for("alpha"))
        self.registry.register("alpha", server, "192.0.2.7:40123")
        self.assertIs(self.registry.session_for("alpha"), server)
        self.assertIsNone(self.registry.session_for("beta"))
        self.assertEqual(self.events.connected, [("alpha", "192.0.2.7:40123")])
        self.assertEqual(self.registry.connected_sites(), {"alpha": "192.0.2.7:40123"})
        self.assertEqual(self.registry.sessions(), [server])

    def test_takeover_replaces_and_terminates_the_old_session(self) -> None:
        """
        A second session of the same site replaces the first at once; the
        first is ended with SESSION_REPLACED, which its site sees, and its
        end does not mark the site disconnected.
        """
        old_server, old_site, old_pump = mux_pair(self.clock)
        new_server, _, _ = mux_pair(self.clock)
        self.registry.register("alpha", old_server, "old:1")
        self.registry.register("alpha", new_server, "new:2")
        self.assertIs(self.registry.session_for("alpha"), new_server)
        pump_all(old_pump)
        self.assertEqual(old_site.peer_goaway[0], ErrorCode.SESSION_REPLACED)  # type: ignore[index]
        self.successResultOf(old_server.when_closed())
        self.successResultOf(old_site.when_closed())
        self.assertEqual(self.events.disconnected, [])
        self.assertIs(self.registry.session_for("alpha"), new_server)
        self.assertEqual(self.registry.connected_sites(), {"alpha": "new:2"})

    def test_replacing_a_young_session_warns_of_duplicate_sites(self) -> None:
        """
        Replacing a session that is less than a minute old is what two site
        processes sharing one identity do to each other: it is logged as a
        warning naming both peers; replacing an old session is not.
        """
        from twisted.logger import LogLevel, globalLogPublisher

        warnings: list[dict] = []
        observer = lambda event: warnings.append(event) if event.get("log_level") is LogLevel.warn else None  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        first, second, third = (mux_pair(self.clock)[0] for _ in range(3))
        self.registry.register("alpha", first, "10.0.0.1:1")
        self.clock.advance(3600)
        self.registry.register("alpha", second, "10.0.0.1:2")
        self.assertEqual(warnings, [])
        self.clock.advance(5)
        self.registry.register("alpha", third, "10.0.0.2:3")
        self.assertEqual(len(warnings), 1)
        self.assertEqual((warnings[0]["peer"], warnings[0]["oldPeer"]), ("10.0.0.2:3", "10.0.0.1:2"))

    def test_draining_old_session_is_left_to_finish(self) -> None:
        """
        A session that is already draining (the site sent GOAWAY before
        reconnecting) is not terminated by the takeover: its open stream
        keeps carrying bytes until it ends by itself.
        """
        holder = Holder()
        old_server, old_site, old_pump = mux_pair(self.clock, holder)
        self.registry.register("alpha", old_server, "old:1")
        stream = old_server.open_stream("10.0.0.5", 554)
        pump_all(old_pump)
        (site_stream,) = holder.streams
        site_stream.accept(None)
        received = Recorder()
        site_stream.attach(received)
        old_site.drain(30.0, "site restarting")
        pump_all(old_pump)
        self.assertFalse(old_server.accepting_streams)

        new_server, _, _ = mux_pair(self.clock)
        self.registry.register("alpha", new_server, "new:2")
        self.assertIs(self.registry.session_for("alpha"), new_server)
        stream.write(b"still flowing")
        pump_all(old_pump)
        self.assertEqual(bytes(received.data), b"still flowing")
        self.assertIsNone(old_site.peer_goaway)  # the server sent no GOAWAY
        self.assertNoResult(old_server.when_closed())

    def test_end_of_live_session_marks_site_disconnected(self) -> None:
        """
        When the live session ends, on_disconnected is called once with the
        site and the site has no session any more.
        """
        server, site, pump = mux_pair(self.clock)
        self.registry.register("alpha", server, "p:1")
        site.terminate(ErrorCode.NO_ERROR, "bye")
        pump_all(pump)
        self.assertEqual(self.events.disconnected, ["alpha"])
        self.assertIsNone(self.registry.session_for("alpha"))
        self.assertEqual(self.registry.connected_sites(), {})

    def test_replaced_session_end_after_new_one_keeps_site_connected(self) -> None:
        """
        The replaced session's end, even when it comes later than the
        takeover, leaves the new session live and on_disconnected uncalled;
        the new session's end then reports the site disconnected once.
        """
        old_server, _, old_pump = mux_pair(self.clock)
        new_server, new_site, new_pump = mux_pair(self.clock)
        self.registry.register("alpha", old_server, "old:1")
        self.registry.register("alpha", new_server, "new:2")
        pump_all(old_pump)  # the old connection closes only now
        self.assertEqual(self.events.disconnected, [])
        new_site.terminate(ErrorCode.NO_ERROR, "bye")
        pump_all(new_pump)
        self.assertEqual(self.events.disconnected, ["alpha"])

    def test_cut_terminates_the_live_session(self) -> None:
        """
        cut() ends the site's live session with the given code (what
        revocation uses) and says whether there was one.
        """
        server, site, pump = mux_pair(self.clock)
        self.registry.register("alpha", server, "p:1")
        self.assertTrue(self.registry.cut("alpha", ErrorCode.NOT_AUTHORIZED, "site-revoked"))
        pump_all(pump)
        self.assertEqual(site.peer_goaway, (ErrorCode.NOT_AUTHORIZED, "site-revoked"))
        self.assertFalse(self.registry.cut("beta", ErrorCode.NOT_AUTHORIZED, "x"))


class WaitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events = Events()

    def test_wait_fails_after_the_open_timeout(self) -> None:
        """
        An open for a site that is not connected waits up to the open
        timeout, then fails with SiteUnavailable naming the site and the
        timeout.
        """
        registry = self.events.registry(self.clock)
        d = registry.open("alpha", "10.0.0.5", 554, 5.0)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, SiteUnavailable)
        self.assertEqual(failure.value.site, "alpha")
        self.assertIn("within 5s", str(failure.value))
        self.assertIn("'alpha'", str(failure.value))

    def test_site_connecting_in_time_serves_waiting_opens(self) -> None:
        """
        Opens waiting for a site are served by its session as soon as it
        registers: each gets a stream whose OPEN reaches the site, and their
        timers no longer fire.
        """
        registry = self.events.registry(self.clock)
        first = registry.open("alpha", "10.0.0.5", 554, 5.0)
        second = registry.open("alpha", "db", 5432, 5.0)
        self.clock.advance(3)
        holder = Holder()
        server, _, pump = mux_pair(self.clock, holder)
        registry.register("alpha", server, "p:1")
        streams = [self.successResultOf(first), self.successResultOf(second)]
        self.assertTrue(all(isinstance(s, MuxStream) for s in streams))
        pump_all(pump)
        self.assertEqual([(s.host, s.port) for s in holder.streams], [("10.0.0.5", 554), ("db", 5432)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connected_site_opens_at_once(self) -> None:
        """A connected site gets its OPEN without waiting or a timer."""
        registry = self.events.registry(self.clock)
        server, _, _ = mux_pair(self.clock)
        registry.register("alpha", server, "p:1")
        stream = self.successResultOf(registry.open("alpha", "10.0.0.5", 554, 5.0))
        self.assertEqual((stream.host, stream.port), ("10.0.0.5", 554))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_zero_timeout_fails_at_once(self) -> None:
        """With no time to wait, an absent site fails the open immediately."""
        registry = self.events.registry(self.clock)
        failure = self.failureResultOf(registry.wait_for("alpha", 0), SiteUnavailable)
        self.assertIn("not connected", failure.value.reason)

    def test_pending_opens_are_bounded(self) -> None:
        """
        At most max_pending_opens opens wait for one site; one more fails
        at once; a slot frees when a waiter times out or is cancelled, and
        other sites have their own bound.
        """
        registry = self.events.registry(self.clock, max_pending_opens=2)
        a = registry.open("alpha", "h", 1, 5.0)
        b = registry.open("alpha", "h", 1, 10.0)
        failure = self.failureResultOf(registry.open("alpha", "h", 1, 5.0), SiteUnavailable)
        self.assertIn("too many clients already waiting for it (2)", str(failure.value))
        other = registry.open("beta", "h", 1, 5.0)
        self.assertNoResult(other)
        a.cancel()
        self.failureResultOf(a, defer.CancelledError)
        c = registry.open("alpha", "h", 1, 10.0)
        self.assertNoResult(c)
        self.failureResultOf(registry.open("alpha", "h", 1, 5.0), SiteUnavailable)
        self.clock.advance(5.0)
        self.failureResultOf(other, SiteUnavailable)
        self.clock.advance(5.0)  # b and c time out: the slots are free again
        self.failureResultOf(b, SiteUnavailable)
        self.failureResultOf(c, SiteUnavailable)
        d = registry.open("alpha", "h", 1, 1.0)
        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.failureResultOf(d, SiteUnavailable)

    def test_cancelled_waiter_is_not_served(self) -> None:
        """
        A cancelled open leaves no timer behind and opens no stream when
        the site connects later.
        """
        registry = self.events.registry(self.clock)
        d = registry.open("alpha", "h", 1, 5.0)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        holder = Holder()
        server, _, pump = mux_pair(self.clock, holder)
        registry.register("alpha", server, "p:1")
        pump_all(pump)
        self.assertEqual(holder.streams, [])


class OpenFailureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = SiteRegistry(self.clock)

    def test_stream_limit_becomes_site_unavailable(self) -> None:
        """
        When the site's announced stream limit is reached, open() fails with
        SiteUnavailable saying so, not with the core's StreamLimitReached.
        """
        server, _, _ = mux_pair(self.clock, Holder(), site_settings=Settings(max_streams=1))
        self.registry.register("alpha", server, "p:1")
        self.successResultOf(self.registry.open("alpha", "h", 1, 5.0))
        failure = self.failureResultOf(self.registry.open("alpha", "h", 1, 5.0), SiteUnavailable)
        self.assertIn("stream limit reached", failure.value.reason)

    def test_session_closing_becomes_site_unavailable(self) -> None:
        """
        A waiting open served by a session that is already going away fails
        with SiteUnavailable, not with the core's SessionClosing.
        """
        d = self.registry.open("alpha", "h", 1, 5.0)
        server, _, _ = mux_pair(self.clock)
        server.drain(10.0)
        self.registry.register("alpha", server, "p:1")
        failure = self.failureResultOf(d, SiteUnavailable)
        self.assertIn("going away", failure.value.reason)

    def test_draining_session_is_not_offered_for_new_opens(self) -> None:
        """
        A live session that drains is no longer returned by session_for; new
        opens wait for the site's next session instead.
        """
        server, _, _ = mux_pair(self.clock)
        self.registry.register("alpha", server, "p:1")
        server.drain(10.0)
        self.assertIsNone(self.registry.session_for("alpha"))
        d = self.registry.open("alpha", "h", 1, 5.0)
        self.assertNoResult(d)
        newer, _, _ = mux_pair(self.clock)
        self.registry.register("alpha", newer, "p:2")
        self.assertIs(self.successResultOf(d)._mux, newer)


class ObserverFailureTests(SynchronousTestCase):
    def test_failing_observers_do_not_break_registration(self) -> None:
        """
        If on_connected or on_disconnected raise (the state database is
        locked, say), the failure is logged and the session is still live,
        serves the opens waiting for it, and is removed when it ends.
        """
        clock = Clock()

        def broken(*args: object) -> None:
            raise RuntimeError("database is locked")

        registry = SiteRegistry(clock, on_connected=broken, on_disconnected=broken)
        waiting = registry.open("alpha", "h", 1, 5.0)
        server, site, pump = mux_pair(clock)
        registry.register("alpha", server, "p:1")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIs(registry.session_for("alpha"), server)
        stream = self.successResultOf(waiting)
        site.terminate(ErrorCode.NO_ERROR, "bye")
        pump_all(pump)
        self.failureResultOf(stream.opened)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(registry.connected_sites(), {})


class PruningTests(SynchronousTestCase):
    def test_names_asked_for_once_are_forgotten(self) -> None:
        """
        A site name that was only ever waited for (never connected) leaves
        nothing behind once its waiters expired or were cancelled, so
        arbitrary names cannot make the registry grow.
        """
        clock = Clock()
        registry = SiteRegistry(clock)
        expired = registry.wait_for("ghost-1", 1.0)
        cancelled = registry.wait_for("ghost-2", 1.0)
        cancelled.cancel()
        clock.advance(1.0)
        self.failureResultOf(expired, SiteUnavailable)
        self.failureResultOf(cancelled)
        self.assertEqual(registry._sites, {})
