"""Reports: confusion matrices, learning curves and strategy comparisons as PNG/CSV/Markdown.

Figures are built with :class:`matplotlib.figure.Figure` directly (never ``pyplot``), so no
window is ever opened, no global backend is switched under a notebook user's feet, and nothing
accumulates in pyplot's figure registry. Every file goes through :func:`visiontl.core.files.atomic_path`:
a failure while drawing or saving leaves no file at the target path.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import textwrap
from pathlib import Path
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from visiontl.core.files import atomic_path, csv_dict_writer, csv_writer, write_text

__all__ = ["AXIS_LABELS", "axis_label", "comparison_figure", "comparison_table", "confusion_matrix_figure",
           "drift_figure", "format_console_table", "learning_curves_figure", "learning_rate_lines", "markdown_page",
           "read_rows", "save_comparison", "save_confusion_matrix", "save_drift", "save_figure",
           "save_learning_curves", "save_tag_report", "pr_curves_figure", "thumbnail_png", "write_rows"]

PathLike = str | os.PathLike[str]


def save_figure(fig: Figure, path: PathLike, dpi: int = 120) -> Path:
    """Save ``fig`` atomically in the format of ``path``'s suffix (the temp file's is .tmp)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tight = None if fig.get_layout_engine() is not None else "tight"  # laid out already: one draw, not two
        fig.savefig(tmp, format=path.suffix[1:].lower() or "png", dpi=dpi, bbox_inches=tight)
    return path


def thumbnail_png(path: PathLike, max_width: int = 720) -> bytes:
    """A saved plot as PNG bytes at most ``max_width`` pixels wide (aspect kept) in a 256-colour
    palette (plots have few colours): what notebooks embed, so that they stay small enough to
    review (``IPython.display.Image(data=thumbnail_png(path))``)."""
    from io import BytesIO

    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)), Image.Resampling.LANCZOS)
        image = image.quantize(colors=256)
        out = BytesIO()
        image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _to_numpy(x: Any) -> np.ndarray:
    """Convert an array, nested list or torch tensor (any device) to a numpy array."""
    for method in ("detach", "cpu"):
        x = getattr(x, method)() if hasattr(x, method) else x
    if hasattr(x, "numpy"):
        return np.asarray(x.numpy())
    return np.asarray(x.tolist() if hasattr(x, "tolist") else x)


def confusion_matrix_figure(cm: Any, class_names: list[str], normalize: bool = True,
                            title: str = "") -> Figure:
    """The heat map of :func:`save_confusion_matrix` (title default: ``confusion matrix``).

    Raises:
        ValueError: if ``cm`` is not square or does not match ``class_names``.
    """
    m = _to_numpy(cm)
    n = len(class_names)
    if m.ndim != 2 or m.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {m.shape} does not fit {n} class names")
    counts = m.astype(np.int64) if np.allclose(m, np.round(m)) else m.astype(float)
    rows = counts.sum(axis=1, keepdims=True).astype(float)
    recall = np.divide(counts, rows, out=np.zeros(counts.shape, float), where=rows > 0)
    shade = recall if normalize else counts

    side = float(np.clip(0.45 * n + 2.5, 4.5, 26.0))
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    im = ax.imshow(shade, cmap="Blues", vmin=0, vmax=1 if normalize else max(shade.max(), 1))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="recall (row share)" if normalize else "count")
    font = float(np.clip(140 / max(n, 1), 4.5, 11))
    for i, j in np.ndindex(counts.shape if n <= 50 else (0, 0)):
        c = counts[i, j]
        text = f"{c:,}" if isinstance(c, np.integer) else f"{c:.2g}"
        text += f"\n{recall[i, j]:.0%}" if n <= 15 else ""
        dark = shade[i, j] / (im.norm.vmax or 1) > 0.55
        ax.text(j, i, text, ha="center", va="center", fontsize=font,
                color="white" if dark else "black")
    long_names = max((len(c) for c in class_names), default=0) > 6 or n > 12
    ax.set_xticks(range(n), class_names, rotation=60 if long_names else 0,
                  ha="right" if long_names else "center", rotation_mode="anchor",
                  fontsize=max(font, 6))
    ax.set_yticks(range(n), class_names, fontsize=max(font, 6))
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "confusion matrix")
    return fig


