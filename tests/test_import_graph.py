"""The module-level import graph of src/saffron has no cycle (issue 14).

Read with ``ast``, nothing imported: an edge A -> B for every import at the top level of module A (inside ``try``,
``if`` and ``with`` blocks too, which run at import time) that names module B, resolving ``from pkg import name`` to
``pkg.name`` where that is a module and to ``pkg`` otherwise. Importing ``a.b.c`` runs ``a/b/__init__`` first, so
it is an edge to the package ``a.b`` too, unless ``a.b`` holds the importing module (a package is in
``sys.modules`` before its own submodules run). Imports under ``if TYPE_CHECKING:`` and inside functions are not
edges: they do not run when the module is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import saffron

ROOT = Path(saffron.__file__).parent
ROOT_NAME = "saffron"


def module_files(root: Path = ROOT, package: str = ROOT_NAME) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``root`` (a package's ``__init__`` is the package)."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module body runs: not in functions/classes, not under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _top_level_imports(node.body)
            found += _top_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                found += _top_level_imports(block)
        elif isinstance(node, ast.With):
            found += _top_level_imports(node.body)
    return found


def _resolve(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The saffron modules one import statement names."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if node.level:  # relative: from the module's package, one level up per extra dot
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    out: set[str] = set()
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        if sub in known:
            out.add(sub)
        elif target in known:
            out.add(target)
    return out


def _packages(module: str) -> list[str]:
    """The packages whose ``__init__`` runs before ``module``: ``a.b.c`` -> ``a``, ``a.b``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path = ROOT, package: str = ROOT_NAME) -> dict[str, set[str]]:
    files = module_files(root, package)
    known = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in _top_level_imports(tree.body):
            edges |= _resolve(node, module, path.name == "__init__.py", known)
        own = set(_packages(module)) | {module}
        edges |= {pkg for target in edges for pkg in _packages(target) if pkg in known and pkg not in own}
        graph[module] = edges - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None: depth-first search, grey = on the current path."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt, black) == grey:
                return [*path[path.index(nxt):], nxt]
            if colour.get(nxt) == white and (cycle := visit(nxt)):
                return cycle
        path.pop()
        colour[node] = black
        return None

    for start in sorted(graph):
        if colour[start] == white and (cycle := visit(start)):
            return cycle
    return None


def test_saffron_import_graph_is_acyclic() -> None:
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the walk found the package's modules and edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_graph_finds_a_cycle_through_from_imports_and_relative_imports(tmp_path: Path) -> None:
    root = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "a.py": "from pkg.sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "from ..c import thing\n",
        "c.py": "import os\ntry:\n    import pkg.a\nexcept ImportError:\n    pass\nthing = 1\n",
    })
    graph = import_graph(root, "pkg")
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


def test_graph_sees_a_cycle_through_a_package_init(tmp_path: Path) -> None:
    """guards/__init__ -> guards.registry -> mrm.prm -> guards.base runs guards/__init__ again: a cycle, although
    no module names guards/__init__ directly."""
    root = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "guards/__init__.py": "from pkg.guards.registry import load\n",
        "guards/base.py": "class Base: ...\n",
        "guards/registry.py": "from pkg.mrm.prm import Prm\n",
        "mrm/__init__.py": "",
        "mrm/prm.py": "from pkg.guards.base import Base\n",
    })
    graph = import_graph(root, "pkg")
    assert graph["pkg.mrm.prm"] == {"pkg.guards", "pkg.guards.base"}
    assert graph["pkg.guards.registry"] == {"pkg.mrm", "pkg.mrm.prm"}  # its own package pkg.guards is no edge
    assert find_cycle(graph) == ["pkg.guards", "pkg.guards.registry", "pkg.mrm.prm", "pkg.guards"]


def test_graph_ignores_type_checking_and_function_level_imports(tmp_path: Path) -> None:
    root = _write(tmp_path / "pkg", {
        "__init__.py": "from pkg.a import f\n",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import b\n"
                "def f():\n    from pkg import b\n",
        "b.py": "from pkg import a\n",
    })
    graph = import_graph(root, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": set(), "pkg.b": {"pkg.a"}}
    assert find_cycle(graph) is None
