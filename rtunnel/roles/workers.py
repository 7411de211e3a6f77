"""
C{twistd rtunnel-server ... --workers N}: N worker processes on one host
that share the listening ports and are replicas of each other (issue 13).

One Python process encrypts on one core. With C{--workers N} (N > 1) the
twistd process becomes a supervisor: it opens (or creates) the state once,
so that N processes do not race to make the CA, then runs N workers with
L{twisted.runner.procmon.ProcessMonitor} and restarts any that dies. The
supervisor serves nothing itself.

Worker K is C{twistd -n rtunnel-server} (L{TWISTD}) with the supervisor's own
plugin options, C{--workers 1}, C{--replica-id BASE/wK} and C{--worker-of
PID}. C{--worker-of} makes the process listen through
L{rtunnel.adapter.net.listen_shared}: every TCP port (tunnel, forwards,
front doors) is bound with C{SO_REUSEPORT}, so one port serves all the
workers and the kernel spreads new connections between them. Each worker
is a replica with its own id over the same database, so sites hold a
session to each (docs/scaling.md); a worker's admin endpoint is the
configured port + K - 1, since an HTTP scrape must reach one known process.
A worker also stops when its supervisor is gone (L{SupervisorWatch}): a
supervisor started again must not find the old workers still holding the
port under the same ids.
"""

from __future__ import annotations

import getopt
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer, task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import Logger as TwistedLogger
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.runner.procmon import ProcessMonitor

from ..adapter.net import SharedPortError, shared_endpoint, split_description
from ..logs import Logger

__all__ = [
    "MAX_WORKERS",
    "TWISTD",
    "SupervisorWatch",
    "WorkerMonitor",
    "WorkersError",
    "build_supervisor",
    "check_workers",
    "worker_admin",
    "worker_arguments",
    "worker_replica_id",
]

#: The most workers C{--workers} takes: a site holds one session per replica
#: and a REPLICAS frame names at most 64 (docs/protocol.md).
MAX_WORKERS = 64

#: The options of the supervisor's command line that each worker is given
#: its own value of instead.
_PER_WORKER = frozenset({"workers", "worker-of", "replica-id", "admin"})

#: Seconds a worker gets after SIGTERM beyond C{--drain-grace} before it is
#: killed: its own shutdown (database writes, logs) after the drain.
_KILL_MARGIN = 5

#: Longest wait between two restarts of a worker that keeps dying at once
#: (ProcessMonitor doubles it from 1 s).
_MAX_RESTART_DELAY = 30

#: Seconds a worker must have run for its death not to count as "at once":
#: a worker takes a second or two to start, and one that cannot listen
#: (another program holds the port) dies just after; with procmon's 1 s it
#: would be restarted without delay for ever.
_QUICK_DEATH = 10

#: twistd run by the supervisor's interpreter: C{python -m twisted} is
#: C{twist}, which has no C{--nodaemon} nor C{--pidfile}, and twistd's
#: module has no C{__main__}; no C{twistd} script need be on C{PATH}.
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


class WorkersError(ValueError):
    """A configuration C{--workers} cannot run (the message says why)."""


class WorkerSettings(Protocol):
    """What this module reads of L{rtunnel.services.ServerConfig} (the roles import no entry point)."""

    @property
    def drain_grace(self) -> float: ...
    @property
    def admin(self) -> str | None: ...
    @property
    def workers(self) -> int: ...


def worker_replica_id(base: str, index: int) -> str:
    """The replica id of worker C{index} (from 1) of a supervisor whose own id is C{base}."""
    return f"{base}/w{index}"


def worker_admin(admin: str | None, index: int) -> str | None:
    """
    The admin endpoint of worker C{index} (from 1): the configured one
    with its port moved up by C{index - 1} (port 0 stays 0: the kernel
    picks one per worker); C{None} stays off.

    @param admin: C{--admin} as given: a bare port is C{tcp:PORT}, and
        what names no interface is bound to loopback by the worker itself
        (L{rtunnel.observe.web.admin_endpoint}).
    @raise WorkersError: a UNIX socket (one path cannot serve several
        processes), no port, or a port beyond 65535.
    """
    if admin is None:
        return None
    text = admin.strip()
    parts = split_description(f"tcp:{text}" if text.isdecimal() else text)
    kind = parts[0].lower()
    if kind not in {"tcp", "tcp6", "ssl"}:
        raise WorkersError(
            f"--admin {admin}: with --workers each worker serves its own admin endpoint at the configured TCP port "
            "+ its number - 1; give a tcp:, tcp6: or ssl: endpoint (or none)"
        )
    keyword = [i for i, part in enumerate(parts) if i and part.startswith("port=")]
    positional = [i for i, part in enumerate(parts) if i and "=" not in part]
    where = keyword[0] if keyword else positional[0] if positional else None
    prefix = "port=" if keyword else ""
    value = parts[where][len(prefix) :] if where is not None else ""
    if where is None or not value.isdecimal():
        raise WorkersError(f"--admin {admin}: names no port to give each worker its own from")
    port = int(value)
    if port == 0:
        return ":".join(parts)
    moved = port + index - 1
    if moved > 65535:
        raise WorkersError(f"--admin {admin}: worker {index} would serve its admin endpoint on port {moved}")
    parts[where] = f"{prefix}{moved}"
    return ":".join(parts)


