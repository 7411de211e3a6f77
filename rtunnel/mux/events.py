"""
What L{MuxSession.receive_data} reports to the code driving it.

Events are plain values: the adapter dispatches on their type. Every stream
the peer or the session ends gets exactly one terminal event
(L{StreamRefused}, L{StreamReset} or L{StreamClosed}) from C{receive_data};
when the whole session ends (a fatal GOAWAY received, or L{SessionFailed})
every live stream is first reported as L{StreamReset} with the GOAWAY's
code. A stream ended by a local call gets no event: C{refuse_stream} and
C{reset_stream} end it at once, and C{end_stream}/C{send_data} return
C{True} when our FIN was the last.
"""

from __future__ import annotations

from collections.abc import Mapping

from attrs import frozen

from ..address import HostPort
from .frames import Replicas
from .settings import Settings


@frozen
class SessionReady:
    """The peer's HELLO arrived; streams may be opened now."""

    peer_settings: Settings
    version: int


@frozen
class ServicesAnnounced:
    """The peer's SERVICES frame arrived (both ends offered the capability):
    the named services it declares, checked (names are DNS labels, hosts
    and ports by the address grammar, no name twice)."""

    services: Mapping[str, HostPort]


@frozen
class ReplicasAnnounced:
    """A REPLICAS frame arrived (on the initiator, both ends offering the
    capability): the tunnel server's replica set as the replica this
    session reached sees it now, replacing any set announced before."""

    replicas: Replicas


@frozen
class StreamRequested:
    """The peer asks us to open a stream to C{host}:C{port}; answer with
    C{accept_stream} or C{refuse_stream}."""

    stream_id: int
    host: str
    port: int


@frozen
class StreamAccepted:
    """The peer answered OPEN_OK to a stream we opened."""

    stream_id: int


@frozen
class StreamRefused:
    """The peer answered OPEN_FAIL (or did not process the stream before a
    GOAWAY). Terminal."""

    stream_id: int
    code: int
    reason: str


@frozen
class DataReceived:
    """Stream bytes arrived. Credit for them returns only when the
    adapter calls C{consumed}."""

    stream_id: int
    data: bytes


@frozen
class StreamEnded:
    """The peer sent FIN: it will send no more on this stream."""

    stream_id: int


@frozen
class StreamReset:
    """The stream ended abruptly. C{by_peer} is false when this end reset it
    because the peer broke a stream rule. Terminal."""

    stream_id: int
    code: int
    reason: str
    by_peer: bool


@frozen
class StreamClosed:
    """Both directions ended cleanly with FIN. Terminal."""

    stream_id: int


@frozen
class SendWindowAvailable:
    """The peer granted credit; C{window} bytes may be sent now."""

    stream_id: int
    window: int


@frozen
class PongReceived:
    """An answer to one of our PINGs (a PING+ACK answering none is ignored)."""

    opaque: bytes


@frozen
class PingReceived:
    """The peer pinged us (the PONG is already queued)."""

    opaque: bytes


@frozen
class GoAwayReceived:
    """The peer accepts no new streams. C{fatal} means it is closing the
    connection now and every stream is gone (each was just reported as
    L{StreamReset}); otherwise it drains."""

    last_stream_id: int
    code: int
    reason: str
    fatal: bool


@frozen
class SessionFailed:
    """We detected a session-level protocol error: a GOAWAY with C{code} is
    queued and the connection should be closed after sending it. Every live
    stream was just reported as L{StreamReset} (C{by_peer} false)."""

    code: int
    reason: str


@frozen
class FloodDetected:
    """
    The peer went past one of the session's L{FloodLimits}: it sent more
    frames of a useless kind than allowed (C{count} of them in C{seconds}),
    or left C{count} replies unread (C{seconds} is then C{None}). Reported
    just before the L{SessionFailed} with ENHANCE_YOUR_CALM that ends the
    session, so that the adapter can log who and what with named fields.

    @ivar what: the kind: C{"PING"}, C{"empty DATA"}, C{"refused OPEN"},
        or C{"unread replies"}.
    @ivar limit: the limit, as it reads in a log line.
    @ivar detail: for unread replies, which replies (e.g. C{"4097 PING
        ACKs"}); empty otherwise.
    """

    what: str
    count: int
    seconds: float | None
    limit: str
    detail: str = ""

    @property
    def rate(self) -> float | None:
        """Frames per second over C{seconds}; C{None} for unread replies, or
        when they all came at once (in one read: no time passed)."""
        if not self.seconds:
            return None
        return self.count / self.seconds


Event = (
    SessionReady
    | ServicesAnnounced
    | ReplicasAnnounced
    | StreamRequested
    | StreamAccepted
    | StreamRefused
    | DataReceived
    | StreamEnded
    | StreamReset
    | StreamClosed
    | SendWindowAvailable
    | PongReceived
    | PingReceived
    | GoAwayReceived
    | FloodDetected
    | SessionFailed
)
