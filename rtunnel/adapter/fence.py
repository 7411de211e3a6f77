"""
The Twisted internals that rtunnel's fast I/O relies on, checked once per
process, with stock Twisted I/O as the fallback.

Two modules reach below Twisted's public API, for gains measured in
docs/performance.md: L{rtunnel.adapter.eager} switches live TCP transports to
subclasses that send inside C{write()} and reads their private write-queue
state; L{rtunnel.adapter.tls} overrides private methods of
C{TLSMemoryBIOProtocol}. Private names change without a deprecation period,
so every one of them is listed and checked here, by name and by shape
(present, of the expected type, callable with the arguments rtunnel passes,
still used by the Twisted code around it), on the Twisted release actually
imported. The range tested is pinned in setup.cfg (C{twisted[tls] >= 24.3,
< 26.11}) and raised deliberately (docs/development.md).

When a check fails, or when C{RTUNNEL_STOCK_IO} is set in the environment
(to anything but empty or C{0}), the process runs on stock Twisted I/O:
L{send_eagerly<rtunnel.adapter.eager.send_eagerly>} leaves transports alone
and L{BulkTLSFactory<rtunnel.adapter.tls.BulkTLSFactory>} builds Twisted's
own TLS protocol. The decision is taken once, when this module is first
imported (both roles import it while building their services), and logged
once: a warning naming every internal that failed, or an info line when the
environment asked for it. Nothing else in rtunnel catches the absence of a
Twisted internal.

The same pattern guards the other private name rtunnel uses, pyOpenSSL's
C{SSL_CTX_set1_curves_list} in L{rtunnel.identity.tlsconfig}: checked once,
one warning, a working fallback.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping

from attrs import frozen
from twisted.copyright import version as twisted_version
from twisted.internet import tcp
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol

#: The environment variable that forces stock Twisted I/O.
STOCK_IO_ENV = "RTUNNEL_STOCK_IO"

#: The Twisted releases these internals were checked and tested on: the pin
#: in setup.cfg (a test keeps the two the same).
TESTED_TWISTED = "twisted[tls] >= 24.3, < 26.11"

#: What stock I/O gives up, for the log line (docs/performance.md).
LOST = (
    "TCP writes wait for the next reactor turn instead of leaving at once, and TLS runs through "
    "Twisted's own protocol (16 KiB records, one application read per record): fewer new "
    "connections a second, longer round trips, less throughput per stream"
)

_log = Logger()


@frozen
class IOMode:
    """How this process does its TCP and TLS I/O."""

    #: Twisted's own transports and TLS protocol, untouched.
    stock: bool
    #: Stock because C{RTUNNEL_STOCK_IO} asked for it.
    forced: bool = False
    #: The internals found missing or changed (stock because of them).
    problems: tuple[str, ...] = ()


# -- the checks ------------------------------------------------------------

#: Class attributes the eager write reads before Twisted has set them on the
#: instance (their class defaults), and the type of value they hold.
_TRANSPORT_DEFAULTS: dict[str, type] = {
    "connected": int,
    "disconnecting": int,
    "_writeDisconnecting": int,
    "_writeDisconnected": int,
    "_aborting": int,
    "TLS": int,
    "dataBuffer": bytes,
    "offset": int,
}
#: Instance attributes the eager write reads, which Twisted's constructors set.
_TRANSPORT_ASSIGNED = ("_tempDataLen", "socket", "reactor")
#: Methods the eager transport calls, with the arguments it passes.
_TRANSPORT_METHODS: dict[str, tuple[str, ...]] = {
    "write": ("data",),
    "doWrite": (),
    "doRead": (),
    "stopReading": (),
    "stopWriting": (),
    "connectionLost": ("reason",),
}
#: Twisted's queue, which the eager write must see as empty before it sends
#: ahead: its queued C{write} counts queued bytes in C{_tempDataLen}, and its
#: C{doWrite} moves them to C{dataBuffer}/C{offset}. If either stopped, an
#: eager send could overtake queued bytes.
_TRANSPORT_USES: dict[str, tuple[str, ...]] = {
    "write": ("_tempDataLen",),
    "doWrite": ("_tempDataLen", "dataBuffer", "offset"),
}

#: Flags of TLSMemoryBIOProtocol that the bulk protocol reads.
_TLS_DEFAULTS: dict[str, type] = {"_lostTLSConnection": int, "_aborted": int}
#: Methods the bulk TLS protocol overrides or calls, with their arguments.
_TLS_METHODS: dict[str, tuple[str, ...]] = {
    "makeConnection": ("transport",),
    "dataReceived": ("data",),
    "_write": ("data",),
    "_flushSendBIO": (),
    "_flushReceiveBIO": (),
    "_bufferedWrite": ("data",),
    "_shutdownTLS": (),
    "_tlsShutdownFinished": ("reason",),
}
#: The stock code must still route through the overridden methods, or the
#: overrides are dead code; C{_tlsConnection} must be what C{makeConnection}
#: sets up.
_TLS_USES: dict[str, tuple[str, ...]] = {
    "write": ("_write",),
    "dataReceived": ("_flushReceiveBIO",),
    "makeConnection": ("_tlsConnection",),
}


def check(
    server: type = tcp.Server,
    client: type = tcp.Client,
    port: type = tcp.Port,
    connector: type = tcp.Connector,
    tls: type = TLSMemoryBIOProtocol,
) -> list[str]:
    """
    Check every Twisted internal rtunnel's fast I/O relies on.

    The arguments are the Twisted classes in use; tests pass altered copies.

    @return: one line per internal that is missing or has changed shape,
        naming it (empty when all is as expected).
    """
    problems: list[str] = []
    for transport in (server, client):
        problems += _check_transport(transport)
    if getattr(port, "transport", None) is not server:
        problems.append(f"{_name(port)}.transport: is not {_name(server)} (accepted connections would stay stock)")
    if not _uses(getattr(connector, "_makeTransport", None), client.__name__):
        problems.append(
            f"{_name(connector)}._makeTransport: does not build {_name(client)} (connections would stay stock)"
        )
    problems += _check_tls(tls)
    return problems


def _check_transport(cls: type) -> list[str]:
    """The TCP transport class that L{send_eagerly} switches from."""
    problems: list[str] = []
    layout = _check_switch(cls)
    if layout is not None:
        problems.append(f"{_name(cls)}: {layout}")
    problems += _check_defaults(cls, _TRANSPORT_DEFAULTS)
    for name in _TRANSPORT_ASSIGNED:
        if not any(_uses(vars(k).get("__init__"), name) for k in cls.__mro__):
            problems.append(f"{_name(cls)}.{name}: not set by any __init__ of the class")
    problems += _check_methods(cls, _TRANSPORT_METHODS)
    problems += _check_uses(cls, _TRANSPORT_USES)
    return problems


class _PlainMixin:
    """Shaped like the eager write mixin: a plain class, no slots, no state."""


def _check_switch(cls: type) -> str | None:
    """
    Why an instance of C{cls} cannot switch its C{__class__} to a subclass
    made with a plain mixin in front (what L{send_eagerly} does), or None.
    Tried on a bare instance (C{__new__}, no constructor, no socket). The
    switch also sets attributes and shadows C{doRead}/C{doWrite} on the
    instance: it needs an instance dict.
    """
    if cls.__dictoffset__ == 0:
        return "instances have no __dict__ (__slots__ only)"
    try:
        switched = type(f"Switched{cls.__name__}", (_PlainMixin, cls), {})
        probe: object = object.__new__(cls)
        probe.__class__ = switched
    except TypeError as e:
        return f"cannot switch an instance to a subclass ({e})"
    return None


def _check_tls(cls: type) -> list[str]:
    """The TLS protocol that L{BulkTLSProtocol<rtunnel.adapter.tls.BulkTLSProtocol>} subclasses."""
    problems: list[str] = []
    if not issubclass(cls, ProtocolWrapper):
        problems.append(f"{_name(cls)}: not a ProtocolWrapper (its dataReceived delivers to the application)")
    problems += _check_defaults(cls, _TLS_DEFAULTS)
    problems += _check_methods(cls, _TLS_METHODS)
    problems += _check_uses(cls, _TLS_USES)
    return problems


def _check_defaults(cls: type, defaults: Mapping[str, type]) -> list[str]:
    problems: list[str] = []
    for name, kind in defaults.items():
        if not hasattr(cls, name):
            problems.append(f"{_name(cls)}.{name}: missing")
        elif not isinstance(getattr(cls, name), kind):
            problems.append(f"{_name(cls)}.{name}: is {getattr(cls, name)!r}, expected {kind.__name__}")
    return problems


def _check_methods(cls: type, methods: Mapping[str, tuple[str, ...]]) -> list[str]:
    problems: list[str] = []
    for name, arguments in methods.items():
        problem = _check_callable(cls, name, arguments)
        if problem is not None:
            problems.append(f"{_name(cls)}.{name}: {problem}")
    return problems


def _check_callable(cls: type, name: str, arguments: tuple[str, ...]) -> str | None:
    """Why C{cls.name(self, *arguments)} cannot be called as rtunnel does, or None."""
    method = getattr(cls, name, None)
    if method is None:
        return "missing"
    if not callable(method):
        return f"is {method!r}, not a method"
    expected = f"(self, {', '.join(arguments)})" if arguments else "(self)"
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):
        return f"its signature cannot be read, expected {expected}"
    try:
        signature.bind(*(("self",) + arguments))
    except TypeError:
        return f"takes {_bare(signature)}, expected {expected}"
    return None


def _bare(signature: inspect.Signature) -> inspect.Signature:
    """C{signature} without annotations, for a short log line."""
    empty = inspect.Parameter.empty
    return signature.replace(
        parameters=[p.replace(annotation=empty) for p in signature.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )


def _check_uses(cls: type, uses: Mapping[str, tuple[str, ...]]) -> list[str]:
    """
    Each C{method} defined along C{cls}'s MRO (an override may delegate to
    the one it overrides, as C{tcp.Connection.write} does), at least one of
    which uses each of C{names}.
    """
    problems: list[str] = []
    for method, names in uses.items():
        chain = [vars(k)[method] for k in cls.__mro__ if method in vars(k)]
        for name in names:
            if chain and not any(_uses(function, name) for function in chain):
                problems.append(f"{_name(cls)}.{method}: no longer uses {name}")
    return problems


def _uses(function: object, name: str) -> bool:
    """Whether C{function}'s own code names C{name} (an attribute, a method or a global)."""
    code = getattr(function, "__code__", None)
    return code is not None and name in code.co_names


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# -- the decision ------------------------------------------------------------


