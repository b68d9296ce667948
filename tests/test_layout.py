"""The house is layered: cli and demo -> registry (and migrations) -> sbora -> errors (and faults).

Read from the source with ``ast``: every import of a ``sbora_reg`` module, at module level or
inside a function, points down or sideways, never up; and imports form no circle, deferred ones
included (a lazy import is still a dependency), with one named exception.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"
LAYERS = {"cli": 3, "demo": 3, "registry": 2, "migrations": 2, "sbora": 1, "errors": 0, "faults": 0}
# The contract's ``Adapter.apply``/``to_peft``/``from_peft`` delegate (deferred) to the modules
# that build adapters; the value type itself stays free of them at import time.
ALLOWED_CIRCLE = {"sbora_reg.sbora.adapter", "sbora_reg.sbora.model", "sbora_reg.sbora.peft_io"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return {n for n in names if n.startswith("sbora_reg")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_imports_never_point_up() -> None:
    modules = _modules()
    upward = []
    for module, path in modules.items():
        here = _layer(module)
        for name in _imports(path, module_level_only=False):
            target = _resolve(name, modules)
            there = None if target is None else _layer(target)
            if here is not None and there is not None and there > here:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_imports_form_no_circle() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {_resolve(n, modules) for n in _imports(path, module_level_only=False)}
        # a package importing its own submodules (its public names) is not a circle
        graph[module] = {t for t in targets if t and t != module and not t.startswith(module + ".")}
    circles = []

    def visit(node: str, path: list[str], done: set[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                circles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in done:
                done.add(nxt)
                visit(nxt, [*path, nxt], done)

    for module in sorted(graph):
        visit(module, [module], {module})
    assert [c for c in circles if not set(c.split(" -> ")) <= ALLOWED_CIRCLE] == []
