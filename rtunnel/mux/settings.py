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


@frozen
class WindowTuning:
    """
    How this end grows receive windows beyond C{initial_window} (not
    announced: it only changes what we grant).

    A stream whose sender is held back by its window on a long path (a WAN:
    50 ms each way makes a 256 KiB window worth only 2.5 MB/s) gets a larger
    window, found by bandwidth-delay probing in the manner of gRPC: a PING
    is sent when data arrives and another when it is answered, and the bytes
    each stream received until the second answer are two round trips' worth.
    A stream that received at least one window in them was limited by the
    window, so its window grows to twice what it received (at least double);
    streams opened later start at the largest window found
    (docs/protocol.md, "Window growth").

    Memory stays bounded: no stream's window exceeds C{max_window}, and the
    growth of all windows of a session together never exceeds
    C{session_budget}; so a session holds at most
    C{streams x initial_window + session_budget} bytes for slow readers.

    @ivar enabled: probe and grow at all.
    @ivar max_window: the largest window of one stream.
    @ivar session_budget: the most that all windows together may exceed
        their initial size by.
    @ivar probe_gap: bytes to receive between the end of one probe and the
        next; doubled after every probe that grew nothing (up to 64 times),
        so an uncongested LAN path is probed rarely.
    """

    enabled: bool = True
    max_window: int = field(default=16 * MIB, validator=_in_range(MIN_WINDOW, MAX_INITIAL_WINDOW))
    session_budget: int = field(default=64 * MIB, validator=_in_range(0, 2**40))
    probe_gap: int = field(default=256 * KIB, validator=_in_range(1, 2**40))
