"""The fine-tuning ladder: which parameters train and at what learning rate.

Strategies are selected by name (``"probe"``, ``"partial"``, ``"full"``, ``"gradual"``,
``"scratch"``, the parameter-efficient ``"bitfit"``, ``"lora"``, ``"adapter"``, ``"vpt"``, and the
heads fitted on cached features ``"prototype"``, ``"knn"``,
``"logreg"``), by plain config (``{"name": "partial", "k": 3}``) or as objects
(``Partial(k=3)``); in a recipe, ``strategy: partial`` or ``class_path`` / ``init_args``.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from visiontl.strategies.base import (
    Discriminative,
    GroupPlan,
    Strategy,
    StrategyError,
    decays,
    discriminative_lrs,
    no_weight_decay_names,
    set_trainable,
)
from visiontl.strategies.adapter import Adapter
from visiontl.strategies.bitfit import BitFit
from visiontl.strategies.full import Full
from visiontl.strategies.gradual import Gradual, GradualUnfreezing
from visiontl.strategies.lora import Lora
from visiontl.strategies.heads import KNN, FittedHead, KNNHead, LogisticRegression, Prototype, replace_classifier
from visiontl.strategies.partial import Partial
from visiontl.strategies.probe import Probe
from visiontl.strategies.scratch import Scratch
from visiontl.strategies.vpt import Vpt

__all__ = [
    "KNN",
    "Adapter",
    "BitFit",
    "STRATEGIES",
    "Discriminative",
    "FittedHead",
    "KNNHead",
    "Lora",
    "LogisticRegression",
    "Prototype",
    "Full",
    "GradualUnfreezing",
    "Gradual",
    "GroupPlan",
    "Partial",
    "Probe",
    "Scratch",
    "Strategy",
    "Vpt",
    "StrategyError",
    "decays",
    "discriminative_lrs",
    "get_strategy",
    "no_weight_decay_names",
    "register_strategy",
    "replace_classifier",
    "set_trainable",
]

STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Register a :class:`Strategy` subclass under its ``name`` (usable as a decorator)."""
    if not cls.name:
        raise StrategyError(f"{cls.__name__} has no 'name'.")
    STRATEGIES[cls.name] = cls
    return cls


for _cls in (Probe, Partial, Full, Gradual, Scratch, BitFit, Lora, Adapter, Vpt, Prototype, KNN, LogisticRegression):
    register_strategy(_cls)


def get_strategy(spec: Strategy | str | dict[str, Any], *, trusted: bool = True) -> Strategy:
    """Turn a name, a config dict or a strategy object into a strategy.

    Dicts are ``{"name": "partial", "k": 3}`` or recipe form
    ``{"class_path": "visiontl.strategies.Partial", "init_args": {"k": 3}}``.

    Args:
        spec: the strategy.
        trusted: whether ``spec`` comes from the user (code, command line, their recipe). Specs
            read from a checkpoint or a run directory are not: their ``class_path`` must name a
            registered strategy (:func:`register_strategy`) and nothing is imported for them.
    """
    if isinstance(spec, Strategy):
        return spec
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, dict) and "class_path" in spec:
        if not trusted:
            return _build(_registered(str(spec["class_path"])), dict(spec.get("init_args") or {}))
        return _from_class_path(spec["class_path"], dict(spec.get("init_args") or {}))
    elif isinstance(spec, dict):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
    else:
        raise StrategyError(f"A strategy must be a name, a dict or a Strategy, got {type(spec).__name__}.")
    if name not in STRATEGIES:
        close = difflib.get_close_matches(str(name), STRATEGIES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise StrategyError(f"Unknown strategy {name!r}.{hint} Known: {', '.join(STRATEGIES)}.")
    return _build(STRATEGIES[name], kwargs)


def _registered(class_path: str) -> type[Strategy]:
    """The registered strategy class a recorded ``class_path`` names (no import happens)."""
    for cls in STRATEGIES.values():
        module = cls.__module__
        if class_path in (f"{module}.{cls.__qualname__}", f"{module.rsplit('.', 1)[0]}.{cls.__qualname__}"):
            return cls
    raise StrategyError(
        f"The recorded strategy {class_path!r} is not a registered visiontl strategy; a checkpoint or run "
        f"directory never makes visiontl import code. Import and register_strategy() it yourself if you trust it."
    )


def _from_class_path(class_path: str, kwargs: dict[str, Any]) -> Strategy:
    module, _, attr = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise StrategyError(f"Cannot import strategy class {class_path!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise StrategyError(f"{class_path!r} is not a visiontl Strategy subclass.")
    return _build(cls, kwargs)


def _build(cls: type[Strategy], kwargs: dict[str, Any]) -> Strategy:
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise StrategyError(f"Strategy {cls.name!r}: {err}") from err