def save_confusion_matrix(cm: Any, class_names: list[str], path_png: PathLike,
                          path_csv: PathLike | None = None, normalize: bool = True,
                          title: str = "") -> dict[str, Path]:
    """Write a confusion-matrix heat map (and optionally its counts as CSV).

    Args:
        cm: square ``(n, n)`` matrix, rows = true class, columns = predicted class; a numpy
            array, nested list or torch tensor.
        class_names: ``n`` names, in index order.
        path_png: destination of the heat map.
        path_csv: destination of the counts; header row ``true\\pred, <predicted names>``,
            then one row per true class. Skipped when None.
        normalize: shade cells by row-normalised recall (else by raw counts). Cells always
            show counts (up to 50 classes), plus the recall percentage up to 15 classes.
        title: figure title (default: ``confusion matrix``).

    Returns:
        ``{"png": path}`` plus ``"csv"`` when written.

    Raises:
        ValueError: if ``cm`` is not square or does not match ``class_names``.
    """
    fig = confusion_matrix_figure(cm, class_names, normalize, title)
    n = len(class_names)
    out = {"png": save_figure(fig, path_png, dpi=150 if n > 25 else 120)}
    if path_csv is not None:
        m = _to_numpy(cm)
        counts = m.astype(np.int64) if np.allclose(m, np.round(m)) else m.astype(float)
        buf = io.StringIO()
        writer = csv_writer(buf, lineterminator="\n")
        writer.writerow(["true\\pred", *class_names])
        writer.writerows([name, *row] for name, row in zip(class_names, counts.tolist()))
        out["csv"] = write_text(path_csv, buf.getvalue())
    return out


def pr_curves_figure(report: dict[str, Any], title: str = "") -> Figure:
    """Precision-recall curves of a multi-label evaluation (:func:`visiontl.tasks.multilabel.tag_report`):
    one line per tag, its AP and support in the legend, its operating point (the threshold) marked."""
    rows = {r["tag"]: r for r in report["rows"]}
    curves = report["curves"]
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    fig.suptitle(title or "precision-recall per tag (validation)")
    ax = fig.subplots()
    colors = _ordered_colors(max(len(curves), 1)) if len(curves) > 10 else [f"C{i}" for i in range(len(curves))]
    for (tag, curve), color in zip(curves.items(), colors):
        row = rows[tag]
        ax.plot(curve["recall"], curve["precision"], color=color, lw=1.4,
                label=f"{tag} (AP {row['ap']:.2f}, {row['support']} pos.)")
        if row["sensitivity"] == row["sensitivity"]:  # the operating point: recall = sensitivity at the threshold
            tp = row["sensitivity"] * row["support"]
            fp = (1 - row["specificity"]) * (row["images"] - row["support"]) if row["specificity"] == row["specificity"] else 0
            ax.plot([row["sensitivity"]], [tp / max(tp + fp, 1e-12)], "o", color=color, ms=5)
    ax.set(xlabel="recall (sensitivity, 0 to 1)", ylabel="precision (0 to 1)", xlim=(0, 1.02), ylim=(0, 1.05))
    ax.grid(alpha=0.3)
    missing = [t for t in rows if t not in curves]
    if missing:
        ax.set_title(f"no curve (no positive, or no negative, on these images): {', '.join(missing)}", fontsize=8)
    if curves:
        _legend_below(ax, ncol=2 if len(curves) > 6 else 1)
    return fig


def save_tag_report(report: dict[str, Any], path_png: PathLike, path_csv: PathLike, title: str = "") -> dict[str, Path]:
    """``tag_metrics.csv`` (one row per tag: support, AP, F1, sensitivity, specificity, threshold) and
    ``pr_curves.png`` of a multi-label evaluation."""
    columns = ["tag", "support", "images", "ap", "f1", "sensitivity", "specificity", "threshold"]
    return {"csv": write_rows(report["rows"], path_csv, columns),
            "png": save_figure(pr_curves_figure(report, title), path_png)}


def _series(df: pd.DataFrame, col: str, x: str) -> pd.Series:
    """Mean of ``col`` per value of ``x`` over the rows where ``col`` is logged (NaNs dropped)."""
    sub = df.dropna(subset=[col])
    return sub.groupby(x)[col].mean() if x in sub else sub[col].reset_index(drop=True)


VAL_STYLES = {  # distinct colour, line style and marker each: equal curves (balanced sets) stay visible
    "val_acc": ("accuracy", "tab:blue", "-", "o"),
    "val_balanced_acc": ("balanced accuracy", "tab:red", "--", "s"),
    "val_f1": ("F1", "tab:green", ":", "^"),
    "val_auroc": ("AUROC", "tab:purple", "-.", "D"),
    "val_map": ("mean average precision (macro)", "tab:orange", "-", "v"),  # multi-label runs
    "val_map_micro": ("mean average precision (micro)", "tab:brown", "--", "P"),
}


