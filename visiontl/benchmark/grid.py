"""The grid of a bench: cells, their keys, the step rule and shards.

A cell is one (data set, backbone, strategy, label budget, seed). Its **key** is a SHA-256 of its
resolved configuration (the strategy with all its options, the step budget, image and batch size),
the data set's fingerprint (files, sizes, modification times) and the backbone weights' hash, so a
finished cell is recognised after a restart, on another machine, or in another shard, and any
change that would change its result makes it a new cell.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from visiontl.benchmark.config import BackboneSpec, BenchConfig, BenchError, DataSpec
from visiontl.data.shots import Shots

__all__ = ["MAX_CELLS", "MAX_HOURS", "STEP_RULE", "Cell", "build_datamodule", "cell_steps", "check_budgets",
           "check_weights", "data_fingerprint", "expand_grid", "grid_size", "over_limit", "parse_shard", "shard_cells",
           "step_budget", "weights_hash"]

STEP_RULE = ("steps = max(200, min(20 epochs, max(3000, 3 epochs))) of the cell's own training images "
             "(visiontl.train.finetune.auto_steps), unless steps: is set")


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    data: DataSpec
    backbone: BackboneSpec
    strategy: Any
    shots: Shots
    seed: int
    image_size: int | None
    steps: int | None
    batch_size: int | None

    @property
    def strategy_label(self) -> str:
        """``lora`` or ``lora(r=8)``: the strategy's name and the options given in the bench file."""
        if isinstance(self.strategy, str):
            return self.strategy
        options = {k: v for k, v in self.strategy.items() if k != "name"}
        return f"{self.strategy['name']}({', '.join(f'{k}={v}' for k, v in options.items())})" if options \
            else str(self.strategy["name"])

    @property
    def shots_label(self) -> str:
        return "all" if self.shots is None else str(self.shots)

    def describe(self) -> dict[str, Any]:
        """What identifies the cell, as plain data (the key hashes this with the fingerprints)."""
        from visiontl.strategies import get_strategy

        return {"data": self.data.to_dict(), "backbone": self.backbone.to_dict(),
                "strategy": get_strategy(self.strategy).to_config(), "shots": self.shots, "seed": self.seed,
                "image_size": self.image_size, "steps": self.steps, "batch_size": self.batch_size}

    def key(self) -> str:
        payload = {**self.describe(), "data_fingerprint": data_fingerprint(self.data),
                   "weights_sha256": weights_hash(self.backbone.weights)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_budget(config: BenchConfig) -> str:
    """The step budget of every cell, in words."""
    return f"{config.steps} steps per cell (steps:)" if config.steps else STEP_RULE


def cell_steps(cell: Cell, n_train: int, batch_size: int) -> int:
    """The cell's step budget by :data:`STEP_RULE`."""
    from visiontl.train.finetune import auto_steps

    return cell.steps if cell.steps is not None else auto_steps(n_train, batch_size)


def expand_grid(config: BenchConfig) -> list[Cell]:
    """Every cell, in run order: per data set and backbone, the frozen-backbone strategies first
    (they share one feature pass), budgets from small to large, seeds innermost."""
    from visiontl.strategies import get_strategy

    def frozen(spec: Any) -> bool:
        strategy = get_strategy(spec)
        return not strategy.sgd or bool(strategy.cache_features)

    strategies = sorted(config.strategies, key=lambda s: not frozen(s))  # stable: the file's order otherwise
    return [Cell(data, backbone, strategy, shots, seed, config.image_size, config.steps, config.batch_size)
            for data in config.data for backbone in config.backbones for strategy in strategies
            for shots in config.shots for seed in range(config.seeds)]


def check_budgets(config: BenchConfig) -> None:
    """Before anything trains: every label budget fits every class of every data set.

    Raises:
        DataError: naming the data set, the class and its count.
    """
    from visiontl.data.shots import nested_shots

    largest = max((s for s in config.shots if s is not None), default=None)
    if largest is None:
        return
    for spec in config.data:
        dm = build_datamodule(spec, num_workers=0)
        nested_shots(dm.splits["train"], largest, 0, what=f"the training split of data set {spec.name!r}")


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> ``(i, n)``; ``None`` -> the whole grid ``(0, 1)``."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise BenchError(f"--shard {text!r}: give i/n, e.g. 0/4 for the first of four shards.") from None
    if n < 1 or not 0 <= i < n:
        raise BenchError(f"--shard {text}: shards are numbered 0 to n-1 (0/{max(n, 1)} ... {max(n, 1) - 1}/{max(n, 1)}),"
                         f" so that n shards partition the grid.")
    return i, n


def shard_cells(cells: list[Cell], shard: tuple[int, int]) -> list[Cell]:
    """The cells of shard ``i`` of ``n``: every n-th cell from the i-th, so the shards of one n
    partition the grid and each gets a share of every strategy."""
    i, n = shard
    return cells[i::n]


@cache
def weights_hash(weights: str) -> str:
    """SHA-256 of a weights file or named source's file; ``hub:`` / ``random`` as they are."""
    if weights in ("hub", "random"):
        return weights
    from visiontl.models.weights import resolve_weights

    path, _ = resolve_weights(weights)
    return _file_sha256(str(Path(path).resolve()), Path(path).stat().st_mtime_ns)


@cache
def _file_sha256(path: str, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_datamodule(spec: DataSpec, **kwargs: Any) -> Any:
    """The labelled datamodule of a data spec (``kwargs``: shots, seeds, image settings), its
    splits read: a data set that cannot be built (a ``root`` that is no data set, an argument of
    the wrong type) is a :class:`BenchError` naming the data set and the ``init_args`` concerned."""
    from visiontl.train.finetune import make_datamodule
    from visiontl.benchmark.config import datamodule_class

    args = {**spec.init_args, **kwargs}
    try:
        dm = make_datamodule(spec.path, **args) if spec.path is not None \
            else datamodule_class(str(spec.class_path))(**args)
        dm.splits  # noqa: B018 - read now, so that a bad data set fails here, named
    except BenchError:
        raise
    except (TypeError, ValueError) as err:  # DataError included
        text = " ".join(str(err).split())
        named = [f"init_args.{k}: {v}" for k, v in spec.init_args.items()
                 if isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v) and str(v) in text]
        if not named and spec.init_args:  # the value is not in the message: name every key given
            named = [f"init_args {', '.join(map(str, spec.init_args))}"]
        source = spec.path or spec.class_path
        raise BenchError(f"data set {spec.name!r} ({source}{'; ' + ', '.join(named) if named else ''}) cannot be "
                         f"used: {text}") from err
    return dm


def check_weights(config: BenchConfig) -> None:
    """Before anything trains (and in a dry run): every backbone's weights load into its
    architecture. A file must be a weights file that fits (``/etc/passwd`` is refused here, not in
    the middle of the grid); ``hub`` weights must be cached or downloadable.

    Raises:
        BenchError: naming the backbone entry, its weights and why.
    """
    for index, backbone in enumerate(config.backbones):
        if backbone.weights == "random":
            continue
        try:
            _check_backbone_weights(backbone.name, backbone.weights, *_weights_stamp(backbone.weights))
        except BenchError:
            raise
        except (ValueError, OSError) as err:  # WeightsError, BackboneError, an unreadable file: the user's to fix
            fix = f" In a bench: {backbone.name}=FILE (or a named source) or {backbone.name}=random." \
                if backbone.weights == "hub" else ""
            raise BenchError(f"backbones[{index}] ({backbone.label}): {' '.join(str(err).split())}{fix}") from err


def _weights_stamp(weights: str) -> tuple[str, int]:
    if weights == "hub":
        return "", 0
    from visiontl.models.weights import resolve_weights

    path, _ = resolve_weights(weights)
    return str(Path(path).resolve()), Path(path).stat().st_mtime_ns


@cache
def _check_backbone_weights(name: str, weights: str, path: str, mtime_ns: int) -> None:
    """Load ``weights`` into a fresh ``name`` once per file version (the dry run and the run share it)."""
    from visiontl.models.backbones import check_pretrained_available, create_backbone

    if weights == "hub":
        check_pretrained_available(name)
        return
    create_backbone(name, num_classes=2, weights=weights)


MAX_CELLS = 10_000
"""Cells above which ``visiontl bench`` asks for ``--yes`` (``--max-cells``)."""
MAX_HOURS = 24.0
"""Estimated hours above which ``visiontl bench`` asks for ``--yes`` (``--max-hours``)."""


def grid_size(config: BenchConfig, shard: tuple[int, int] = (0, 1)) -> int:
    """Cells of ``shard``, counted without building the grid."""
    total = len(config.data) * len(config.backbones) * len(config.strategies) * len(config.shots) * config.seeds
    i, n = shard
    return len(range(i, total, n))


def over_limit(cells: int, seconds: float | None, max_cells: int = MAX_CELLS,
               max_hours: float = MAX_HOURS) -> str | None:
    """Why a grid of ``cells`` cells and ``seconds`` of estimated time needs confirming (None: it does not)."""
    reasons = []
    if cells > max_cells:
        reasons.append(f"{cells:,} cells, above --max-cells {max_cells:,}")
    if seconds is not None and seconds > max_hours * 3600:
        reasons.append(f"an estimated {seconds / 3600:,.1f} h on this machine, above --max-hours {max_hours:g}")
    return " and ".join(reasons) or None


@cache
def _fingerprint(spec_json: str) -> str:
    from visiontl.core.cache import data_fingerprint as files_fingerprint

    spec = DataSpec(**json.loads(spec_json))
    dm = build_datamodule(spec, num_workers=0)
    files = sorted({str(p) for items in dm.splits.values() for p, _ in items})
    return files_fingerprint(files)


def data_fingerprint(spec: DataSpec) -> str:
    """Fingerprint of a data set's files (every split), computed once per process."""
    return _fingerprint(json.dumps(spec.to_dict(), sort_keys=True))
