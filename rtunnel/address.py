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
 - an IPv6 address (C{2001:db8::5}, optionally with a zone, C{fe80::1%eth0}),
   written in brackets wherever a port follows (C{[2001:db8::5]:554});
 - a DNS name: labels of 1-63 letters, digits, C{-} and C{_}, not starting
   or ending with C{-}, 253 characters at most; international names are
   taken in their ASCII (IDNA, C{xn--}) form. A name made only of digits and
   dots is a malformed IPv4 address, not a name.

Canonical form: IP addresses as Python's L{ipaddress} writes them
(compressed IPv6, no brackets), names in lower case without a trailing dot.
A port is a whole number from 1 to 65535.
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
    "describe",
    "ip_version",
    "is_wire_host",
    "parse_host",
    "parse_port",
    "split_fields",
]

MAX_HOST_LENGTH = 253
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_PORT = re.compile(r"[0-9]{1,5}")


class AddressError(ValueError):
    """A host or HOST:PORT that cannot be used; C{str()} says what is wrong."""


@functools.lru_cache(maxsize=4096)
def _canonical(text: str) -> str | AddressError:
    # Cached (errors too): every stream's target and every OPEN asks, mostly
    # for the same few hosts, and ipaddress parsing is not cheap.
    host = text.strip()
    if not host:
        return AddressError("host is empty")
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        try:
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            return AddressError(f"{text!r}: brackets are only for IPv6 addresses")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return AddressError(f"{text!r} is not a valid host name")
    if ":" in name:
        return AddressError(f"{text!r} is not a valid IPv6 address")
    if not name or len(name) > MAX_HOST_LENGTH:
        return AddressError(f"{text!r} is not a valid host name (1 to {MAX_HOST_LENGTH} characters)")
    if name.replace(".", "").isdigit():
        return AddressError(f"{text!r} is not a valid IPv4 address")
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            return AddressError(
                f"{text!r} is not a valid host name or IP address "
                "(a name is letters, digits, '-' and '_' in dot-separated labels)"
            )
    return name


def parse_host(text: str) -> str:
    """
    The canonical spelling of a host (see the module docstring); an IPv6
    address may be given with or without brackets.

    @raise AddressError: naming what is wrong.
    """
    if not isinstance(text, str):
        raise AddressError(f"host must be text, not {type(text).__name__}")
    result = _canonical(text)
    if isinstance(result, AddressError):
        raise AddressError(*result.args)
    return result


def parse_port(text: str, what: str = "port") -> int:
    """
    A port from 1 to 65535, from its decimal text.

    @raise AddressError: naming what is wrong.
    """
    if not (isinstance(text, str) and _PORT.fullmatch(text)):
        raise AddressError(f"{what} {text!r} is not a number from 1 to 65535")
    port = int(text)
    if not 1 <= port <= 65535:
        raise AddressError(f"{what} {port} is outside 1-65535")
    return port


@functools.lru_cache(maxsize=4096)
def ip_version(host: str) -> int | None:
    """4 or 6 for an IP address, C{None} for a name (cached)."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def is_wire_host(raw: bytes) -> bool:
    """
    Whether C{raw}, the host of an OPEN frame, is a host by this module's
    grammar (any spelling: the receiving end canonicalises it).
    """
    if not raw or len(raw) > 255 or not raw.isascii():
        return False
    return not isinstance(_canonical(raw.decode("ascii")), AddressError)


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
        given, also C{HOST}, C{[IPV6]} and a bare C{IPV6}.

        @raise AddressError: naming what is wrong, in the words every
            caller uses.
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
                raise AddressError(f"{text!r}: expected ':PORT' after ']'")
            port_text = rest[1:] if rest else None
        elif spelled.count(":") > 1:
            if default_port is None or ip_version(spelled.split("%")[0]) != 6:
                raise AddressError(f"{text!r}: write IPv6 addresses in brackets, [ADDR]:PORT")
            host_text, port_text = spelled, None
        elif ":" in spelled:
            host_text, port_text = spelled.split(":", 1)
        else:
            host_text, port_text = spelled, None
        if not host_text:
            raise AddressError(f"{text!r} has no host")
        try:
            host = parse_host(host_text)
        except AddressError as e:
            raise AddressError(f"{text!r}: {e}") from None
        if port_text is None:
            if default_port is None:
                raise AddressError(f"{text!r}: expected HOST:PORT")
            return cls(host, default_port)
        try:
            port = parse_port(port_text)
        except AddressError as e:
            raise AddressError(f"{text!r}: {e}") from None
        return cls(host, port)

    @property
    def ip_version(self) -> int | None:
        return ip_version(self.host)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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
    port = getattr(address, "port", None)
    host = str(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
