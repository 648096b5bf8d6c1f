"""What a model gets wrong, in every run directory: fastai's interpretation, without writing code.

After every fit with validation images, :class:`ErrorAnalysis` scores the kept model on them and
writes:

- ``top_losses.png`` / ``top_losses.csv``: the validation images with the highest loss among those
  it gets wrong (single-label: misclassified; multi-label: at least one tag decided wrongly at the
  tuned thresholds), each with its file name, true label, prediction and probability;
- ``per_class.csv``: per class, precision, recall, F1 and support (multi-label runs have the per-tag
  table already, ``tag_metrics.csv``);
- ``confused_pairs.csv``: the (true, predicted) class pairs the model mixes up most, with the
  share of the true class's images each takes (single-label).

``metrics.json`` records the counts, the most-confused pairs and the file names (``errors``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from visiontl.analyse.after_fit import FitContext

__all__ = ["ErrorAnalysis", "ErrorRecord", "confused_pairs", "gallery_figure", "per_class_table", "top_losses"]

GALLERY = 16  # images in the top-losses gallery


def per_class_table(probs: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> list[dict[str, Any]]:
    """Per class: ``precision``, ``recall``, ``f1`` (torchmetrics, top-1 decisions) and ``support``;
    NaN where a rate has no denominator (a class never predicted has no precision)."""
    from torchmetrics.functional.classification import multiclass_f1_score, multiclass_precision, multiclass_recall

    k, labels = len(class_names), labels.long()
    pred = probs.argmax(1)
    rates = {name: fn(probs, labels, k, average="none").tolist()
             for name, fn in (("precision", multiclass_precision), ("recall", multiclass_recall),
                              ("f1", multiclass_f1_score))}
    support = torch.bincount(labels, minlength=k).tolist()
    predicted = torch.bincount(pred, minlength=k).tolist()
    return [{"class": c, "precision": rates["precision"][j] if predicted[j] else math.nan,
             "recall": rates["recall"][j] if support[j] else math.nan,
             "f1": rates["f1"][j] if support[j] or predicted[j] else math.nan, "support": support[j]}
            for j, c in enumerate(class_names)]


def confused_pairs(probs: torch.Tensor, labels: torch.Tensor, class_names: list[str], top: int = 10
                   ) -> list[dict[str, Any]]:
    """The (true, predicted) pairs of different classes, most frequent first: ``count`` and
    ``share`` (of the true class's images)."""
    labels, pred = labels.long(), probs.argmax(1)
    k = len(class_names)
    cm = torch.bincount(labels * k + pred, minlength=k * k).reshape(k, k)
    support = cm.sum(1)
    pairs = [(int(cm[i, j]), i, j) for i in range(k) for j in range(k) if i != j and cm[i, j] > 0]
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [{"true": class_names[i], "predicted": class_names[j], "count": n, "share": n / int(support[i])}
            for n, i, j in pairs[:top]]


def top_losses(logits: torch.Tensor, labels: torch.Tensor, paths: list[str], class_names: list[str],
               thresholds: torch.Tensor | None = None, k: int = GALLERY) -> list[dict[str, Any]]:
    """The ``k`` wrongly predicted images with the highest loss, highest first.

    Single-label: misclassified images by cross-entropy; each row has ``path``, ``true``,
    ``predicted``, ``p_predicted``, ``p_true`` and ``loss``. Multi-label (``thresholds`` given):
    images with a tag decided wrongly at the thresholds, by their mean binary cross-entropy over
    labelled tags; ``true`` and ``predicted`` are the tag sets joined by ``|`` and ``wrong`` the tags
    decided wrongly, each with its probability.
    """
    logits = logits.float()
    if thresholds is None:
        labels = labels.long()
        probs = logits.softmax(1)
        loss = F.cross_entropy(logits, labels, reduction="none")
        pred = probs.argmax(1)
        wrong = torch.nonzero(pred != labels).flatten()
        order = wrong[torch.argsort(loss[wrong], descending=True)][:k]
        return [{"path": paths[i], "true": class_names[int(labels[i])], "predicted": class_names[int(pred[i])],
                 "p_predicted": float(probs[i, pred[i]]), "p_true": float(probs[i, labels[i]]), "loss": float(loss[i])}
                for i in order.tolist()]
    known = labels >= 0
    probs = logits.sigmoid()
    decided = probs >= thresholds[None, :]
    truth = labels > 0.5
    bce = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0).float(), reduction="none")
    loss = (bce * known).sum(1) / known.sum(1).clamp(min=1)
    mistakes = (decided != truth) & known
    wrong = torch.nonzero(mistakes.any(1)).flatten()
    order = wrong[torch.argsort(loss[wrong], descending=True)][:k]

    def tags(row: torch.Tensor) -> str:
        return "|".join(c for c, on in zip(class_names, row.tolist()) if on) or "(no tag)"

    return [{"path": paths[i], "true": tags(truth[i] & known[i]), "predicted": tags(decided[i]),
             "wrong": "|".join(f"{c} {float(probs[i, j]):.2f}" for j, c in enumerate(class_names) if mistakes[i, j]),
             "loss": float(loss[i])} for i in order.tolist()]


