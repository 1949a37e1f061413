"""The MRM package has no import cycles: every module imports first, in a fresh interpreter, in any order."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

# found on disk, not by importing saffron.mrm: a cycle must fail a test, not the collection of this file
_spec = importlib.util.find_spec("saffron")
assert _spec is not None and _spec.submodule_search_locations
SRC = Path(next(iter(_spec.submodule_search_locations))).parent
FILES = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
         for p in [*(SRC / "saffron" / "mrm").rglob("*.py"), SRC / "saffron" / "bench" / "annotate.py"]}
MODULES = sorted(FILES)

# Each round forgets every saffron module (torch and transformers stay loaded: they are slow to import and
# cannot take part in a saffron cycle), imports one module first, then all the others in a shuffled order. A
# cycle shows as an ImportError on a partly initialised module whichever module the cycle is entered from.
PROBE = """
import importlib, json, random, sys, traceback
mods = json.loads(sys.argv[1])
rng = random.Random(0)
failures = []
for first in rng.sample(mods, len(mods)):
    for name in [m for m in sys.modules if m == "saffron" or m.startswith("saffron.")]:
        del sys.modules[name]
    order = [first, *rng.sample([m for m in mods if m != first], len(mods) - 1)]
    try:
        for m in order:
            importlib.import_module(m)
    except Exception:
        failures.append(" -> ".join(order[: order.index(m) + 1]) + "\\n" + traceback.format_exc(limit=3))
print(json.dumps(failures))
"""


def test_every_mrm_module_imports_first_in_any_order() -> None:
    assert {"saffron.mrm.base", "saffron.mrm.registry", "saffron.mrm.data.build", "saffron.mrm.train.lora"} \
        <= set(MODULES)
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(MODULES)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(SRC)}, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == []


def _module_imports(path: Path) -> tuple[set[str], set[str]]:
    """The saffron modules ``path`` imports when it is imported (``TYPE_CHECKING`` blocks aside), and those it
    imports inside functions."""
    top: set[str] = set()
    inner: set[str] = set()

    def walk(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        into = inner if in_function else top
        if isinstance(node, ast.Import):
            into.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            into.update({node.module} | {f"{node.module}.{a.name}" for a in node.names})
        for child in ast.iter_child_nodes(node):
            walk(child, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(path.read_text()), False)
    return {m for m in top if m.startswith("saffron.")}, {m for m in inner if m.startswith("saffron.")}


def test_mrm_module_graph_has_no_cycle_and_no_import_inside_a_function() -> None:
    """Module-level imports between the MRM modules form no cycle, so none is held apart by an import inside a
    function (third-party imports inside functions, kept lazy for speed, are not counted)."""
    graph: dict[str, set[str]] = {}
    for m, path in FILES.items():
        top, inner = _module_imports(path)
        assert not {i for i in inner if i.startswith("saffron.mrm")}, f"{m} imports an MRM module in a function"
        graph[m] = {t for t in top if t in FILES and t != m}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            assert state.get(t) != 1, f"import cycle: {' -> '.join([*path, m, t])}"
            if t not in state:
                visit(t, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
