"""One driver process of the fleet benchmark: many rtunnel sites on one reactor.

Started by bench/fleet.py (never by hand)::

    python bench/fleet_driver.py --config DRIVER.json --log DRIVER.log

``DRIVER.json`` lists this driver's sites: ``[[name, state_dir, keyfile], ...]``.
Every site is a ``TunnelClientService`` of the embedding API (docs/quickstart.md,
"Embedding the site role") with its own state directory, all sharing one epoll
reactor and one ``TargetConnector`` that serves ``echo:7`` in-process
(``local_factories``); nothing else is reachable at these sites.

The orchestrator talks to the driver over stdin/stdout, one JSON object per
line, strictly request/response (the only unsolicited line is the first,
``{"ev": "ready"}``, once every site is loaded):

* ``{"cmd": "start", "batch": B}``: start every site, B per reactor turn (so the
  first dials leave before the last keys are generated); answers ``starting``
  at once, so that all drivers start together (``status`` counts the started).
* ``{"cmd": "status", "since": T}``: counts now: sites up (a session whose HELLO
  arrived with no refusal), up with a session that began at or after ``T``
  (``time.monotonic()``, which is system-wide on Linux), enrolled, fatal, total
  sessions, and the latest enrollment and session start.
* ``{"cmd": "times", "since": T}``: the session start times of every site whose
  current session began at or after ``T`` (and enrollment times), for percentiles.
* ``{"cmd": "events"}``: warnings and errors logged since the last ``events``,
  counted by kind (the first 200 are also written to the driver's log in full;
  formatting tens of thousands of lines, tracebacks included, during a
  reconnect storm would take CPU from the server on the same cores).
* ``{"cmd": "exit"}``: stop the reactor (no drain: the orchestrator is done).

End of stdin (the orchestrator died) stops the reactor too.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from twisted.internet import epollreactor  # noqa: E402

epollreactor.install()

from twisted.internet import reactor, stdio  # noqa: E402
from twisted.internet.protocol import Factory  # noqa: E402
from twisted.logger import ILogObserver, LogLevel, globalLogBeginner, textFileLogObserver  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402
from twisted.protocols.wire import Echo  # noqa: E402
from zope.interface import implementer  # noqa: E402

from rtunnel.identity.keyfile import read_keyfile  # noqa: E402
from rtunnel.identity.state import SiteState  # noqa: E402
from rtunnel.roles.site import SitePolicy, TunnelClientService  # noqa: E402
from rtunnel.roles.target import Target, TargetConnector, tcp_endpoints  # noqa: E402

ECHO_TARGET = Target.parse("echo:7")


class Record:
    """What the driver knows about one site (times are ``time.monotonic()``)."""

    __slots__ = ("name", "up", "up_at", "enrolled_at", "sessions", "fatal")

    def __init__(self, name: str) -> None:
        self.name = name
        self.up = False
        self.up_at = 0.0
        self.enrolled_at = 0.0
        self.sessions = 0
        self.fatal: str | None = None


class FleetSite(TunnelClientService):
    """``TunnelClientService`` that notes when its site is enrolled and up.

    ``prepare_connection`` is the service's own "connection made" test (the
    server's HELLO arrived with no refusal): the site counts as up exactly when
    the site's ``ReconnectingService`` counts the attempt as a success.  ``_start_tunnel`` is
    where the service goes once enrollment is done (or was not needed).
    """

    def __init__(self, record: Record, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.record = record

    def _start_tunnel(self) -> None:
        if not self.record.enrolled_at:
            self.record.enrolled_at = time.monotonic()
        super()._start_tunnel()

    def prepare_connection(self, protocol: Any) -> Any:
        rec = self.record

        def up(result: object) -> object:
            rec.up, rec.up_at = True, time.monotonic()
            rec.sessions += 1

            def down(_: object) -> None:
                rec.up = False

            protocol.when_closed().addBoth(down)
            return result

        return super().prepare_connection(protocol).addCallback(up)


@implementer(ILogObserver)
class CountingObserver:
    """Counts warnings and worse by kind; writes only the first ``verbatim`` of them in full."""

    LEVELS = {LogLevel.warn, LogLevel.error, LogLevel.critical}

    def __init__(self, out: TextIO, verbatim: int = 200) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.write = textFileLogObserver(out)
        self.left = verbatim

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level") not in self.LEVELS:
            return
        failure = event.get("log_failure") or event.get("failure")
        text = event.get("log_text")
        if failure is not None:
            key = f"traceback: {failure.type.__name__}: {str(failure.value)[:120]}"
        elif event.get("log_format") == "{log_text}" and text:
            # a legacy log.err() (an unhandled error): its last line names the exception
            key = "traceback: " + str(text).strip().splitlines()[-1][:140]
        else:
            key = str(event.get("log_format") or event.get("log_text") or "?")
            reason = event.get("reason")
            if reason is not None:
                key = key.replace("{reason}", str(reason)[:100])
        self.counts[f"{event['log_level'].name}: {key}"] += 1
        if self.left > 0:
            self.left -= 1
            self.write(event)

    def take(self) -> dict[str, int]:
        counts, self.counts = dict(self.counts), collections.Counter()
        return counts


class Control(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, driver: Driver, events: CountingObserver) -> None:
        self.driver = driver
        self.events = events

    def connectionMade(self) -> None:
        self.reply({"ev": "ready", "sites": len(self.driver.records), "load_s": round(self.driver.load_s, 3)})

    def reply(self, obj: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    def lineReceived(self, line: bytes) -> None:
        msg = json.loads(line)
        cmd = msg.get("cmd")
        if cmd == "start":
            self.driver.start(int(msg.get("batch", 100)))
            self.reply({"ev": "starting"})
        elif cmd == "status":
            self.reply(self.driver.status(float(msg.get("since", 0.0))))
        elif cmd == "times":
            self.reply(self.driver.times(float(msg.get("since", 0.0))))
        elif cmd == "events":
            self.reply({"ev": "events", "counts": self.events.take()})
        elif cmd == "exit":
            self.reply({"ev": "bye"})
            reactor.callLater(0, reactor.stop)
        else:
            self.reply({"ev": "error", "error": f"unknown command {cmd!r}"})

    def connectionLost(self, reason: object = None) -> None:
        if reactor.running:
            reactor.stop()


class Driver:
    def __init__(self, sites: list[list[str]]) -> None:
        t0 = time.monotonic()
        policy = SitePolicy()  # defaults: keepalive 10 s / 30 s, retry 1 s doubling to 30 s
        connector = TargetConnector(
            (),
            tcp_endpoints(reactor, policy.connect_timeout),
            reactor,
            local_factories={ECHO_TARGET: Factory.forProtocol(Echo)},
        )
        self.records: list[Record] = []
        self.services: list[FleetSite] = []
        self.started = 0
        for name, state_dir, keyfile in sites:
            rec = Record(name)

            def fatal(message: str, rec: Record = rec) -> None:
                rec.fatal = message
                print(f"site {rec.name}: FATAL: {message}", file=sys.stderr, flush=True)

            state = SiteState.load(state_dir)
            kf = read_keyfile(keyfile) if keyfile else None
            self.records.append(rec)
            self.services.append(FleetSite(rec, reactor, state, kf, connector, policy, fatal))
        self.load_s = time.monotonic() - t0

    def start(self, batch: int) -> None:
        todo = list(self.services)

        def more() -> None:
            for svc in todo[:batch]:
                svc.startService()
                self.started += 1
            del todo[:batch]
            if todo:
                reactor.callLater(0, more)

        more()

    def status(self, since: float) -> dict[str, Any]:
        recs = self.records
        up = [r for r in recs if r.up]
        return {
            "ev": "status",
            "n": len(recs),
            "started": self.started,
            "up": len(up),
            "up_since": sum(1 for r in up if r.up_at >= since),
            "enrolled": sum(1 for r in recs if r.enrolled_at),
            "fatal": sum(1 for r in recs if r.fatal is not None),
            "sessions": sum(r.sessions for r in recs),
            "last_up": max((r.up_at for r in up), default=0.0),
            "last_enrolled": max((r.enrolled_at for r in recs), default=0.0),
            "first_fatal": next((f"{r.name}: {r.fatal}" for r in recs if r.fatal), None),
        }

    def times(self, since: float) -> dict[str, Any]:
        return {
            "ev": "times",
            "up": [round(r.up_at, 4) for r in self.records if r.up and r.up_at >= since],
            "enrolled": [round(r.enrolled_at, 4) for r in self.records if r.enrolled_at >= since],
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--log", required=True, type=Path)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Warnings and worse are counted (the first ones written in full); rtunnel's
    # info lines (one per connect and per site) are not even formatted.
    from rtunnel.logs import set_level

    set_level(LogLevel.warn)
    events = CountingObserver(open(args.log, "a", buffering=1))  # noqa: SIM115 (open for the process's life)
    globalLogBeginner.beginLoggingTo([events], redirectStandardIO=False)
    driver = Driver(json.loads(args.config.read_text()))
    stdio.StandardIO(Control(driver, events))
    reactor.run()


if __name__ == "__main__":
    main()
