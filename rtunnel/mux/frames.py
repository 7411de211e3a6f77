"""
Frame values, their encoding, and an incremental decoder (docs/protocol.md).

The decoder checks everything that can be checked from the bytes alone: the
header, the announced size against our limit (before any payload is buffered),
the payload layout of each type and the flag bits. Rules that need session
state (stream ids, states, windows) live in L{rtunnel.mux.session}.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Iterable
from typing import ClassVar

from attrs import field, frozen

from ..address import MAX_WIRE_HOST_BYTES, AddressError, HostPort, wire_chars_error
from ..logsafe import printable
from .errors import ErrorCode, ProtocolError

HEADER = struct.Struct(">BBII")
HEADER_SIZE = HEADER.size  # 10

HELLO_MAGIC = b"RTMX"
_HELLO = struct.Struct(">4sHHIII")
_OPEN_HEAD = struct.Struct(">HB")
_CODE = struct.Struct(">H")
_U32 = struct.Struct(">I")
_GOAWAY_HEAD = struct.Struct(">IH")

MAX_STREAM_ID = 2**31 - 1
MAX_WINDOW = 2**31 - 1
MAX_REASON_BYTES = 1024
#: The longest host an OPEN frame carries (its one-byte length).
MAX_HOST_BYTES = MAX_WIRE_HOST_BYTES
PING_SIZE = 8
#: Most named services one SERVICES frame (one session) announces.
MAX_SERVICES = 64
#: Most bytes of a SERVICES payload: the smallest max_frame_size a peer may
#: announce, so an announcement fits every peer's frame limit.
MAX_SERVICES_BYTES = 16 * 1024
MAX_SERVICE_NAME_BYTES = 63
#: A service name on the wire: one DNS label in lower case (the same rule as
#: rtunnel.frontdoor.names.validate_service_name, which the mux layer cannot
#: import; tests/test_services_mux.py checks that the two agree).
_SERVICE_NAME = re.compile(rb"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
#: Most replicas one REPLICAS frame lists (the own one included).
MAX_REPLICAS = 64
#: Most bytes of a REPLICAS payload: as for SERVICES, the smallest
#: max_frame_size a peer may announce.
MAX_REPLICAS_BYTES = 16 * 1024
MAX_REPLICA_ID_LENGTH = 64
#: The longest advertised address (its one-byte length on the wire).
MAX_ADVERTISE_BYTES = 255
#: The characters of a replica id: enough for C{host:port}, C{[::1]:7000},
#: C{name@host} and C{host:port/w2} (the workers' ids), nothing that needs
#: quoting in a log line, a metric label or a shell.
_REPLICA_ID_CHARS = r"A-Za-z0-9._:@/+\[\]-"
_REPLICA_ID = re.compile(f"[{_REPLICA_ID_CHARS}]{{1,{MAX_REPLICA_ID_LENGTH}}}")
_NOT_REPLICA_ID_CHAR = re.compile(f"[^{_REPLICA_ID_CHARS}]")

#: The largest frame accepted before the peer's HELLO told us anything.
PRE_HELLO_MAX_LENGTH = 1024

FLAG_FIN = 0x01
FLAG_ACK = 0x01


class FrameType(enum.IntEnum):
    HELLO = 0x00
    OPEN = 0x01
    OPEN_OK = 0x02
    OPEN_FAIL = 0x03
    DATA = 0x04
    WINDOW_UPDATE = 0x05
    RESET = 0x06
    PING = 0x07
    GOAWAY = 0x08
    SERVICES = 0x09
    REPLICAS = 0x0A


_ALLOWED_FLAGS = {
    FrameType.DATA: FLAG_FIN,
    FrameType.PING: FLAG_ACK,
}

_SESSION_TYPES = frozenset({FrameType.HELLO, FrameType.PING, FrameType.GOAWAY, FrameType.SERVICES, FrameType.REPLICAS})
# Plain lookups: calling an Enum class to convert a value is slow on the data path.
_FRAME_TYPES = {int(t): t for t in FrameType}
_DATA = int(FrameType.DATA)


@frozen
class Hello:
    version: int
    max_frame_size: int
    initial_window: int
    max_streams: int
    #: capability bits (the u16 after the version; older ends send 0)
    capabilities: int = 0
    stream_id: int = 0


@frozen
class Services:
    """
    The sender's named services: C{(name, host, port)} in the order sent.
    The decoder checks the layout, the count, the name rule and the host's
    bytes; the session checks the host grammar and duplicate names.
    """

    entries: tuple[tuple[str, str, int], ...]
    stream_id: int = 0


@frozen
class Open:
    stream_id: int
    host: str
    port: int


@frozen
class OpenOk:
    stream_id: int


@frozen
class OpenFail:
    stream_id: int
    code: int
    reason: str


@frozen
class Data:
    stream_id: int
    data: bytes
    fin: bool = False


@frozen
class WindowUpdate:
    stream_id: int
    increment: int


@frozen
class Reset:
    stream_id: int
    code: int
    reason: str


@frozen
class Ping:
    opaque: bytes
    ack: bool = False
    stream_id: int = 0


@frozen
class GoAway:
    last_stream_id: int
    code: int
    reason: str
    stream_id: int = 0


def replica_id_problem(text: str) -> str | None:
    """
    What keeps C{text} from being a replica id, or C{None} if it is one:
    1 to L{MAX_REPLICA_ID_LENGTH} characters, each an ASCII letter or digit
    or one of C{._:@/+[]-}. One rule for C{--replica-id}, the frames a
    server sends and those a site receives, so that an id one end accepts
    is never a protocol error at the other. The text is quoted escaped
    (L{printable}): it may come from the peer.
    """
    if not isinstance(text, str):
        return f"a replica id must be text, not {type(text).__name__}"
    if _REPLICA_ID.fullmatch(text):
        return None
    if not text:
        return "the replica id is empty"
    bad = _NOT_REPLICA_ID_CHAR.search(text)
    if bad is not None:
        return (
            f"replica id '{printable(text, limit=80)}' has {bad.group()!r} at position {bad.start() + 1}:"
            " only ASCII letters, digits and ._:@/+[]- may be used"
        )
    return f"replica id '{printable(text, limit=80)}' has {len(text)} characters (at most {MAX_REPLICA_ID_LENGTH})"


def advertise_problem(text: str) -> str | None:
    """
    What keeps C{text} from being a replica's advertised address, or
    C{None} if it is one: empty (the replica is reached only through the
    common address), or C{HOST:PORT} exactly as L{HostPort} writes it
    (canonical host, IPv6 in brackets), so that two spellings of one
    address never look like two addresses.
    """
    if not isinstance(text, str):
        return f"an advertised address must be text, not {type(text).__name__}"
    if not text:
        return None
    try:
        canonical = str(HostPort.parse(text))
    except AddressError as e:
        return f"advertised address {printable(str(e), limit=300)}"
    if canonical != text:
        return f"advertised address '{printable(text, limit=300)}' is not in canonical form (write {canonical})"
    if len(text) > MAX_ADVERTISE_BYTES:
        return f"advertised address of {len(text)} bytes (at most {MAX_ADVERTISE_BYTES})"
    return None


def _check_replica_id(instance: object, attribute: object, value: str) -> None:
    problem = replica_id_problem(value)
    if problem is not None:
        raise ValueError(problem)


def _check_advertise(instance: object, attribute: object, value: str) -> None:
    problem = advertise_problem(value)
    if problem is not None:
        raise ValueError(problem)


@frozen
class ReplicaEntry:
    """
    One tunnel server replica as a REPLICAS frame lists it.

    @ivar replica_id: its id (L{replica_id_problem}).
    @ivar advertise: where a site may dial this replica directly, canonical
        C{HOST:PORT}; empty when it is reached only through the address the
        site dials anyway (a load balancer: the usual case).
    """

    replica_id: str = field(validator=_check_replica_id)
    advertise: str = field(default="", validator=_check_advertise)


def _sorted_entries(entries: Iterable[ReplicaEntry]) -> tuple[ReplicaEntry, ...]:
    # Anything but an entry sorts anywhere: the validator names it.
    return tuple(sorted(entries, key=lambda entry: str(getattr(entry, "replica_id", ""))))


def _replicas_size(own: str, entries: tuple[ReplicaEntry, ...]) -> int:
    return 2 + len(own) + sum(2 + len(e.replica_id) + len(e.advertise) for e in entries)


@frozen
class Replicas:
    """
    The tunnel server's replica set as one replica announces it to a site
    (a REPLICAS frame): which replica this session reached (C{own}) and
    every live replica, sorted by id (whatever order they are given in).

    Every value is one a REPLICAS frame can carry and the receiver accepts
    (L{ValueError} otherwise): ids and addresses by their rules, C{own}
    among the entries, no id twice, at most L{MAX_REPLICAS}, at most
    L{MAX_REPLICAS_BYTES} encoded. So a server that builds one can always
    send it, and what a site receives is always one of these.
    """

    own: str = field(validator=_check_replica_id)
    replicas: tuple[ReplicaEntry, ...] = field(converter=_sorted_entries)
    #: a session-level frame: always on stream 0 (not a field)
    stream_id: ClassVar[int] = 0

    @replicas.validator
    def _check_replicas(self, attribute: object, value: tuple[ReplicaEntry, ...]) -> None:
        if len(value) > MAX_REPLICAS:
            raise ValueError(f"{len(value)} replicas; at most {MAX_REPLICAS} can be announced")
        for entry in value:
            if not isinstance(entry, ReplicaEntry):
                raise ValueError(f"not a ReplicaEntry: {entry!r}")
        for before, after in zip(value, value[1:], strict=False):
            if before.replica_id == after.replica_id:
                raise ValueError(f"replica id {before.replica_id} is listed twice")
        if not any(entry.replica_id == self.own for entry in value):
            raise ValueError(f"the own replica id {self.own} is not among the replicas")
        size = _replicas_size(self.own, value)
        if size > MAX_REPLICAS_BYTES:
            raise ValueError(f"the replicas take {size} bytes; at most {MAX_REPLICAS_BYTES} can be announced")

    def get(self, replica_id: str) -> ReplicaEntry | None:
        """The entry of C{replica_id}, or C{None} if it is not listed."""
        for entry in self.replicas:
            if entry.replica_id == replica_id:
                return entry
        return None

    @property
    def ids(self) -> tuple[str, ...]:
        """Every listed replica id, sorted."""
        return tuple(entry.replica_id for entry in self.replicas)


Frame = Hello | Open | OpenOk | OpenFail | Data | WindowUpdate | Reset | Ping | GoAway | Services | Replicas

_SERVICE_HEAD = struct.Struct(">B")
_SERVICE_PORT = struct.Struct(">HB")


def services_payload(entries: tuple[tuple[str, str, int], ...]) -> bytes:
    """
    The payload of a SERVICES frame: count u8, then per service name length
    u8, name, port u16, host length u8, host.

    @raise ValueError: when the entries break a rule the receiver checks
        (too many, a bad name or host, too large), so that a sender can
        refuse them up front instead of ending its sessions.
    """
    if len(entries) > MAX_SERVICES:
        raise ValueError(f"{len(entries)} services; at most {MAX_SERVICES} can be announced")
    out = bytearray(_SERVICE_HEAD.pack(len(entries)))
    for name, host, port in entries:
        raw_name = name.encode("ascii", "replace")
        raw_host = host.encode("ascii", "replace")
        if not _SERVICE_NAME.fullmatch(raw_name):
            raise ValueError(f"service name {name!r} is not a lower-case DNS label")
        if wire_chars_error(raw_host) is not None:
            raise ValueError(f"service {name}: host {host!r} cannot travel in a frame")
        if not 1 <= port <= 65535:
            raise ValueError(f"service {name}: port {port} not in 1-65535")
        out += _SERVICE_HEAD.pack(len(raw_name)) + raw_name + _SERVICE_PORT.pack(port, len(raw_host)) + raw_host
    if len(out) > MAX_SERVICES_BYTES:
        raise ValueError(f"the services take {len(out)} bytes; at most {MAX_SERVICES_BYTES} can be announced")
    return bytes(out)


def _parse_services(payload: bytes) -> Services:
    if len(payload) > MAX_SERVICES_BYTES:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"SERVICES payload of {len(payload)} bytes")
    if not payload:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SERVICES payload too short")
    count = payload[0]
    if count > MAX_SERVICES:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"SERVICES announces {count} services (at most {MAX_SERVICES})")
    entries = []
    at = 1
    for _ in range(count):
        if at >= len(payload):
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SERVICES payload ends inside an entry")
        name_len = payload[at]
        name = payload[at + 1 : at + 1 + name_len]
        at += 1 + name_len
        if len(name) != name_len or at + _SERVICE_PORT.size > len(payload):
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SERVICES payload ends inside an entry")
        port, host_len = _SERVICE_PORT.unpack_from(payload, at)
        at += _SERVICE_PORT.size
        host = payload[at : at + host_len]
        at += host_len
        if len(host) != host_len:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SERVICES payload ends inside an entry")
        if not _SERVICE_NAME.fullmatch(name):
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"SERVICES name {printable(name)} is not a lower-case DNS label"
            )
        if wire_chars_error(host) is not None:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SERVICES host has bytes a host cannot have")
        if port == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SERVICES port 0")
        entries.append((name.decode("ascii"), host.decode("ascii"), port))
    if at != len(payload):
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SERVICES payload longer than its entries")
    return Services(tuple(entries))


def replicas_payload(replicas: Replicas) -> bytes:
    """
    The payload of a REPLICAS frame: own-id length u8, own id, count u8,
    then per replica id length u8, id, advertise length u8, advertise (0:
    none). Every L{Replicas} value fits (its rules are the receiver's).
    """
    own = replicas.own.encode("ascii")
    out = bytearray(_SERVICE_HEAD.pack(len(own)) + own + _SERVICE_HEAD.pack(len(replicas.replicas)))
    for entry in replicas.replicas:
        raw_id = entry.replica_id.encode("ascii")
        advertise = entry.advertise.encode("ascii")
        out += _SERVICE_HEAD.pack(len(raw_id)) + raw_id + _SERVICE_HEAD.pack(len(advertise)) + advertise
    return bytes(out)


def _peer_replica_id(raw: bytes, what: str) -> str:
    """A replica id from the wire, or the L{ProtocolError} naming C{what} and why not."""
    # A byte that is not ASCII decodes to U+FFFD, which the rule refuses
    # (and which the message shows escaped, as it shows everything else).
    text = raw.decode("ascii", "replace")
    problem = replica_id_problem(text)
    if problem is not None:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"REPLICAS {what}: {problem}")
    return text


def _parse_replicas(payload: bytes) -> Replicas:
    if len(payload) > MAX_REPLICAS_BYTES:
        raise ProtocolError(
            ErrorCode.FRAME_SIZE_ERROR, f"REPLICAS payload of {len(payload)} bytes (at most {MAX_REPLICAS_BYTES})"
        )
    if not payload:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "REPLICAS payload too short")
    own_len = payload[0]
    at = 1 + own_len
    if at >= len(payload):
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "REPLICAS payload ends before its replica count")
    own = _peer_replica_id(payload[1:at], "own replica id")
    count = payload[at]
    at += 1
    if count > MAX_REPLICAS:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"REPLICAS lists {count} replicas (at most {MAX_REPLICAS})")
    entries: dict[str, ReplicaEntry] = {}
    for index in range(1, count + 1):
        if at >= len(payload):
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"REPLICAS payload ends before replica {index}")
        id_len = payload[at]
        raw_id = payload[at + 1 : at + 1 + id_len]
        at += 1 + id_len
        if len(raw_id) != id_len or at >= len(payload):
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"REPLICAS payload ends inside replica {index}")
        advertise_len = payload[at]
        raw_advertise = payload[at + 1 : at + 1 + advertise_len]
        at += 1 + advertise_len
        if len(raw_advertise) != advertise_len:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"REPLICAS payload ends inside replica {index}")
        replica_id = _peer_replica_id(raw_id, f"replica {index}")
        if replica_id in entries:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"REPLICAS lists replica {replica_id} twice")
        if not raw_advertise.isascii():
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"REPLICAS replica {replica_id}: the advertised address is not ASCII"
            )
        advertise = raw_advertise.decode("ascii")
        problem = advertise_problem(advertise)
        if problem is not None:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"REPLICAS replica {replica_id}: {problem}")
        entries[replica_id] = ReplicaEntry(replica_id, advertise)
    if at != len(payload):
        raise ProtocolError(
            ErrorCode.FRAME_SIZE_ERROR, f"REPLICAS payload has {len(payload) - at} bytes after its last replica"
        )
    if own not in entries:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"REPLICAS does not list its own replica {own}")
    return Replicas(own, tuple(entries.values()))


def _reason_bytes(reason: str) -> bytes:
    raw = reason.encode("utf-8")
    if len(raw) <= MAX_REASON_BYTES:
        return raw
    # Cut on a character boundary so that the result stays valid UTF-8.
    return raw[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


def data_header(stream_id: int, length: int, fin: bool) -> bytes:
    """
    The header of a DATA frame; the hot path writes it and the payload
    separately to avoid building a frame object per chunk.
    """
    return HEADER.pack(FrameType.DATA, FLAG_FIN if fin else 0, stream_id, length)


def encode(frame: Frame) -> bytes:
    """
    The wire bytes of C{frame}. Reasons longer than the protocol allows are
    truncated rather than refused: they are for humans.
    """
    if isinstance(frame, Data):
        return data_header(frame.stream_id, len(frame.data), frame.fin) + frame.data
    if isinstance(frame, WindowUpdate):
        ftype, flags, payload = FrameType.WINDOW_UPDATE, 0, _U32.pack(frame.increment)
    elif isinstance(frame, Open):
        host = frame.host.encode("ascii")
        ftype, flags = FrameType.OPEN, 0
        payload = _OPEN_HEAD.pack(frame.port, len(host)) + host
    elif isinstance(frame, OpenOk):
        ftype, flags, payload = FrameType.OPEN_OK, 0, b""
    elif isinstance(frame, (OpenFail, Reset)):
        ftype = FrameType.OPEN_FAIL if isinstance(frame, OpenFail) else FrameType.RESET
        flags, payload = 0, _CODE.pack(frame.code) + _reason_bytes(frame.reason)
    elif isinstance(frame, Ping):
        ftype, flags, payload = FrameType.PING, FLAG_ACK if frame.ack else 0, frame.opaque
    elif isinstance(frame, GoAway):
        ftype, flags = FrameType.GOAWAY, 0
        payload = _GOAWAY_HEAD.pack(frame.last_stream_id, frame.code) + _reason_bytes(frame.reason)
    elif isinstance(frame, Services):
        ftype, flags, payload = FrameType.SERVICES, 0, services_payload(frame.entries)
    elif isinstance(frame, Replicas):
        ftype, flags, payload = FrameType.REPLICAS, 0, replicas_payload(frame)
    elif isinstance(frame, Hello):
        ftype, flags = FrameType.HELLO, 0
        payload = _HELLO.pack(
            HELLO_MAGIC,
            frame.version,
            frame.capabilities,
            frame.max_frame_size,
            frame.initial_window,
            frame.max_streams,
        )
    else:  # pragma: no cover - the Union is closed
        raise TypeError(f"not a frame: {frame!r}")
    return HEADER.pack(ftype, flags, frame.stream_id, len(payload)) + payload


def _reason(payload: bytes, what: str) -> str:
    """
    The reason text of a received OPEN_FAIL, RESET or GOAWAY, escaped with
    L{printable}: every peer-supplied reason passes here, so none can carry
    a carriage return, an ANSI escape or a bidi control into a log line or
    an exception message. Plain ASCII reasons come back unchanged.
    """
    if len(payload) > MAX_REASON_BYTES:
        raise ProtocolError(
            ErrorCode.FRAME_SIZE_ERROR,
            f"{what} reason of {len(payload)} bytes exceeds {MAX_REASON_BYTES}",
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{what} reason is not UTF-8") from None
    return printable(text, limit=MAX_REASON_BYTES)


def _fixed(ftype: FrameType, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise ProtocolError(
            ErrorCode.FRAME_SIZE_ERROR,
            f"{ftype.name} payload must be {size} bytes, got {len(payload)}",
        )


def parse_frame(ftype_raw: int, flags: int, stream_id: int, payload: bytes) -> Frame:
    """
    Build the frame value for one complete frame; raise L{ProtocolError}
    for anything malformed.
    """
    if ftype_raw == _DATA and 0 < stream_id <= MAX_STREAM_ID and not flags & ~FLAG_FIN:
        # The data path, checked in one line: DATA on a stream, FIN or no flag.
        return Data(stream_id, payload, flags == FLAG_FIN)
    ftype = _FRAME_TYPES.get(ftype_raw)
    if ftype is None:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"unknown frame type 0x{ftype_raw:02x}")
    if flags & ~_ALLOWED_FLAGS.get(ftype, 0):
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{ftype.name} frame with undefined flags 0x{flags:02x}")
    if stream_id > MAX_STREAM_ID:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "stream id has the reserved bit set")
    if (ftype in _SESSION_TYPES) != (stream_id == 0):
        where = "stream 0" if stream_id == 0 else f"stream {stream_id}"
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"{ftype.name} frame not allowed on {where}")

    if ftype is FrameType.DATA:
        return Data(stream_id, payload, bool(flags & FLAG_FIN))
    if ftype is FrameType.WINDOW_UPDATE:
        _fixed(ftype, payload, 4)
        (increment,) = _U32.unpack(payload)
        if not 1 <= increment <= MAX_WINDOW:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, f"WINDOW_UPDATE increment {increment} out of range")
        return WindowUpdate(stream_id, increment)
    if ftype is FrameType.OPEN:
        if len(payload) < _OPEN_HEAD.size + 1:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "OPEN payload too short")
        port, host_len = _OPEN_HEAD.unpack_from(payload)
        if len(payload) != _OPEN_HEAD.size + host_len:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "OPEN host length does not match the payload")
        host = payload[_OPEN_HEAD.size :]
        if wire_chars_error(host) is not None:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "OPEN target host has bytes a host cannot have")
        if port == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "OPEN target port 0")
        return Open(stream_id, host.decode("ascii"), port)
    if ftype is FrameType.OPEN_OK:
        _fixed(ftype, payload, 0)
        return OpenOk(stream_id)
    if ftype in (FrameType.OPEN_FAIL, FrameType.RESET):
        if len(payload) < 2:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"{ftype.name} payload too short")
        (code,) = _CODE.unpack_from(payload)
        reason = _reason(payload[2:], ftype.name)
        cls = OpenFail if ftype is FrameType.OPEN_FAIL else Reset
        return cls(stream_id, code, reason)
    if ftype is FrameType.PING:
        _fixed(ftype, payload, PING_SIZE)
        return Ping(payload, bool(flags & FLAG_ACK))
    if ftype is FrameType.GOAWAY:
        if len(payload) < _GOAWAY_HEAD.size:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY payload too short")
        last, code = _GOAWAY_HEAD.unpack_from(payload)
        if last > MAX_STREAM_ID:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "GOAWAY last stream id out of range")
        return GoAway(last, code, _reason(payload[_GOAWAY_HEAD.size :], "GOAWAY"))
    if ftype is FrameType.SERVICES:
        return _parse_services(payload)
    if ftype is FrameType.REPLICAS:
        return _parse_replicas(payload)
    # HELLO
    if len(payload) < _HELLO.size:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "HELLO payload too short")
    magic, version, capabilities, max_frame, window, streams = _HELLO.unpack_from(payload)
    if magic != HELLO_MAGIC:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "not an rtunnel mux peer (bad HELLO magic)")
    return Hello(version, max_frame, window, streams, capabilities)


class FrameDecoder:
    """
    Turns a byte stream cut anywhere into frames.

    The buffer holds at most one header plus one payload of at most the
    current limit: an over-long frame is refused at its header. The first
    frame (which the session requires to be HELLO) may be at most
    L{PRE_HELLO_MAX_LENGTH} bytes; later frames at most C{max_length}, the
    max_frame_size we announce. After an error the decoder is poisoned.
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._limit = min(PRE_HELLO_MAX_LENGTH, max_length)
        self._buffer = bytearray()
        self._failed: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """
        Bytes held that do not yet form a complete frame.
        """
        return len(self._buffer)

    @property
    def error(self) -> ProtocolError | None:
        """
        Why the byte stream stopped making sense, once it has.
        """
        return self._failed

    def feed(self, data: bytes) -> list[Frame]:
        """
        Add C{data}; return every frame now complete, in order.

        Never raises for bad input: at the first malformed frame it returns
        the good frames before it and sets L{error}; later calls return
        nothing.

        Frames lying wholly inside C{data} are cut out of it directly; only
        an incomplete frame at the end is copied into the buffer (and
        completed from the next call's bytes), so each byte is copied once,
        into its frame's payload.
        """
        if self._failed is not None:
            return []
        frames: list[Frame] = []
        rest: memoryview | None = memoryview(data)
        try:
            if self._buffer:
                rest = self._complete(rest, frames)
            if rest is not None:
                self._cut(rest, frames)
        except ProtocolError as e:
            self._failed = e
            self._buffer.clear()
        return frames

    def _check_length(self, length: int) -> None:
        if length > self._limit:
            raise ProtocolError(
                ErrorCode.FRAME_SIZE_ERROR,
                f"frame of {length} bytes exceeds the limit of {self._limit}",
            )

    def _complete(self, view: memoryview | None, frames: list[Frame]) -> memoryview | None:
        """Finish the buffered frame from C{view}; return what is left of it,
        or C{None} if the frame is still incomplete."""
        assert view is not None
        buf = self._buffer
        if len(buf) < HEADER_SIZE:
            take = HEADER_SIZE - len(buf)
            buf += view[:take]
            view = view[take:]
            if len(buf) < HEADER_SIZE:
                return None
        ftype, flags, stream_id, length = HEADER.unpack_from(buf, 0)
        self._check_length(length)
        need = HEADER_SIZE + length - len(buf)
        buf += view[:need]
        view = view[need:]
        if len(buf) < HEADER_SIZE + length:
            return None
        payload = bytes(buf[HEADER_SIZE:])
        buf.clear()
        frames.append(parse_frame(ftype, flags, stream_id, payload))
        self._limit = self.max_length
        return view

    def _cut(self, view: memoryview, frames: list[Frame]) -> None:
        """Cut every whole frame out of C{view}; buffer the incomplete rest."""
        offset = 0
        end = len(view)
        unpack = HEADER.unpack_from
        while end - offset >= HEADER_SIZE:
            ftype, flags, stream_id, length = unpack(view, offset)
            if length > self._limit:
                self._check_length(length)
            stop = offset + HEADER_SIZE + length
            if stop > end:
                break
            frames.append(parse_frame(ftype, flags, stream_id, bytes(view[offset + HEADER_SIZE : stop])))
            offset = stop
            self._limit = self.max_length
        if offset < end:
            self._buffer += view[offset:]
