"""A multi-label run judged on images its thresholds were not tuned on.

A run tunes one threshold per tag on its validation images (:func:`visiontl.tasks.multilabel.tune_thresholds`),
so its validation F1 at those thresholds is at least its F1 at 0.5 by construction. Whether tuning
pays is a question for held-out images: :func:`held_out_tags` scores the kept model on another split
of a CSV listing (``test``), per tag at the tuned thresholds and at 0.5, with each tag's average
precision and the split's macro mAP.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["held_out_tags"]


@torch.no_grad()
def held_out_tags(task: Any, listing: str | os.PathLike[str], split: str = "test") -> dict[str, Any]:
    """Score a multi-label ``task`` on ``split`` of ``listing`` (``split,path,label`` rows, read with
    the task's preprocessing).

    Returns:
        ``{"images": n, "map": macro mAP, "tags": {tag: {"support", "ap", "f1_tuned", "f1_at_half",
        "threshold"}}}``; NaN where a tag has no labelled positive in the split.

    Raises:
        ValueError: ``task`` is not multi-label, or ``listing`` has no such split.
    """
    from torchmetrics.functional.classification import multilabel_average_precision

    from visiontl.tasks.multilabel import per_tag_rates
    from visiontl.tasks.protocols import PredictsTags
    from visiontl.tasks.trained import listing_datamodule
    from visiontl.tasks.validators import predict_loader

    if not (isinstance(task, PredictsTags) and task.multilabel):
        raise ValueError("held_out_tags scores multi-label runs (several tags per image); this one is single-label.")
    dm = listing_datamodule(listing, task)
    if split not in dm.splits:
        raise ValueError(f"{listing} has no {split!r} images (its splits: {', '.join(dm.splits)}).")
    loader = torch.utils.data.DataLoader(dm.feature_source(split), batch_size=64, num_workers=0)
    device = next(task.model.parameters()).device
    _, logits, labels = predict_loader(task.model, loader, bool(task.channels_last), device)
    probs, targets = task.calibrated(logits).sigmoid(), labels.float()  # as the task predicts: calibrated
    thresholds = task.thresholds.detach().cpu().float()
    tuned = per_tag_rates(probs, targets, thresholds)
    half = per_tag_rates(probs, targets, torch.full_like(thresholds, 0.5))["f1"]
    k = targets.shape[1]
    ap = multilabel_average_precision(probs, targets.long(), k, average="none", ignore_index=-1)
    tags = {name: {"support": int(tuned["support"][j]), "ap": float(ap[j]) if tuned["support"][j] > 0 else float("nan"),
                   "f1_tuned": float(tuned["f1"][j]), "f1_at_half": float(half[j]), "threshold": float(thresholds[j])}
            for j, name in enumerate(task.class_names)}
    score = float(multilabel_average_precision(probs, targets.long(), k, average="macro", ignore_index=-1))
    return {"images": len(probs), "map": score, "tags": tags}