def requested(environ: Mapping[str, str]) -> bool:
    """Whether C{environ} asks for stock I/O (C{RTUNNEL_STOCK_IO} set, not empty or C{0})."""
    return environ.get(STOCK_IO_ENV, "").strip() not in ("", "0")


def decide(environ: Mapping[str, str], problems: Callable[[], list[str]] = check) -> IOMode:
    """
    The I/O mode for C{environ} and the Twisted in use: stock when asked for
    (then nothing is checked), or when any check fails.
    """
    if requested(environ):
        return IOMode(stock=True, forced=True)
    found = tuple(problems())
    return IOMode(stock=bool(found), problems=found)


def announce(mode: IOMode, log: Logger = _log) -> None:
    """The one log line for C{mode}: none for the fast path."""
    if mode.forced:
        log.info(
            "{variable} is set: running on stock Twisted I/O (no eager TCP writes, Twisted's own TLS protocol)",
            variable=STOCK_IO_ENV,
        )
    elif mode.problems:
        log.warn(
            "Twisted {version} lacks internals rtunnel's fast I/O relies on: {problems}. "
            "rtunnel runs on stock Twisted I/O, which works but is slower: {lost}. "
            "Tested with {tested}.",
            version=twisted_version,
            problems="; ".join(mode.problems),
            lost=LOST,
            tested=TESTED_TWISTED,
        )


_mode: IOMode = IOMode(stock=False)


def settle(
    environ: Mapping[str, str] = os.environ,
    problems: Callable[[], list[str]] = check,
    log: Logger = _log,
) -> IOMode:
    """Decide the I/O mode of this process, log it, and make it L{current}."""
    global _mode
    _mode = decide(environ, problems)
    announce(_mode, log)
    return _mode


def current() -> IOMode:
    """The I/O mode this process runs on."""
    return _mode


def restore(mode: IOMode) -> None:
    """Make C{mode} current again, without logging (for tests that L{settle} another)."""
    global _mode
    _mode = mode


settle()
