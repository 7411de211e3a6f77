"""
The fence around the Twisted internals of the fast I/O (rtunnel.adapter.fence).

The checks run against altered copies of Twisted's own classes (an attribute
deleted, a signature changed, a layout that cannot switch class): each must
be named in the problem list, the decision must then be stock I/O, announced
by exactly one warning. RTUNNEL_STOCK_IO is read when the module is first
imported, checked in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial import unittest

from rtunnel.adapter import fence
from rtunnel.adapter.eager import EagerClient, EagerServer, _EagerWrite

ROOT = Path(__file__).resolve().parent.parent


def copy_class(cls: type, drop: tuple[str, ...] = (), bases: tuple[type, ...] | None = None, **replace: Any) -> type:
    """
    A copy of C{cls} made from its own namespace, with the names in C{drop}
    deleted and those in C{replace} replaced: a stand-in for the same class
    in a Twisted release that changed it.
    """
    namespace = {
        name: value
        for name, value in vars(cls).items()
        if name not in drop and (not name.startswith("__") or name in ("__init__", "__module__", "__doc__"))
    }
    namespace.update(replace)
    return type(cls.__name__, cls.__bases__ if bases is None else bases, namespace)


def rebased(cls: type, old: type, new: type) -> type:
    """A copy of C{cls} with base C{old} replaced by C{new}."""
    return copy_class(cls, bases=tuple(new if base is old else base for base in cls.__bases__))


def port_for(server: type) -> type:
    """A C{tcp.Port} that accepts connections as C{server}."""
    return type("Port", (tcp.Port,), {"transport": server})


class Recorded:
    """A Logger that keeps its events."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.log = Logger(observer=self.events.append)

    def lines(self) -> list[tuple[LogLevel, str]]:
        return [(event["log_level"], formatEvent(event)) for event in self.events]


