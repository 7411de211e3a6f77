"""
Asking a running tunnel server for its live figures, from the C{rtunnel}
command: the client side of the admin endpoint.

The server records where its admin endpoint answers in the state database
(L{ADMIN_URL_KEY}) when it starts listening and clears it when it stops, so
the command finds it without an option of its own. Any failure is a
L{LiveUnavailable} saying why in a few words, because the command then
carries on with the database alone: live figures are a bonus, never a
reason for C{rtunnel sites list} to fail. Nothing here knows Twisted; the
command stays a plain blocking program.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ADMIN_URL_KEY",
    "LIVE_TIMEOUT",
    "LiveUnavailable",
    "fetch_sites",
    "format_admin_url",
    "sites_url",
    "replica_url_key",
    "merge_sites",
    "LIVE_FIELDS",
]

#: The state database's C{meta} key holding the admin endpoint's base URL
#: (C{http://127.0.0.1:5501}, C{https://...} for an C{ssl:} endpoint,
#: C{unix:/path} for a unix socket); empty or absent when there is none.
ADMIN_URL_KEY = "admin_url"


def replica_url_key(replica_id: str) -> str:
    """
    The C{meta} key of one replica's admin URL: with several replicas each
    records its own (and clears only its own), so that C{rtunnel sites
    list} asks every live replica for the sessions it holds; the shared
    L{ADMIN_URL_KEY} keeps the last one written, for one server.
    """
    return f"{ADMIN_URL_KEY}:{replica_id}"


def merge_sites(answers: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, Mapping[str, Any]]:
    """
    The live figures of several replicas' C{/api/v1/sites}, site by site:
    each replica reports the streams and bytes of its own session with a
    site, so these add up; the round trip is the best any replica measured
    (each is its own path to the site). Fields no replica gave stay None.
    """
    merged: dict[str, dict[str, Any]] = {}
    for answer in answers:
        for name, entry in answer.items():
            into = merged.setdefault(name, dict.fromkeys(LIVE_FIELDS))
            for key in ("streams", "bytes_to_site", "bytes_from_site"):
                value = entry.get(key)
                if isinstance(value, int):
                    into[key] = value if into[key] is None else into[key] + value
            rtt = entry.get("rtt_seconds")
            if isinstance(rtt, (int, float)) and (into["rtt_seconds"] is None or rtt < into["rtt_seconds"]):
                into["rtt_seconds"] = rtt
    return dict(merged)


#: The figures C{rtunnel sites list} takes from the admin endpoints.
LIVE_FIELDS = ("streams", "bytes_to_site", "bytes_from_site", "rtt_seconds")

#: Seconds C{rtunnel sites list} waits for the admin endpoint: a listing
#: must come back promptly even when the server is wedged.
LIVE_TIMEOUT = 2.0

#: The most a sites response may be: tens of thousands of sites are a few
#: megabytes; anything far larger is not our server talking.
MAX_RESPONSE = 256 * 1024 * 1024


class LiveUnavailable(Exception):
    """The admin endpoint gave no usable answer; the message says why, in a few words."""


def format_admin_url(scheme: str, host: str, port: int) -> str:
    """
    The base URL a local client uses to reach an admin endpoint bound to
    C{host}: an endpoint bound to every interface is reached on loopback,
    an IPv6 address goes in brackets.
    """
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: the admin endpoint may listen on C{unix:PATH}."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _connection(base: str, timeout: float) -> http.client.HTTPConnection:
    if base.startswith("unix:"):
        return _UnixConnection(base[len("unix:") :], timeout)
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LiveUnavailable(f"the recorded admin URL {base!r} is not one this command can use")
    try:
        port = parts.port
    except ValueError:
        raise LiveUnavailable(f"the recorded admin URL {base!r} has no valid port") from None
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, port, timeout=timeout, context=ssl.create_default_context())
    return http.client.HTTPConnection(parts.hostname, port, timeout=timeout)


def sites_url(base: str) -> str:
    """Where the sites of the JSON API are, as error lines name it."""
    return base.rstrip("/") + "/api/v1/sites"


def fetch_sites(base: str, timeout: float = LIVE_TIMEOUT) -> dict[str, Mapping[str, Any]]:
    """
    C{GET /api/v1/sites} of the admin endpoint at C{base}.

    @return: each site's entry of the JSON API, by name.
    @raise LiveUnavailable: no answer within C{timeout} (per connect and
        read), a refused connection, an error status, or a body that is
        not the sites API.
    """
    connection = _connection(base, timeout)
    try:
        connection.request("GET", "/api/v1/sites", headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read(MAX_RESPONSE + 1)
    except TimeoutError:
        raise LiveUnavailable(f"no answer within {timeout:g}s") from None
    except ConnectionRefusedError:
        raise LiveUnavailable("connection refused") from None
    except ssl.SSLError as e:
        raise LiveUnavailable(f"TLS failed: {e.reason or e}") from None
    except (OSError, http.client.HTTPException) as e:
        raise LiveUnavailable(str(e) or type(e).__name__) from None
    finally:
        connection.close()
    if response.status != 200:
        raise LiveUnavailable(f"it answered {response.status} {response.reason}")
    if len(body) > MAX_RESPONSE:
        raise LiveUnavailable(f"its answer is larger than {MAX_RESPONSE} bytes")
    try:
        document = json.loads(body)
        sites = {entry["site"]: entry for entry in document["sites"]}
    except (ValueError, TypeError, KeyError):
        raise LiveUnavailable("its answer is not the sites list of the JSON API") from None
    if not all(isinstance(name, str) and isinstance(entry, dict) for name, entry in sites.items()):
        raise LiveUnavailable("its answer is not the sites list of the JSON API")
    return sites