def _group_order(name: str) -> tuple[int, int, str]:
    """Sort key of a layer group's name: stem, stage1..N, others, neck, head (as ``layer_groups`` orders them)."""
    base = name.split("/")[0].split(".")[0]
    if base == "stem":
        return (0, 0, name)
    if base.startswith("stage") and base[5:].isdigit():
        return (1, int(base[5:]), name)
    return {"neck": (3, 0, name), "head": (4, 0, name)}.get(base, (2, 0, name))


def _join_groups(names: list[str]) -> str:
    if len(names) <= 2:
        return ", ".join(names)
    return f"{names[0]} to {names[-1]} ({len(names)} groups, same rate)"


def learning_rate_lines(df: pd.DataFrame, x: str = "step") -> list[tuple[str, pd.Series]]:
    """One learning-rate curve per layer group, stem to head, from LearningRateMonitor's ``lr-*`` columns.

    ``<group>/no_decay`` columns (the group's parameters without weight decay, at the group's own
    rate) are dropped when they equal their group's; groups whose curves are equal share one line
    (``"stage1 to stage7 (7 groups, same rate)"``); the optimizer's name is left out when there is
    only one optimizer.
    """
    cols = [str(c) for c in df.columns if str(c).startswith("lr-") and df[c].notna().any()
            and not str(c).endswith(("-momentum", "-weight_decay"))]
    series = {c[3:]: _series(df, c, x) for c in cols}
    optimizers = {name.split("/")[0] for name in series}
    if len(optimizers) == 1 and all("/" in name for name in series):
        series = {name.split("/", 1)[1]: s for name, s in series.items()}
    for name in [n for n in series if n.endswith("/no_decay")]:
        parent = series.get(name[: -len("/no_decay")])
        if parent is not None and _same_curve(parent, series[name]):
            del series[name]
    lines: list[tuple[list[str], pd.Series]] = []
    for name in sorted(series, key=_group_order):
        same = next((line for line in lines if _same_curve(line[1], series[name])), None)
        if same is None:
            lines.append(([name], series[name]))
        else:
            same[0].append(name)
    return [(_join_groups(names), s) for names, s in lines]


def _same_curve(a: pd.Series, b: pd.Series) -> bool:
    return a.index.equals(b.index) and bool(np.allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6, atol=0.0))