class CheckTests(unittest.SynchronousTestCase):
    def test_installed_twisted_passes(self) -> None:
        """
        The Twisted in this environment has every internal, in the expected
        shape: the fast path runs (this is the test that fails first when
        the pinned upper bound is raised to a release that changed them).
        """
        self.assertEqual(fence.check(), [])
        self.assertEqual(fence.current(), fence.decide(os.environ))

    def test_tested_range_is_the_pin(self) -> None:
        """The range the warning names is the one setup.cfg pins."""
        setup = (ROOT / "setup.cfg").read_text()
        self.assertIn(f"    {fence.TESTED_TWISTED}\n", setup)

    def test_faithful_copies_pass(self) -> None:
        """
        The copies the other tests alter are faithful when nothing is
        altered, so each problem they find comes from the alteration alone.
        """
        connection = copy_class(tcp.Connection)
        server = rebased(tcp.Server, tcp.Connection, connection)
        self.assertEqual(fence.check(server=server, port=port_for(server)), [])
        self.assertEqual(fence.check(tls=copy_class(TLSMemoryBIOProtocol)), [])

    def test_missing_transport_flag(self) -> None:
        """
        A transport class without C{_aborting} (Twisted's abort mixin gone)
        is reported by its full name.
        """
        [mixin] = [base for base in tcp.Connection.__bases__ if "_aborting" in vars(base)]
        connection = copy_class(tcp.Connection, bases=tuple(b for b in tcp.Connection.__bases__ if b is not mixin))
        server = rebased(tcp.Server, tcp.Connection, connection)
        self.assertEqual(
            fence.check(server=server, port=port_for(server)),
            ["twisted.internet.tcp.Server._aborting: missing"],
        )

    def test_transport_flag_of_another_type(self) -> None:
        """A flag that became something else than a number is reported with its value."""
        server = type("Server", (tcp.Server,), {"TLS": None})
        self.assertEqual(
            fence.check(server=server, port=port_for(server)),
            [f"{__name__}.Server.TLS: is None, expected int"],
        )

    def test_changed_transport_signature(self) -> None:
        """A method rtunnel calls with other arguments than it now takes is reported."""

        class Server(tcp.Server):
            def connectionLost(self) -> None:  # type: ignore[override]
                pass

        self.assertEqual(
            fence.check(server=Server, port=port_for(Server)),
            [
                f"{__name__}.CheckTests.test_changed_transport_signature.<locals>.Server.connectionLost: "
                "takes (self), expected (self, reason)"
            ],
        )

    def test_write_queue_not_counted(self) -> None:
        """
        A Twisted whose queued write no longer counts queued bytes in
        C{_tempDataLen} is reported: an eager send could then overtake
        queued bytes.
        """

        def write(self: object, data: bytes) -> None:
            pass

        connection = rebased(tcp.Connection, FileDescriptor, copy_class(FileDescriptor, write=write))
        server = rebased(tcp.Server, tcp.Connection, connection)
        self.assertEqual(
            fence.check(server=server, port=port_for(server)),
            ["twisted.internet.tcp.Server.write: no longer uses _tempDataLen"],
        )

    def test_instance_attribute_no_longer_set(self) -> None:
        """An attribute the eager write reads that no constructor sets any more is reported."""

        def __init__(self: Any, skt: Any, protocol: Any, reactor: Any = None) -> None:
            self.protocol = protocol

        connection = copy_class(tcp.Connection, __init__=__init__)
        server = rebased(tcp.Server, tcp.Connection, connection)
        self.assertEqual(
            fence.check(server=server, port=port_for(server)),
            ["twisted.internet.tcp.Server.socket: not set by any __init__ of the class"],
        )

    def test_accepted_connections_of_another_class(self) -> None:
        """
        A listening port that accepts connections as some other class than
        the one the eager classes derive from is reported.
        """
        self.assertEqual(
            fence.check(port=port_for(tcp.Client)),
            [f"{__name__}.Port.transport: is not twisted.internet.tcp.Server (accepted connections would stay stock)"],
        )
        client = type("OtherClient", (tcp.Client,), {})
        self.assertIn(
            "twisted.internet.tcp.Connector._makeTransport: does not build "
            f"{__name__}.OtherClient (connections would stay stock)",
            fence.check(client=client),
        )

    def test_slots_only_transport(self) -> None:
        """A transport class without an instance dict cannot take the switch."""

        class Slotted:
            __slots__ = ("socket",)

        problems = fence.check(server=Slotted, port=port_for(Slotted))
        self.assertIn(f"{__name__}.{Slotted.__qualname__}: instances have no __dict__ (__slots__ only)", problems)

    def test_layout_that_cannot_switch(self) -> None:
        """
        A transport class with an instance dict but a layout that a plain
        subclass changes (here: no weak references) is found by trying the
        switch on a bare instance.
        """

        class DictOnly:
            __slots__ = ("__dict__",)

        problems = fence.check(server=DictOnly, port=port_for(DictOnly))
        [layout] = [p for p in problems if p.startswith(f"{__name__}.{DictOnly.__qualname__}: ")]
        self.assertIn("cannot switch an instance to a subclass", layout)
        self.assertIn("layout differs", layout)

    def test_eager_mixin_is_the_shape_probed(self) -> None:
        """
        The switch is probed with a plain mixin; the eager write mixin is one
        (no base but object at run time, no slots), and the eager classes
        keep the layout of the classes they switch from.
        """
        self.assertEqual(_EagerWrite.__bases__, (object,))
        self.assertNotIn("__slots__", vars(_EagerWrite))
        for eager, stock in ((EagerServer, tcp.Server), (EagerClient, tcp.Client)):
            for attribute in ("__basicsize__", "__itemsize__", "__dictoffset__", "__weakrefoffset__"):
                self.assertEqual(getattr(eager, attribute), getattr(stock, attribute), (eager, attribute))

    def test_missing_tls_method(self) -> None:
        """A TLS protocol without C{_flushReceiveBIO} is reported."""
        tls = copy_class(TLSMemoryBIOProtocol, drop=("_flushReceiveBIO",))
        self.assertEqual(
            fence.check(tls=tls),
            ["twisted.protocols.tls.TLSMemoryBIOProtocol._flushReceiveBIO: missing"],
        )

    def test_tls_override_no_longer_reached(self) -> None:
        """
        A TLS protocol whose C{dataReceived} no longer goes through
        C{_flushReceiveBIO} would leave the override dead: reported.
        """

        def dataReceived(self: ProtocolWrapper, data: bytes) -> None:
            ProtocolWrapper.dataReceived(self, data)

        tls = copy_class(TLSMemoryBIOProtocol, dataReceived=dataReceived)
        self.assertEqual(
            fence.check(tls=tls),
            ["twisted.protocols.tls.TLSMemoryBIOProtocol.dataReceived: no longer uses _flushReceiveBIO"],
        )

    def test_changed_tls_signature_and_flag(self) -> None:
        """A changed private method and a flag turned into something else are both reported."""

        class TLS(TLSMemoryBIOProtocol):
            _aborted = "no"

            def _write(self, data: bytes, flush: bool) -> None:  # type: ignore[override]
                pass

        name = f"{__name__}.{TLS.__qualname__}"
        self.assertEqual(
            fence.check(tls=TLS),
            [
                f"{name}._aborted: is 'no', expected int",
                f"{name}._write: takes (self, data, flush), expected (self, data)",
            ],
        )


class DecisionTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(fence.restore, fence.current())
        self.recorded = Recorded()

    def test_problems_mean_stock_io_and_one_warning(self) -> None:
        """
        When a check fails, the process runs on stock I/O and says so once,
        as a warning that names the internal, says that rtunnel runs on
        stock Twisted I/O and what that costs.
        """
        tls = copy_class(TLSMemoryBIOProtocol, drop=("_flushSendBIO",))
        mode = fence.settle({}, lambda: fence.check(tls=tls), self.recorded.log)
        self.assertEqual(mode, fence.current())
        self.assertTrue(mode.stock)
        self.assertFalse(mode.forced)
        [(level, line)] = self.recorded.lines()
        self.assertEqual(level, LogLevel.warn)
        self.assertIn("twisted.protocols.tls.TLSMemoryBIOProtocol._flushSendBIO: missing", line)
        self.assertIn("rtunnel runs on stock Twisted I/O", line)
        self.assertIn(fence.LOST, line)
        self.assertIn("Tested with twisted[tls] >= 24.3, < 26.11.", line)

    def test_environment_forces_stock_io_without_checking(self) -> None:
        """C{RTUNNEL_STOCK_IO=1}: stock I/O, one info line, nothing checked."""

        def must_not_run() -> list[str]:
            raise AssertionError("checked although stock I/O was asked for")

        mode = fence.settle({"RTUNNEL_STOCK_IO": "1"}, must_not_run, self.recorded.log)
        self.assertEqual(mode, fence.IOMode(stock=True, forced=True))
        [(level, line)] = self.recorded.lines()
        self.assertEqual(level, LogLevel.info)
        self.assertIn("RTUNNEL_STOCK_IO is set: running on stock Twisted I/O", line)

    def test_fast_path_logs_nothing(self) -> None:
        """All internals present: fast I/O, and no log line at all."""
        mode = fence.settle({}, list, self.recorded.log)
        self.assertEqual(mode, fence.IOMode(stock=False))
        self.assertEqual(self.recorded.lines(), [])

    def test_values_of_the_variable(self) -> None:
        """Unset, empty and C{0} leave the fast path; anything else forces stock I/O."""
        for value in ("1", "yes", "true", " 1 "):
            self.assertTrue(fence.requested({"RTUNNEL_STOCK_IO": value}), value)
        for environ in ({}, {"RTUNNEL_STOCK_IO": ""}, {"RTUNNEL_STOCK_IO": "0"}, {"RTUNNEL_STOCK_IO": " "}):
            self.assertFalse(fence.requested(environ), environ)


#: Imports the adapter the way the roles do, then starts logging (which
#: replays what was logged at import) and prints the mode and the fence's lines.
_PROBE = """
from twisted.logger import LogLevel, formatEvent, globalLogBeginner
import rtunnel.adapter.tls
from rtunnel.adapter import fence
events = []
globalLogBeginner.beginLoggingTo([events.append], discardBuffer=False, redirectStandardIO=False)
print(fence.current())
for event in events:
    if event.get("log_namespace") == "rtunnel.adapter.fence":
        print(event["log_level"].name, formatEvent(event))
"""


class StartTests(unittest.SynchronousTestCase):
    def run_probe(self, stock_io: str | None) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != fence.STOCK_IO_ENV}
        env["PYTHONPATH"] = str(ROOT)
        if stock_io is not None:
            env[fence.STOCK_IO_ENV] = stock_io
        done = subprocess.run(
            [sys.executable, "-c", _PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.splitlines()

    def test_environment_read_at_import(self) -> None:
        """
        A process started with C{RTUNNEL_STOCK_IO=1} runs on stock I/O from
        the first import of the adapter, and logs exactly one line about it.
        """
        self.assertEqual(
            self.run_probe("1"),
            [
                "IOMode(stock=True, forced=True, problems=())",
                "info RTUNNEL_STOCK_IO is set: running on stock Twisted I/O "
                "(no eager TCP writes, Twisted's own TLS protocol)",
            ],
        )

    def test_without_the_variable(self) -> None:
        """Without it, this Twisted gets the fast path, silently."""
        self.assertEqual(self.run_probe(None), ["IOMode(stock=False, forced=False, problems=())"])
