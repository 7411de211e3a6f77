"""
End to end through the front doors (issue 11, section 3), with real processes
and real curl: one tunnel server serving SOCKS5 (C{--socks}) and HTTP CONNECT
(C{--connect-proxy}), two connected sites each with an HTTP server of its own
(python's http.server, in a child process, on loopback), and a third site
that enrolled and then went away.

Every refusal is checked on the wire (the SOCKS5 REP code or the HTTP
status, read with the raw clients below, or curl's exit code and message)
and in the server's log (the reason line).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rtunnel.frontdoor.users import make_line
from tests.e2e_support import closed_port, read_until_closed
from tools.harness import TWISTD, Deployment, _env, free_port, port_open, wait_until

pytestmark = pytest.mark.e2e

D = "rtunnel.internal"
SITES = ("alpha", "beta")
GONE = "gamma"

# SOCKS5 reply codes (RFC 1928 §6)
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class HttpSite:
    """python -m http.server on loopback, serving one file of random bytes."""

    def __init__(self, root: Path, name: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.payload = os.urandom(256 * 1024)
        (root / "file.bin").write_bytes(self.payload)
        self.port = free_port()
        self.log = open(root.parent / f"http-{name}.log", "wb")  # noqa: SIM115 (closed in close())
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", str(root)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_until(lambda: port_open("127.0.0.1", self.port) or self.popen.poll() is not None, 30, "http.server")
        assert self.popen.poll() is None, "http.server exited"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()

    def close(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frontdoor")
    http = {site: HttpSite(tmp / f"www-{site}", site) for site in SITES}
    refused_port = closed_port()
    d = Deployment(tmp / "deployment")
    doors = {"socks": free_port(), "connect": free_port()}
    d.start_server(
        extra=[
            "--socks",
            f"tcp:{doors['socks']}",
            "--connect-proxy",
            f"tcp:{doors['connect']}",
            "--open-timeout",
            "1",
        ]
    )
    processes = {}
    for site in SITES:
        allow = [f"127.0.0.1:{http[site].port}"]
        if site == "alpha":
            allow.append(f"127.0.0.1:{refused_port}")
        # Each site declares its HTTP server as the service "www" (and
        # allows it too, for the HOST.SITE.D tests).
        processes[site] = d.start_site(
            site,
            allow=allow,
            keyfile=d.create_keyfile(site),
            extra=["--retry-cap", "2", "--service", f"www=127.0.0.1:{http[site].port}"],
        )
    gone = d.start_site(GONE, allow=[], keyfile=d.create_keyfile(GONE), extra=["--retry-cap", "2"])
    for site in SITES:
        d.wait_connected(site, watch=processes[site])
    d.wait_connected(GONE, watch=gone)
    gone.stop()
    wait_until(lambda: not d.site_connected(GONE), 15, f"site {GONE} to be seen gone")
    yield d, http, doors, refused_port
    statuses = d.stop_all()
    for server in http.values():
        server.close()
    assert statuses["server"] == 0 and all(statuses[f"site-{s}"] == 0 for s in SITES), statuses


# -- clients -------------------------------------------------------------------


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def socks(port: int, name: str | bytes, dport: int, auth: tuple[str, str] | None = None) -> tuple[str, int | None]:
    """
    A SOCKS5 CONNECT by name, as raw bytes.

    @return: (phase, code): C{("method", 0xFF)} when no method was accepted,
        C{("auth", status)} when the password was refused, C{("reply", REP)}
        otherwise; C{code} is C{None} if the server closed without a reply.
    """
    raw = name.encode() if isinstance(name, str) else name
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x05\x01\x02" if auth else b"\x05\x01\x00")
        method = _recv_exact(s, 2)
        if len(method) < 2:
            return "method", None
        if method[1] == 0xFF:
            return "method", 0xFF
        if auth:
            user, password = (x.encode() for x in auth)
            s.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            status = _recv_exact(s, 2)
            if len(status) < 2 or status[1] != 0:
                return "auth", status[1] if len(status) == 2 else None
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + struct.pack("!H", dport))
        reply = _recv_exact(s, 10)
        return "reply", reply[1] if len(reply) >= 2 else None


def socks_raw(port: int, data: bytes) -> bytes:
    """Send C{data} to the SOCKS port; what comes back before the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        reply, ended = read_until_closed(s, timeout=10)
    assert ended, "the server did not close the connection"
    return reply


