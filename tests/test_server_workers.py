"""
C{--workers} and C{--worker-of} on the real server plugin options
(rtunnel.cli.server_workers): parsed and checked as usage errors, the
workers' command lines and ids from what the supervisor was given, the
supervisor built on a real state directory, and a worker's service.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.adapter import net
from rtunnel.cli import server_tap
from rtunnel.cli.server_workers import base_replica_id, make_supervisor, worker_service
from rtunnel.roles.server import TunnelServerService
from rtunnel.roles.workers import TWISTD, SupervisorWatch, WorkerMonitor
from tests.roles_helpers import temp_dir


def parse(*argv: str) -> server_tap.Options:
    options = server_tap.Options()
    options.parseOptions(list(argv))
    return options


class OptionTests(SynchronousTestCase):
    def test_default_is_one_process(self) -> None:
        options = parse("--state=/s")
        self.assertEqual(options.config.workers, 1)
        self.assertIsNone(options["worker-of"])

    def test_workers_and_the_plugin_options_as_given(self) -> None:
        argv = ["--state", "/s", "--listen", "tcp:5600", "--workers", "3"]
        options = parse(*argv)
        self.assertEqual(options.config.workers, 3)
        self.assertEqual(options.argv, argv)

    def test_usage_errors(self) -> None:
        cases = [
            (["--workers", "0"], "--workers 0: give a number from 1 to 64"),
            (["--workers", "65"], "--workers 65: give a number from 1 to 64"),
            (["--workers", "-2"], "--workers -2: give a number from 1 to 64"),
            (["--workers", "\u00b2"], "--workers \u00b2: give a number from 1 to 64"),  # a digit int() refuses
            (["--workers", "2", "--listen", "tcp:0"], "--listen: endpoint 'tcp:0:backlog=4096' cannot be shared"),
            (["--workers", "2", "--forward", "0:alpha:h:1"], "--forward 127.0.0.1:0 -> alpha:h:1: endpoint"),
            (["--workers", "2", "--socks", "unix:/s.sock"], "--socks: endpoint 'unix:/s.sock:backlog=1024'"),
            (["--workers", "2", "--admin", "unix:/a.sock"], "--admin unix:/a.sock: with --workers each worker"),
            (["--workers", "2", "--advertise", "10.0.0.1:5500"], "leave --advertise out with --workers"),
            (["--workers", "10", "--replica-id", "r" * 61], "worker 10 would be '" + "r" * 61 + "/w10'"),
            (["--workers", "2", "--worker-of", "7"], "--worker-of is set by --workers on its workers"),
            (["--worker-of", "me"], "--worker-of is set by --workers on its workers"),
        ]
        for argv, message in cases:
            with self.assertRaises(usage.UsageError, msg=repr(argv)) as raised:
                parse("--state=/s", *argv)
            self.assertIn(message, str(raised.exception), repr(argv))

    def test_one_worker_listens_anywhere(self) -> None:
        """Without workers nothing new is asked of the endpoints."""
        options = parse("--state=/s", "--listen", "unix:/t.sock", "--admin", "unix:/a.sock")
        self.assertEqual(options.config.workers, 1)

    def test_base_replica_id(self) -> None:
        """--replica-id, or HOSTNAME:PORT shortened so that BASE/wN fits 64 characters."""
        self.assertEqual(base_replica_id(parse("--state=/s", "--replica-id", "edge").config), "edge")
        config = parse("--state=/s", "--listen", "tcp:5600", "--workers", "12").config
        base = base_replica_id(config)
        self.assertTrue(base.endswith(":5600"), base)
        self.assertLessEqual(len(base + "/w12"), 64)


class SupervisorTests(SynchronousTestCase):
    def test_built_on_the_state_with_one_command_per_worker(self) -> None:
        """
        The state is created by the supervisor itself (then closed); worker
        K is twistd with the supervisor's options, its own id, admin port
        and the supervisor's pid.
        """
        directory = os.path.join(temp_dir(self), "state")
        argv = ["--state", directory, "--listen", "tcp:5600", "--admin", "7001", "--workers=2", "--replica-id=e"]
        options = parse(*argv)
        service = make_supervisor(options, options.argv, Clock())
        self.assertTrue(os.path.exists(os.path.join(directory, "ca.crt")))
        (monitor,) = list(service)  # type: ignore[call-overload]
        self.assertIsInstance(monitor, WorkerMonitor)
        for index in (1, 2):
            process = monitor._processes[f"w{index}"]
            self.assertEqual(
                process.args,
                [
                    process.args[0],
                    "-c",
                    TWISTD,
                    "--nodaemon",
                    "--pidfile=",
                    "rtunnel-server",
                    f"--state={directory}",
                    "--listen=tcp:5600",
                    "--workers=1",
                    f"--replica-id=e/w{index}",
                    f"--worker-of={os.getpid()}",
                    f"--admin=tcp:{7000 + index}",
                ],
            )

    def test_make_service_is_the_supervisor_with_workers(self) -> None:
        options = parse("--state", os.path.join(temp_dir(self), "s"), "--listen", "tcp:5600", "--workers", "2")
        service = server_tap.makeService(options)
        self.assertNotIsInstance(service, TunnelServerService)
        self.assertIsInstance(list(service)[0], WorkerMonitor)  # type: ignore[call-overload]


class WorkerServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(net.share_ports, net.sharing_ports())

    def test_a_server_of_its_own_is_unchanged(self) -> None:
        net.share_ports(False)
        service: Any = object()
        self.assertIs(worker_service(parse("--state=/s"), service, Clock()), service)
        self.assertFalse(net.sharing_ports())

    def test_a_worker_shares_its_ports_and_watches_its_supervisor(self) -> None:
        net.share_ports(False)
        inner = MultiService()
        service = worker_service(parse("--state=/s", "--worker-of", "4242"), inner, Clock())
        self.assertTrue(net.sharing_ports())
        children = list(service)  # type: ignore[call-overload]
        self.assertIs(children[0], inner)
        self.assertIsInstance(children[1], SupervisorWatch)
        self.assertEqual(children[1].supervisor_pid, 4242)
