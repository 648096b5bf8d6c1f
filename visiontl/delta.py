"""PEFT checkpoints: only what trained, on top of named base weights.

A parameter-efficient run (``bitfit``, ``lora``, ``adapter``, ``vpt``) changes a few tensors of a
large pretrained model. Its PEFT checkpoint, ``checkpoints/best.peft.safetensors``, stores just
those tensors (LoRA factors, adapters, prompts, the head; biases and norms for BitFit), the run's
hyper-parameters, and the SHA-256 and source of the base weights it was trained on. It is a
safetensors file: loading it never unpickles anything.

:func:`load_delta` rebuilds the model on the recorded base weights (or the ``weights`` given),
hashes them, and refuses to go on when the hash differs, naming both: a LoRA update applied to
other weights than it was trained on computes something nobody trained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from torch import nn

from visiontl import _io
from visiontl.weights import WeightsError, WeightsMismatchError, classifier_names

if TYPE_CHECKING:
    from visiontl.tasks import ClassificationTask

__all__ = ["FORMAT", "DeltaCheckpoint", "base_record", "delta_names", "is_delta", "load_delta", "read_delta_metadata",
           "save_delta"]

FORMAT = "visiontl-peft/1"
"""The ``format`` entry of a PEFT checkpoint's metadata."""


def base_record(model: nn.Module, backbone: str, weights: str | os.PathLike[str] | None,
                pretrained: bool) -> dict[str, str]:
    """SHA-256 of a freshly built backbone's weights (the classifier excluded: it is replaced)
    and where they came from: a named source or file (``weights``), timm's hub, or a random init."""
    from visiontl.features import weights_fingerprint

    if weights is not None:
        source = str(weights)
    elif pretrained:
        tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
        source = f"timm:{backbone}{'.' + tag if tag else ''}"
    else:
        source = "random initialisation (pretrained=False)"
    return {"sha256": weights_fingerprint(model, classifier_names(model)), "source": source}


def delta_names(task: ClassificationTask) -> list[str]:
    """State-dict names (of ``task.model``) of everything the strategy trains, at any point of the
    run: the parameters in its optimizer groups, and the running statistics of normalisation
    layers that are not frozen."""
    trained = {id(p) for group in task.strategy.param_groups(task.groups) for p in group["params"]}
    names = [n for n, p in task.model.named_parameters() if id(p) in trained]
    frozen = set(task.frozen_norms)
    for group in task.groups:
        for module_name in group.norm_modules:
            if module_name not in frozen:
                module = task.model.get_submodule(module_name)
                names.extend(f"{module_name}.{b}" for b, _ in module.named_buffers(recurse=False))
    return names


