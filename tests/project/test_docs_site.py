"""The documentation site: the docstrings' reST markup converted at build time (``docs/griffe_rst.py``),
every public name documented, notebook titles and tables of contents that keep their words, a
command-line reference that fits its width. The build itself is the slow tier's (one per module)."""

from __future__ import annotations

import html
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import griffe
import pytest
import yaml

from visiontl.cli.commands import EXTRA_COMMANDS

REPO = Path(__file__).parents[2]
PUBLIC = ["visiontl", "visiontl.data", "visiontl.tasks", "visiontl.strategies", "visiontl.train"]
ROLES = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj|paramref):(?:`|<code>)")  # a role and its target


def _docs_module(name: str) -> ModuleType:
    """A tool module of ``docs/`` (not a package: mkdocs and Griffe load these files by path)."""
    spec = importlib.util.spec_from_file_location(f"docs_{name}", REPO / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rst = _docs_module("griffe_rst")


def _link(identifier: str, shown: str) -> str:
    return f'<autoref identifier="{identifier}" optional>`{shown}`</autoref>'


def test_roles_become_optional_cross_references_or_inline_code() -> None:
    known = {"visiontl.fine_tune": "visiontl.train.finetune.fine_tune"}
    text = (":func:`~visiontl.fine_tune` and :func:`visiontl.fine_tune()`, :meth:`set_preprocessing`, "
            ":class:`the task <visiontl.fine_tune>`, :mod:`!visiontl.fine_tune`, ``x = 1`` and :py:data:`~a.B`")
    assert rst.rst_inline(text, known.get) == (
        f"{_link('visiontl.train.finetune.fine_tune', 'fine_tune')} and "
        f"{_link('visiontl.train.finetune.fine_tune', 'visiontl.fine_tune()')}, `set_preprocessing`, "
        f"{_link('visiontl.train.finetune.fine_tune', 'the task')}, `visiontl.fine_tune`, `x = 1` and `B`")
    assert rst.rst_inline("``a\n  b`` :class:`~x.Y`") == "`a\n  b` `Y`"  # no resolver: code only


def test_a_google_docstring_keeps_its_sections_and_literal_blocks_are_fenced() -> None:
    source = """Train ``backbone``; see :func:`~visiontl.fine_tune`::

    fine_tune(data, ":class:`kept`")

Args:
    strategy: a name or a :class:`~visiontl.strategies.Strategy`
        (:meth:`plan`).

.. code-block:: yaml

    strategy: partial
"""
    known = {"visiontl.strategies.Strategy": "visiontl.strategies.base.Strategy", "plan": "S.plan"}
    converted = rst.rst_to_markdown(source, lambda target: known.get(target))
    assert '```\nfine_tune(data, ":class:`kept`")\n```' in converted  # a literal block is left as it is
    assert "```yaml\nstrategy: partial\n```" in converted
    assert "see `fine_tune`:\n" in converted
    sections = griffe.Docstring(converted, parser="google").parse(warnings=False)
    (parameter,) = next(s for s in sections if s.kind is griffe.DocstringSectionKind.parameters).value
    assert parameter.name == "strategy"
    assert parameter.description == (f"a name or a {_link('visiontl.strategies.base.Strategy', 'Strategy')}\n"
                                     f"({_link('S.plan', 'plan')}).")


@pytest.fixture(scope="module")
def loaded() -> griffe.GriffeLoader:
    """The package as the site loads it: with the lazy-exports and the markup extensions."""
    extensions = griffe.load_extensions(*(str(REPO / "docs" / f"griffe_{name}.py") for name in ("exports", "rst")))
    loader = griffe.GriffeLoader(extensions=extensions, search_paths=[str(REPO)],
                                 docstring_parser=griffe.Parser("google"))
    loader.load("visiontl")
    return loader


def test_targets_resolve_absolute_relative_through_imports_and_lazy_exports(loaded: griffe.GriffeLoader) -> None:
    collection = loaded.modules_collection
    assert collection["visiontl.data.FolderDataModule"].canonical_path == "visiontl.data.datamodules.FolderDataModule"
    assert collection["visiontl.fine_tune"].canonical_path == "visiontl.train.finetune.fine_tune"
    strategy = collection["visiontl.strategies.base.Strategy"].docstring.value
    assert _link("visiontl.strategies.base.Strategy.plan", "plan") in strategy  # :meth:`plan` in its class
    register = collection["visiontl.strategies.register_strategy"].docstring.value
    assert _link("visiontl.strategies.base.Strategy", "Strategy") in register  # imported into the module
    distill = collection["visiontl.train.distill.distill"].docstring.value
    assert _link("visiontl.train.finetune.fine_tune", "fine_tune") in distill  # :func:`~visiontl.fine_tune`
    resolve = rst.resolver(collection["visiontl.train.finetune"], loaded)
    assert resolve("no_such_name") is None and resolve("torch.nn.Module") is None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mkdocs build --strict``, once for the module."""
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                          capture_output=True, text=True, check=False, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _pages(site: Path, under: str = "") -> dict[str, str]:
    return {str(p.relative_to(site)): p.read_text(encoding="utf-8") for p in sorted((site / under).rglob("*.html"))}


@pytest.mark.slow
def test_the_documentation_site_builds_strictly(site: Path) -> None:
    """A broken link or anchor, a page missing from the navigation, a docstring that no longer
    matches its signature, or a notebook that does not render fails the build (the fixture)."""
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert all(f"visiontl {name}" in cli for name in EXTRA_COMMANDS)  # generated from the parsers
    assert (site / "tutorials" / "quickstart" / "index.html").is_file()  # notebooks rendered with outputs
    assert "satellite/eurosat-rgb" in (site / "how-to" / "recipes-satellite" / "index.html").read_text()
    assert "fine_tune" in (site / "reference" / "api" / "training" / "index.html").read_text()


@pytest.mark.slow
def test_no_page_shows_sphinx_roles_or_double_backticks(site: Path) -> None:
    pages = _pages(site)
    assert len(_pages(site, "reference")) >= 10
    assert {name: ROLES.findall(text) for name, text in pages.items() if ROLES.search(text)} == {}
    assert [name for name, text in pages.items() if "``" in text] == []


def _public_names() -> list[tuple[str, set[str]]]:
    """Each public name, with the identifiers a heading may document it under: any public path to
    the same object, or where it is defined."""
    packages = {package: importlib.import_module(package) for package in PUBLIC}
    names = []
    for package, module in packages.items():
        for name in module.__all__:
            obj = getattr(module, name)
            ids = {f"{other}.{name}" for other, mod in packages.items() if getattr(mod, name, None) is obj}
            if hasattr(obj, "__qualname__") and hasattr(obj, "__module__"):
                ids.add(f"{obj.__module__}.{obj.__qualname__}")
            names.append((f"{package}.{name}", ids))
    return names


@pytest.mark.slow
def test_every_public_name_has_its_heading_in_the_api_reference(site: Path) -> None:
    anchors = {a for text in _pages(site, "reference/api").values() for a in re.findall(r'\bid="([^"]+)"', text)}
    assert [name for name, ids in _public_names() if not ids & anchors] == []
    assert {"visiontl.tasks.ClassificationTask", "visiontl.tasks.AdaptationTask", "visiontl.data.FolderDataModule",
            "visiontl.data.MedMNISTDataModule", "visiontl.train.fit_task", "visiontl.train.attach_run_callbacks",
            "visiontl.deploy.predict.Predictor", "visiontl.data.protocols", "visiontl.tasks.protocols",
            "visiontl.core.errors.UserError"} <= anchors


@pytest.mark.slow
def test_roles_render_as_links_to_the_objects(site: Path) -> None:
    api = site / "reference" / "api"
    link = '<a class="autorefs autorefs-internal"[^>]*href="{}"'
    # fine_tune's task_kwargs: :class:`~visiontl.tasks.ClassificationTask`, on another page
    training = (api / "training" / "index.html").read_text()
    assert re.search(link.format("../tasks/#visiontl.tasks.ClassificationTask"), training)
    # Strategy: "Subclasses implement :meth:`plan`", relative to the class
    assert re.search(link.format("#visiontl.strategies.Strategy.plan"), (api / "strategies" / "index.html").read_text())


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", fragment))).strip()


@pytest.mark.slow
def test_notebook_titles_and_tables_of_contents_keep_their_words(site: Path) -> None:
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    tutorials = [next(iter(entry.items())) for entry in next(e["Tutorials"] for e in nav if "Tutorials" in e)]
    home = (site / "index.html").read_text()
    for title, path in tutorials:
        stem = Path(path).stem
        page = (site / "tutorials" / stem / "index.html").read_text()
        assert _text(re.search(r"<title>(.*?)</title>", page)[1]) == f"{title} - visiontl"
        nav_link = re.search(rf'<a href="tutorials/{stem}/" class="md-nav__link">(.*?)</a>', home, re.DOTALL)
        assert _text(nav_link[1]) == title
        toc = dict(re.findall(r'<a href="#([^"]+)" class="md-nav__link">(.*?)</a>', page, re.DOTALL))
        entries = [_text(entry) for entry in toc.values()]
        assert set(toc) <= set(re.findall(r'<h[1-6] id="([^"]+)"', page)), stem  # every entry leads somewhere
        cells = json.loads((REPO / "notebooks" / f"{stem}.ipynb").read_text())["cells"]
        headings = [line.lstrip("#").strip().replace("`", "") for cell in cells if cell["cell_type"] == "markdown"
                    for line in "".join(cell["source"]).splitlines() if re.match(r"##+ ", line)]
        assert [h for h in headings if h not in entries] == [], stem


@pytest.mark.slow
def test_the_command_line_reference_fits_its_width(site: Path) -> None:
    width = _docs_module("hooks").WIDTH
    page = (site / "reference" / "cli" / "index.html").read_text()
    blocks = [html.unescape(re.sub(r"<[^>]+>", "", b)) for b in re.findall(r"<pre[^>]*>(.*?)</pre>", page, re.DOTALL)]
    assert len(blocks) == len(EXTRA_COMMANDS) + 2  # the overview, each command and `fit`
    assert [line for block in blocks for line in block.splitlines() if len(line) > width] == []
