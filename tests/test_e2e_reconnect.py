"""
A real site process against a server that accepts TCP and closes it at once
(a full server, a descriptor limit, a load balancer's health check, the
server's pre-auth cap): the site must retry with growing delays, and log
each lost attempt as rtunnel's own warning, never as an unhandled error from
Twisted's machinery (a traceback per attempt, thousands in a reconnect storm).
"""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest

from tools.harness import Deployment, wait_until

pytestmark = pytest.mark.e2e


class SlammingListener:
    """
    Listens on a loopback port, accepts every connection and closes it at
    once; notes when each was accepted (C{time.monotonic()}).
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.accepted: list[float] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted.append(time.monotonic())
            conn.close()

    def accepts(self) -> list[float]:
        with self._lock:
            return list(self.accepted)

    def close(self) -> None:
        self.sock.close()
        self._thread.join(5)


def test_server_that_drops_every_connection_is_retried_with_backoff_and_no_unhandled_error(tmp_path):
    """
    An enrolled site whose server accepts and drops every connection before
    its HELLO makes attempt after attempt, each 1-2, 2-4, 4-8 s after the
    last, and logs one warning per lost attempt: no critical or error event,
    no "Unhandled Error", no traceback.
    """
    d = Deployment(tmp_path)
    d.start_server()
    keyfile = d.create_keyfile("alpha")
    listener: SlammingListener | None = None
    try:
        first = d.start_site("alpha", allow=["127.0.0.1:9"], keyfile=keyfile)
        d.wait_connected("alpha", watch=first)
        assert first.stop() == 0
        assert d.server is not None and d.server.stop() == 0
        listener = SlammingListener(d.server_port)
        site = d.start_site("alpha", allow=["127.0.0.1:9"], keyfile=keyfile, name="site-alpha-dropped")
        lost = f"[rtunnel.roles.site.SiteMuxFactory#warn] site alpha: tunnel to 127.0.0.1:{d.server_port} lost: "

        def four_attempts_lost() -> bool:
            if not site.running():
                raise RuntimeError(f"site exited ({site.popen.returncode}):\n{site.output()}")
            return len(listener.accepts()) >= 4 and site.output().count(lost) >= 4

        # Attempts at 0, then 1-2, 2-4 and 4-8 s after the one before: 14 s at most.
        wait_until(four_attempts_lost, 40, "four attempts, each dropped by the listener")
        assert site.stop() == 0
    finally:
        d.stop_all()
        if listener is not None:
            listener.close()

    output = site.output()
    for bad in ("#critical]", "#error]", "Unhandled Error", "NoTransition", "Traceback"):
        assert bad not in output, f"{bad!r} in the site's log:\n{output}"
    # rtunnel's retry policy: retry k waits between D and 2D, D = 2^(k-1) s.
    delays = {int(n): float(s) for n, s in re.findall(r"site alpha: reconnect attempt (\d+) in ([0-9.]+)s", output)}
    for attempt in (1, 2, 3):
        low = 2.0 ** (attempt - 1)
        assert low <= delays[attempt] <= 2 * low, (attempt, delays)
    # The listener saw the same schedule: each wait after the first longer
    # than the one before (up to the connect and close latencies).
    accepted = listener.accepts()[:4]
    gaps = [later - earlier for earlier, later in zip(accepted, accepted[1:], strict=False)]
    for attempt, gap in enumerate(gaps, start=1):
        assert delays[attempt] - 0.3 <= gap <= delays[attempt] + 2.0, (gaps, delays)
    assert gaps[2] > gaps[0], gaps