def save_delta(task: ClassificationTask, path: str | os.PathLike[str],
               state_dict: dict[str, torch.Tensor] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``task``'s PEFT checkpoint to ``path`` (atomically).

    Args:
        task: a task whose strategy trained part of a pretrained model.
        path: the ``.safetensors`` file to write.
        state_dict: the model's tensors to take the trained ones from (default: the task's
            current weights; a run passes its best checkpoint's).
        extra: more JSON-able metadata (validation metrics).
    """
    from safetensors.torch import save_file

    base = getattr(task, "base_weights", None)
    if not base:
        raise WeightsError(f"{type(task).__name__} has no record of its base weights; only a task built with "
                           f"a parameter-efficient strategy ('bitfit', 'lora', 'adapter', 'vpt') writes a PEFT "
                           f"checkpoint.")
    state = state_dict if state_dict is not None else task.model.state_dict()
    names = delta_names(task)
    missing = [n for n in names if n not in state]
    if missing:
        raise WeightsError(f"The weights given have no {', '.join(missing[:5])}: not this task's model.")
    tensors = {n: state[n].detach().cpu().contiguous().clone() for n in names}
    hparams = {k: v for k, v in dict(task.hparams).items() if _jsonable(v)}
    metadata = {"format": FORMAT, "base_sha256": base["sha256"], "base_source": base["source"],
                "hyper_parameters": json.dumps(hparams), "extra": json.dumps(extra or {})}
    path = Path(path)
    with _io.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def read_delta_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a PEFT checkpoint (no tensor is read); a clear error for other files."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"PEFT checkpoint {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path} is not a readable safetensors file ({err}).") from err
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path} is not a visiontl PEFT checkpoint (its metadata has format "
                           f"{meta.get('format')!r}, expected {FORMAT!r}).")
    return meta


def is_delta(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a visiontl PEFT checkpoint."""
    try:
        read_delta_metadata(path)
    except WeightsError:
        return False
    return True


def load_delta(path: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None) -> ClassificationTask:
    """Load a PEFT checkpoint onto its base weights, checked by SHA-256.

    Args:
        path: the ``.peft.safetensors`` file.
        weights: the base weights (a file or named source) when not the recorded source, e.g. the
            same file at another path on this machine.

    Returns:
        The task in eval mode, as trained.

    Raises:
        WeightsMismatchError: the base weights found are not the ones it was trained on (both
            hashes named).
    """
    from safetensors.torch import load_file

    from visiontl.strategies import StrategyError, get_strategy
    from visiontl.tasks.classification import _INIT_ARGS, ClassificationTask

    path = Path(path)
    meta = read_delta_metadata(path)
    hp = json.loads(meta["hyper_parameters"])
    source = str(weights) if weights is not None else meta["base_source"]
    if source.startswith("timm:"):
        hp.update(pretrained=True, weights=None)
    elif source.startswith("random"):
        hp.update(pretrained=False, weights=None)
    else:
        hp.update(pretrained=True, weights=source)
    try:  # registered strategies only: a checkpoint never makes visiontl import anything
        strategy = get_strategy(dict(hp.pop("strategy", None) or {"name": "probe"}), trusted=False)
    except StrategyError as err:
        raise WeightsError(f"{path}: {err}") from err
    try:
        task = ClassificationTask(strategy=strategy, **{k: v for k, v in hp.items() if k in _INIT_ARGS})
    except WeightsError as err:
        raise WeightsError(f"{path} was trained on base weights {meta['base_source']!r} (sha256 "
                           f"{meta['base_sha256']}), which cannot be loaded here: {err} Give weights=... (CLI: "
                           f"--weights) pointing to the same weights.") from err
    found = task.base_weights["sha256"]
    if found != meta["base_sha256"]:
        raise WeightsMismatchError(
            f"{path} was trained on base weights with sha256 {meta['base_sha256']} ({meta['base_source']}), but the "
            f"base weights loaded here ({task.base_weights['source']}) have sha256 {found}. Its trained tensors only "
            f"make sense on the weights they were trained on: give weights=... (CLI: --weights) pointing to those.")
    tensors = load_file(str(path))
    result = task.model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise WeightsMismatchError(f"{path} has tensors this model has no place for: "
                                   f"{', '.join(result.unexpected_keys[:10])}.")
    expected = set(delta_names(task))
    absent = sorted(expected - set(tensors))
    if absent:
        raise WeightsMismatchError(f"{path} lacks trained tensors the model needs: {', '.join(absent[:10])}.")
    task.base_weights = {"sha256": meta["base_sha256"], "source": meta["base_source"]}
    return task.eval()


class DeltaCheckpoint(Callback):
    """At the end of a parameter-efficient run, write the PEFT checkpoint of its best checkpoint
    beside it (``checkpoints/best.peft.safetensors``); without one (no validation), of the final
    weights (``checkpoints/last.peft.safetensors``)."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from visiontl.run import checkpoint_record, run_dir

        if not trainer.is_global_zero or getattr(pl_module, "base_weights", None) is None:
            return
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", None) or None
        record = checkpoint_record(best, state_dict=True)
        if record is not None:
            state = {k[len("model."):]: v for k, v in record["state_dict"].items() if k.startswith("model.")}
            save_delta(pl_module, Path(best).with_suffix(".peft.safetensors"), state,
                       {"val_metrics": record["val_metrics"]})
        else:
            save_delta(pl_module, run_dir(trainer) / "checkpoints" / "last.peft.safetensors")
