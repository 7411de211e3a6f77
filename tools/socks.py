"""
A minimal SOCKS5 client (RFC 1928 CONNECT by name, RFC 1929
username/password) for C{make demo} and the benchmark: what a cloud
application's SOCKS library does, in a few lines, so that neither needs one.
"""

from __future__ import annotations

import socket
import struct

__all__ = ["Socks5Refused", "socks5_connect", "socks5_handshake"]


class Socks5Refused(Exception):
    """The proxy refused: C{phase} (method, auth, reply) and its code."""

    def __init__(self, phase: str, code: int | None) -> None:
        super().__init__(f"SOCKS5 {phase} refused: {'closed' if code is None else f'0x{code:02x}'}")
        self.phase = phase
        self.code = code


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def socks5_handshake(s: socket.socket, name: str, port: int, auth: tuple[str, str] | None = None) -> None:
    """
    CONNECT C{name}:C{port} over the connected socket C{s}; return once
    the proxy answered success (the socket then carries the stream).

    @raise Socks5Refused: any refusal, with the phase and code.
    """
    raw = name.encode("ascii")
    s.sendall(b"\x05\x01\x02" if auth else b"\x05\x01\x00")
    method = _recv_exact(s, 2)
    if len(method) < 2 or method[1] == 0xFF:
        raise Socks5Refused("method", method[1] if len(method) == 2 else None)
    if auth:
        user, password = (x.encode() for x in auth)
        s.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        status = _recv_exact(s, 2)
        if len(status) < 2 or status[1] != 0:
            raise Socks5Refused("auth", status[1] if len(status) == 2 else None)
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + struct.pack("!H", port))
    reply = _recv_exact(s, 10)  # our server always answers with an IPv4 BND (10 bytes)
    if len(reply) < 10 or reply[1] != 0:
        raise Socks5Refused("reply", reply[1] if len(reply) >= 2 else None)


def socks5_connect(
    proxy_port: int,
    name: str,
    port: int,
    *,
    proxy_host: str = "127.0.0.1",
    timeout: float = 10.0,
    auth: tuple[str, str] | None = None,
) -> socket.socket:
    """A connected socket to C{name}:C{port} through the SOCKS5 proxy, Nagle off."""
    s = socket.create_connection((proxy_host, proxy_port), timeout=timeout)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks5_handshake(s, name, port, auth)
    except BaseException:
        s.close()
        raise
    return s
