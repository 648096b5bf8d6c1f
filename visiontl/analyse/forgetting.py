"""What fine-tuning kept of the pretrained model: forgetting and drift, measured on every run.

- **Retention on a task to keep** (``retain``: a labelled folder or CSV of an earlier task or
  domain): the linear probe (:func:`visiontl.strategies.linear_probe.fit_probe`, logistic regression with the
  penalty by cross-validation) is fitted on the backbone's features of the retained set's training
  split and scored on its validation split, once with the pretrained backbone
  (``retain_acc_before``, its features cached) and once with the fine-tuned one
  (``retain_acc_after``, :func:`retention_accuracy`); ``forgetting`` is the drop. This is linear-probe retention: what the features still know, whatever head a later user
  puts on them.
- **Drift, with no extra data:** linear CKA (Kornblith et al., ICML 2019) between the pretrained
  and the fine-tuned pooled features of the validation images; the L2 distance of every layer
  group's weights from the pretrained ones (absolute and relative to the pretrained norm); and,
  where the pretrained weights carry their ImageNet classifier, the top-1 agreement of that
  classifier's predictions before and after (the fine-tuned features fed to the original head).

:class:`Forgetting` is the callback that measures them at the end of a fit, on the weights the run
keeps (the best checkpoint), and hands them to the run report (``metrics.json``, ``strategy.json``
and ``drift.png``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from visiontl.data.protocols import LabelledSplits, ServesFeatures
from visiontl.tasks.checkpoints import kept_model
from visiontl.tasks.protocols import StartsFromPretrained

if TYPE_CHECKING:
    from visiontl.analyse.after_fit import FitContext

__all__ = ["Forgetting", "ForgettingRecord", "imagenet_classifier", "linear_cka", "retain_datamodule", "retention_accuracy",
           "weight_drift"]

log = logging.getLogger(__name__)


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear centred kernel alignment of two representations of the same ``n`` inputs (rows).

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc`` (Kornblith
    et al. 2019): 1 for identical representations, invariant to orthogonal transforms and isotropic
    scaling of either, in float64. Uses the n x n Gram form when ``n`` is smaller than the widths.
    """
    a = torch.tensor(np.asarray(x), dtype=torch.float64)
    b = torch.tensor(np.asarray(y), dtype=torch.float64)
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b):
        raise ValueError(f"linear_cka needs two (n, width) arrays of the same n, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")
    a, b = a - a.mean(0), b - b.mean(0)
    if len(a) <= max(a.shape[1], b.shape[1]):
        ka, kb = a @ a.T, b @ b.T
        num, den = (ka * kb).sum(), ka.norm() * kb.norm()
    else:
        num, den = (b.T @ a).pow(2).sum(), (a.T @ a).norm() * (b.T @ b).norm()
    return float(num / den) if den > 0 else float("nan")


def weight_drift(start: Mapping[str, torch.Tensor], model: nn.Module) -> list[dict[str, Any]]:
    """Per layer group of ``model`` (:func:`~visiontl.models.backbones.layer_groups`): the L2 distance of its
    parameters from ``start`` (name -> tensor, the pretrained values) and that distance relative to
    the pretrained norm. Parameters without a pretrained value (a new head) are left out; a group
    with none has ``None``."""
    from visiontl.models.backbones import layer_groups

    out = []
    for group in layer_groups(model):
        sq = ref = 0.0
        n = 0
        for name, param in zip(group.param_names, group.params):
            before = start.get(name)
            if before is None or before.shape != param.shape:
                continue
            delta = param.detach().double().cpu() - before.double()
            sq += float(delta.pow(2).sum())
            ref += float(before.double().pow(2).sum())
            n += param.numel()
        l2 = math.sqrt(sq) if n else None
        out.append({"group": group.name, "params": n, "l2": l2,
                    "relative": (l2 / math.sqrt(ref) if ref > 0 else 0.0) if l2 is not None else None})
    return out


def retain_datamodule(path: str | Path, like: Any) -> Any:
    """The retained task's datamodule (a class-per-folder directory or a CSV) with the preprocessing
    of ``like`` (the run's datamodule): the same size, channels and normalisation, a validation
    split drawn with its seed when the data has none."""
    from visiontl.data.datamodules import labelled_datamodule
    from visiontl.data.images import DataError

    source = Path(path).expanduser()
    if not source.exists():
        raise DataError(f"retain: {source} does not exist; give a labelled folder (one sub-folder per class) or a "
                        f"CSV of the task whose knowledge you want to keep.")
    pre = like.preprocessing
    dm = labelled_datamodule(source, seed=like.seed, image_size=pre.size, num_workers=0,
                         augment=like.augment, mean=list(pre.mean), std=list(pre.std),
                         in_chans=pre.in_chans)
    dm.setup("fit")
    dm.resolve_preprocessing(pre)
    if "val" not in dm.splits:
        raise DataError(f"retain: {source} gave no validation split.")
    return dm


