"""
The built wheel ships the twistd dropin correctly (see Twisted's "Writing a
twistd plugin" and "The Twisted Plugin System" howtos):
twisted/plugins/rtunnel_plugins.py and nothing else under twisted/ (no
__init__.py that would shadow Twisted's own packages, no stale dropin.cache),
every rtunnel package, and the py.typed marker; installed alone, its dropin
is found by Twisted's plugin system.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


def _packages_on_disk() -> set[str]:
    """Every directory under rtunnel/ that is a package (has __init__.py)."""
    found = set()
    for init in (ROOT / "rtunnel").rglob("__init__.py"):
        if "__pycache__" not in init.parts:
            found.add(".".join(init.parent.relative_to(ROOT).parts))
    return found


def _declared_packages() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return {line.strip() for line in parser["options"]["packages"].splitlines() if line.strip()}


def _setuptools_builds_wheels() -> bool:
    """Whether this environment can build a wheel without build isolation."""
    try:
        import wheel  # noqa: F401
    except ImportError:
        import setuptools

        major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
        return (major, minor) >= (70, 1)  # bdist_wheel moved into setuptools
    return True


def _copy_source(destination: Path) -> None:
    """
    What a source checkout gives the build backend, without the clutter of a
    working tree (build/, *.egg-info, tests); a dropin.cache is always
    present, as in any tree where twistd or the tests ran.
    """
    for name in ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, destination / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "rtunnel", destination / "rtunnel", ignore=ignore)
    shutil.copytree(ROOT / "twisted", destination / "twisted", ignore=ignore)
    (destination / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale cache from a source tree")


class WheelTests(SynchronousTestCase):
    def test_wheel_contents_and_installed_dropin(self) -> None:
        """
        The wheel holds every rtunnel package (all of them listed in
        setup.cfg), rtunnel/py.typed and the dropin, and under twisted/
        nothing else; installed on its own, Twisted finds both service
        makers and the endpoint parser through that dropin.
        """
        on_disk = _packages_on_disk()
        declared = _declared_packages()
        self.assertEqual(on_disk - declared, set(), "packages missing from setup.cfg [options] packages")
        self.assertIn("twisted.plugins", declared)

        work = Path(tempfile.mkdtemp(prefix="rtunnel-wheel-"))
        self.addCleanup(shutil.rmtree, work, True)
        source, out, target = work / "src", work / "dist", work / "site"
        source.mkdir()
        _copy_source(source)
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)]
        if _setuptools_builds_wheels():
            command.insert(4, "--no-build-isolation")
        subprocess.run(command, check=True, capture_output=True, timeout=300)
        (wheel,) = out.glob("rtunnel-*.whl")
        names = set(zipfile.ZipFile(wheel).namelist())

        under_twisted = sorted(n for n in names if n.startswith("twisted/"))
        self.assertEqual(under_twisted, ["twisted/plugins/rtunnel_plugins.py"])
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertFalse([n for n in names if n.endswith("dropin.cache")])
        self.assertIn("rtunnel/py.typed", names)
        # package data the admin endpoint reads at start (rtunnel.observe.page)
        self.assertIn("rtunnel/observe/page/status.html", names)
        for package in on_disk:
            self.assertIn(package.replace(".", "/") + "/__init__.py", names, package)
        shipped = {n for n in names if n.startswith("rtunnel/") and n.endswith(".py")}
        expected = {
            str(p.relative_to(ROOT)).replace(os.sep, "/")
            for p in (ROOT / "rtunnel").rglob("*.py")
            if "__pycache__" not in p.parts
        }
        self.assertEqual(shipped, expected)
        # Only what a user imports or runs: the process harness and the demo
        # work only from a checkout, so they live in tools/, outside the wheel.
        self.assertFalse([n for n in names if n.startswith(("tools/", "tests/", "bench/"))])
        self.assertNotIn("rtunnel/harness.py", names)

        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        probe = (
            "from twisted.plugin import getPlugins\n"
            "from twisted.application.service import IServiceMaker\n"
            "from twisted.internet.interfaces import IStreamClientEndpointStringParserWithReactor as P\n"
            "import rtunnel\n"
            "print(rtunnel.__file__)\n"
            "print(sorted(m.tapname for m in getPlugins(IServiceMaker) if m.tapname.startswith('rtunnel')))\n"
            "print(sorted(p.prefix for p in getPlugins(P) if getattr(p, 'prefix', '') == 'rtunnel'))\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONPATH"] = str(target)
        result = subprocess.run(
            [sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True, timeout=120, check=True
        )
        location, makers, parsers = result.stdout.splitlines()
        self.assertTrue(location.startswith(str(target)), location)  # the wheel's copy, not the source tree
        self.assertEqual(makers, "['rtunnel', 'rtunnel-server']")
        self.assertEqual(parsers, "['rtunnel']")
