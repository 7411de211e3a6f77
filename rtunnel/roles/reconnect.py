"""
Keep one tunnel connection up: connect, wait for the session to open, and
after any end wait a while and start again.

Twisted's C{ClientService} does this for any protocol, but it learns of a
lost connection through a wrapper around the protocol and of a failed
session check (C{prepareConnection}) through a Deferred, in two separate
inputs: a connection that the server drops before its HELLO fails the check
and then reports the loss, in a state that has no transition for it, and
Automat raises C{NoTransition} out of C{connectionLost}, a traceback per
attempt (ten thousand in one reconnect storm of the fleet benchmark).

Here an attempt lasts from C{connect()} until its connection is gone, and
each input is handled in every state it can arrive in: the session check
failing only closes the connection, and only the connection's end (or a
failed connect) moves on to the backoff wait. Inputs from an attempt that is
no longer the current one are ignored.

::

    STOPPED --start--> CONNECTING --connected--> HANDSHAKING --opened--> CONNECTED
                           |                          |                      |
                     connect failed        closed, or check failed:       closed
                           |               abort, then closed                |
                           v                          v                      v
                        WAITING <---------------------+----------------------+
                           | (delay over)
                           +--> CONNECTING

    stop: WAITING -> STOPPED at once; CONNECTING (cancel), HANDSHAKING
    (abort) and CONNECTED (close) -> STOPPING -> STOPPED once the attempt
    is over.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IProtocol, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.python.failure import Failure


class Session(Protocol):
    """What the service needs of a connected protocol (L{MuxProtocol} has it)."""

    def on_closed(self, callback: Callable[..., object], *args: object) -> None: ...

    def abort(self) -> None: ...


class Phase(enum.Enum):
    """Where the service is; exactly one attempt exists outside STOPPED and WAITING."""

    #: not started, or stopped: no connection, no timer
    STOPPED = "stopped"
    #: the endpoint is connecting
    CONNECTING = "connecting"
    #: connected; waiting for the session to open (TLS, the server's HELLO)
    HANDSHAKING = "handshaking"
    #: the session is open
    CONNECTED = "connected"
    #: the last attempt failed or ended; the next one is scheduled
    WAITING = "waiting"
    #: stopped while an attempt was under way; waiting for it to end
    STOPPING = "stopping"


class _Attempt:
    """One attempt, from C{connect()} until its connection is gone."""

    __slots__ = ("connecting", "session")

    def __init__(self) -> None:
        self.connecting: defer.Deferred[Any] | None = None
        self.session: Session | None = None


class ReconnectingService(Service):
    """
    Keeps one connection from C{factory} through C{endpoint} up while running.

    @param retry_policy: the delay before the next attempt, given how many
        attempts failed in a row (1 after the first). A session that opened
        resets the count: its end is followed by the delay for 1.
    @param prepare: called with each connected protocol; the Deferred it
        returns fires once the session is usable, or fails if it never will
        be (the connection is then aborted and counts as a failed attempt).
    @param close: how to end an open session when the service stops (for
        example a drain); the service waits until the connection is gone.
        A session still opening is aborted; a connect is cancelled.
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        factory: IProtocolFactory,
        *,
        clock: IReactorTime,
        retry_policy: Callable[[int], float],
        prepare: Callable[[Any], defer.Deferred[Any]],
        close: Callable[[Any], object] = lambda session: session.abort(),
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.clock = clock
        self.retry_policy = retry_policy
        self.prepare = prepare
        self.close = close
        self.phase = Phase.STOPPED
        #: attempts failed in a row
        self.failures = 0
        self._attempt: _Attempt | None = None
        self._retry: IDelayedCall | None = None
        self._stop_waiters: list[defer.Deferred[None]] = []

    @property
    def session(self) -> Session | None:
        """The open session, if there is one."""
        if self.phase is Phase.CONNECTED and self._attempt is not None:
            return self._attempt.session
        return None

    # -- Service --------------------------------------------------------------

    def startService(self) -> None:
        if self.running:
            return
        super().startService()  # type: ignore[no-untyped-call]  # Service.startService is unannotated in Twisted
        if self.phase is Phase.STOPPED:
            self._connect()
        # STOPPING: the next attempt starts once the current one is over.

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop: no further attempt. Fires once the current attempt is over
        (its connect cancelled, its connection gone).
        """
        super().stopService()  # type: ignore[no-untyped-call]  # Service.stopService is unannotated in Twisted
        phase, attempt = self.phase, self._attempt
        if phase is Phase.STOPPED:
            return defer.succeed(None)
        if phase is Phase.WAITING:
            if self._retry is not None and self._retry.active():
                self._retry.cancel()
            self._retry = None
            self.phase = Phase.STOPPED
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        self._stop_waiters.append(done)
        if phase is Phase.STOPPING:
            return done
        self.phase = Phase.STOPPING
        assert attempt is not None
        if phase is Phase.CONNECTING:
            # Its errback ends the stop. Without a Deferred yet, connect() is
            # still running (it is stopping us: a connection made and refused
            # within it); what it returns ends the stop.
            if attempt.connecting is not None:
                attempt.connecting.cancel()
        elif phase is Phase.HANDSHAKING:
            assert attempt.session is not None
            attempt.session.abort()
        else:
            assert attempt.session is not None
            self.close(attempt.session)
        return done

    def retry_soon(self, delay: float) -> bool:
        """
        While waiting to dial again, dial within C{delay} seconds instead
        of when the backoff said (something changed that makes a dial now
        likely to succeed). Nothing otherwise.

        @return: whether the wait was shortened.
        """
        retry = self._retry
        if self.phase is not Phase.WAITING or retry is None or not retry.active():
            return False
        if retry.getTime() - self.clock.seconds() <= delay:
            return False
        retry.reset(delay)
        return True

    # -- inputs -----------------------------------------------------------------

    def _connect(self) -> None:
        attempt = self._attempt = _Attempt()
        self.phase = Phase.CONNECTING
        connecting = attempt.connecting = defer.maybeDeferred(self.endpoint.connect, self.factory)
        connecting.addCallbacks(self._connected, self._connect_failed, callbackArgs=(attempt,), errbackArgs=(attempt,))

    def _connected(self, protocol: IProtocol | None, attempt: _Attempt) -> None:
        if protocol is None:
            # A wrapping endpoint found its protocol let go of: the
            # connection was made and is gone already (a TLS wrapper drops
            # the protocol it wraps in connectionLost).
            self._connect_failed(Failure(ConnectionDone("connection lost as it was made")), attempt)
            return
        session: Session = protocol  # type: ignore[assignment]  # the factory builds Sessions
        # Only the current attempt gets here: a stop cancels a pending
        # connect, and a cancelled Deferred never succeeds.
        attempt.connecting = None
        attempt.session = session
        if self.phase is Phase.CONNECTING:
            self.phase = Phase.HANDSHAKING
        # Before the check: a connection already gone (lost while it was
        # being made) ends the attempt here, and the check is not made.
        session.on_closed(self._closed, attempt)
        if self._attempt is not attempt:
            return
        if self.phase is Phase.STOPPING:  # stopped while connect() was running
            session.abort()
        elif self.phase is Phase.HANDSHAKING:
            defer.maybeDeferred(self.prepare, session).addCallbacks(
                self._opened, self._not_opened, callbackArgs=(attempt,), errbackArgs=(attempt,)
            )

    def _connect_failed(self, failure: Failure, attempt: _Attempt) -> None:
        # The endpoint has said why (RotatingEndpoint logs it); a cancel is ours.
        attempt.connecting = None
        self._attempt = None
        if self.phase is Phase.STOPPING:
            self._stopped()
        else:
            self._wait()

    def _opened(self, _: object, attempt: _Attempt) -> None:
        if attempt is self._attempt and self.phase is Phase.HANDSHAKING:
            self.phase = Phase.CONNECTED
            self.failures = 0

    def _not_opened(self, failure: Failure, attempt: _Attempt) -> None:
        # Whoever failed the check (the session ended, or came with a
        # refusal) says why when the connection ends; here it only must end.
        if attempt is self._attempt and self.phase is Phase.HANDSHAKING and attempt.session is not None:
            attempt.session.abort()

    def _closed(self, reason: BaseException, attempt: _Attempt) -> None:
        if attempt is not self._attempt:
            return
        self._attempt = None
        if self.phase is Phase.STOPPING:
            self._stopped()
        else:
            self._wait()

    def _retry_due(self) -> None:
        self._retry = None
        if self.phase is Phase.WAITING:
            self._connect()

    # -- outputs ------------------------------------------------------------------

    def _wait(self) -> None:
        self.failures += 1
        self.phase = Phase.WAITING
        self._retry = self.clock.callLater(self.retry_policy(self.failures), self._retry_due)

    def _stopped(self) -> None:
        self.phase = Phase.STOPPED
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self.running:  # started again while stopping
            self._connect()


__all__ = ["Phase", "ReconnectingService", "Session"]
