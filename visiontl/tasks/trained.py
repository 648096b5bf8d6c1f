"""A trained task back from disk: from a run directory, a Lightning checkpoint or a PEFT checkpoint.

Every command that starts from a finished run (``export``, ``distill``, ``wise-ft``, the benchmarks)
finds its checkpoint with :func:`run_checkpoint` and loads it with :func:`load_task`. Nothing is
unpickled: Lightning checkpoints go through :func:`visiontl.tasks.checkpoints.read_checkpoint`
(``weights_only``), PEFT checkpoints are safetensors (:mod:`visiontl.tasks.delta`, the format).

:func:`load_delta` rebuilds a PEFT run's model on the recorded base weights (or the ``weights``
given), hashes them, and refuses to go on when the hash differs, naming both: a LoRA update applied
to other weights than it was trained on computes something nobody trained.
"""

from __future__ import annotations

import json

import os
from pathlib import Path

import torch

from visiontl.core.errors import UserError, one_line
from visiontl.models.weights import WeightsError, WeightsMismatchError
from visiontl.tasks.checkpoints import CheckpointError, looks_like_safetensors, task_spec
from visiontl.tasks.classification import ClassificationTask
from visiontl.tasks.delta import delta_names, read_delta

__all__ = ["listing_datamodule", "load_delta", "load_task", "run_checkpoint"]


