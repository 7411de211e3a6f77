"""
Option parsing helpers shared by both twistd plugins.
"""

from __future__ import annotations

import math

import attrs
from twisted.logger import LogLevel
from twisted.python import usage

from ..adapter.protocol import Keepalive
from ..logs import set_level
from ..mux.settings import ALL_CAPABILITIES, Settings, WindowTuning


def default(config: type, name: str) -> str:
    """
    The default of field C{name} of the attrs class C{config}, written as
    its option takes it. The config classes are the one source of defaults:
    the taps, the builders and embedders all read them there, so a default
    changed in one place changes everywhere (tests/test_cli_defaults.py
    checks that every option's default parses back to the config's).
    """
    value = attrs.fields_dict(config)[name].default
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def size_text(size: int) -> str:
    """C{262144} as C{256K}: a byte count as L{byte_size} reads it back."""
    for unit, scale in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def positive_float(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise usage.UsageError(f"--{name}: {text!r} is not a number of seconds") from None
    if not value > 0:
        raise usage.UsageError(f"--{name}: must be greater than 0, got {text}")
    if not math.isfinite(value):
        raise usage.UsageError(f"--{name}: must be a finite number of seconds, got {text}")
    return value


def positive_int(name: str, text: str, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise usage.UsageError(f"--{name}: {text!r} is not a whole number") from None
    if value < 1:
        raise usage.UsageError(f"--{name}: must be at least 1, got {text}")
    if maximum is not None and value > maximum:
        raise usage.UsageError(f"--{name}: must be at most {maximum}, got {text}")
    return value


def keepalive_from(options: usage.Options, default: Keepalive, interval_share: float | None = None) -> Keepalive | None:
    """
    C{--keepalive SECONDS} (0 turns keepalive off) and C{--keepalive-timeout
    SECONDS}.

    Neither given: C{default}. Only C{--keepalive}: the timeout is three
    intervals. Only C{--keepalive-timeout}: the interval is C{default}'s,
    but (with C{interval_share}) at most that share of the timeout, so that
    an end which mostly leaves pinging to its peer still pings before it
    would give up.
    """
    interval_text = options["keepalive"]
    timeout_text = options["keepalive-timeout"]
    if interval_text is None:
        if timeout_text is None:
            return default
        timeout = positive_float("keepalive-timeout", timeout_text)
        interval = default.interval
        if interval_share is not None:
            interval = min(interval, interval_share * timeout)
    else:
        try:
            off = interval_text == "off" or float(interval_text) == 0
        except ValueError:
            off = False  # positive_float explains
        if off:
            return None
        interval = positive_float("keepalive", interval_text)
        timeout = positive_float("keepalive-timeout", timeout_text) if timeout_text else 3 * interval
    if timeout < interval:
        raise usage.UsageError("--keepalive-timeout must not be shorter than --keepalive")
    return Keepalive(interval=interval, timeout=timeout)


def byte_size(name: str, text: str) -> int:
    """C{65536}, C{256K}, C{16M} (binary units)."""
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
    number, unit = text.strip().upper().rstrip("B"), ""
    if number and number[-1] in "KMG":
        number, unit = number[:-1], number[-1]
    if not number.isascii() or not number.isdigit():
        raise usage.UsageError(f"--{name}: {text!r} is not a size in bytes (like 65536, 256K, 16M)")
    return int(number) * units[unit]


def flow_from(options: usage.Options, **settings: int) -> tuple[Settings, WindowTuning]:
    """
    The multiplexer settings this end announces (C{--window},
    C{--max-frame-size}, plus C{settings}) and its window growth
    (C{--max-window}; 0 turns growth off).
    """
    window = byte_size("window", options["window"])
    frame = byte_size("max-frame-size", options["max-frame-size"])
    max_window = byte_size("max-window", options["max-window"])
    try:
        announced = Settings(initial_window=window, max_frame_size=frame, capabilities=ALL_CAPABILITIES, **settings)
    except ValueError as e:
        raise usage.UsageError(
            f"--window must be 1K-1G and --max-frame-size 16K-16M: {e.args[0] if e.args else e}"
        ) from None
    if max_window == 0:
        return announced, WindowTuning(enabled=False)
    if max_window < window:
        raise usage.UsageError("--max-window must not be smaller than --window (0 turns growth off)")
    try:
        return announced, WindowTuning(max_window=max_window)
    except ValueError:
        raise usage.UsageError(f"--max-window {options['max-window']!r} is out of range (up to 1G)") from None


FLOW_PARAMETERS = [
    [
        "window",
        None,
        size_text(Settings().initial_window),
        "Initial receive window of each stream (bytes; K and M suffixes).",
    ],
    [
        "max-window",
        None,
        size_text(WindowTuning().max_window),
        "Largest window a stream may grow to on a long path (0: no growth).",
    ],
    ["max-frame-size", None, size_text(Settings().max_frame_size), "Largest DATA frame this end accepts."],
]


def keepalive_parameters(default: Keepalive, timeout_default: str) -> list[list[str | None]]:
    """C{--keepalive} and C{--keepalive-timeout}, with the defaults of one role
    (given only in the help: L{keepalive_from} must see what was given)."""
    return [
        [
            "keepalive",
            None,
            None,
            f"Seconds of silence before pinging the peer (0: off; default {default.interval:g}).",
        ],
        [
            "keepalive-timeout",
            None,
            None,
            f"Seconds of silence after which the peer is dead (default: {timeout_default}).",
        ],
    ]


def drain_parameters(grace: str) -> list[list[str | None]]:
    """C{--drain-grace}, with the default of one role."""
    return [["drain-grace", None, grace, "On SIGTERM, seconds that open streams get to finish."]]


LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

LOG_PARAMETERS = [
    ["log-level", None, "info", "Lowest level of rtunnel's own log lines: debug, info, warn, error or critical."],
]


def log_level_from(options: usage.Options) -> LogLevel:
    """C{--log-level NAME}, checked."""
    name = str(options["log-level"]).strip().lower()
    if name == "warning":
        name = "warn"
    if name not in LOG_LEVELS:
        raise usage.UsageError(f"--log-level: {options['log-level']!r} is not one of {', '.join(LOG_LEVELS)}")
    level: LogLevel = LogLevel.levelWithName(name)
    return level


def apply_log_level(level: LogLevel) -> None:
    """Make C{level} the threshold of rtunnel's loggers in this process."""
    set_level(level)