def imagenet_classifier(hparams: Mapping[str, Any]) -> nn.Module | None:
    """The pretrained weights' own classifier (ImageNet's, for timm's weights), or ``None`` when the
    weights carry none (random, a headless file, a different class count than the model's config)."""
    from visiontl.models.backbones import create_backbone

    name, weights, pretrained = hparams["backbone"], hparams.get("weights"), bool(hparams.get("pretrained"))
    if weights is None and not pretrained:
        return None
    import timm

    classes = int(timm.models.get_pretrained_cfg_value(name, "num_classes") or 0)
    if classes <= 0:
        return None
    try:
        model = create_backbone(name, classes, pretrained=pretrained, weights=weights,
                                in_chans=int(hparams.get("in_chans", 3)), converter=hparams.get("converter", "auto"))
    except Exception as err:  # noqa: BLE001 - a measurement must never fail the run it measures
        log.info("[visiontl] no pretrained classifier for %s: %s", name, err)
        return None
    report = getattr(model, "visiontl_weights", {}) or {}
    if report.get("reinitialized"):  # the file has no classifier of that shape: nothing to compare
        return None
    return model.get_classifier()


def _features(model: nn.Module, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    from visiontl.models.features import extract_features

    return extract_features(model, dataset, engine="torch", desc="Features for the drift report")


def retention_accuracy(model: nn.Module, retained: Any) -> float:
    """Linear-probe retention of ``model`` (a timm model with pooled features) on the retained task's
    datamodule (:func:`retain_datamodule`): :func:`~visiontl.strategies.linear_probe.linear_probe_accuracy` of its
    features of the training split (fit) and of the validation split (score)."""
    from visiontl.strategies.linear_probe import linear_probe_accuracy

    train, val = (_features(model, retained.feature_source(split)) for split in ("train", "val"))
    return linear_probe_accuracy(train, val, retained.num_classes)


@dataclass(frozen=True)
class ForgettingRecord:
    """Forgetting and drift of a fit: ``metrics.json``'s ``drift`` and, with a retained task,
    ``retain``, ``retain_acc_before``, ``retain_acc_after`` and ``forgetting`` (top level)."""

    key: ClassVar[str | None] = None
    drift: dict[str, Any]
    retain: str | None = None
    retain_acc_before: float | None = None
    retain_acc_after: float | None = None
    forgetting: float | None = None

    def to_dict(self) -> dict[str, Any]:
        from visiontl.analyse.after_fit import record_dict

        return record_dict(self)


class Forgetting:
    """Measures forgetting and drift after a fit (see the module docstring): a step of
    :mod:`visiontl.analyse.after_fit`, returning a :class:`ForgettingRecord`.

    Runs for strategies that change a pretrained backbone (``sgd`` and ``uses_pretrained``, not the
    frozen-backbone ones); needs the task's pretrained snapshot (``start_state``) and a visiontl
    datamodule. ``retain`` comes from the datamodule's ``retain``.
    """

    name = "forgetting"

    def run(self, ctx: FitContext) -> ForgettingRecord | None:
        trainer, pl_module, dm = ctx.trainer, ctx.task, ctx.datamodule
        start = pl_module.start_state if isinstance(pl_module, StartsFromPretrained) else None
        if start is None or not isinstance(dm, ServesFeatures) or not isinstance(dm, LabelledSplits):
            return None
        from visiontl.models.features import split_features, supports_features
        from visiontl.strategies.linear_probe import linear_probe_accuracy

        tuned = kept_model(trainer, pl_module, merge=True)[0]
        pretrained = copy.deepcopy(tuned)
        own = pretrained.state_dict()
        kept = {k: v for k, v in start.items() if k in own and own[k].shape == v.shape}
        missing = pretrained.load_state_dict(kept, strict=False).missing_keys
        added = [k for k in missing if not _is_head(k, pretrained)]
        if added:  # adapters and prompts: modules the pretrained model never had
            rank_zero_info(f"[visiontl] no drift report: the fine-tuned model has {len(added)} tensors ({added[0]}...) "
                           f"the pretrained one has no values for ({pl_module.strategy.name})")
            return None
        report: dict[str, Any] = {"drift": {"groups": weight_drift(start, tuned)}}
        backbone = pl_module.hparams["backbone"]
        if supports_features(tuned) and "val" in dm.splits:
            before = split_features(pretrained, backbone, dm, "val")[0]
            after = _features(tuned, dm.feature_source("val"))[0]
            report["drift"]["cka_val"] = round(linear_cka(before, after), 6)
            head = imagenet_classifier(pl_module.hparams)
            if head is not None:
                with torch.no_grad():
                    a = head(torch.from_numpy(np.array(before))).argmax(1)
                    b = head(torch.from_numpy(after)).argmax(1)
                report["drift"]["imagenet_agreement"] = round(float((a == b).double().mean()), 6)
        retain = dm.retain
        if retain and supports_features(tuned):
            rdm = retain_datamodule(retain, dm)
            known = [split_features(pretrained, backbone, rdm, s) for s in ("train", "val")]  # cached: never trained
            before_acc, after_acc = linear_probe_accuracy(*known, rdm.num_classes), retention_accuracy(tuned, rdm)
            report.update(retain=str(retain), retain_acc_before=round(before_acc, 6),
                          retain_acc_after=round(after_acc, 6), forgetting=round(before_acc - after_acc, 6))
            rank_zero_info(f"[visiontl] retained task {retain}: linear-probe accuracy {before_acc:.3f} before, "
                           f"{after_acc:.3f} after fine-tuning (forgetting {before_acc - after_acc:+.3f})")
        return ForgettingRecord(**report)


def _is_head(key: str, model: nn.Module) -> bool:
    from visiontl.models.weights import classifier_names

    return any(key.startswith(f"{name}.") for name in classifier_names(model))


