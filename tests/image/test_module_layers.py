"""The backing library reads top-down: no module imports, directly or through others, one
that imports it back -- counting imports made only for type checking or inside functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

BACKING = Path(__file__).resolve().parents[2] / "backing"


def imports_of(path: Path) -> set[str]:
    """Names of the backing modules ``path`` imports anywhere in it."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .store import Store
                out.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import vtd
                out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("backing."):
                out.add(node.module.split(".")[1])
            elif node.module == "backing":
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("backing."))
    return out


def test_no_backing_module_is_on_an_import_cycle() -> None:
    graph = {p.stem: imports_of(p) & {q.stem for q in BACKING.glob("*.py")} for p in BACKING.glob("*.py")}
    assert graph["fsck"] >= {"fsckctx", "tablecheck"} and graph["tablecheck"] >= {"fsckctx"}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_tablecheck_loads_without_fsck() -> None:
    code = "import sys, backing.tablecheck; assert 'backing.fsck' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=BACKING.parent)
