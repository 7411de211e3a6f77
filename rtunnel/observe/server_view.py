"""
L{ServerView}: the tunnel server as the admin pages see it, a
L{FleetView} over a running L{TunnelServerService
<rtunnel.roles.server.TunnelServerService>}.

It reads memory only, on the reactor thread: the admission snapshot (which
sites are known, enrolled, revoked), the registry (who is connected, from
where, since when, with which services last announced), the figures the
roles keep (L{rtunnel.observe.stats}) and the forwards' factories. Never
the state database: a page must not wait for a file that a CLI may hold
locked, and the reactor must not either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..identity.store import SOURCE_COMMAND_LINE, SOURCE_DATABASE, SiteAdmission
from ..roles.live_forwards import LISTENING, spec_text
from .view import FleetView, ForwardSnapshot, Refusal, SiteSnapshot, Throughput

if TYPE_CHECKING:
    from ..roles.server import TunnelServerService

__all__ = ["ServerView"]


class ServerView(FleetView):
    """
    The L{FleetView} of one tunnel server service.

    A site is known when the admission snapshot has it (enrolled, revoked,
    or with a token outstanding) or it is connected now.
    """

    def __init__(self, service: TunnelServerService) -> None:
        self.service = service

    # -- sites -----------------------------------------------------------------

    def _names(self) -> set[str]:
        service = self.service
        return set(service.admission) | set(service.registry.connected_sites())

    def sites(self) -> Sequence[SiteSnapshot]:
        return [self._snapshot(name, self.service.admission.get(name)) for name in sorted(self._names())]

    def site(self, name: str) -> SiteSnapshot | None:
        admission = self.service.admission.get(name)
        if admission is None and self.service.registry.connection(name) is None:
            return None
        return self._snapshot(name, admission)

    def _snapshot(self, name: str, admission: SiteAdmission | None) -> SiteSnapshot:
        service = self.service
        registry = service.registry
        figures = service.figures.sites.get(name)
        connection = registry.connection(name)
        live = figures.live if figures is not None else None
        if live is not None:
            sent, received = live.totals()
            streams = live.streams()
        else:
            sent = received = streams = 0
        rtt = None
        if connection is not None and live is not None and live.current is not None:
            rtt = live.current.last_rtt
        since: float | None
        if connection is not None:
            peer, since = connection
        else:
            peer, since = "", (figures.last_seen if figures is not None else None)
        return SiteSnapshot(
            name=name,
            connected=connection is not None,
            enrolled=admission is not None and admission.enrolled,
            revoked=admission is not None and admission.revoked_at is not None,
            since=since,
            peer=peer,
            services={service_name: str(target) for service_name, target in registry.last_announced(name).items()},
            streams=streams,
            bytes_to_site=sent,
            bytes_from_site=received,
            rtt=rtt,
            last_refusal=figures.last_refusal if figures is not None else None,
        )

    def throughput(self, name: str) -> Throughput | None:
        if name not in self._names():
            return None
        return self.service.figures.throughput(name)

    # -- forwards --------------------------------------------------------------

    def forwards(self) -> Sequence[ForwardSnapshot]:
        service = self.service
        rows: list[tuple[tuple[str, int], ForwardSnapshot]] = []
        for spec in service.config.forwards:
            factory = service.command_line_forwards.get(spec)
            state = LISTENING if spec in service.forward_ports else "failed: not listening (yet)"
            rows.append(
                (
                    (spec.bind, spec.port),
                    ForwardSnapshot(
                        spec=spec_text(spec),
                        source=SOURCE_COMMAND_LINE,
                        state=state,
                        connections=factory.connections if factory is not None else 0,
                        connections_total=factory.accepted if factory is not None else 0,
                    ),
                )
            )
        for key, entry in service.live_forwards.entries.items():
            factory = entry.factory
            rows.append(
                (
                    key,
                    ForwardSnapshot(
                        spec=entry.record.spec,
                        source=SOURCE_DATABASE,
                        state=entry.state,
                        connections=factory.connections if factory is not None else 0,
                        connections_total=factory.accepted if factory is not None else 0,
                    ),
                )
            )
        rows.sort(key=lambda row: row[0])
        return [snapshot for _, snapshot in rows]

    # -- refusals and readiness ----------------------------------------------

    def refusals(self) -> Sequence[Refusal]:
        return list(reversed(self.service.figures.refusals))

    def not_ready(self) -> str | None:
        service = self.service
        if service.factory.stopping:
            return "the tunnel server is stopping"
        if service.tunnel_port is None:
            return "the tunnel port is not listening yet"
        database = service.database
        if database.failing:
            return f"the state database is failing ({database.failures} operations failed since it last worked)"
        return None
