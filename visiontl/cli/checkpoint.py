"""A ``--ckpt_path`` checkpoint on the command line: read as data, compared with the configuration.

Lightning's CLI would merge a checkpoint's ``hyper_parameters`` into the configuration, importing
the class paths they name and letting their values (``weights: /etc/passwd``) override what the
user configured. visiontl's CLI reads the checkpoint through :func:`visiontl.tasks.checkpoints.read_checkpoint`
(``weights_only``; a pickle, a damaged file or a strange backbone name is a one-line refusal),
builds the model from the user's configuration alone, and stops with one line naming both values
where the two disagree (another task, backbone, strategy, number of input channels or classes, or
class names in another order). Lightning then restores the weights with ``weights_only=True``.
A checkpoint being evaluated (``validate`` / ``test`` / ``predict``) brings its own weights, so no
pretrained weights are read for it (no hub access, no weight file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visiontl.core.errors import UserError, one_line

__all__ = ["CheckpointMismatchError", "CliCheckpoint", "check_config", "check_model", "no_pretrained_weights",
           "read_cli_checkpoint"]

# values of ckpt_path that Lightning resolves itself (visiontl resolves "last"): not files
LIGHTNING_KEYWORDS = ("last", "best", "hpc")


class CheckpointMismatchError(UserError):
    """A ``--ckpt_path`` checkpoint trained with another configuration than the one given."""


@dataclass(frozen=True)
class CliCheckpoint:
    """What the command line knows of a checkpoint: its path and recorded hyper-parameters (data)."""

    path: Path
    hparams: dict[str, Any]
    strategy: str  # the registered strategy's class name (nothing imported for it)


def read_cli_checkpoint(ckpt_path: str | os.PathLike[str] | None) -> CliCheckpoint | None:
    """The checkpoint a command names, read as data; None for none or a Lightning keyword."""
    if ckpt_path is None:
        return None
    text = str(ckpt_path)
    if text in LIGHTNING_KEYWORDS or text.startswith("registry"):
        return None
    from visiontl.tasks.checkpoints import read_checkpoint, task_spec

    ckpt = read_checkpoint(text, what="--ckpt_path", mmap=True)
    hp, strategy = task_spec(ckpt["hyper_parameters"], f"--ckpt_path {text}")
    hp["_class_path"] = ckpt["hyper_parameters"].get("_class_path")
    return CliCheckpoint(Path(text), hp, type(strategy).__name__)


def _fix(ckpt: CliCheckpoint) -> str:
    config = ckpt.path.parent.parent / "config.yaml" if ckpt.path.parent.name == "checkpoints" else None
    where = f" (--config {config})" if config is not None and config.is_file() else " (its run's config.yaml)"
    return f"run it with the configuration it was trained with{where}, or give another checkpoint"


def _refuse(ckpt: CliCheckpoint, field: str, recorded: Any, configured: Any) -> None:
    raise CheckpointMismatchError(
        f"--ckpt_path {ckpt.path} was trained with {field}={one_line(repr(recorded), 160)}, but the configuration "
        f"says {one_line(repr(configured), 160)}: {_fix(ckpt)}.")


def _get(namespace: Any, key: str) -> Any:
    try:
        return namespace.get(key) if namespace is not None else None
    except AttributeError:
        return getattr(namespace, key, None)


def _class_name(path: Any) -> str | None:
    return str(path).rsplit(".", 1)[-1] if path else None


def check_config(ckpt: CliCheckpoint, config: Any) -> None:
    """Compare the parsed configuration (before any class exists) with the checkpoint: the task's
    class, the backbone and the input channels. Nothing the checkpoint names is imported."""
    model = _get(config, "model")
    if model is None:
        return
    recorded_task, configured_task = ckpt.hparams.get("_class_path"), _get(model, "class_path")
    if recorded_task and configured_task and _class_name(recorded_task) != _class_name(configured_task):
        _refuse(ckpt, "model.class_path", recorded_task, configured_task)
    init = _get(model, "init_args")
    for field in ("backbone", "in_chans"):
        configured, recorded = _get(init, field), ckpt.hparams.get(field)
        if configured is not None and recorded is not None and configured != recorded:
            _refuse(ckpt, f"model.init_args.{field}", recorded, configured)


def check_model(ckpt: CliCheckpoint | None, model: Any) -> None:
    """Compare the task built from the configuration with the checkpoint: backbone, strategy,
    channels, number of classes and class names (their order is the meaning of every output)."""
    hparams = getattr(model, "hparams", None)
    if ckpt is None or hparams is None:
        return
    for field in ("backbone", "in_chans", "num_classes"):
        configured, recorded = hparams.get(field), ckpt.hparams.get(field)
        if configured is not None and recorded is not None and configured != recorded:
            source = " (from the data)" if field == "num_classes" else ""
            _refuse(ckpt, f"{field}{source}", recorded, configured)
    configured_names, recorded_names = hparams.get("class_names"), ckpt.hparams.get("class_names")
    if configured_names and recorded_names and list(configured_names) != list(recorded_names):
        _refuse(ckpt, "class_names", list(recorded_names), list(configured_names))
    strategy = getattr(model, "strategy", None)
    if strategy is not None and type(strategy).__name__ != ckpt.strategy:
        _refuse(ckpt, "model.init_args.strategy", ckpt.strategy, type(strategy).__name__)


def no_pretrained_weights(config: Any) -> None:
    """A checkpoint being evaluated brings its weights: build the model without reading any."""
    init = _get(_get(config, "model"), "init_args")
    if init is None:
        return
    for field, value in (("pretrained", False), ("weights", None)):
        if field in init:
            init[field] = value
