"""
What reaches the log: peer text escaped (printable), peer-triggered events
rate-limited (LogBudget), and rtunnel's loggers below the threshold silent.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.logs import Logger, current_level, set_level
from rtunnel.logsafe import MAX_PRINTABLE, LogBudget, printable

_DANGEROUS = (
    "\r\n\x1b\x00\x7f\x85\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c\ufeff"
)


class PrintableTests(SynchronousTestCase):
    def test_plain_text_is_unchanged(self) -> None:
        """Ordinary reasons, including non-ASCII letters, come back as they are."""
        for text in ("target refused", "site store-17: token-spent", "caméra réseau", "日本語"):
            self.assertEqual(printable(text), text)

    def test_controls_and_bidi_are_escaped(self) -> None:
        """
        A carriage return that would forge a log line, an ANSI escape that
        would recolour a terminal, and a bidi override that would reverse
        text on screen all come out as visible escapes.
        """
        self.assertEqual(printable("ok\r\n2026-01-01 [-] forged"), "ok\\r\\n2026-01-01 [-] forged")
        self.assertEqual(printable("\x1b[31mred"), "\\x1b[31mred")
        self.assertEqual(printable("a\u202egnp.exe"), "a\\u202egnp.exe")

    def test_backslash_cannot_fake_an_escape(self) -> None:
        """A backslash is doubled, so a peer's '\\r' text differs from an escaped CR."""
        self.assertEqual(printable("\\r"), "\\\\r")
        self.assertNotEqual(printable("\\r"), printable("\r"))

    def test_long_text_is_cut(self) -> None:
        """Text beyond the limit is cut, saying how long it was."""
        out = printable("x" * 5000)
        self.assertTrue(out.startswith("x" * MAX_PRINTABLE))
        self.assertTrue(out.endswith("…(5000 chars)"))

    @given(st.text())
    def test_no_dangerous_character_survives(self, text: str) -> None:
        """Whatever the input, the output holds no control, format or separator character."""
        out = printable(text, limit=10_000)
        for char in _DANGEROUS:
            self.assertNotIn(char, out)
        self.assertTrue(all(c.isprintable() or c == " " for c in out), repr(out))


class LogBudgetTests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        """
        A key may log a burst at once, then one event per 1/rate seconds;
        the next allowed event carries the count of suppressed ones.
        """
        budget = LogBudget(rate=0.5, burst=3)
        self.assertEqual([budget.allow("k", 0.0) for _ in range(5)], [(True, 0)] * 3 + [(False, 0)] * 2)
        self.assertEqual(budget.allow("k", 1.0), (False, 0))
        self.assertEqual(budget.allow("k", 2.1), (True, 3))

    def test_keys_are_independent(self) -> None:
        """One noisy key does not use up another key's budget."""
        budget = LogBudget(rate=1, burst=1)
        self.assertEqual(budget.allow("noisy", 0), (True, 0))
        self.assertEqual(budget.allow("noisy", 0), (False, 0))
        self.assertEqual(budget.allow("quiet", 0), (True, 0))

    def test_memory_is_bounded(self) -> None:
        """However many keys are used, at most max_keys buckets are kept."""
        budget = LogBudget(rate=1, burst=1, max_keys=100)
        for index in range(10_000):
            budget.allow(index, 0.0)
        self.assertLessEqual(len(budget._buckets), 100)


class ThresholdTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []  # type: ignore[type-arg]
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        before = current_level()
        self.addCleanup(set_level, before)

    def test_debug_is_dropped_by_default(self) -> None:
        """By default rtunnel's loggers emit info and above, never debug."""
        set_level(LogLevel.info)
        log = Logger(namespace="rtunnel.test")
        log.debug("per-stream detail {n}", n=1)
        log.info("visible {n}", n=2)
        self.assertEqual(
            [formatEvent(e) for e in self.events if e.get("log_namespace") == "rtunnel.test"], ["visible 2"]
        )

    def test_threshold_can_be_lowered_and_raised(self) -> None:
        """--log-level debug shows debug lines; --log-level warn hides info."""
        log = Logger(namespace="rtunnel.test")
        set_level(LogLevel.debug)
        log.debug("shown")
        set_level(LogLevel.warn)
        log.info("hidden")
        log.warn("warned")
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("failed")
        texts = [formatEvent(e) for e in self.events if e.get("log_namespace") == "rtunnel.test"]
        self.assertEqual(texts, ["shown", "warned", "failed"])
        self.flushLoggedErrors(ZeroDivisionError)