def run_checkpoint(source: str | os.PathLike[str]) -> Path:
    """The checkpoint a run directory stands for (``checkpoints/best.ckpt``, else ``last.ckpt``: a
    run that ended before its first validation), or ``source`` itself when it is a file.

    Raises:
        CheckpointError: ``source`` does not exist, or is a directory with neither checkpoint.
    """
    path = Path(source)
    if path.is_dir():
        candidates = [path / "checkpoints" / "best.ckpt", path / "checkpoints" / "last.ckpt"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise CheckpointError(
                f"{path} has no checkpoints/best.ckpt or last.ckpt; give a run directory or a .ckpt file."
            )
        path = found
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a run directory or a .ckpt file.")
    return path


def listing_datamodule(listing: str | os.PathLike[str], task: ClassificationTask) -> object:
    """A CSV listing of ``split,path,label`` rows (a run's ``splits.csv``, a benchmark's labels) read
    as ``task`` reads images: its recorded preprocessing (size, mean / std, channels) and its kind
    (``multiclass`` / ``multilabel``); evaluation transforms, no workers, images not re-checked."""
    from visiontl.data import CsvDataModule

    pre = task.preprocessing
    dm = CsvDataModule(str(listing), split_column="split", num_workers=0, image_size=pre.size, mean=list(pre.mean),
                       std=list(pre.std), in_chans=pre.in_chans, check_images=False,
                       task=task.hparams.get("task", "multiclass"))
    dm.resolve_preprocessing(pre)
    return dm


def load_task(source: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None) -> ClassificationTask:
    """A trained :class:`~visiontl.tasks.ClassificationTask` (eval mode) from a run directory, a
    checkpoint or a PEFT checkpoint (``.peft.safetensors``, loaded onto its base weights, or onto
    ``weights``: :func:`load_delta`)."""
    path = run_checkpoint(source)
    # by name or by content: a damaged PEFT checkpoint is named as one, never read as a pickle
    if path.suffix == ".safetensors" or looks_like_safetensors(path):
        return load_delta(path, weights=weights)
    if weights is not None:
        raise CheckpointError(f"weights= is for PEFT checkpoints (.peft.safetensors); {path} holds all its weights.")
    return ClassificationTask.from_checkpoint(path)


def load_delta(path: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None) -> ClassificationTask:
    """Load a PEFT checkpoint onto its base weights, checked by SHA-256.

    Args:
        path: the ``.peft.safetensors`` file.
        weights: the base weights (a file or named source) when not the recorded source, e.g. the
            same file at another path on this machine.

    Returns:
        The task in eval mode, as trained.

    Raises:
        CheckpointError: a damaged file (truncated, a header that is not JSON or points outside the
            file, metadata that are not JSON, no ``hyper_parameters``), a backbone or strategy that is
            not a plain timm name or a registered strategy, tensors that are not finite or that
            make a LoRA update overflow when merged.
        WeightsMismatchError: the base weights found are not the ones it was trained on (both
            hashes named), or its tensors' names or shapes do not fit the model (both shapes named).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    header, meta, hp = read_delta(path)
    hp, strategy = task_spec(hp, f"PEFT checkpoint {path}")
    source = str(weights) if weights is not None else meta["base_source"]
    if source.startswith("timm:"):
        hp.update(pretrained=True, weights=None)
    elif source.startswith("random"):
        hp.update(pretrained=False, weights=None)
    else:
        hp.update(pretrained=True, weights=source)
    try:
        task = ClassificationTask.from_hparams(hp, strategy)
        task.preprocessing  # noqa: B018 - the recorded preprocessing, checked now rather than at export
    except WeightsError as err:
        raise WeightsError(f"{path} was trained on base weights {meta['base_source']!r} (sha256 "
                           f"{meta['base_sha256']}), which cannot be loaded here: {err} Give weights=... (CLI: "
                           f"--weights) pointing to the same weights.") from err
    except UserError as err:
        raise CheckpointError(f"PEFT checkpoint {path}: {one_line(err)}") from err
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError, IndexError) as err:
        raise CheckpointError(f"PEFT checkpoint {path}: its hyper_parameters do not rebuild a model "
                              f"({type(err).__name__}: {one_line(err, 200)}); damaged or edited.") from err
    found = task.base_weights["sha256"]
    if found != meta["base_sha256"]:
        raise WeightsMismatchError(
            f"{path} was trained on base weights with sha256 {meta['base_sha256']} ({meta['base_source']}), but the "
            f"base weights loaded here ({task.base_weights['source']}) have sha256 {found}. Its trained tensors only "
            f"make sense on the weights they were trained on: give weights=... (CLI: --weights) pointing to those.")
    model_state = task.model.state_dict()
    unexpected = [n for n in header if n not in model_state]
    if unexpected:
        raise WeightsMismatchError(f"{path} has tensors this model has no place for: "
                                   f"{', '.join(unexpected[:10])}.")
    for name, entry in header.items():
        if list(model_state[name].shape) != entry["shape"]:
            raise WeightsMismatchError(f"{path}: tensor {name} has shape {entry['shape']} but the model built from its "
                                       f"hyper_parameters has {list(model_state[name].shape)} there; damaged or "
                                       f"edited.")
    expected = set(delta_names(task))
    absent = sorted(expected - set(header))
    if absent:
        raise WeightsMismatchError(f"{path} lacks trained tensors the model needs: {', '.join(absent[:10])}.")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"PEFT checkpoint {path} cannot be read ({one_line(err, 200)}); damaged.") from err
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"PEFT checkpoint {path}: tensor {name} holds NaN or infinite values; the model "
                                  f"would compute NaN. Use a checkpoint from before the run diverged.")
    try:
        task.model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:
        raise WeightsMismatchError(f"{path}: its tensors do not load into the model ({one_line(err, 300)}).") from err
    _check_merge(task, path)
    task.base_weights = {"sha256": meta["base_sha256"], "source": meta["base_source"]}
    extra = json.loads(meta["extra"])
    thresholds = extra.get("thresholds") if task.multilabel else None
    if thresholds is not None:  # a multi-label delta carries the thresholds tuned for its weights
        if len(thresholds) != task.hparams["num_classes"] or not all(0.0 <= float(t) <= 1.0 for t in thresholds):
            raise CheckpointError(f"PEFT checkpoint {path}: its thresholds {thresholds!r} are not one number between 0 "
                                  f"and 1 per tag; damaged or edited.")
        task.thresholds.copy_(torch.tensor(thresholds, dtype=torch.float32))
    temperature = extra.get("temperature")
    if temperature is not None:  # its calibration (thresholds above are already stated at it)
        if len(temperature) != task.temperature.numel() or not all(0.0 < float(t) < float("inf") for t in temperature):
            raise CheckpointError(f"PEFT checkpoint {path}: its temperature {temperature!r} is not "
                                  f"{task.temperature.numel()} positive number(s); damaged or edited.")
        task.temperature.copy_(torch.tensor(temperature, dtype=torch.float32))
    return task.eval()


def _check_merge(task: ClassificationTask, path: Path) -> None:
    """Refuse a LoRA checkpoint whose update, folded into its base weight, is not finite (as export
    folds it); one layer at a time, without copying the model."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return
    with torch.no_grad():
        for name, module in task.model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            base = getattr(module.get_base_layer(), "weight", None)
            for adapter in getattr(module, "active_adapters", []):
                try:
                    delta = module.get_delta_weight(adapter)
                except (AttributeError, KeyError, NotImplementedError):
                    continue
                merged = delta if base is None else base + delta.to(base.dtype)
                if not bool(torch.isfinite(merged).all()):
                    raise CheckpointError(f"PEFT checkpoint {path}: its LoRA update of {name} merges to NaN or "
                                          f"infinite weights; the checkpoint is damaged or its run diverged.")


