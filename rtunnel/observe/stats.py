"""
The figures the roles keep: plain counters, read by the admin pages
(L{rtunnel.observe.server_view}) and by the Prometheus collectors
(L{rtunnel.observe.metrics}).

Cheap where it matters. Payload bytes are counted in two integer slots of
each L{MuxProtocol <rtunnel.adapter.protocol.MuxProtocol>}
(C{bytes_sent}, C{bytes_received}), one add per frame; everything here is
touched once per stream (an open's outcome: one dictionary update), once
per session or connection, or once per refusal. Nothing here allocates per
byte or per frame, and nothing calls back into the roles.

B{Threads.} Everything here is written on the reactor thread only. The
collectors read it from the thread that serves the scrape, without a lock,
so every read they make is one C-level step (reading an attribute or an
int, C{dict(d)}, C{list(d.items())}; L{snapshot_items}), and every value a
reader needs consistent with another is published as one immutable object
assigned in one step: a site's byte totals (L{Live}: what ended sessions
carried and the sessions still live) change by replacing the whole tuple,
so a reader sees the bytes of a session that just ended either in the
session or in the total, never in both nor in neither, and a counter never
goes backwards between two scrapes.

Nothing here knows Twisted.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple, Protocol, TypeVar

from ..logsafe import printable
from ..mux.errors import ErrorCode, code_name
from .view import Rates, Refusal, Throughput

__all__ = [
    "REFUSALS_KEPT",
    "SAMPLES",
    "SAMPLE_INTERVAL",
    "ClientFigures",
    "Counted",
    "DoorFigures",
    "Live",
    "ServerFigures",
    "SiteFigures",
    "bump",
    "result_label",
    "snapshot_items",
]

#: Seconds between two throughput samples of a site.
SAMPLE_INTERVAL = 5.0
#: Throughput samples kept per site: five minutes at L{SAMPLE_INTERVAL}.
SAMPLES = 60
#: Refusals kept for the status page and the JSON API.
REFUSALS_KEPT = 100

_K = TypeVar("_K")
_V = TypeVar("_V")


class Counted(Protocol):
    """
    What the figures read of a live session (L{MuxProtocol
    <rtunnel.adapter.protocol.MuxProtocol>} has it): payload bytes each
    way, its streams, its last keepalive round trip.
    """

    bytes_sent: int
    bytes_received: int
    last_rtt: float | None

    @property
    def streams(self) -> Mapping[int, object]: ...


def bump(counts: dict[str, int], key: str, by: int = 1) -> None:
    """C{counts[key] += by}, starting from 0: one dictionary update."""
    counts[key] = counts.get(key, 0) + by


def result_label(code: int) -> str:
    """
    The C{result} label of a stream open answered with C{code}: C{"ok"}
    for 0 (OPEN_OK), else the error code's name in lower case with dashes
    (C{"target-not-allowed"}). Codes this version does not know are one
    label, C{"unknown-code"}: the peer chooses the code, and a label per
    value would let it grow the series without bound.
    """
    if code == 0:
        return "ok"
    try:
        name = ErrorCode(code).name
    except ValueError:
        return "unknown-code"
    return name.lower().replace("_", "-")


def snapshot_items(mapping: Mapping[_K, _V]) -> list[tuple[_K, _V]]:
    """
    C{list(mapping.items())} for a dictionary the reactor thread may be
    changing: one C-level step that no other Python code interleaves with,
    except a garbage collection that runs a finalizer which lets the
    reactor in; that would raise C{RuntimeError} (changed size during
    iteration), and the copy is simply taken again.
    """
    for _ in range(16):
        try:
            return list(mapping.items())
        except RuntimeError:
            continue
    return list(dict(mapping).items())


class Live(NamedTuple):
    """
    A figure's byte totals, replaced whole (see the module on threads).

    @ivar sent: payload bytes the sessions that ended sent.
    @ivar received: payload bytes they received.
    @ivar current: the live session, if any.
    @ivar retiring: sessions replaced by a newer one but not yet gone (a
        site's takeover: the old session ends a moment later).
    """

    sent: int
    received: int
    current: Counted | None
    retiring: tuple[Counted, ...]

    def totals(self) -> tuple[int, int]:
        """Bytes sent and received by every session, ended or live."""
        sent, received = self.sent, self.received
        current = self.current
        if current is not None:
            sent += current.bytes_sent
            received += current.bytes_received
        for session in self.retiring:
            sent += session.bytes_sent
            received += session.bytes_received
        return sent, received

    def streams(self) -> int:
        """Streams open now in the live sessions."""
        count = len(self.current.streams) if self.current is not None else 0
        for session in self.retiring:
            count += len(session.streams)
        return count


_NO_SESSION = Live(0, 0, None, ())


class _Sessions:
    """
    Byte totals over a sequence of sessions: L{attach} each as it starts,
    L{detach} it once it is gone.
    """

    __slots__ = ("live", "sessions")

    def __init__(self) -> None:
        self.live = _NO_SESSION
        #: sessions opened so far
        self.sessions = 0

    def attach(self, session: Counted) -> None:
        """C{session} is the live one from now on (an older one still live retires)."""
        live = self.live
        retiring = live.retiring if live.current is None else (*live.retiring, live.current)
        self.live = Live(live.sent, live.received, session, retiring)

    def detach(self, session: Counted) -> None:
        """C{session} is gone: its bytes join the totals of ended sessions."""
        live = self.live
        if live.current is session:
            current, retiring = None, live.retiring
        elif any(s is session for s in live.retiring):
            current, retiring = live.current, tuple(s for s in live.retiring if s is not session)
        else:
            return  # never attached
        self.live = Live(live.sent + session.bytes_sent, live.received + session.bytes_received, current, retiring)

    @property
    def session(self) -> Counted | None:
        """The live session, if any."""
        return self.live.current


class SiteFigures(_Sessions):
    """
    One site as the tunnel server counts it, kept for every site that had
    a session or a refusal since the server started (about 200 bytes, and
    a throughput ring of about 600 bytes once bytes flowed, as sys.getsizeof counts it).

    Bytes are from the server's side: C{sent} went to the site, C{received}
    came from it.

    @ivar opens: stream opens to the site by result (L{result_label}, or
        the registry's own refusals: C{not-connected}, C{stream-limit},
        C{too-many-waiting}, C{going-away}); C{None} until the first.
    @ivar last_refusal: the newest refusal that concerned the site.
    @ivar last_seen: when its last session ended (seconds since the
        epoch), or when the state database last saw it at start.
    """

    __slots__ = (
        "name",
        "fleet",
        "opens",
        "last_refusal",
        "last_seen",
        "_ring",
        "_ring_start",
        "_prev_sent",
        "_prev_received",
    )

    def __init__(self, name: str, fleet: ServerFigures) -> None:
        super().__init__()
        self.name = name
        self.fleet = fleet
        self.opens: dict[str, int] | None = None
        self.last_refusal: Refusal | None = None
        self.last_seen: float | None = None
        #: throughput, bytes/s: [to, from] per sample, made when bytes first flow
        self._ring: array[float] | None = None
        #: the fleet's sample number when the site's first session started (-1: none yet)
        self._ring_start = -1
        self._prev_sent = 0
        self._prev_received = 0

    # -- called by MuxProtocol (its `figures`) -----------------------------

    def local_open(self, code: int, reason: str) -> None:
        """The site answered an OPEN of ours: C{code} 0 (OPEN_OK) or why not."""
        label = result_label(code)
        opens = self.opens
        if opens is None:
            opens = self.opens = {}
        opens[label] = opens.get(label, 0) + 1
        if code:
            self.fleet.refuse(self.name, "stream", f"{code_name(code)}: {printable(reason)}")

    def remote_open(self, code: int, reason: str) -> None:
        """The site opened a stream to us (refused: sites open none); not a figure of the site's."""

    # -- called by the registry ------------------------------------------------

    def refused_open(self, label: str, reason: str) -> None:
        """The registry refused an open to the site before any OPEN (not connected, a limit)."""
        opens = self.opens
        if opens is None:
            opens = self.opens = {}
        opens[label] = opens.get(label, 0) + 1
        self.fleet.refuse(self.name, "stream", reason)

    # -- throughput --------------------------------------------------------------

    def _sample(self, tick: int, interval: float, samples: int) -> None:
        """Record the bytes/s since the last sample at position C{tick}."""
        sent, received = self.live.totals()
        to_site = sent - self._prev_sent
        from_site = received - self._prev_received
        self._prev_sent, self._prev_received = sent, received
        ring = self._ring
        if ring is None:
            if not (to_site or from_site):
                return  # no bytes ever: no ring (an idle fleet keeps none)
            ring = self._ring = array("f", bytes(8 * samples))
        index = 2 * (tick % samples)
        ring[index] = max(to_site, 0) / interval
        ring[index + 1] = max(from_site, 0) / interval

    def throughput(self, tick: int, interval: float, samples: int) -> Throughput:
        """The rates of the samples taken since the site's first session, oldest first."""
        if self._ring_start < 0:
            return Throughput(interval, (), ())
        count = min(samples, tick - self._ring_start)
        ring = self._ring
        if ring is None:
            zeros = (0.0,) * count
            return Throughput(interval, zeros, zeros)
        # One copy of the window, read in the thread that makes the JSON: a
        # full history of ten thousand sites is taken on the reactor (about
        # 1 µs a site here; 15 with a float per rate, see Rates).
        start = 2 * ((tick - count + 1) % samples)
        end = start + 2 * count
        window = ring[start:end] if end <= len(ring) else ring[start:] + ring[: end - len(ring)]
        return Throughput(interval, Rates(window, 0, 2), Rates(window, 1, 2))


class DoorFigures:
    """
    One front door (C{socks5} or C{http-connect}): client connections
    accepted, and refusals by kind (L{RefusalKind
    <rtunnel.frontdoor.refusals.RefusalKind>} values).
    """

    __slots__ = ("door", "fleet", "accepted", "refusals")

    def __init__(self, door: str, fleet: ServerFigures | None = None) -> None:
        self.door = door
        self.fleet = fleet
        self.accepted = 0
        self.refusals: dict[str, int] = {}

    def refused(self, kind: str, site: str, reason: str | None, keep: bool = True) -> None:
        """
        Count a refusal of kind C{kind}. With a C{reason} it is the door's
        own decision, counted and kept among the fleet's refusals (see
        L{ServerFigures.refuse} for C{keep}); without, the registry or the
        site decided it, and it is already there as a stream refusal.
        """
        bump(self.refusals, kind)
        if reason is not None and self.fleet is not None:
            self.fleet.refuse(site, "frontdoor", reason, keep)


class ServerFigures:
    """
    The tunnel server's figures: the fleet's, and one L{SiteFigures} per
    site (L{site}).

    @param now: the time of a refusal (seconds since the epoch).
    @ivar handshakes: connections on the tunnel port by outcome: C{ok} (a
        site session), a site refused (C{site-unknown}, C{site-revoked},
        C{certificate-superseded}), C{bad-certificate}, C{tls-error},
        C{closed} (gone before TLS finished), C{timeout},
        C{too-much-data}, C{session-failed} (no HELLO after TLS),
        C{preauth-limit} and C{queue-timeout} (turned away by the waiting
        room).
    @ivar enrollments: enrollment exchanges by outcome: C{ok}, the store's
        refusal codes (C{token-spent}, ...), C{bad-request},
        C{internal-error}, C{timeout}.
    @ivar sessions: site sessions opened.
    @ivar forward_connections: client connections accepted by every forward.
    @ivar doors: the front doors' figures by door.
    @ivar refusals: the last L{REFUSALS_KEPT} refusals, oldest first.
    @ivar refusal_counts: every refusal by kind (C{handshake},
        C{enrollment}, C{stream}, C{frontdoor}), also those a rate-limited
        log line left out of L{refusals}.
    """

    def __init__(
        self,
        now: Callable[[], float],
        *,
        interval: float = SAMPLE_INTERVAL,
        samples: int = SAMPLES,
        refusals_kept: int = REFUSALS_KEPT,
    ) -> None:
        self.now = now
        self.interval = interval
        self.samples = samples
        self.sites: dict[str, SiteFigures] = {}
        self.handshakes: dict[str, int] = {}
        self.enrollments: dict[str, int] = {}
        self.sessions = 0
        self.forward_connections = 0
        self.doors: dict[str, DoorFigures] = {}
        self.refusals: deque[Refusal] = deque(maxlen=refusals_kept)
        self.refusal_counts: dict[str, int] = {}
        #: throughput samples taken
        self.tick = 0

    def site(self, name: str) -> SiteFigures:
        """The figures of site C{name}, made on first use."""
        figures = self.sites.get(name)
        if figures is None:
            figures = self.sites[name] = SiteFigures(name, self)
        return figures

    def door(self, door: str) -> DoorFigures:
        """The figures of front door C{door}, made on first use."""
        figures = self.doors.get(door)
        if figures is None:
            figures = self.doors[door] = DoorFigures(door, self)
        return figures

    def seed_last_seen(self, last_seen: Iterable[tuple[str, float]]) -> None:
        """When each site was last seen before this process started (the state database's record)."""
        for name, when in last_seen:
            figures = self.site(name)
            if figures.last_seen is None:
                figures.last_seen = when

    # -- events ----------------------------------------------------------------

    def handshake(self, result: str, count: int = 1) -> None:
        bump(self.handshakes, result, count)

    def enrollment(self, result: str) -> None:
        bump(self.enrollments, result)

    def refuse(self, site: str, kind: str, reason: str, keep: bool = True, count: int = 1) -> None:
        """
        Count a refusal of C{kind}; with C{keep}, remember it among the last
        refusals and as the site's last one. Refusals whose log line was
        left out (rate-limited: anyone can cause them) pass C{keep=False},
        so a flood cannot push every other refusal out of the list.
        """
        bump(self.refusal_counts, kind, count)
        if not keep:
            return
        refusal = Refusal(self.now(), site, kind, reason)
        self.refusals.append(refusal)
        if site:
            self.site(site).last_refusal = refusal

    def session_opened(self, name: str, session: Counted) -> SiteFigures:
        """C{session} became the live session of site C{name}."""
        figures = self.site(name)
        if figures._ring_start < 0:
            figures._ring_start = self.tick
            figures._prev_sent, figures._prev_received = figures.live.totals()
        figures.attach(session)
        figures.sessions += 1
        self.sessions += 1
        return figures

    def session_closed(self, name: str, session: Counted) -> None:
        """A session of site C{name} is gone."""
        figures = self.sites.get(name)
        if figures is None:
            return
        figures.detach(session)
        if figures.live.current is None:
            figures.last_seen = self.now()

    # -- throughput ------------------------------------------------------------

    def sample(self) -> None:
        """
        Take one throughput sample of every site that has a session or a
        ring (every L{SAMPLE_INTERVAL} seconds, on the reactor).
        """
        self.tick = tick = self.tick + 1
        interval, samples = self.interval, self.samples
        for figures in list(self.sites.values()):
            if figures._ring is not None or figures.live is not _NO_SESSION:
                figures._sample(tick, interval, samples)

    def throughput(self, name: str) -> Throughput:
        """The recent throughput of site C{name} (no samples if it never had a session)."""
        figures = self.sites.get(name)
        if figures is None:
            return Throughput(self.interval, (), ())
        return figures.throughput(self.tick, self.interval, self.samples)


class ClientFigures(_Sessions):
    """
    The site role's figures (L{TunnelClientService.figures
    <rtunnel.roles.site.TunnelClientService>}): its tunnel sessions, from
    the site's side (C{sent}: to the server).

    @ivar up: a tunnel session is open now.
    @ivar reconnects: reconnect attempts by the reason the last attempt
        ended: C{connect} (TCP connect failed), C{network} (the connection
        or session was lost), C{tls}, C{verification} (the server failed
        verification), C{handshake-timeout}, C{goaway} (the server ended
        the session).
    @ivar opens: streams the server opened, by the site's answer
        (L{result_label}).
    @ivar ended: why the last attempt ended, for the next reconnect.
    """

    __slots__ = ("up", "reconnects", "opens", "ended")

    def __init__(self) -> None:
        super().__init__()
        self.up = False
        self.reconnects: dict[str, int] = {}
        self.opens: dict[str, int] = {}
        self.ended = "connect"

    def local_open(self, code: int, reason: str) -> None:
        """A site opens no streams; nothing to count."""

    def remote_open(self, code: int, reason: str) -> None:
        """We answered the server's OPEN: C{code} 0 (OPEN_OK) or why not."""
        label = result_label(code)
        self.opens[label] = self.opens.get(label, 0) + 1

    def opened(self) -> None:
        """The attached session is open (the server's HELLO came, and no refusal with it)."""
        self.up = True
        self.sessions += 1

    def reconnect(self) -> None:
        """A reconnect is scheduled after an attempt that ended for L{ended}."""
        bump(self.reconnects, self.ended)
        self.ended = "connect"
