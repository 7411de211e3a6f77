"""
The tunnel processes' malloc thresholds (rtunnel.cli.malloc).

The symptom being prevented: a pattern like the data path's (two large
buffers alive at once, then both freed, thousands of times a second) makes
an untuned glibc trim the heap and fault the next buffers in afresh. Each
check runs in a fresh interpreter, because malloc's state is per process
and this one's history is unknown.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from rtunnel.cli.malloc import tune_malloc
from tools.harness import ROOT

#: Page faults per round of what C{ROUND} does, after a short warm-up;
#: printed by the child.
_COUNT = textwrap.dedent(
    """
    import resource

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def rounds(n):
        for _ in range(n):
            ROUND

    rounds(5)
    before = faults()
    rounds(200)
    print((faults() - before) / 200)
    """
)

#: Like the data path: two large buffers alive at once, then both freed.
PAIR = "a = bytearray(300_000); b = bytearray(300_000); del a, b"
#: One 8 MiB buffer: above the fixed 4 MiB mmap threshold, so a tuned
#: process maps it afresh every round, where glibc's own adjustment would
#: raise its threshold after the first round and reuse the heap. Tells
#: whether the thresholds were fixed, whatever the process did before.
BIG = "a = bytearray(8 << 20); del a"


def faults_per_round(setup: str, round_: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", setup + "\n" + _COUNT.replace("ROUND", round_)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return float(result.stdout.split()[-1])


class TuneMallocTests(SynchronousTestCase):
    def test_untuned_process_faults_buffers_in(self) -> None:
        """
        The control: without the tuning this pattern faults most pages of
        every round in (about 146 pages are touched per round), which is
        what the tuning is for.
        """
        self.assertGreater(faults_per_round("", PAIR), 50)

    def test_tuned_process_reuses_buffers(self) -> None:
        """With fixed thresholds the same rounds reuse heap memory."""
        setup = "from rtunnel.cli.malloc import tune_malloc\nassert tune_malloc()"
        self.assertLess(faults_per_round(setup, PAIR), 5)

    def test_thresholds_are_fixed(self) -> None:
        """
        The probe for the plugins' test below: an untuned process stops
        faulting a repeated 8 MiB buffer in, a tuned one does not.
        """
        setup = "from rtunnel.cli.malloc import tune_malloc\nassert tune_malloc()"
        self.assertLess(faults_per_round("", BIG), 5)
        self.assertGreater(faults_per_round(setup, BIG), 1000)

    def test_both_plugins_tune_their_process(self) -> None:
        """twistd's makeService for either role applies the tuning."""
        state = tempfile.mkdtemp(prefix="rtunnel-test-")
        self.addCleanup(shutil.rmtree, state, True)
        server = textwrap.dedent(
            f"""
            from rtunnel.cli import server_tap
            options = server_tap.Options()
            options.parseOptions(["--state", {os.path.join(state, "server")!r}, "--public-address", "t.example"])
            server_tap.makeService(options)
            """
        )
        self.assertGreater(faults_per_round(server, BIG), 1000)
        make_keyfile = subprocess.run(
            [
                sys.executable,
                "-m",
                "rtunnel",
                "keyfile",
                "create",
                "--state",
                os.path.join(state, "server"),
                "--site",
                "alpha",
                "--output",
                os.path.join(state, "alpha.rtkey"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        self.assertEqual(make_keyfile.returncode, 0, make_keyfile.stderr)
        site = textwrap.dedent(
            f"""
            from rtunnel.cli import site_tap
            options = site_tap.Options()
            options.parseOptions(["--keyfile", {os.path.join(state, "alpha.rtkey")!r},
                                  "--state", {os.path.join(state, "site")!r}])
            site_tap.makeService(options)
            """
        )
        self.assertGreater(faults_per_round(site, BIG), 1000)

    def test_operator_settings_are_left_alone(self) -> None:
        """Malloc settings in the environment win; nothing is changed then."""
        for environ in (
            {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
            {"GLIBC_TUNABLES": "glibc.rtld.nns=2:glibc.malloc.arena_max=2"},
            {"MALLOC_MMAP_THRESHOLD_": "131072"},
            {"MALLOC_TRIM_THRESHOLD_": "0"},
        ):
            self.assertFalse(tune_malloc(environ), environ)
