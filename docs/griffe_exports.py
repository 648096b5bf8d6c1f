"""Griffe extension for the documentation site: the package's lazy exports as aliases.

``visiontl``, ``visiontl.data`` and ``visiontl.train`` import their names on first use, from an
``_EXPORTS`` table (name -> module) read by ``visiontl.core.lazy.lazy_exports``. Griffe reads code
without running it, so it does not see ``visiontl.data.FolderDataModule``; this extension adds each
such name to its package as an alias of ``module.name``, so the site documents, and cross-references
resolve to, the names users import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

from griffe import Alias, Extension, GriffeLoader, Module


def _modules(module: Module) -> Iterator[Module]:
    yield module
    for member in module.members.values():
        if not member.is_alias and member.is_module:
            yield from _modules(member)


def lazy_exports(module: Module) -> dict[str, str]:
    """The ``_EXPORTS`` table of ``module`` (name -> module path), empty where it has none."""
    table = module.members.get("_EXPORTS")
    if table is None or table.is_alias or not table.is_attribute or table.value is None:
        return {}
    return ast.literal_eval(str(table.value))


class LazyExports(Extension):
    """Add each package's lazily exported names as aliases of the objects they name."""

    def on_package(self, *, pkg: Module, loader: GriffeLoader, **kwargs: object) -> None:
        for module in _modules(pkg):
            for name, source in lazy_exports(module).items():
                if name not in module.members:
                    module.set_member(name, Alias(name, f"{source}.{name}", parent=module))
