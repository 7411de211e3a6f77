"""
For the tests of the admin pages: a L{FleetView} of fixed snapshots, and
HTTP requests through a real twisted.web L{Site} over an in-memory
transport (real request parsing, percent-decoding and HEAD handling, no
socket).
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Site

from rtunnel.observe.view import ForwardSnapshot, Refusal, SiteSnapshot, Throughput

#: 2026-12-05T23:14:05Z, a time whose ISO form is easy to check by eye.
T0 = 1796512445.0


def snapshot(name: str, **changes: object) -> SiteSnapshot:
    """A connected site with plain figures, changed by keyword."""
    values: dict[str, object] = {
        "name": name,
        "connected": True,
        "enrolled": True,
        "revoked": False,
        "since": T0 - 65.0,
        "peer": "192.0.2.7:40123",
        "services": {"web": "127.0.0.1:8080"},
        "streams": 2,
        "bytes_to_site": 1000,
        "bytes_from_site": 250000,
        "rtt": 0.0125,
        "last_refusal": None,
        "replica": "cloud-1:5500",
    }
    values.update(changes)
    return SiteSnapshot(**values)  # type: ignore[arg-type]


@define
class FakeView:
    """A FleetView whose answers the test sets; counts the calls it gets."""

    site_list: list[SiteSnapshot] = field(factory=list)
    rates: dict[str, Throughput] = field(factory=dict)
    forward_list: list[ForwardSnapshot] = field(factory=list)
    refusal_list: list[Refusal] = field(factory=list)
    reason: str | None = None
    calls: list[str] = field(factory=list)
    replica_id: str = "cloud-1:5500"

    def names(self) -> Sequence[str]:
        """The names in the order of C{site_list} (not sorted: the API must not rely on it)."""
        self.calls.append("names")
        return [s.name for s in self.site_list]

    def sites(self) -> Sequence[SiteSnapshot]:
        self.calls.append("sites")
        return list(self.site_list)

    def site(self, name: str) -> SiteSnapshot | None:
        self.calls.append(f"site {name}")
        return next((s for s in self.site_list if s.name == name), None)

    def throughput(self, name: str) -> Throughput | None:
        self.calls.append(f"throughput {name}")
        return self.rates.get(name)

    def forwards(self) -> Sequence[ForwardSnapshot]:
        self.calls.append("forwards")
        return list(self.forward_list)

    def refusals(self) -> Sequence[Refusal]:
        self.calls.append("refusals")
        return list(self.refusal_list)

    def not_ready(self) -> str | None:
        return self.reason


def turn(clock: Clock) -> int:
    """
    One reactor turn on C{clock}: the calls due now that were made before
    it, as a reactor's iteration runs them (C{Clock.advance(0)} also runs
    those they make, however many turns a real reactor would take).
    @return: how many ran.
    """
    due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
    for call in due:
        if call.active():
            clock.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)
    return len(due)


@define
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    #: reactor turns (C{callLater(0)}) it took beyond the first
    turns: int = 0


def request(root: Resource, method: str, target: str, clock: Clock | None = None) -> Response:
    """
    One HTTP/1.1 request through a real L{Site} over a L{StringTransport};
    the response parsed from the bytes the server wrote.
    """
    clock = clock if clock is not None else Clock()
    site = Site(root, reactor=clock)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5501))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    # The turns a large answer is taken and written in (rtunnel.observe.api):
    # done once the response is (Connection: close).
    turns = 0
    while not transport.disconnecting and turn(clock) and turns < 10_000:
        turns += 1
    raw = transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    channel.connectionLost(None)
    return Response(status, headers, body, turns)
