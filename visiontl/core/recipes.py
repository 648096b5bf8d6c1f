"""The recipes that ship inside the package: list them, show one, resolve ``recipe:NAME``.

A recipe is a LightningCLI (or ``visiontl bench``) YAML file under ``visiontl/recipes/`` (the
``recipes/`` folder at the top of a checkout links there). Its name is its path below that folder
without ``.yaml`` (``satellite/eurosat-rgb``); its description is the first sentence of its opening
comment. ``--config recipe:satellite/eurosat-rgb`` works wherever the package is installed::

    visiontl recipes                                  # every bundled recipe, one line each
    visiontl recipes show satellite/eurosat-rgb       # print one (to copy and edit)
    visiontl fit --config recipe:satellite/eurosat-rgb --data.init_args.root data/eurosat

Nothing in a recipe is executed or imported here: the files are read as text.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from visiontl.core.errors import UserError

__all__ = ["PREFIX", "Recipe", "RecipeError", "find_recipe", "recipes", "recipes_dir", "resolve_config"]

PREFIX = "recipe:"
_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)[.?!](?=\s|$)")
_DESCRIPTION_CHARS = 110


class RecipeError(UserError):
    """A ``recipe:NAME`` that names no bundled recipe."""


@dataclass(frozen=True)
class Recipe:
    """A bundled recipe: ``name`` (``satellite/eurosat-rgb``), its file and one-line description."""

    name: str
    path: Path
    description: str


def recipes_dir() -> Path:
    """The folder of the bundled recipes inside the installed package."""
    return Path(str(resources.files("visiontl") / "recipes"))


def _description(text: str) -> str:
    """The first sentence of a recipe's opening comment (its first paragraph, lines joined)."""
    words: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].strip()
        if not body or (words and line.startswith("#  ")):  # a blank comment or an indented field ends it
            break
        words.append(body)
    text = " ".join(words)
    end = _SENTENCE_END.search(text)
    first = text[:end.start() + 1] if end else text
    if len(first) > _DESCRIPTION_CHARS:  # a long opening sentence: cut at a word
        first = first[:_DESCRIPTION_CHARS].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return first


def recipes() -> list[Recipe]:
    """Every bundled recipe, sorted by name."""
    root = recipes_dir()
    found = []
    for path in sorted(root.rglob("*.yaml")):
        name = path.relative_to(root).with_suffix("").as_posix()
        found.append(Recipe(name, path, _description(path.read_text(encoding="utf-8"))))
    return found


def find_recipe(name: str) -> Recipe:
    """The bundled recipe called ``name`` (``.yaml`` and a leading ``recipe:`` / ``recipes/`` optional).

    Raises:
        RecipeError: no such recipe; the message lists the bundled ones, the closest match first.
    """
    wanted = name.removeprefix(PREFIX).strip().removeprefix("recipes/").removesuffix(".yaml").strip("/")
    available = recipes()
    by_name = {r.name: r for r in available}
    if wanted in by_name:
        return by_name[wanted]
    stems = {r.name.rsplit("/", 1)[-1]: r for r in available}
    if wanted in stems and sum(r.name.endswith("/" + wanted) or r.name == wanted for r in available) == 1:
        return stems[wanted]  # the file name alone, when only one recipe has it
    names = [r.name for r in available]
    close = difflib.get_close_matches(wanted, names, n=len(names), cutoff=0.0)
    close += [n for n in names if n not in close]
    raise RecipeError(f"No bundled recipe {wanted!r}. Bundled recipes (closest first): {', '.join(close)}. "
                      f"`visiontl recipes` lists them with descriptions.")


def resolve_config(value: str | os.PathLike[str]) -> str:
    """A ``--config`` value with ``recipe:NAME`` turned into the bundled file's path (others as given)."""
    text = os.fspath(value)
    return str(find_recipe(text).path) if text.startswith(PREFIX) else text
