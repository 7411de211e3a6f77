"""
The stream state machine as one table (docs/protocol.md, "Stream states").

A pair missing from L{TRANSITIONS} is not allowed: for a received frame that
is the peer's stream error, for a sent one it is our own bug.
"""

from __future__ import annotations

import enum

from attrs import define


class StreamState(enum.Enum):
    OPENING_OUT = "opening-out"
    OPENING_OUT_FIN = "opening-out-fin"
    OPENING_IN = "opening-in"
    OPENING_IN_FIN = "opening-in-fin"
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed-local"
    HALF_CLOSED_REMOTE = "half-closed-remote"
    CLOSED = "closed"


class Input(enum.Enum):
    SEND_OPEN_OK = "send OPEN_OK"
    SEND_OPEN_FAIL = "send OPEN_FAIL"
    SEND_DATA = "send DATA"
    SEND_FIN = "send FIN"
    SEND_WINDOW_UPDATE = "send WINDOW_UPDATE"
    SEND_RESET = "send RESET"
    RECV_OPEN_OK = "receive OPEN_OK"
    RECV_OPEN_FAIL = "receive OPEN_FAIL"
    RECV_DATA = "receive DATA"
    RECV_FIN = "receive FIN"
    RECV_WINDOW_UPDATE = "receive WINDOW_UPDATE"
    RECV_RESET = "receive RESET"

    @property
    def received(self) -> bool:
        return self.name.startswith("RECV_")


S = StreamState
I = Input  # noqa: E741 - the table reads better with short names

_RESETS = {I.SEND_RESET: S.CLOSED, I.RECV_RESET: S.CLOSED}

_BY_STATE: dict[StreamState, dict[Input, StreamState]] = {
    S.OPENING_OUT: {
        I.SEND_DATA: S.OPENING_OUT,
        I.SEND_FIN: S.OPENING_OUT_FIN,
        I.RECV_OPEN_OK: S.OPEN,
        I.RECV_OPEN_FAIL: S.CLOSED,
        I.RECV_WINDOW_UPDATE: S.OPENING_OUT,
        **_RESETS,
    },
    S.OPENING_OUT_FIN: {
        I.RECV_OPEN_OK: S.HALF_CLOSED_LOCAL,
        I.RECV_OPEN_FAIL: S.CLOSED,
        I.RECV_WINDOW_UPDATE: S.OPENING_OUT_FIN,
        **_RESETS,
    },
    S.OPENING_IN: {
        I.SEND_OPEN_OK: S.OPEN,
        I.SEND_OPEN_FAIL: S.CLOSED,
        I.SEND_WINDOW_UPDATE: S.OPENING_IN,
        I.RECV_DATA: S.OPENING_IN,
        I.RECV_FIN: S.OPENING_IN_FIN,
        **_RESETS,
    },
    S.OPENING_IN_FIN: {
        I.SEND_OPEN_OK: S.HALF_CLOSED_REMOTE,
        I.SEND_OPEN_FAIL: S.CLOSED,
        **_RESETS,
    },
    S.OPEN: {
        I.SEND_DATA: S.OPEN,
        I.SEND_WINDOW_UPDATE: S.OPEN,
        I.SEND_FIN: S.HALF_CLOSED_LOCAL,
        I.RECV_DATA: S.OPEN,
        I.RECV_WINDOW_UPDATE: S.OPEN,
        I.RECV_FIN: S.HALF_CLOSED_REMOTE,
        **_RESETS,
    },
    S.HALF_CLOSED_LOCAL: {
        I.SEND_WINDOW_UPDATE: S.HALF_CLOSED_LOCAL,
        I.RECV_DATA: S.HALF_CLOSED_LOCAL,
        I.RECV_WINDOW_UPDATE: S.HALF_CLOSED_LOCAL,
        I.RECV_FIN: S.CLOSED,
        **_RESETS,
    },
    S.HALF_CLOSED_REMOTE: {
        I.SEND_DATA: S.HALF_CLOSED_REMOTE,
        I.SEND_FIN: S.CLOSED,
        I.RECV_WINDOW_UPDATE: S.HALF_CLOSED_REMOTE,
        **_RESETS,
    },
    S.CLOSED: {},
}

#: {(state, input): next state}
TRANSITIONS: dict[tuple[StreamState, Input], StreamState] = {
    (state, inp): nxt for state, row in _BY_STATE.items() for inp, nxt in row.items()
}


@define(slots=True)
class StreamRecord:
    """
    What the session knows of one live stream.

    @ivar send_window: bytes we may still send (the peer's credit to us).
    @ivar recv_window: bytes the peer may still send (our credit to it).
    @ivar unacked: bytes consumed locally but not yet returned as credit.
    @ivar window: the credit target we keep topping the peer up to.
    """

    stream_id: int
    state: StreamState
    local: bool
    host: str
    port: int
    send_window: int
    recv_window: int
    window: int
    unacked: int = 0
