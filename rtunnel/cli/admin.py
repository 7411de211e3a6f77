"""
The C{rtunnel} admin command: keyfiles and sites of a tunnel server.

    rtunnel keyfile create --state DIR --site NAME --output FILE
                           [--address HOST[:PORT]]... [--expires DURATION]
    rtunnel sites list --state DIR [--json]
    rtunnel sites revoke NAME --state DIR
    rtunnel forwards add [BIND_ADDRESS:]PORT:SITE:HOST:HOSTPORT --state DIR
    rtunnel forwards remove [BIND_ADDRESS:]PORT --state DIR [--cut]
    rtunnel forwards list --state DIR [--json]
    rtunnel replicas list --state DIR [--json]
    rtunnel database upgrade --state DIR

Every command that takes C{--state DIR} also takes C{--database URL}, as the
server does (C{sqlite:PATH} or C{postgresql://...}; default the SQLite file
in DIR).

It works on the server's state directly, including while the server runs:
the state database is SQLite in WAL mode (or PostgreSQL), and the server
polls it for revocations.  Every failure is one line on stderr (C{rtunnel: error: ...})
and a non-zero exit status: 2 for a usage error, 1 for anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TextIO

from rtunnel.address import AddressError, parse_host, parse_port, split_fields
from rtunnel.frontdoor.users import UserStore, make_line
from rtunnel.identity.certs import certificate_covers, dump_certificate, validate_site_name
from rtunnel.identity.errors import IdentityError, KeyfileExists, StateError
from rtunnel.identity.keyfile import (
    DEFAULT_PORT,
    PUBLIC_PORT_KEY,
    Keyfile,
    format_address,
    normalize_address,
    parse_address,
    write_keyfile,
)
from rtunnel.identity.migrations import SCHEMA_VERSION
from rtunnel.identity.state import ServerState
from rtunnel.identity.store import (
    ForwardRecord,
    ForwardState,
    ReplicaRecord,
    SiteRecord,
    StateStore,
    database_location,
    is_postgresql,
)
from rtunnel.observe.live import (
    ADMIN_URL_KEY,
    LIVE_FIELDS,
    LIVE_TIMEOUT,
    LiveUnavailable,
    fetch_sites,
    merge_sites,
    replica_url_key,
    sites_url,
)
from rtunnel.roles.forward import DEFAULT_BIND, ForwardSpec
from rtunnel.roles.registry import format_services

__all__ = ["main", "parse_duration", "build_parser"]

_DURATION_RE = re.compile(r"(?:[0-9]+[smhdw])+\Z")
_DURATION_PART_RE = re.compile(r"([0-9]+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MAX_TOKEN_LIFETIME = timedelta(days=365)


class _UsageError(Exception):
    """
    The command line is wrong (exit status 2).
    """


class _Exit(Exception):
    """
    argparse wants to stop (after --help): exit with C{status}.
    """

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """
    An argparse parser that raises instead of printing usage and exiting,
    so that L{main} reports every error as one line and returns its status.
    """

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            raise _UsageError(message.strip())
        raise _Exit(status)


def parse_duration(text: str) -> timedelta:
    """
    Parse a duration like C{30m}, C{24h}, C{7d} or C{1d12h} (units C{s},
    C{m}, C{h}, C{d}, C{w}).

    @raise ValueError: with a message showing the expected form.
    """
    value = text.strip().lower()
    if not _DURATION_RE.match(value):
        raise ValueError(f"invalid duration {text!r}: use a number and a unit (s, m, h, d or w), like 30m, 24h or 7d")
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART_RE.findall(value))
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be longer than zero")
    duration = timedelta(seconds=seconds)
    if duration > _MAX_TOKEN_LIFETIME:
        raise ValueError(f"duration {text!r} is longer than the 365-day limit")
    return duration


def _argument_type(check: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert


def build_parser() -> argparse.ArgumentParser:
    """
    The argument parser of the C{rtunnel} command.
    """
    parser = _Parser(
        prog="rtunnel",
        description="Administer an rtunnel tunnel server: keyfiles and sites.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    keyfile = commands.add_parser("keyfile", help="create keyfiles that enroll sites")
    keyfile_commands = keyfile.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = keyfile_commands.add_parser(
        "create",
        help="create a keyfile with a one-time enrollment token for a site",
        description=(
            "Create a keyfile that lets one site enroll with this tunnel server. "
            "The keyfile holds a secret one-time token and the server's CA "
            "certificate: move it to the site over a trusted channel."
        ),
    )
    _add_state_arguments(create)
    create.add_argument(
        "--site",
        required=True,
        metavar="NAME",
        type=_argument_type(validate_site_name, "site name"),
        help="site name: 1-63 of a-z 0-9 . _ -",
    )
    create.add_argument("--output", required=True, metavar="FILE", help="keyfile to write (must not exist)")
    create.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        type=_argument_type(normalize_address, "address"),
        help=(
            "server address the site dials (repeatable; default: the server's "
            "public addresses with the port it recorded when it last started: its "
            f"--public-address port, else its listen port; {DEFAULT_PORT} if never started); "
            f"IPv6 as [::1]:{DEFAULT_PORT}"
        ),
    )
    create.add_argument(
        "--expires",
        default=timedelta(hours=24),
        metavar="DURATION",
        type=_argument_type(parse_duration, "duration"),
        help="how long the token stays valid: 30m, 24h, 7d... (default 24h)",
    )
    create.set_defaults(run=_keyfile_create)

    sites = commands.add_parser("sites", help="list and revoke sites")
    site_commands = sites.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = site_commands.add_parser("list", help="list sites and their connection status")
    _add_state_arguments(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(run=_sites_list)
    revoke = site_commands.add_parser(
        "revoke",
        help="revoke a site: its tunnel is cut and its certificate refused",
        description=(
            "Revoke a site. A running tunnel server cuts its tunnel within "
            "seconds and refuses its certificate from then on; its outstanding "
            "keyfiles are withdrawn. Only a new keyfile re-admits it."
        ),
    )
    revoke.add_argument("name", metavar="NAME", help="site name")
    _add_state_arguments(revoke)
    revoke.set_defaults(run=_sites_revoke)
    _add_forward_commands(commands)
    _add_replica_commands(commands)
    _add_proxy_user_commands(commands)
    _add_database_commands(commands)
    return parser


def _add_state_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", required=True, metavar="DIR", help="server state directory")
    parser.add_argument(
        "--database",
        metavar="URL",
        help=(
            "where the tunnel server keeps tokens, sites and forwards, as given to the server: "
            "sqlite:PATH or postgresql://USER@HOST/DBNAME (default: the SQLite file in the state directory)"
        ),
    )


def _add_database_commands(commands: Any) -> None:
    database = commands.add_parser("database", help="the state database's schema")
    actions = database.add_subparsers(dest="action", metavar="ACTION", required=True)
    upgrade = actions.add_parser(
        "upgrade",
        help="bring the state database's schema up to this rtunnel's version",
        description=(
            "Apply the schema migrations the state database is missing (the tunnel server and "
            "every command also do on open), or create the schema in an empty PostgreSQL "
            "database. A database written by a newer rtunnel is refused."
        ),
    )
    _add_state_arguments(upgrade)
    upgrade.set_defaults(run=_database_upgrade)


def _database_upgrade(args: argparse.Namespace, now: datetime, out: TextIO) -> int:
    location = database_location(args.database, args.state)
    if args.database is None and not os.path.isdir(args.state):
        raise StateError(f"no tunnel server state at {args.state}: pass the right --state")
    # An empty PostgreSQL database gets the schema; a missing SQLite file is a wrong path.
    with contextlib.closing(StateStore(location, create=is_postgresql(location))) as store:
        if store.upgraded_from is None:
            print(f"state database {store.path}: schema version {SCHEMA_VERSION}, already current", file=out)
        elif store.upgraded_from == 0:
            print(f"state database {store.path}: created at schema version {SCHEMA_VERSION}", file=out)
        else:
            print(
                f"state database {store.path}: upgraded from schema version {store.upgraded_from} to {SCHEMA_VERSION}",
                file=out,
            )
    return 0


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _span(duration: timedelta) -> str:
    seconds = int(duration.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _keyfile_create(args: argparse.Namespace, now: datetime, out: TextIO) -> int:
    output: str = args.output
    if os.path.lexists(output):
        raise KeyfileExists(f"refusing to overwrite existing file {output}")
    state = ServerState.open_existing(args.state, args.database)
    with contextlib.closing(state):
        # The port the running server recorded (its --public-address port,
        # else the port it listens on); 5500 for a server never started.
        port = int(state.store.get_meta(PUBLIC_PORT_KEY) or DEFAULT_PORT)
        addresses: list[str] = list(args.address) or [format_address(host, port) for host in state.public_addresses]
        hosts = [parse_address(a)[0] for a in addresses]
        uncovered = [h for h in hosts if not certificate_covers(state.server_certificate, h)]
        if uncovered:
            raise IdentityError(
                f"the server certificate does not cover {', '.join(uncovered)}: restart "
                f"the tunnel server with --public-address {uncovered[0]} (it then "
                "re-issues its certificate), or pick another --address"
            )
        existing = state.store.site(args.site)
        token = state.store.create_token(args.site, args.expires, now)
        keyfile = Keyfile(
            site=args.site,
            addresses=tuple(addresses),
            server_name=hosts[0],
            ca_certificate_pem=dump_certificate(state.ca_certificate),
            token=token,
            expires=now + args.expires,
        )
        try:
            write_keyfile(output, keyfile)
        except BaseException:
            state.store.withdraw_token(token)
            raise
    print(f"wrote keyfile {output} for site {args.site!r}", file=out)
    print(f"  server addresses: {', '.join(keyfile.addresses)}", file=out)
    print(
        f"  token expires:    {_when(keyfile.expires)} (in {_span(args.expires)})",
        file=out,
    )
    if existing is not None and existing.enrolled and not existing.revoked:
        print(
            f"note: site {args.site!r} is enrolled already; enrolling with this keyfile replaces its certificate",
            file=out,
        )
    print(
        "The keyfile holds a one-time secret: move it to the site over a trusted channel and delete this copy.",
        file=out,
    )
    return 0


def _site_json(record: SiteRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "enrolled": record.enrolled,
        "enrolled_at": _iso(record.enrolled_at),
        "revoked": record.revoked,
        "revoked_at": _iso(record.revoked_at),
        "connected": record.connected,
        "peer": record.peer if record.connected else None,
        "connected_since": _iso(record.connected_since) if record.connected else None,
        "last_seen": _iso(record.last_seen),
        "certificate_fingerprint": record.certificate_fingerprint,
        "token_expires": _iso(record.token_expires),
        "sessions": [{"replica": s.replica_id, "peer": s.peer, "since": _iso(s.since)} for s in record.sessions],
    }


def _replica_cell(record: SiteRecord) -> str:
    """The REPLICAS cell: the ids of the replicas the site has a session with."""
    return ",".join(s.replica_id for s in record.sessions) or "-"


def _site_row(record: SiteRecord, now: datetime) -> list[str]:
    if record.enrolled:
        enrolled = _when(record.enrolled_at)
    elif record.token_expires is not None:
        verb = "expires" if record.token_expires > now else "expired"
        enrolled = f"pending (token {verb} {_when(record.token_expires)})"
    else:
        enrolled = "no"
    if record.connected:
        connected = f"yes, from {record.peer} since {_when(record.connected_since)}"
    elif record.last_seen is not None:
        connected = f"no (last seen {_when(record.last_seen)})"
    else:
        connected = "no"
    return [record.name, enrolled, _when(record.revoked_at), connected]


def _live_sites(state: ServerState, now: datetime) -> tuple[dict[str, Mapping[str, Any]] | None, str | None]:
    """
    The running server's live figures, by site, from its admin endpoints;
    or C{None} and why there are none (for the one line that says so).

    With several replicas, each live one that records an admin URL is
    asked, and a site's streams and bytes are the sum of its sessions
    (L{merge_sites}); a replica that does not answer is named in the line,
    and the others' figures are shown.
    """
    store = state.store
    replicas = store.live_replicas(now)
    if not replicas and not store.server_running(now):
        return None, "the tunnel server is not running"
    bases = [url for r in replicas if (url := store.get_meta(replica_url_key(r.replica_id)))]
    if not bases:
        shared = store.get_meta(ADMIN_URL_KEY)
        bases = [shared] if shared else []
    if not bases:
        return None, "the running tunnel server has no admin endpoint (--admin none)"
    answers, failures = [], []
    for base in bases:
        try:
            answers.append(fetch_sites(base, LIVE_TIMEOUT))
        except LiveUnavailable as e:
            failures.append(f"{sites_url(base)}: {e}")
    if not answers:
        return None, "; ".join(failures)
    if len(bases) == 1:
        return answers[0], None
    return merge_sites(answers), (
        f"only {len(answers)} of {len(bases)} replicas answered ({'; '.join(failures)})" if failures else None
    )


def _print_table(rows: list[list[str]], out: TextIO) -> None:
    """
    Print C{rows} (the header first) in columns two spaces apart; the last
    column is not padded, so that no line ends in blanks.
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)] + [row[-1]]
        print("  ".join(cells).rstrip(), file=out)


