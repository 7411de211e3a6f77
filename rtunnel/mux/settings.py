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

#: HELLO capability bit: this end understands SERVICES frames (named
#: services, docs/protocol.md). Sent in the HELLO field older ends ignore.
CAP_SERVICES = 0x0001
#: HELLO capability bit: this end understands REPLICAS frames (the tunnel
#: server's replica set, docs/protocol.md). A server sends them only to a
#: site that offers it; a site that does not keeps its one session.
CAP_REPLICAS = 0x0002
#: Every capability this implementation offers.
ALL_CAPABILITIES = CAP_SERVICES | CAP_REPLICAS


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
    @ivar capabilities: the HELLO capability bits this end offers (the u16
        an older end sends as 0 and ignores). The default, C{0}, is the
        plain protocol, exactly as an end that predates them (tests build
        "old" peers this way); rtunnel's roles offer L{ALL_CAPABILITIES}
        (L{ROLE_SETTINGS}), as they turn window growth on.
    """

    max_frame_size: int = field(default=64 * KIB, validator=_in_range(MIN_FRAME_SIZE, MAX_FRAME_SIZE))
    initial_window: int = field(default=256 * KIB, validator=_in_range(MIN_WINDOW, MAX_INITIAL_WINDOW))
    max_streams: int = field(default=1024, validator=_in_range(1, MAX_STREAMS))
    version: int = field(default=PROTOCOL_VERSION, validator=_in_range(1, 0xFFFF))
    capabilities: int = field(default=0, validator=_in_range(0, 0xFFFF))


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


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, not {value!r}")


@frozen
class Allowance:
    """
    How many frames of one useless kind a peer may send: C{burst} at once,
    then C{rate} per second on average (a token bucket: C{burst} tokens,
    refilled at C{rate} per second, one spent per frame).
    """

    rate: float = field(validator=lambda _, attribute, value: _check_positive(attribute.name, value))
    burst: int = field(validator=[validators.instance_of(int), validators.ge(1), validators.le(2**31 - 1)])

    def describe(self) -> str:
        """How the allowance reads in a log line and a GOAWAY reason."""
        return f"{self.burst} at once, then {self.rate:g}/s"


@frozen
class FloodLimits:
    """
    What a session tolerates from a peer that sends frames which do nothing
    useful, or does not read the replies its frames elicit
    (docs/protocol.md, "Flood protection"). Past any of them the session
    ends with GOAWAY ENHANCE_YOUR_CALM and a reason saying which limit.

    The lessons are HTTP/2's: the ping, reset and settings floods
    (CVE-2019-9512, -9514, -9515) queue a reply per frame for a peer that
    reads nothing; the empty-frames flood (CVE-2019-9518) and rapid reset
    (CVE-2023-44487) cost the receiver work per frame with nothing to show.

    Allowances (C{None}: not counted) are per session, token buckets over
    the time the caller passes to L{MuxSession.receive_data}; a caller that
    passes no time gets no rate caps (the reply limits still apply).

    @ivar pings: PINGs received (and PING ACKs that answer nothing). A
        legitimate rtunnel peer sends one keepalive PING per 10 s when idle
        and two per window probe, probes being at least 256 KiB of data
        apart (16 MiB once windows stop growing): under 100 a second even
        at 700 MB/s, a few hundred in a burst while windows grow.
    @ivar empty_data: DATA frames with no payload and no FIN. rtunnel never
        sends one.
    @ivar refused_opens: OPENs from the peer that this end refused (by the
        caller's C{refuse_stream}, or by the session: stream limit, going
        away). On the tunnel server every OPEN a site sends is refused:
        sites may not open streams. On the site an OPEN the site refuses
        comes from a cloud client (a target not allowed, a connect that
        failed) that may retry in a loop; cutting the site's tunnel for it
        would let one bad client disturb all the others, so sites do not
        count them (L{FloodLimits.for_site}).
    @ivar reply_pause: replies elicited by the peer's own frames (PING
        ACKs, OPEN_FAIL refusals, RESETs answering a broken stream rule)
        queued while the peer reads nothing (our transport paused us) at
        which the adapter stops reading from the peer until it reads again.
    @ivar reply_limit: as C{reply_pause}, at which the session ends: what
        one read can still add after reading stopped is bounded by it.
    @ivar stall_timeout: seconds reading may stay stopped for unread replies
        before the adapter ends the session (it owns the clock).
    """

    pings: Allowance | None = Allowance(rate=200, burst=1000)
    empty_data: Allowance | None = Allowance(rate=10, burst=100)
    refused_opens: Allowance | None = Allowance(rate=10, burst=100)
    reply_pause: int = field(default=128, validator=_in_range(1, 2**31 - 1))
    reply_limit: int = field(default=4096, validator=_in_range(1, 2**31 - 1))
    stall_timeout: float = field(
        default=30.0, validator=lambda _, attribute, value: _check_positive(attribute.name, value)
    )

    @reply_limit.validator
    def _check_reply_limit(self, attribute: object, value: int) -> None:
        if value < self.reply_pause:
            raise ValueError(f"reply_limit {value} is below reply_pause {self.reply_pause}")

    @classmethod
    def for_server(cls) -> FloodLimits:
        """The tunnel server's limits (the defaults): every OPEN from a site is refused, and counted."""
        return _SERVER_LIMITS if cls is FloodLimits else cls()

    @classmethod
    def for_site(cls) -> FloodLimits:
        """
        The site's limits: refused OPENs are not counted (a cloud client
        retrying a refused target must not cut the tunnel), and far more
        unread replies are tolerated before the session ends (the server
        opens a stream per client connection; the refusals of a burst of
        them may arrive in one read while the server is slow to read).
        Reading still stops at C{reply_pause}, for as long as the server
        does not read.
        """
        return _SITE_LIMITS if cls is FloodLimits else cls(refused_opens=None, reply_limit=65536)

    @classmethod
    def for_role(cls, initiator: bool) -> FloodLimits:
        """The limits of the site (initiator) or of the tunnel server (acceptor)."""
        return cls.for_site() if initiator else cls.for_server()


# One instance of each role's limits, shared by all sessions (they are
# frozen): a server holds ten thousand sessions.
_SERVER_LIMITS = FloodLimits()
_SITE_LIMITS = FloodLimits(refused_opens=None, reply_limit=65536)


#: The settings the site and server roles announce unless configured
#: otherwise: the defaults, with every capability offered.
ROLE_SETTINGS = Settings(capabilities=ALL_CAPABILITIES)