def connect_status(port: int, request: bytes) -> int:
    """Send C{request} to the HTTP CONNECT port; the response's status code."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert shutil.which("curl"), "curl is needed (make test installs it)"
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", "--noproxy", "", *args],
        capture_output=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def logged(d: Deployment, *words: str) -> None:
    """Wait (bounded) for a server log line holding every one of C{words}."""

    def found() -> bool:
        return any(all(w in line for w in words) for line in d.server.output().splitlines())

    wait_until(found, 10, f"a server log line with {words}")


# -- fetching by name ----------------------------------------------------------


@pytest.mark.parametrize("site", SITES)
def test_curl_fetches_by_host_site_name_through_socks5(world, site):
    """curl --socks5-hostname gets the site's file by 127.0.0.1.SITE.D, byte for byte."""
    d, http, doors, _ = world
    url = f"http://127.0.0.1.{site}.{D}:{http[site].port}/file.bin"
    result = curl("--socks5-hostname", f"127.0.0.1:{doors['socks']}", url)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == http[site].sha256


@pytest.mark.parametrize("site", SITES)
def test_curl_fetches_by_host_site_name_through_http_connect(world, site):
    """curl --proxy --proxytunnel (HTTP CONNECT) gets the site's file by name, byte for byte."""
    d, http, doors, _ = world
    url = f"http://127.0.0.1.{site.upper()}.{D}.:{http[site].port}/file.bin"  # case and trailing dot
    result = curl("--proxy", f"http://127.0.0.1:{doors['connect']}", "--proxytunnel", url)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == http[site].sha256


@pytest.mark.parametrize("site", SITES)
def test_curl_fetches_by_service_site_name(world, site):
    """
    SERVICE.SITE.D on the service's declared port reaches what the site
    declared (--service www=HOST:PORT), through both doors, byte for byte.
    """
    d, http, doors, _ = world
    url = f"http://www.{site}.{D}:{http[site].port}/file.bin"
    for args in (
        ("--socks5-hostname", f"127.0.0.1:{doors['socks']}"),
        ("--proxy", f"http://127.0.0.1:{doors['connect']}", "--proxytunnel"),
    ):
        result = curl(*args, url)
        assert result.returncode == 0, (args, result.stderr)
        assert hashlib.sha256(result.stdout).hexdigest() == http[site].sha256


def test_service_asked_on_another_port(world):
    """A declared service asked on another port is refused (SOCKS 0x02, HTTP 403), never sent on."""
    d, http, doors, _ = world
    other = http["beta"].port
    assert socks(doors["socks"], f"www.alpha.{D}", other) == ("reply", NOT_ALLOWED)
    request = f"CONNECT www.alpha.{D}:{other} HTTP/1.1\r\nHost: www.alpha.{D}:{other}\r\n\r\n".encode()
    assert connect_status(doors["connect"], request) == 403
    logged(d, "refused", f"www.alpha.{D}:{other}", "declared service asked on another port")


def test_names_route_to_their_own_site_never_the_other(world):
    """
    Each site's HTTP port asked at the other site is refused by that
    site's allowlist: the name chose the site, not the port.
    """
    d, http, doors, _ = world
    assert socks(doors["socks"], f"127.0.0.1.beta.{D}", http["alpha"].port) == ("reply", NOT_ALLOWED)
    assert socks(doors["socks"], f"127.0.0.1.alpha.{D}", http["beta"].port) == ("reply", NOT_ALLOWED)
    logged(d, "refused", f"127.0.0.1.beta.{D}:{http['alpha'].port}", "target not allowed by the site", "site beta")
    assert socks(doors["socks"], f"127.0.0.1.alpha.{D}", http["alpha"].port) == ("reply", SUCCEEDED)


# -- refusals ------------------------------------------------------------------


def test_unknown_site(world):
    d, http, doors, _ = world
    assert socks(doors["socks"], f"127.0.0.1.nosuch.{D}", 80) == ("reply", HOST_UNREACHABLE)
    assert connect_status(doors["connect"], f"CONNECT www.nosuch.{D}:80 HTTP/1.1\r\n\r\n".encode()) == 404
    logged(d, "front door socks5: refused", "unknown site", "no site named nosuch")
    logged(d, "front door http-connect: refused", "unknown site")


