"""WiSE-FT: weight-space ensembles of the pretrained and the fine-tuned model (Wortsman et al., CVPR
2022, "Robust fine-tuning of zero-shot models").

``theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_1`` where ``theta_1`` is the fine-tuned model
and ``theta_0`` the pretrained backbone with a linear head fitted on its frozen features of the run's
training images (the paper's recipe for models without a zero-shot head: the linear classifier,
:func:`visiontl.strategies.linear_probe.fit_probe` here, penalty by cross-validation). ``alpha = 0`` is that
linear probe, ``alpha = 1`` the fine-tuned model; the ensemble costs no training.

BatchNorm running statistics are interpolated like every other tensor (``bn="interpolate"``, the
default: ``benchmarks/forgetting.py`` measured it against re-estimating them), or re-estimated on
the training images (``bn="recompute"``: :func:`visiontl.tasks.da.reestimate_batchnorm`, AdaBN's
rule: a cumulative average over one pass, every other module in eval mode).

Every alpha is scored on the run's validation images (and, with ``retain``, by linear-probe
retention on a task to keep: :func:`visiontl.analyse.forgetting.retention_accuracy`, what a run's
``retain_acc_after`` is); the chosen alpha is the smallest within ``tolerance`` of the best
validation score (the most of the pretrained model kept for at most that much of the new
task), unless ``alpha`` is given. Its weights are written as a normal
checkpoint (``wise-ft.ckpt``) that ``visiontl export`` takes.

A multi-label run (several tags per image) is mixed the same way with its own measures: alpha 0's
head is the one-vs-rest logistic regression (a binary probe per tag), every alpha is scored by
macro mean average precision (``val_map``, the score the choice uses) and by macro F1 at per-tag
thresholds tuned on the validation images for that alpha's weights, and the checkpoint carries the
thresholds tuned for the chosen mixture (or the run's fixed ones).

A run directory is data: nothing in it is imported or executed. The run's images and labels come
from its ``splits.csv``; the weights from its checkpoint (``weights_only``) and the pretrained weights
it recorded (or ``weights``).
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visiontl.core import files
from visiontl.core.errors import UserError, one_line
from visiontl.tasks.trained import run_checkpoint

__all__ = ["DEFAULT_ALPHAS", "WiseFTError", "interpolate", "parse_alphas", "wise_ft"]

DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


class WiseFTError(UserError):
    """A run WiSE-FT cannot interpolate, or bad options."""


def parse_alphas(text: str | Sequence[float]) -> list[float]:
    """``"0,0.1,...,1"`` (or a list) -> sorted unique alphas in [0, 1]; :class:`WiseFTError` naming
    every entry that is not a number in [0, 1]."""
    import math

    items = text.split(",") if isinstance(text, str) else list(text)
    values, bad = [], []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            value = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError):
            bad.append(f"{str(item).strip()!r} is not a number")
            continue
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            bad.append(f"{str(item).strip()} is outside [0, 1]")
        else:
            values.append(value)
    if bad or not values:
        detail = "; ".join(bad) if bad else "no alpha given"
        raise WiseFTError(f"--alphas {one_line(text if isinstance(text, str) else ','.join(map(str, items)), 120)}: "
                          f"{one_line(detail, 300)}; alphas must be numbers in [0, 1], comma-separated (0: the "
                          f"pretrained model with its linear head, 1: the fine-tuned one), e.g. 0,0.5,1.")
    return sorted(set(values))


def interpolate(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * end`` for every floating-point tensor; integer tensors
    (BatchNorm's ``num_batches_tracked``) come from the nearer end."""
    if set(start) != set(end):
        differ = sorted(set(start) ^ set(end))
        raise WiseFTError(f"the pretrained and fine-tuned models have different tensors ({', '.join(differ[:5])}...).")
    out = {}
    for key, value in end.items():
        if value.is_floating_point():
            out[key] = torch.lerp(start[key].to(value.dtype), value, float(alpha))
        else:
            out[key] = (value if alpha > 0.5 else start[key]).clone()
    return out


