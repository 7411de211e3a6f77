"""
rtunnel's log as one JSON object per line, for log shippers.

journald, Docker, Kubernetes and the shippers behind them (Promtail/Loki,
Filebeat/Elasticsearch, Vector, Fluent Bit) read a process's standard
output line by line. A text line makes them parse C{site alpha connected
from 10.0.0.7:51234} back apart with a regular expression; a JSON line hands
them the fields rtunnel already passes to its log calls (C{site}, C{peer},
C{reason}, C{forward}, ...) as keys. Run either role as::

    twistd -n --logger rtunnel.logjson.observer rtunnel-server ...
    twistd -n --logger rtunnel.logjson.observer rtunnel ...

twistd's C{--logger} takes the fully-qualified name of a callable with no
arguments that returns the log observer (L{observer}); it replaces the text
log, and twistd then ignores C{--logfile}. twistd builds the application
(the plugins' C{makeService}) before it starts logging, so a plugin option
could only choose the observer through the application's
C{ILogObserver} component; C{--logger} is twistd's own documented way and
needs nothing from the plugins.

Each line holds C{time} (ISO 8601, UTC, microseconds, C{Z}), C{level},
C{namespace}, C{message} (the text the text log shows, traceback apart),
C{system} when the event names one, then the event's own fields, and
C{failure} (the traceback) when the event carries one. What goes in:

 - Fields are the keyword arguments of the log call. Twisted's internals
   (C{log_*} keys) and the keys of the legacy C{twisted.python.log} event
   shape (C{message} tuple, C{time}, C{isError}, C{why}, ...) are left out;
   what they say is in the fixed keys already.
 - A field that would overwrite a fixed key is written as C{NAME_} (e.g. a
   C{message} field), unless it only repeats that key's value.
 - Values of a JSON type go in as they are (lists, tuples and mappings
   element by element); enumerations and Twisted constants by name;
   C{bytes} escaped as Python writes them (C{\\x1b}, C{\\\\}, the same
   escapes as L{rtunnel.logsafe.printable}); anything else C{str()}-ed, cut
   to L{MAX_VALUE} characters. An object whose C{str()} raises, a value
   nested too deep, a float that JSON cannot hold: each gets a stand-in,
   never an exception, because an observer that raises is removed by
   Twisted and the log goes silent.
 - The line is UTF-8 and every character that is not printable (C1
   controls, DEL, bidi overrides, line and paragraph separators) is a
   C{\\uXXXX} escape, so a line cannot drive a terminal or be split by a
   tool that breaks lines at U+2028 while a JSON parser still reads back
   the exact text. Peer-supplied text was already escaped and cut by the
   log calls themselves (L{rtunnel.logsafe}); that is not done twice.

An event the text log would not show (no format and no failure) is not
written either.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
import sys
from collections.abc import Callable, Mapping
from typing import IO

from constantly import NamedConstant  # type: ignore[import-untyped]
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["MAX_VALUE", "JSONLineObserver", "event_as_json", "observer"]

#: Longest C{str()} of a non-JSON field value or escaped C{bytes} value (characters).
MAX_VALUE = 1024

#: Nesting depth of lists and mappings written as JSON; deeper values are C{str()}-ed.
_MAX_DEPTH = 4

_FIXED = ("time", "level", "namespace", "message", "system", "failure")

#: The keys of a legacy (C{twisted.python.log.msg}/C{err}) event that the
#: fixed keys already carry.
_LEGACY = frozenset({"message", "time", "isError", "format", "why", "failure", "system", "printed", "logLevel"})

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _time(event: LogEvent) -> str:
    stamp = event.get("log_time")
    if not isinstance(stamp, int | float) or isinstance(stamp, bool) or not math.isfinite(stamp):
        stamp = dt.datetime.now(dt.UTC).timestamp()
    try:
        when = _EPOCH + dt.timedelta(seconds=stamp)
    except OverflowError:
        when = dt.datetime.now(dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _cut(text: str) -> str:
    if len(text) > MAX_VALUE:
        return f"{text[:MAX_VALUE]}…({len(text)} chars)"
    return text


def _str(value: object) -> str:
    try:
        return _cut(str(value))
    except Exception as e:  # noqa: BLE001 - a broken __str__ must not cost the line
        return f"<unprintable {type(value).__name__}: {type(e).__name__}>"


def _value(value: object, depth: int = 0) -> object:
    """C{value} made of JSON types only (see the module docstring)."""
    if value is None or type(value) in (str, bool, int):
        return value
    if type(value) is float:
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum | NamedConstant):
        return _str(value.name)
    if isinstance(value, bytes | bytearray | memoryview):
        return _cut(repr(bytes(value))[2:-1])
    if depth < _MAX_DEPTH:
        if isinstance(value, list | tuple | set | frozenset):
            items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
            return [_value(item, depth + 1) for item in items]
        if isinstance(value, Mapping):
            return {_str(key): _value(item, depth + 1) for key, item in value.items()}
    return _str(value)


def _traceback(failure: object) -> str:
    try:
        if isinstance(failure, Failure):
            return failure.getTraceback()
        return _str(failure)
    except Exception as e:  # noqa: BLE001 - as the text log: say the traceback was lost, keep the line
        return f"(unable to obtain traceback: {_str(e)})"


def _is_legacy(event: LogEvent) -> bool:
    return "isError" in event and isinstance(event.get("message"), tuple)


def _message(event: LogEvent, legacy: bool) -> str:
    if legacy and not event["message"] and event.get("isError") and "failure" in event:
        # twisted.python.log.err: the text log shows "why" and then the
        # traceback; here the traceback has its own key.
        return _str(event.get("why") or "Unhandled Error")
    try:
        return formatEvent(event)
    except Exception as e:  # noqa: BLE001 - formatEvent reports its own errors; this is the last guard
        return f"Unable to format event: {_str(e)}"


def _record(event: LogEvent) -> dict[str, object] | None:
    legacy = _is_legacy(event)
    failure = event.get("log_failure")
    if failure is None and legacy and isinstance(event.get("failure"), Failure):
        failure = event["failure"]
    message = _message(event, legacy)
    if not message and failure is None:
        return None
    level = event.get("log_level")
    namespace = event.get("log_namespace")
    record: dict[str, object] = {
        "time": _time(event),
        "level": level.name if isinstance(level, NamedConstant) else "info",
        "namespace": namespace if isinstance(namespace, str) else "-",
        "message": message,
    }
    system = event.get("log_system")
    if system is not None and system != "-":  # "-": twisted.python.log's "no system"
        record["system"] = _str(system)
    for key, value in event.items():
        name = key if isinstance(key, str) else _str(key)
        if name.startswith("log_") or (legacy and name in _LEGACY):
            continue
        converted = _value(value)
        if name in _FIXED:
            if converted == record.get(name):
                continue
            name += "_"
        record[name] = converted
    if failure is not None:
        record["failure"] = _traceback(failure)
    return record


def _safe_char(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def event_as_json(event: LogEvent) -> str | None:
    """
    One log event as one line of JSON (no newline at the end), or C{None}
    when the text log would not show it either. Never raises.
    """
    try:
        record = _record(event)
        if record is None:
            return None
        line = json.dumps(record, ensure_ascii=False, allow_nan=False)
    except Exception as e:  # noqa: BLE001 - an observer that raises is dropped by Twisted
        line = json.dumps(
            {
                "time": _time({}),
                "level": LogLevel.error.name,
                "namespace": __name__,
                "message": f"an event could not be written as JSON: {_str(e)}",
                "event_namespace": _str(event.get("log_namespace")),
                "event_format": _str(event.get("log_format")),
            },
            ensure_ascii=False,
        )
    if not line.isprintable():
        # json.dumps escapes C0 controls only; escape what is left that
        # a terminal or a line splitter would act on.
        line = "".join(char if char.isprintable() else _safe_char(char) for char in line)
    return line


@implementer(ILogObserver)
class JSONLineObserver:
    """
    Writes each event as a JSON line (L{event_as_json}) to a binary
    stream, UTF-8 whatever the locale says (JSON is UTF-8), in one write
    and flushed, so that lines from the reactor and from threads never
    interleave and none waits in a buffer when the process is killed.
    """

    def __init__(self, out: IO[bytes] | Callable[[bytes], object]) -> None:
        self._write: Callable[[bytes], object] = out if callable(out) else out.write
        self._flush: Callable[[], object] = (lambda: None) if callable(out) else out.flush

    def __call__(self, event: LogEvent) -> None:
        line = event_as_json(event)
        if line is None:
            return
        try:
            self._write(line.encode("utf-8", "backslashreplace") + b"\n")
            self._flush()
        except (OSError, ValueError):
            # Standard output closed or gone (a daemonised twistd, a pipe
            # whose reader left): nowhere left to say so.
            pass


def observer() -> ILogObserver:
    """
    The C{twistd --logger} factory: JSON lines on standard output.

    twistd calls it with no arguments before it replaces C{sys.stdout} by a
    file that logs what is printed (twisted.logger's C{redirectStandardIO}),
    so the stream taken here is the real one.
    """
    stream = sys.stdout
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        return JSONLineObserver(buffer)
    return JSONLineObserver(lambda data: (stream.write(data.decode("utf-8")), stream.flush()))
