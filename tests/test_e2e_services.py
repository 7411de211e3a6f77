"""
End to end, real twistd processes on loopback: a site declares a named
service (C{--service web=127.0.0.1:PORT}) with no C{--allow} for it; the
server records it (C{rtunnel sites list}) and a forward reaches it.
"""

from __future__ import annotations

import hashlib
import os
import socket

import pytest

from tests.e2e_support import EchoServer, read_until_closed
from tools.harness import Deployment, free_port, wait_until

pytestmark = pytest.mark.e2e

SITE = "alpha"


def test_declared_service_is_announced_listed_and_reachable_without_allow(tmp_path):
    echo = EchoServer()
    d = Deployment(tmp_path)
    forward = free_port()
    try:
        server = d.start_server(forwards=[f"127.0.0.1:{forward}:{SITE}:127.0.0.1:{echo.port}"])
        site = d.start_site(SITE, allow=[], keyfile=d.create_keyfile(SITE), extra=["--service", f"web={echo.target}"])
        d.wait_connected(SITE, watch=site)

        def listed() -> bool:
            entry = next(s for s in d.sites() if s["name"] == SITE)
            return bool(entry["services"] == {"web": echo.target})

        wait_until(listed, 30, "the site's services in sites list --json")
        table = d.rtunnel("sites", "list", "--state", str(d.server_state)).stdout
        assert f"web={echo.target}" in table
        assert f"site {SITE} announced 1 service(s): web={echo.target}" in server.output()

        payload = os.urandom(256 * 1024)
        with socket.create_connection(("127.0.0.1", forward), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            data, ended = read_until_closed(s, timeout=30)
        assert ended
        assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
    finally:
        statuses = d.stop_all()
        echo.close()
    assert statuses == {"server": 0, f"site-{SITE}": 0}, statuses
