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
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from visiontl.core.files import atomic_path, csv_dict_writer, csv_writer, write_text

__all__ = ["save_confusion_matrix", "save_learning_curves", "save_drift", "comparison_table",
           "format_console_table", "save_comparison", "thumbnail_png"]

PathLike = str | os.PathLike[str]
VAL_METRICS = ("val_acc", "val_f1", "val_auroc", "val_balanced_acc")


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
        title: figure title.

    Returns:
        ``{"png": path}`` plus ``"csv"`` when written.

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
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="recall" if normalize else "count")
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
    ax.set(xlabel="predicted", ylabel="true", title=title)
    out = {"png": save_figure(fig, path_png, dpi=150 if n > 25 else 120)}
    if path_csv is not None:
        buf = io.StringIO()
        writer = csv_writer(buf, lineterminator="\n")
        writer.writerow(["true\\pred", *class_names])
        writer.writerows([name, *row] for name, row in zip(class_names, counts.tolist()))
        out["csv"] = write_text(path_csv, buf.getvalue())
    return out


def _series(df: pd.DataFrame, col: str, x: str) -> pd.Series:
    """Mean of ``col`` per value of ``x`` over the rows where ``col`` is logged (NaNs dropped)."""
    sub = df.dropna(subset=[col])
    return sub.groupby(x)[col].mean() if x in sub else sub[col].reset_index(drop=True)


def save_learning_curves(metrics_csv: PathLike, path_png: PathLike) -> Path | None:
    """Plot a Lightning ``CSVLogger`` ``metrics.csv``: losses, validation metrics, learning rates.

    Panels appear only for data that exist: train/val loss per epoch (train from
    ``train_loss_epoch``, else ``train_loss``, else the epoch mean of ``train_loss_step``),
    ``val_acc``/``val_f1``/``val_auroc``/``val_balanced_acc`` per epoch, and every ``lr-*``
    column against ``step`` on a log scale.

    Args:
        metrics_csv: the CSV file; rows are sparse (one per logging call), NaNs are skipped.
        path_png: destination of the figure.

    Returns:
        The PNG path, or None (nothing written) if the file is missing, empty or unplottable.
    """
    try:
        df = pd.read_csv(metrics_csv)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return None
    logged = {str(c) for c in df.columns if df[c].notna().any()}
    train = [c for c in ("train_loss_epoch", "train_loss", "train_loss_step") if c in logged][:1]
    losses = {c: _series(df, c, "epoch") for c in train + ["val_loss"] if c in logged}
    metrics = {c: _series(df, c, "epoch") for c in VAL_METRICS if c in logged}
    lrs = {c[3:]: _series(df, c, "step") for c in sorted(logged) if c.startswith("lr-")}
    panels = [("loss", "epoch", losses, False), ("validation metrics", "epoch", metrics, False),
              ("learning rate", "step", lrs, all((s > 0).all() for s in lrs.values()))]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None

    fig = Figure(figsize=(5.2 * len(panels), 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, xlabel, series, log) in zip(axes, panels):
        for label, s in series.items():
            ax.plot(s.index, s.to_numpy(), marker="o" if len(s) <= 30 else None, ms=4, label=label)
        if log:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=title, xlabel=xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path_png)


def save_drift(drift: dict[str, Any], path_png: PathLike) -> Path | None:
    """Plot a run's drift report (:mod:`visiontl.analyse.forgetting`): each layer group's L2 distance from
    the pretrained weights relative to their norm, with CKA, ImageNet agreement and retention in
    the title. Returns None (nothing written) when no group moved or has pretrained weights."""
    groups = [g for g in drift.get("groups", []) if g.get("relative") is not None]
    if not groups:
        return None
    fig = Figure(figsize=(max(4.5, 0.55 * len(groups) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(groups)), [g["relative"] for g in groups], color="tab:orange")
    ax.set_xticks(range(len(groups)), [g["group"] for g in groups], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("||w - w_pretrained|| / ||w_pretrained||")
    parts = [f"{label} {drift[key]:.3f}" for key, label in (("cka_val", "CKA"), ("imagenet_agreement",
             "ImageNet agreement"), ("retain_acc_after", "retained acc")) if drift.get(key) is not None]
    ax.set_title("weight drift per layer group" + (f"\n{', '.join(parts)}" if parts else ""), fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path_png)


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


def _cells(rows: list[dict[str, Any]], cols: list[str], floatfmt: str | dict[str, str],
           thousands: bool) -> tuple[list[list[str]], list[bool]]:
    """Formatted cells and, per column, whether it is numeric (for right alignment)."""
    fmts = {c: floatfmt.get(c, ".3f") if isinstance(floatfmt, dict) else floatfmt for c in cols}
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
        floatfmt: format spec for floats, or ``{column: spec}`` (others get ``.3f``).
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


def save_comparison(rows: list[dict[str, Any]], out_dir: PathLike, name: str = "comparison",
                    metric: str = "val_acc", baseline: str | None = None,
                    label_key: str = "strategy") -> dict[str, Path]:
    """Write ``<name>.csv``, ``<name>.md`` and ``<name>.png`` comparing runs.

    Args:
        rows: one dict per run, e.g. ``{"strategy": "probe", "val_acc": 0.8, "wall_s": 12}``.
        out_dir: folder for the three files (created if needed).
        name: file stem.
        metric: the metric to chart (and to relate to the baseline).
        baseline: ``label_key`` value of the baseline row; adds a ``<metric>/baseline`` column
            (e.g. ``1.50`` for 0.75 against a 0.5 baseline; empty where undefined).
        label_key: key naming each row in the chart and the baseline lookup.
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

    buf = io.StringIO()
    writer = csv_dict_writer(buf, cols, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows_out)
    out = {"csv": write_text(out_dir / f"{name}.csv", buf.getvalue())}
    fmts = {c: ".2f" if c == ratio_col else ".3f" for c in cols}
    out["md"] = write_text(out_dir / f"{name}.md", comparison_table(rows_out, cols, fmts))

    labels = [str(r.get(label_key, f"row {i}")) for i, r in enumerate(rows)]
    keys = [metric] + (["wall_s"] if any(_is_num(r.get("wall_s")) for r in rows) else [])
    fig = Figure(figsize=(4.8 * len(keys), 1.2 + 0.45 * len(rows)), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False, sharey=True)[0]
    y = np.arange(len(rows))
    for ax, key in zip(axes, keys):
        vals = np.array([float(r[key]) if _is_num(r.get(key)) else np.nan for r in rows])
        spread = np.array([float(r[f"{key}_std"]) if _is_num(r.get(f"{key}_std")) else 0.0 for r in rows])
        colors = ["tab:orange" if lab == baseline else "tab:blue" for lab in labels]
        ax.barh(y, np.nan_to_num(vals), color=colors, xerr=spread if spread.any() else None, capsize=3)
        for yi, v in zip(y, vals):
            if not np.isnan(v):
                ax.text(v, yi, f" {v:.3g}", va="center", fontsize=8)
        ax.set_title(key)
        ax.margins(x=0.15)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    out["png"] = save_figure(fig, out_dir / f"{name}.png")
    return out
