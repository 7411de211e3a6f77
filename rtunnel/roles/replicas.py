"""
The tunnel server as one replica among several that share one state
database (issue 13): its id, its heartbeat, and the set of live replicas
it tells its sites about.

Each replica records itself in the database (C{replicas} table) and
refreshes its heartbeat every L{HEARTBEAT_INTERVAL} seconds; any replica
drops the others whose heartbeat is older than L{REPLICA_TIMEOUT}. The
set read back is what a site's session is told in a REPLICAS frame
(docs/protocol.md) when it registers and whenever the set changes, so
that a site behind one load-balanced address knows which replicas it
still lacks a session with.

Every database call is a job of the server's L{StateThread
<rtunnel.roles.server.StateThread>}, in order with its other writes, and
never runs on the reactor: a locked SQLite file or a slow PostgreSQL
delays the heartbeat, nothing else. A database that does not answer
leaves the last set in place (the thread logs once when it starts failing
and once when it works again); the other replicas then drop this one
after the timeout, and its next heartbeat that works puts it back.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import ParamSpec, Protocol, TypeVar

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from ..adapter.net import split_description
from ..identity.store import HEARTBEAT_INTERVAL, REPLICA_TIMEOUT, ReplicaRecord
from ..logs import Logger
from ..mux.frames import MAX_REPLICAS, ReplicaEntry, Replicas

_P = ParamSpec("_P")
_T = TypeVar("_T")

__all__ = ["PUSH_STEP", "ReplicaMembership", "default_replica_id", "listen_port"]

#: Sessions told a changed set in one reactor turn (about 3 to 10 µs each).
PUSH_STEP = 500

#: The most characters of a replica id (docs/protocol.md, REPLICAS).
_MAX_ID = 64
_NOT_IN_ID = re.compile(r"[^A-Za-z0-9._:@/+\[\]-]")


def listen_port(description: str) -> int | None:
    """
    The TCP port a server endpoint description listens on (C{tcp:5500},
    C{tcp:port=5500:interface=::1}, C{tcp6:...}, C{ssl:...}, a bare port),
    or C{None} when it names none (port 0, a unix socket, another type).
    """
    text = description.strip()
    if text.isdecimal():
        return int(text) or None
    parts = split_description(text)
    if parts[0].lower() not in {"tcp", "tcp6", "ssl"}:
        return None
    named = [p.split("=", 1)[1] for p in parts[1:] if p.startswith("port=")]
    positional = [p for p in parts[1:] if "=" not in p]
    value = named[0] if named else positional[0] if positional else ""
    return int(value) if value.isdecimal() and 0 < int(value) <= 65535 else None


def default_replica_id(port: int | str, hostname: str | None = None) -> str:
    """
    The id of a replica not given C{--replica-id}: C{HOSTNAME:PORT} of its
    tunnel port, so that two servers on one host differ by port and a
    restarted server is the same replica again.

    Made to fit the id grammar (docs/protocol.md): characters it does not
    allow become C{-}, and the host name is shortened so that the whole
    stays within 64 characters.
    """
    host = socket.gethostname() if hostname is None else hostname
    suffix = _NOT_IN_ID.sub("-", f":{port}")[:_MAX_ID]
    host = _NOT_IN_ID.sub("-", host or "localhost")[: _MAX_ID - len(suffix)]
    return host + suffix


class ReplicaStore(Protocol):
    """What L{ReplicaMembership} uses of L{rtunnel.identity.store.StateStore}."""

    def replica_started(self, replica_id: str, advertise: str, pid: int, host: str, now: datetime) -> None: ...

    def replica_heartbeat(self, replica_id: str, advertise: str, now: datetime) -> None: ...

    def replica_stopped(self, replica_id: str) -> None: ...

    def expire_replicas(self, now: datetime, timeout: float = ...) -> list[str]: ...

    def live_replicas(self, now: datetime, timeout: float = ...) -> list[ReplicaRecord]: ...


class Database(Protocol):
    """
    What L{ReplicaMembership} uses of the server's L{StateThread
    <rtunnel.roles.server.StateThread>} (said by shape: that module
    imports this one).
    """

    def run_first(self, f: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> defer.Deferred[_T]: ...

    def write(
        self, what: str, f: Callable[_P, object], *args: _P.args, **kwargs: _P.kwargs
    ) -> defer.Deferred[None]: ...

    def worked(self) -> None: ...

    def failed(self, what: str, failure: Failure) -> None: ...


class ReplicaPeer(Protocol):
    """What L{ReplicaMembership} uses of a site's session (L{MuxProtocol <rtunnel.adapter.protocol.MuxProtocol>})."""

    @property
    def replicas_negotiated(self) -> bool: ...

    def send_replicas(self, replicas: Replicas) -> None: ...


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ReplicaMembership:
    """
    One replica's part in the set: its heartbeat, and what its sites are
    told (see the module).

    @param store: the state store, used only in C{database}'s thread.
    @param database: the server's L{StateThread <rtunnel.roles.server.StateThread>}.
    @param clock: times the heartbeat (the reactor).
    @param replica_id: this replica's id (checked by the caller).
    @param advertise: C{HOST:PORT} at which sites reach this replica
        directly, C{""} when only through the shared address.
    @param sessions: the live site sessions, for a push when the set changes.
    @param now: the wall clock the database's times are in (tests pass theirs).
    """

    _log = Logger()

    def __init__(
        self,
        store: ReplicaStore,
        database: Database,
        clock: IReactorTime,
        replica_id: str,
        advertise: str,
        sessions: Callable[[], Iterable[ReplicaPeer]],
        *,
        interval: float = HEARTBEAT_INTERVAL,
        timeout: float = REPLICA_TIMEOUT,
        now: Callable[[], datetime] = _utcnow,
        pid: int | None = None,
        host: str | None = None,
    ) -> None:
        self.store = store
        self.database = database
        self.clock = clock
        self.replica_id = replica_id
        self.advertise = advertise
        self.sessions = sessions
        self.interval = interval
        self.timeout = timeout
        self._now = now
        self.pid = os.getpid() if pid is None else pid
        self.host = socket.gethostname() if host is None else host
        #: what sites are told: this replica alone until the first read
        self.current = Replicas(own=replica_id, replicas=(ReplicaEntry(replica_id, advertise),))
        #: replicas in the last set read (this one included), for the metrics
        self.live = 1
        #: the start record is written (only the database thread reads or sets it)
        self._recorded = False
        self._loop: task.LoopingCall | None = None
        self._stopped = False
        #: replica rows ignored (ids no replica could have), warned about once
        self._ignored: set[str] = set()
        #: the next turn of a push in progress (L{_push})
        self._pushing: IDelayedCall | None = None
        #: the other replicas' start times in the last set read (None: none read yet)
        self._starts: dict[str, datetime] | None = None

    def rename(self, replica_id: str) -> None:
        """Take another id; only before L{start} (a default id completed once the tunnel port is bound)."""
        if self._loop is not None:
            raise RuntimeError(f"replica {self.replica_id} cannot be renamed once started")
        self.replica_id = replica_id
        self.current = Replicas(own=replica_id, replicas=(ReplicaEntry(replica_id, self.advertise),))

    def start(self) -> None:
        """Record this replica and beat every C{interval} seconds, the first beat now."""
        self._stopped = False
        self._loop = task.LoopingCall(self.beat)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def beat(self) -> defer.Deferred[None]:
        """
        One heartbeat, expiry and read of the set, in the database thread;
        the set is applied on the reactor. Never fails (a LoopingCall stops
        for good on a failure), and a LoopingCall waits for it, so beats do
        not pile up behind a slow database.
        """
        # Ahead of the session writes queued: see StateThread.run_first.
        d = self.database.run_first(self._read)
        return d.addCallbacks(self._apply, self._failed)

    def _read(self) -> tuple[list[str], list[ReplicaRecord]]:
        """
        In the database thread: the heartbeat (the start record until it
        is written), the expiry, and the set: the replicas this one dropped
        and those alive. The time is taken here, when the job runs: queued
        behind a burst of session writes (sites reconnecting), a time taken
        at submission would make the heartbeat look that much older.
        """
        now = self._now()
        store = self.store
        if not self._recorded:
            # Also clears what an earlier run under this id left.
            store.replica_started(self.replica_id, self.advertise, self.pid, self.host, now)
            self._recorded = True
        else:
            store.replica_heartbeat(self.replica_id, self.advertise, now)
        expired = store.expire_replicas(now, self.timeout)
        return expired, store.live_replicas(now, self.timeout)

    def _failed(self, failure: Failure) -> None:
        self.database.failed("the replica heartbeat", failure)

    def _apply(self, read: tuple[Sequence[str], Sequence[ReplicaRecord]]) -> None:
        self.database.worked()
        expired, records = read
        if expired:
            # Only the replica whose expiry deleted them says so: one line in all.
            self._log.info(
                "dropped replicas {replicas}: no heartbeat for {timeout:g}s",
                replicas=", ".join(expired),
                timeout=self.timeout,
            )
        if self._stopped:
            return
        own = ReplicaEntry(self.replica_id, self.advertise)
        others: list[ReplicaEntry] = []
        for record in records:
            if record.replica_id == self.replica_id:
                continue
            try:
                others.append(ReplicaEntry(record.replica_id, record.advertise))
            except ValueError as e:  # written by something else than a replica
                if record.replica_id not in self._ignored:  # once, not every second
                    self._ignored.add(record.replica_id)
                    self._log.warn(
                        "ignoring replica row {replica!r}: {problem}", replica=record.replica_id, problem=str(e)
                    )
        # Read just after our own heartbeat, so we are normally there; but
        # never tell a site a set without the replica it is talking to.
        self.live = len(others) + 1
        replicas = _announced(own, others)
        members = {entry.replica_id for entry in replicas.replicas}
        starts = {r.replica_id: r.started_at for r in records if r.replica_id in members}
        before_starts, self._starts = self._starts, starts
        if replicas == self.current:
            # The same set; but a replica that started again under its id
            # (a worker restarted, one back before its row expired) has
            # lost its sessions, and the sites waiting out a duplicate
            # backoff for it dial at once when the set is told again.
            restarted = sorted(
                r for r, t in starts.items() if before_starts is not None and before_starts.get(r, t) != t
            )
            if restarted:
                self._log.info(
                    "replica {replicas} started again; telling the sites the set again", replicas=", ".join(restarted)
                )
                self._push(list(self.sessions()), 0)
            return
        before, after = _described(self.current), _described(replicas)
        changes = [f"{name} joined" for name in sorted(after.keys() - before.keys())]
        changes += [f"{name} left" for name in sorted(before.keys() - after.keys())]
        changes += [
            f"{name} now advertises {after[name] or 'nothing'}"
            for name in sorted(before)
            if name in after and before[name] != after[name]
        ]
        self._log.info(
            "replica set changed: {changes}; now {count}: {replicas}",
            changes=", ".join(changes),
            count=len(after),
            replicas=", ".join(sorted(after)),
        )
        self.current = replicas
        self._push(list(self.sessions()), 0)

    def _push(self, sessions: list[ReplicaPeer], start: int) -> None:
        """
        Tell the sessions the current set, L{PUSH_STEP} a reactor turn: at
        ten thousand sites one turn would hold every tunnel up for tens of
        milliseconds. A change meanwhile starts over with the newer set
        (those told already are told again: each REPLICAS replaces the
        last); a session that registers meanwhile is told at once.
        """
        if self._pushing is not None and self._pushing.active():
            self._pushing.cancel()
        self._pushing = None
        end = start + PUSH_STEP
        for session in sessions[start:end]:
            self.tell(session)
        if end < len(sessions):
            self._pushing = self.clock.callLater(0, self._push, sessions, end)

    def tell(self, session: ReplicaPeer) -> None:
        """Send C{session} the current set, if it negotiated REPLICAS (a site session that registers)."""
        if session.replicas_negotiated:
            session.send_replicas(self.current)

    def stop(self) -> defer.Deferred[None]:
        """
        Stop beating and remove this replica, its sessions and forward
        states from the database (queued behind the server's other writes).

        Only if it was started: a server that never listened (its port
        taken, say by a server already running on the same state and port,
        which has the same default id) records nothing, so it cannot drop
        the running one's row and sessions.
        """
        self._stopped = True
        if self._pushing is not None and self._pushing.active():
            self._pushing.cancel()
        self._pushing = None
        if self._loop is None:
            return defer.succeed(None)
        if self._loop.running:
            self._loop.stop()
        return self.database.write("recording the replica's stop", self.store.replica_stopped, self.replica_id)


def _announced(own: ReplicaEntry, others: list[ReplicaEntry]) -> Replicas:
    """
    The set to announce: this replica and the others in id order, as many
    as one REPLICAS frame can carry (L{MAX_REPLICAS}, and its size); a
    site never needs more sessions than that.
    """
    kept = sorted(others, key=lambda entry: entry.replica_id)[: MAX_REPLICAS - 1]
    while True:
        try:
            return Replicas(own=own.replica_id, replicas=(own, *kept))
        except ValueError:
            if not kept:
                raise
            kept.pop()


def _described(replicas: Replicas) -> dict[str, str]:
    return {entry.replica_id: entry.advertise for entry in replicas.replicas}
