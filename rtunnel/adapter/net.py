"""
Socket options rtunnel sets on the transports it runs over, in one place for
every layer above the adapter (roles may import the adapter, never the
reverse).
"""

from __future__ import annotations


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


__all__ = ["set_nodelay"]
