"""
The HTTP CONNECT side of the front door, sans-IO: bytes in, bytes out, one
step at a time (L{rtunnel.frontdoor.steps}).

Served: C{CONNECT HOST:PORT HTTP/1.1} (or HTTP/1.0) as RFC 9110 section
9.3.6 defines it, with optional C{Proxy-Authorization: Basic} credentials
(RFC 7617) checked against the same user store as SOCKS5. The answer is
C{HTTP/1.1 200 Connection Established} once the stream is open, and the
connection is the tunnel from then on; bytes the client sent after the
header block (optimistically, before the answer) are kept for the stream,
up to C{max_early_data}, and dropped if the request is refused.

Refusals are complete HTTP responses with the status of
L{rtunnel.frontdoor.refusals.TABLE} (400 malformed, 405 with C{Allow:
CONNECT} for other methods, 407 with C{Proxy-Authenticate: Basic
realm="rtunnel"}, 403, 404, 502, 503, 504, ...), a one-line body that quotes
nothing the client sent, and C{Connection: close}.

Strict where being lenient would be unsafe, lenient where it costs nothing:

 - the header block is bounded (C{max_header_bytes}, 8 KiB, and
   C{max_headers} fields) and must end within the bound: 431 otherwise;
 - a first line holding bytes no request line can hold (a SOCKS or TLS
   client on this port) is refused at once with 400, without waiting for a
   line end that may never come;
 - a bare CR, a control character in a field, obsolete line folding,
   whitespace before the colon (RFC 9112 section 5.1), a CONNECT with
   content (C{Content-Length} other than 0, C{Transfer-Encoding}) are 400:
   the bytes after the header block are the tunnel, and anything that could
   make two parsers disagree on where it starts is refused;
 - bare LF line ends and empty lines before the request line are accepted
   (RFC 9112 sections 2.2 and 2.2's "SHOULD ignore"); a missing C{Host}
   field is not an error: the request target alone routes.

Phases: HEADERS -> (CHECKING ->) REQUESTED -> ACCEPTED, or REFUSED from any
phase but ACCEPTED.
"""

from __future__ import annotations

import binascii
import enum
import re

from ..address import AddressError, parse_port
from ..logsafe import printable
from .names import requested_name
from .refusals import HTTP_REASONS, TABLE, Refusal, RefusalKind
from .steps import DEFAULT_MAX_EARLY_DATA, NEED_DATA, CheckCredentials, Refused, Request, Step

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_HEADERS",
    "ESTABLISHED",
    "REALM",
    "HttpConnectHandshake",
    "Phase",
    "http_response",
]

DEFAULT_MAX_HEADER_BYTES = 8 * 1024
DEFAULT_MAX_HEADERS = 64
REALM = "rtunnel"
ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(.*?)[ \t]*")
_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: Bytes a request line may hold (visible ASCII, space, and CR before LF).
_LINE_BAD = re.compile(rb"[^\x21-\x7e \r]")
_IPV6_AUTHORITY = re.compile(rb"\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9._-]+)?\]:[0-9]+")
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")


