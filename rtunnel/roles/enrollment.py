"""
The enrollment exchange as two small Twisted protocols over TLS.

Server side, L{EnrollmentResponder}: runs on a TLS connection whose client
presented no certificate; reads one request, lets the server state decide,
answers, closes.  Site side, L{EnrollmentRequester} (or L{enroll}): sends the
request only once the TLS handshake has verified the server against the CA
pinned from the keyfile, so a wrong server never sees the token.

The wire format is in L{rtunnel.identity.enrollment}.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel.adapter.address import describe
from rtunnel.identity.certs import fingerprint, load_certificate, validate_site_name
from rtunnel.identity.enrollment import (
    EnrollAccepted,
    EnrollRejected,
    EnrollReply,
    EnrollRequest,
    ReplyReader,
    RequestReader,
    encode_reply,
    encode_request,
)
from rtunnel.identity.errors import (
    BAD_REQUEST,
    INTERNAL_ERROR,
    EnrollmentIncomplete,
    EnrollmentProtocolError,
    EnrollmentRefused,
    IdentityError,
)
from rtunnel.logs import Logger

if TYPE_CHECKING:
    from rtunnel.observe.stats import ServerFigures

__all__ = [
    "DEFAULT_TIMEOUT",
    "Enroller",
    "EnrollmentResponder",
    "EnrollmentRequester",
    "enroll",
]

DEFAULT_TIMEOUT = 30.0


class Enroller(TypingProtocol):
    """
    What the responder needs from the server: L{ServerState} provides it
    (deciding on the spot), and the tunnel server's factory (deciding in its
    database thread, hence a Deferred).
    """

    def enroll(self, site: str, token: str, csr_pem: str, now: datetime) -> str | Deferred[str]:
        """
        Return the new certificate PEM (or a Deferred firing with it), or
        raise (or fail with) L{EnrollmentRefused}.
        """


def _describe_peer(transport: object) -> str:
    get_peer = getattr(transport, "getPeer", None)
    if get_peer is None:
        return "unknown"
    return describe(get_peer())


def _site_for_log(site: str) -> str:
    """
    The site name as received, safe for a log line even if it is garbage.
    """
    try:
        return validate_site_name(site)
    except IdentityError:
        return repr(site[:64])


def _drop(transport: object) -> None:
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.loseConnection()  # type: ignore[attr-defined]


class EnrollmentResponder(Protocol):
    """
    Server side of one enrollment exchange.

    Reads one request, calls C{enroller.enroll}, writes the reply and closes.
    A malformed request gets a C{bad-request} reply; an unexpected error an
    C{internal-error} reply (details only in the server log).  If the request
    has not arrived C{timeout} seconds after the connection was handed over,
    the connection is dropped.

    Once the request is complete the responder only waits for the decision
    (C{deciding}); its own timer is done. The tunnel server's connection
    keeps its handshake deadline armed over the whole exchange and drops a
    connection whose decision is late; a decision that comes after the
    connection is gone is logged and not sent (a token it spent can be
    redeemed again with the same key, for the same certificate).

    With C{figures}, each exchange's outcome is counted there
    (L{ServerFigures.enrollment}: C{ok}, the refusal's code,
    C{bad-request}, C{internal-error}, C{timeout}) and each refusal kept
    with the reason its log line gives.
    """

    _log = Logger()

    def __init__(
        self,
        enroller: Enroller,
        clock: IReactorTime,
        timeout: float = DEFAULT_TIMEOUT,
        peer: str | None = None,
        figures: ServerFigures | None = None,
    ) -> None:
        self._enroller = enroller
        self._figures = figures
        self._clock = clock
        self._timeout = timeout
        self._peer = peer
        self._reader = RequestReader()
        self._timer: IDelayedCall | None = None
        self._finished = False
        self._lost = False
        #: the request is complete and the enroller has not answered yet
        self.deciding = False
        self.reply: EnrollReply | None = None

    @property
    def peer(self) -> str:
        return self._peer if self._peer is not None else _describe_peer(self.transport)

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        try:
            request = self._reader.receive_data(data)
        except EnrollmentProtocolError as e:
            self._log.info(
                "malformed enrollment request from {peer}: {error}",
                peer=self.peer,
                error=str(e),
            )
            self._count(BAD_REQUEST, "", f"malformed request from {self.peer}: {e}")
            self._finish(EnrollRejected(BAD_REQUEST, str(e)))
            return
        if request is not None:
            self._finished = True  # nothing more is read
            self._cancel_timer()
            self.deciding = True
            site = _site_for_log(request.site)
            self._decide(request, site).addCallback(self._decided, site)

    def _decide(self, request: EnrollRequest, site: str) -> Deferred[EnrollReply]:
        now = datetime.fromtimestamp(self._clock.seconds(), UTC)
        decided = maybeDeferred(self._enroller.enroll, request.site, request.token, request.csr_pem, now)
        return decided.addCallbacks(self._accepted, self._refused, callbackArgs=(site,), errbackArgs=(site,))

    def _refused(self, failure: Failure, site: str) -> EnrollReply:
        if failure.check(EnrollmentRefused):
            e = failure.value
            assert isinstance(e, EnrollmentRefused)
            self._log.warn(
                # "reason", not "message": the legacy log bridge owns that key.
                "enrollment refused for site {site} from {peer}: {code}: {reason}",
                site=site,
                peer=self.peer,
                code=e.code,
                reason=e.message,
            )
            self._count(e.code, site, f"from {self.peer}: {e.code}: {e.message}")
            return EnrollRejected(e.code, e.message)
        self._log.failure("enrollment of site {site} from {peer} failed", failure, site=site, peer=self.peer)
        self._count(INTERNAL_ERROR, site, f"from {self.peer}: failed: {failure.getErrorMessage()}")
        return EnrollRejected(
            INTERNAL_ERROR,
            "the tunnel server could not complete the enrollment; see its log",
        )

    def _accepted(self, certificate_pem: str, site: str) -> EnrollReply:
        self._log.info(
            "enrolled site {site} from {peer}: certificate {fingerprint}",
            site=site,
            peer=self.peer,
            fingerprint=fingerprint(load_certificate(certificate_pem)),
        )
        self._count("ok", site, None)
        return EnrollAccepted(certificate_pem)

    def _count(self, result: str, site: str, refusal: str | None) -> None:
        """Count the outcome; a refusal (with its reason) is also kept."""
        figures = self._figures
        if figures is None:
            return
        figures.enrollment(result)
        if refusal is not None:
            # A name that breaks the naming rule is shown quoted in the log: no site of ours.
            figures.refuse(site if not site.startswith(("'", '"')) else "", "enrollment", refusal)

    def _decided(self, reply: EnrollReply, site: str) -> None:
        self.deciding = False
        if self._lost:
            self._log.info(
                "enrollment of site {site} from {peer} decided after the connection was gone; not answered",
                site=site,
                peer=self.peer,
            )
            return
        self._finish(reply)

    def _finish(self, reply: EnrollReply) -> None:
        self._finished = True
        self.reply = reply
        self._cancel_timer()
        self.transport.write(encode_reply(reply))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _timed_out(self) -> None:
        self._timer = None
        if self._finished:
            return
        self._finished = True
        self._log.info(
            "dropping enrollment connection from {peer}: no complete request within {timeout:.1f} seconds",
            peer=self.peer,
            timeout=self._timeout,
        )
        self._count("timeout", "", f"from {self.peer}: no complete request within {self._timeout:.1f} seconds")
        _drop(self.transport)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        self._finished = True
        self._lost = True


@implementer(IHandshakeListener)
class EnrollmentRequester(Protocol):
    """
    Site side of one enrollment exchange.

    C{result} fires with the certificate PEM, or fails with
    L{EnrollmentRefused} (the server said no), L{EnrollmentProtocolError}
    (the server's answer is garbage), L{EnrollmentIncomplete} (closed or
    timed out before an answer: retry with the same key), or the TLS failure
    (e.g. L{rtunnel.identity.errors.PeerVerificationFailed}: wrong server).

    The request is written from C{handshakeCompleted}, i.e. only after the
    server certificate was verified: on a transport that never completes a
    TLS handshake, nothing is sent and the exchange times out.
    """

    _log = Logger()

    def __init__(
        self,
        request: EnrollRequest,
        clock: IReactorTime,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._request = request
        self._clock = clock
        self._timeout = timeout
        self._reader = ReplyReader()
        self._timer: IDelayedCall | None = None
        self.sent = False
        self.result: Deferred[str] = Deferred()

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def handshakeCompleted(self) -> None:
        if self.result.called:
            return
        self.sent = True
        self.transport.write(encode_request(self._request))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.result.called:
            return
        try:
            reply = self._reader.receive_data(data)
        except EnrollmentProtocolError as e:
            self._settle(e)
            _drop(self.transport)
            return
        if reply is None:
            return
        if isinstance(reply, EnrollAccepted):
            self._settle(reply.certificate_pem)
        else:
            self._settle(EnrollmentRefused(reply.code, reply.message))
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.result.called:
            self._cancel_timer()
            return
        if isinstance(reason.value, (ConnectionDone, ConnectionLost)):
            self._settle(
                EnrollmentIncomplete(
                    "the connection to the tunnel server closed before it answered the enrollment request"
                )
            )
        else:
            self._settle(reason)

    def _timed_out(self) -> None:
        self._timer = None
        if self.result.called:
            return
        self._settle(
            EnrollmentIncomplete(
                f"the tunnel server did not answer the enrollment request within {self._timeout:g} seconds"
            )
        )
        _drop(self.transport)

    def _settle(self, outcome: str | BaseException | Failure) -> None:
        """Fire C{result}: with a certificate, or failed (C{errback} wraps
        an exception in a L{Failure})."""
        self._cancel_timer()
        if isinstance(outcome, str):
            self.result.callback(outcome)
        else:
            self.result.errback(outcome)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def enroll(
    endpoint: IStreamClientEndpoint,
    site: str,
    token: str,
    csr_pem: str,
    *,
    clock: IReactorTime,
    timeout: float = DEFAULT_TIMEOUT,
) -> Deferred[str]:
    """
    Enroll over C{endpoint}, which must speak TLS with the pinned CA and
    without a client certificate (C{wrapClientTLS(site_tls_options(ca,
    server_name), tcp_endpoint)}).

    @return: a Deferred firing with the site certificate PEM, or failing as
        L{EnrollmentRequester.result} does (or with the connection error).
    """
    requester = EnrollmentRequester(EnrollRequest(site, token, csr_pem), clock, timeout)
    connected: Deferred[object] = connectProtocol(endpoint, requester)

    def _connected(_: object) -> Deferred[str]:
        return requester.result

    return connected.addCallback(_connected)
