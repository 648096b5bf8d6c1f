"""Griffe extension for the documentation site: the docstrings' reStructuredText markup as Markdown.

The package's docstrings are Google style with reST markup (Sphinx roles, double-backtick literals,
``::`` literal blocks), which stays valid reST in the source. mkdocstrings reads Markdown, so each
docstring is rewritten when the package has loaded, before it is parsed:

- a double-backtick literal becomes a single-backtick one;
- a role (``:func:`~visiontl.fine_tune```, ``:meth:`set_preprocessing```) whose target names an object
  of the loaded package (absolute, or relative to the docstring's object and its parents) becomes an
  optional cross-reference: a link where the site renders that object, inline code elsewhere; a
  target that names nothing known becomes inline code. ``~`` shows the last component only;
- a paragraph ending in ``::`` and a ``.. code-block::`` directive introduce a fenced code block.

:func:`rst_inline` is also used by ``docs/hooks.py`` for the ``--help`` texts of the command-line
reference, with no resolver (code only).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Iterator

from griffe import AliasResolutionError, CyclicAliasError, Extension, GriffeLoader, Module, Object

Resolver = Callable[[str], "str | None"]

_ROLE = re.compile(r"(?<![\w`]):(?:py:)?[a-z]+:`(?P<body>[^`]+)`")
_LITERAL = re.compile(r"``(?P<code>[^`]+)``")
_EXPLICIT = re.compile(r"(?P<title>.*?)\s*<(?P<target>[^<>]+)>", re.DOTALL)
_DIRECTIVE = re.compile(r"\.\. (?:code-block|code|sourcecode)::\s*(?P<lang>\S*)\s*$")


def _role(body: str, resolve: Resolver | None) -> str:
    explicit = _EXPLICIT.fullmatch(body.strip())
    title, target = (explicit["title"], explicit["target"]) if explicit else (None, body.strip())
    linked = not target.startswith("!")
    target = target.lstrip("!")
    if title is None:
        title = target.rsplit(".", 1)[-1] if target.startswith("~") else target
        target = target.lstrip("~")
    identifier = resolve(target.removesuffix("()")) if resolve and linked else None
    if identifier is None:
        return f"`{title}`"
    return f'<autoref identifier="{identifier}" optional>`{title}`</autoref>'


def rst_inline(text: str, resolve: Resolver | None = None) -> str:
    """Sphinx roles and double-backtick literals in ``text`` as Markdown (see the module docstring).

    Args:
        text: reST-flavoured text (no literal blocks: see :func:`rst_to_markdown`).
        resolve: gives the identifier to link a role's target to, or ``None`` for inline code.
    """
    text = _ROLE.sub(lambda m: _role(m["body"], resolve), text)
    return _LITERAL.sub(lambda m: f"`{m['code']}`", text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _blocks(lines: list[str]) -> Iterator[tuple[bool, list[str]]]:
    """Split ``lines`` into runs of text (``False``) and fenced code (``True``, reST blocks converted)."""
    text: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        directive = _DIRECTIVE.fullmatch(stripped)
        if stripped.startswith("```"):  # a Markdown fence already: through to its end, untouched
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines) - 1)
            yield False, text
            text = []
            yield True, lines[i:end + 1]
            i = end + 1
            continue
        if not (directive or stripped.endswith("::")):
            text.append(line)
            i += 1
            continue
        lang = directive["lang"] if directive else ""
        if not directive:  # "text::" -> "text:", "text ::" -> "text", "::" alone -> nothing
            head = line.rstrip()[:-2]
            head = head.rstrip() if head.endswith(" ") or not head.strip() else head + ":"
            if head.strip():
                text.append(head)
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > _indent(line)):
            j += 1
        code = textwrap.dedent("\n".join(lines[i + 1:j])).strip("\n").splitlines()
        if code:
            yield False, text
            text = []
            pad = " " * _indent(line)
            yield True, ["", f"{pad}```{lang}", *(pad + c if c else "" for c in code), f"{pad}```", ""]
        i = j
    yield False, text


def rst_to_markdown(text: str, resolve: Resolver | None = None) -> str:
    """A whole docstring's reST markup as Markdown: literal blocks fenced, the rest by :func:`rst_inline`."""
    out: list[str] = []
    for code, lines in _blocks(text.split("\n")):
        if code:
            out += lines
        elif lines:
            out += rst_inline("\n".join(lines), resolve).split("\n")
    return "\n".join(out)


def _lookup(scope: object, dotted: str) -> Object | None:
    """The object ``dotted`` names from ``scope`` (a class's inherited members included), if any."""
    node = scope
    try:
        for part in dotted.split("."):
            members = node.all_members if getattr(node, "is_class", False) else node.members
            node = members[part]
        return node
    except (KeyError, AttributeError, AliasResolutionError, CyclicAliasError):
        return None


def resolver(obj: Object, loader: GriffeLoader) -> Resolver:
    """Resolve a role's target as Python would from ``obj``'s scope, then as an absolute path."""

    def resolve(target: str) -> str | None:
        scope: Object | None = obj
        while scope is not None:
            found = _lookup(scope, target)
            if found is not None:
                break
            scope = scope.parent
        else:
            found = _lookup(loader.modules_collection, target)
        try:
            return None if found is None else found.canonical_path
        except (AliasResolutionError, CyclicAliasError):
            return None

    return resolve


def _objects(obj: Object) -> Iterator[Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


class RstMarkup(Extension):
    """Rewrite every docstring of a loaded package from reST markup to Markdown."""

    def on_package(self, *, pkg: Module, loader: GriffeLoader, **kwargs: object) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = rst_to_markdown(obj.docstring.value, resolver(obj, loader))
