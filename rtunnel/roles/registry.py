"""
Which site has which live tunnel session, on the server.

There is never more than one live session per site: a site that reconnects
while its old connection still looks alive (a half-dead path the keepalive has
not caught yet) takes over at once, and the old session is ended with
SESSION_REPLACED (a site that keeps one session per server replica: only
if it keeps the new one, see L{SiteRegistry.register}). Callers that want a
stream to a site that is briefly away wait up to an open timeout for it to
come back, so a reconnect is invisible to them; the number of such waiters
per site is bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from attrs import define
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from rtunnel.logs import Logger

from ..adapter.protocol import MuxProtocol
from ..adapter.stream import MuxStream
from ..address import HostPort
from ..mux.errors import ErrorCode, SessionClosing, StreamLimitReached
from ..observe.stats import ServerFigures

#: A session replaced younger than this (seconds) suggests duplicate sites.
DUPLICATE_WINDOW = 60.0

#: How long a second session of a site that keeps one session per server
#: replica waits before it replaces the live one (seconds; see
#: L{SiteRegistry.register}).
REPLICA_TAKEOVER_GRACE = 3.0


def format_services(services: Mapping[str, HostPort]) -> str:
    """C{name=host:port,...} in name order (log lines, C{rtunnel sites list})."""
    return ",".join(f"{name}={target}" for name, target in sorted(services.items()))


class SiteUnavailable(Exception):
    """
    No stream could be opened to the site: not connected within the open
    timeout, too many opens waiting, or its stream limit is reached.
    """

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(site, reason)
        self.site = site
        self.reason = reason

    def __str__(self) -> str:
        return f"site {self.site!r} unavailable: {self.reason}"


@define
class _Waiter:
    deferred: defer.Deferred[MuxProtocol]
    timer: IDelayedCall | None = None


@define
class _SiteEntry:
    session: MuxProtocol | None = None
    peer: str = ""
    fingerprint: str = ""
    since: float = 0.0
    #: opens waiting for the site (a list only while there are any: one entry per connected site)
    waiters: list[_Waiter] | None = None


_NO_SERVICES: Mapping[str, HostPort] = MappingProxyType({})


class SiteRegistry:
    """
    @param clock: for open timeouts.
    @param on_connected: C{(site, peer)} when a site session becomes live
        (for the state store's "connected" column).
    @param on_disconnected: C{(site)} when the live session of a site ends.
    @param max_pending_opens: most opens that may wait for one site at once.
    @param max_streams_per_site: most streams open to one site at once, our
        own cap whatever the site announces.
    @param on_services: C{(site, services)} when the live session of a site
        announced named services different from those it last announced (C{--service} at the site; C{{}} for a
        site whose session does not offer the capability), for the state
        store's record of what each site last announced.
    @param figures: where sessions, bytes and stream opens are counted
        (L{ServerFigures}); by default figures of its own, on C{clock}'s time.

    B{Named services} (issue 11 section 2). A site declares
    C{--service NAME=HOST:PORT}; its session announces them right after the
    HELLOs (docs/protocol.md, SERVICES). The server's connection code calls
    L{announce} with what arrived; readers use:

     - L{services}C{(site)}: the services of the site's I{live} session, or
       C{None} when the site is not connected (for C{service=} endpoints);
     - L{directory}C{(known_sites)}: a L{rtunnel.frontdoor.names.SiteDirectory}
       (C{{site: {service: HostPort}}}) for every known site, with the
       services each last announced, connected or not (for the front door:
       a known site that is away is waited for, so its names must still
       route). Its values are read-only and replaced, never mutated, so a
       caller may keep one for the length of a request;
     - L{when_services}C{(site, timeout)}: the live services once the site
       is connected and its announcement has arrived.

    What a site last announced is kept after it disconnects (one small
    mapping per site that ever connected, or seeded from the store by
    L{seed_services} at start), so a reconnect does not make its names
    briefly unroutable; a session of the site that does not offer the
    capability replaces it with C{{}}.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        *,
        on_connected: Callable[[str, str], None] | None = None,
        on_disconnected: Callable[[str], None] | None = None,
        max_pending_opens: int = 256,
        max_streams_per_site: int = 1024,
        on_services: Callable[[str, Mapping[str, HostPort]], None] | None = None,
        figures: ServerFigures | None = None,
    ) -> None:
        self.clock = clock
        self.figures = figures if figures is not None else ServerFigures(clock.seconds)
        self.max_streams_per_site = max_streams_per_site
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self.max_pending_opens = max_pending_opens
        self._sites: dict[str, _SiteEntry] = {}
        self.on_services = on_services
        #: second sessions of replica-aware sites waiting to take over (see
        #: register): site -> {session: (its timer, peer, fingerprint)}
        self._contenders: dict[str, dict[MuxProtocol, tuple[IDelayedCall, str, str]]] = {}
        #: what each site last announced (read-only mappings, replaced whole)
        self._announced: dict[str, Mapping[str, HostPort]] = {}
        #: the sessions whose announcement arrived (a session that never
        #: announces keeps its site's previous services out of services())
        self._live_services: dict[str, Mapping[str, HostPort]] = {}

    # -- sessions ---------------------------------------------------------

    def register(self, site: str, session: MuxProtocol, peer: str, fingerprint: str = "") -> None:
        """
        Make C{session} the live session of C{site}, replacing (and ending)
        any older one, and hand it to whoever waits for the site.

        Except when both sessions negotiated REPLICAS and the old one is
        live: such a site keeps one session per replica and dials a
        balancer until it has them all, so a second session here is most
        often one the site is about to close itself as a duplicate (told
        which replica this is, GOAWAY NO_ERROR), and replacing the first
        would cut its streams for nothing. The new session then replaces
        the old one only if it is still open L{REPLICA_TAKEOVER_GRACE}
        seconds later (the site kept it: its old session was dead at its
        end, and half-dead here), or at once if the old one ends first.
        """
        entry = self._sites.get(site)
        old = entry.session if entry is not None else None
        if (
            old is not None
            and old is not session
            and old.accepting_streams
            and old.replicas_negotiated
            and session.replicas_negotiated
        ):
            self._contend(site, session, peer, fingerprint, old)
            return
        self._register(site, session, peer, fingerprint)

    def _contend(self, site: str, session: MuxProtocol, peer: str, fingerprint: str, old: MuxProtocol) -> None:
        self._log.info(
            "site {site}: second session from {peer} while the one from {oldPeer} is live; it replaces that one "
            "only if the site keeps it for {grace:g}s (a site closes an extra session with a replica itself)",
            site=site,
            peer=peer,
            oldPeer=old.peer_label,
            grace=REPLICA_TAKEOVER_GRACE,
        )
        call = self.clock.callLater(REPLICA_TAKEOVER_GRACE, self._promote, site, session)
        self._contenders.setdefault(site, {})[session] = (call, peer, fingerprint)
        session.on_closed(self._contender_closed, site, session)

    def _withdraw(self, site: str, session: MuxProtocol) -> tuple[str, str] | None:
        """Take C{session} out of the contenders of C{site}: its (peer, fingerprint) if it was one."""
        contenders = self._contenders.get(site)
        waiting = contenders.pop(session, None) if contenders is not None else None
        if contenders is not None and not contenders:
            del self._contenders[site]
        if waiting is None:
            return None
        call, peer, fingerprint = waiting
        if call.active():
            call.cancel()
        return peer, fingerprint

    def _contender_closed(self, reason: BaseException, site: str, session: MuxProtocol) -> None:
        self._withdraw(site, session)

    def _promote(self, site: str, session: MuxProtocol) -> None:
        """The contender C{session} becomes the live session of C{site}: its grace is over, or the old one ended."""
        identity = self._withdraw(site, session)
        if identity is None or not session.accepting_streams:
            return
        self._register(site, session, *identity)
        # Its announcement came while it was not the live session, and was ignored.
        session.when_services().addCallback(lambda services: self.announce(site, session, services))

    def _register(self, site: str, session: MuxProtocol, peer: str, fingerprint: str) -> None:
        entry = self._sites.setdefault(site, _SiteEntry())
        old = entry.session
        entry.session = session
        entry.fingerprint = fingerprint
        if old is not session:
            self._live_services.pop(site, None)  # until this session announces
        if old is not None and old is not session and old.accepting_streams:
            if self.clock.seconds() - entry.since < DUPLICATE_WINDOW:
                # A takeover normally replaces a long-lived, half-dead
                # session; replacing a young one again and again is two
                # live processes evicting each other.
                self._log.warn(
                    "site {site}: session from {peer} replaces one from {oldPeer} only {age:.1f}s old; "
                    "if this repeats, two site processes share one identity or its credentials were copied",
                    site=site,
                    peer=peer,
                    oldPeer=entry.peer,
                    age=self.clock.seconds() - entry.since,
                )
            self._log.info(
                "site {site} reconnected from {peer}: new session replaces the one from {oldPeer}",
                site=site,
                peer=peer,
                oldPeer=old.peer_label,
            )
            old.terminate(ErrorCode.SESSION_REPLACED, "a newer session of this site took over")
        entry.peer = peer
        entry.since = self.clock.seconds()
        if old is not session:
            # Counted from here: the session's bytes, and its opens' outcomes.
            session.figures = self.figures.session_opened(site, session)
        if self.on_connected is not None:
            # A failing observer (the state database locked, say) must not
            # leave the session half registered: never served, never removed.
            try:
                self.on_connected(site, peer)
            except Exception:
                self._log.failure("on_connected failed for site {site}", site=site)
        session.on_closed(self._session_ended, site, session)
        waiters, entry.waiters = entry.waiters, None
        for waiter in waiters or ():
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.callback(session)

    def session_for(self, site: str) -> MuxProtocol | None:
        """The live session of C{site} that accepts new streams, if any."""
        entry = self._sites.get(site)
        if entry is None or entry.session is None or not entry.session.accepting_streams:
            return None
        return entry.session

    def connected_sites(self) -> dict[str, str]:
        """{site: peer} for every site with a live session."""
        return {name: e.peer for name, e in self._sites.items() if e.session is not None}

    def cut(self, site: str, code: int, reason: str) -> bool:
        """End the live session of C{site} (revocation). @return: whether one was live."""
        for contender in list(self._contenders.get(site, {})):
            contender.terminate(code, reason)
        entry = self._sites.get(site)
        if entry is None or entry.session is None:
            return False
        entry.session.terminate(code, reason)
        return True

    def live(self) -> list[tuple[str, str, MuxProtocol]]:
        """(site, certificate fingerprint, session) of every live session."""
        return [(name, e.fingerprint, e.session) for name, e in self._sites.items() if e.session is not None]

    def live_session(self, site: str) -> tuple[str, MuxProtocol] | None:
        """(certificate fingerprint, session) of the live session of C{site}, if any."""
        entry = self._sites.get(site)
        if entry is None or entry.session is None:
            return None
        return entry.fingerprint, entry.session

    def sessions(self) -> list[MuxProtocol]:
        return [e.session for e in self._sites.values() if e.session is not None]

    def connection(self, site: str) -> tuple[str, float] | None:
        """(peer address, when it connected) of the live session of C{site}, if any."""
        entry = self._sites.get(site)
        if entry is None or entry.session is None:
            return None
        return entry.peer, entry.since

    def _session_ended(self, reason: BaseException, site: str, session: MuxProtocol) -> None:
        # Every session's bytes are counted, a replaced one's too.
        self.figures.session_closed(site, session)
        entry = self._sites.get(site)
        if entry is None or entry.session is not session:
            return  # already replaced by a newer session
        entry.session = None
        entry.peer = ""
        entry.fingerprint = ""
        self._live_services.pop(site, None)
        self._prune(site, entry)
        if self.on_disconnected is not None:
            try:
                self.on_disconnected(site)
            except Exception:
                self._log.failure("on_disconnected failed for site {site}", site=site)
        contenders = self._contenders.get(site)
        if contenders:
            # The old session ended first: the newest waiting one takes its place now.
            newest = list(contenders)[-1]
            self._log.info(
                "site {site}: the session from {peer} is the live one now (the one before it ended)",
                site=site,
                peer=contenders[newest][1],
            )
            self._promote(site, newest)

    # -- named services ---------------------------------------------------

    def announce(self, site: str, session: MuxProtocol, services: Mapping[str, HostPort] | None) -> None:
        """
        Record what C{session} of C{site} announced: C{services}, or C{None}
        when the session does not offer the capability (an older site: its
        services are then simply absent). Ignored unless C{session} is the
        site's live session (an announcement racing a takeover).
        """
        entry = self._sites.get(site)
        if entry is None or entry.session is not session:
            return
        if services is None:
            self._log.info("site {site}: its session does not offer named services (an older rtunnel)", site=site)
        else:
            self._log.info(
                "site {site} announced {count} service(s): {services}",
                site=site,
                count=len(services),
                services=format_services(services) or "none",
            )
        frozen: Mapping[str, HostPort] = MappingProxyType(dict(services or {}))
        self._live_services[site] = frozen
        # Stored only when it changed: a fleet reconnecting after a restart
        # would otherwise cost one database write per site.
        changed = frozen != self._announced.get(site, {})
        self._announced[site] = frozen
        if changed and self.on_services is not None:
            try:
                self.on_services(site, frozen)
            except Exception:
                self._log.failure("on_services failed for site {site}", site=site)

    def seed_services(self, announced: Mapping[str, Mapping[str, HostPort]]) -> None:
        """
        What each site last announced before this process started (the state
        store's record), for L{directory} until the site announces again.
        """
        for site, services in announced.items():
            self._announced.setdefault(site, MappingProxyType(dict(services)))

    def last_announced(self, site: str) -> Mapping[str, HostPort]:
        """
        The services C{site} last announced, connected or not (C{{}} if
        none known): the front door's per-name lookup, without building
        the whole L{directory} for each request.
        """
        return self._announced.get(site, _NO_SERVICES)

    def services(self, site: str) -> Mapping[str, HostPort] | None:
        """
        The services the live session of C{site} announced: C{None} when the
        site is not connected or its announcement has not arrived yet, C{{}}
        when it declares none or does not offer the capability.
        """
        if self.session_for(site) is None:
            return None
        return self._live_services.get(site)

    def directory(self, known_sites: Iterable[str] = ()) -> Mapping[str, Mapping[str, HostPort]]:
        """
        A L{rtunnel.frontdoor.names.SiteDirectory}: every site of
        C{known_sites} (the enrolled ones, say the admission snapshot's) and
        every connected site, each with the services it last announced
        (C{{}} if none known). Built anew on each call.
        """
        empty: Mapping[str, HostPort] = MappingProxyType({})
        sites = {site: self._announced.get(site, empty) for site in known_sites}
        for site, entry in self._sites.items():
            if entry.session is not None:
                sites.setdefault(site, self._announced.get(site, empty))
        return sites

    def when_services(self, site: str, timeout: float) -> defer.Deferred[Mapping[str, HostPort]]:
        """
        The services of C{site}'s live session once it is connected (within
        C{timeout} seconds, as L{wait_for}) and its announcement arrived
        (right after the HELLOs; C{{}} from a session without the
        capability). Fails with L{SiteUnavailable}.
        """

        def connected(session: MuxProtocol) -> defer.Deferred[Mapping[str, HostPort]]:
            def arrived(services: Mapping[str, HostPort] | None) -> Mapping[str, HostPort]:
                live = self.services(site)
                if live is None or self.session_for(site) is not session:
                    raise SiteUnavailable(site, "its session ended before it announced its services")
                return live

            return session.when_services().addCallback(arrived)

        return self.wait_for(site, timeout).addCallback(connected)

    # -- opening streams ----------------------------------------------------

    def wait_for(self, site: str, timeout: float) -> defer.Deferred[MuxProtocol]:
        """
        The live session of C{site}, now or as soon as it connects, within
        C{timeout} seconds; fails with L{SiteUnavailable}.
        """
        return self._wait(site, timeout, opening=False)

    def _wait(self, site: str, timeout: float, opening: bool) -> defer.Deferred[MuxProtocol]:
        """L{wait_for}; an C{opening} wait that fails is counted as a refused stream open."""
        session = self.session_for(site)
        if session is not None:
            return defer.succeed(session)
        if timeout <= 0:
            return defer.fail(self._unavailable(site, "not connected", "not-connected", opening))
        entry = self._sites.setdefault(site, _SiteEntry())
        if entry.waiters is not None and len(entry.waiters) >= self.max_pending_opens:
            reason = f"too many clients already waiting for it ({len(entry.waiters)})"
            return defer.fail(self._unavailable(site, reason, "too-many-waiting", opening))

        def cancel(d: defer.Deferred[MuxProtocol]) -> None:
            self._drop_waiter(entry, waiter)
            self._prune(site, entry)

        waiter = _Waiter(defer.Deferred(cancel))

        def expire() -> None:
            waiter.timer = None
            self._drop_waiter(entry, waiter)
            self._prune(site, entry)
            waiter.deferred.errback(
                self._unavailable(site, f"not connected within {timeout:g}s", "not-connected", opening)
            )

        waiter.timer = self.clock.callLater(timeout, expire)
        if entry.waiters is None:
            entry.waiters = []
        entry.waiters.append(waiter)
        return waiter.deferred

    def _prune(self, site: str, entry: _SiteEntry) -> None:
        """Forget a site nobody is connected as or waiting for, so that
        names asked for once do not accumulate."""
        if self._sites.get(site) is entry and entry.session is None and not entry.waiters:
            del self._sites[site]

    @staticmethod
    def _drop_waiter(entry: _SiteEntry, waiter: _Waiter) -> None:
        if entry.waiters and waiter in entry.waiters:
            entry.waiters.remove(waiter)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None

    def open(self, site: str, host: str, port: int, timeout: float) -> defer.Deferred[MuxStream]:
        """
        Open a stream to C{host}:C{port} at C{site}, waiting up to C{timeout}
        seconds for the site to be connected. The stream is returned at once
        after OPEN is sent (bytes written now travel as early data); its
        C{opened} Deferred tells whether the site accepted it.
        """

        def opened(session: MuxProtocol) -> MuxStream:
            if session.session.local_streams >= self.max_streams_per_site:
                raise self._unavailable(
                    site, f"stream limit reached ({self.max_streams_per_site} open)", "stream-limit", True
                )
            try:
                return session.open_stream(host, port)
            except StreamLimitReached as e:
                raise self._unavailable(site, f"stream limit reached ({e})", "stream-limit", True) from None
            except SessionClosing:
                raise self._unavailable(site, "its session is going away", "going-away", True) from None

        return self._wait(site, timeout, opening=True).addCallback(opened)

    def _unavailable(self, site: str, reason: str, label: str, opening: bool) -> SiteUnavailable:
        """The error for an open that cannot be; counted (as C{label}) if it was an open."""
        if opening:
            self.figures.site(site).refused_open(label, reason)
        return SiteUnavailable(site, reason)
