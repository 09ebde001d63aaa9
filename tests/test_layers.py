"""Folder imports point one way: launch -> runtime -> {memory, parallel, offload} -> models -> leaf.

The graph is read from the code's imports (AST: every ``import`` and
``from ... import`` anywhere in a module, lazy ones inside functions
included), between the package's folders. The leaf is the root modules
(``config.py``, ``options.py``, ``errors.py``): they import no folder.
``parallel/`` and ``offload/`` may read ``memory/`` (its placement types);
``memory/`` imports neither; nothing imports ``tests/``, and only ``tests/``
import ``benchmarks/`` (to test the prepared commands).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("launch", "runtime", "memory", "parallel", "offload", "models")
LEAF = "leaf"  # the root modules: tessera.config, tessera.options, tessera.errors (and the package __init__)
# What each layer may import (besides itself). Anything else is a backward arrow or a cycle.
ALLOWED = {
    "launch": {"runtime", "memory", "parallel", "offload", "models", LEAF},
    "runtime": {"memory", "parallel", "offload", "models", LEAF},
    "parallel": {"memory", "models", LEAF},
    "offload": {"memory", "models", LEAF},
    "memory": {"models", LEAF},
    "models": {LEAF},
    LEAF: set(),
    "benchmarks": {*FOLDERS, LEAF},
    "tests": {*FOLDERS, LEAF, "benchmarks"},  # tests check the prepared commands (gpu_check); nothing else may
}


def _folder_of(module: str) -> str | None:
    """``tessera.parallel.comm`` -> ``parallel``; ``tessera.config`` -> leaf; not tessera -> None."""
    parts = module.split(".")
    if parts[0] != "tessera":
        return None
    if len(parts) == 1 or parts[1] in ("config", "options", "errors"):
        return LEAF
    return parts[1] if parts[1] in (*FOLDERS, "benchmarks", "tests") else LEAF


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    package = "tessera." + ".".join(path.relative_to(ROOT).parent.parts) if path.parent != ROOT else "tessera"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]  # from tessera import launch
    return out


def _source_files():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", "build", ".git") or "site-packages" in rel.parts:
            continue
        folder = rel.parts[0] if len(rel.parts) > 1 else LEAF
        if folder in ALLOWED:
            yield folder, path


def folder_graph() -> dict[tuple[str, str], list[str]]:
    """(from folder, to folder) -> the import sites that make the edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for folder, path in _source_files():
        for line, module in _imports(path):
            target = _folder_of(module)
            if target is None or target == folder:
                continue
            if folder == LEAF and path.name == "__init__.py":
                continue  # the package's own __init__ re-exports the user API (tessera.launch)
            edges.setdefault((folder, target), []).append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return edges


def test_folders_import_one_way():
    bad = {edge: sites for edge, sites in folder_graph().items() if edge[1] not in ALLOWED[edge[0]]}
    report = "\n".join(f"{a} -> {b}: " + "; ".join(sites[:3]) for (a, b), sites in sorted(bad.items()))
    assert not bad, f"backward or forbidden imports between folders:\n{report}"


def test_no_cycle_between_folders():
    edges = {edge for edge in folder_graph() if edge[0] != edge[1]}
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if state.get(nxt) is None and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            cycle = visit(node, [])
            assert cycle is None, f"import cycle between folders: {' -> '.join(cycle)}"


def test_the_graph_sees_lazy_imports(tmp_path):
    """The checker itself: an import inside a function counts (the walk is over the whole tree)."""
    source = "def f():\n    from tessera.launch.api import launch\n    return launch\n"
    path = tmp_path / "m.py"
    path.write_text(source)
    tree = ast.parse(source)
    assert any(isinstance(n, ast.ImportFrom) and n.module == "tessera.launch.api" for n in ast.walk(tree))
    assert _folder_of("tessera.launch.api") == "launch" and _folder_of("tessera.options") == LEAF
