"""
The Prometheus metrics of both roles: prometheus_client collectors that
read the figures the roles keep (L{rtunnel.observe.stats}) at scrape time,
and the registry C{/metrics} serves.

Nothing is counted here and nothing touches the data path: a scrape reads
integers the roles already keep. Names follow Prometheus conventions
(C{rtunnel_} prefix, C{_total} counters, seconds and bytes). Labels are
bounded: C{site} (one value per known site), C{replica} (this server's
id, one value; at a site, the replicas its authenticated server
announces, at most 64) and small fixed sets
(C{result}, C{reason}, C{direction}, C{kind}, C{door}, C{forward},
C{source}); never a stream, a client address or a peer-chosen value.
docs/operations.md ("Metrics") lists every metric.

B{Threads.} C{collect()} may run on the reactor thread or in a thread of
the reactor's pool (prometheus_client's Twisted resource serves from
there), while the reactor changes what it reads. So it takes only C-level
atomic snapshots of reactor-owned data: it reads attributes and ints,
copies dictionaries with C{dict(d)} or L{snapshot_items} and the
admission snapshot with its own C{list()} copy, and never iterates a live
dictionary in Python. Values that must agree with each other are read
from one immutable object (a site's L{Live <rtunnel.observe.stats.Live>}
totals), so a counter never goes backwards between scrapes.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

from .. import __version__
from ..identity.store import SOURCE_COMMAND_LINE, SOURCE_DATABASE
from ..roles.live_forwards import LISTENING, spec_text
from .stats import ClientFigures, Live, snapshot_items

if TYPE_CHECKING:
    from ..roles.server import TunnelServerService
    from ..roles.site import TunnelClientService

__all__ = ["ServerCollector", "SiteCollector", "metrics_registry"]


def _build_info(role: str) -> InfoMetricFamily:
    return InfoMetricFamily(
        "rtunnel_build", "The rtunnel version this process runs, and its role.", {"version": __version__, "role": role}
    )


def _by_label(name: str, documentation: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(snapshot_items(counts)):
        family.add_metric([value], count)
    return family


class ServerCollector(Collector):
    """
    The tunnel server's metrics, read from a L{TunnelServerService
    <rtunnel.roles.server.TunnelServerService>} at each scrape (see the
    module on threads).
    """

    def __init__(self, service: TunnelServerService) -> None:
        self.service = service

    def describe(self) -> list[Metric]:
        # Nothing to check for clashes with other collectors at
        # registration: collecting here would read the service early.
        return []

    def collect(self) -> Iterator[Metric]:
        # Built whole with the garbage collector paused: ten thousand sites
        # are some seventy thousand short-lived samples, which otherwise set
        # off collections (of the whole heap, at times) that doubled the time
        # taken. They hold no cycles; their memory goes back as the scrape's
        # text is written.
        enabled = gc.isenabled()
        gc.disable()
        try:
            families = list(self._collect())
        finally:
            if enabled:
                gc.enable()
        return iter(families)

    def _collect(self) -> Iterator[Metric]:
        service = self.service
        figures = service.figures
        yield _build_info("server")
        yield InfoMetricFamily(
            "rtunnel_replica",
            "This server's id among the replicas sharing its database.",
            {"replica": service.replica_id},
        )
        yield _gauge(
            "rtunnel_replicas",
            "Replicas alive in the shared state database (this one included), as its last heartbeat read them.",
            service.membership.live,
        )
        yield from self._sites()
        yield _counter("rtunnel_sessions", "Site sessions opened (authenticated and registered).", figures.sessions)
        yield _by_label(
            "rtunnel_handshakes",
            "Connections on the tunnel port by outcome: ok (a site session) or why not (each refusal reason).",
            "result",
            figures.handshakes,
        )
        yield _by_label(
            "rtunnel_enrollments",
            "Enrollment exchanges by outcome: ok or the refusal's code.",
            "result",
            figures.enrollments,
        )
        yield _by_label(
            "rtunnel_refusals",
            "Refusals by kind: handshake, enrollment, stream, frontdoor.",
            "kind",
            figures.refusal_counts,
        )
        gate = service.gate
        waiting = gate.waiting if gate is not None else 0
        yield _gauge(
            "rtunnel_preauth_connections",
            "Connections on the tunnel port not authenticated yet (in the waiting room, the TLS handshake, enrolling).",
            service.factory.preauth + waiting,
        )
        yield from self._forwards()
        yield from self._doors()

    def _sites(self) -> Iterator[Metric]:
        service = self.service
        admission = service.admission
        known = set(admission)  # from the snapshot's own copy of its names
        enrolled = revoked = 0
        #: sites that should be connected: enrolled, not revoked
        expected = set()
        for name in known:
            entry = admission.get(name)
            if entry is not None:
                enrolled += entry.enrolled
                revoked += entry.revoked_at is not None
                if entry.enrolled and entry.revoked_at is None:
                    expected.add(name)
        sites = snapshot_items(service.figures.sites)
        up = GaugeMetricFamily(
            "rtunnel_site_up",
            "1 while the site has a live session, 0 while an enrolled, unrevoked site has none "
            "(no series for a site invited or revoked).",
            labels=["site"],
        )
        sessions = CounterMetricFamily("rtunnel_site_sessions", "Sessions the site opened.", labels=["site"])
        streams = GaugeMetricFamily("rtunnel_site_streams", "Streams open to the site now.", labels=["site"])
        opens = CounterMetricFamily(
            "rtunnel_site_stream_opens",
            "Stream opens to the site by result: ok, the site's refusal code, or the server's own refusal "
            "(not-connected, stream-limit, too-many-waiting, going-away).",
            labels=["site", "result"],
        )
        sent = CounterMetricFamily(
            "rtunnel_site_bytes",
            "Stream payload bytes through the site's tunnel, to_site or from_site.",
            labels=["site", "direction"],
            unit="bytes",
        )
        rtt = GaugeMetricFamily(
            "rtunnel_site_rtt_seconds",
            "The last keepalive round trip of the site's live session.",
            labels=["site"],
        )
        figures_of = dict(sites)
        connected = 0
        # Samples are made directly rather than with add_metric: a fleet of
        # ten thousand sites is seventy thousand of them per scrape, and
        # add_metric's checks and label zipping doubled the time.
        add_up, add_sessions, add_streams = up.samples.append, sessions.samples.append, streams.samples.append
        add_opens, add_bytes, add_rtt = opens.samples.append, sent.samples.append, rtt.samples.append
        for name in sorted(figures_of.keys() | known):
            site = figures_of.get(name)
            labels = {"site": name}
            if site is None:
                if name in expected:
                    add_up(Sample("rtunnel_site_up", labels, 0))
                add_sessions(Sample("rtunnel_site_sessions_total", labels, 0))
                add_streams(Sample("rtunnel_site_streams", labels, 0))
                add_bytes(Sample("rtunnel_site_bytes_total", {"site": name, "direction": "to_site"}, 0))
                add_bytes(Sample("rtunnel_site_bytes_total", {"site": name, "direction": "from_site"}, 0))
                continue
            live: Live = site.live
            current = live.current
            to_site, from_site = live.totals()
            if current is not None:
                add_up(Sample("rtunnel_site_up", labels, 1))
            elif name in expected:
                add_up(Sample("rtunnel_site_up", labels, 0))
            add_sessions(Sample("rtunnel_site_sessions_total", labels, site.sessions))
            add_streams(Sample("rtunnel_site_streams", labels, live.streams()))
            add_bytes(Sample("rtunnel_site_bytes_total", {"site": name, "direction": "to_site"}, to_site))
            add_bytes(Sample("rtunnel_site_bytes_total", {"site": name, "direction": "from_site"}, from_site))
            counts = site.opens
            if counts:
                for result, count in sorted(snapshot_items(counts)):
                    add_opens(Sample("rtunnel_site_stream_opens_total", {"site": name, "result": result}, count))
            if current is not None:
                connected += 1
                last_rtt = current.last_rtt
                if last_rtt is not None:
                    add_rtt(Sample("rtunnel_site_rtt_seconds", labels, last_rtt))
        yield _gauge("rtunnel_sites_known", "Sites in the state database (enrolled, revoked, or invited).", len(known))
        yield _gauge("rtunnel_sites_enrolled", "Sites that enrolled (revoked ones included).", enrolled)
        yield _gauge("rtunnel_sites_revoked", "Sites revoked.", revoked)
        yield _gauge("rtunnel_sites_connected", "Sites with a live session.", connected)
        yield from (up, sessions, streams, opens, sent, rtt)

    def _forwards(self) -> Iterator[Metric]:
        service = self.service
        open_now = GaugeMetricFamily(
            "rtunnel_forward_open_connections", "Client connections of the forward open now.", labels=["forward"]
        )
        accepted = CounterMetricFamily(
            "rtunnel_forward_connections", "Client connections the forward accepted.", labels=["forward"]
        )
        refused = CounterMetricFamily(
            "rtunnel_forward_refusals",
            "Client connections of the forward closed because no stream could be opened for them "
            "(the site away, a limit, the site's refusal: rtunnel_site_stream_opens_total says which).",
            labels=["forward"],
        )
        listening = GaugeMetricFamily(
            "rtunnel_forward_listening",
            "1 while the forward listens, 0 when it failed to; source is command line or database.",
            labels=["forward", "source"],
        )
        command_line = dict(service.command_line_forwards)
        ports = dict(service.forward_ports)
        rows = []
        for spec in service.config.forwards:
            factory = command_line.get(spec)
            rows.append((spec_text(spec), SOURCE_COMMAND_LINE, spec in ports, factory))
        for _, entry in snapshot_items(service.live_forwards.entries):
            rows.append((entry.record.spec, SOURCE_DATABASE, entry.state == LISTENING, entry.factory))
        for text, source, is_listening, factory in sorted(rows, key=lambda row: row[0]):
            listening.add_metric([text, source], 1 if is_listening else 0)
            open_now.add_metric([text], factory.connections if factory is not None else 0)
            accepted.add_metric([text], factory.accepted if factory is not None else 0)
            refused.add_metric([text], factory.refused if factory is not None else 0)
        yield open_now
        yield accepted
        yield refused
        yield listening

    def _doors(self) -> Iterator[Metric]:
        service = self.service
        # Imported here: the front doors are a layer above the roles, and
        # only the server's collector needs them.
        from ..frontdoor.protocol import FrontDoorFactory

        open_by_door: dict[str, int] = {}
        for listener in list(service.listeners):
            factory = listener.factory
            if isinstance(factory, FrontDoorFactory):
                open_by_door[factory.kind.value] = open_by_door.get(factory.kind.value, 0) + factory.connections
        open_now = GaugeMetricFamily(
            "rtunnel_frontdoor_open_connections", "Client connections of the front door open now.", labels=["door"]
        )
        accepted = CounterMetricFamily(
            "rtunnel_frontdoor_connections", "Client connections the front door accepted.", labels=["door"]
        )
        refusals = CounterMetricFamily(
            "rtunnel_frontdoor_refusals",
            "Front-door requests refused, by reason (the refusal's kind: unknown-site, bad-credentials, ...).",
            labels=["door", "reason"],
        )
        for door, figures in sorted(snapshot_items(service.figures.doors)):
            open_now.add_metric([door], open_by_door.get(door, 0))
            accepted.add_metric([door], figures.accepted)
            for reason, count in sorted(snapshot_items(figures.refusals)):
                refusals.add_metric([door, reason], count)
        yield open_now
        yield accepted
        yield refusals


class SiteCollector(Collector):
    """
    The site role's metrics, read from a L{TunnelClientService
    <rtunnel.roles.site.TunnelClientService>} at each scrape (see the
    module on threads).
    """

    def __init__(self, service: TunnelClientService) -> None:
        self.service = service

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        figures: ClientFigures = self.service.figures
        yield _build_info("site")
        name = self.service.state.site_name
        if name is not None:
            yield InfoMetricFamily("rtunnel_tunnel", "The site this process runs.", {"site": name})
        live = figures.live
        current = live.current
        yield _gauge("rtunnel_tunnel_up", "1 while the tunnel session to the server is open, else 0.", int(figures.up))
        yield _counter("rtunnel_tunnel_sessions", "Tunnel sessions opened.", figures.sessions)
        yield _by_label(
            "rtunnel_tunnel_reconnect_attempts",
            "Reconnects scheduled, by why the attempt before ended: connect, network, tls, verification, "
            "handshake-timeout, goaway.",
            "reason",
            figures.reconnects,
        )
        yield _gauge("rtunnel_tunnel_streams", "Streams open now.", live.streams())
        yield _by_label(
            "rtunnel_tunnel_stream_opens",
            "Streams the server opened, by this site's answer: ok or the refusal code.",
            "result",
            figures.opens,
        )
        to_server, from_server = live.totals()
        sent = CounterMetricFamily(
            "rtunnel_tunnel_bytes",
            "Stream payload bytes through the tunnel, to_server or from_server.",
            labels=["direction"],
            unit="bytes",
        )
        sent.add_metric(["to_server"], to_server)
        sent.add_metric(["from_server"], from_server)
        yield sent
        rtt = GaugeMetricFamily("rtunnel_tunnel_rtt_seconds", "The last keepalive round trip of the open session.")
        if current is not None and figures.up and current.last_rtt is not None:
            rtt.add_metric([], current.last_rtt)
        yield rtt
        replicas = self.service.replica_figures  # one immutable value (see the module on threads)
        yield _gauge(
            "rtunnel_site_sessions",
            "Tunnel sessions open now: one per server replica this site is connected to (one with a server "
            "without replicas).",
            replicas.sessions,
        )
        up = GaugeMetricFamily(
            "rtunnel_site_replica_up",
            "1 while this site has a session with the server replica, 0 for a replica its server announced that "
            "it has none with yet (no series with a server without replicas).",
            labels=["replica"],
        )
        for replica, held in replicas.replicas:
            up.add_metric([replica], int(held))
        yield up


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def metrics_registry(collector: Collector) -> CollectorRegistry:
    """
    The registry C{/metrics} serves: C{collector} and prometheus_client's
    process, platform and garbage-collector collectors (the library's
    defaults, registered here rather than in its global registry, so that
    embedding rtunnel never adds to an application's own).
    """
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
