"""Calibrated probabilities: temperature scaling fitted without leaking the images it is judged on.

A network trained with cross-entropy is usually over-confident after fine-tuning on a few hundred
images: its 0.95 is right less often than 95 % of the time. Temperature scaling (Guo et al. 2017,
"On calibration of modern neural networks") divides the logits by one learned number ``T`` (for
multi-label models, one per tag: each tag is its own yes / no decision). It keeps every argmax, so
accuracy and the ranking metrics (AUROC, AP) do not move, and it is the calibration method that
held up best in that study.

Which images fit ``T``: a run's validation images already chose its checkpoint (and, for
multi-label models, its thresholds). Holding out a further calibration split costs labelled images
that a team with a few hundred cannot spare, so :func:`calibrate` **cross-fits** on the validation
images: they are split in ``folds`` parts (stratified by class, or by each image's rarest tag),
``T`` is fitted on all parts but one and applied to that one, and the reported calibration error
after scaling is measured on these out-of-fold probabilities, never on images that fitted the
temperature that scored them. The temperature the model keeps is then fitted on all the validation
images (the usual last step of cross-fitting: more images, the same procedure that was judged).

The model keeps the temperature only when it lowered the negative log-likelihood out of fold (on
a handful of confident images a fitted temperature can make things worse, and the cross-fit shows
it); otherwise its probabilities stay as trained and ``metrics.json`` says why.

Calibration error is torchmetrics' expected calibration error (15 equal-width confidence bins, L1):
of the top-class confidence for single-label models, of every labelled (image, tag) probability for
multi-label ones; with the negative log-likelihood before and after.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from visiontl.analyse.after_fit import FitContext

__all__ = ["Calibration", "CalibrationRecord", "CalibrationResult", "calibrate", "keep_temperature", "calibration_error",
           "calibration_floor", "fit_temperature", "negative_log_likelihood",
           "reliability_figure", "scaled_probabilities"]

BINS = 15
T_RANGE = (0.05, 20.0)  # a temperature outside this is a sign of a broken fit, not of calibration
GRID = 801
MIN_IMAGES = 20  # fewer validation images fit a temperature to noise (a handful all right: T -> 0)


def scaled_probabilities(logits: torch.Tensor, temperature: torch.Tensor | float, multilabel: bool = False) -> torch.Tensor:
    """Softmax (or per-tag sigmoid) of ``logits / temperature``."""
    t = torch.as_tensor(temperature, dtype=torch.float32)
    z = logits.float() / t
    return z.sigmoid() if multilabel else z.softmax(dim=1)


def negative_log_likelihood(logits: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor | float = 1.0,
                            multilabel: bool = False) -> float:
    """Mean NLL of the targets at ``temperature``: cross-entropy, or for multi-label models the
    binary cross-entropy over labelled (image, tag) pairs (targets 1 / 0; -1 left out)."""
    return float(_nll(logits.float(), targets, torch.as_tensor(temperature, dtype=torch.float32), multilabel))


def _nll(logits: torch.Tensor, targets: torch.Tensor, t: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if not multilabel:
        return F.cross_entropy(logits / t, targets.long())
    known = targets >= 0
    bce = F.binary_cross_entropy_with_logits(logits / t, targets.clamp(min=0).float(), reduction="none")
    return (bce * known).sum() / known.sum().clamp(min=1)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """The temperature minimising the NLL of ``targets``: shape ``(1,)``, or ``(k,)`` for a multi-label
    model (each tag's binary cross-entropy is its own 1-D problem; a tag with no labelled positive
    or no labelled negative keeps 1). A search over 801 log-spaced temperatures in [0.05, 20]
    (steps of 0.75 %): the NLL of a temperature is one-dimensional and smooth, and a bounded grid
    cannot diverge where a gradient method on a few confident images runs off to 0 or infinity."""
    logits = logits.detach().float()
    grid = torch.logspace(math.log10(T_RANGE[0]), math.log10(T_RANGE[1]), GRID)
    if not multilabel:
        labels = targets.long()
        nll = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
        return grid[nll.argmin()].reshape(1)
    known = targets >= 0
    y = targets.clamp(min=0).float()
    nll = torch.stack([(F.binary_cross_entropy_with_logits(logits / t, y, reduction="none") * known).sum(0)
                       for t in grid])  # (grid, k): each tag's total loss at each temperature
    t = grid[nll.argmin(0)]
    both = ((targets > 0.5) & known).any(0) & ((targets < 0.5) & known).any(0)
    return torch.where(both, t, torch.ones_like(t))


def calibration_error(probs: torch.Tensor, targets: torch.Tensor, multilabel: bool = False, bins: int = BINS) -> float:
    """Expected calibration error (torchmetrics, equal-width bins, L1): of the top-class confidence,
    or of every labelled (image, tag) probability for a multi-label model."""
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    if multilabel:
        known = targets >= 0
        return float(binary_calibration_error(probs[known].float(), targets[known].long(), n_bins=bins))
    return float(multiclass_calibration_error(probs.float(), targets.long(), num_classes=probs.shape[1], n_bins=bins))


def calibration_floor(probs: torch.Tensor, multilabel: bool = False, draws: int = 200, seed: int = 0,
                      bins: int = BINS) -> float:
    """The expected calibration error a perfectly calibrated model would still show with these
    probabilities on this many images: the mean :func:`calibration_error` over ``draws`` outcome
    sets drawn as the probabilities say (each prediction right with its confidence; each tag on
    with its probability). Binned ECE is biased upwards on a few hundred images, so a measured ECE
    near this floor cannot be told from perfect calibration."""
    g = torch.Generator().manual_seed(seed)
    probs = probs.detach().float().cpu()
    errors = []
    for _ in range(draws):
        if multilabel:
            targets = (torch.rand(probs.shape, generator=g) < probs).long()
        else:
            top, pred = probs.max(1)
            hit = torch.rand(top.shape, generator=g) < top
            targets = torch.where(hit, pred, (pred + 1) % probs.shape[1])  # a miss: any other class
        errors.append(calibration_error(probs, targets, multilabel, bins))
    return float(np.mean(errors))


@dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate` found: the temperature the model keeps, and the calibration error and
    NLL before and after scaling on the validation images (after: out-of-fold)."""

    temperature: list[float]
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    images: int
    folds: int
    method: str = "temperature scaling, cross-fitted on the validation images"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _strata(targets: torch.Tensor, multilabel: bool) -> np.ndarray:
    """What folds are stratified on: the class, or each image's rarest labelled positive tag (-1: none)."""
    if not multilabel:
        return targets.long().numpy()
    positive = (targets > 0.5).numpy()
    counts = positive.sum(0)
    rarest = np.where(positive, counts[None, :], np.inf).argmin(1)
    return np.where(positive.any(1), rarest, -1)


