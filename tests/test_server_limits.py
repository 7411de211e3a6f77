"""
The server's fleet limits: the tunnel listener's backlog, the pre-auth cap
derived from the descriptor limit, the descriptor watch, and the warning for
forwards that anyone on the network can reach.
"""

from __future__ import annotations

import resource

from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.roles.descriptors import DescriptorWatch, open_descriptors, raise_soft_limit
from rtunnel.services import TUNNEL_BACKLOG, effective_max_preauth, with_backlog


class Events:
    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict] = []  # type: ignore[type-arg]
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, containing: str) -> list[str]:
        return [text for text in map(formatEvent, self.events) if containing in text]


class BacklogTests(SynchronousTestCase):
    def test_backlog_added_to_tcp_descriptions(self) -> None:
        """
        The tunnel listener gets a backlog of 4,096 unless its description
        sets one: Twisted's default of 50 drops SYNs when many sites return
        at once.
        """
        self.assertEqual(TUNNEL_BACKLOG, 4096)
        self.assertEqual(with_backlog("tcp:5500"), "tcp:5500:backlog=4096")
        self.assertEqual(with_backlog("tcp6:5500:interface=\\:\\:1"), "tcp6:5500:interface=\\:\\:1:backlog=4096")
        self.assertEqual(with_backlog("TCP:5500:interface=127.0.0.1"), "TCP:5500:interface=127.0.0.1:backlog=4096")

    def test_backlog_given_is_kept(self) -> None:
        """An explicit backlog, or an endpoint type without one, is left alone."""
        self.assertEqual(with_backlog("tcp:5500:backlog=64"), "tcp:5500:backlog=64")
        self.assertEqual(with_backlog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")


class PreauthCapTests(SynchronousTestCase):
    def test_cap_is_a_quarter_of_the_descriptors(self) -> None:
        """
        Under a low descriptor limit, pre-auth connections may take at most
        a quarter of what is left after the process's own needs; a generous
        limit leaves the configured cap as it is.
        """
        self.assertEqual(effective_max_preauth(1024, 128), 24)
        self.assertEqual(effective_max_preauth(1024, 65536), 1024)
        self.assertEqual(effective_max_preauth(10, 65536), 10)
        self.assertEqual(effective_max_preauth(1024, 16), 1)


class DescriptorWatchTests(SynchronousTestCase):
    def _watch(self, used: list[int], limit: int = 1000) -> tuple[DescriptorWatch, Clock]:
        clock = Clock()
        watch = DescriptorWatch(clock, interval=2.0, count=lambda: used[0], limit=lambda: limit)
        watch.start()
        self.addCleanup(watch.stop)
        return watch, clock

    def test_warns_once_when_use_crosses_80_percent(self) -> None:
        """
        Crossing 80 % of the limit gives one warning; it repeats only after
        use fell below 70 % and crossed again.
        """
        log = Events(self)
        used = [100]
        _, clock = self._watch(used)
        clock.advance(2)
        self.assertEqual(log.lines("file descriptors:"), [])
        used[0] = 810
        clock.pump([2, 2, 2])
        [line] = log.lines("file descriptors:")
        self.assertIn("810 of 1000 in use (81%)", line)
        used[0] = 750
        clock.advance(2)
        used[0] = 820
        clock.advance(2)
        self.assertEqual(len(log.lines("file descriptors:")), 1)
        used[0] = 600
        clock.advance(2)
        used[0] = 900
        clock.advance(2)
        self.assertEqual(len(log.lines("file descriptors:")), 2)

    def test_error_at_the_limit_at_most_once_a_minute(self) -> None:
        """
        At the limit the kernel refuses accepts: an error says so plainly,
        at most once a minute while it lasts.
        """
        log = Events(self)
        used = [999]
        _, clock = self._watch(used)
        clock.pump([2] * 30)
        lines = log.lines("out of file descriptors")
        self.assertEqual(len(lines), 1)
        self.assertIn("999 of 1000 in use", lines[0])
        self.assertEqual([e["log_level"].name for e in log.events if "out of file" in formatEvent(e)], ["error"])
        clock.pump([2] * 2)
        self.assertEqual(len(log.lines("out of file descriptors")), 2)

    def test_estimate_spares_the_listing_far_below_the_limit(self) -> None:
        """
        With an estimate of the connections held, /proc is listed once to
        learn what else is open, then only every recount interval while the
        estimate plus that remainder stays below 70 % of the limit.
        """
        listings = [0]
        conns = [100]

        def count() -> int:
            listings[0] += 1
            return conns[0] + 40  # 40 descriptors that are not connections

        clock = Clock()
        watch = DescriptorWatch(clock, interval=2.0, count=count, limit=lambda: 1000, estimate=lambda: conns[0])
        watch.start()
        self.addCleanup(watch.stop)
        self.assertEqual(listings[0], 1)  # start: can this system count at all?
        clock.advance(2)
        self.assertEqual(listings[0], 2)  # the first check learns the remainder
        clock.pump([2] * 28)  # 56 s
        self.assertEqual(listings[0], 2)
        clock.pump([2] * 2)  # 60 s after the last listing: list again
        self.assertEqual(listings[0], 3)

    def test_estimate_near_the_level_lists_and_warns(self) -> None:
        """
        Once the estimate reaches 70 % of the limit every check lists /proc,
        so the warning at 80 % and the error at the limit come as without
        an estimate; falling back below 70 % spares the listing again and
        re-arms the warning.
        """
        log = Events(self)
        listings = [0]
        conns = [100]

        def count() -> int:
            listings[0] += 1
            return conns[0] + 40

        clock = Clock()
        watch = DescriptorWatch(clock, interval=2.0, count=count, limit=lambda: 1000, estimate=lambda: conns[0])
        watch.start()
        self.addCleanup(watch.stop)
        clock.advance(2)
        conns[0] = 700  # 740 with the remainder
        clock.advance(2)
        self.assertEqual(listings[0], 3)
        self.assertEqual(log.lines("before the limit is reached"), [])
        conns[0] = 780
        clock.advance(2)
        [line] = log.lines("before the limit is reached")
        self.assertIn("820 of 1000 in use (82%)", line)
        conns[0] = 960
        clock.advance(2)
        self.assertEqual(len(log.lines("out of file descriptors")), 1)
        conns[0] = 100
        clock.advance(2)  # listed: 140, below 70 %
        before = listings[0]
        clock.pump([2] * 5)
        self.assertEqual(listings[0], before)
        conns[0] = 800
        clock.advance(2)
        self.assertEqual(len(log.lines("before the limit is reached")), 2)

    def test_estimate_misses_a_leak_for_at_most_the_recount_interval(self) -> None:
        """
        Descriptors the estimate does not know of (a leak elsewhere) are
        found at the next recount, within a minute.
        """
        log = Events(self)
        leaked = [40]
        clock = Clock()
        watch = DescriptorWatch(
            clock, interval=2.0, count=lambda: 100 + leaked[0], limit=lambda: 1000, estimate=lambda: 100
        )
        watch.start()
        self.addCleanup(watch.stop)
        clock.advance(2)
        leaked[0] = 800
        clock.pump([2] * 29)
        self.assertEqual(log.lines("file descriptors:"), [])
        clock.advance(2)
        [line] = log.lines("file descriptors:")
        self.assertIn("900 of 1000 in use", line)

    def test_counts_this_process(self) -> None:
        """open_descriptors counts real descriptors: one more after opening a file."""
        before = open_descriptors()
        if before is None:
            self.skipTest("no /proc/self/fd here")
        with open(__file__):
            self.assertEqual(open_descriptors(), before + 1)

    def test_raise_soft_limit_to_hard(self) -> None:
        """The soft limit is raised to the hard limit (and never lowered)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        lowered = min(soft, 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        before, now = raise_soft_limit()
        self.assertEqual(before, lowered)
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], now)
        if hard != resource.RLIM_INFINITY:
            self.assertEqual(now, hard)
