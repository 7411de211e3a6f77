"""
Socket options rtunnel sets on the transports it runs over, and the one
place where its servers listen, in one place for every layer above the
adapter (roles may import the adapter, never the reverse).

Listening goes through L{listen}: an ordinary Twisted endpoint description
normally, and a socket of our own with C{SO_REUSEPORT} in a worker of
C{twistd rtunnel-server --workers N} (L{share_ports}), so that the workers
of one host all listen on the same tunnel port, forwards and front doors and
the kernel spreads the connections between them.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from attrs import frozen
from twisted.internet import defer
from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory

#: Listen backlog of a shared endpoint that names none: Twisted's default.
DEFAULT_BACKLOG = 50

#: The endpoint types a worker can share: a TCP socket the kernel can hand
#: to any of several listeners on the same address.
SHAREABLE = ("tcp", "tcp6")

_sharing = False


def set_nodelay(transport: object) -> None:
    """
    Turn Nagle off on C{transport} if it has a TCP socket underneath.

    Small writes must leave at once: a forwarded request, a PING, an OPEN or
    an interactive keystroke would otherwise wait for the peer's delayed ACK
    (up to 40 ms on Linux; sequential requests through a tunnel with Nagle on
    managed a few dozen per second). Transports without the option (in-memory
    ones, UNIX sockets) are left alone, and so is a socket that refuses it: a
    missed optimisation is no reason to fail a connection.
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass


class SharedPortError(ValueError):
    """An endpoint description that workers cannot share (the message says why)."""


@frozen
class SharedEndpoint:
    """A TCP endpoint description as a worker listens on it."""

    port: int
    interface: str
    backlog: int
    family: socket.AddressFamily


#: Where a server endpoint description's parts end: at a colon that no
#: backslash escapes (Twisted's parser's rule; the backslash stays in the part).
_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def split_description(text: str) -> list[str]:
    """
    C{text}, an endpoint description, cut into its parts (type, then
    positional values and C{key=value} keywords, escapes left as written):
    what the checks of the admin endpoint, the front doors, the workers and
    the replica id read their type and port from.
    """
    return _UNESCAPED_COLON.split(text)


def _tokens(description: str) -> list[tuple[str | None, str]]:
    """
    C{description} split as Twisted's endpoint parser splits it: on colons
    not escaped by a backslash, each part a C{key=value} keyword or a
    positional value (key C{None}); a backslash makes the next character
    plain.
    """
    parts: list[tuple[str | None, str]] = []
    key: str | None = None
    current: list[str] = []
    escaped = False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append((key, "".join(current)))
            key, current = None, []
        elif char == "=" and key is None:
            key, current = "".join(current), []
        else:
            current.append(char)
    parts.append((key, "".join(current)))
    return parts


def shared_endpoint(description: str) -> SharedEndpoint:
    """
    Parse the endpoint description a worker is to listen on with
    C{SO_REUSEPORT}: C{tcp:PORT[:INTERFACE[:BACKLOG]]} or
    C{tcp6:PORT[:BACKLOG[:INTERFACE]]} (Twisted's positional orders), with
    C{port=}, C{interface=} and C{backlog=} keywords as Twisted takes them.

    Only a fixed TCP port can be shared: another endpoint type (a UNIX
    socket, C{ssl:}, anything from a plugin) cannot be handed out by the
    kernel between processes, and port 0 would give every worker a port of
    its own, which no site or client could know.

    @raise SharedPortError: an endpoint workers cannot share, or a malformed one.
    """
    tokens = _tokens(description.strip())
    kind = (tokens[0][1] if tokens[0][0] is None else "").lower()
    if kind not in SHAREABLE:
        raise SharedPortError(
            f"endpoint {description!r} cannot be shared by --workers: give a tcp: or tcp6: endpoint with a fixed "
            "port (the kernel spreads connections on one TCP port between the workers; other endpoint types "
            "need --workers 1)"
        )
    names = ("port", "interface", "backlog") if kind == "tcp" else ("port", "backlog", "interface")
    values: dict[str, str] = {}
    positional = [value for key, value in tokens[1:] if key is None]
    if len(positional) > len(names):
        raise SharedPortError(f"endpoint {description!r}: too many values for a {kind}: endpoint")
    values.update(zip(names, positional, strict=False))
    for key, value in tokens[1:]:
        if key is None:
            continue
        if key not in names:
            raise SharedPortError(f"endpoint {description!r}: {kind}: takes no {key}=")
        if key in values:
            raise SharedPortError(f"endpoint {description!r}: {key} given twice")
        values[key] = value
    port = _number(description, "port", values.get("port"), 0, 65535)
    if port == 0:
        raise SharedPortError(
            f"endpoint {description!r} cannot be shared by --workers: port 0 would give each worker a port of its "
            "own; name a fixed port"
        )
    backlog = _number(description, "backlog", values.get("backlog", str(DEFAULT_BACKLOG)), 1, 2**31 - 1)
    interface = values.get("interface", "" if kind == "tcp" else "::")
    family = socket.AF_INET6 if kind == "tcp6" or isIPv6Address(interface) else socket.AF_INET
    return SharedEndpoint(port=port, interface=interface, backlog=backlog, family=family)


