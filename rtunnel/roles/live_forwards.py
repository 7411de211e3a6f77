"""
Forwards managed while the tunnel server runs (C{rtunnel forwards add} and
C{remove}): the server finds them in its state database and listens or
stops listening without a restart, touching nothing else.

The admin CLI and the server share nothing but the database file, as for
revocations: the CLI bumps a forwards version in the C{meta} table with
each change, and the server polls that one value every second in its
database thread (L{rtunnel.roles.server.StateThread}), reading the forwards
only when it moved. It applies the difference on the reactor: a new or
changed forward gets a listener, a removed one loses it at once (its open
connections go on until they end, unless the removal asked for C{--cut}),
and each outcome is written back as the forward's state (C{listening} or
C{failed: REASON}) for C{rtunnel forwards list}. A forward that cannot
listen is a state, not a fatal error: the server and every other forward
run on.

Command-line forwards (C{--forward}) stay as they were: listened on at
start, fatal if they cannot be. Their states are recorded too, so that the
CLI can refuse a database forward on the same BIND:PORT up front; one
stored while the server was down is reported failed, naming the
command-line forward, when the server starts.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Generator, Iterable
from datetime import UTC, datetime
from typing import Any

from attrs import define
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure

from ..adapter.net import listen
from ..address import describe
from ..identity.state import ServerState
from ..identity.store import (
    SOURCE_COMMAND_LINE,
    SOURCE_DATABASE,
    ForwardRecord,
    ForwardState,
    forward_spec_text,
)
from ..logs import Logger
from .forward import ForwardFactory, ForwardSpec
from .registry import SiteRegistry

__all__ = ["LiveForwards", "listen_failure_reason", "spec_text"]

LISTENING = "listening"
_LOOPBACK = ("127.", "::1", "localhost")

#: Listens for one forward: the spec and its factory to the listening port.
Listen = Callable[[ForwardSpec, ForwardFactory], "defer.Deferred[IListeningPort]"]


def spec_text(spec: ForwardSpec) -> str:
    """C{BIND:PORT:SITE:HOST:HOSTPORT}, as the CLI and the database spell a forward."""
    return forward_spec_text(spec.bind, spec.port, spec.site, spec.target.host, spec.target.port)


def listen_failure_reason(failure: Failure) -> str:
    """
    Why a forward could not listen, in the operator's words first (port in
    use, permission denied, bad address) and the system's after.
    """
    error = failure.value
    cause = error.socketError if isinstance(error, CannotListenError) else error
    if isinstance(cause, socket.gaierror):
        return f"bad address ({cause.strerror or cause})"
    if isinstance(cause, OSError):
        detail = cause.strerror or str(cause)
        if cause.errno == errno.EADDRINUSE:
            return f"port in use ({detail})"
        if cause.errno in (errno.EACCES, errno.EPERM):
            return f"permission denied ({detail})"
        if cause.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL):
            return f"bad address ({detail})"
        return detail
    return failure.getErrorMessage()


@define
class _Entry:
    """A database forward the server applied: its listener, or why it has none."""

    record: ForwardRecord
    factory: ForwardFactory | None
    port: IListeningPort | None
    state: str


class LiveForwards:
    """
    The database forwards of one running tunnel server (see the module).

    @param factories: the server's list of forward factories (its
        descriptor estimate counts their connections); ours are added to it
        and taken out once removed and without connections.
    @param listen: how to listen (default: the forward's Twisted endpoint
        on C{reactor}); tests pass their own.
    """

    _log = Logger()

    def __init__(
        self,
        state: ServerState,
        registry: SiteRegistry,
        reactor: Any,
        database: Any,
        open_timeout: float,
        factories: list[ForwardFactory],
        *,
        poll_interval: float = 1.0,
        listen: Listen | None = None,
        replica_id: str = "",
    ) -> None:
        self.state = state
        self.registry = registry
        self.reactor = reactor
        self.database = database
        self.open_timeout = open_timeout
        self.factories = factories
        self.poll_interval = poll_interval
        #: the states are recorded as this replica's (each replica listens on its own)
        self.replica_id = replica_id
        self._listen = listen or self._listen_endpoint
        #: the command-line forwards, by BIND:PORT
        self.command_line: dict[tuple[str, int], ForwardSpec] = {}
        #: the database forwards applied, by BIND:PORT
        self.entries: dict[tuple[str, int], _Entry] = {}
        #: factories of removed forwards whose connections go on
        self._retired: list[ForwardFactory] = []
        self._last: int | None = None
        self._poll: task.LoopingCall | None = None

    def _listen_endpoint(self, spec: ForwardSpec, factory: ForwardFactory) -> defer.Deferred[IListeningPort]:
        return listen(self.reactor, spec.endpoint_description(), factory)

    def start(self, command_line: Iterable[ForwardSpec]) -> None:
        """
        Record the command-line forwards (listening: the server listened on
        them already), then apply the database's now and poll it.
        """
        self.command_line = {(spec.bind, spec.port): spec for spec in command_line}
        states = [_state(spec, SOURCE_COMMAND_LINE, LISTENING) for spec in self.command_line.values()]
        self.database.write(
            "recording the command-line forwards",
            self.state.store.reset_forward_states,
            states,
            _now(),
            replica_id=self.replica_id,
        )
        self._poll = task.LoopingCall(self.check)
        self._poll.clock = self.reactor
        self._poll.start(self.poll_interval, now=True)

    def stop(self) -> defer.Deferred[Any]:
        """Stop polling and listening (the server's stop; sessions drain after)."""
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        ports = [e.port for e in self.entries.values() if e.port is not None]
        for entry in self.entries.values():
            entry.port = None
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports], consumeErrors=True)

    def check(self) -> defer.Deferred[None]:
        """
        One poll; never fails (a LoopingCall would stop for good): a database
        error is reported by the database thread and the next poll retries.
        """
        d: defer.Deferred[None] = self.database.run(self._read, self._last)
        d.addCallback(self._apply)
        d.addErrback(lambda failure: self.database.failed("the forwards poll", failure))
        return d

    def _read(self, last: int | None) -> tuple[int, list[ForwardRecord]] | None:
        """In the database thread: the stored forwards, if they changed since C{last}."""
        store = self.state.store
        version = store.forwards_version()
        if version == last:
            return None
        return version, store.stored_forwards()

    @defer.inlineCallbacks
    def _apply(self, read: tuple[int, list[ForwardRecord]] | None) -> Generator[defer.Deferred[Any], Any, None]:
        self._prune()
        if read is None:
            return
        version, records = read
        wanted = {r.key: r for r in records if not r.removed}
        removed = {r.key: r for r in records if r.removed}
        for key, entry in list(self.entries.items()):
            want = wanted.get(key)
            if want is not None and want.spec == entry.record.spec:
                continue
            del self.entries[key]
            cut = want is None and key in removed and removed[key].cut
            yield self._close(entry, cut, replaced=want is not None)
        states = []
        for key, record in wanted.items():
            if key not in self.entries:
                entry = yield self._open(record)
                self.entries[key] = entry
                states.append(_record_state(record, entry.state))
        if states:
            self.database.write(
                "recording the forwards' states",
                self.state.store.record_forward_states,
                states,
                _now(),
                replica_id=self.replica_id,
            )
        if removed:
            self.database.write(
                "forgetting removed forwards",
                self.state.store.forget_removed_forwards,
                sorted(removed),
                replica_id=self.replica_id,
            )
        self._last = version

    @defer.inlineCallbacks
    def _open(self, record: ForwardRecord) -> Generator[defer.Deferred[Any], Any, _Entry]:
        """Listen for one database forward; what came of it is its entry."""
        theirs = self.command_line.get(record.key)
        if theirs is not None:
            reason = (
                f"conflicts with the command-line forward --forward {spec_text(theirs)} "
                f"(both on {describe_key(record.key)})"
            )
            self._log.warn(
                "forward {forward} (from the database) not listening: {reason}", forward=record.spec, reason=reason
            )
            return _Entry(record, None, None, f"failed: {reason}")
        try:
            spec = ForwardSpec.parse(record.spec)
        except ValueError as e:
            self._log.warn(
                "forward {forward} (from the database) not listening: {reason}", forward=record.spec, reason=e
            )
            return _Entry(record, None, None, f"failed: bad address ({e})")
        factory = ForwardFactory(spec, self.registry, self.open_timeout)
        try:
            port = yield self._listen(spec, factory)
        except Exception:
            reason = listen_failure_reason(Failure())
            self._log.warn(
                "forward {forward} (from the database) cannot listen: {reason}; the server runs on without it",
                forward=str(spec),
                reason=reason,
            )
            return _Entry(record, None, None, f"failed: {reason}")
        self.factories.append(factory)
        self._log.info(
            "forward {forward} listening on {address} (added from the database)",
            forward=str(spec),
            address=describe(port.getHost()),
        )
        if not spec.bind.startswith(_LOOPBACK):
            self._log.warn(
                "forward {forward} is bound to {bind}, not loopback: anyone who can reach that address "
                "reaches {site}:{target} without authentication (docs/security.md, forward clients)",
                forward=str(spec),
                bind=spec.bind,
                site=spec.site,
                target=str(spec.target),
            )
        return _Entry(record, factory, port, LISTENING)

    @defer.inlineCallbacks
    def _close(self, entry: _Entry, cut: bool, replaced: bool) -> Generator[defer.Deferred[Any], Any, None]:
        """
        Stop listening for a removed (or replaced) forward, then cut its
        clients if asked: in that order, so that a client cut can never
        find the port still open.
        """
        port, entry.port = entry.port, None
        factory = entry.factory
        if factory is None:
            self._log.info("forward {forward} removed (it was not listening)", forward=entry.record.spec)
            return
        self._retired.append(factory)
        if port is not None:
            yield defer.maybeDeferred(port.stopListening)
        forward = str(factory.spec)
        if cut:
            count = factory.cut("forward removed with --cut")
            self._log.info(
                "forward {forward} removed: listener closed, {count} open connections cut (--cut)",
                forward=forward,
                count=count,
            )
        else:
            self._log.info(
                "forward {forward} {what}: listener closed, {count} open connections go on until they end",
                forward=forward,
                what="replaced" if replaced else "removed",
                count=len(factory.clients),
            )
        self._prune()

    def _prune(self) -> None:
        """Take removed forwards whose last connection ended out of the server's count."""
        for factory in [f for f in self._retired if f.connections <= 0]:
            self._retired.remove(factory)
            if factory in self.factories:
                self.factories.remove(factory)


def describe_key(key: tuple[str, int]) -> str:
    bind, port = key
    return f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"


def _state(spec: ForwardSpec, source: str, state: str) -> ForwardState:
    return ForwardState(spec.bind, spec.port, spec.site, spec.target.host, spec.target.port, source, state)


def _record_state(record: ForwardRecord, state: str) -> ForwardState:
    return ForwardState(record.bind, record.port, record.site, record.host, record.hostport, SOURCE_DATABASE, state)


def _now() -> datetime:
    return datetime.now(UTC)
