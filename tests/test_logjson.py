"""
JSON log lines (rtunnel.logjson): the fixed keys, the structured fields of
rtunnel's log calls, failures, legacy twisted.python.log events, and odd
values that must never cost a line or the observer.
"""

from __future__ import annotations

import enum
import io
import json
import re
import sys

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import ILogObserver, LogLevel, formatEvent
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rtunnel import logjson
from rtunnel.logjson import MAX_VALUE, JSONLineObserver, event_as_json
from rtunnel.logs import Logger

_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


class _Collect:
    """Events as a real Logger emits them, and their JSON lines."""

    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []

    def __call__(self, event: dict[str, object]) -> None:
        self.events.append(event)

    def lines(self) -> list[str]:
        return [line for line in map(event_as_json, self.events) if line is not None]

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines()]


def _logged(namespace: str = "rtunnel.test") -> tuple[Logger, _Collect]:
    collect = _Collect()
    return Logger(namespace=namespace, observer=collect), collect


def _legacy(*message: str, **kw: object) -> dict[str, object]:
    """An event as twisted.python.log.msg/err make it, as a new-style observer receives it."""
    received: list[dict[str, object]] = []
    publisher = legacy_log.LogPublisher(observerPublisher=received.append, publishPublisher=received.append)
    publisher.msg(*message, **kw)
    return received[-1]


class _Colour(enum.Enum):
    RED = 1


class _BrokenStr:
    def __str__(self) -> str:
        raise RuntimeError("no")


class FixedKeysTests(SynchronousTestCase):
    def test_fixed_keys_then_fields(self) -> None:
        """
        time (UTC, microseconds, Z), level, namespace and the message as the
        text log formats it come first, then the call's keyword arguments
        with their JSON types kept.
        """
        log, collect = _logged("rtunnel.roles.server.TunnelConnection")
        log.info("site {site} connected from {peer}", site="alpha", peer="127.0.0.1:4000", streams=3, rtt=0.25)
        [record] = collect.records()
        self.assertEqual(
            list(record), ["time", "level", "namespace", "message", "site", "peer", "streams", "rtt"], record
        )
        self.assertRegex(record["time"], _TIME)
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "rtunnel.roles.server.TunnelConnection")
        self.assertEqual(record["message"], "site alpha connected from 127.0.0.1:4000")
        self.assertEqual(record["message"], formatEvent(collect.events[0]))
        self.assertEqual(
            (record["site"], record["peer"], record["streams"], record["rtt"]), ("alpha", "127.0.0.1:4000", 3, 0.25)
        )

    def test_time_is_the_events_in_utc(self) -> None:
        line = event_as_json({"log_format": "x", "log_time": 1767225600.000123, "log_level": LogLevel.warn})
        assert line is not None
        self.assertEqual(json.loads(line)["time"], "2026-01-01T00:00:00.000123Z")
        self.assertEqual(json.loads(line)["level"], "warn")

    def test_every_level_by_name(self) -> None:
        log, collect = _logged()
        for level in (LogLevel.warn, LogLevel.error, LogLevel.critical):
            log.emit(level, "x")
        self.assertEqual([r["level"] for r in collect.records()], ["warn", "error", "critical"])

    def test_log_internals_are_left_out(self) -> None:
        """log_source, log_logger, log_format... are Twisted's, not the event's fields."""
        log, collect = _logged()
        log.info("plain")
        [record] = collect.records()
        self.assertEqual(sorted(record), ["level", "message", "namespace", "time"])
        self.assertIn("log_source", collect.events[0])

    def test_system_when_the_event_names_one(self) -> None:
        line = event_as_json({"log_format": "x", "log_system": "MuxProtocol,3,127.0.0.1"})
        assert line is not None
        self.assertEqual(json.loads(line)["system"], "MuxProtocol,3,127.0.0.1")

    def test_event_without_text_is_not_written(self) -> None:
        """As the text log: no format and no failure, no line."""
        self.assertIsNone(event_as_json({"log_level": LogLevel.info, "site": "alpha"}))

    def test_unformattable_event_still_gives_a_line(self) -> None:
        """A format naming a missing field: Twisted's own 'Unable to format' text, and the fields."""
        line = event_as_json({"log_format": "site {site} {missing}", "site": "alpha", "log_level": LogLevel.info})
        assert line is not None
        record = json.loads(line)
        self.assertIn("Unable to format event", record["message"])
        self.assertEqual(record["site"], "alpha")

    def test_field_named_like_a_fixed_key(self) -> None:
        """
        A 'message' field that is the whole message (the fatal lines'
        '{message}') is not repeated; one that differs, or a 'time' field,
        is kept as NAME_ and never overwrites the fixed key.
        """
        log, collect = _logged()
        log.critical("{message}", message="tunnel listener failed")
        log.info("took {time}s", time=2.5, message="other", namespace="x")
        first, second = collect.records()
        self.assertEqual(first["message"], "tunnel listener failed")
        self.assertNotIn("message_", first)
        self.assertRegex(second["time"], _TIME)
        self.assertEqual((second["time_"], second["message_"], second["namespace_"]), (2.5, "other", "x"))
        self.assertEqual((second["message"], second["namespace"]), ("took 2.5s", "rtunnel.test"))


