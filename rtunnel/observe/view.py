"""
What the admin endpoint shows, as plain values: the seam between the
roles, which keep the figures, and the pages that present them (the JSON
API, the status page, C{rtunnel sites list}).

A view is read on the reactor thread and returns frozen snapshots, so a
page never holds a live object of the roles and never sees one change
half-way through a response; what it makes of them (JSON) is a pure
function of the snapshots, and may run in another thread. Nothing here
knows Twisted.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, overload

from attrs import frozen

__all__ = ["FleetView", "ForwardSnapshot", "Rates", "Refusal", "SiteSnapshot", "Throughput"]


@frozen
class Refusal:
    """
    One thing the server refused, kept in a short ring for the status page
    and C{last_refusal}.

    @ivar time: when, in seconds since the epoch.
    @ivar site: the site it concerned (C{""} when none is known, e.g. a
        TLS handshake that never named one).
    @ivar kind: what was refused: C{"handshake"}, C{"enrollment"},
        C{"stream"} or C{"frontdoor"}.
    @ivar reason: the reason as the log line gives it.
    """

    time: float
    site: str
    kind: str
    reason: str


class Rates(Sequence[float]):
    """
    Rates in bytes per second, oldest first: a read-only sequence over
    every C{stride}-th value of a float array from C{offset} on (a ring's
    window of to/from pairs), which only its L{Throughput} holds.

    Why not a tuple: a site's history is 120 rates, and a tuple of them is
    120 Python floats, made on the reactor when a snapshot is taken and
    freed in one go when the last reference goes. At ten thousand sites
    that was 20 ms to make and 17 ms to free, every tunnel waiting; one
    array a site costs neither. Compares equal to any sequence of the same
    values.
    """

    __slots__ = ("_values", "_offset", "_stride")

    def __init__(self, values: array[float], offset: int = 0, stride: int = 1) -> None:
        self._values = values
        self._offset = offset
        self._stride = stride

    def _items(self) -> array[float]:
        return self._values[self._offset :: self._stride]

    def __len__(self) -> int:
        return max(0, (len(self._values) - self._offset + self._stride - 1) // self._stride)

    @overload
    def __getitem__(self, index: int) -> float: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[float, ...]: ...

    def __getitem__(self, index: int | slice) -> float | tuple[float, ...]:
        if isinstance(index, slice):
            return tuple(self._items()[index])
        return float(self._items()[index])

    def __iter__(self) -> Iterator[float]:
        return iter(self._items())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Rates({list(self)!r})"


@frozen
class Throughput:
    """
    A site's recent throughput: one rate per C{interval} seconds, oldest
    first, in bytes per second each way (from the server's side: C{to_site}
    is what the server sent into the tunnel).
    """

    interval: float
    to_site: Sequence[float]
    from_site: Sequence[float]


@frozen
class SiteSnapshot:
    """
    One site as the server sees it now.

    @ivar since: when its current session opened (connected) or when it
        was last seen (not connected), in seconds since the epoch; C{None}
        when never.
    @ivar peer: the address its session comes from (C{""} when down).
    @ivar services: its named services as last announced, C{NAME -> HOST:PORT}.
    @ivar streams: streams open now.
    @ivar bytes_to_site: payload bytes sent into its tunnel since the server
        started (all sessions).
    @ivar bytes_from_site: payload bytes received from its tunnel since the
        server started (all sessions).
    @ivar rtt: the last keepalive round trip in seconds, C{None} if none yet.
    @ivar last_refusal: the newest refusal that concerned it, if any.
    @ivar replica: the id of the server replica that sees the site so
        (its session, bytes and streams are this replica's only).
    """

    name: str
    connected: bool
    enrolled: bool
    revoked: bool
    since: float | None
    peer: str
    services: Mapping[str, str]
    streams: int
    bytes_to_site: int
    bytes_from_site: int
    rtt: float | None
    last_refusal: Refusal | None
    replica: str = ""


@frozen
class ForwardSnapshot:
    """
    One forward: C{spec} as C{[BIND:]PORT:SITE:HOST:HOSTPORT}, where it came
    from (C{"command line"} or C{"database"}), its live state
    (C{"listening"} or C{"failed: <reason>"}), its client connections open
    now and accepted since the server started.
    """

    spec: str
    source: str
    state: str
    connections: int
    connections_total: int


class FleetView(Protocol):
    """What the server's admin pages read; L{rtunnel.observe} implements it for the tunnel server."""

    def names(self) -> Sequence[str]:
        """
        The name of every known site (enrolled, revoked, or connected),
        sorted: what L{sites} would list, for a reader that takes the
        snapshots a few at a time (L{site} each).
        """

    def sites(self) -> Sequence[SiteSnapshot]:
        """Every known site (enrolled, revoked, or connected), sorted by name."""

    def site(self, name: str) -> SiteSnapshot | None:
        """One site, or C{None} if the server knows no site of that name."""

    def throughput(self, name: str) -> Throughput | None:
        """The recent throughput of one site, or C{None} if unknown."""

    def forwards(self) -> Sequence[ForwardSnapshot]:
        """Every forward, command line and database, sorted by bind address and port."""

    def refusals(self) -> Sequence[Refusal]:
        """The last refusals, newest first (a bounded number)."""

    def not_ready(self) -> str | None:
        """C{None} when the server can do its job, else a one-line reason (for C{/readyz})."""

    @property
    def replica_id(self) -> str:
        """The id of the server replica seen (C{--replica-id}), for the API and the status page."""
