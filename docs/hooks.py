"""mkdocs hooks: the pages generated from the code when the site is built, so they cannot drift.

- ``reference/cli.md``: ``visiontl --help`` and every command's ``--help``, as the parsers print them at
  ``WIDTH`` columns (a longer line is wrapped; reST markup in the help texts is shown as plain code);
- ``how-to/recipes-medical.md``, ``recipes-satellite.md``, ``recipes-general.md``: every bundled
  recipe's header comment, run line and YAML, from the recipe files;
- ``results-overview.md``: the committed benchmark results (``benchmarks/results/*.md``, linked
  into the site as ``results/``), one link and summary line each.

A notebook page's table of contents is rebuilt from its rendered headings: mkdocs-jupyter's drops
their inline code (and with it the words and the anchors of "One call: ``fine_tune``").
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import re
import textwrap
from pathlib import Path
from types import ModuleType
from unittest import mock

from mkdocs.structure.files import File
from mkdocs.structure.toc import get_toc

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
WIDTH = 88  # columns of the command-line reference's help texts: they read without scrolling
_HEADING = re.compile(r'<h(?P<level>[1-6]) id="(?P<id>[^"]+)"[^>]*>(?P<html>.*?)</h(?P=level)>', re.DOTALL)


@functools.cache
def _docs_module(name: str) -> ModuleType:
    """A tool module beside this file (``docs/`` is not a package: mkdocs and Griffe load its files by path)."""
    spec = importlib.util.spec_from_file_location(f"docs_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wrap(line: str) -> list[str]:
    """``line`` in lines of at most ``WIDTH`` columns, continued under its text (after an option's name)."""
    if len(line) <= WIDTH:
        return [line]
    column = re.match(r" *(?:\S.*?  +)?", line).end()
    indent = column if column <= WIDTH // 2 else len(line) - len(line.lstrip())
    return textwrap.wrap(line, WIDTH, subsequent_indent=" " * indent, break_on_hyphens=False)


def _help(args: list[str]) -> str:
    from visiontl.cli.commands import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), \
            mock.patch.dict(os.environ, {"COLUMNS": str(WIDTH + 2)}):  # argparse wraps to COLUMNS - 2
        try:
            main(args)
        except SystemExit:
            pass
    text = _docs_module("griffe_rst").rst_inline(out.getvalue().rstrip())
    return "\n".join(wrapped for line in text.splitlines() for wrapped in _wrap(line))


def _cli_page() -> str:
    from visiontl.cli.commands import EXTRA_COMMANDS, LIGHTNING_COMMANDS

    parts = ["# Command line", "", "Generated from the command-line parsers when this site is built.", "",
             "```text", _help(["--help"]), "```", ""]
    for name in EXTRA_COMMANDS:
        parts += [f"## `visiontl {name}`", "", "```text", _help([name, "--help"]), "```", ""]
    parts += ["## `visiontl fit` / `validate` / `test` / `predict`", "",
              "Lightning's `LightningCLI` (" + ", ".join(f"`{c}`" for c in LIGHTNING_COMMANDS) + "): a recipe "
              "([schema](recipe-schema.md)) and any of its fields as options. The full list, from "
              "`visiontl fit --help`:", "", '??? note "visiontl fit --help"', "", "    ```text"]
    parts += ["    " + line if line else "" for line in _help(["fit", "--help"]).splitlines()]
    parts += ["    ```", ""]
    return "\n".join(parts)


def _recipe_page(title: str, intro: str, names: list) -> str:
    parts = [f"# {title}", "", intro, ""]
    for recipe in names:
        text = recipe.path.read_text(encoding="utf-8")
        header = [line[1:].strip() if line.startswith("# ") or line == "#" else line[1:]
                  for line in text.splitlines() if line.startswith("#")]
        command = "bench" if recipe.name.startswith("bench/") else "fit"
        parts += [f"## `recipe:{recipe.name}`", "", recipe.description, "",
                  "```bash", f"visiontl {command} --config recipe:{recipe.name}", "```", "",
                  '??? note "Header"', "", "    ```text", *["    " + h for h in header], "    ```", "",
                  '??? example "YAML"', "", "    ```yaml", *["    " + line for line in text.splitlines()], "    ```", ""]
    return "\n".join(parts)


def _results_page() -> str:
    results = ROOT / "benchmarks" / "results"
    parts = ["# Results", "",
             "Every number here was measured by a script in `benchmarks/` on this project's 2-core CPU machine "
             "and committed with its CSV and plot; each compares against a baseline measured in the same run.", ""]
    for md in sorted(results.glob("*.md")):
        title = next((line.lstrip("# ").strip() for line in md.read_text().splitlines() if line.startswith("# ")),
                     md.stem)
        png = md.with_suffix(".png")
        parts += [f"## [{title}](results/{md.name})", ""]
        if png.is_file():
            parts += [f"![{title}](results/{png.name})", ""]
    return "\n".join(parts)


def _toc_tokens(html: str) -> list[dict]:
    """The headings of a rendered page as nested table-of-contents tokens (``get_toc``'s input)."""
    root: dict = {"level": 0, "children": []}
    open_ = [root]
    for heading in _HEADING.finditer(html):
        text = re.sub(r'<a class="anchor-link".*?</a>', "", heading["html"], flags=re.DOTALL)
        token = {"level": int(heading["level"]), "id": heading["id"], "children": [],
                 "name": re.sub(r"<[^>]+>", "", text).strip()}  # text as HTML: entities stay escaped
        while open_[-1]["level"] >= token["level"]:
            open_.pop()
        open_[-1]["children"].append(token)
        open_.append(token)
    return root["children"]


def on_page_content(html, page, config, files):  # noqa: ANN001, ANN201 - mkdocs' hook signature
    if page.file.src_uri.endswith(".ipynb"):
        page.toc = get_toc(_toc_tokens(html))
    return html


def on_files(files, config):  # noqa: ANN001, ANN201 - mkdocs' hook signature
    from visiontl.core.recipes import recipes

    found = recipes()
    groups = {
        "how-to/recipes-medical.md": ("Medical recipes", "X-rays, DICOM, dermoscopy and histology.",
                                      [r for r in found if r.name.startswith("medical/")]),
        "how-to/recipes-satellite.md": ("Satellite recipes", "Sentinel-2, aerial and Blue Marble imagery.",
                                        [r for r in found if r.name.startswith("satellite/")]),
        "how-to/recipes-general.md": ("Other recipes", "Your own folder, the demo, streamed data and bench grids.",
                                      [r for r in found if not r.name.startswith(("medical/", "satellite/"))]),
    }
    for path, (title, intro, chosen) in groups.items():
        intro += " Each runs as shown wherever visiontl is installed; `visiontl recipes show NAME > my.yaml` copies one."
        files.append(File.generated(config, path, content=_recipe_page(title, intro, chosen)))
    files.append(File.generated(config, "reference/cli.md", content=_cli_page()))
    files.append(File.generated(config, "results-overview.md", content=_results_page()))
    return files
