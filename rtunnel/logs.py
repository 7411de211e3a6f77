"""
rtunnel's loggers: L{twisted.logger.Logger} with a process-wide threshold.

C{twistd} writes every level it is given, debug included. A debug line per
stream is useful when asked for, and a way for a peer to flood the log when
not; so rtunnel's loggers drop events below the threshold (L{set_level};
C{info} unless changed, C{--log-level} on both twistd plugins) before any
formatting is done. What a peer can trigger at will is also rate-limited
(L{rtunnel.logsafe.LogBudget}) and escaped (L{rtunnel.logsafe.printable}).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger as _TwistedLogger
from twisted.logger import LogLevel

from .logsafe import LogBudget, printable

__all__ = ["LogBudget", "Logger", "LogLevel", "current_level", "printable", "set_level"]

_threshold: LogLevel = LogLevel.info


def set_level(level: LogLevel) -> None:
    """
    Set the lowest level that rtunnel's loggers emit, for the whole
    process (C{--log-level} of both twistd plugins).
    """
    global _threshold
    _threshold = level


def current_level() -> LogLevel:
    return _threshold


_ORDER = {level: index for index, level in enumerate(LogLevel.iterconstants())}


class Logger(_TwistedLogger):
    """
    L{twisted.logger.Logger} that drops events below the process-wide
    threshold (see L{set_level}) before formatting anything.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if _ORDER[level] < _ORDER[_threshold]:
            return
        super().emit(level, format, **kwargs)
