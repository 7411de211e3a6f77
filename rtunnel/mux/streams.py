"""
The stream state machine as one table (docs/protocol.md, "Stream states").

A pair missing from L{TRANSITIONS} is not allowed: for a received frame that
is the peer's stream error, for a sent one it is our own bug.
"""

from __future__ import annotations

import enum

from attrs import define


class StreamState(enum.IntEnum):
    # IntEnum, not Enum: states and inputs key the transition table on the
    # data path, and Enum hashes in Python while int hashes in C.
    OPENING_OUT = 1
    OPENING_OUT_FIN = 2
    OPENING_IN = 3
    OPENING_IN_FIN = 4
    OPEN = 5
    HALF_CLOSED_LOCAL = 6
    HALF_CLOSED_REMOTE = 7
    CLOSED = 8

    @property
    def label(self) -> str:
        """The name docs/protocol.md uses, e.g. C{half-closed-local}."""
        return self.name.lower().replace("_", "-")


class Input(enum.IntEnum):
    SEND_OPEN_OK = 1
    SEND_OPEN_FAIL = 2
    SEND_DATA = 3
    SEND_FIN = 4
    SEND_WINDOW_UPDATE = 5
    SEND_RESET = 6
    RECV_OPEN_OK = 7
    RECV_OPEN_FAIL = 8
    RECV_DATA = 9
    RECV_FIN = 10
    RECV_WINDOW_UPDATE = 11
    RECV_RESET = 12

    @property
    def received(self) -> bool:
        return self.name.startswith("RECV_")

    @property
    def label(self) -> str:
        """E.g. C{send DATA}, C{receive WINDOW_UPDATE}."""
        direction, _, frame = self.name.partition("_")
        return f"{'receive' if direction == 'RECV' else 'send'} {frame}"


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
