"""
End to end, real twistd processes on loopback: both roles run with
C{twistd --logger rtunnel.logjson.observer} and their standard output is
one JSON object per line, with the structured fields of rtunnel's log
calls as keys, as a log shipper reads it.
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any

import pytest

from tests.e2e_support import EchoServer, closed_port, read_until_closed
from tools.harness import Deployment, Process, free_port, wait_until

pytestmark = pytest.mark.e2e

SITE = "alpha"
JSON_LOGS = ["--logger", "rtunnel.logjson.observer"]
_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def records(process: Process) -> list[dict[str, Any]]:
    """Every line the process wrote (stdout and stderr), each of which must be a JSON object."""
    out = []
    for line in process.output().splitlines():
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert list(record)[:4] == ["time", "level", "namespace", "message"], line
        assert _TIME.match(record["time"]), line
        out.append(record)
    return out


def find(process: Process, **match: Any) -> list[dict[str, Any]]:
    return [r for r in records(process) if all(r.get(k) == v for k, v in match.items())]


def test_both_roles_write_json_lines_with_fields(tmp_path):
    echo = EchoServer()
    d = Deployment(tmp_path)
    forward, refused_forward, not_allowed = free_port(), free_port(), closed_port()
    try:
        server = d.start_server(
            forwards=[
                f"127.0.0.1:{forward}:{SITE}:{echo.target}",
                f"127.0.0.1:{refused_forward}:{SITE}:127.0.0.1:{not_allowed}",
            ],
            twistd_options=JSON_LOGS,
        )
        site = d.start_site(SITE, allow=[echo.target], keyfile=d.create_keyfile(SITE), twistd_options=JSON_LOGS)
        d.wait_connected(SITE, watch=site)

        with socket.create_connection(("127.0.0.1", forward), timeout=10) as s:
            s.sendall(b"x" * 4096)
            s.shutdown(socket.SHUT_WR)
            data, ended = read_until_closed(s, timeout=30)
        assert ended and data == b"x" * 4096
        with socket.create_connection(("127.0.0.1", refused_forward), timeout=10) as s:
            read_until_closed(s, timeout=30)
        wait_until(lambda: "site refused the stream" in server.output(), 30, "the refusal's line")
    finally:
        statuses = d.stop_all()
        echo.close()
    assert statuses == {"server": 0, f"site-{SITE}": 0}, statuses

    [listening] = find(server, namespace="rtunnel.roles.server.TunnelServerService", level="info")[:1]
    assert listening["message"] == f"tunnel server listening for sites on 127.0.0.1:{d.server_port}"
    assert listening["address"] == f"127.0.0.1:{d.server_port}"

    [connected] = [r for r in find(server, site=SITE) if r["message"].startswith(f"site {SITE} connected from ")]
    assert connected["namespace"] == "rtunnel.roles.server.TunnelConnection"
    assert connected["message"] == f"site {SITE} connected from {connected['peer']}"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", connected["peer"])

    [refusal] = refusals(server)
    assert refusal["level"] == "warn"
    assert refusal["forward"] == f"127.0.0.1:{refused_forward} -> {SITE}:127.0.0.1:{not_allowed}"
    assert refusal["message"].startswith(f"forward {refusal['forward']}: site refused the stream for client ")
    assert refusal["reason"] and refusal["reason"] in refusal["message"]

    [up] = [r for r in find(site, site=SITE) if "connected to tunnel server" in r["message"]]
    assert up["server"] == f"127.0.0.1:{d.server_port}"
    assert any(r["message"].startswith("twistd ") and r["version"] for r in records(site))


def refusals(server: Process) -> list[dict[str, Any]]:
    return [r for r in records(server) if "site refused the stream" in r["message"]]
