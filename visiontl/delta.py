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


def _read_delta(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], dict[str, Any]]:
    """The tensor entries, metadata and hyper-parameters of a PEFT checkpoint, every part checked
    (:func:`visiontl.checkpoints.read_safetensors_header`) before safetensors reads the file."""
    from visiontl.checkpoints import CheckpointError, read_safetensors_header

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
    :class:`~visiontl.checkpoints.CheckpointError` for other and damaged files."""
    return _read_delta(Path(path))[1]


def is_delta(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a readable visiontl PEFT checkpoint."""
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
        CheckpointError: a damaged file (truncated, a header that is not JSON or points outside the
            file, metadata that are not JSON, no ``hyper_parameters``), a backbone or strategy that is
            not a plain timm name or a registered strategy, tensors that are not finite or that
            make a LoRA update overflow when merged.
        WeightsMismatchError: the base weights found are not the ones it was trained on (both
            hashes named), or its tensors' names or shapes do not fit the model (both shapes named).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from visiontl.checkpoints import CheckpointError, task_spec
    from visiontl.errors import UserError, one_line
    from visiontl.tasks.classification import _INIT_ARGS, ClassificationTask

    path = Path(path)
    header, meta, hp = _read_delta(path)
    hp, strategy = task_spec(hp, f"PEFT checkpoint {path}")
    source = str(weights) if weights is not None else meta["base_source"]
    if source.startswith("timm:"):
        hp.update(pretrained=True, weights=None)
    elif source.startswith("random"):
        hp.update(pretrained=False, weights=None)
    else:
        hp.update(pretrained=True, weights=source)
    try:
        task = ClassificationTask(strategy=strategy, **{k: v for k, v in hp.items() if k in _INIT_ARGS})
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
    return task.eval()


def _check_merge(task: ClassificationTask, path: Path) -> None:
    """Refuse a LoRA checkpoint whose update, folded into its base weight, is not finite (as export
    folds it); one layer at a time, without copying the model."""
    from visiontl.checkpoints import CheckpointError

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


class DeltaCheckpoint(Callback):
    """At the end of a parameter-efficient run, write the PEFT checkpoint of its best checkpoint
    beside it (``checkpoints/best.peft.safetensors``); without one (no validation), of the final
    weights (``checkpoints/last.peft.safetensors``)."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from visiontl.checkpoints import checkpoint_record, model_state
        from visiontl.run import run_dir

        if not trainer.is_global_zero or getattr(pl_module, "base_weights", None) is None:
            return
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", None) or None
        record = checkpoint_record(best, state_dict=True)
        if record is not None:
            state = model_state(record["state_dict"])
            save_delta(pl_module, Path(best).with_suffix(".peft.safetensors"), state,
                       {"val_metrics": record["val_metrics"]})
        else:
            save_delta(pl_module, run_dir(trainer) / "checkpoints" / "last.peft.safetensors")
