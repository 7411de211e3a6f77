"""
Where the visibility layer (C{rtunnel/observe}) sits among the others
(docs/architecture.md, "Layers, bottom up").

C{rtunnel.observe} spans two levels. C{observe.view} and C{observe.stats}
are plain values and counters that the roles and the front doors feed, so
they sit low, beside C{address.py} and C{logsafe.py}: they import nothing
of Twisted and no rtunnel module but each other, C{mux}, C{address} and
C{logsafe}. The rest of the package (the collectors, the server's view, the
JSON API, the page, the web site, the CLI's client) reads the roles, so it
sits above them and above the front doors, below C{services.py} and the
CLI. Were a role to import C{observe.metrics}, say, every role would load
prometheus_client, and as the collectors import the roles, the two would
import each other: L{tests.test_imports} would report the cycle, this
test names the rule it breaks, also where no cycle closes yet.

Modules are parsed, not imported, with the parser of
L{tests.test_imports}, so imports inside functions and under C{if
TYPE_CHECKING:} count as well; one test also imports the two low modules
in a fresh interpreter to see what that loads, parent packages included.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_imports import PACKAGE, ROOT, imports_of, module_names

#: The package, and the two of its modules that the lower layers may import.
OBSERVE = f"{PACKAGE}.observe"
LOW = (f"{OBSERVE}.view", f"{OBSERVE}.stats")
#: Checked like L{LOW}: importing either runs the package's C{__init__} first.
LOW_CHECKED = (OBSERVE, *LOW)
#: All that L{LOW_CHECKED} may import of rtunnel (a package with its modules).
LOW_MAY_IMPORT = (*LOW, f"{PACKAGE}.mux", f"{PACKAGE}.address", f"{PACKAGE}.logsafe")
#: What L{LOW_CHECKED} must not import: Twisted (and its interfaces), and the
#: metrics library, which belongs to the collectors above the roles.
LOW_MUST_NOT_LOAD = ("twisted", "zope", "prometheus_client")
#: The layers below the upper part of observe: only L{LOW} of it for them.
BELOW = tuple(f"{PACKAGE}.{name}" for name in ("mux", "adapter", "identity", "roles", "frontdoor"))
#: The layers above all of observe: nothing of observe imports them.
ABOVE = tuple(f"{PACKAGE}.{name}" for name in ("services", "cli", "endpoints"))


def within(module: str, packages: tuple[str, ...]) -> bool:
    """Whether C{module} is one of C{packages} or inside one of them."""
    return any(module == p or module.startswith(p + ".") for p in packages)


def outside_imports(path: Path) -> set[str]:
    """The top-level names of what the module at C{path} imports from outside rtunnel, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    found.discard(PACKAGE)
    return found


def layer_violations(root: Path = ROOT) -> list[str]:
    """Every import of the tree at C{root} that breaks observe's place in the layers, one line each."""
    modules = module_names(root)
    found = []
    for name, path in sorted(modules.items()):
        imported = sorted(imports_of(name, path, modules))
        if name in LOW_CHECKED:
            for target in imported:
                if not within(target, LOW_MAY_IMPORT):
                    found.append(f"{name} imports {target}: it may import only {', '.join(LOW_MAY_IMPORT)}")
            for outside in sorted(outside_imports(path)):
                if outside in LOW_MUST_NOT_LOAD:
                    found.append(f"{name} imports {outside}: it stays free of {', '.join(LOW_MUST_NOT_LOAD)}")
        elif within(name, BELOW):
            for target in imported:
                if within(target, (OBSERVE,)) and target not in LOW:
                    found.append(f"{name} imports {target}: below observe's upper part, only {' and '.join(LOW)}")
        elif within(name, (OBSERVE,)):
            for target in imported:
                if within(target, ABOVE):
                    found.append(f"{name} imports {target}: observe sits below {', '.join(ABOVE)}")
    return found


def test_this_tree_keeps_the_layers() -> None:
    """No rtunnel module breaks observe's place in the layers."""
    found = layer_violations()
    assert found == [], "\n".join(found)


def test_loading_the_low_modules_loads_nothing_above_them() -> None:
    """
    Importing C{observe.view} and C{observe.stats} in a fresh interpreter
    loads no Twisted and no rtunnel module outside what they may import
    (their parent packages aside, which Python runs first).
    """
    script = f"import json, sys\nimport {LOW[0]}, {LOW[1]}\nprint(json.dumps(sorted(sys.modules)))\n"
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=60, check=False
    )
    assert (result.returncode, result.stderr) == (0, "")
    loaded: list[str] = json.loads(result.stdout)
    rtunnel_modules = [m for m in loaded if within(m, (PACKAGE,))]
    assert LOW[0] in rtunnel_modules and LOW[1] in rtunnel_modules
    assert [m for m in rtunnel_modules if not within(m, LOW_MAY_IMPORT) and m not in (PACKAGE, OBSERVE)] == []
    assert [m for m in loaded if m.split(".")[0] in LOW_MUST_NOT_LOAD] == []


def test_every_rule_is_seen(tmp_path: Path) -> None:
    """
    In a tree written for the test, each kind of breach is reported:
    Twisted or an upper module in a low module (a type-only import too), a
    lower layer importing observe's upper part (or the package itself) in
    a function or for type checking, and observe importing the layers
    above it; allowed imports are not.
    """
    files = {
        "__init__.py": "",
        "address.py": "",
        "services.py": "",
        "mux/__init__.py": "",
        "identity/__init__.py": "",
        "observe/__init__.py": "import zope.interface\n",
        "observe/view.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .web import Web\n",
        "observe/stats.py": (
            "from twisted.internet import task\nfrom ..identity import x\nfrom .view import V\nfrom ..mux import y\n"
        ),
        "observe/web.py": "from ..services import build\nfrom ..roles import server\n",
        "roles/__init__.py": "",
        "roles/server.py": (
            "from typing import TYPE_CHECKING\nfrom ..observe.stats import S\n"
            "if TYPE_CHECKING:\n    from rtunnel.observe.web import Web\n"
        ),
        "roles/site.py": "def f():\n    import rtunnel.observe\n    from rtunnel.observe import view\n",
    }
    for name, text in files.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    only = ", ".join(LOW_MAY_IMPORT)
    free = ", ".join(LOW_MUST_NOT_LOAD)
    assert layer_violations(tmp_path) == [
        f"rtunnel.observe imports zope: it stays free of {free}",
        f"rtunnel.observe.stats imports rtunnel.identity: it may import only {only}",
        f"rtunnel.observe.stats imports twisted: it stays free of {free}",
        f"rtunnel.observe.view imports rtunnel.observe.web: it may import only {only}",
        "rtunnel.observe.web imports rtunnel.services: observe sits below rtunnel.services, rtunnel.cli, "
        "rtunnel.endpoints",
        "rtunnel.roles.server imports rtunnel.observe.web: below observe's upper part, only "
        "rtunnel.observe.view and rtunnel.observe.stats",
        "rtunnel.roles.site imports rtunnel.observe: below observe's upper part, only "
        "rtunnel.observe.view and rtunnel.observe.stats",
    ]
