"""The package's import graph, read from the source (nothing is imported): who imports whom.

Used by ``tests/project/test_architecture.py`` and by ``docs/concepts/architecture.md``'s picture. Imports
under ``if TYPE_CHECKING:`` are annotations only and are left out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "visiontl"

LAYERS = ("core", "models", "data", "strategies", "tasks", "analyse", "train", "deploy", "benchmark", "cli")
"""The sub-packages from the bottom up: a module imports from its own layer and the ones below."""

NEVER = {
    "visiontl.data": ("visiontl.core.devices", "visiontl.core.speed"),  # the data layer knows no device
    "visiontl.tasks": ("visiontl.core.quiet",),  # a task never decides what a run prints
}
"""Imports a layer may not make although they are below it (prefix of importer -> prefixes imported)."""


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # a visiontl module
    name: str | None  # the name taken from it (``from m import name``), None for a module import
    line: int


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports() -> Iterator[Import]:
    mods = modules()
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods:
                        yield Import(mod, alias.name, None, node.lineno)
                continue
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if full in mods:
                    yield Import(mod, full, None, node.lineno)
                elif target in mods:
                    yield Import(mod, target, alias.name, node.lineno)


def layer(module: str) -> int | None:
    """The rank of ``module``'s sub-package in :data:`LAYERS`; None for the top package itself."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in modules()}
    for imp in imports():
        edges[imp.importer].add(imp.imported)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward_imports() -> list[Import]:
    """Imports from a higher layer, or ones :data:`NEVER` forbids."""
    bad = []
    for imp in imports():
        low, high = layer(imp.importer), layer(imp.imported)
        if low is not None and high is not None and high > low:
            bad.append(imp)
        elif any(imp.importer.startswith(a) and imp.imported.startswith(b) for a, bs in NEVER.items() for b in bs):
            bad.append(imp)
    return bad


def private_imports() -> list[Import]:
    """A private name (``_x``) or a private module taken from another module."""
    out = []
    for imp in imports():
        private_name = imp.name is not None and imp.name.startswith("_") and not imp.name.startswith("__")
        private_module = any(p.startswith("_") and not p.startswith("__") for p in imp.imported.split("."))
        if (private_name or private_module) and imp.importer != imp.imported:
            out.append(imp)
    return out
