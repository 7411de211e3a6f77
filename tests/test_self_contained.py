"""
The repository stands on its own: no doc, comment or script points at a
file outside it (a user of a clone cannot open it).
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("rtunnel", "twisted", "tools", "tests", "bench", "docs", ".ci")
#: A relative path that climbs out of the directory it is written in.
CLIMBING = re.compile(r"(?<![\w.])(?:\.\./)+[\w.-]+")


def _escapes(path: Path, reference: str) -> bool:
    target = (path.parent / reference).resolve()
    return not target.is_relative_to(ROOT)


class SelfContainedTests(SynchronousTestCase):
    def test_no_reference_outside_the_repository(self) -> None:
        """
        Every text file we ship or run names only what is in the
        repository: no relative path that climbs out of it. (Absolute
        machine paths are not checked here: where a clone lives differs.)
        """
        files = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "Makefile", ROOT / "setup.cfg"]
        for top in SCANNED:
            files += [p for p in (ROOT / top).rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".c", ""}]
        found = []
        for path in files:
            if "__pycache__" in path.parts:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for number, line in enumerate(text.splitlines(), 1):
                climbing = [m for m in CLIMBING.findall(line) if _escapes(path, m)]
                if climbing:
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
        self.assertEqual(found, [])
