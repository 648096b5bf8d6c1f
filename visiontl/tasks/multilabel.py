"""Multi-label classification: several tags per image, each a yes / no decision.

What :class:`~visiontl.tasks.ClassificationTask` does differently with ``task="multilabel"``
(the data decides it: :mod:`visiontl.data.multilabel`):

- **loss**: binary cross-entropy on the logits, one term per (image, tag), averaged over the pairs
  that have a label (a target of -1, an uncertain or missing tag, is left out:
  :func:`multilabel_loss`); ``class_weights="balanced"`` weighs each tag's positives by
  negatives / positives in training (``pos_weight``); ``label_smoothing`` pulls targets towards 0.5;
- **metrics** (torchmetrics' multilabel ones, the same -1 left out): ``map`` (macro mean average
  precision, the headline and the metric that picks the best checkpoint), ``map_micro``,
  ``auroc`` (macro), and at the tuned thresholds ``f1`` (macro) and per tag ``ap/<tag>``,
  ``f1/<tag>``, ``threshold/<tag>``, ``sensitivity/<tag>``, ``specificity/<tag>``;
- **thresholds**: one per tag, chosen on the validation images at every validation to maximise that
  tag's F1 (:func:`tune_thresholds`), unless the user fixed them; kept in the model's state (the
  ``thresholds`` buffer), so every checkpoint, export and prediction applies the ones that belong
  to its weights. A test split is scored at the validation thresholds, never tuned on itself. When
  the run's calibration applies a temperature per tag, the thresholds are restated on the
  calibrated probabilities (:func:`rescale_thresholds`): the same cut on each logit, the same
  decisions.
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelAUROC, MultilabelAveragePrecision

from visiontl.core.losses import IGNORE, multilabel_loss

__all__ = ["IGNORE", "TASKS", "decisions", "multilabel_loss", "multilabel_scores", "per_tag_rates", "rescale_thresholds",
           "tag_report", "tune_thresholds"]

TASKS = ("multiclass", "multilabel")


def multilabel_scores(num_tags: int, full: bool) -> MetricCollection:
    """Threshold-free scores: ``map`` (macro AP), and with ``full`` ``map_micro`` and ``auroc``."""
    scores = {"map": MultilabelAveragePrecision(num_tags, average="macro", ignore_index=IGNORE)}
    if full:
        scores["map_micro"] = MultilabelAveragePrecision(num_tags, average="micro", ignore_index=IGNORE)
        scores["auroc"] = MultilabelAUROC(num_tags, average="macro", ignore_index=IGNORE)
    return MetricCollection(scores)


def _f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    return 2 * tp / (2 * tp + fp + fn).clamp(min=1e-12)


def tune_thresholds(probs: torch.Tensor, targets: torch.Tensor, default: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tag, the probability threshold with the highest F1 on these images, and that F1.

    Candidates are midpoints between consecutive distinct probabilities of the tag (and ``default``),
    so a threshold never sits exactly on an image's score; among equal F1s the one nearest
    ``default`` wins. A tag without a positive (or without a labelled image) keeps ``default``
    and reports NaN. A tag whose best F1 is no better than flagging every image (``2 P / (N + P)``
    for ``P`` positives among ``N`` labelled images: what a threshold below every score gives) has
    not been learned: a threshold that flags (almost) every image is of no use to a reader, so it
    keeps ``default`` and reports the F1 there (Lipton et al. 2014, "Thresholding classifiers to
    maximize F1 score": an uninformative score's F1-optimal rule is to flag everything).
    """
    k = probs.shape[1]
    thresholds = torch.full((k,), default, dtype=torch.float32)
    best = torch.full((k,), float("nan"), dtype=torch.float32)
    for j in range(k):
        known = targets[:, j] >= 0
        p, y = probs[known, j].float(), targets[known, j] > 0.5
        if not bool(y.any()):
            continue
        values = torch.unique(p)
        mids = (values[:-1] + values[1:]) / 2 if len(values) > 1 else values.new_empty(0)
        candidates = torch.cat([mids, values[:1] - 1e-6, torch.tensor([default])]).clamp(0.0, 1.0)
        decide = p[None, :] >= candidates[:, None]
        tp = (decide & y).sum(1).float()
        fp = (decide & ~y).sum(1).float()
        fn = (~decide & y).sum(1).float()
        f1 = _f1(tp, fp, fn)
        top = f1.max()
        positives = float(y.sum())
        if float(top) <= 2 * positives / (len(y) + positives) + 1e-6:  # no better than flagging every image
            best[j] = f1[-1]  # the last candidate is ``default``
            continue
        near = torch.where(f1 >= top - 1e-9)[0]
        pick = near[torch.argmin((candidates[near] - default).abs())]
        thresholds[j], best[j] = candidates[pick], top
    return thresholds, best


