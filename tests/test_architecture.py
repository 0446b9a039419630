"""The package's shape: imports only point down the layers (no cycle), every module imports, none is huge.

Layers, lowest first: shared modules at the top of ``qpissa/`` (errors, formats, quant, data, …) and
``qpissa.kernels``; then the stages ``decompose`` < ``train`` < ``use``; ``plan`` beside them; ``cli`` on top.
Every import counts, also those inside functions (lazy imports keep start-up fast, not layering loose).
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import qpissa

PACKAGE = Path(qpissa.__file__).resolve().parent
KERNELS = PACKAGE.parent / "kernels"  # installed as qpissa.kernels (pyproject package-dir)
LAYER = {"decompose": 1, "train": 2, "use": 3, "compare": 4, "plan": 1, "cli": 9, "__main__": 9}  # anything else in qpissa/: 0 (shared)
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    mods = {}
    for root, prefix in ((PACKAGE, "qpissa"), (KERNELS, "qpissa.kernels")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """qpissa modules ``name`` imports anywhere in its body (``from a import b``: a.b when that is a module)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYER.get(parts[1], 0) if len(parts) > 1 else 0


def test_no_import_cycle():
    graph, state, stack = _graph(), {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " → ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_point_down_the_layers():
    graph = _graph()
    up = [f"{a} → {b}" for a, deps in graph.items() for b in deps
          if _layer(b) > _layer(a) and not b.startswith(a + ".")]  # a package may name its own submodules
    assert not up, "imports that point up a layer: " + "; ".join(sorted(up))


def test_kernels_import_only_the_runtime_type():
    graph = _graph()
    outside = {b for a, deps in graph.items() if a.startswith("qpissa.kernels") for b in deps
               if not b.startswith("qpissa.kernels")}
    assert outside <= {"qpissa.quant"}, outside


@pytest.mark.parametrize("name", sorted(_modules()))
def test_every_module_imports_and_stays_small(name):
    if name != "qpissa.__main__":  # running it would start the CLI
        importlib.import_module(name)
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines; split it by concern (≤ {MAX_LINES})"
