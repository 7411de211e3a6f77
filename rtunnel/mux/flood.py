"""
A session's flood accounting against its L{FloodLimits}: frames that do
nothing useful, per kind (token buckets over time passed in by the caller,
no clock), and replies the peer leaves unread.
"""

from __future__ import annotations

from attrs import define

from .events import FloodDetected
from .settings import FloodLimits

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


class FloodMeter:
    """
    A session's flood accounting, kept in one object (the session's own
    attributes stay few: past 30, CPython 3.11 stops sharing instance
    dictionary keys and every attribute access on the data path slows).

     - Useless frames: one token bucket per kind, C{burst} tokens refilled
       at C{rate} per second over L{now}, one spent per frame; a frame that
       finds the bucket empty is one too many.
     - Unread replies: counted while L{peer_reading} is false, cleared when
       it becomes true again.

    A tunnel server holds one per site, so it keeps no dictionary of its
    own: its attributes are slots, a bucket is made for a kind when the
    first frame of it comes, and the count of unread replies by kind when
    the first is owed (before: about 500 bytes per session).

    @ivar now: the time of the current input (C{None}: no rate caps).
    """

    __slots__ = ("limits", "now", "peer_reading", "reply_debt", "_debt_kinds", "_ping", "_empty", "_refused")

    def __init__(self, limits: FloodLimits) -> None:
        self.limits = limits
        self.now: float | None = None
        self.peer_reading = True
        self.reply_debt = 0
        self._debt_kinds: dict[str, int] | None = None
        self._ping: _Bucket | None = None
        self._empty: _Bucket | None = None
        self._refused: _Bucket | None = None

    def set_peer_reading(self, reading: bool) -> None:
        self.peer_reading = reading
        if reading and self.reply_debt:
            self.reply_debt = 0
            self._debt_kinds = None

    def owe(self, kind: str) -> FloodDetected | None:
        """
        Count one reply of C{kind} queued while the peer reads nothing;
        return what to report past the reply limit, else C{None}.
        """
        self.reply_debt += 1
        kinds = self._debt_kinds
        if kinds is None:
            kinds = self._debt_kinds = {}
        kinds[kind] = kinds.get(kind, 0) + 1
        limit = self.limits.reply_limit
        if self.reply_debt <= limit:
            return None
        detail = ", ".join(f"{count} {name}s" for name, count in kinds.items())
        return FloodDetected("unread replies", self.reply_debt, None, f"{limit} replies", detail)

    def spend(self, kind: str) -> FloodDetected | None:
        """
        Count one useless frame of C{kind} received at L{now}; return what
        to report if it is beyond the allowance, else C{None}.
        """
        now = self.now
        limits = self.limits
        if kind == PING:
            allowance, bucket = limits.pings, self._ping
        elif kind == EMPTY_DATA:
            allowance, bucket = limits.empty_data, self._empty
        elif kind == REFUSED_OPEN:
            allowance, bucket = limits.refused_opens, self._refused
        else:
            raise KeyError(kind)
        if allowance is None or now is None:
            return None
        if bucket is None:
            bucket = _Bucket(float(allowance.burst), now, 0, now)
            if kind == PING:
                self._ping = bucket
            elif kind == EMPTY_DATA:
                self._empty = bucket
            else:
                self._refused = bucket
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


__all__ = ["EMPTY_DATA", "PING", "REFUSED_OPEN", "FloodMeter"]