def rescale_thresholds(thresholds: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Per-tag thresholds on probabilities at temperature ``old`` restated at temperature ``new``: the
    same cut on the logit, so every decision stays the same (``sigmoid(logit(t) * old / new)``)."""
    cut = torch.logit(thresholds.float().clamp(1e-6, 1 - 1e-6)) * old.float()
    return torch.sigmoid(cut / new.float()).to(thresholds.dtype)


def decisions(probs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Which tags each image gets: ``probs >= thresholds`` (per tag)."""
    return probs >= thresholds.to(probs.device)[None, :]


def per_tag_rates(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor) -> dict[str, torch.Tensor]:
    """At ``thresholds``: per tag ``f1``, ``sensitivity``, ``specificity`` and ``support`` (labelled
    positives), over the labelled pairs; NaN where a rate has no denominator."""
    known = targets >= 0
    y = targets > 0.5
    d = decisions(probs, thresholds)
    tp = (d & y & known).sum(0).float()
    fp = (d & ~y & known).sum(0).float()
    fn = (~d & y & known).sum(0).float()
    tn = (~d & ~y & known).sum(0).float()
    nan = torch.tensor(float("nan"))
    return {
        "f1": torch.where(tp + fn > 0, _f1(tp, fp, fn), nan),
        "sensitivity": torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), nan),
        "specificity": torch.where(tn + fp > 0, tn / (tn + fp).clamp(min=1), nan),
        "support": tp + fn,
    }


def tag_report(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor, names: list[str],
               points: int = 60) -> dict[str, object]:
    """Per tag, what a reader of a multi-label run looks at: ``rows`` (tag, support, AP, F1,
    sensitivity and specificity at its threshold, the threshold) and ``curves`` (the precision-recall
    curve, at most ``points`` points each; none for a tag without a labelled positive). Plain lists:
    it goes into checkpoints and ``metrics.json``."""
    from torchmetrics.functional.classification import binary_average_precision, binary_precision_recall_curve

    rates = per_tag_rates(probs, targets, thresholds)
    rows, curves = [], {}
    for j, name in enumerate(names):
        known = targets[:, j] >= 0
        p, y = probs[known, j], (targets[known, j] > 0.5).long()
        has_both = bool(y.any()) and bool((y == 0).any())
        ap = float(binary_average_precision(p, y)) if has_both else float("nan")
        rows.append({"tag": name, "support": int(y.sum()), "images": int(known.sum()), "ap": round(ap, 4),
                     "f1": round(float(rates["f1"][j]), 4), "sensitivity": round(float(rates["sensitivity"][j]), 4),
                     "specificity": round(float(rates["specificity"][j]), 4),
                     "threshold": round(float(thresholds[j]), 4)})
        if has_both:
            precision, recall, _ = binary_precision_recall_curve(p, y)
            keep = torch.linspace(0, len(recall) - 1, min(points, len(recall))).round().long().unique()
            curves[name] = {"recall": [round(float(v), 4) for v in recall[keep]],
                            "precision": [round(float(v), 4) for v in precision[keep]]}
    return {"rows": rows, "curves": curves}