def _number(description: str, name: str, text: str | None, low: int, high: int) -> int:
    if text is None:
        raise SharedPortError(f"endpoint {description!r} names no {name}")
    if not text.isdecimal() or not low <= int(text) <= high:
        raise SharedPortError(f"endpoint {description!r}: {name} {text!r} is not a number from {low} to {high}")
    return int(text)


def listen_shared(reactor: Any, description: str, factory: IProtocolFactory) -> IListeningPort:
    """
    Listen on C{description} with C{SO_REUSEADDR} and C{SO_REUSEPORT} set
    before the bind, so that every worker of the host (each a process of its
    own, all running as the same user) listens on the same address and the
    kernel spreads the incoming connections between them.

    The socket is made here and handed to the reactor
    (L{IReactorSocket.adoptStreamPort}, which keeps a duplicate of it):
    Twisted's own TCP ports cannot set an option before they bind.

    @raise SharedPortError: see L{shared_endpoint}; or this system has no
        C{SO_REUSEPORT}.
    @raise OSError: the bind or listen failed (the port is taken by a
        process that did not set C{SO_REUSEPORT}, say).
    """
    endpoint = shared_endpoint(description)
    reuse_port = getattr(socket, "SO_REUSEPORT", None)
    if reuse_port is None:
        raise SharedPortError(f"endpoint {description!r}: this system has no SO_REUSEPORT, so --workers must be 1")
    with socket.socket(endpoint.family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, reuse_port, 1)
        sock.setblocking(False)
        sock.bind((endpoint.interface, endpoint.port))
        sock.listen(endpoint.backlog)
        port: IListeningPort = reactor.adoptStreamPort(sock.fileno(), endpoint.family, factory)
        return port


def share_ports(enabled: bool = True) -> None:
    """
    Make L{listen} share every port of this process with the other workers
    (C{twistd rtunnel-server --worker-of}). A property of the whole process,
    set once before its services start: every listener of a worker must
    share, or a second worker could not listen beside the first.
    """
    global _sharing
    _sharing = enabled


def sharing_ports() -> bool:
    """Whether L{listen} shares ports (L{share_ports})."""
    return _sharing


def listen(reactor: Any, description: str, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
    """
    Listen on the server endpoint C{description}: through Twisted's endpoint
    parser normally, with L{listen_shared} in a worker (L{share_ports}).
    The tunnel port, the forwards and the front doors all listen through
    here; a worker's admin endpoint does not (each has a port of its own).

    @return: a Deferred firing with the listening port, or failing with the
        reason it could not listen.
    """
    if _sharing:
        return defer.maybeDeferred(listen_shared, reactor, description, factory)
    listening: defer.Deferred[IListeningPort] = serverFromString(reactor, description).listen(factory)
    return listening


__all__ = [
    "DEFAULT_BACKLOG",
    "SHAREABLE",
    "SharedEndpoint",
    "SharedPortError",
    "listen",
    "listen_shared",
    "set_nodelay",
    "share_ports",
    "shared_endpoint",
    "sharing_ports",
]