def test_site_not_connected_after_the_open_timeout(world):
    """An enrolled site that is away: the client waits --open-timeout (1 s), then 0x03 / 504."""
    d, http, doors, _ = world
    start = time.monotonic()
    assert socks(doors["socks"], f"127.0.0.1.{GONE}.{D}", 80) == ("reply", NETWORK_UNREACHABLE)
    assert 0.9 <= time.monotonic() - start < 5
    assert connect_status(doors["connect"], f"CONNECT x.{GONE}.{D}:80 HTTP/1.1\r\n\r\n".encode()) == 504
    logged(d, "refused", "site not connected", f"site {GONE}: not connected within 1s")


def test_name_without_a_service_or_host(world):
    """SITE.D alone names no service: 0x04 / 404, unknown service."""
    d, http, doors, _ = world
    assert socks(doors["socks"], f"alpha.{D}", 80) == ("reply", HOST_UNREACHABLE)
    assert connect_status(doors["connect"], f"CONNECT alpha.{D}:80 HTTP/1.1\r\n\r\n".encode()) == 404
    logged(d, "refused", "unknown service", "names site alpha but no service or host")


def test_target_the_site_refuses(world):
    """Not in the allowlist: 0x02 / 502; allowed but nothing listening: 0x05 (curl shows the code too)."""
    d, http, doors, refused_port = world
    assert socks(doors["socks"], f"127.0.0.1.alpha.{D}", 9) == ("reply", NOT_ALLOWED)
    assert connect_status(doors["connect"], f"CONNECT 127.0.0.1.alpha.{D}:9 HTTP/1.1\r\n\r\n".encode()) == 502
    logged(d, "refused", f"127.0.0.1.alpha.{D}:9", "target not allowed by the site", "TARGET_NOT_ALLOWED")
    assert socks(doors["socks"], f"127.0.0.1.alpha.{D}", refused_port) == ("reply", CONNECTION_REFUSED)
    result = curl("--socks5-hostname", f"127.0.0.1:{doors['socks']}", f"http://127.0.0.1.alpha.{D}:{refused_port}/")
    assert result.returncode == 97, result  # CURLE_PROXY
    assert b"SOCKS5 connection to 127.0.0.1.alpha" in result.stderr and b"(5)" in result.stderr, result.stderr
    logged(d, "refused", "target refused the connection")


def test_name_outside_the_domain(world):
    d, http, doors, _ = world
    assert socks(doors["socks"], "example.com", 443) == ("reply", NOT_ALLOWED)
    assert connect_status(doors["connect"], b"CONNECT example.com:443 HTTP/1.1\r\n\r\n") == 403
    logged(d, "refused", "asking for example.com:443", "name outside the front door's domain")