def check_workers(config: WorkerSettings, listeners: Sequence[tuple[str, str]]) -> None:
    """
    Judge a configuration for C{--workers N} before anything starts: a
    mistake is a usage error, not N workers failing and restarting.

    @param listeners: each listening endpoint as the server listens on it,
        with the option that gave it (C{--listen}, C{--forward ...}, the
        front doors): all must be shareable TCP ports.
    @raise WorkersError: what is wrong, naming the option.
    """
    if not 1 <= config.workers <= MAX_WORKERS:
        raise WorkersError(f"--workers {config.workers}: give a number from 1 to {MAX_WORKERS}")
    if config.workers == 1:
        return
    for option, description in listeners:
        try:
            shared_endpoint(description)
        except SharedPortError as e:
            raise WorkersError(f"{option}: {e}") from None
    for index in (1, config.workers):
        worker_admin(config.admin, index)


def worker_arguments(
    options: Any,
    argv: Sequence[str],
    index: int,
    replica_id: str,
    admin: str | None,
    supervisor_pid: int,
    python: str = sys.executable,
) -> list[str]:
    """
    The command line of worker C{index}: the supervisor's plugin options
    (C{argv}, as the plugin was given them) less those each worker has its
    own value of, then those.

    C{argv} is parsed again with the plugin's own option tables (C{options},
    a parsed L{twisted.python.usage.Options}), so that an abbreviated
    C{--work 3}, C{--workers=3} or a short option is recognised as the
    parser saw it; values are passed as C{--name=value}, so that none is
    taken for an option.

    twistd runs in the foreground without a pidfile (the supervisor has
    one if any) and logs to its standard output, which the supervisor
    reads and logs line by line under the worker's name.
    """
    pairs, rest = getopt.getopt(list(argv), options.shortOpt, options.longOpt)
    kept: list[str] = []
    for option, value in pairs:
        name = option.lstrip("-")
        mangled = name if name in options.synonyms else name.replace("-", "_")
        canonical = str(options.synonyms.get(mangled, name)).replace("_", "-")
        if canonical in _PER_WORKER:
            continue
        takes_value = option.startswith("--") and f"{name}=" in options.longOpt
        if option.startswith("--"):
            kept.append(f"{option}={value}" if takes_value else option)
        else:
            kept.extend([option, value] if value else [option])
    return [
        python,
        "-c",
        TWISTD,
        "--nodaemon",
        "--pidfile=",
        "rtunnel-server",
        *kept,
        *rest,
        "--workers=1",
        f"--replica-id={replica_id}",
        f"--worker-of={supervisor_pid}",
        f"--admin={admin if admin is not None else 'none'}",
    ]


#: The time at the start of a line of twistd's text log.
_LOG_TIME = re.compile(r"^\d{4}-\d\d-\d\dT[0-9:.]+[+-]\d{4} ")

#: The level twistd's text log writes after the namespace: C{[namespace#warn]}.
_LOG_LEVEL = re.compile(r"^\[[^\]\s]*#(debug|info|warn|error|critical)\] ")