def _run_data(ckpt: Path, task: Any) -> Any:
    """The run's datamodule, from its ``splits.csv`` (paths and labels), with its preprocessing."""
    from visiontl.tasks.trained import listing_datamodule

    run = ckpt.parent.parent
    listing = run / "splits.csv"
    if not listing.is_file():
        raise WiseFTError(f"{run} has no splits.csv (runs write it from visiontl 0.x on); re-run the fit, or list its "
                          f"images as split,path,label in {listing}.")
    dm = listing_datamodule(listing, task)
    if dm.class_names != task.class_names:
        raise WiseFTError(f"{listing} has classes {dm.class_names}, the checkpoint {task.class_names}.")
    if "val" not in dm.splits:
        raise WiseFTError(f"{listing} has no validation images to choose alpha on.")
    return dm


def _recompute_bn(model: nn.Module, dm: Any) -> None:
    """``bn="recompute"``: :func:`~visiontl.tasks.da.reestimate_batchnorm` on the run's training
    images (evaluation transform, batches of 32, in order)."""
    from visiontl.tasks.da import reestimate_batchnorm

    loader = torch.utils.data.DataLoader(dm.feature_source("train"), batch_size=32, shuffle=False, num_workers=0)
    reestimate_batchnorm(model, (batch["image"] for batch in loader))


@torch.no_grad()
def _scores(model: nn.Module, dm: Any, multilabel: bool = False) -> dict[str, Any]:
    """Validation accuracy and balanced accuracy of ``model``; multi-label: macro and micro mean
    average precision, and macro F1 at per-tag thresholds tuned on these images (``thresholds``)."""
    model.eval()
    loader = torch.utils.data.DataLoader(dm.feature_source("val"), batch_size=32, num_workers=0)
    outputs, labels = [], []
    for batch in loader:
        outputs.append(model(batch["image"]).float())
        labels.append(torch.as_tensor(batch["label"]))
    logits, y = torch.cat(outputs), torch.cat(labels)
    if multilabel:
        from torchmetrics.functional.classification import multilabel_average_precision

        from visiontl.tasks.multilabel import tune_thresholds

        probs, targets = logits.sigmoid(), y.long()
        thresholds, f1 = tune_thresholds(probs, targets.float())
        k = targets.shape[1]
        return {"val_map": float(multilabel_average_precision(probs, targets, k, average="macro", ignore_index=-1)),
                "val_map_micro": float(multilabel_average_precision(probs, targets, k, average="micro",
                                                                    ignore_index=-1)),
                "val_f1": float(np.nanmean(f1.numpy())) if bool((~f1.isnan()).any()) else float("nan"),
                "thresholds": [round(float(t), 6) for t in thresholds]}
    p, y = logits.argmax(1).numpy(), y.numpy()
    per_class = [float((p[y == c] == c).mean()) for c in np.unique(y)]
    return {"val_acc": float((p == y).mean()), "val_balanced_acc": float(np.mean(per_class))}


def wise_ft(run: str | os.PathLike[str], out: str | os.PathLike[str], alphas: Sequence[float] = DEFAULT_ALPHAS,
            retain: str | os.PathLike[str] | None = None, bn: str = "interpolate",
            weights: str | os.PathLike[str] | None = None, alpha: float | None = None, tolerance: float = 0.01,
            log: Callable[[str], Any] = print, verbose: bool = False) -> dict[str, Any]:
    """Interpolate a run's pretrained and fine-tuned weights, score every alpha, write the chosen one.

    Args:
        run: a run directory (its ``checkpoints/best.ckpt``, else ``last.ckpt``) or a checkpoint in one.
        out: folder for ``wise_ft.csv`` / ``.json`` / ``.png`` and ``wise-ft.ckpt``.
        alphas: the mixing weights to score (0: pretrained + linear head, 1: fine-tuned).
        retain: a labelled folder or CSV of a task to keep, scored by linear-probe retention.
        bn: ``interpolate`` BatchNorm running statistics, or ``recompute`` them on the training images.
        weights: the pretrained weights, when the recorded ones are not here (a file or named source).
        alpha: write this alpha instead of the chosen one (it is scored too).
        tolerance: the chosen alpha is the smallest whose validation score (accuracy; macro mAP for a
            multi-label run) is within this of the best.
        log: where progress lines go.
        verbose: show Lightning's and visiontl's INFO lines (where features were cached...); quiet
            by default, as :func:`visiontl.fine_tune` is (:mod:`visiontl.core.quiet`).

    Returns:
        ``{"alphas": [rows], "chosen": alpha, "checkpoint": path, ...}`` (also ``wise_ft.json``).
    """
    from visiontl.core.quiet import quiet

    with quiet(verbose):
        return _wise_ft(run, out, alphas, retain, bn, weights, alpha, tolerance, log)


