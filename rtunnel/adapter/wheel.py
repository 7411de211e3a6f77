"""
L{KeepaliveWheel}: one timer for the keepalive checks of many sessions.

Each L{MuxProtocol} checks its peer's silence on a timer of its own unless
it is given a wheel. A tunnel server holds one session per site, and a
Twisted C{DelayedCall} costs about 550 bytes and a heap operation per
rescheduling: with ten thousand sessions that was 5 MiB and a steady share
of the idle CPU. The wheel keeps sessions in one bucket per due second and
one C{DelayedCall} for the earliest bucket, so checks due in the same
second run in one reactor turn.

The price is precision: a check runs up to one C{resolution} late, so a
dead peer is declared dead within its timeout plus that (31 s instead of
30 with the defaults).
"""

from __future__ import annotations

import math
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from rtunnel.logs import Logger

__all__ = ["KeepaliveWheel"]


class _Ticking(Protocol):
    def _keepalive_due(self, slot: int) -> None: ...


class KeepaliveWheel:
    """
    Calls C{owner._keepalive_due(slot)} about C{delay} seconds after
    L{schedule} (rounded up to C{resolution}), for many owners with one
    timer.

    @param clock: when things are due.
    @param resolution: width of a bucket in seconds.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, resolution: float = 1.0) -> None:
        if not resolution > 0:
            raise ValueError(f"resolution must be positive, not {resolution!r}")
        self.clock = clock
        self.resolution = resolution
        #: bucket number (due time / resolution, rounded up) -> owners, in order
        self._buckets: dict[int, dict[_Ticking, None]] = {}
        self._call: IDelayedCall | None = None
        self._armed: int | None = None
        self._firing = False

    def __len__(self) -> int:
        """Owners waiting (each at most once)."""
        return sum(len(bucket) for bucket in self._buckets.values())

    def schedule(self, owner: _Ticking, delay: float) -> int:
        """
        Call C{owner._keepalive_due(slot)} in C{delay} seconds or up to one
        C{resolution} later; return the slot, which L{cancel} takes.
        """
        slot = math.ceil((self.clock.seconds() + delay) / self.resolution)
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = {}
        bucket[owner] = None
        if not self._firing and (self._armed is None or slot < self._armed):
            self._arm(slot)
        return slot

    def cancel(self, owner: _Ticking, slot: int) -> None:
        """Forget C{owner}'s call at C{slot} (nothing if it is not there)."""
        bucket = self._buckets.get(slot)
        if bucket is not None:
            bucket.pop(owner, None)
            if not bucket:
                del self._buckets[slot]
                if not self._buckets and self._call is not None:
                    if self._call.active():
                        self._call.cancel()
                    self._call = self._armed = None

    def _arm(self, slot: int) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._armed = slot
        self._call = self.clock.callLater(max(slot * self.resolution - self.clock.seconds(), 0.0), self._fire)

    def _fire(self) -> None:
        self._call = self._armed = None
        now = math.floor(self.clock.seconds() / self.resolution + 1e-9)
        self._firing = True
        try:
            for slot in sorted(slot for slot in self._buckets if slot <= now):
                for owner in self._buckets.pop(slot):
                    try:
                        owner._keepalive_due(slot)
                    except Exception:
                        # One broken check must not cost the others theirs.
                        self._log.failure("keepalive check failed")
        finally:
            self._firing = False
            if self._buckets:
                self._arm(min(self._buckets))
