"""Abstention after the fit, and how well an out-of-distribution score separates familiar images from
unfamiliar ones.

:class:`Abstention` fits the run's detector (:mod:`visiontl.models.ood`: the scores, the threshold,
how the detector travels in the checkpoint and the export) on the kept model; :func:`auroc` and
:func:`fpr_at_tpr` measure a score (``benchmarks/ood.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from visiontl.models.ood import ACCEPT, BANK_LIMIT, DEFAULT_SCORE, MIN_IMAGES, OODDetector, cut, fit_detector, with_threshold

if TYPE_CHECKING:
    from visiontl.analyse.after_fit import FitContext

__all__ = ["Abstention", "AbstentionRecord", "auroc", "fpr_at_tpr", "keep_detector"]


def auroc(familiar: torch.Tensor, unfamiliar: torch.Tensor) -> float:
    """Area under the ROC curve of telling ``unfamiliar`` scores from ``familiar`` ones (higher:
    unfamiliar): the chance that an unfamiliar image scores above a familiar one, ties counted half
    (the Mann-Whitney form; any score scale, where torchmetrics would squash scores outside [0, 1]
    through a sigmoid). 0.5 is chance."""
    f, u = familiar.double().flatten(), unfamiliar.double().flatten()
    above = (u.unsqueeze(1) > f.unsqueeze(0)).double().mean()
    ties = (u.unsqueeze(1) == f.unsqueeze(0)).double().mean()
    return float(above + 0.5 * ties)


def fpr_at_tpr(familiar: torch.Tensor, unfamiliar: torch.Tensor, tpr: float = ACCEPT) -> float:
    """The share of ``unfamiliar`` images accepted when ``tpr`` of the ``familiar`` ones are (the
    threshold at their ``tpr`` quantile): FPR at 95 % TPR, in-distribution as the positive class."""
    return float((unfamiliar.double() <= cut(familiar, tpr)).double().mean())


@dataclass(frozen=True)
class AbstentionRecord:
    """``metrics.json``'s ``abstention``: the score, its threshold, the images behind them."""

    key: ClassVar[str | None] = "abstention"
    fields: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.fields)


class Abstention:
    """After the fit: the kept model's out-of-distribution detector (the task's ``ood_score``,
    :data:`DEFAULT_SCORE` by default), fitted on the training images, its threshold set on the
    validation images, kept in the checkpoint (its ``visiontl`` record, under ``ood``) and the task, and written to
    ``metrics.json`` (``abstention``). After calibration: it scores the calibrated logits."""

    name = "abstention"

    def run(self, ctx: FitContext) -> AbstentionRecord | None:
        from visiontl.tasks.classification import ClassificationTask

        task = ctx.task
        score = task.hparams.get("ood_score", DEFAULT_SCORE) if isinstance(task, ClassificationTask) else None
        if score is None:
            return None
        from visiontl.tasks.adaptation import AdaptationTask

        if isinstance(task, AdaptationTask):  # its target images would all read as unfamiliar
            return AbstentionRecord({"score": score, "applied": False, "note": "an adaptation run serves its target "
                                     "domain, which its source training images do not describe: no abstention"})
        val = ctx.outputs("val")
        if val is None:
            return None
        if len(val[0]) < MIN_IMAGES:
            return AbstentionRecord({"score": score, "applied": False, "note": f"{len(val[0])} validation image(s): too "
                                     f"few to set a threshold (at least {MIN_IMAGES}); no abstention"})
        train = ctx.outputs("train", limit=BANK_LIMIT) if score in ("mahalanobis", "knn") else None
        multilabel = bool(task.multilabel)
        detector = fit_detector(score, train[0] if train else torch.zeros(0, 1), None if train is None else train[2],
                                multilabel)
        temperature = ctx.kept_buffer("temperature")
        features, logits, _ = val
        scaled = logits / temperature if temperature is not None else logits
        with torch.no_grad():
            scores = detector(features, scaled)
        with_threshold(detector, scores)
        keep_detector(ctx, detector)
        accepted = float((scores <= detector.threshold).float().mean())
        return AbstentionRecord({"score": score, "threshold": round(detector.threshold, 6), "accept": detector.accept,
                                 "val_accepted": round(accepted, 4), "val_images": len(scores),
                                 "fitted_on": len(train[0]) if train else 0, "applied": True})


def keep_detector(ctx: FitContext, detector: OODDetector) -> None:
    """Make ``detector`` part of the kept model: its checkpoint's record (under ``ood``), and the task."""
    from visiontl.tasks.checkpoints import save_checkpoint

    _, ckpt, best = ctx.kept()
    if ckpt is not None:
        ckpt.setdefault("visiontl", {})["ood"] = detector.record()
        save_checkpoint(ckpt, best)
    ctx.task.set_ood(detector)