class FailureTests(SynchronousTestCase):
    def test_failure_is_its_own_key(self) -> None:
        """log.failure: the message without the traceback, the traceback under 'failure'."""
        log, collect = _logged()
        try:
            raise ValueError("broken state")
        except ValueError:
            log.failure("background job {what} failed", what="prune")
        [record] = collect.records()
        self.assertEqual(record["message"], "background job prune failed")
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["what"], "prune")
        self.assertIn("Traceback", record["failure"])
        self.assertIn("ValueError: broken state", record["failure"])
        self.assertEqual(list(record)[-1], "failure")

    def test_failure_whose_traceback_cannot_be_had(self) -> None:
        class Bad(Failure):
            def getTraceback(self, *a: object, **k: object) -> str:
                raise RuntimeError("gone")

        line = event_as_json({"log_format": "oops", "log_failure": Bad(ValueError("x"))})
        assert line is not None
        self.assertIn("unable to obtain traceback", json.loads(line)["failure"])


class LegacyEventTests(SynchronousTestCase):
    def test_legacy_message(self) -> None:
        """twisted.python.log.msg (still used inside Twisted): text, system; no tuple, float time or isError."""
        record = json.loads(event_as_json(_legacy("Starting factory", "<F>", system="TLSMemoryBIOProtocol")) or "")
        self.assertEqual(record["message"], "Starting factory <F>")
        self.assertEqual(record["namespace"], "log_legacy")
        self.assertEqual(record["system"], "TLSMemoryBIOProtocol")
        self.assertEqual(sorted(record), ["level", "message", "namespace", "system", "time"])
        self.assertRegex(record["time"], _TIME)

    def test_legacy_err(self) -> None:
        """twisted.python.log.err: 'why' as the message, the traceback under 'failure', level critical."""
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            event = _legacy(failure=Failure(), why="Unhandled error in reader", isError=1)
        record = json.loads(event_as_json(event) or "")
        self.assertEqual(record["message"], "Unhandled error in reader")
        self.assertEqual(record["level"], "critical")
        self.assertIn("ZeroDivisionError", record["failure"])
        self.assertNotIn("why", record)


class ValueTests(SynchronousTestCase):
    def record(self, **fields: object) -> dict[str, object]:
        line = event_as_json({"log_format": "x", "log_level": LogLevel.info, **fields})
        assert line is not None
        result: dict[str, object] = json.loads(line)
        return result

    def test_json_types_and_containers(self) -> None:
        r = self.record(n=None, b=True, i=7, s="x", names=("a", "b"), services={"web": "127.0.0.1:80"}, tags={"b", "a"})
        self.assertEqual(
            (r["n"], r["b"], r["i"], r["s"], r["names"], r["services"], r["tags"]),
            (None, True, 7, "x", ["a", "b"], {"web": "127.0.0.1:80"}, ["a", "b"]),
        )

    def test_named_values_by_name(self) -> None:
        r = self.record(colour=_Colour.RED, level_of=LogLevel.warn)
        self.assertEqual((r["colour"], r["level_of"]), ("RED", "warn"))

    def test_bytes_escaped_as_python_writes_them(self) -> None:
        r = self.record(data=b"GET /\r\n\x1b[2J\\\xff")
        self.assertEqual(r["data"], "GET /\\r\\n\\x1b[2J\\\\\\xff")

    def test_other_objects_str_and_cut(self) -> None:
        r = self.record(
            obj=ValueError("boom"), big="y" * 5000, huge=["z" * 5000], longobj=range(10**9), broken=_BrokenStr()
        )
        self.assertEqual(r["obj"], "boom")
        self.assertEqual(len(r["big"]), 5000)  # str values are the call's: not cut
        self.assertTrue(r["huge"][0] == "z" * 5000)
        self.assertEqual(r["longobj"], "range(0, 1000000000)")
        self.assertEqual(r["broken"], "<unprintable _BrokenStr: RuntimeError>")
        r = self.record(obj=type("Long", (), {"__str__": lambda self: "w" * 3000})())
        self.assertTrue(r["obj"].startswith("w" * MAX_VALUE + "…(3000 chars)"), r["obj"][-20:])

    def test_floats_json_cannot_hold(self) -> None:
        r = self.record(a=float("nan"), b=float("inf"))
        self.assertEqual((r["a"], r["b"]), ("nan", "inf"))

    def test_deep_nesting_and_cycles(self) -> None:
        cycle: list[object] = []
        cycle.append(cycle)
        r = self.record(deep=[[[[[["bottom"]]]]]], cycle=cycle, key={1: "one", None: "none"})
        self.assertIsInstance(r["deep"][0][0][0][0], str)
        self.assertIsInstance(r["cycle"], list)
        self.assertEqual(r["key"], {"1": "one", "None": "none"})

    def test_non_string_key(self) -> None:
        line = event_as_json({"log_format": "x", 5: "five"})
        assert line is not None
        self.assertEqual(json.loads(line)["5"], "five")

    def test_encoder_failure_gives_an_error_line(self) -> None:
        """If building the record fails anyway, the observer says so in a line of its own."""
        original = logjson._record

        def broken(event: object) -> None:
            raise RuntimeError("unexpected")

        logjson._record = broken  # type: ignore[assignment]
        try:
            line = event_as_json({"log_format": "site {site}", "log_namespace": "rtunnel.x"})
        finally:
            logjson._record = original
        record = json.loads(line or "")
        self.assertEqual((record["level"], record["namespace"]), ("error", "rtunnel.logjson"))
        self.assertIn("unexpected", record["message"])
        self.assertEqual((record["event_namespace"], record["event_format"]), ("rtunnel.x", "site {site}"))


