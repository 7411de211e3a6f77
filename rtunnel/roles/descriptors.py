"""
File descriptors: the server's capacity, said out loud.

The tunnel server holds one descriptor per connected site and one per
forwarded client connection (and a local client holds a second one in its
own process). Under systemd's default soft limit of 1,024 a server with a
thousand sites silently leaves the rest outside: the kernel refuses the
accept (EMFILE), Twisted logs one info line, and the sites back off for up to
their retry cap. So the server raises its soft limit to the hard limit at
start, says what that allows, warns as use approaches it, and says plainly
when it is reached.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime

from ..logs import Logger

_log = Logger(namespace="rtunnel.descriptors")

#: Descriptors the process needs besides connections (logs, database, listeners, the reactor).
RESERVED = 32


def raise_soft_limit() -> tuple[int, int]:
    """
    Raise this process's soft C{RLIMIT_NOFILE} to its hard limit.

    @return: (the soft limit before, the soft limit now).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        # Linux refuses an infinite soft limit for files; take the kernel's ceiling.
        try:
            with open("/proc/sys/fs/nr_open") as f:
                hard = int(f.read())
        except (OSError, ValueError):
            return soft, soft
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        return soft, soft
    return soft, hard


def soft_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_descriptors() -> int | None:
    """How many descriptors this process has open, or C{None} where /proc cannot tell."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself opened
    except OSError:
        return None


class DescriptorWatch:
    """
    Checks descriptor use every C{interval} seconds: a warning when it
    crosses C{warn_at} of the limit (once, until it falls below
    C{warn_at - 0.1} again), and an error while it is at the limit, when the
    kernel refuses every new connection (at most once a minute).

    Counting means listing C{/proc/self/fd}, which with ten thousand sites
    cost as much as all their keepalives. So with an C{estimate} (the
    connections the caller knows it holds) the list is read only when the
    estimate, plus what the last listing found besides those connections,
    reaches the level that re-arms the warning (C{warn_at - 0.1}), and
    otherwise once every C{recount} seconds to learn that remainder anew (a
    leak elsewhere still shows within that time).
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float = 2.0,
        warn_at: float = 0.8,
        count: Callable[[], int | None] = open_descriptors,
        limit: Callable[[], int] = soft_limit,
        estimate: Callable[[], int] | None = None,
        recount: float = 60.0,
    ) -> None:
        self.clock = clock
        self.interval = interval
        self.warn_at = warn_at
        self.count = count
        self.limit = limit
        self.estimate = estimate
        self.recount = recount
        self._warned = False
        self._last_error = float("-inf")
        self._loop: task.LoopingCall | None = None
        #: descriptors besides the estimated ones at the last listing, and when
        self._others: int | None = None
        self._counted_at = float("-inf")

    def start(self) -> None:
        if self.count() is None:
            _log.info("cannot count open file descriptors on this system; not watching their use")
            return
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _far_below(self, limit: int) -> bool:
        """Whether the estimate says use is below the level that re-arms the warning."""
        if self.estimate is None or self._others is None or self.clock.seconds() - self._counted_at >= self.recount:
            return False
        return self.estimate() + self._others < limit * (self.warn_at - 0.1)

    def check(self) -> None:
        limit = self.limit()
        if limit <= 0:
            return
        if self._far_below(limit):
            self._warned = False
            return
        used = self.count()
        if used is None:
            return
        if self.estimate is not None:
            self._others = max(used - self.estimate(), 0)
            self._counted_at = self.clock.seconds()
        if used >= limit - 2:
            now = self.clock.seconds()
            if now - self._last_error >= 60.0:
                self._last_error = now
                _log.error(
                    "out of file descriptors: {used} of {limit} in use; the kernel refuses new connections, so sites "
                    "and forward clients cannot connect (raise LimitNOFILE / ulimit -n)",
                    used=used,
                    limit=limit,
                )
        if used >= limit * self.warn_at:
            if not self._warned:
                self._warned = True
                _log.warn(
                    "file descriptors: {used} of {limit} in use ({percent:.0f}%); each site takes one and each "
                    "forwarded connection one more: raise LimitNOFILE / ulimit -n before the limit is reached",
                    used=used,
                    limit=limit,
                    percent=100.0 * used / limit,
                )
        elif used < limit * (self.warn_at - 0.1):
            self._warned = False


def describe_capacity(before: int, now: int) -> None:
    """Log the limit at start and what it allows."""
    raised = f" (raised from {before})" if now != before else ""
    _log.info(
        "file descriptor limit {limit}{raised}: room for about {sites} connected sites, fewer while connections "
        "are forwarded (one descriptor each)",
        limit=now,
        raised=raised,
        sites=max(now - RESERVED, 0),
    )


__all__ = ["DescriptorWatch", "describe_capacity", "open_descriptors", "raise_soft_limit", "soft_limit"]
