"""
The values each end announces in its HELLO, with the protocol's allowed ranges.
"""

from __future__ import annotations

from attrs import field, frozen, validators

KIB = 1024
MIB = 1024 * KIB

PROTOCOL_VERSION = 1

MIN_FRAME_SIZE = 16 * KIB
MAX_FRAME_SIZE = 16 * MIB
MIN_WINDOW = 1 * KIB
MAX_INITIAL_WINDOW = 1024 * MIB
MAX_STREAMS = 2**31 - 1


def _in_range(low: int, high: int):  # type: ignore[no-untyped-def]
    return [validators.instance_of(int), validators.ge(low), validators.le(high)]


@frozen
class Settings:
    """
    What one end accepts (docs/protocol.md, "Session start").

    @ivar max_frame_size: the largest DATA payload this end receives. 64 KiB
        matches Twisted's socket read size, so one read travels as one frame.
    @ivar initial_window: the credit this end grants the peer on every new
        stream. 256 KiB fills a LAN path and bounds a stalled stream's memory.
    @ivar max_streams: how many streams opened by the peer may be open at once.
    """

    max_frame_size: int = field(default=64 * KIB, validator=_in_range(MIN_FRAME_SIZE, MAX_FRAME_SIZE))
    initial_window: int = field(default=256 * KIB, validator=_in_range(MIN_WINDOW, MAX_INITIAL_WINDOW))
    max_streams: int = field(default=1024, validator=_in_range(1, MAX_STREAMS))
    version: int = field(default=PROTOCOL_VERSION, validator=_in_range(1, 0xFFFF))
