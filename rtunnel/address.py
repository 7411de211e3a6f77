"""
Hosts and ports: one grammar, one canonical spelling, one error text, for
every place rtunnel reads or writes an address: keyfile addresses, server
certificate names, the site's allowlist (C{--allow}), forward specs, the
C{rtunnel:} endpoint string, the host in an OPEN frame, and log lines.
Anything accepted in one place is accepted in all; anything refused is
refused with the same message.

Pure Python (no Twisted), so that the sans-IO core shares the definition.

A host is one of:
 - an IPv4 address in dotted form (C{10.0.0.5});
 - an IPv6 address (C{2001:db8::5}, optionally with a zone of letters,
   digits, C{.}, C{-} and C{_}: C{fe80::1%eth0}), written in brackets
   wherever a port follows (C{[2001:db8::5]:554});
 - a DNS name: labels of 1-63 letters, digits, C{-} and C{_}, not starting
   or ending with C{-}; international names are taken in their ASCII (IDNA,
   C{xn--}) form. A name made only of digits and dots is a malformed IPv4
   address, not a name.
A host is 253 characters at most (in canonical form). Spaces around it are
ignored.

Canonical form: IP addresses as Python's L{ipaddress} writes them
(compressed IPv6, no brackets), names in lower case without a trailing dot.
A port is a whole number from 1 to 65535 in decimal.

The host in an OPEN frame (L{is_wire_host}) follows the same grammar, in any
spelling made of the characters the wire allows (ASCII letters, digits and
C{.-_:%}); the receiving end canonicalises it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Any

from attrs import field, frozen

__all__ = [
    "AddressError",
    "HostPort",
    "MAX_HOST_LENGTH",
    "MAX_WIRE_HOST_BYTES",
    "describe",
    "ip_version",
    "is_wire_host",
    "join_host_port",
    "parse_host",
    "parse_host_port",
    "parse_port",
    "split_fields",
    "wire_host_error",
]

MAX_HOST_LENGTH = 253
#: The most an OPEN frame's one-byte length can announce.
MAX_WIRE_HOST_BYTES = 255
_NAME_CHARS = re.compile(r"[a-z0-9_-]")
_ZONE = re.compile(r"[A-Za-z0-9._-]+")
_PORT = re.compile(r"[0-9]{1,5}")
_WIRE_HOST = re.compile(r"[A-Za-z0-9._:%-]+")
_NAME_RULE = "a name is letters, digits, '-' and '_' in dot-separated labels"


class AddressError(ValueError):
    """A host or HOST:PORT that cannot be used; C{str()} says what is wrong."""


def _ip_text(host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | AddressError:
    text = str(ip)
    _, percent, zone = text.partition("%")
    if percent and not _ZONE.fullmatch(zone):
        return AddressError(f"{host!r}: the zone after '%' may hold only letters, digits, '.', '-' and '_'")
    if len(text) > MAX_HOST_LENGTH:
        return AddressError(f"{host!r} is longer than {MAX_HOST_LENGTH} characters")
    return text


def _name_error(host: str, name: str) -> AddressError | None:
    # Checked label by label so that the message names the label at fault.
    for label in name.split("."):
        if not label:
            return AddressError(f"{host!r} is not a valid host name: it has an empty label (two dots, or a dot first)")
        bad = next((c for c in label if not _NAME_CHARS.match(c)), None)
        if bad is not None:
            return AddressError(
                f"{host!r} is not a valid host name or IP address: {bad!r} is not allowed ({_NAME_RULE})"
            )
        if len(label) > 63:
            return AddressError(f"{host!r} is not a valid host name: a label of {len(label)} characters (at most 63)")
        if label[0] == "-" or label[-1] == "-":
            return AddressError(f"{host!r} is not a valid host name: label {label!r} starts or ends with '-'")
    return None


@functools.lru_cache(maxsize=4096)
def _canonical(text: str) -> str | AddressError:
    # Cached (errors too): every stream's target and every OPEN asks, mostly
    # for the same few hosts, and ipaddress parsing is not cheap.
    host = text.strip()
    if not host:
        return AddressError("host is empty")
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1].strip()
        if not inner:
            return AddressError("host is empty")
        try:
            return _ip_text(host, ipaddress.IPv6Address(inner))
        except ValueError:
            if ":" in inner:
                return AddressError(f"{host!r} is not a valid IPv6 address")
            return AddressError(f"{host!r}: brackets are only for IPv6 addresses")
    if "[" in host or "]" in host:
        return AddressError(f"{host!r}: brackets must enclose a whole IPv6 address, [ADDR]")
    try:
        return _ip_text(host, ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return AddressError(f"{host!r} is not a valid host name: it has no international (IDNA) form")
    if ":" in name:
        return AddressError(f"{host!r} is not a valid IPv6 address")
    if len(name) > MAX_HOST_LENGTH:
        return AddressError(f"{host!r} is not a valid host name: longer than {MAX_HOST_LENGTH} characters")
    if name.replace(".", "").isdigit():
        return AddressError(f"{host!r} is not a valid IPv4 address")
    return _name_error(host, name) or name


def parse_host(text: str) -> str:
    """
    The canonical spelling of a host (see the module docstring); an IPv6
    address may be given with or without brackets.

    @raise AddressError: naming the host and what is wrong with it.
    """
    if not isinstance(text, str):
        raise AddressError(f"host must be text, not {type(text).__name__}")
    result = _canonical(text)
    if isinstance(result, AddressError):
        raise AddressError(*result.args)
    return result


def parse_port(text: str, what: str = "port", minimum: int = 1) -> int:
    """
    A port from C{minimum} (1, or 0 where 0 means "any free port") to 65535,
    from its decimal text.

    @param what: how the message names the port.
    @raise AddressError: C{"{what} must be a number from 1 to 65535, not
        '{text}'"}, one message for every mistake.
    """
    if isinstance(text, str) and _PORT.fullmatch(text) and minimum <= int(text) <= 65535:
        return int(text)
    raise AddressError(f"{what} must be a number from {minimum} to 65535, not {text!r}")


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """
    Read C{HOST:PORT} or C{[IPV6]:PORT}; when C{default_port} is given, also
    C{HOST}, C{[IPV6]} and a bare C{IPV6} (which then can never carry a
    port: C{::1:5500} is itself an IPv6 address). The default port is
    returned as given, unchecked (callers pass 0 to learn that none was
    written).

    @return: the canonical host and the port.
    @raise AddressError: quoting C{text}, then what is wrong, in the words
        every caller uses.
    """
    if not isinstance(text, str):
        raise AddressError(f"address must be text, not {type(text).__name__}")
    spelled = text.strip()
    if not spelled:
        raise AddressError("address is empty")
    port_text: str | None
    if spelled.startswith("["):
        end = spelled.find("]")
        if end < 0:
            raise AddressError(f"{text!r} has '[' without ']'")
        host_text, rest = spelled[: end + 1], spelled[end + 1 :]
        if rest and not rest.startswith(":"):
            raise AddressError(f"{text!r}: expected ':PORT' after ']', found {rest!r}")
        port_text = rest[1:] if rest else None
    elif spelled.count(":") > 1:
        if default_port is None or ip_version(spelled.split("%")[0]) != 6:
            raise AddressError(f"{text!r}: write IPv6 addresses in brackets, [ADDR]:PORT")
        host_text, port_text = spelled, None
    elif ":" in spelled:
        host_text, port_text = spelled.split(":", 1)
    else:
        host_text, port_text = spelled, None
    try:
        host = parse_host(host_text)
    except AddressError as e:
        raise AddressError(f"{text!r}: {e}") from None
    if port_text is None:
        if default_port is None:
            form = "[IPV6]:PORT" if spelled.startswith("[") else "HOST:PORT"
            raise AddressError(f"{text!r}: expected {form}")
        return host, default_port
    try:
        return host, parse_port(port_text)
    except AddressError as e:
        raise AddressError(f"{text!r}: {e}") from None


@functools.lru_cache(maxsize=4096)
def ip_version(host: str) -> int | None:
    """4 or 6 for an IP address, C{None} for a name (cached)."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def wire_chars_error(raw: bytes | str) -> str | None:
    """
    What keeps C{raw} from being carried in an OPEN frame at all (the
    framing rule: ASCII letters, digits and C{.-_:%}, no brackets, no
    spaces, 1 to L{MAX_WIRE_HOST_BYTES} bytes), or C{None}. A host that
    passes this but not the grammar (C{a..b}, C{999.1.1.1}) is a well-formed
    frame naming a bad target: the receiving session refuses that one stream
    (OPEN_FAIL TARGET_NOT_ALLOWED) and the tunnel's other streams go on.
    """
    if isinstance(raw, bytes):
        if not raw.isascii():
            return "host is not ASCII"
        text = raw.decode("ascii")
    else:
        text = raw
    if not text:
        return "host is empty"
    if not isinstance(text, str) or not text.isascii() or not _WIRE_HOST.fullmatch(text):
        return f"{text!r} has characters an OPEN frame cannot carry (only ASCII letters, digits and '.-_:%')"
    if len(text) > MAX_WIRE_HOST_BYTES:
        return f"host of {len(text)} bytes (at most {MAX_WIRE_HOST_BYTES})"
    return None


def wire_host_error(raw: bytes | str) -> str | None:
    """
    What keeps C{raw} from being the host of an OPEN frame, or C{None} if
    it may be one: a host by this module's grammar, in any spelling made of
    ASCII letters, digits and C{.-_:%} (no brackets, no spaces), at most
    L{MAX_WIRE_HOST_BYTES} bytes. The sender checks this; the receiver's
    framing checks only L{wire_chars_error}.
    """
    problem = wire_chars_error(raw)
    if problem is not None:
        return problem
    result = _canonical(raw.decode("ascii") if isinstance(raw, bytes) else raw)
    return str(result) if isinstance(result, AddressError) else None


def is_wire_host(raw: bytes | str) -> bool:
    """Whether C{raw} may be the host of an OPEN frame (L{wire_host_error})."""
    return wire_host_error(raw) is None


def _check_host(instance: object, attribute: object, value: Any) -> None:
    if not isinstance(value, str) or isinstance(_canonical(value), AddressError) or _canonical(value) != value:
        raise AddressError(f"{value!r} is not a host in canonical form (use HostPort.parse)")


def _check_port(instance: object, attribute: object, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535):
        raise AddressError(f"port {value!r} is outside 1-65535")


@frozen(order=True)
class HostPort:
    """
    A host and a port, canonical: equal values are the same address
    however they were written. C{str()} gives C{HOST:PORT}, with the host
    in brackets if it is an IPv6 address, which L{parse} reads back.
    """

    host: str = field(validator=_check_host)
    port: int = field(validator=_check_port)

    @classmethod
    def of(cls, host: str, port: int) -> HostPort:
        """From a host in any spelling and a port number."""
        return cls(parse_host(host), port)

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> HostPort:
        """
        Read C{HOST:PORT}, C{[IPV6]:PORT}, or, when C{default_port} is
        given, also C{HOST}, C{[IPV6]} and a bare C{IPV6}
        (L{parse_host_port}).

        @raise AddressError: naming what is wrong, in the words every
            caller uses.
        """
        return cls(*parse_host_port(text, default_port))

    @property
    def ip_version(self) -> int | None:
        return ip_version(self.host)

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)


def join_host_port(host: str, port: object) -> str:
    """C{HOST:PORT}, with an IPv6 host in brackets; no checks."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_fields(text: str) -> list[str]:
    """
    Split C{text} on the colons outside brackets (C{[::1]:8554:site:...}),
    for specs made of several addresses and names. Brackets stay on their
    field, so that each field parses as written.
    """
    fields: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(depth - 1, 0)
        if char == ":" and depth == 0:
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def describe(address: object) -> str:
    """
    How an address (a Twisted C{IAddress}, a L{HostPort}, anything with
    C{host} and C{port}) reads in log lines: C{HOST:PORT}, IPv6 in
    brackets; anything without a host as its C{str()}.
    """
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    return join_host_port(str(host), getattr(address, "port", None))
