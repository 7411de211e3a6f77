"""
C{--workers N} (rtunnel.roles.workers): what each worker is given (command
line, admin endpoint, replica id), what the supervisor refuses before
anything starts, and the monitor's logging, restarts and stop, with a fake
process reactor and a Clock.
"""

from __future__ import annotations

import signal
from typing import Any

from attrs import frozen
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.roles.workers import (
    MAX_WORKERS,
    TWISTD,
    SupervisorWatch,
    WorkerMonitor,
    WorkersError,
    build_supervisor,
    check_workers,
    worker_admin,
    worker_arguments,
)


class AdminTests(SynchronousTestCase):
    def test_port_moves_up_by_worker_number(self) -> None:
        """Worker K serves the configured port + K - 1, the rest of the endpoint unchanged."""
        self.assertEqual(worker_admin("tcp:5501:interface=127.0.0.1", 1), "tcp:5501:interface=127.0.0.1")
        self.assertEqual(worker_admin("tcp:5501:interface=127.0.0.1", 3), "tcp:5503:interface=127.0.0.1")
        self.assertEqual(worker_admin("tcp:interface=127.0.0.1:port=5501", 2), "tcp:interface=127.0.0.1:port=5502")
        self.assertEqual(worker_admin(r"tcp6:9000:interface=\:\:1", 4), r"tcp6:9003:interface=\:\:1")
        self.assertEqual(worker_admin("ssl:8443:privateKey=k.pem", 2), "ssl:8444:privateKey=k.pem")
        self.assertEqual(worker_admin(" 5501 ", 2), "tcp:5502")

    def test_off_and_port_zero_stay(self) -> None:
        """No admin endpoint stays none; port 0 lets the kernel pick one per worker."""
        self.assertIsNone(worker_admin(None, 2))
        self.assertEqual(worker_admin("tcp:0:interface=127.0.0.1", 2), "tcp:0:interface=127.0.0.1")

    def test_refused(self) -> None:
        """A UNIX socket, no port, or a port past 65535 for the last worker: refused, saying why."""
        cases = {
            ("unix:/run/rtunnel-admin.sock", 2): "give a tcp:, tcp6: or ssl: endpoint (or none)",
            ("tcp:interface=127.0.0.1", 2): "names no port",
            ("tcp:65535", 2): "worker 2 would serve its admin endpoint on port 65536",
        }
        for (admin, index), reason in cases.items():
            with self.assertRaises(WorkersError) as caught:
                worker_admin(admin, index)
            self.assertIn(reason, str(caught.exception))
            self.assertIn(f"--admin {admin}", str(caught.exception))


@frozen
class Config:
    """The fields of ServerConfig the workers read."""

    state_dir: str = "/state"
    database: str | None = None
    public_addresses: tuple[str, ...] = ()
    drain_grace: float = 10.0
    admin: str | None = "tcp:5501:interface=127.0.0.1"
    workers: int = 2


class CheckTests(SynchronousTestCase):
    listeners = (("--listen", "tcp:5500:backlog=1024"), ("--socks", "tcp:1080:interface=127.0.0.1:backlog=1024"))

    def test_a_good_configuration_passes(self) -> None:
        check_workers(Config(workers=MAX_WORKERS), self.listeners)

    def test_count_out_of_range(self) -> None:
        for count in (0, -1, MAX_WORKERS + 1):
            with self.assertRaises(WorkersError) as caught:
                check_workers(Config(workers=count), self.listeners)
            self.assertEqual(str(caught.exception), f"--workers {count}: give a number from 1 to 64")

    def test_one_worker_checks_nothing_more(self) -> None:
        """A single server listens as always: a UNIX socket and any admin endpoint are fine."""
        check_workers(Config(workers=1, admin="unix:/a.sock"), [("--listen", "unix:/t.sock")])

    def test_unshareable_listener_named(self) -> None:
        with self.assertRaises(WorkersError) as caught:
            check_workers(Config(), [*self.listeners, ("--connect-proxy", "unix:/p.sock")])
        self.assertIn("--connect-proxy: endpoint 'unix:/p.sock' cannot be shared by --workers", str(caught.exception))

    def test_admin_checked_for_the_last_worker(self) -> None:
        with self.assertRaises(WorkersError) as caught:
            check_workers(Config(workers=3, admin="tcp:65534"), self.listeners)
        self.assertIn("worker 3 would serve its admin endpoint on port 65536", str(caught.exception))


