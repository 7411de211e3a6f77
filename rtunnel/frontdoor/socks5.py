"""
The SOCKS5 side of the front door, sans-IO: bytes in, bytes out, one step at
a time (L{rtunnel.frontdoor.steps}).

Served: RFC 1928 with the CONNECT command and the domain-name address type
(C{curl --socks5-hostname}, C{socks5h://}), authentication "none" or
username/password (RFC 1929). Everything else is refused with the reply the
RFCs give for it, and the connection is closed:

 - a first byte that is not version 5 (SOCKS4, HTTP, TLS...): closed with no
   reply, since no reply of ours would mean anything to that client;
 - no acceptable method: method C{0xFF}, whether the client offered no
   method we take or we require a password it did not offer to send;
 - bad credentials: RFC 1929 status C{0x01}, then closed, as the RFC says;
 - BIND and UDP ASSOCIATE: C{0x07}; an IPv4 or IPv6 address: C{0x08},
   because the front door routes names (C{SERVICE.SITE.D}), and an address
   says nothing about which site is meant;
 - a bad name, a malformed request, and every routing or opening failure:
   the code of L{rtunnel.frontdoor.refusals.TABLE}.

Bounds: the greeting, the authentication and the request are at most 257,
513 and 262 bytes by their formats; bytes that arrive after the request and
before the reply (a client that writes optimistically) are kept, up to
C{max_early_data}, for the stream once it is open, and dropped if the
request is refused. While a password is being checked, bytes are kept up to
the same bound.

Phases (the C{phase} attribute)::

    GREETING --methods--> AUTH --user/password--> CHECKING --ok--> REQUEST
        |  \\___________"none" selected__________________________/    |
        |                                                            v
        +--> REFUSED <-- any phase, on a refusal <-------------- REQUESTED
                                                                     |
                                                        accept() --> ACCEPTED
"""

from __future__ import annotations

import enum
import ipaddress
import struct

from ..logsafe import printable
from .names import requested_name
from .refusals import TABLE, Refusal, RefusalKind, SocksReply
from .steps import DEFAULT_MAX_EARLY_DATA, NEED_DATA, CheckCredentials, Refused, Request, Step

__all__ = ["Phase", "Socks5Handshake", "socks_reply"]

VERSION = 0x05
AUTH_VERSION = 0x01
METHOD_NONE = 0x00
METHOD_PASSWORD = 0x02
NO_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_NAME = 0x03
ATYP_IPV6 = 0x04

_COMMANDS = {0x02: "BIND", 0x03: "UDP ASSOCIATE"}
_PORT = struct.Struct(">H")
#: What can wait unparsed while a password is checked: the request that may
#: follow (262 bytes at most) and the early data allowed after it.
_MAX_REQUEST = 262


def socks_reply(code: int) -> bytes:
    """
    A SOCKS5 reply with REP C{code} and BND.ADDR C{0.0.0.0:0}.

    Why 0.0.0.0:0: BND is the address the proxy's own connection to the
    target is bound to. Here that connection is made by the site, behind
    the tunnel: its address is meaningless to the client, and sending it
    would tell every client the site's internal addressing. CONNECT clients
    ignore BND (RFC 1928 uses it for BIND); the zero address is the usual
    "nothing to say", and it keeps the reply the same 10 bytes every time.
    """
    return bytes((VERSION, code, 0x00, ATYP_IPV4, 0, 0, 0, 0, 0, 0))


class Phase(enum.Enum):
    GREETING = "greeting"
    AUTH = "auth"
    CHECKING = "checking"
    REQUEST = "request"
    REQUESTED = "requested"
    ACCEPTED = "accepted"
    REFUSED = "refused"


