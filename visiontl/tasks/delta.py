"""PEFT checkpoints: only what trained, on top of named base weights.

A parameter-efficient run (``bitfit``, ``lora``, ``adapter``, ``vpt``) changes a few tensors of a
large pretrained model. Its PEFT checkpoint, ``checkpoints/best.peft.safetensors``, stores just
those tensors (LoRA factors, adapters, prompts, the head; biases and norms for BitFit), the run's
hyper-parameters, and the SHA-256 and source of the base weights it was trained on. It is a
safetensors file: loading it never unpickles anything.

:func:`visiontl.tasks.trained.load_delta` rebuilds the model on the recorded base weights (or the ``weights`` given),
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

from visiontl.core import files
from visiontl.models.weights import WeightsError, classifier_names
from visiontl.tasks.protocols import Calibrated, PredictsTags

if TYPE_CHECKING:
    from visiontl.tasks import ClassificationTask

__all__ = ["FORMAT", "DeltaCheckpoint", "base_record", "delta_names", "is_delta", "read_delta", "read_delta_metadata",
           "save_delta"]

FORMAT = "visiontl-peft/1"
"""The ``format`` entry of a PEFT checkpoint's metadata."""


def base_record(model: nn.Module, backbone: str, weights: str | os.PathLike[str] | None,
                pretrained: bool) -> dict[str, str]:
    """SHA-256 of a freshly built backbone's weights (the classifier excluded: it is replaced)
    and where they came from: a named source or file (``weights``), timm's hub, or a random init."""
    from visiontl.models.features import weights_fingerprint

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

    base = task.base_weights
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
    with files.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def read_delta(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], dict[str, Any]]:
    """The tensor entries, metadata and hyper-parameters of a PEFT checkpoint, every part checked
    (:func:`visiontl.tasks.checkpoints.read_safetensors_header`) before safetensors reads the file."""
    from visiontl.tasks.checkpoints import CheckpointError, read_safetensors_header

    header, meta = read_safetensors_header(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a visiontl PEFT checkpoint (its metadata has format "
                              f"{meta.get('format')!r}, expected {FORMAT!r}).")
    for key in ("base_sha256", "base_source", "hyper_parameters"):
        if not meta.get(key):
            raise CheckpointError(f"PEFT checkpoint {path} has no {key} in its metadata: damaged or not written by "
                                  f"visiontl; write it again from its run (visiontl writes it at the end of a fit).")
    decoded = {}
    for key in ("hyper_parameters", "extra"):
        if key not in meta:
            continue
        try:
            decoded[key] = json.loads(meta[key])
        except ValueError as err:
            raise CheckpointError(f"PEFT checkpoint {path}: its metadata {key} is not JSON ({err}); damaged or "
                                  f"edited.") from err
        if not isinstance(decoded[key], dict):
            raise CheckpointError(f"PEFT checkpoint {path}: its metadata {key} is a JSON "
                                  f"{type(decoded[key]).__name__}, not an object; damaged or edited.")
    return header, meta, decoded["hyper_parameters"]


def read_delta_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a PEFT checkpoint (no tensor is read), its header checked; a one-line
    :class:`~visiontl.tasks.checkpoints.CheckpointError` for other and damaged files."""
    return read_delta(Path(path))[1]


def is_delta(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a readable visiontl PEFT checkpoint."""
    try:
        read_delta_metadata(path)
    except WeightsError:
        return False
    return True


class DeltaCheckpoint(Callback):
    """At the end of a parameter-efficient run, write the PEFT checkpoint of its best checkpoint
    beside it (``checkpoints/best.peft.safetensors``); without one (no validation), of the final
    weights (``checkpoints/last.peft.safetensors``)."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from visiontl.tasks.checkpoints import checkpoint_record, model_state
        from visiontl.core.rundir import run_dir

        if not trainer.is_global_zero or pl_module.base_weights is None:
            return
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", None) or None
        record = checkpoint_record(best, state_dict=True)
        if record is not None:
            state = model_state(record["state_dict"])
            extra = {"val_metrics": record["val_metrics"]}
            for name in ("thresholds", "temperature"):  # the decision thresholds and calibration of these weights
                if name in record["state_dict"]:
                    extra[name] = [float(t) for t in record["state_dict"][name]]
            save_delta(pl_module, Path(best).with_suffix(".peft.safetensors"), state, extra)
        else:
            thresholds = pl_module.thresholds if isinstance(pl_module, PredictsTags) and pl_module.multilabel else None
            extra = {"temperature": pl_module.temperature.tolist()} if isinstance(pl_module, Calibrated) else {}
            if thresholds is not None:
                extra["thresholds"] = thresholds.tolist()
            save_delta(pl_module, run_dir(trainer) / "checkpoints" / "last.peft.safetensors", extra=extra or None)
