"""
Codes and exceptions of the multiplexing protocol.

Two kinds of failure are kept apart on purpose: a *peer* breaking the protocol is
reported as a L{ProtocolError} inside the core and turned into a RESET or GOAWAY,
never an exception escaping to the caller; a *caller* misusing the API (writing to
a closed stream, exceeding its credit) raises L{MuxUsageError}, because that is a
bug in our own code and must be loud.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """
    The one code space shared by OPEN_FAIL, RESET and GOAWAY (docs/protocol.md).
    """

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    STREAM_STATE_ERROR = 4
    FRAME_SIZE_ERROR = 5
    REFUSED_STREAM = 6
    CANCEL = 7
    GOING_AWAY = 8
    VERSION_MISMATCH = 9
    KEEPALIVE_TIMEOUT = 10
    SESSION_REPLACED = 11
    NOT_AUTHORIZED = 12
    CONNECTION_RESET = 13
    #: The peer flooded the session: frames that do nothing, beyond what
    #: L{rtunnel.mux.settings.FloodLimits} allows, or replies it never reads
    #: (HTTP/2's ENHANCE_YOUR_CALM).
    ENHANCE_YOUR_CALM = 14
    TARGET_NOT_ALLOWED = 32
    TARGET_REFUSED = 33
    TARGET_UNREACHABLE = 34
    TARGET_TIMEOUT = 35
    TARGET_DNS_FAILURE = 36
    TARGET_ERROR = 37


def code_name(code: int) -> str:
    """
    A readable name for C{code}, also for codes this version does not know.
    """
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"UNKNOWN_{code}"


class ProtocolError(Exception):
    """
    The peer broke the protocol in a way that ends the whole session.

    @ivar code: the GOAWAY code to send.
    @ivar reason: a human-readable reason, sent to the peer and logged.
    """

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code.name}: {self.reason}"


class MuxUsageError(Exception):
    """
    Our own code called the session API in a way the protocol forbids.
    """


class StreamLimitReached(MuxUsageError):
    """
    The peer allows no further concurrent streams from us right now.
    """


class SessionClosing(MuxUsageError):
    """
    No new streams: a GOAWAY was sent or received, or the session failed.
    """
