"""A configuration the command line cannot take, said in one line with the closest valid key.

jsonargparse reports an unknown key of a recipe as a usage dump, and a class that refuses its
arguments as a nested "Does not validate against any of the Union subtypes" block. These
functions turn both into one line: the key as the user wrote it (``model.init_args.backbnoe``),
what is wrong, the closest accepted key or class, and where to look.
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from collections.abc import Iterable

from visiontl.core.errors import UserError, one_line

__all__ = ["ConfigError", "command_keys", "explain_parse_error"]

_NOT_ACCEPTED = re.compile(r"Problem with given class_path '([\w.]+)':\s*Option '([\w.]+)' is not accepted")
_NO_ATTRIBUTE = re.compile(r"Problem with given class_path '([\w.]+)':\s*module '([\w.]+)' has no attribute '(\w+)'")
_BAD_IMPORT = re.compile(r"Problem with given class_path '([\w.]+)':\s*(?:No module named|Unable to import) [^\n]*")
_NOT_OPTION = re.compile(r"does not accept option '([\w.]+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.+)")
_PARSER_KEY = re.compile(r'Parser key "([\w.]+)"')
_EXPECTED = re.compile(r"Expected a <class '(\w+)'>")
_GOT = re.compile(r"(?:Got value|Given value): (.+)")
_PROBLEM = re.compile(r"Problem with given class_path '([\w.]+)':\s*\n?\s*(.+)")


class ConfigError(UserError):
    """A key or value of the command line or a recipe that the command does not take."""


def _close(word: str, choices: Iterable[str]) -> str:
    found = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.6)
    return f" Did you mean `{found[0]}`?" if found else ""


def _init_parameters(class_path: str) -> list[str]:
    """The ``__init__`` argument names of a class the parser has already imported (none is imported here)."""
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(sys.modules.get(module_name), name, None)
    if not inspect.isclass(cls):
        return []
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _module_classes(module_name: str) -> list[str]:
    module = sys.modules.get(module_name)
    return [n for n, v in vars(module).items() if inspect.isclass(v)] if module is not None else []


def explain_parse_error(err: BaseException, known_keys: Iterable[str] = (), command: str = "visiontl fit"
                        ) -> str:
    """One line for a jsonargparse parse error (``ArgumentError``) of ``command``.

    Args:
        err: the error jsonargparse raised (with ``exit_on_error=False``).
        known_keys: the dotted keys the command accepts (for "did you mean").
        command: how the command is called, for the pointer to its ``--help``.
    """
    text = str(err)
    help_hint = f"`{command} --help` lists the options"
    section = (m.group(1) if (m := _PARSER_KEY.search(text)) else "model")
    if m := _NOT_ACCEPTED.search(text):
        class_path, key = m.groups()
        return (f"{section}.init_args.{key} is not an argument of {class_path}."
                f"{_close(key, _init_parameters(class_path))} ({help_hint}; `{command} --{section}.help "
                f"{class_path}` lists that class's arguments)")
    if m := _NO_ATTRIBUTE.search(text):
        class_path, module_name, name = m.groups()
        close = _close(name, _module_classes(module_name))
        return f"{section}.class_path {class_path}: {module_name} has no class {name}.{close} ({help_hint})"
    if m := _BAD_IMPORT.search(text):
        return f"{section}.class_path {m.group(1)} cannot be imported: check its spelling ({help_hint})"
    if m := _NOT_OPTION.search(text):
        key = m.group(1)
        return f"unknown key {key} in the configuration.{_close(key, known_keys)} ({help_hint})"
    if m := _UNRECOGNIZED.search(text):
        flags = m.group(1).split()
        flag = next((f for f in flags if f.startswith("--")), flags[0])
        key = flag.lstrip("-").split("=", 1)[0]
        return f"unknown option {flag}.{_close(key, known_keys)} ({help_hint})"
    if types := list(dict.fromkeys(_EXPECTED.findall(text))):  # a value of the wrong type
        keys = _PARSER_KEY.findall(text)
        key = f"{keys[0]}.init_args.{keys[-1]}" if len(keys) > 1 and keys[0] in ("model", "data") else keys[-1] \
            if keys else "a value"
        tail = text[text.rfind(f'Parser key "{keys[-1]}"'):] if keys else text
        value = _GOT.search(tail)
        given = f" {one_line(value.group(1), 80)!r}" if value else ""
        wanted = " or ".join("None" if t == "NoneType" else t for t in types)
        return f"{key}: the value{given} is not valid; it takes {wanted} ({help_hint})"
    if m := _PROBLEM.search(text):
        return f"{section}: {m.group(1)}: {one_line(m.group(2), 300)} ({help_hint})"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return f"{one_line(first, 400)} ({help_hint})"


def command_keys(subcommand: str | None) -> list[str]:
    """The keys a Lightning subcommand takes at the top of a recipe and under ``trainer`` (for
    "did you mean"; the ``model`` / ``data`` keys come from their class, see above)."""
    from pytorch_lightning import Trainer

    top = ["model", "data", "trainer", "optimizer", "lr_scheduler", "seed_everything", "config"]
    if subcommand in ("fit", "validate", "test", "predict"):
        top.append("ckpt_path")
    if subcommand == "validate" or subcommand == "test" or subcommand == "predict":
        top.append("verbose" if subcommand != "predict" else "return_predictions")
    return top + [f"trainer.{name}" for name in _init_parameters_of(Trainer)]


def _init_parameters_of(cls: type) -> list[str]:
    try:
        return [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    except (TypeError, ValueError):
        return []
