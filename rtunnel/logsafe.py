"""
Peer-supplied text and peer-triggered events, made safe for a log: pure
Python (no Twisted), so that the sans-IO core can use it too.

 - L{printable}: text a peer chose (GOAWAY, OPEN_FAIL and RESET reasons,
   enrollment messages, names) is escaped before it reaches a log line, so
   that a carriage return, an ANSI escape or a bidi control cannot forge or
   hide lines in a terminal, a pager or a log shipper.
 - L{LogBudget}: events that a peer can trigger at will (a refused OPEN, a
   refused handshake) are rate-limited per key, with a count of what was
   left out, so the log cannot grow faster than the operator can read it.
"""

from __future__ import annotations

from collections.abc import Hashable

from attrs import define, field

__all__ = ["LogBudget", "MAX_PRINTABLE", "printable"]

#: Longest peer-supplied text that appears in one log line (characters).
MAX_PRINTABLE = 256


def printable(text: object, limit: int = MAX_PRINTABLE) -> str:
    """
    C{text} as it may appear in a log line: every character that is not
    printable (controls, bidi and other format characters, separators
    other than the space, unassigned code points) replaced by a
    Python-style escape (C{\\r}, C{\\x1b}, C{\\u202e}), a backslash doubled so that an escape
    cannot be faked, and cut to C{limit} characters (with C{…} and the
    original length).

    Plain ASCII text without backslashes comes back unchanged, cheaply.
    """
    if not isinstance(text, str):
        text = str(text)
    if text.isascii() and text.isprintable() and "\\" not in text:
        out = text
    else:
        parts: list[str] = []
        for char in text:
            if char == "\\":
                parts.append("\\\\")
            elif char.isprintable():
                # Python's definition, as repr() uses it: no control (Cc),
                # format (Cf: the bidi overrides and isolates, zero-width
                # marks), separator other than the space (Zl, Zp, Zs),
                # surrogate, private-use or unassigned character.
                parts.append(char)
            else:
                code = ord(char)
                if code <= 0xFF:
                    parts.append({"\r": "\\r", "\n": "\\n", "\t": "\\t"}.get(char, f"\\x{code:02x}"))
                elif code <= 0xFFFF:
                    parts.append(f"\\u{code:04x}")
                else:
                    parts.append(f"\\U{code:08x}")
        out = "".join(parts)
    if len(out) > limit:
        return f"{out[:limit]}…({len(text)} chars)"
    return out


@define
class _Bucket:
    tokens: float
    stamp: float
    suppressed: int = 0


@define
class LogBudget:
    """
    A token bucket per key: at most C{burst} events at once, then one every
    C{1 / rate} seconds. Time is passed in (C{now}), so the budget works
    with any clock and in the sans-IO core.

    Keys are forgotten once their bucket is full again, so memory is bounded
    by the keys active in the last C{burst / rate} seconds, and at most
    C{max_keys} (the oldest is dropped first).
    """

    rate: float = 1.0
    burst: float = 5.0
    max_keys: int = 4096
    _buckets: dict[Hashable, _Bucket] = field(factory=dict, init=False, repr=False)

    def allow(self, key: Hashable, now: float) -> tuple[bool, int]:
        """
        Whether an event for C{key} may be logged now, and how many events
        of that key were suppressed since the last one that was (say so in
        the line, so the operator knows the log is not the whole story).
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._expire(now)
                if len(self._buckets) >= self.max_keys:
                    del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            suppressed, bucket.suppressed = bucket.suppressed, 0
            return True, suppressed
        bucket.suppressed += 1
        return False, 0

    def _expire(self, now: float) -> None:
        for key, bucket in list(self._buckets.items()):
            if bucket.suppressed == 0 and bucket.tokens + (now - bucket.stamp) * self.rate >= self.burst:
                del self._buckets[key]