def _legend_below(ax: Any, ncol: int = 2) -> None:
    """The axes' legend under its x label, never over the data."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, fontsize=7, frameon=False)


def _run_name(metrics_csv: PathLike) -> str:
    folder = Path(metrics_csv).resolve().parent
    return f"{folder.parent.name}/{folder.name}" if folder.name.startswith("version_") else folder.name


def learning_curves_figure(metrics_csv: PathLike, title: str | None = None) -> Figure | None:
    """The figure of :func:`save_learning_curves` (None when there is nothing to plot)."""
    try:
        df = pd.read_csv(metrics_csv)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return None
    logged = {str(c) for c in df.columns if df[c].notna().any()}
    x = "step" if "step" in df else "epoch"
    xlabel = "optimisation step" if x == "step" else "epoch"
    train = [c for c in ("train_loss_epoch", "train_loss", "train_loss_step") if c in logged][:1]
    losses = {("train" + (" (epoch mean)" if c == "train_loss_epoch" else " (per step)" if c == "train_loss_step"
                          else "")): _series(df, c, x) for c in train}
    if "val_loss" in logged:
        losses["validation"] = _series(df, "val_loss", x)
    metrics = {c: _series(df, c, x) for c in VAL_STYLES if c in logged}
    lrs = learning_rate_lines(df, x)
    if not (losses or metrics or lrs):
        return None
    title = title or f"Learning curves: {_run_name(metrics_csv)}"
    every = [*losses.values(), *metrics.values(), *(s for _, s in lrs)]
    if all(len(s) <= 1 for s in every):
        return _single_evaluation_figure(losses, metrics, bool(train or lrs), title)

    panels = [p for p in ("loss", "validation", "lr") if {"loss": losses, "validation": metrics, "lr": lrs}[p]]
    fig = Figure(figsize=(min(12.0, 4.0 * len(panels)), 4.2), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=True)[0]
    for ax, panel in zip(axes, panels):
        if panel == "loss":
            for label, s in losses.items():
                ax.plot(s.index, s.to_numpy(), marker="o" if len(s) <= 30 else None, ms=3, label=label)
            values = np.concatenate([s.to_numpy() for s in losses.values()])
            log = bool((values > 0).all() and values.max() / values.min() > 100)
            ax.set(title="loss", ylabel="loss (log scale)" if log else "loss")
            _legend_below(ax)
        elif panel == "validation":
            for col, s in metrics.items():
                label, color, style, marker = VAL_STYLES[col]
                ax.plot(s.index, s.to_numpy(), color=color, ls=style, marker=marker if len(s) <= 30 else None,
                        ms=6 if col == "val_acc" else 4, mfc="none" if col != "val_acc" else color, label=label)
            only_acc = set(metrics) <= {"val_acc", "val_balanced_acc"}
            ax.set(title="validation metrics", ylabel="accuracy" if only_acc else "accuracy / score (0 to 1)")
            _legend_below(ax)
            log = False
        else:
            colors = _ordered_colors(len(lrs))
            for (label, s), color in zip(lrs, colors):
                ax.plot(s.index, s.to_numpy(), color=color, marker="o" if len(s) <= 30 else None, ms=3, label=label)
            values = np.concatenate([s.to_numpy() for _, s in lrs])
            log = bool((values > 0).all() and values.max() / values.min() >= 10)
            ax.set(title="learning rate per layer group",
                   ylabel="learning rate (log scale)" if log else "learning rate")
            _legend_below(ax, ncol=3 if len(lrs) > 4 else 2)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return fig


def _ordered_colors(n: int) -> list[Any]:
    """``n`` colours in order (stem to head): one sequential colour map, so neighbours look related."""
    from matplotlib import colormaps

    return ["tab:blue"] if n == 1 else list(colormaps["viridis"](np.linspace(0.0, 0.88, n)))


def _single_evaluation_figure(losses: dict[str, pd.Series], metrics: dict[str, pd.Series], trained: bool,
                              title: str) -> Figure:
    """A run with one evaluation and no curve (a fitted head): its validation result as bars, no fake axis."""
    why = ("one logged point per series, so no curve to draw" if trained else
           "a fitted head: no optimisation steps, one validation after the fit")
    extra = ", ".join(f"{label} loss {float(s.iloc[0]):.3g}" for label, s in losses.items() if len(s))
    fig = Figure(figsize=(6.4, 1.9 + 0.42 * max(len(metrics), 1)), layout="constrained")
    fig.suptitle(f"{title}\n{why}", fontsize=11)
    ax = fig.subplots()
    if not metrics:
        ax.set_axis_off()
        ax.text(0.5, 0.5, extra or "nothing measured", ha="center", va="center", transform=ax.transAxes)
        return fig
    names = [VAL_STYLES[c][0] for c in metrics]
    values = [float(s.iloc[0]) for s in metrics.values()]
    y = np.arange(len(names))
    ax.barh(y, values, color=[VAL_STYLES[c][1] for c in metrics], height=0.6)
    for yi, v in zip(y, values):
        ax.annotate(f"{v:.3f}", (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set(xlabel="score (0 to 1)", ylabel="validation metric",
           title="the single validation" + (f" ({extra})" if extra else ""))
    ax.grid(axis="x", alpha=0.3)
    return fig


def save_learning_curves(metrics_csv: PathLike, path_png: PathLike, title: str | None = None) -> Path | None:
    """Plot a Lightning ``CSVLogger`` ``metrics.csv``: losses, validation metrics, learning rates.

    Panels appear only for data that exist, all against the optimisation step (``step``; ``epoch``
    when there is no step column): train loss (``train_loss_epoch``, else ``train_loss``, else
    ``train_loss_step``) and ``val_loss``; ``val_acc``, ``val_balanced_acc``, ``val_f1`` and
    ``val_auroc``, each in its own colour, line style and marker; the learning rate of each layer
    group, stem to head (:func:`learning_rate_lines`: no ``/no_decay`` duplicates), on a log scale
    when it spans a decade or more. A run with a single evaluation and no curve (a fitted head:
    ``logreg``, ``knn``, ``prototype``) gets its validation result as bars instead, and says so.

    Args:
        metrics_csv: the CSV file; rows are sparse (one per logging call), NaNs are skipped.
        path_png: destination of the figure.
        title: the figure's title (default: ``Learning curves: <run folder>``).

    Returns:
        The PNG path, or None (nothing written) if the file is missing, empty or unplottable.
    """
    fig = learning_curves_figure(metrics_csv, title)
    return None if fig is None else save_figure(fig, path_png)


def drift_figure(drift: dict[str, Any]) -> Figure | None:
    """The figure of :func:`save_drift` (None when no group moved or has pretrained weights)."""
    groups = [g for g in drift.get("groups", []) if g.get("relative") is not None]
    if not groups:
        return None
    fig = Figure(figsize=(max(4.5, 0.55 * len(groups) + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(groups)), [g["relative"] for g in groups], color="tab:orange")
    ax.set_xticks(range(len(groups)), [g["group"] for g in groups], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("layer group (stem to head)")
    ax.set_ylabel("||w - w_pretrained|| / ||w_pretrained||")
    parts = [f"{label} {drift[key]:.3f}" for key, label in (("cka_val", "CKA"), ("imagenet_agreement",
             "ImageNet agreement"), ("retain_acc_after", "retained acc")) if drift.get(key) is not None]
    ax.set_title("weight drift per layer group" + (f"\n{', '.join(parts)}" if parts else ""), fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return fig


def save_drift(drift: dict[str, Any], path_png: PathLike) -> Path | None:
    """Plot a run's drift report (:mod:`visiontl.analyse.forgetting`): each layer group's L2 distance from
    the pretrained weights relative to their norm, with CKA, ImageNet agreement and retention in
    the title. Returns None (nothing written) when no group moved or has pretrained weights."""
    fig = drift_figure(drift)
    return None if fig is None else save_figure(fig, path_png)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _fmt(v: Any, floatfmt: str, thousands: bool) -> str:
    """Format one cell: blank for None/NaN, ints optionally with separators, floats by spec."""
    if not _is_num(v):
        return "" if v is None else str(v)
    if isinstance(v, numbers.Integral):
        return f"{int(v):,}" if thousands else str(int(v))
    return "" if math.isnan(v) else format(float(v), floatfmt)


def _columns(rows: list[dict[str, Any]], columns: list[str] | None) -> list[str]:
    """``columns`` if given, else keys in order of first appearance (first row's keys first)."""
    return list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))