def _wise_ft(run: str | os.PathLike[str], out: str | os.PathLike[str], alphas: Sequence[float],
             retain: str | os.PathLike[str] | None, bn: str, weights: str | os.PathLike[str] | None,
             alpha: float | None, tolerance: float, log: Callable[[str], Any]) -> dict[str, Any]:
    """:func:`wise_ft`'s work, under its quieting."""
    from visiontl.models.features import split_features, supports_features
    from visiontl.strategies.linear_probe import fit_probe
    from visiontl.analyse.forgetting import retain_datamodule, retention_accuracy
    from visiontl.tasks import ClassificationTask

    if bn not in ("interpolate", "recompute"):
        raise WiseFTError(f"bn must be 'interpolate' or 'recompute', got {bn!r}.")
    if not 0.0 <= tolerance < 1.0:
        raise WiseFTError(f"tolerance must be in [0, 1), got {tolerance}.")
    grid = parse_alphas(list(alphas) + ([alpha] if alpha is not None else []))
    ckpt = run_checkpoint(Path(run))
    tuned = ClassificationTask.from_checkpoint(ckpt)
    multilabel = tuned.multilabel
    score = "val_map" if multilabel else "val_acc"  # what chooses alpha
    strategy = tuned.strategy
    if not strategy.sgd or strategy.cache_features or not strategy.uses_pretrained:
        raise WiseFTError(f"{ckpt}: strategy {strategy.name!r} does not fine-tune a pretrained backbone; there is "
                          f"nothing to interpolate.")
    if not strategy.fits_head:
        log(f"[visiontl wise-ft] warning: {strategy.name!r} did not start from a fitted head, so the run did not "
            f"start where alpha 0 is (pretrained backbone + linear probe) and the mixtures in between can be worse "
            f"than both ends (benchmarks/results/forgetting_wise_ft.png). WiSE-FT assumes fine-tuning from theta_0: "
            f"use strategy 'gradual' (LP-FT) for the run to mix.")
    start = ClassificationTask.start_of(ckpt, weights=weights)
    end_model = strategy.merge(copy.deepcopy(tuned.model)).eval()
    start_model = strategy.merge(copy.deepcopy(start.model)).eval()
    if not supports_features(end_model):
        raise WiseFTError(f"{tuned.hparams['backbone']} has no single linear classifier to fit on its features.")
    dm = _run_data(ckpt, tuned)
    backbone = tuned.hparams["backbone"]
    k = tuned.hparams["num_classes"]

    # theta_0's head: the linear probe on the pretrained features of the run's training images
    # (multi-label: one-vs-rest, a binary logistic regression per tag)
    fit_probe(*split_features(start_model, backbone, dm, "train"), k, head=start_model.get_classifier())
    start_state, end_state = start_model.state_dict(), end_model.state_dict()
    rdm = retain_datamodule(retain, dm) if retain else None

    rows: list[dict[str, Any]] = []
    thresholds: dict[float, list[float] | None] = {}
    model = copy.deepcopy(end_model)
    for a in grid:
        model.load_state_dict(interpolate(start_state, end_state, a))
        if bn == "recompute" and 0.0 < a < 1.0:
            _recompute_bn(model, dm)
        row: dict[str, Any] = {"alpha": a, **_scores(model, dm, multilabel)}
        thresholds[a] = row.pop("thresholds", None)
        if rdm is not None:
            row["retain_acc"] = retention_accuracy(model, rdm)
        rows.append(row)
        log(f"[visiontl wise-ft] alpha {a:.2f}: {score} {row[score]:.3f}"
            + (f", retain_acc {row['retain_acc']:.3f}" if "retain_acc" in row else ""))

    best = max(r[score] for r in rows)
    chosen = alpha if alpha is not None else min(r["alpha"] for r in rows if r[score] >= best - tolerance - 1e-12)
    model.load_state_dict(interpolate(start_state, end_state, chosen))
    if bn == "recompute" and 0.0 < chosen < 1.0:
        _recompute_bn(model, dm)
    picked = next(r for r in rows if r["alpha"] == chosen)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fixed = tuned.hparams.get("thresholds")  # a run's fixed thresholds stay; else those tuned for this mixture
    kept = (list(fixed) if fixed else thresholds[chosen]) if multilabel else None
    path = _save_checkpoint(ckpt, tuned, model, picked, chosen, bn, out / "wise-ft.ckpt", thresholds=kept)
    report = {"run": str(ckpt), "bn": bn, "tolerance": tolerance, "chosen": chosen, "score": score,
              "rule": "given" if alpha is not None else f"smallest alpha within {tolerance} of the best {score}",
              "checkpoint": str(path), "alphas": rows, **({"thresholds": dict(zip(tuned.class_names, kept))}
                                                          if kept is not None else {})}
    _write_table(rows, out / "wise_ft.csv")
    files.write_json(out / "wise_ft.json", report)
    _plot(rows, chosen, out / "wise_ft.png", score)
    log(f"[visiontl wise-ft] alpha {chosen:.2f} ({report['rule']}): {score} {picked[score]:.3f}; wrote {path}")
    return report