class _WorkerLines(TwistedLogger):
    """
    The logger procmon relays each line of a worker's output through, as
    C{[wK] line}: the worker's own timestamp is dropped (the supervisor's
    log adds its own), and the line keeps the level the worker gave it, so
    that a worker's warnings and errors are warnings and errors in the
    supervisor's log as well (its JSON log, an alert on the level).
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        line = kwargs.get("line")
        if isinstance(line, str):
            line = _LOG_TIME.sub("", line, count=1)
            kwargs["line"] = line
            found = _LOG_LEVEL.match(line)
            if found is not None:
                level = LogLevel.levelWithName(found.group(1))
        super().emit(level, format, **kwargs)


class WorkerMonitor(ProcessMonitor):
    """
    L{ProcessMonitor} for the workers: each start and each death is logged
    with the worker's pid and exit status, and stopping waits for every
    worker to end (drained after SIGTERM, killed after C{killTime}), so
    that the supervisor exits after its workers, not before.
    """

    #: The workers' lines, relayed as they come: each worker already dropped
    #: what its C{--log-level} does not want, so no threshold here.
    log = _WorkerLines()
    _events = Logger()

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.pids: dict[str, int] = {}
        self._ended: list[defer.Deferred[None]] = []

    def startProcess(self, name: str) -> None:
        super().startProcess(name)
        protocol = self.protocols.get(name)
        pid = getattr(getattr(protocol, "transport", None), "pid", None)
        if pid is not None:
            self.pids[name] = pid
            self._events.info("worker {worker} started (pid {pid})", worker=name, pid=pid)

    def _monitoredProcessExited(self, name: str, reason: Failure | None = None) -> None:
        # ProcessMonitor's own hook (LoggingProtocol.processEnded calls it).
        pid = self.pids.pop(name, None)
        status = _status(reason)
        if self.running:
            self._events.warn(
                "worker {worker} (pid {pid}) {status}; restarting it", worker=name, pid=pid, status=status
            )
        else:
            self._events.info("worker {worker} (pid {pid}) {status}", worker=name, pid=pid, status=status)
        super()._monitoredProcessExited(name, reason)
        if not self.protocols:
            ended, self._ended = self._ended, []
            for waiting in ended:
                waiting.callback(None)

    def stopService(self) -> defer.Deferred[None]:  # type: ignore[override]  # a Deferred: twistd waits for it
        super().stopService()
        if not self.protocols:
            return defer.succeed(None)
        waiting: defer.Deferred[None] = defer.Deferred()
        self._ended.append(waiting)
        return waiting


def _status(reason: Failure | None) -> str:
    """How a worker ended, in words."""
    if reason is not None and reason.check(ProcessDone):
        return "exited with status 0"
    if reason is not None and reason.check(ProcessTerminated):
        value = reason.value
        number = getattr(value, "signal", None)
        if number is not None:
            try:
                name = f" ({signal.Signals(number).name})"
            except ValueError:
                name = ""
            return f"ended by signal {number}{name}"
        return f"exited with status {getattr(value, 'exitCode', None)}"
    return f"ended: {reason.getErrorMessage() if reason is not None else 'unknown reason'}"


def build_supervisor(
    config: WorkerSettings,
    arguments: Callable[[int], list[str]],
    reactor: Any,
    prepare: Callable[[], None],
) -> IService:
    """
    The supervisor's service: C{prepare} (open or create the state once,
    then close it) now, and C{config.workers} workers, C{w1} to C{wN}, run
    from C{arguments(K)} once the service starts.

    Workers get the supervisor's environment and working directory.
    C{prepare} raises what building a server would (an unusable state
    directory): the supervisor fails as a single server would, before any
    worker runs.
    """
    prepare()
    monitor = WorkerMonitor(reactor)
    # ProcessMonitor declares whole seconds.
    monitor.killTime = math.ceil(config.drain_grace + _KILL_MARGIN)
    monitor.maxRestartDelay = _MAX_RESTART_DELAY
    monitor.threshold = _QUICK_DEATH
    environment = dict(os.environ)
    # Each log line leaves the worker when written, not when a buffer fills.
    environment["PYTHONUNBUFFERED"] = "1"
    for index in range(1, config.workers + 1):
        monitor.addProcess(f"w{index}", arguments(index), env=environment)
    supervisor = MultiService()
    monitor.setServiceParent(supervisor)  # type: ignore[no-untyped-call]  # unannotated in Twisted
    return supervisor


class SupervisorWatch(Service):
    """
    In a worker: stop the process (its drain included) when the supervisor
    that started it (C{--worker-of PID}) is no longer its parent, killed
    with -9 say. Left running, the orphan would keep the shared port and
    its replica id beside the workers of a supervisor started again.
    """

    _log = Logger()

    def __init__(self, supervisor_pid: int, reactor: Any, interval: float = 1.0) -> None:
        self.supervisor_pid = supervisor_pid
        self.reactor = reactor
        self.interval = interval
        self._poll: task.LoopingCall | None = None
        self.parent_pid: Callable[[], int] = os.getppid

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service.startService is unannotated in Twisted
        self._poll = task.LoopingCall(self.check)
        self._poll.clock = self.reactor
        self._poll.start(self.interval, now=True)

    def check(self) -> None:
        if self.parent_pid() == self.supervisor_pid:
            return
        self._log.warn("the supervisor (pid {pid}) is gone: this worker stops", pid=self.supervisor_pid)
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # Service.stopService is unannotated in Twisted
        if self._poll is not None and self._poll.running:
            self._poll.stop()