def _default_format(column: str) -> str:
    """Seconds (``wall_s``, ``fit_s``...) to a tenth; everything else to three decimals."""
    return ".1f" if column.endswith("_s") and not column.endswith("_per_s") else ".3f"


def _cells(rows: list[dict[str, Any]], cols: list[str], floatfmt: str | dict[str, str],
           thousands: bool) -> tuple[list[list[str]], list[bool]]:
    """Formatted cells and, per column, whether it is numeric (for right alignment)."""
    fmts = {c: floatfmt.get(c, _default_format(c)) if isinstance(floatfmt, dict) else floatfmt for c in cols}
    cells = [[_fmt(r.get(c), fmts[c], thousands) for c in cols] for r in rows]
    numeric = [any(_is_num(r.get(c)) for r in rows) and
               all(r.get(c) is None or _is_num(r.get(c)) for r in rows) for c in cols]
    return cells, numeric


def comparison_table(rows: list[dict[str, Any]], columns: list[str] | None = None,
                     floatfmt: str | dict[str, str] = ".3f", thousands: bool = False) -> str:
    """Render ``rows`` as a GitHub Markdown table (numeric columns right-aligned).

    Args:
        rows: one dict per table row; missing keys and NaN give empty cells.
        columns: column order; default: keys in order of first appearance.
        floatfmt: format spec for floats, or ``{column: spec}`` (others get ``.1f`` for seconds,
            columns named ``*_s``, and ``.3f`` otherwise).
        thousands: write ints with thousands separators (``12,345``).

    Returns:
        The table, ending with a newline; ``""`` when there are no rows or columns.
    """
    cols = _columns(rows, columns)
    if not rows or not cols:
        return ""
    cells, numeric = _cells(rows, cols, floatfmt, thousands)

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|").replace("\n", " ") for v in values) + " |"

    rule = "|" + "|".join("---:" if num else "---" for num in numeric) + "|"
    return "\n".join([line(cols), rule, *(line(r) for r in cells)]) + "\n"


def format_console_table(rows: list[dict[str, Any]], columns: list[str] | None = None,
                         floatfmt: str | dict[str, str] = ".3f") -> str:
    """Render ``rows`` as a plain fixed-width text table for a terminal.

    Args:
        rows: one dict per row.
        columns: column order; default: keys in order of first appearance.
        floatfmt: format spec for floats, or ``{column: spec}``.

    Returns:
        Header, a dashed rule and one line per row (numbers right-aligned); ``""`` if empty.
    """
    cols = _columns(rows, columns)
    if not rows or not cols:
        return ""
    cells, numeric = _cells(rows, cols, floatfmt, thousands=True)
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(cols), "  ".join("-" * w for w in widths), *map(line, cells)]) + "\n"


