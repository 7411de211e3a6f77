"""
The enrollment exchange, sans-IO: bytes in, messages out.

On a TLS connection where the site presents no certificate, the site sends
one request and the server answers with one reply, then closes::

    message = MAGIC (b"RTEN") | length (4 bytes, big-endian) | JSON (UTF-8)

    request: {"type": "enroll", "version": 1, "site": ..., "token": ...,
              "csr": "-----BEGIN CERTIFICATE REQUEST-----..."}
    reply:   {"ok": true, "certificate": "-----BEGIN CERTIFICATE-----..."}
         or  {"ok": false, "code": "token-spent", "message": "..."}

The magic keeps the first bytes of an enrollment distinguishable from a
multiplexer session, whose HELLO frame starts with 0x00.  The length is
checked against L{MAX_MESSAGE_SIZE} as soon as its four bytes arrive, so an
unauthenticated peer can make the server buffer at most 64 KiB.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from attrs import field, frozen

from rtunnel.identity.errors import EnrollmentProtocolError
from rtunnel.logsafe import printable

__all__ = [
    "MAGIC",
    "MAX_MESSAGE_SIZE",
    "PROTOCOL_VERSION",
    "EnrollRequest",
    "EnrollAccepted",
    "EnrollRejected",
    "EnrollReply",
    "encode_request",
    "encode_reply",
    "decode_request",
    "decode_reply",
    "MessageReader",
    "RequestReader",
    "ReplyReader",
    "is_enrollment_prefix",
]

MAGIC = b"RTEN"
MAX_MESSAGE_SIZE = 64 * 1024
PROTOCOL_VERSION = 1
_HEADER = struct.Struct(">4sI")
# Bounds on individual fields, well inside the message cap; a real token is
# 43 characters and a P-256 CSR about 400.
_MAX_SHORT_FIELD = 256
_MAX_CODE = 64
_MAX_MESSAGE_TEXT = 4096

T = TypeVar("T")


@frozen
class EnrollRequest:
    """
    A site asks to be enrolled.

    @ivar site: the site name from the keyfile.
    @ivar token: the secret one-time token from the keyfile.
    @ivar csr_pem: a PEM certificate request over the site's fresh key.
    """

    site: str
    token: str = field(repr=False)
    csr_pem: str = field(repr=False)


@frozen
class EnrollAccepted:
    """
    The server enrolled the site and issued C{certificate_pem}.
    """

    certificate_pem: str


@frozen
class EnrollRejected:
    """
    The server refused to enroll the site; C{code} is one of the codes in
    L{rtunnel.identity.errors}.
    """

    code: str
    message: str


EnrollReply = EnrollAccepted | EnrollRejected


def is_enrollment_prefix(data: bytes) -> bool:
    """
    Tell whether C{data}, the first bytes received on a connection, can be
    the start of an enrollment message (C{False} as soon as one byte differs
    from L{MAGIC}; C{True} for a prefix of it, including empty data).
    """
    n = min(len(data), len(MAGIC))
    return data[:n] == MAGIC[:n]


def _frame(document: dict[str, Any]) -> bytes:
    body = json.dumps(document, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_MESSAGE_SIZE:
        raise ValueError(f"enrollment message of {len(body)} bytes is too large")
    return _HEADER.pack(MAGIC, len(body)) + body


def encode_request(request: EnrollRequest) -> bytes:
    """
    Encode a request, magic and length prefix included.

    @raise ValueError: if it would exceed L{MAX_MESSAGE_SIZE}.
    """
    return _frame(
        {
            "type": "enroll",
            "version": PROTOCOL_VERSION,
            "site": request.site,
            "token": request.token,
            "csr": request.csr_pem,
        }
    )


def encode_reply(reply: EnrollReply) -> bytes:
    """
    Encode a reply, magic and length prefix included.
    """
    if isinstance(reply, EnrollAccepted):
        return _frame({"ok": True, "certificate": reply.certificate_pem})
    return _frame({"ok": False, "code": reply.code, "message": reply.message})


def _document(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise EnrollmentProtocolError("enrollment message is not UTF-8 text") from None
    try:
        document = json.loads(text)
    except ValueError:
        raise EnrollmentProtocolError("enrollment message is not valid JSON") from None
    if not isinstance(document, dict):
        raise EnrollmentProtocolError("enrollment message is not a JSON object")
    return document


def _string(document: dict[str, Any], name: str, limit: int) -> str:
    if name not in document:
        raise EnrollmentProtocolError(f"enrollment message has no {name!r} field")
    value = document[name]
    if not isinstance(value, str):
        raise EnrollmentProtocolError(f"enrollment field {name!r} must be a string")
    if len(value) > limit:
        raise EnrollmentProtocolError(f"enrollment field {name!r} is longer than {limit} characters")
    return value


def decode_request(body: bytes) -> EnrollRequest:
    """
    Decode the JSON body of a request (without magic and length).

    Field I{content} (a valid site name, a well-formed CSR) is for the
    server to judge; this only checks the message shape.

    @raise EnrollmentProtocolError: if the body is not a version 1 request.
    """
    document = _document(body)
    kind = document.get("type")
    if kind != "enroll":
        raise EnrollmentProtocolError(f"enrollment message has type {_show(kind)}, expected 'enroll'")
    version = document.get("version")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise EnrollmentProtocolError(
            f"enrollment protocol version {_show(version)} is not supported "
            f"(this server speaks version {PROTOCOL_VERSION})"
        )
    return EnrollRequest(
        site=_string(document, "site", _MAX_SHORT_FIELD),
        token=_string(document, "token", _MAX_SHORT_FIELD),
        csr_pem=_string(document, "csr", MAX_MESSAGE_SIZE),
    )


def decode_reply(body: bytes) -> EnrollReply:
    """
    Decode the JSON body of a reply (without magic and length).

    @raise EnrollmentProtocolError: if the body is not a valid reply.
    """
    document = _document(body)
    ok = document.get("ok")
    if ok is True:
        return EnrollAccepted(_string(document, "certificate", MAX_MESSAGE_SIZE))
    if ok is False:
        # Text for humans, shown in the site's log and on its stderr: escaped,
        # so that a control or bidi character cannot forge or hide a line.
        return EnrollRejected(
            printable(_string(document, "code", _MAX_CODE), _MAX_CODE),
            printable(_string(document, "message", _MAX_MESSAGE_TEXT), _MAX_MESSAGE_TEXT),
        )
    raise EnrollmentProtocolError("enrollment reply has no boolean 'ok' field")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class MessageReader(Generic[T]):
    """
    Reassemble exactly one enrollment message from arbitrarily split bytes.

    Feed bytes with L{receive_data}; it returns the decoded message once
    complete, C{None} while more bytes are needed, and raises
    L{EnrollmentProtocolError} as soon as the bytes cannot be a valid
    message: wrong magic (checked byte by byte), a length of zero or over
    the cap (checked on the prefix, before buffering the body), a malformed
    body, or any byte after the message.
    """

    def __init__(self, parse: Callable[[bytes], T], max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._parse = parse
        self._max_size = max_size
        self._buffer = bytearray()
        self._length: int | None = None
        self._done = False

    @property
    def done(self) -> bool:
        """
        Whether the message has been received.
        """
        return self._done

    def receive_data(self, data: bytes) -> T | None:
        """
        Add bytes; return the message when it is complete.

        @raise EnrollmentProtocolError: if the bytes are not (or are more
            than) one valid message.
        """
        if self._done:
            if data:
                raise EnrollmentProtocolError("unexpected data after the enrollment message")
            return None
        self._buffer += data
        if self._length is None:
            head = bytes(self._buffer[: _HEADER.size])
            if not is_enrollment_prefix(head):
                raise EnrollmentProtocolError(f"not an enrollment message (starts with {head[:4]!r})")
            if len(self._buffer) < _HEADER.size:
                return None
            _, length = _HEADER.unpack(head)
            if length == 0:
                raise EnrollmentProtocolError("enrollment message is empty")
            if length > self._max_size:
                raise EnrollmentProtocolError(
                    f"enrollment message of {length} bytes exceeds the {self._max_size}-byte limit"
                )
            self._length = length
            del self._buffer[: _HEADER.size]
        if len(self._buffer) < self._length:
            return None
        if len(self._buffer) > self._length:
            raise EnrollmentProtocolError("unexpected data after the enrollment message")
        body = bytes(self._buffer)
        self._buffer.clear()
        self._done = True
        return self._parse(body)


class RequestReader(MessageReader[EnrollRequest]):
    """
    Server side: reads the site's request.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        super().__init__(decode_request, max_size)


class ReplyReader(MessageReader[EnrollReply]):
    """
    Site side: reads the server's reply.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        super().__init__(decode_reply, max_size)