def _folds(strata: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold index per image: each stratum dealt round-robin over the folds, in a seeded order."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(strata), dtype=np.int64)
    start = 0
    for value in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == value))
        fold[members] = (start + np.arange(len(members))) % folds
        start += len(members)  # the next stratum starts where this one ended: folds stay level
    return fold


def calibrate(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool = False, folds: int = 2,
              seed: int = 0) -> tuple[CalibrationResult, torch.Tensor]:
    """Fit a temperature on validation ``logits`` and judge it out of fold (see the module docstring).

    Returns:
        ``(result, out_of_fold_probs)``: the probabilities each image gets from the temperature fitted
        on the other folds (for a reliability diagram that shows what was measured).

    Raises:
        ValueError: fewer than ``2 * folds`` images, or ``folds`` < 2.
    """
    logits, targets = logits.detach().float().cpu(), targets.detach().cpu()
    if folds < 2 or len(logits) < 2 * folds:
        raise ValueError(f"calibrate needs folds >= 2 and at least {2 * max(folds, 2)} images, got folds={folds} and "
                         f"{len(logits)} image(s).")
    fold = torch.as_tensor(_folds(_strata(targets, multilabel), folds, seed))
    out_of_fold = torch.empty_like(logits)
    scaled = torch.empty_like(logits)  # logits / T of the other folds' fit: the out-of-fold NLL
    for k in range(folds):
        held = fold == k
        t = fit_temperature(logits[~held], targets[~held], multilabel)
        out_of_fold[held] = scaled_probabilities(logits[held], t, multilabel)
        scaled[held] = logits[held] / t
    before = scaled_probabilities(logits, 1.0, multilabel)
    result = CalibrationResult(
        temperature=[round(float(t), 6) for t in fit_temperature(logits, targets, multilabel)],
        ece_before=round(calibration_error(before, targets, multilabel), 6),
        ece_after=round(calibration_error(out_of_fold, targets, multilabel), 6),
        nll_before=round(negative_log_likelihood(logits, targets, 1.0, multilabel), 6),
        nll_after=round(negative_log_likelihood(scaled, targets, 1.0, multilabel), 6),
        images=len(logits), folds=folds)
    return result, out_of_fold


def _reliability(probs: torch.Tensor, targets: torch.Tensor, multilabel: bool, bins: int) -> tuple[np.ndarray, ...]:
    """Per equal-width bin: mean confidence, observed frequency (accuracy), share of the predictions."""
    if multilabel:
        known = targets >= 0
        conf, hit = probs[known].numpy(), (targets[known] > 0.5).numpy().astype(float)
    else:
        top, pred = probs.max(1)
        conf, hit = top.numpy(), (pred == targets.long()).numpy().astype(float)
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    mean_conf = np.array([conf[index == b].mean() if (index == b).any() else np.nan for b in range(bins)])
    freq = np.array([hit[index == b].mean() if (index == b).any() else np.nan for b in range(bins)])
    share = np.bincount(index, minlength=bins) / max(1, len(conf))
    return edges, mean_conf, freq, share


