"""
Counting frames that do nothing useful, per kind, against the allowances of
L{FloodLimits}: token buckets over time passed in by the caller (no clock).
"""

from __future__ import annotations

from attrs import define

from .events import FloodDetected
from .settings import Allowance, FloodLimits

#: The kinds of useless frames, as they read in a log line.
PING = "PING"
EMPTY_DATA = "empty DATA"
REFUSED_OPEN = "refused OPEN"


@define
class _Bucket:
    tokens: float
    stamp: float
    #: frames counted since the bucket was last full, and since when
    spent: int
    since: float


class UselessFrames:
    """
    One token bucket per kind of useless frame: C{burst} tokens, refilled
    at C{rate} per second, one spent per frame. A frame that finds the
    bucket empty is one too many.
    """

    def __init__(self, limits: FloodLimits) -> None:
        self._allowances: dict[str, Allowance | None] = {
            PING: limits.pings,
            EMPTY_DATA: limits.empty_data,
            REFUSED_OPEN: limits.refused_opens,
        }
        self._buckets: dict[str, _Bucket] = {}

    def spend(self, kind: str, now: float) -> FloodDetected | None:
        """
        Count one frame of C{kind} received at C{now}; return what to report
        if it is beyond the allowance, else C{None}.
        """
        allowance = self._allowances[kind]
        if allowance is None:
            return None
        bucket = self._buckets.get(kind)
        if bucket is None:
            bucket = self._buckets[kind] = _Bucket(float(allowance.burst), now, 0, now)
        elif now > bucket.stamp:
            bucket.tokens += (now - bucket.stamp) * allowance.rate
            bucket.stamp = now
            if bucket.tokens >= allowance.burst:
                bucket.tokens = float(allowance.burst)
                bucket.spent = 0
                bucket.since = now
        elif now < bucket.stamp:
            # The clock went back (wall time was set): refill nothing, and
            # measure from here on.
            bucket.stamp = now
        bucket.tokens -= 1.0
        bucket.spent += 1
        if bucket.tokens < 0:
            return FloodDetected(kind, bucket.spent, max(now - bucket.since, 0.0), allowance.describe())
        return None


__all__ = ["EMPTY_DATA", "PING", "REFUSED_OPEN", "UselessFrames"]