def _human_bytes(count: int) -> str:
    """C{1536} as C{1.5K}: short enough for a table cell."""
    value = float(count)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{count}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _live_cells(entry: Mapping[str, Any] | None) -> list[str]:
    """STREAMS, BYTES (to the site / from it) and RTT of one site; dashes for a site the server does not report."""
    if entry is None:
        return ["-", "-", "-"]
    rtt = entry.get("rtt_seconds")
    return [
        str(entry.get("streams", "-")),
        f"{_human_bytes(int(entry.get('bytes_to_site', 0)))}/{_human_bytes(int(entry.get('bytes_from_site', 0)))}",
        "-" if rtt is None else f"{float(rtt) * 1000:.1f}ms",
    ]


def _sites_list(args: argparse.Namespace, now: datetime, out: TextIO) -> int:
    state = ServerState.open_existing(args.state, args.database)
    with contextlib.closing(state):
        records = state.store.list_sites(args.clock)
        services = state.store.site_services()
        live, why = _live_sites(state, args.clock) if records else ({}, None)
    if why is not None and live is None:
        print(f"rtunnel: no live figures: {why}; listing the state database alone", file=args.stderr)
    elif why is not None:
        print(f"rtunnel: live figures incomplete: {why}", file=args.stderr)
    if args.json:
        listed = []
        for r in records:
            entry = _site_json(r)
            # as last announced (issue 11); {} for a site that announced none or never connected
            entry["services"] = {name: str(target) for name, target in sorted(services.get(r.name, {}).items())}
            figures = (live or {}).get(r.name, {})
            entry.update({key: figures.get(key) for key in LIVE_FIELDS})
            listed.append(entry)
        json.dump(listed, out, indent=2)
        out.write("\n")
        return 0
    if not records:
        print("no sites yet (create a keyfile with 'rtunnel keyfile create')", file=out)
        return 0
    header = ["SITE", "ENROLLED", "REVOKED", "SERVICES"] + (["STREAMS", "BYTES", "RTT"] if live is not None else [])
    header.append("REPLICAS")
    rows = [[*header, "CONNECTED"]]
    for r in records:
        row = _site_row(r, now)
        row.insert(3, format_services(services.get(r.name, {})) or "-")
        if live is not None:
            row[4:4] = _live_cells(live.get(r.name))
        row.insert(len(header) - 1, _replica_cell(r))
        rows.append(row)
    _print_table(rows, out)
    return 0


