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

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..address import HostPort
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
        #: each site's last announcement and its text (L{_services_text})
        self._services: dict[str, tuple[Mapping[str, HostPort], Mapping[str, str]]] = {}
        #: the names last listed, and in order (L{names})
        self._known: set[str] = set()
        self._sorted: tuple[str, ...] = ()

    @property
    def replica_id(self) -> str:
        return self.service.replica_id

    # -- sites -----------------------------------------------------------------

    def names(self) -> Sequence[str]:
        """
        Sorted once per change of the set of names: sorting ten thousand
        names took 3 ms of the reactor, comparing the sets a tenth of that.
        """
        service = self.service
        known = set(service.admission)
        known.update(service.registry.connected_sites())
        if known != self._known:
            self._known = known
            self._sorted = tuple(sorted(known))
            services = self._services
            # Sites removed from the database since: their texts go too.
            for gone in [name for name in services if name not in known]:
                del services[gone]
        return self._sorted

    def sites(self) -> Sequence[SiteSnapshot]:
        snapshot, admission, connection = self._snapshot, self.service.admission.get, self.service.registry.connection
        return [snapshot(name, admission(name), connection(name)) for name in self.names()]

    def site(self, name: str) -> SiteSnapshot | None:
        admission = self.service.admission.get(name)
        connection = self.service.registry.connection(name)
        if admission is None and connection is None:
            return None
        return self._snapshot(name, admission, connection)

    def _snapshot(
        self, name: str, admission: SiteAdmission | None, connection: tuple[str, float] | None
    ) -> SiteSnapshot:
        figures = self.service.figures.sites.get(name)
        if figures is not None:
            live = figures.live
            sent, received = live.totals()
            streams = live.streams()
            current = live.current
            rtt = current.last_rtt if connection is not None and current is not None else None
            last_seen, last_refusal = figures.last_seen, figures.last_refusal
        else:
            sent = received = streams = 0
            rtt = last_seen = last_refusal = None
        since: float | None
        if connection is not None:
            peer, since = connection
        else:
            peer, since = "", last_seen
        return SiteSnapshot(
            name=name,
            connected=connection is not None,
            enrolled=admission is not None and admission.enrolled,
            revoked=admission is not None and admission.revoked_at is not None,
            since=since,
            peer=peer,
            services=self._services_text(name, self.service.registry.last_announced(name)),
            streams=streams,
            bytes_to_site=sent,
            bytes_from_site=received,
            rtt=rtt,
            last_refusal=last_refusal,
            replica=self.service.replica_id,
        )

    def _services_text(self, name: str, announced: Mapping[str, HostPort]) -> Mapping[str, str]:
        """
        The services C{name} last announced as C{HOST:PORT} texts, made once
        per announcement: the registry replaces its mapping whole when a site
        announces, so the same object means the same services, and writing
        every address anew was half of what a snapshot of the fleet cost.
        The text mapping is read-only, shared by every snapshot until then.
        """
        cached = self._services.get(name)
        if cached is not None and cached[0] is announced:
            return cached[1]
        text: Mapping[str, str] = MappingProxyType({key: str(target) for key, target in announced.items()})
        self._services[name] = (announced, text)
        return text

    def throughput(self, name: str) -> Throughput | None:
        service = self.service
        if service.admission.get(name) is None and service.registry.connection(name) is None:
            return None
        return service.figures.throughput(name)

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
