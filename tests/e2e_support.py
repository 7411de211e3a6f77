"""
Site services for the end-to-end tests: small threaded TCP servers on
loopback that stand in for what a site's LAN offers.
"""

from __future__ import annotations

import socket
import threading
import time


class EchoServer:
    """
    Echoes every byte back; on the client's EOF it finishes echoing, then
    shuts down its own write side (so half-close is visible end to end).
    Counts the connections it accepted.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(2048)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.eof_seen = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    conn.sendall(data)
                with self._lock:
                    self.eof_seen += 1
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def closed_port() -> int:
    """A loopback port on which nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """
    Read until EOF or error within C{timeout}.

    @return: (bytes read, whether the connection ended within the timeout).
    """
    sock.settimeout(timeout)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks), True
            chunks.append(data)
    except (ConnectionResetError, BrokenPipeError):
        return b"".join(chunks), True
    except TimeoutError:
        pass
    return b"".join(chunks), False


class Relay:
    """
    A TCP relay on loopback standing in for the network path between a site
    and the tunnel server, with two faults a test can switch on:

     - C{blackhole}: keep every connection open but forward nothing (and
       accept new connections that then forward nothing): a silently dead
       path, as when a NAT box or a link drops everything;
     - C{keep_server_legs}: when the site side of a connection closes, leave
       the server side open and silent (the server keeps a half-dead session).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.blackhole = False
        self.keep_server_legs = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._held += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_site: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not self.blackhole:
                    dst.sendall(data)
        except OSError:
            pass
        if from_site and self.keep_server_legs:
            return  # the server's leg stays open and silent
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        with self._lock:
            for s in self._held:
                try:
                    s.close()
                except OSError:
                    pass


#: A TLS record: alert, TLS 1.2, two bytes: fatal, bad_certificate.
BAD_CERTIFICATE_ALERT = b"\x15\x03\x03\x00\x02\x02\x2a"


class AlertingPath:
    """
    The network path to the tunnel server, with an on-path attacker on it:
    while C{alerts} is above zero, each new connection's first bytes (the
    ClientHello) are answered with a forged plaintext TLS alert and the
    connection is closed; other connections are relayed to the server.
    L{cut} closes every relayed connection (the path dropped them).
    """

    def __init__(self, target_port: int, alerts: int) -> None:
        self.target_port = target_port
        self.alerts = alerts
        self.alerted = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._relayed: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                forge = self.alerts > 0
                if forge:
                    self.alerts -= 1
            if forge:
                threading.Thread(target=self._forge, args=(client,), daemon=True).start()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._relayed += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _forge(self, client: socket.socket) -> None:
        with client:
            try:
                client.settimeout(10)
                client.recv(65536)  # the ClientHello
                client.sendall(BAD_CERTIFICATE_ALERT)
            except OSError:
                pass
        with self._lock:
            self.alerted += 1

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self._lock:
            relayed, self._relayed = self._relayed, []
        for s in relayed:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        self.cut()