AXIS_LABELS = {
    "val_acc": "validation accuracy (0 to 1)",
    "val_balanced_acc": "validation balanced accuracy (0 to 1)",
    "val_f1": "validation F1 (0 to 1)",
    "val_auroc": "validation AUROC (0 to 1)",
    "val_map": "validation mean average precision, macro (0 to 1)",
    "val_map_micro": "validation mean average precision, micro (0 to 1)",
    "target_acc": "target accuracy (0 to 1)",
    "target_balanced_acc": "balanced target accuracy (0 to 1)",
    "mean_acc": "mean balanced target accuracy (0 to 1)",
    "retain_acc": "kept-task accuracy (0 to 1)",
    "wall_s": "wall time (s)",
    "peak_rss_mb": "peak resident memory (MB)",
    "peak_rss_gb": "peak resident memory (GB)",
    "trainable_params": "trainable parameters",
    "trainable_pct": "trainable parameters (% of the model)",
}
"""Axis labels, with units, of the columns the toolkit and its benchmarks write (see :func:`axis_label`)."""

_UNITS = (("_ms_bs1", "batch-1 latency", "ms"), ("_ms", "", "ms"), ("_s", "", "s"), ("_mb", "", "MB"),
          ("_gb", "", "GB"), ("_pct", "", "%"))


def axis_label(key: str) -> str:
    """A column's axis label with its unit: :data:`AXIS_LABELS`, else read from the name
    (``wall_s`` -> ``wall (s)``, ``size_mb`` -> ``size (MB)``, ``throughput_vs_eager`` ->
    ``throughput / eager (x; 1 = eager)``, ``val_acc/baseline`` -> ``val acc / baseline (x; 1 =
    baseline)``)."""
    if key in AXIS_LABELS:
        return AXIS_LABELS[key]
    if key.endswith("/baseline"):
        return f"{key[:-len('/baseline')].replace('_', ' ')} / baseline (x; 1 = baseline)"
    if "_vs_" in key:
        what, of = key.split("_vs_", 1)
        return f"{what.replace('_', ' ')} / {of.replace('_', ' ')} (x; 1 = {of.replace('_', ' ')})"
    for suffix, name, unit in _UNITS:
        if key.endswith(suffix):
            return f"{name or key[:-len(suffix)].replace('_', ' ')} ({unit})"
    return key.replace("_", " ")


def _short(label: str) -> str:
    """An axis label without its unit, for a panel title."""
    return label.split(" (", 1)[0]


def _ratio(key: str) -> bool:
    return "_vs_" in key or key.endswith("/baseline")


