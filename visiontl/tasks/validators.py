"""Scoring a model on the target without target labels: the validators of an adaptation run.

:func:`target_scores` runs a model (eval mode) over the target images, and optionally the
labelled source validation images, and returns every label-free signal that
:class:`~visiontl.tasks.AdaptationTask` can select checkpoints by (``target_im``, ``target_snd``,
``target_dev``; higher is better for each), with the source validation accuracy and, where the
target images carry labels, the target accuracy (for evaluation only). Target BatchNorm
(:mod:`visiontl.analyse.targetbn`), the negative-transfer check (:mod:`visiontl.analyse.negative_transfer`)
and ``benchmarks/adaptation.py`` score models with it, so all three compare the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from visiontl.models.features import classify_features, pooled_features
from visiontl.core.speed import channels_last_input
from visiontl.tasks.da import importance_weights, information_maximisation, soft_neighbourhood_density, weighted_dev_risk

__all__ = ["balanced_accuracy", "predict_loader", "scores_from_outputs", "tag_losses", "target_scores"]


@torch.no_grad()
def predict_loader(model: torch.nn.Module, loader: Any, channels_last: bool, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled features, logits and labels (``-1``: unlabelled) of every batch of ``loader``, on the CPU."""
    model.eval()
    feats, logits, labels = [], [], []
    for batch in loader:
        x = channels_last_input(batch["image"].to(device), channels_last)
        f = pooled_features(model, x)
        feats.append(f.float().cpu())
        logits.append(classify_features(model, f).float().cpu())
        labels.append(batch["label"].cpu())
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)


def balanced_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean of the per-class recalls over the classes present in ``labels``."""
    hit = (predicted == labels).float()
    return float(torch.stack([hit[labels == c].mean() for c in torch.unique(labels)]).mean())


def scores_from_outputs(target: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                        source: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                        raw_dev: bool = False, multilabel: bool = False) -> dict[str, float]:
    """:func:`target_scores` from :func:`predict_loader`'s outputs (features, logits, labels);
    ``raw_dev``: also ``target_dev_raw``, DEV with the importance weights as estimated (no max
    normalisation; the same weights); ``multilabel``: see :func:`target_scores`."""
    if multilabel:
        return _tag_scores(target, source)
    feats, logits, labels = target
    probs = logits.softmax(dim=1)
    out = {"target_im": round(information_maximisation(probs), 6)}
    if len(probs) >= 2:
        out["target_snd"] = round(soft_neighbourhood_density(probs), 6)
    if source is not None and len(source[0]) >= 2 and len(feats) >= 2:
        s_feats, s_logits, s_labels = source
        losses = F.cross_entropy(s_logits, s_labels, reduction="none")
        weights = importance_weights(s_feats, feats)
        out["target_dev"] = round(-weighted_dev_risk(weights, losses), 6)
        if raw_dev:
            out["target_dev_raw"] = round(-weighted_dev_risk(weights, losses, normalization=None), 6)
        out["source_val_acc"] = round(float((s_logits.argmax(1) == s_labels).float().mean()), 6)
    known = labels >= 0
    if known.any():
        predicted = probs.argmax(1)[known]
        out["target_acc"] = round(float((predicted == labels[known]).float().mean()), 6)
        out["target_balanced_acc"] = round(balanced_accuracy(predicted, labels[known]), 6)
    return out


def tag_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per image, the mean binary cross-entropy over its labelled tags (targets 1 / 0; -1 left out):
    the per-sample risk DEV weighs for multi-label models (0 for an image with no labelled tag)."""
    known = targets >= 0
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.clamp(min=0).float(), reduction="none")
    return (bce * known).sum(1) / known.sum(1).clamp(min=1)


def _tag_scores(target: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                source: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> dict[str, float]:
    """The multi-label scores: ``target_dev`` (DEV on per-image tag losses) and ``source_val_map``;
    ``target_map`` where target tags are known. Information maximisation and neighbourhood density
    are defined on one softmax per image and have no multi-label form here."""
    from torchmetrics.functional.classification import multilabel_average_precision

    def macro_ap(logits: torch.Tensor, labels: torch.Tensor) -> float:
        return float(multilabel_average_precision(logits.sigmoid(), labels.long(), logits.shape[1], average="macro",
                                                  ignore_index=-1))

    feats, logits, labels = target
    out: dict[str, float] = {}
    if source is not None and len(source[0]) >= 2 and len(feats) >= 2:
        s_feats, s_logits, s_labels = source
        out["target_dev"] = round(-weighted_dev_risk(importance_weights(s_feats, feats), tag_losses(s_logits, s_labels)), 6)
        out["source_val_map"] = round(macro_ap(s_logits, s_labels), 6)
    if bool((labels > 0).any()):
        out["target_map"] = round(macro_ap(logits, labels), 6)
    return out


def target_scores(model: torch.nn.Module, loader: Any, channels_last: bool, device: torch.device,
                  source_loader: Any = None, multilabel: bool = False) -> dict[str, float]:
    """Label-free signals of ``model`` on the target images of ``loader``: ``target_im``,
    ``target_snd`` and, with ``source_loader`` (the labelled source validation images),
    ``target_dev`` (negated DEV risk) and ``source_val_acc``; where the target images carry labels,
    ``target_acc`` and ``target_balanced_acc``. A ``multilabel`` model (several tags per image,
    one sigmoid each) gets ``target_dev`` on per-image tag losses (:func:`tag_losses`),
    ``source_val_map`` and, with target tags, ``target_map`` (macro mean average precision)."""
    target = predict_loader(model, loader, channels_last, device)
    source = predict_loader(model, source_loader, channels_last, device) if source_loader is not None else None
    return scores_from_outputs(target, source, multilabel=multilabel)