def test_socks_with_an_address_instead_of_a_name(world):
    """curl --socks5 (without -hostname) sends an IPv4 address: 0x08; so does a raw IPv6 request."""
    d, http, doors, _ = world
    result = curl("--socks5", f"127.0.0.1:{doors['socks']}", f"http://127.0.0.1:{http['alpha'].port}/file.bin")
    assert result.returncode == 97, result
    assert b"(8)" in result.stderr, result.stderr  # curl names the REP code
    reply = socks_raw(doors["socks"], b"\x05\x01\x00" + b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\x00\x50")
    assert reply[:2] == b"\x05\x00" and reply[2:4] == bytes([5, ADDRESS_TYPE_NOT_SUPPORTED])
    logged(d, "front door socks5: refused", "address instead of a name", "is an IPv4 address")
    logged(d, "front door socks5: refused", "address instead of a name", "IPv6")


def test_malformed_requests(world):
    """A bad reserved byte (0x01), an HTTP client on the SOCKS port (closed unanswered), garbage on CONNECT (400)."""
    d, http, doors, _ = world
    name = f"127.0.0.1.alpha.{D}".encode()
    bad_rsv = b"\x05\x01\x00" + b"\x05\x01\x01\x03" + bytes([len(name)]) + name + b"\x00\x50"
    assert socks_raw(doors["socks"], bad_rsv) == b"\x05\x00" + b"\x05\x01\x00\x01" + bytes(6)
    assert socks_raw(doors["socks"], b"GET / HTTP/1.1\r\n\r\n") == b""
    assert connect_status(doors["connect"], b"\x05\x01\x00") == 400
    assert connect_status(doors["connect"], b"GET http://alpha/ HTTP/1.1\r\n\r\n") == 405
    logged(d, "front door socks5: refused", "malformed request", "not a SOCKS5 client")
    logged(d, "front door http-connect: refused", "not a CONNECT request")


def test_too_long_name(world):
    """A name of 255 characters (over 253): 0x01 / 400, name too long."""
    d, http, doors, _ = world
    name = ("x" * 50 + ".") * 4 + "x" * 28 + f".alpha.{D}"
    assert len(name) == 255
    assert socks(doors["socks"], name, 80) == ("reply", GENERAL_FAILURE)
    assert connect_status(doors["connect"], f"CONNECT {name}:80 HTTP/1.1\r\n\r\n".encode()) == 400
    logged(d, "front door socks5: refused", "name too long")


def test_refused_requests_reach_no_site(world):
    """
    Bytes sent after a refused request (early data) never reach the site:
    its HTTP server logs no request for them.
    """
    d, http, doors, _ = world
    before = (Path(http["beta"].log.name)).read_bytes()
    name = f"127.0.0.1.beta.{D}".encode()
    request = b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", 9)
    reply = socks_raw(doors["socks"], request + b"GET /refused-early-data HTTP/1.0\r\n\r\n")
    assert reply[2:4] == bytes([5, NOT_ALLOWED])
    assert b"refused-early-data" not in Path(http["beta"].log.name).read_bytes()[len(before) :]


# -- users and exposure ----------------------------------------------------------


def test_bad_credentials_are_refused(tmp_path):
    """
    With --proxy-users, a wrong password is refused (RFC 1929 status 0x01,
    curl exit 97; HTTP 407) and logged; the right one gets through to routing.
    """
    users = tmp_path / "proxy-users"
    users.write_text(make_line("federation", "correct horse", ln=10) + "\n")
    users.chmod(0o600)
    d = Deployment(tmp_path / "auth")
    doors = {"socks": free_port(), "connect": free_port()}
    d.start_server(
        extra=["--socks", f"tcp:{doors['socks']}", "--connect-proxy", f"tcp:{doors['connect']}"]
        + ["--proxy-users", str(users)]
    )
    try:
        wait_until(lambda: port_open("127.0.0.1", doors["socks"]), 10, "the SOCKS port")
        assert socks(doors["socks"], f"x.nosuch.{D}", 80, auth=("federation", "wrong")) == ("auth", 0x01)
        assert socks(doors["socks"], f"x.nosuch.{D}", 80) == ("method", 0xFF)
        assert socks(doors["socks"], f"x.nosuch.{D}", 80, auth=("federation", "correct horse")) == (
            "reply",
            HOST_UNREACHABLE,
        )
        result = curl("--socks5-hostname", f"federation:nope@127.0.0.1:{doors['socks']}", f"http://x.nosuch.{D}/")
        assert result.returncode == 97, result
        request = f"CONNECT x.nosuch.{D}:80 HTTP/1.1\r\nProxy-Authorization: Basic ZmVkZXJhdGlvbjpubw==\r\n\r\n"
        assert connect_status(doors["connect"], request.encode()) == 407
        logged(d, "front door socks5: refused", "bad credentials", "user 'federation'")
        logged(d, "front door socks5: refused", "credentials required")
        logged(d, "front door http-connect: refused", "bad credentials")
    finally:
        assert d.stop_all() == {"server": 0}


def test_a_front_door_beyond_loopback_needs_users(tmp_path):
    """--socks on every interface without --proxy-users: rtunnel-server exits 1 and says why, on stderr."""
    result = subprocess.run(
        [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "--logfile=-", "rtunnel-server"]
        + ["--state", str(tmp_path / "state"), "--listen", f"tcp:{free_port()}:interface=127.0.0.1"]
        + ["--socks", f"tcp:{free_port()}:interface=0.0.0.0"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1, result
    assert "--socks listens on 0.0.0.0, beyond loopback, without --proxy-users" in result.stderr, result.stderr
    assert "would let anyone who can reach it reach every site" in result.stderr