def comparison_figure(rows: list[dict[str, Any]], metric: str = "val_acc",
                      baseline: str | Collection[str] | None = None, label_key: str = "strategy", *,
                      keys: list[str] | None = None, group_key: str | None = None, title: str | None = None,
                      axis_labels: dict[str, str] | None = None,
                      value_label: Callable[[dict[str, Any], str], str] | None = None,
                      ncols: int | None = None) -> Figure:
    """Horizontal bars comparing runs: one panel per column in ``keys``, and per group.

    Args:
        rows: one dict per run.
        metric: the first column drawn (``keys`` default: ``metric``, then ``wall_s`` when present).
        baseline: the ``label_key`` value(s) of the baseline row(s): drawn in orange and named in
            the legend. A ratio column (``*_vs_*``, ``*/baseline``) gets a dashed line at 1.
        label_key: the key naming each bar.
        keys: the columns to draw, one panel each.
        group_key: rows with the same value of this key share a panel, so long lists read as
            small multiples: with one key the groups wrap into up to three columns, each panel titled
            with its group; with several, each group is a row of panels (one column per key) and
            names its row.
        title: the figure's title (default: ``<metric> by <label_key>``).
        axis_labels: axis labels with units per key (default :func:`axis_label`).
        value_label: the text beside a bar, ``f(row, key)`` (default: three decimals for scores
            between 0 and 1, ``2.49x`` for ratios, else three significant digits).
        ncols: the columns of the wrapped groups.
        A ``<key>_std`` value draws an error bar (± 1 std); the value's text sits past its end.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if keys is None:
        keys = [metric] + (["wall_s"] if metric != "wall_s" and any(_is_num(r.get("wall_s")) for r in rows) else [])
    labels = {k: (axis_labels or {}).get(k) or axis_label(k) for k in keys}
    baselines = {baseline} if isinstance(baseline, str) else set(baseline or ())
    groups = list(dict.fromkeys(r.get(group_key) for r in rows)) if group_key else [None]
    members = {g: [r for r in rows if group_key is None or r.get(group_key) == g] for g in groups}
    if len(keys) == 1 and len(groups) > 1:
        ncols = ncols or min(3, len(groups))
        cells = [(g, keys[0], i // ncols, i % ncols) for i, g in enumerate(groups)]
    else:
        ncols = len(keys)
        cells = [(g, k, i, j) for i, g in enumerate(groups) for j, k in enumerate(keys)]
    nrows = max(c[2] for c in cells) + 1
    bars = [max(len(members[c[0]]) for c in cells if c[2] == row) for row in range(nrows)]
    title = title or f"{_short(labels[keys[0]])} by {label_key.replace('_', ' ')}"
    longest = max((len(str(r.get(label_key, ""))) for r in rows), default=8)
    heading = max(len(str(g)) for g in groups) if group_key and len(keys) == 1 else 0
    width = min(12.0, max(ncols * (max(2.6, 0.075 * heading) + 0.065 * longest) + 0.6, 0.1 * len(title)))
    fig = Figure(figsize=(width, 1.3 + sum(0.27 * n + 0.85 for n in bars)), layout="constrained")
    fits = max(16, int((width / ncols - 0.9) / 0.065))  # characters of a 9 pt x label under one panel
    fig.suptitle(title)
    grid = fig.add_gridspec(nrows, ncols, height_ratios=[n + 3 for n in bars])
    first: dict[str, Any] = {}
    spread_drawn = ratio_drawn = False
    scores = {k for k in keys if all(0 <= float(r[k]) <= 1 for r in rows if _is_num(r.get(k)))}
    for group, key, i, j in cells:
        ax = fig.add_subplot(grid[i, j], sharex=first.get(key))
        first.setdefault(key, ax)
        mine = members[group]
        y = np.arange(len(mine))
        vals = np.array([float(r[key]) if _is_num(r.get(key)) else np.nan for r in mine])
        spread = np.array([float(r[f"{key}_std"]) if _is_num(r.get(f"{key}_std")) else 0.0 for r in mine])
        names = [str(r.get(label_key, f"row {n}")) for n, r in enumerate(mine)]
        colors = ["tab:orange" if name in baselines else "tab:blue" for name in names]
        ax.barh(y, np.nan_to_num(vals), color=colors, height=0.7,
                xerr=spread if spread.any() else None, capsize=3, error_kw={"lw": 1})
        spread_drawn |= bool(spread.any())
        for yi, (row, v, s) in enumerate(zip(mine, vals, spread)):
            if np.isnan(v):
                ax.annotate("n/a", (0, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7,
                            color="grey")
                continue
            text = (value_label(row, key) if value_label else f"{v:.3g}x" if _ratio(key) else
                    f"{v:.3f}" if key in scores else f"{v:.3g}")
            end, sign = (v + s, 1) if v >= 0 else (v - s, -1)
            ax.annotate(text, (end, yi), xytext=(3 * sign, 0), textcoords="offset points", va="center",
                        ha="left" if sign > 0 else "right", fontsize=7)
        if _ratio(key):
            ax.axvline(1.0, color="grey", ls="--", lw=1)
            ratio_drawn = True
        ax.set_yticks(y, names, fontsize=8)
        ax.set_ylim(len(mine) - 0.5, -0.5)
        ax.set_xlabel(textwrap.fill(labels[key], fits), fontsize=9)  # side by side, long labels would collide
        if j == 0:  # groups in rows of several keys: the row's group names them
            ax.set_ylabel(str(group) if group_key and len(keys) > 1 else label_key.replace("_", " "), fontsize=9)
        elif len(keys) > 1:  # the same bars as the row's first panel: their names once
            ax.tick_params(labelleft=False)
        if group is None or len(keys) > 1:  # columns of keys: titled once, at the top
            ax.set_title(_short(labels[key]) if i == 0 else "", fontsize=10)
        else:
            ax.set_title(str(group), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    for key, ax in first.items():  # room for the value texts right of the longest bar
        ends = [float(r[key]) + (float(r[f"{key}_std"]) if _is_num(r.get(f"{key}_std")) else 0.0)
                for r in rows if _is_num(r.get(key))]
        lows = [float(r[key]) for r in rows if _is_num(r.get(key))]
        if ends:
            high, low = max(max(ends), 1.0 if _ratio(key) else 0.0), min(min(lows), 0.0)
            ax.set_xlim(low - 0.22 * (high - low) * (low < 0), high + 0.22 * (high - low or 1.0))
    handles = []
    shown = [b for b in dict.fromkeys(str(r.get(label_key)) for r in rows) if b in baselines]
    if shown:
        handles += [Patch(color="tab:orange", label="baseline: " + ", ".join(shown)),
                    Patch(color="tab:blue", label="compared runs")]
    if ratio_drawn:
        handles.append(Line2D([], [], color="grey", ls="--", lw=1, label="1 = the baseline, measured in the same run"))
    if spread_drawn:
        handles.append(Line2D([], [], color="black", marker="|", ms=8, lw=1, label="± 1 std over seeds"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    return fig


def write_rows(rows: list[dict[str, Any]], path: PathLike, columns: list[str] | None = None) -> Path:
    """Write ``rows`` as CSV (``None`` as an empty cell; keys not in ``columns`` left out)."""
    buf = io.StringIO()
    writer = csv_dict_writer(buf, _columns(rows, columns), restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return write_text(path, buf.getvalue())


def _cell(text: str) -> Any:
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_rows(path: PathLike) -> list[dict[str, Any]]:
    """The rows of a CSV written by :func:`write_rows` or :func:`save_comparison`, typed back:
    empty cells are ``None``, ``True``/``False`` booleans, numbers ``int`` or ``float``."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def markdown_page(title: str, intro: str, *sections: str) -> str:
    """A results page: ``# title``, the sentence saying what was measured and how to read it, then
    the sections (tables, lists), blank-line separated, ending with one newline."""
    parts = [f"# {title}", intro.strip(), *(s.strip("\n") for s in sections)]
    return "\n\n".join(p for p in parts if p.strip()) + "\n"