class Socks5Handshake:
    """
    One client's SOCKS5 handshake.

    @param require_auth: only username/password (method 2) is accepted;
        otherwise only "no authentication" (method 0) is, so that a client
        never believes it authenticated where nothing was checked.
    @param max_early_data: most bytes kept between the request and the
        reply (see L{DEFAULT_MAX_EARLY_DATA}).
    """

    def __init__(self, *, require_auth: bool, max_early_data: int = DEFAULT_MAX_EARLY_DATA) -> None:
        self.require_auth = require_auth
        self.max_early_data = max_early_data
        self.phase = Phase.GREETING
        self.user: str | None = None
        self._in = bytearray()
        self._out = bytearray()
        self._step: Step = NEED_DATA
        self._handlers = {
            Phase.GREETING: self._greeting,
            Phase.AUTH: self._auth,
            Phase.REQUEST: self._request,
        }

    # -- input -------------------------------------------------------------

    def receive(self, data: bytes) -> Step:
        """
        Take bytes from the client (any chunking) and say what comes next.
        Never raises for anything the client sends. Each step but
        L{NEED_DATA} is reported once (a L{Refused} step again on every
        later call): bytes that arrive while a password is checked or after
        the request give L{NEED_DATA}, or L{Refused} past the bound.
        """
        phase = self.phase
        if phase is Phase.ACCEPTED:
            raise RuntimeError("the handshake is over: bytes now belong to the stream")
        if phase is Phase.REFUSED:
            return self._step
        self._in += data
        if phase is Phase.REQUESTED:
            if len(self._in) > self.max_early_data:
                return self.refuse(self._too_much())
            return NEED_DATA
        if phase is Phase.CHECKING:
            if len(self._in) > _MAX_REQUEST + self.max_early_data:
                return self.refuse(self._too_much())
            return NEED_DATA
        return self._advance()

    def credentials_checked(self, ok: bool) -> Step:
        """
        The outcome of the L{CheckCredentials} step: answer the client
        (RFC 1929 status) and go on with what it sent meanwhile.
        """
        if self.phase is not Phase.CHECKING:
            raise RuntimeError(f"no credentials are being checked (phase {self.phase.value})")
        if not ok:
            return self.refuse(
                Refusal(RefusalKind.BAD_CREDENTIALS, f"user '{printable(self.user)}': unknown user or wrong password")
            )
        self._out += bytes((AUTH_VERSION, 0x00))
        self.phase = Phase.REQUEST
        return self._advance()

    def _advance(self) -> Step:
        while True:
            handler = self._handlers.get(self.phase)
            if handler is None:
                return self._step
            before = self.phase
            step = handler()
            if step is not NEED_DATA or self.phase is before:
                self._step = step
                return step

    def _greeting(self) -> Step:
        buf = self._in
        if not buf:
            return NEED_DATA
        if buf[0] != VERSION:
            return self.refuse(Refusal(RefusalKind.MALFORMED, f"first byte 0x{buf[0]:02x}: not a SOCKS5 client"))
        if len(buf) < 2:
            return NEED_DATA
        count = buf[1]
        if len(buf) < 2 + count:
            return NEED_DATA
        methods = set(buf[2 : 2 + count])
        del buf[: 2 + count]
        wanted = METHOD_PASSWORD if self.require_auth else METHOD_NONE
        if wanted not in methods:
            offered = ", ".join(f"0x{m:02x}" for m in sorted(methods)) or "none"
            if self.require_auth:
                return self.refuse(
                    Refusal(RefusalKind.AUTH_REQUIRED, f"username/password is required; the client offers {offered}")
                )
            return self.refuse(
                Refusal(RefusalKind.NO_ACCEPTABLE_METHOD, f"the client offers {offered}, not 0x00 (no authentication)")
            )
        self._out += bytes((VERSION, wanted))
        self.phase = Phase.AUTH if self.require_auth else Phase.REQUEST
        return NEED_DATA

    def _auth(self) -> Step:
        buf = self._in
        if not buf:
            return NEED_DATA
        if buf[0] != AUTH_VERSION:
            return self.refuse(
                Refusal(RefusalKind.MALFORMED, f"username/password version 0x{buf[0]:02x}, not 0x01 (RFC 1929)")
            )
        if len(buf) < 2:
            return NEED_DATA
        user_len = buf[1]
        if user_len == 0:
            return self.refuse(Refusal(RefusalKind.MALFORMED, "empty user name (RFC 1929 wants 1 to 255 bytes)"))
        if len(buf) < 3 + user_len:
            return NEED_DATA
        password_len = buf[2 + user_len]
        end = 3 + user_len + password_len
        if len(buf) < end:
            return NEED_DATA
        raw_user = bytes(buf[2 : 2 + user_len])
        password = bytes(buf[3 + user_len : end])
        del buf[:end]
        try:
            self.user = raw_user.decode("utf-8")
        except UnicodeDecodeError:
            return self.refuse(Refusal(RefusalKind.BAD_CREDENTIALS, f"user name {printable(raw_user)} is not UTF-8"))
        if not password:
            return self.refuse(Refusal(RefusalKind.BAD_CREDENTIALS, f"user '{printable(self.user)}': empty password"))
        self.phase = Phase.CHECKING
        return CheckCredentials(self.user, password)

    def _request(self) -> Step:
        buf = self._in
        if not buf:
            return NEED_DATA
        if buf[0] != VERSION:
            return self.refuse(Refusal(RefusalKind.MALFORMED, f"request version 0x{buf[0]:02x}, not 0x05"))
        if len(buf) < 2:
            return NEED_DATA
        command = buf[1]
        if command != CMD_CONNECT:
            what = _COMMANDS.get(command, "unknown")
            return self.refuse(
                Refusal(RefusalKind.COMMAND_NOT_SUPPORTED, f"command 0x{command:02x} ({what}); only CONNECT is served")
            )
        if len(buf) < 4:
            return NEED_DATA
        if buf[2] != 0x00:
            return self.refuse(Refusal(RefusalKind.MALFORMED, f"reserved byte 0x{buf[2]:02x}, not 0x00"))
        address_type = buf[3]
        if address_type in (ATYP_IPV4, ATYP_IPV6):
            size = 4 if address_type == ATYP_IPV4 else 16
            if len(buf) < 4 + size + 2:
                return NEED_DATA
            address = ipaddress.ip_address(bytes(buf[4 : 4 + size]))
            (port,) = _PORT.unpack_from(buf, 4 + size)
            shown = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
            return self.refuse(
                Refusal(RefusalKind.ADDRESS_TYPE, f"{shown} is an IPv{address.version} address; names are required")
            )
        if address_type != ATYP_NAME:
            return self.refuse(Refusal(RefusalKind.ADDRESS_TYPE, f"unknown address type 0x{address_type:02x}"))
        if len(buf) < 5:
            return NEED_DATA
        name_len = buf[4]
        end = 5 + name_len + 2
        if len(buf) < end:
            return NEED_DATA
        raw_name = bytes(buf[5 : 5 + name_len])
        (port,) = _PORT.unpack_from(buf, 5 + name_len)
        del buf[:end]
        name = requested_name(raw_name)
        if isinstance(name, Refusal):
            return self.refuse(name)
        if port == 0:
            return self.refuse(Refusal(RefusalKind.MALFORMED, f"{name}: port 0"))
        self.phase = Phase.REQUESTED
        if len(buf) > self.max_early_data:
            return self.refuse(self._too_much())
        return Request(name, port, self.user)

    def _too_much(self) -> Refusal:
        return Refusal(
            RefusalKind.MALFORMED, f"more than {self.max_early_data} bytes sent before the reply to the request"
        )

    # -- decisions -----------------------------------------------------------

    def accept(self) -> None:
        """The stream is open: queue the success reply."""
        if self.phase is not Phase.REQUESTED:
            raise RuntimeError(f"no request to accept (phase {self.phase.value})")
        self._out += socks_reply(SocksReply.SUCCEEDED)
        self.phase = Phase.ACCEPTED

    def refuse(self, refusal: Refusal) -> Refused:
        """
        Refuse: queue the reply this phase allows (see the module
        docstring), drop every byte kept, and stay refused.
        """
        phase = self.phase
        if phase is Phase.ACCEPTED:
            raise RuntimeError("the request was accepted already")
        if phase is Phase.REFUSED:
            assert isinstance(self._step, Refused)
            return self._step
        if phase is Phase.GREETING:
            if refusal.kind in (RefusalKind.AUTH_REQUIRED, RefusalKind.NO_ACCEPTABLE_METHOD):
                self._out += bytes((VERSION, NO_ACCEPTABLE))
        elif phase in (Phase.AUTH, Phase.CHECKING):
            self._out += bytes((AUTH_VERSION, 0x01))
        else:
            code = TABLE[refusal.kind].socks
            if code is not None:
                self._out += socks_reply(code)
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
        """The bytes that came after the request (once accepted: they go to the stream)."""
        if self.phase is not Phase.ACCEPTED:
            raise RuntimeError("early data belongs to the stream only once the request is accepted")
        data = bytes(self._in)
        self._in.clear()
        return data
