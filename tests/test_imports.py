"""The import structure: the cache is a leaf, and pipeline/data has no import circle.

Parsed with `ast` (every import statement, including those inside functions), so a lazy
import cannot hide a dependency or a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute module names imported anywhere in a file (relative imports resolved)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from pipeline.data import rsna` imports the submodule pipeline.data.rsna.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as a list of modules (first repeated last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cache_imports_nothing_from_pipeline():
    offenders = {
        module_name(path): sorted(m for m in imported_modules(path) if m == "pipeline" or m.startswith("pipeline."))
        for path in sorted((ROOT / "cache").rglob("*.py"))
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_pipeline_data_has_no_import_circle():
    paths = sorted((ROOT / "pipeline" / "data").glob("*.py"))
    names = {module_name(path) for path in paths}
    graph = {module_name(path): {m for m in imported_modules(path) if m in names} for path in paths}
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"
    # The dispatcher imports the readers; the readers import the shared helpers, not the dispatcher.
    assert {"pipeline.data.rsna", "pipeline.data.cq500", "pipeline.data.folder"} <= graph["pipeline.data.index"]
    for reader in ("rsna", "cq500", "folder"):
        assert "pipeline.data.series" in graph[f"pipeline.data.{reader}"]


def test_checker_sees_lazy_and_relative_imports_and_circles(tmp_path):
    # The checker itself must see circles (including lazy imports), or the tests above prove nothing.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    probe = tmp_path / "pkg" / "sub" / "mod.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from pipeline.data.index import build_scan_index\nfrom . import other\n")
    assert {"pipeline.data.index", "pkg.sub.other"} <= imported_modules(probe, root=tmp_path)