def save_comparison(rows: list[dict[str, Any]], out_dir: PathLike, name: str = "comparison",
                    metric: str = "val_acc", baseline: str | None = None,
                    label_key: str = "strategy", *, title: str | None = None, intro: str | None = None,
                    **figure: Any) -> dict[str, Path]:
    """Write ``<name>.csv``, ``<name>.md`` and ``<name>.png`` comparing runs.

    Args:
        rows: one dict per run, e.g. ``{"strategy": "probe", "val_acc": 0.8, "wall_s": 12}``.
        out_dir: folder for the three files (created if needed).
        name: file stem.
        metric: the metric to chart (and to relate to the baseline).
        baseline: ``label_key`` value of the baseline row; adds a ``<metric>/baseline`` column
            (e.g. ``1.50`` for 0.75 against a 0.5 baseline; empty where undefined) and is marked
            in the chart's legend.
        label_key: key naming each row in the chart and the baseline lookup.
        title: the chart's title and the page's heading.
        intro: the page's first sentence (what was measured, on what, how to read it); the page
            starts with ``# title`` and it when both are given.
        figure: further options of :func:`comparison_figure` (``keys``, ``group_key``, ...).
        A ``<metric>_std`` (or ``wall_s_std``) value in a row draws an error bar.

    Returns:
        ``{"csv": ..., "md": ..., "png": ...}``.

    Raises:
        ValueError: if ``rows`` is empty or ``baseline`` names no row.
    """
    if not rows:
        raise ValueError("save_comparison needs at least one row")
    out_dir, cols, ratio_col = Path(out_dir), _columns(rows, None), f"{metric}/baseline"
    rows_out = [dict(r) for r in rows]
    if baseline is not None:
        base = next((r for r in rows if r.get(label_key) == baseline), None)
        if base is None:
            raise ValueError(f"no row with {label_key}={baseline!r} to use as baseline")
        b = base.get(metric)
        for r in rows_out:
            v = r.get(metric)
            ok = _is_num(v) and _is_num(b) and b != 0 and not math.isnan(v) and not math.isnan(b)
            r[ratio_col] = float(v) / float(b) if ok else None
        cols.insert(cols.index(metric) + 1 if metric in cols else len(cols), ratio_col)

    out = {"csv": write_rows(rows_out, out_dir / f"{name}.csv", cols)}
    table = comparison_table(rows_out, cols, {ratio_col: ".2f"})
    out["md"] = write_text(out_dir / f"{name}.md", markdown_page(title, intro or "", table) if title else table)
    fig = comparison_figure(rows, metric, baseline, label_key, title=title, **figure)
    out["png"] = save_figure(fig, out_dir / f"{name}.png")
    return out
