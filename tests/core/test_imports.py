"""The house rules, read from the source (nothing is imported): arrows point down the layers of the
README's Layout section, no file imports itself through others (function-level imports included),
core imports only torch, numpy and the standard library, and the export ships exactly the core files
its transformers classes import."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sad3_megatron"

# Each layer may import its own files and the layers listed for it (README, "Layout").
ALLOWED = {
    "core": set(),
    "config": {"core"},
    "hf": {"core"},
    "model": {"core"},
    "data": {"config", "core"},
    "engine": {"model", "data", "hf", "config", "core"},
    "evaluation": {"engine", "model", "data", "hf", "config", "core"},
    "cli": {"evaluation", "engine", "model", "data", "hf", "config", "core"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imported(module: str, node: ast.AST) -> set[str]:
    """The package modules an import statement of `module` names (relative imports resolved)."""
    if isinstance(node, ast.ImportFrom):
        base = module.split(".")
        if node.level:
            keep = len(base) - node.level + (1 if MODULES[module].name == "__init__.py" else 0)
            name = ".".join(base[:keep] + ([node.module] if node.module else []))
        else:
            name = node.module or ""
        names = [name] + [f"{name}.{alias.name}" for alias in node.names]
    else:
        names = [alias.name for alias in node.names]
    return {n for n in names if n in MODULES and n != module}


def _graph() -> dict[str, set[str]]:
    graph = defaultdict(set)
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                graph[module] |= _imported(module, node)
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "root"


def test_every_import_points_down_the_layers():
    wrong = [(a, b) for a, targets in _graph().items() for b in targets
             if _layer(a) != _layer(b) and _layer(b) not in ALLOWED.get(_layer(a), set())]  # fmt: skip
    assert wrong == []
    assert {_layer(m) for m in MODULES} - {"root"} == set(ALLOWED)  # every folder has its rule


def test_no_import_cycle():
    graph = _graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        return False

    assert [m for m in MODULES if reaches(m, m)] == []


def test_core_imports_torch_numpy_and_the_standard_library_only():
    optional = {"flash_attn"}  # the GPU kernel, imported lazily by attention.py where asked for
    allowed = {"torch", "numpy", "__future__"} | optional | set(sys.stdlib_module_names)
    for path in (PACKAGE / "core").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, (path.name, roots - allowed)


def _shipped(name: str) -> set[str]:
    tree = ast.parse((PACKAGE / "engine" / "export.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == name:
            return set(ast.literal_eval(node.value))
    raise AssertionError(name)


def test_the_export_ships_exactly_what_its_classes_import():
    graph = _graph()
    hf = {f"sad3_megatron.hf.{Path(n).stem}" for n in _shipped("SHIPPED_HF_FILES")}
    needed, todo = set(), list(hf)
    while todo:
        for target in graph[todo.pop()]:
            if target not in needed:
                needed.add(target)
                todo.append(target)
    assert needed <= {f"sad3_megatron.core.{p.stem}" for p in (PACKAGE / "core").glob("*.py")} | hf
    core = {f"{m.rsplit('.', 1)[1]}.py" for m in needed if m.startswith("sad3_megatron.core.")}
    assert core == _shipped("SHIPPED_CORE_FILES")
    assert {"variance.py", "d3pm.py"}.isdisjoint(core)  # training-only math stays home
    # Inside core every import is relative, so the flat copy resolves the same files.
    for name in core:
        tree = ast.parse((PACKAGE / "core" / name).read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("sad3")]