def _sites_revoke(args: argparse.Namespace, now: datetime, out: TextIO) -> int:
    state = ServerState.open_existing(args.state, args.database)
    with contextlib.closing(state):
        record = state.store.revoke_site(args.name, now)
    assert record.revoked_at is not None
    if record.revoked_at < now:
        print(
            f"site {args.name!r} was already revoked at {_when(record.revoked_at)}",
            file=out,
        )
    else:
        print(
            f"revoked site {args.name!r}; a running tunnel server cuts its tunnel "
            "within seconds. Only a new keyfile re-admits it.",
            file=out,
        )
    return 0


# -- forwards (issue 11) ------------------------------------------------------


def _add_forward_commands(commands: Any) -> None:
    forwards = commands.add_parser("forwards", help="add, remove and list forwards while the server runs")
    actions = forwards.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser(
        "add",
        help="add a forward; a running server listens on it within 2 s",
        description=(
            "Store a forward in the state database. A running tunnel server listens on it within "
            "2 seconds, without a restart; a server started later listens on it at start. The site "
            "need not exist yet."
        ),
    )
    add.add_argument(
        "spec",
        metavar="[BIND_ADDRESS:]PORT:SITE:HOST:HOSTPORT",
        type=_argument_type(_parse_forward, "forward"),
        help="as --forward: bind address (default 127.0.0.1), port, site, target host and port",
    )
    _add_state_arguments(add)
    add.set_defaults(run=_forwards_add)
    remove = actions.add_parser(
        "remove",
        help="remove a forward; a running server closes its listener within 2 s",
        description=(
            "Remove a forward stored with 'forwards add'. A running tunnel server closes its listener "
            "within 2 seconds; connections open through it go on until they end, unless --cut."
        ),
    )
    remove.add_argument(
        "address",
        metavar="[BIND_ADDRESS:]PORT",
        type=_argument_type(parse_forward_address, "address"),
        help="the forward's bind address (default 127.0.0.1) and port",
    )
    _add_state_arguments(remove)
    remove.add_argument("--cut", action="store_true", help="also close the connections open through it")
    remove.set_defaults(run=_forwards_remove)
    listing = actions.add_parser("list", help="list forwards, where they come from and their state")
    _add_state_arguments(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(run=_forwards_list)


def _parse_forward(text: str) -> ForwardSpec:
    try:
        return ForwardSpec.parse(text)
    except ValueError as e:
        raise ValueError(str(e).removeprefix("--forward ")) from None


def parse_forward_address(text: str) -> tuple[str, int]:
    """
    Read C{[BIND_ADDRESS:]PORT} (IPv6 in brackets) as a forward names its
    listening address, the bind address defaulting as in a forward spec.

    @raise ValueError: naming what is wrong.
    """
    parts = split_fields(text)
    if len(parts) == 1:
        bind_text, port_text = DEFAULT_BIND, parts[0]
    elif len(parts) == 2:
        bind_text, port_text = parts
    else:
        raise ValueError(f"{text!r}: expected [BIND_ADDRESS:]PORT")
    try:
        return parse_host(bind_text), parse_port(port_text, "listening port", minimum=0)
    except AddressError as e:
        raise ValueError(f"{text!r}: {e}") from None


def _forwards_add(args: argparse.Namespace, now: datetime, out: TextIO) -> int:
    spec: ForwardSpec = args.spec
    record = ForwardRecord(spec.bind, spec.port, spec.site, spec.target.host, spec.target.port)
    state = ServerState.open_existing(args.state, args.database)
    with contextlib.closing(state):
        site = state.store.site(spec.site)
        state.store.add_forward(record, now)
        running = state.store.server_running()
    if running:
        print(f"added forward {record.spec}; the running tunnel server listens on it within 2 s", file=out)
    else:
        print(f"added forward {record.spec}; the tunnel server listens on it when it starts", file=out)
    if site is None:
        print(
            f"note: site {spec.site!r} does not exist yet; the forward works once it enrolls "
            f"(create its keyfile with 'rtunnel keyfile create --site {spec.site}')",
            file=out,
        )
    print("check with 'rtunnel forwards list'", file=out)
    return 0


def _forwards_remove(args: argparse.Namespace, now: datetime, out: TextIO) -> int:
    bind, port = args.address
    state = ServerState.open_existing(args.state, args.database)
    with contextlib.closing(state):
        running = state.store.server_running()
        record = state.store.remove_forward(bind, port, args.cut)
    if not running:
        print(f"removed forward {record.spec}", file=out)
    elif args.cut:
        print(
            f"removed forward {record.spec}; the running tunnel server closes its listener and the "
            "connections open through it within 2 s",
            file=out,
        )
    else:
        print(
            f"removed forward {record.spec}; the running tunnel server closes its listener within 2 s "
            "(connections open through it go on until they end; --cut closes them)",
            file=out,
        )
    return 0


def _forward_json(forward: ForwardState) -> dict[str, Any]:
    return {
        "spec": forward.spec,
        "bind": forward.bind,
        "port": forward.port,
        "site": forward.site,
        "host": forward.host,
        "hostport": forward.hostport,
        "source": forward.source,
        "state": forward.state,
    }


def _forwards_list(args: argparse.Namespace, now: datetime, out: TextIO) -> int:
    state = ServerState.open_existing(args.state, args.database)
    with contextlib.closing(state):
        forwards = state.store.list_forwards()
        running = state.store.server_running()
    if args.json:
        json.dump([_forward_json(f) for f in forwards], out, indent=2)
        out.write("\n")
        return 0
    if not forwards:
        if running:
            print("no forwards (add one with 'rtunnel forwards add')", file=out)
        else:
            print("no forwards stored (the tunnel server is not running)", file=out)
        return 0
    rows = [["FORWARD", "SOURCE", "STATE"]] + [[f.spec, f.source, f.state] for f in forwards]
    _print_table(rows, out)
    if not running:
        print("(the tunnel server is not running: its command-line forwards are not known)", file=out)
    return 0


# -- replicas (issue 13) ------------------------------------------------------


def _add_replica_commands(commands: Any) -> None:
    replicas = commands.add_parser("replicas", help="the tunnel server replicas sharing the state database")
    actions = replicas.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        help="list the live replicas and their last heartbeat",
        description=(
            "List the tunnel server replicas that recorded a heartbeat in the state database within the "
            "replica timeout: id, the address it advertises to sites, process id, host, when it started, "
            "and how long ago its last heartbeat was."
        ),
    )
    _add_state_arguments(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(run=_replicas_list)


def _heartbeat_age(record: ReplicaRecord, now: datetime) -> float:
    """Seconds since the replica's last heartbeat (never below zero: clocks of two hosts differ a little)."""
    return max(0.0, (now - record.heartbeat_at).total_seconds())


def _replica_json(record: ReplicaRecord, now: datetime) -> dict[str, Any]:
    return {
        "replica": record.replica_id,
        "advertise": record.advertise or None,
        "pid": record.pid,
        "host": record.host,
        "started_at": _iso(record.started_at),
        "heartbeat_at": _iso(record.heartbeat_at),
        "heartbeat_age_seconds": round(_heartbeat_age(record, now), 3),
    }


def _replicas_list(args: argparse.Namespace, now: datetime, out: TextIO) -> int:
    state = ServerState.open_existing(args.state, args.database)
    with contextlib.closing(state):
        replicas = state.store.live_replicas(args.clock)
    if args.json:
        json.dump([_replica_json(r, args.clock) for r in replicas], out, indent=2)
        out.write("\n")
        return 0
    if not replicas:
        print("no tunnel server replica is running (none sent a heartbeat lately)", file=out)
        return 0
    rows = [["REPLICA", "ADVERTISE", "PID", "HOST", "STARTED", "LAST HEARTBEAT"]]
    for r in replicas:
        rows.append(
            [
                r.replica_id,
                r.advertise or "-",
                "-" if r.pid is None else str(r.pid),
                r.host or "-",
                _when(r.started_at),
                f"{_heartbeat_age(r, args.clock):.1f}s ago",
            ]
        )
    _print_table(rows, out)
    return 0


def _add_proxy_user_commands(commands: Any) -> None:
    users = commands.add_parser("proxy-users", help="users of the front doors (--proxy-users FILE)")
    actions = users.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser(
        "add",
        help="add a user to a users file (created mode 600); the password is read from stdin, never argv",
        description=(
            "Add USER to FILE with a scrypt hash of the password read from standard input (one line; asked twice "
            "on a terminal). The running server reads the file at start: restart it to apply."
        ),
    )
    add.add_argument("user", metavar="USER", help="user name (no spaces or ':')")
    add.add_argument("--file", required=True, metavar="FILE", help="the users file (--proxy-users of the server)")
    add.set_defaults(run=_proxy_users_add)


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise ValueError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def _proxy_users_add(args: argparse.Namespace, now: datetime, out: TextIO) -> int:
    try:
        if os.path.exists(args.file) and args.user in UserStore.load(args.file):
            raise ValueError(f"user '{args.user}' is already in {args.file}")
        password = _read_password()
        if not password:
            raise ValueError("empty password (give it on standard input)")
        line = make_line(args.user, password)
    except ValueError as e:
        print(f"rtunnel: error: {_one_line(str(e))}", file=sys.stderr)
        return 1
    fd = os.open(args.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        if f.tell() and not _ends_with_newline(args.file):
            f.write("\n")
        f.write(line + "\n")
    print(f"added user {args.user} to {args.file}", file=out)
    return 0


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    now: datetime | None = None,
) -> int:
    """
    Run the C{rtunnel} command.

    @param argv: arguments without the program name (default C{sys.argv[1:]}).
    @param stdout: where results go (default C{sys.stdout}).
    @param stderr: where the one-line error goes (default C{sys.stderr}).
    @param now: the current time (default: the system clock).

    @return: the exit status: 0 on success, 1 on a runtime error, 2 on a
        usage error.
    """
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    arguments = sys.argv[1:] if argv is None else list(argv)

    def fail(message: str, status: int) -> int:
        print(f"rtunnel: error: {_one_line(message)}", file=err)
        return status

    parser = build_parser()
    try:
        with contextlib.redirect_stdout(out):
            args = parser.parse_args(arguments)
    except _UsageError as e:
        return fail(str(e), 2)
    except _Exit as e:
        return e.status
    # Whole seconds: the keyfile states its expiry to the second, and the
    # server must agree with it exactly.
    exact = datetime.now(UTC) if now is None else now
    when = exact.replace(microsecond=0)
    args.stderr = err  # for notes that are not errors (sites list without live figures)
    args.clock = exact  # to the microsecond: how old a replica's heartbeat is, whether it is live
    try:
        status: int = args.run(args, when, out)
        return status
    except (IdentityError, OSError) as e:
        return fail(str(e), 1)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except Exception as e:
        if os.environ.get("RTUNNEL_DEBUG"):
            raise
        return fail(
            f"internal error ({type(e).__name__}: {e}); set RTUNNEL_DEBUG=1 for a traceback",
            1,
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
