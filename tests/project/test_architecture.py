"""The layout holds: dependencies run one way, no cycles, no private imports, every documented name resolves.

The import graph is read from the source (:mod:`architecture`); the picture it holds is drawn in
``docs/concepts/architecture.md``.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from helpers.architecture import LAYERS, PACKAGE, cycles, graph, imports, layer, private_imports, upward_imports

ROOT = PACKAGE.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
NOT_NAMES = {"visiontl.json"}  # a file name the docs mention (prepare-data's manifest)


def _show(found: list) -> str:
    return "\n".join(f"  {i.importer} (line {i.line}) imports {i.imported}{'.' + i.name if i.name else ''}"
                     for i in found)


def test_the_graph_is_read_from_every_module() -> None:
    edges = graph()
    assert "visiontl.tasks.base" in edges and "visiontl.strategies" in edges["visiontl.tasks.base"]
    assert len(edges) > 90  # every module of the package, sub-packages included


def test_every_module_lives_in_a_layer() -> None:
    """The package root holds only its ``__init__`` and ``__main__``; everything else is in a
    sub-package named in LAYERS (or the recipes' data folder)."""
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert loose == []
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(LAYERS)


def test_no_import_cycles() -> None:
    found = cycles(graph())
    assert found == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_dependencies_run_one_way() -> None:
    """A module imports from its own layer and those below (core < models < data < strategies <
    tasks < analyse < train < deploy < benchmark < cli): a task never imports the run machinery,
    an analysis never starts a run, the data layer never asks for the device."""
    found = upward_imports()
    assert found == [], "imports against the layering:\n" + _show(found)


def test_the_checker_sees_an_upward_import(monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import architecture

    fake = [architecture.Import("visiontl.tasks.base", "visiontl.train.run", "RunReport", 1),
            architecture.Import("visiontl.data.base", "visiontl.core.devices", "loader_defaults", 2),
            architecture.Import("visiontl.train.run", "visiontl.tasks.base", "BaseTask", 3)]
    monkeypatch.setattr(architecture, "imports", lambda: iter(fake))
    assert [i.line for i in architecture.upward_imports()] == [1, 2]
    assert architecture.cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert layer("visiontl.train.run") == LAYERS.index("train") and layer("visiontl") is None


def test_no_private_imports_across_modules() -> None:
    found = private_imports()
    assert found == [], "private names taken from another module:\n" + _show(found)


def test_imports_under_type_checking_are_left_out() -> None:
    """``visiontl.tasks.delta`` names ClassificationTask in annotations only."""
    taken = {(i.importer, i.imported) for i in imports()}
    assert ("visiontl.tasks.delta", "visiontl.tasks") not in taken
    assert ("visiontl.tasks.trained", "visiontl.tasks.delta") in taken


def _documented_names() -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for path in DOCS:
        for name in re.findall(r"\bvisiontl(?:\.[A-Za-z_][A-Za-z0-9_]*)+", path.read_text(encoding="utf-8")):
            if name not in NOT_NAMES:
                names.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return names


def _resolve(name: str) -> object:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def test_every_name_the_docs_give_resolves() -> None:
    """Each ``visiontl.x.y`` in README.md and docs/ imports, and every name of the top-level API and
    of each module's ``__all__`` exists."""
    documented = _documented_names()
    assert len(documented) > 40
    missing = []
    for name, where in sorted(documented.items()):
        try:
            _resolve(name)
        except (ImportError, AttributeError) as err:
            missing.append(f"{name} ({', '.join(sorted(set(where)))}): {err}")
    assert missing == [], "documented names that do not resolve:\n" + "\n".join(missing)


@pytest.mark.parametrize("package", ["visiontl", "visiontl.data", "visiontl.train", "visiontl.tasks",
                                     "visiontl.strategies", "visiontl.benchmark"])
def test_every_exported_name_imports(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


def test_every_module_all_names_exist() -> None:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__main__.py":
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        bad += [f"{module.__name__}.{n}" for n in getattr(module, "__all__", []) if not hasattr(module, n)]
    assert bad == []


def test_every_command_is_found_from_its_name() -> None:
    """``visiontl NAME``'s code is in a module named after it (the architecture page lists them)."""
    from visiontl.cli.commands import COMMAND_MODULES

    text = (ROOT / "docs" / "concepts" / "architecture.md").read_text(encoding="utf-8")
    for command, module in COMMAND_MODULES.items():
        assert importlib.util.find_spec(module) is not None, (command, module)
        assert f"`visiontl {command}`" in text and f"`{module}`" in text, command
    assert Path(PACKAGE / "cli" / "commands.py").is_file()


def test_the_tests_follow_the_package() -> None:
    """A layer's tests are in ``tests/<layer>/``; beside them only the cross-cutting suites, the
    helpers and the fixture data sets; no test module at the top; the conftest and the helpers edit
    no ``sys.path`` (pytest finds ``helpers`` beside the conftest)."""
    tests = ROOT / "tests"
    folders = sorted(p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
    assert folders == sorted([*LAYERS, "hostile", "project", "helpers", "fixtures"])
    assert sorted(p.name for p in tests.glob("*.py")) == ["conftest.py"]
    for layer_name in LAYERS:
        assert list((tests / layer_name).glob("test_*.py")), f"tests/{layer_name} has no tests"
    for path in [tests / "conftest.py", *sorted((tests / "helpers").glob("*.py"))]:
        assert "sys.path" not in path.read_text(encoding="utf-8"), path
