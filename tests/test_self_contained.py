"""
The repository stands on its own: no doc, comment or script cites notes that
live outside it (a user of a clone cannot open them).
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
#: What outside citations looked like: the workplace's shared notes by path
#: or by name.
OUTSIDE = re.compile(r"\.\./shared|/work/|FIELD-NOTES|ARCHITECTURE\.md|STYLE\.md")
SCANNED = ("rtunnel", "twisted", "tools", "tests", "bench", "docs", ".ci")


class SelfContainedTests(SynchronousTestCase):
    def test_no_citation_outside_the_repository(self) -> None:
        """Every text file we ship or run names only what is in the repository."""
        found = []
        files = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "Makefile", ROOT / "setup.cfg"]
        for top in SCANNED:
            files += [p for p in (ROOT / top).rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".c", ""}]
        for path in files:
            if path == Path(__file__).resolve() or "__pycache__" in path.parts:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for number, line in enumerate(text.splitlines(), 1):
                if OUTSIDE.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
        self.assertEqual(found, [])