def http_response(status: int, *, extra: tuple[tuple[str, str], ...] = (), body: str = "") -> bytes:
    """
    A complete response that ends the exchange: status line, C{extra}
    fields, a plain-text body and C{Connection: close}.
    """
    phrase = HTTP_REASONS.get(status, "Error")
    content = body.encode("utf-8")
    lines = [f"HTTP/1.1 {status} {phrase}"]
    lines += [f"{name}: {value}" for name, value in extra]
    lines += [
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(content)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + content


def refusal_response(refusal: Refusal) -> bytes:
    """The HTTP response for C{refusal}, by the table."""
    status = TABLE[refusal.kind].http
    extra: tuple[tuple[str, str], ...] = ()
    if status == 405:
        extra = (("Allow", "CONNECT"),)
    elif status == 407:
        extra = (("Proxy-Authenticate", f'Basic realm="{REALM}"'),)
    return http_response(status, extra=extra, body=f"{status} {HTTP_REASONS[status]}: {refusal.what}\n")


class Phase(enum.Enum):
    HEADERS = "headers"
    CHECKING = "checking"
    REQUESTED = "requested"
    ACCEPTED = "accepted"
    REFUSED = "refused"


class HttpConnectHandshake:
    """
    One client's HTTP CONNECT request.

    @param require_auth: C{Proxy-Authorization: Basic} is required (and
        checked through a L{CheckCredentials} step); without it, the field
        is ignored.
    """

    def __init__(
        self,
        *,
        require_auth: bool,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_early_data: int = DEFAULT_MAX_EARLY_DATA,
    ) -> None:
        self.require_auth = require_auth
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_early_data = max_early_data
        self.phase = Phase.HEADERS
        self._in = bytearray()
        self._out = bytearray()
        #: the request line is complete (its first LF arrived)
        self._line_seen = False
        #: how much of the request line was checked for stray bytes
        self._line_checked = 0
        #: where the search for the end of the header block resumes
        self._scanned = 0
        self._step: Step = NEED_DATA
        self._request: Request | None = None

    # -- input -------------------------------------------------------------

    def receive(self, data: bytes) -> Step:
        """
        Take bytes from the client (any chunking) and say what comes next.
        Never raises for anything the client sends. Each step but
        L{NEED_DATA} is reported once (a L{Refused} step again on every
        later call).
        """
        phase = self.phase
        if phase is Phase.ACCEPTED:
            raise RuntimeError("the handshake is over: bytes now belong to the stream")
        if phase is Phase.REFUSED:
            return self._step
        self._in += data
        if phase is not Phase.HEADERS:
            if len(self._in) > self.max_early_data:
                return self.refuse(self._too_much())
            return NEED_DATA
        return self._headers()

    def credentials_checked(self, ok: bool) -> Step:
        """The outcome of the L{CheckCredentials} step."""
        if self.phase is not Phase.CHECKING:
            raise RuntimeError(f"no credentials are being checked (phase {self.phase.value})")
        request = self._request
        assert request is not None
        if not ok:
            return self.refuse(
                Refusal(
                    RefusalKind.BAD_CREDENTIALS, f"user '{printable(request.user)}': unknown user or wrong password"
                )
            )
        self.phase = Phase.REQUESTED
        self._step = request
        return request

    def _headers(self) -> Step:
        buf = self._in
        if not self._line_seen:
            start = 0
            # Empty lines before the request line are ignored (RFC 9112 2.2).
            while buf.startswith(b"\r\n", start) or buf.startswith(b"\n", start):
                start += 2 if buf[start] == 0x0D else 1
            if start:
                del buf[:start]
                self._line_checked = 0
            first_end = buf.find(b"\n", self._line_checked)
            stop = first_end if first_end >= 0 else len(buf)
            # Checked as it arrives: a client speaking another protocol is
            # refused at once, not after the header bound or the timeout.
            bad = _LINE_BAD.search(buf, self._line_checked, stop)
            if bad is not None:
                return self.refuse(
                    Refusal(RefusalKind.MALFORMED, f"byte 0x{buf[bad.start()]:02x} in the request line: not HTTP")
                )
            if first_end < 0:
                self._line_checked = len(buf)
                if len(buf) > self.max_header_bytes:
                    return self.refuse(
                        Refusal(RefusalKind.HEADERS_TOO_LARGE, f"a request line over {self.max_header_bytes} bytes")
                    )
                return NEED_DATA
            self._line_seen = True
        end = self._block_end()
        if end < 0:
            if len(buf) > self.max_header_bytes:
                return self.refuse(
                    Refusal(
                        RefusalKind.HEADERS_TOO_LARGE, f"no end of the header block in {self.max_header_bytes} bytes"
                    )
                )
            return NEED_DATA
        if end > self.max_header_bytes:
            return self.refuse(
                Refusal(
                    RefusalKind.HEADERS_TOO_LARGE, f"a header block of {end} bytes (at most {self.max_header_bytes})"
                )
            )
        block = bytes(buf[:end])
        del buf[:end]
        step = self._parse(block)
        if isinstance(step, Refused) or self.phase is Phase.CHECKING:
            return step
        self.phase = Phase.REQUESTED
        self._step = step
        return step

    def _block_end(self) -> int:
        """Where the header block ends (just past its empty line), or -1."""
        buf = self._in
        position = max(self._scanned - 2, 0)
        while True:
            newline = buf.find(b"\n", position)
            if newline < 0:
                self._scanned = max(len(buf), 1)
                return -1
            if buf.startswith(b"\n", newline + 1):
                return newline + 2
            if buf.startswith(b"\r\n", newline + 1):
                return newline + 3
            position = newline + 1

    def _parse(self, block: bytes) -> Step:
        lines = block.split(b"\n")[:-2]  # the block ends with an empty line
        for index, line in enumerate(lines):
            if line.endswith(b"\r"):
                line = lines[index] = line[:-1]
            if b"\r" in line:
                return self.refuse(Refusal(RefusalKind.MALFORMED, "a bare CR inside a line"))
        request_line = _REQUEST_LINE.fullmatch(lines[0])
        if request_line is None:
            return self.refuse(
                Refusal(RefusalKind.MALFORMED, f"request line '{printable(lines[0].decode('latin-1'))}'")
            )
        method, target, version = request_line.groups()
        if version not in _VERSIONS:
            return self.refuse(Refusal(RefusalKind.MALFORMED, f"version {version.decode()}; HTTP/1.1 or 1.0 expected"))
        if method != b"CONNECT":
            return self.refuse(
                Refusal(
                    RefusalKind.COMMAND_NOT_SUPPORTED, f"method {printable(method.decode())}; only CONNECT is served"
                )
            )
        fields = lines[1:]
        if len(fields) > self.max_headers:
            return self.refuse(
                Refusal(RefusalKind.HEADERS_TOO_LARGE, f"{len(fields)} header fields (at most {self.max_headers})")
            )
        authorization: list[bytes] = []
        for line in fields:
            if line[:1] in (b" ", b"\t"):
                return self.refuse(Refusal(RefusalKind.MALFORMED, "obsolete line folding in the header block"))
            field = _FIELD.fullmatch(line)
            if field is None:
                return self.refuse(
                    Refusal(RefusalKind.MALFORMED, f"header line '{printable(line.decode('latin-1'), 64)}'")
                )
            name, value = field.group(1).lower(), field.group(2)
            if _FIELD_VALUE_BAD.search(value):
                return self.refuse(Refusal(RefusalKind.MALFORMED, f"control character in field {name.decode()}"))
            if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                return self.refuse(
                    Refusal(RefusalKind.MALFORMED, f"a CONNECT request has no content ({name.decode()})")
                )
            if name == b"proxy-authorization":
                authorization.append(value)
        target_step = self._target(target)
        if isinstance(target_step, Refused):
            return target_step
        name_text, port = target_step
        if len(self._in) > self.max_early_data:
            return self.refuse(self._too_much())
        if not self.require_auth:
            return Request(name_text, port)
        credentials = self._credentials(authorization)
        if isinstance(credentials, Refused):
            return credentials
        user, password = credentials
        self._request = Request(name_text, port, user)
        self.phase = Phase.CHECKING
        step = CheckCredentials(user, password)
        self._step = step
        return step

    def _target(self, target: bytes) -> tuple[str, int] | Refused:
        if target.startswith(b"["):
            if _IPV6_AUTHORITY.fullmatch(target):
                return self.refuse(
                    Refusal(RefusalKind.ADDRESS_TYPE, f"{target.decode()} is an IPv6 address; names are required")
                )
            return self.refuse(Refusal(RefusalKind.MALFORMED, f"request target '{printable(target.decode())}'"))
        if any(c in target for c in b"/@?#"):
            return self.refuse(
                Refusal(
                    RefusalKind.MALFORMED, f"request target '{printable(target.decode())}' is not HOST:PORT (RFC 9110)"
                )
            )
        host, colon, port_text = target.rpartition(b":")
        if not colon:
            return self.refuse(
                Refusal(RefusalKind.MALFORMED, f"request target '{printable(target.decode())}' has no port")
            )
        try:
            port = parse_port(port_text.decode("ascii"))
        except AddressError as e:
            return self.refuse(Refusal(RefusalKind.MALFORMED, printable(str(e))))
        name = requested_name(host)
        if isinstance(name, Refusal):
            return self.refuse(name)
        return name, port

    def _credentials(self, values: list[bytes]) -> tuple[str, bytes] | Refused:
        if not values:
            return self.refuse(Refusal(RefusalKind.AUTH_REQUIRED, "no Proxy-Authorization"))
        if len(values) > 1:
            return self.refuse(Refusal(RefusalKind.BAD_CREDENTIALS, "more than one Proxy-Authorization"))
        scheme, _, token = values[0].partition(b" ")
        if scheme.lower() != b"basic":
            return self.refuse(
                Refusal(RefusalKind.AUTH_REQUIRED, f"scheme '{printable(scheme.decode('latin-1'), 32)}', not Basic")
            )
        try:
            decoded = binascii.a2b_base64(token.strip(b" \t"), strict_mode=True)
        except binascii.Error:
            return self.refuse(Refusal(RefusalKind.BAD_CREDENTIALS, "Basic credentials that are not base64"))
        raw_user, colon, password = decoded.partition(b":")
        if not colon:
            return self.refuse(Refusal(RefusalKind.BAD_CREDENTIALS, "Basic credentials without ':'"))
        try:
            user = raw_user.decode("utf-8")
        except UnicodeDecodeError:
            return self.refuse(Refusal(RefusalKind.BAD_CREDENTIALS, f"user name {printable(raw_user)} is not UTF-8"))
        if not user or not password:
            return self.refuse(
                Refusal(RefusalKind.BAD_CREDENTIALS, f"user '{printable(user)}': empty user or password")
            )
        return user, password

    def _too_much(self) -> Refusal:
        return Refusal(
            RefusalKind.MALFORMED, f"more than {self.max_early_data} bytes sent before the answer to the request"
        )

    # -- decisions -----------------------------------------------------------

    def accept(self) -> None:
        """The stream is open: queue C{200 Connection Established}."""
        if self.phase is not Phase.REQUESTED:
            raise RuntimeError(f"no request to accept (phase {self.phase.value})")
        self._out += ESTABLISHED
        self.phase = Phase.ACCEPTED

    def refuse(self, refusal: Refusal) -> Refused:
        """Refuse: queue the response for C{refusal}, drop every byte kept, and stay refused."""
        if self.phase is Phase.ACCEPTED:
            raise RuntimeError("the request was accepted already")
        if self.phase is Phase.REFUSED:
            assert isinstance(self._step, Refused)
            return self._step
        self._out += refusal_response(refusal)
        self.phase = Phase.REFUSED
        self._in.clear()
        step = Refused(refusal)
        self._step = step
        return step

    # -- output ------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """What to write to the client now."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def take_early_data(self) -> bytes:
        """The bytes that came after the header block (once accepted: they go to the stream)."""
        if self.phase is not Phase.ACCEPTED:
            raise RuntimeError("early data belongs to the stream only once the request is accepted")
        data = bytes(self._in)
        self._in.clear()
        return data