def _thumbnail(path: str, side: int = 160) -> np.ndarray:
    """An image to show: RGB (or one band) in [0, 1], its first three bands if it has more,
    stretched per band when it is dim (a 16-bit scan stored in the low values)."""
    from visiontl.data.images import read_image

    image = read_image(path)
    image = image[:, :, :3] if image.shape[2] >= 3 else image[:, :, :1]
    high = float(np.percentile(image, 99.5)) if image.size else 1.0
    if 0 < high < 0.2:
        image = np.clip(image / high, 0, 1)
    step = max(1, max(image.shape[:2]) // side)
    return image[::step, ::step]


def _short_name(path: str) -> str:
    """A file as a caption: its folder and name (the folder is often the class, or the patient)."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else path


def gallery_figure(rows: list[dict[str, Any]], title: str, columns: int = 4) -> Figure:
    """The images of ``rows`` (from :func:`top_losses`) in a grid, each captioned with its file name,
    true label, prediction and probability (multi-label: the wrongly decided tags); a placeholder
    panel says so when an image cannot be read."""
    from matplotlib.figure import Figure

    n = max(1, len(rows))
    cols = min(columns, n)
    nrows = math.ceil(n / cols)
    fig = Figure(figsize=(3.0 * cols, 3.3 * nrows + 0.6), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, row in zip(axes, rows):
        try:
            image = _thumbnail(row["path"])
            ax.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
        except Exception as err:  # noqa: BLE001 - a file gone since training: said in its panel
            ax.text(0.5, 0.5, f"cannot read:\n{type(err).__name__}", ha="center", va="center", fontsize=8)
        if "wrong" in row:
            caption = f"{_short_name(row['path'])}\ntrue: {row['true']}\npredicted: {row['predicted']}\nwrong: {row['wrong']}"
        else:
            caption = (f"{_short_name(row['path'])}\ntrue: {row['true']} (p {row['p_true']:.2f})\n"
                       f"predicted: {row['predicted']} (p {row['p_predicted']:.2f})")
        ax.set_title(caption, fontsize=7, loc="left")
    if not rows:
        axes[0].text(0.5, 0.5, "no validation image is predicted wrongly", ha="center", va="center")
    return fig


@dataclass(frozen=True)
class ErrorRecord:
    """``metrics.json``'s ``errors``: how many validation images the kept model gets wrong, the pairs
    it confuses most (single-label) and the files written."""

    key: ClassVar[str | None] = "errors"
    images: int
    wrong: int
    files: list[str]
    most_confused: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        from visiontl.analyse.after_fit import record_dict

        return record_dict(self)


class ErrorAnalysis:
    """After the fit: the top-losses gallery, the per-class table and the most-confused pairs of the
    kept model on the validation images (see the module docstring); a step of
    :mod:`visiontl.analyse.after_fit`."""

    name = "errors"

    def run(self, ctx: FitContext) -> ErrorRecord | None:
        from visiontl.analyse.plots import save_figure, write_rows
        from visiontl.data.protocols import LabelledSplits
        from visiontl.tasks.classification import ClassificationTask

        task, dm = ctx.task, ctx.datamodule
        outputs = ctx.validation_outputs() if isinstance(task, ClassificationTask) else None
        if outputs is None or not len(outputs[0]):
            return None
        logits, labels = outputs
        temperature = ctx.kept_buffer("temperature")  # the probabilities the kept model reports: calibrated
        logits = logits / temperature if temperature is not None else logits
        paths = [str(p) for p in dm.paths("val")] if isinstance(dm, LabelledSplits) else []
        if len(paths) != len(logits):  # frames of multi-frame files, or a sampler that reorders: no names
            paths = [f"validation image {i}" for i in range(len(logits))]
        out, names = ctx.run_dir, list(task.class_names)
        multilabel = bool(task.multilabel)
        thresholds = ctx.kept_buffer("thresholds") if multilabel else None
        worst = top_losses(logits, labels, paths, names, thresholds, k=len(logits))
        files = [write_rows(worst[:100], out / "top_losses.csv").name]
        what = "tags decided wrongly" if multilabel else "misclassified"
        fig = gallery_figure(worst[:GALLERY], f"Validation images {what}, highest loss first "
                                              f"({min(GALLERY, len(worst))} of {len(worst)})")
        files.append(save_figure(fig, out / "top_losses.png").name)
        pairs = None
        if not multilabel:
            probs = logits.float().softmax(1)
            files.append(write_rows(per_class_table(probs, labels, names), out / "per_class.csv").name)
            pairs = confused_pairs(probs, labels, names)
            files.append(write_rows(pairs, out / "confused_pairs.csv", ["true", "predicted", "count", "share"]).name)
        return ErrorRecord(images=len(logits), wrong=len(worst), files=files,
                           most_confused=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in p.items()}
                                          for p in pairs[:3]] if pairs is not None else None)