class TerminalSafetyTests(SynchronousTestCase):
    def test_controls_bidi_and_separators_are_escaped(self) -> None:
        """
        Nothing in the raw line can move a terminal's cursor, reverse text or
        break the line for a tool splitting at U+2028; a JSON parser gets
        back the exact text. Printable non-ASCII stays readable UTF-8.
        """
        text = "a\x7fb\x85c\u2028d\u202ee\U000e0001f caméra"
        line = event_as_json({"log_format": "{t}", "t": text, "log_level": LogLevel.info})
        assert line is not None
        self.assertTrue(line.isprintable(), line)
        self.assertIn("caméra", line)
        self.assertIn("\\u202e", line)
        self.assertIn("\\udb40\\udc01", line)
        record = json.loads(line)
        self.assertEqual((record["t"], record["message"]), (text, text))

    @given(st.text(), st.text(max_size=20))
    def test_any_text_round_trips_on_one_printable_line(self, value: str, name: str) -> None:
        key = name if name and not name.startswith("log_") else "k"
        line = event_as_json({"log_format": "v={v}", key: value, "v": value})
        assert line is not None
        self.assertTrue(line.isprintable())
        self.assertNotIn("\n", line)
        record = json.loads(line)
        self.assertEqual(record["message"], f"v={value}")
        line.encode("utf-8")  # no lone surrogate left raw


class ObserverTests(SynchronousTestCase):
    def test_one_utf8_line_per_event(self) -> None:
        out = io.BytesIO()
        log = Logger(namespace="rtunnel.test", observer=JSONLineObserver(out))
        log.info("site {site} up", site="caméra")
        log.debug("below the threshold")
        log.warn("site {site} down", site="b")
        lines = out.getvalue().split(b"\n")
        self.assertEqual(lines[-1], b"")
        self.assertEqual([json.loads(x.decode("utf-8"))["site"] for x in lines[:-1]], ["caméra", "b"])

    def test_closed_output_does_not_raise(self) -> None:
        """A daemonised twistd or a departed pipe reader: the event is lost, the process is not."""
        out = io.BytesIO()
        out.close()
        JSONLineObserver(out)({"log_format": "x"})

    def test_twistd_factory_writes_to_stdout(self) -> None:
        """observer() takes no arguments, provides ILogObserver and writes to the stdout it found."""
        raw = io.BytesIO()
        stdout = io.TextIOWrapper(raw, encoding="ascii")
        self.patch(sys, "stdout", stdout)
        obs = logjson.observer()
        self.assertTrue(ILogObserver.providedBy(obs))
        obs({"log_format": "site {site}", "site": "ß", "log_level": LogLevel.info})
        self.assertEqual(json.loads(raw.getvalue().decode("utf-8"))["site"], "ß")

    def test_twistd_factory_on_a_text_only_stdout(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        logjson.observer()({"log_format": "x", "log_level": LogLevel.info})
        self.assertEqual(json.loads(out.getvalue())["message"], "x")
