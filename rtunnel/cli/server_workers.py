"""
C{twistd rtunnel-server --workers N}: the options, their checks and the two
kinds of process they make (L{rtunnel.roles.workers}), kept here so that
the plugin itself (L{rtunnel.cli.server_tap}) only calls in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.application.service import IService, MultiService
from twisted.python import usage

from ..adapter.net import share_ports
from ..frontdoor.protocol import DoorKind
from ..frontdoor.wiring import check_front_doors
from ..identity.state import ServerState
from ..mux.frames import replica_id_problem
from ..roles.replicas import default_replica_id, listen_port
from ..roles.server import with_backlog
from ..roles.workers import (
    MAX_WORKERS,
    SupervisorWatch,
    WorkersError,
    build_supervisor,
    check_workers,
    worker_admin,
    worker_arguments,
    worker_replica_id,
)
from ..services import ServerConfig
from .options import default

__all__ = ["WORKER_PARAMETERS", "base_replica_id", "make_supervisor", "with_workers", "worker_service"]

WORKER_PARAMETERS = [
    [
        "workers",
        None,
        default(ServerConfig, "workers"),
        f"Worker processes (1 to {MAX_WORKERS}) sharing the listening ports (SO_REUSEPORT), each a replica "
        "BASE/wK of --replica-id over the same database; worker K serves --admin on its port + K - 1.",
    ],
    ["worker-of", None, None, "Internal: set by --workers on each worker (the supervisor's pid)."],
]


#: The option that gives each front door, for the usage errors.
_DOOR_OPTIONS = {DoorKind.SOCKS5: "--socks", DoorKind.HTTP_CONNECT: "--connect-proxy"}


def base_replica_id(config: ServerConfig) -> str:
    """
    The id the workers' ids are made from (C{BASE/wK}): C{--replica-id},
    or the default C{HOSTNAME:PORT}, its host name shortened so that the
    longest worker id still fits 64 characters.
    """
    if config.replica_id is not None:
        return config.replica_id
    suffix = f"/w{config.workers}"
    return default_replica_id(f"{listen_port(config.listen) or 0}{suffix}")[: -len(suffix)]


def with_workers(options: usage.Options, config: ServerConfig) -> ServerConfig:
    """
    C{config} with C{--workers} and the C{--worker-of} marker checked
    (usage errors), the listeners, admin endpoints and worker ids of N > 1
    judged before anything starts.
    """
    text = str(options["workers"]).strip()
    if not text.isdecimal():
        raise usage.UsageError(f"--workers {text}: give a number from 1 to {MAX_WORKERS}")
    config = attrs.evolve(config, workers=int(text))
    worker_of = options["worker-of"]
    if worker_of is not None and (not str(worker_of).isdecimal() or config.workers != 1):
        raise usage.UsageError("--worker-of is set by --workers on its workers, with --workers 1 and a pid")
    listeners = [("--listen", with_backlog(config.listen))]
    listeners += [(f"--forward {spec}", spec.endpoint_description()) for spec in config.forwards]
    try:
        if config.workers > 1:
            if config.advertise is not None:
                raise WorkersError(
                    "--advertise names one replica's own address; the workers share every port, so sites cannot "
                    "reach one of them directly: leave --advertise out with --workers"
                )
            listeners += [(_DOOR_OPTIONS[kind], description) for kind, description in check_front_doors(config)]
        check_workers(config, listeners)
    except (WorkersError, ValueError) as e:
        raise usage.UsageError(str(e)) from None
    if config.workers > 1:
        base = base_replica_id(config)
        longest = worker_replica_id(base, config.workers)
        problem = replica_id_problem(longest)
        if problem is not None:
            raise usage.UsageError(
                f"--replica-id {base}: worker {config.workers} would be {longest!r}, and {problem}; give a shorter "
                "--replica-id"
            )
    return config


def make_supervisor(options: Any, argv: Sequence[str], reactor: Any) -> IService:
    """
    The supervisor of C{--workers N}: the state opened (or created) once
    here, then N workers with the plugin options C{argv}.

    @raise rtunnel.identity.errors.StateError: the state is unusable, as a
        single server would raise.
    """
    config: ServerConfig = options.config
    base = base_replica_id(config)
    supervisor_pid = os.getpid()

    # The front doors were judged with the options (with_workers), as every
    # listener was: only the state is left to open here.
    def prepare() -> None:
        ServerState.load_or_create(config.state_dir, list(config.public_addresses), database=config.database).close()

    def arguments(index: int) -> list[str]:
        return worker_arguments(
            options, argv, index, worker_replica_id(base, index), worker_admin(config.admin, index), supervisor_pid
        )

    return build_supervisor(config, arguments, reactor, prepare)


def worker_service(options: Any, service: IService, reactor: Any) -> IService:
    """
    C{service} as this process runs it: unchanged for a server of its own;
    for a worker (C{--worker-of PID}), with its ports shared and a watch on
    the supervisor.
    """
    worker_of = options["worker-of"]
    if worker_of is None:
        return service
    share_ports(True)
    parent = MultiService()
    service.setServiceParent(parent)
    SupervisorWatch(int(worker_of), reactor).setServiceParent(parent)  # type: ignore[no-untyped-call]
    return parent