def reliability_figure(before: torch.Tensor, after: torch.Tensor, targets: torch.Tensor, result: CalibrationResult,
                       multilabel: bool = False, title: str = "", bins: int = BINS) -> Any:
    """The reliability diagram: per confidence bin, how often the prediction was right, before and
    after temperature scaling (after: out of fold), against the diagonal of perfect calibration;
    below, how many predictions fall in each bin."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 6.0), layout="constrained")
    what = "tag probability" if multilabel else "confidence (top-class probability)"
    t = result.temperature
    temps = f"T = {t[0]:.2f}" if len(t) == 1 else f"T = {min(t):.2f} to {max(t):.2f} over {len(t)} tags"
    fig.suptitle(title or f"Reliability on the validation images\n({temps}; after scaling: out of fold)")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    for probs, name, ece, color, marker in ((before, "before", result.ece_before, "tab:red", "o"),
                                            (after, "after", result.ece_after, "tab:blue", "s")):
        edges, conf, freq, share = _reliability(probs, targets, multilabel, bins)
        ok = ~np.isnan(conf)
        top.plot(conf[ok], freq[ok], marker=marker, color=color, label=f"{name} scaling (ECE {ece:.3f})")
        bottom.bar(edges[:-1] + (0.5 if name == "after" else 0.0) / bins, share, width=0.5 / bins, align="edge",
                   color=color, alpha=0.7)
    top.set(xlabel=what, ylabel="accuracy in the bin (share right)" if not multilabel else "share of the bin with the tag",
            xlim=(0, 1), ylim=(0, 1))
    top.grid(alpha=0.3)
    bottom.set(xlabel=what, ylabel="share of predictions", xlim=(0, 1))
    bottom.grid(alpha=0.3)
    handles, labels = top.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return fig


@dataclass(frozen=True)
class CalibrationRecord:
    """``metrics.json``'s ``calibration``: :class:`CalibrationResult`'s numbers for the kept model, the
    diagram's file, and ``applied``: the temperature is part of the kept model (its checkpoint, its
    export, its predictions)."""

    key: ClassVar[str | None] = "calibration"
    result: dict[str, Any] | None = None
    plot: str | None = None
    applied: bool | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in {**(self.result or {}), "plot": self.plot, "applied": self.applied,
                                  "note": self.note}.items() if v is not None}


class Calibration:
    """After the fit: temperature scaling of the kept model, fitted and measured on the validation
    images (:func:`calibrate`), kept in its checkpoint (:func:`keep_temperature`) and written to
    ``metrics.json`` (``calibration``) with ``reliability.png``. A step of
    :mod:`visiontl.analyse.after_fit`; for an adaptation run, after target BatchNorm (the model it
    keeps), on the source validation images."""

    name = "calibration"

    def run(self, ctx: FitContext) -> CalibrationRecord | None:
        from visiontl.analyse.plots import save_figure
        from visiontl.tasks.classification import ClassificationTask

        outputs = ctx.validation_outputs() if isinstance(ctx.task, ClassificationTask) else None
        if outputs is None:
            return None
        logits, labels = outputs
        multilabel = bool(ctx.task.multilabel)
        if len(logits) < MIN_IMAGES:
            return CalibrationRecord(applied=False, note=f"{len(logits)} validation image(s): too few to fit and judge a "
                                                        f"temperature (at least {MIN_IMAGES}); the probabilities stay as trained")
        result, out_of_fold = calibrate(logits, labels, multilabel)
        fig = reliability_figure(scaled_probabilities(logits, 1.0, multilabel), out_of_fold, labels, result, multilabel)
        plot = save_figure(fig, ctx.run_dir / "reliability.png")
        if result.nll_after >= result.nll_before:  # judged out of fold, scaling did not help: not kept
            return CalibrationRecord(result=result.to_dict(), plot=plot.name, applied=False,
                                     note=f"temperature scaling did not lower the out-of-fold NLL ({result.nll_before:.4f} "
                                          f"-> {result.nll_after:.4f}); the probabilities stay as trained")
        keep_temperature(ctx, torch.tensor(result.temperature), result.to_dict())
        return CalibrationRecord(result=result.to_dict(), plot=plot.name, applied=True)


def keep_temperature(ctx: FitContext, temperature: torch.Tensor, record: dict[str, Any]) -> None:
    """Make ``temperature`` part of the kept model: in its checkpoint (``temperature``; a multi-label
    model's thresholds restated with it, in the state and in the recorded per-tag table, so decisions
    do not change), and in the task in memory."""
    from visiontl.tasks.checkpoints import save_checkpoint
    from visiontl.tasks.multilabel import rescale_thresholds

    _, ckpt, best = ctx.kept()
    if ckpt is not None:
        state = ckpt["state_dict"]
        old = state.get("temperature", torch.ones_like(temperature)).float().cpu()
        if "thresholds" in state:
            state["thresholds"] = rescale_thresholds(state["thresholds"].float().cpu(), old, temperature)
            tags = (ckpt.get("visiontl") or {}).get("val_tags")
            if isinstance(tags, dict):
                for row, t in zip(tags.get("rows", []), state["thresholds"].tolist()):
                    row["threshold"] = t
        state["temperature"] = temperature.clone()
        ckpt.setdefault("visiontl", {})["calibration"] = record
        save_checkpoint(ckpt, best)
    ctx.task.set_temperature(temperature)