def _save_checkpoint(ckpt: Path, tuned: Any, model: nn.Module, scores: dict[str, Any], alpha: float, bn: str,
                     path: Path, thresholds: list[float] | None = None) -> Path:
    """A checkpoint ``ClassificationTask.from_checkpoint`` (and ``visiontl export``) loads: the run's
    hyper-parameters (a merged LoRA model is a plain one: strategy ``full``) and the mixed weights;
    a multi-label run's ``thresholds`` (one per tag) with them."""
    from visiontl.tasks.checkpoints import read_checkpoint, save_checkpoint, with_model_state
    from visiontl.strategies import get_strategy

    original = read_checkpoint(ckpt)
    hp = dict(original["hyper_parameters"])
    if set(model.state_dict()) != set(tuned.model.state_dict()):
        hp["strategy"] = get_strategy("full").to_config()
    state = with_model_state({k: v for k, v in original["state_dict"].items() if k == "class_weight"},
                             model.state_dict())
    if thresholds is not None:
        state["thresholds"] = torch.tensor(thresholds, dtype=torch.float32)
    record = dict(original["visiontl"]) if isinstance(original.get("visiontl"), dict) else {}
    record.update(val_metrics={k: v for k, v in scores.items() if k.startswith("val_")}, val_confusion=None,
                  wise_ft={"alpha": alpha, "bn": bn, "from": str(ckpt)})
    return save_checkpoint({"hyper_parameters": hp, "state_dict": state, "visiontl": record}, path)


def _write_table(rows: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    writer = files.csv_dict_writer(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(path, buf.getvalue())


def _plot(rows: list[dict[str, Any]], chosen: float, path: Path, score: str = "val_acc") -> None:
    from visiontl.analyse.plots import save_figure

    save_figure(_figure(rows, chosen, score), path)


def _figure(rows: list[dict[str, Any]], chosen: float, score: str = "val_acc") -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4, 3.8), layout="constrained")
    ax = fig.subplots()
    xs = [r["alpha"] for r in rows]
    ax.plot(xs, [r[score] for r in rows], marker="o",
            label="new task (validation" + (", macro mAP)" if score == "val_map" else ")"))
    if "retain_acc" in rows[0]:
        ax.plot(xs, [r["retain_acc"] for r in rows], marker="s", label="retained task (linear probe)")
    ax.axvline(chosen, color="grey", ls="--", lw=1, label=f"chosen alpha {chosen:.2f}")
    what = "accuracy" if score == "val_acc" else "accuracy / mean average precision"
    ax.set(xlabel="alpha (0: pretrained + linear head, 1: fine-tuned)", ylabel=f"{what} (0 to 1)",
           title=f"WiSE-FT: {'accuracy' if score == 'val_acc' else 'scores'} along the weight interpolation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    return fig