class StandIn(usage.Options):
    """Options shaped like the server plugin's: parameters, a flag, a repeated option and a short one."""

    optParameters = [
        ["state", None, None, ""],
        ["listen", None, "tcp:5500", ""],
        ["admin", None, None, ""],
        ["workers", None, "1", ""],
        ["worker-of", None, None, ""],
        ["replica-id", None, None, ""],
        ["log-level", "l", "info", ""],
    ]
    optFlags = [["quiet", "q", ""]]

    def __init__(self) -> None:
        super().__init__()
        self["forward"] = []

    def opt_forward(self, spec: str) -> None:
        self["forward"].append(spec)


class ArgumentsTests(SynchronousTestCase):
    def arguments(self, argv: list[str], index: int = 2) -> list[str]:
        options = StandIn()
        options.parseOptions(argv)
        return worker_arguments(options, argv, index, f"edge:5500/w{index}", "tcp:5502", 4242, python="/py")

    def test_command_line(self) -> None:
        """
        The supervisor's options in their order (an abbreviated one in full),
        those each worker has its own value of replaced, twistd in the
        foreground without a pidfile.
        """
        argv = [
            "--stat",
            "/srv/state",
            "--workers=3",
            "--forward",
            "8080:alpha:127.0.0.1:80",
            "--admin",
            "tcp:5501",
            "--forward=-9:odd",
            "-q",
            "-l",
            "debug",
            "--replica-id",
            "edge",
        ]
        self.assertEqual(
            self.arguments(argv),
            [
                "/py",
                "-c",
                TWISTD,
                "--nodaemon",
                "--pidfile=",
                "rtunnel-server",
                "--state=/srv/state",
                "--forward=8080:alpha:127.0.0.1:80",
                "--forward=-9:odd",
                "-q",
                "-l",
                "debug",
                "--workers=1",
                "--replica-id=edge:5500/w2",
                "--worker-of=4242",
                "--admin=tcp:5502",
            ],
        )

    def test_admin_off(self) -> None:
        options = StandIn()
        options.parseOptions(["--state", "s"])
        argv = worker_arguments(options, ["--state", "s"], 1, "e/w1", None, 7, python="/py")
        self.assertEqual(argv[-1], "--admin=none")
        self.assertIn("--worker-of=7", argv)


class FakeProcess:
    """A process transport whose end the test decides."""

    def __init__(self, reactor: FakeProcessReactor, protocol: Any, args: list[str], env: dict[str, str]) -> None:
        self.reactor = reactor
        self.proto = protocol
        self.args = args
        self.env = env
        self.pid: int | None = reactor.next_pid
        reactor.next_pid += 1
        self.signals: list[str] = []
        protocol.makeConnection(self)

    def signalProcess(self, name: str) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def end(self, reason: Failure) -> None:
        self.pid = None
        self.proto.processEnded(reason)


class FakeProcessReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.next_pid = 100
        self.spawned: list[FakeProcess] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None, **_: Any) -> FakeProcess:
        process = FakeProcess(self, protocol, args, dict(env or {}))
        self.spawned.append(process)
        return process


def killed(signum: int) -> Failure:
    return Failure(ProcessTerminated(exitCode=None, signal=signum))


class MonitorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.lines: list[str] = []
        self.levels: list[LogLevel] = []

        def observer(event: dict[str, Any]) -> None:
            self.lines.append(formatEvent(event))
            self.levels.append(event["log_level"])

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.prepared: list[int] = []

    def supervisor(self, workers: int = 2) -> Any:
        def prepare() -> None:
            self.prepared.append(len(self.reactor.spawned))

        service = build_supervisor(
            Config(workers=workers, drain_grace=7.5), lambda k: ["/py", f"worker-{k}"], self.reactor, prepare
        )
        self.assertEqual(self.prepared, [0], "the state is prepared once, before any worker")
        return service

    def test_workers_started_restarted_and_stopped(self) -> None:
        """
        Each worker starts with its own command line and the supervisor's
        environment; one killed with -9 is logged with its pid and signal and
        started again; stopping sends TERM to all and ends when the last has.
        """
        service = self.supervisor()
        (monitor,) = list(service)
        self.assertIsInstance(monitor, WorkerMonitor)
        self.assertEqual(monitor.killTime, 13)
        service.startService()
        first, second = self.reactor.spawned
        self.assertEqual([first.args, second.args], [["/py", "worker-1"], ["/py", "worker-2"]])
        self.assertEqual(first.env["PYTHONUNBUFFERED"], "1")
        self.assertIn("worker w1 started (pid 100)", self.lines)
        self.assertIn("worker w2 started (pid 101)", self.lines)

        self.reactor.advance(10)  # a worker that lived 10 s is restarted at once
        first.end(killed(signal.SIGKILL))
        self.assertIn("worker w1 (pid 100) ended by signal 9 (SIGKILL); restarting it", self.lines)
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.spawned), 3)
        replacement = self.reactor.spawned[2]
        self.assertEqual(replacement.args, ["/py", "worker-1"])
        self.assertIn("worker w1 started (pid 102)", self.lines)

        stopping = service.stopService()
        self.assertEqual(replacement.signals, ["TERM"])
        self.assertEqual(second.signals, ["TERM"])
        self.assertNoResult(stopping)
        second.end(Failure(ProcessDone(0)))
        self.assertNoResult(stopping)
        replacement.end(Failure(ProcessTerminated(exitCode=1)))
        self.successResultOf(stopping)
        self.assertIn("worker w2 (pid 101) exited with status 0", self.lines)
        self.assertIn("worker w1 (pid 102) exited with status 1", self.lines)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 3, "no restart once stopping")

    def test_quick_deaths_back_off(self) -> None:
        """
        A worker dying within 10 s of its start (after its start-up, on a
        port it cannot listen on) is restarted after 1, 2, 4 s.
        """
        service = self.supervisor(workers=1)
        service.startService()
        for delay in (1, 2, 4):
            self.reactor.advance(9.9)
            self.reactor.spawned[-1].end(Failure(ProcessTerminated(exitCode=1)))
            count = len(self.reactor.spawned)
            self.reactor.advance(delay - 0.01)
            self.assertEqual(len(self.reactor.spawned), count)
            self.reactor.advance(0.01)
            self.assertEqual(len(self.reactor.spawned), count + 1)
        self.reactor.spawned[-1].end(Failure(ProcessDone(0)))
        self.successResultOf(service.stopService())

    def test_worker_lines_relayed_under_its_name(self) -> None:
        """
        Each line as the worker wrote it, its timestamp dropped, under its
        name and at its level (info when it names none); a last partial line
        too.
        """
        service = self.supervisor(workers=1)
        service.startService()
        (process,) = self.reactor.spawned
        process.proto.outReceived(b"2026-12-06T02:15:54+0000 [rtunnel.x#info] tunnel server listening\npartial")
        self.assertIn("[w1] [rtunnel.x#info] tunnel server listening", self.lines)
        process.proto.errReceived(b"2026-12-06T02:15:55+0000 [rtunnel.y#warn] a warning\nTraceback (most recent\n")
        process.end(Failure(ProcessDone(0)))
        self.assertIn("[w1] partial", self.lines)
        levels = {line: level for line, level in zip(self.lines, self.levels, strict=True)}
        self.assertEqual(levels["[w1] [rtunnel.x#info] tunnel server listening"], LogLevel.info)
        self.assertEqual(levels["[w1] [rtunnel.y#warn] a warning"], LogLevel.warn)
        self.assertEqual(levels["[w1] Traceback (most recent"], LogLevel.info)


class FakeReactor(Clock):
    running = True

    def __init__(self) -> None:
        super().__init__()
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1


class WatchTests(SynchronousTestCase):
    def test_worker_stops_when_supervisor_is_gone(self) -> None:
        reactor = FakeReactor()
        parents = [4242]
        watch = SupervisorWatch(4242, reactor, interval=1.0)
        watch.parent_pid = lambda: parents[-1]
        watch.startService()
        reactor.advance(5)
        self.assertEqual(reactor.stops, 0)
        parents.append(1)  # re-parented to init: the supervisor was killed
        reactor.advance(1)
        self.assertEqual(reactor.stops, 1)
        reactor.advance(5)
        self.assertEqual(reactor.stops, 1, "stopped once, the poll ended")
        watch.stopService()
