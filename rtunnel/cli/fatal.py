"""
Ending a twistd process with a non-zero exit status.

twistd always exits 0 once its reactor stops; a tunnel that must not retry (its
token is spent, its site revoked, the server cannot prove its identity) or a
server that cannot listen must tell its supervisor otherwise (systemd restarts,
scripts, the tests). The status is applied at interpreter exit, after twistd
has finished its own clean-up (services stopped, logs flushed, pidfile removed).
"""

from __future__ import annotations

import atexit
import os
import sys

from twisted.internet.interfaces import IReactorCore

from rtunnel.logs import Logger

# One namespace for "the last word of a process", whoever stops it (see
# rtunnel.services.stop_reactor): log filters need not know the module.
_log = Logger(namespace="rtunnel.fatal")
_exit_status: int | None = None


def _apply_exit_status() -> None:
    if _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)


def stop_with_status(reactor: IReactorCore, status: int, message: str, program: str = "rtunnel") -> None:
    """
    Log C{message} as critical, print it on stderr (as C{program}: error: …),
    and stop the reactor so that the process exits with C{status}.
    """
    global _exit_status
    _log.critical("{message}", message=message)
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    if _exit_status is None:
        _exit_status = status
        atexit.register(_apply_exit_status)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)
