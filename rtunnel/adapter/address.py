"""
How a Twisted address reads in log lines: C{HOST:PORT}, IPv6 as
C{[HOST]:PORT}; anything without a host as its C{str()}.
"""

from __future__ import annotations


def describe(address: object) -> str:
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    port = getattr(address, "port", None)
    host = str(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
