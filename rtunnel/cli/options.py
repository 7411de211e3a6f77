"""
Option parsing helpers shared by both twistd plugins.
"""

from __future__ import annotations

import math

from twisted.python import usage

from ..adapter.protocol import Keepalive


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


def keepalive_from(options: usage.Options) -> Keepalive | None:
    """
    C{--keepalive SECONDS} (0 turns keepalive off) and C{--keepalive-timeout
    SECONDS} (default: three intervals).
    """
    interval_text = options["keepalive"]
    try:
        off = interval_text == "off" or float(interval_text) == 0
    except ValueError:
        off = False  # positive_float explains
    if off:
        return None
    interval = positive_float("keepalive", interval_text)
    timeout_text = options["keepalive-timeout"]
    timeout = positive_float("keepalive-timeout", timeout_text) if timeout_text else 3 * interval
    if timeout < interval:
        raise usage.UsageError("--keepalive-timeout must not be shorter than --keepalive")
    return Keepalive(interval=interval, timeout=timeout)


KEEPALIVE_PARAMETERS = [
    ["keepalive", None, "10", "Seconds of silence before pinging the peer (0: off)."],
    ["keepalive-timeout", None, None, "Seconds of silence after which the peer is dead (default: 3 x --keepalive)."],
    ["drain-grace", None, "10", "On SIGTERM, seconds that open streams get to finish."],
]
