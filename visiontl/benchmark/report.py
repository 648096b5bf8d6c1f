"""The answer of a bench: ``summary.csv``, ``report.md`` and plots from ``results.csv``.

- **summary**: per (data, backbone, strategy, shots): seeds, mean ± std of the validation score
  and its 95 % interval (Student t over seeds), train score, trainable parameters, wall time,
  peak RSS and checkpoint size. The score is the accuracy, or for multi-label data (several tags
  per image) the macro mean average precision (``metric`` says which: ``val_acc`` / ``val_map``);
  ``val_acc`` and its std are kept beside it;
- **recommendation** per data set and label budget: the best (backbone, strategy), and the cheapest
  (by wall time) whose mean lies inside the best one's interval;
- **flags**: negative transfer (no pretrained strategy beats ``scratch`` beyond the noise), overfitting
  (train accuracy above validation accuracy by more than ``gap``), seed instability (std over
  ``unstable``), and budgets where every strategy is near chance;
- **plots**: the score against labels per data set (one line per strategy, ±1 std band), the score
  against trainable parameters and against wall time (the Pareto front marked);
- the **transferability ranking** (LogME) beside the fine-tuned accuracies, with Kendall's tau.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from visiontl.core import files

__all__ = ["FLAG_THRESHOLDS", "kendall_tau", "labels_figure", "pareto_front", "recommend", "summarise", "t_quantile",
           "write_report"]

FLAG_THRESHOLDS = {"gap": 0.25, "unstable": 0.08, "chance_margin": 0.05}
"""Overfitting: mean train - val accuracy above ``gap``; seed instability: std above ``unstable``;
near chance: mean accuracy within ``chance_margin`` of 1 / classes."""

_T95 = [6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761, 1.753,
        1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697]
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042]


def t_quantile(df: int, q: float = 0.975) -> float:
    """The ``q`` (0.975: two-sided 95 %; 0.95: one-sided 95 %) quantile of Student's t with ``df``
    degrees of freedom."""
    if df < 1:
        return math.nan
    table, limit = {0.975: (_T975, 1.96), 0.95: (_T95, 1.645)}[q]
    return table[df - 1] if df <= len(table) else limit + (table[-1] - limit) * len(table) / df


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def _score(row: dict[str, Any]) -> float | None:
    """A results row's headline: its ``score`` (``val_acc``, or ``val_map`` for multi-label data);
    rows of benches before that column, their ``val_acc``."""
    value = _num(row.get("score"))
    return value if value is not None else _num(row.get("val_acc"))


def _stats(name: str, values: list[float | None]) -> dict[str, float | None]:
    """``name`` and ``name_std``: mean and standard deviation of the values present."""
    present = [v for v in values if v is not None]
    std = statistics.stdev(present) if len(present) > 1 else 0.0 if present else None
    return {name: statistics.mean(present) if present else None, f"{name}_std": std}


def _shots_order(label: str) -> float:
    return math.inf if label == "all" else float(label)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (data, backbone, strategy, shots) over its seeds."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["data"], row["backbone"], row["strategy"], str(row["shots"]))].append(row)
    out = []
    for (data, backbone, strategy, shots), members in groups.items():
        accs = [a for a in (_score(m) for m in members) if a is not None]
        metrics = sorted({m.get("metric") or "val_acc" for m in members})
        n = len(accs)
        mean = statistics.mean(accs) if accs else None
        std = statistics.stdev(accs) if n > 1 else 0.0 if n == 1 else None
        half = t_quantile(n - 1) * std / math.sqrt(n) if n > 1 and std is not None else None
        train = _mean([_num(m.get("train_score") or m.get("train_acc")) for m in members])
        out.append({
            "data": data, "backbone": backbone, "strategy": strategy, "shots": shots, "seeds": n,
            "metric": "/".join(metrics), "score": mean, "score_std": std,  # what ranks and flags use
            "ci95_half": half,  # the interval's half width (t x std / sqrt(seeds)), shown clipped to [0, 1]:
            "ci95_low": max(0.0, mean - half) if half is not None and mean is not None else None,
            "ci95_high": min(1.0, mean + half) if half is not None and mean is not None else None,
            **_stats("val_acc", [_num(m.get("val_acc")) for m in members]),
            "val_map": _mean([_num(m.get("val_map")) for m in members]),
            "val_balanced_acc": _mean([_num(m.get("val_balanced_acc")) for m in members]),
            "val_f1": _mean([_num(m.get("val_f1")) for m in members]),
            "val_auroc": _mean([_num(m.get("val_auroc")) for m in members]),
            "train_acc": _mean([_num(m.get("train_acc")) for m in members]),
            "train_score": train, "train_val_gap": train - mean if train is not None and mean is not None else None,
            "trainable_params": _mean([_num(m.get("trainable_params")) for m in members]),
            "total_params": _mean([_num(m.get("total_params")) for m in members]),
            "wall_s": _mean([_num(m.get("wall_s")) for m in members]),
            "peak_rss_mb": _mean([_num(m.get("peak_rss_mb")) for m in members]),
            "checkpoint_mb": _mean([_num(m.get("checkpoint_mb")) for m in members]),
            "classes": _mean([_num(m.get("classes")) for m in members]),
        })
    out.sort(key=lambda r: (r["data"], _shots_order(r["shots"]), r["backbone"], -(r["score"] or 0)))
    return out


def recommend(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (data, shots): the best line by mean score, and the cheapest (wall time) whose mean
    is inside the best line's 95 % interval (the best itself when nothing cheaper is)."""
    by_budget: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for line in summary:
        if line["score"] is not None:
            by_budget[(line["data"], line["shots"])].append(line)
    out = []
    for (data, shots), lines in sorted(by_budget.items(), key=lambda kv: (kv[0][0], _shots_order(kv[0][1]))):
        best = max(lines, key=lambda r: r["score"])
        floor = best["ci95_low"] if best["ci95_low"] is not None else best["score"]
        within = [r for r in lines if r["score"] >= floor]
        cheapest = min(within, key=lambda r: (r["wall_s"] if r["wall_s"] is not None else math.inf, -r["score"]))
        out.append({"data": data, "shots": shots, "best": f"{best['backbone']} / {best['strategy']}",
                    "best_acc": best["score"], "best_ci95": [best["ci95_low"], best["ci95_high"]],
                    "cheapest_within": f"{cheapest['backbone']} / {cheapest['strategy']}",
                    "cheapest_acc": cheapest["score"], "cheapest_wall_s": cheapest["wall_s"],
                    "best_wall_s": best["wall_s"]})
    return out


def _sgd(strategy_label: str) -> bool:
    from visiontl.strategies import StrategyError, get_strategy

    try:
        return get_strategy(strategy_label.split("(")[0]).sgd
    except StrategyError:
        return True


def _pooled_sd(lines: list[dict[str, Any]]) -> tuple[float, int]:
    """The seed-to-seed standard deviation pooled over ``lines`` (one budget of one data set and
    backbone: the seeds' noise is a property of the data and budget) and its degrees of freedom."""
    ss = sum((r["score_std"] or 0.0) ** 2 * (r["seeds"] - 1) for r in lines if r["seeds"] > 1)
    df = sum(r["seeds"] - 1 for r in lines if r["seeds"] > 1)
    return (math.sqrt(ss / df) if df else 0.0), df


def flags(summary: list[dict[str, Any]], thresholds: dict[str, float] | None = None) -> list[str]:
    """The warnings of the report, one sentence each."""
    t = {**FLAG_THRESHOLDS, **(thresholds or {})}
    out = []
    budgets: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for line in summary:
        budgets[(line["data"], line["backbone"], line["shots"])].append(line)
    for (data, backbone, shots), lines in sorted(budgets.items()):
        scratch = next((r for r in lines if r["strategy"].split("(")[0] == "scratch" and r["score"] is not None),
                       None)
        pretrained = [r for r in lines if r is not scratch and r["score"] is not None]
        if scratch is not None and pretrained:
            # one-sided: is the best pretrained line above scratch by more than the seeds' noise
            # (pooled over the budget's lines, so two or three seeds still give a usable estimate)?
            best = max(pretrained, key=lambda r: r["score"])
            sd, df = _pooled_sd(lines)
            margin = (t_quantile(df, 0.95) * sd * math.sqrt(1 / best["seeds"] + 1 / scratch["seeds"])) if df else 0.0
            if best["score"] - scratch["score"] <= margin:
                out.append(f"negative transfer: {data} / {backbone} at {_budget(shots)}: the best pretrained strategy "
                           f"({best['strategy']}, {best['score']:.3f}) is no better than scratch "
                           f"({scratch['score']:.3f}) beyond the noise ({margin:.3f}).")
    for line in summary:
        where = f"{line['data']} / {line['backbone']} / {line['strategy']} at {_budget(line['shots'])}"
        # a fitted head's training accuracy is ~1 by construction (k-NN, a separable few-shot fit)
        if line["train_val_gap"] is not None and line["train_val_gap"] > t["gap"] and _sgd(line["strategy"]):
            out.append(f"overfitting: {where}: train score {line['train_score']:.3f} is {line['train_val_gap']:.3f} "
                       f"above the validation score (threshold {t['gap']}).")
        if line["score_std"] is not None and line["seeds"] > 1 and line["score_std"] > t["unstable"]:
            out.append(f"seed instability: {where}: std {line['score_std']:.3f} over {line['seeds']} seeds "
                       f"(threshold {t['unstable']}).")
    by_data: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for line in summary:
        by_data[(line["data"], line["shots"])].append(line)
    for (data, shots), lines in sorted(by_data.items()):
        classes = next((r["classes"] for r in lines if r["classes"]), None)
        # chance is 1 / classes for one class per image; a multi-label line's mAP has no such floor
        accs = [r["score"] for r in lines if r["score"] is not None and r["metric"] == "val_acc"]
        if classes and accs and max(accs) <= 1 / classes + t["chance_margin"]:
            out.append(f"near chance: {data} at {_budget(shots)}: every strategy is within {t['chance_margin']} of "
                       f"chance (1/{int(classes)}); more labels, another backbone or a larger image size may help.")
    return out


def _budget(shots: str) -> str:
    return "all labels" if shots == "all" else f"{shots} per class"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost (first, lower is better) and
    accuracy (second, higher is better)."""
    front = []
    for i, (cost, acc) in enumerate(points):
        if not any((c <= cost and a >= acc) and (c < cost or a > acc) for j, (c, a) in enumerate(points) if j != i):
            front.append(i)
    return front


def kendall_tau(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b of two score lists (``None`` for fewer than two pairs or constant input)."""
    n = len(x)
    if n < 2 or n != len(y):
        return None
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx * dy > 0:
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return None if denom == 0 else (concordant - discordant) / denom


def _what(lines: list[dict[str, Any]]) -> str:
    """What the score of ``lines`` is, in words."""
    metrics = {m for r in lines for m in str(r.get("metric") or "val_acc").split("/")}
    return {frozenset({"val_acc"}): "accuracy", frozenset({"val_map"}): "macro mAP"}.get(
        frozenset(metrics), "score (accuracy; macro mAP for multi-label)")


def labels_figure(summary: list[dict[str, Any]], data: list[str] | None = None, title: str | None = None):
    """Accuracy against labelled images per class: one panel per data set (``data``; default every
    set in ``summary``), one line per (backbone,) strategy with a ±1 std band, the legend outside."""
    from matplotlib.figure import Figure

    # summary lines of before the score column (a committed CSV) are read as their accuracy
    summary = [r if "score" in r else {**r, "score": r.get("val_acc"), "score_std": r.get("val_acc_std"),
                                       "metric": "val_acc"} for r in summary]
    sets = data or sorted({r["data"] for r in summary})
    fig = Figure(figsize=(min(12.0, 4.6 * len(sets) + 1.8), 4.4), layout="constrained")
    fig.suptitle(title or f"{', '.join(sets)}: validation {_what(lines)} against labels per class")
    axes = fig.subplots(1, len(sets), squeeze=False, sharey=True)[0]
    lines = [r for r in summary if r["data"] in sets and r["score"] is not None]
    several = len({r["backbone"] for r in lines if "backbone" in r}) > 1
    labels = sorted({(r.get("backbone", ""), r["strategy"]) for r in lines})
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for ax, name in zip(axes, sets):
        mine = [r for r in lines if r["data"] == name]
        shots = sorted({str(r["shots"]) for r in mine}, key=_shots_order)
        for label in labels:
            pts = sorted((r for r in mine if (r.get("backbone", ""), r["strategy"]) == label),
                         key=lambda r: _shots_order(str(r["shots"])))
            if not pts:
                continue
            xs = [shots.index(str(r["shots"])) for r in pts]
            ys = [r["score"] for r in pts]
            sd = [r["score_std"] or 0.0 for r in pts]
            ax.plot(xs, ys, marker="o", color=colors[label], label=f"{label[0]} / {label[1]}" if several else label[1])
            ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.12,
                            color=colors[label])
        ax.set_xticks(range(len(shots)), shots)
        ax.set_xlabel("labelled images per class")
        if len(sets) > 1:
            ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation {_what(lines)} (mean ± std over seeds)")
    handles, names = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:  # a strategy missing from the first set still gets its entry
        for handle, name in zip(*ax.get_legend_handles_labels()):
            if name not in names:
                handles.append(handle)
                names.append(name)
    fig.legend(handles, names, loc="outside right upper", fontsize=8, title="strategy", title_fontsize=8,
               frameon=False)
    return fig


def _figures(summary: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's figures by file stem: accuracy against labels per data set, accuracy against
    trainable parameters and against wall time (the Pareto front of each budget joined)."""
    from matplotlib.figure import Figure

    figures = {}
    for data in sorted({r["data"] for r in summary}):
        figures[f"labels_{data}"] = labels_figure(summary, [data], title=f"{data}: {_what([r for r in summary if r['data'] == data])} against labels")
    for key, xlabel, name, what in (("trainable_params", "trainable parameters", "accuracy_vs_params",
                                     "trainable parameters"),
                                    ("wall_s", "wall time per run (s)", "accuracy_vs_wall", "wall time")):
        points = [r for r in summary if r["score"] is not None and r[key]]
        if not points:
            continue
        fig = Figure(figsize=(7.6, 4.4), layout="constrained")
        fig.suptitle(f"{_what(points).capitalize()} against {what}: the Pareto front of each budget joined")
        ax = fig.subplots()
        for group in sorted({(r["data"], r["shots"]) for r in points}, key=lambda g: (g[0], _shots_order(g[1]))):
            members = [r for r in points if (r["data"], r["shots"]) == group]
            xy = [(float(r[key]), float(r["score"])) for r in members]
            front = set(pareto_front(xy))
            scatter = ax.scatter([p[0] for p in xy], [p[1] for p in xy], s=22, label=f"{group[0]}, {group[1]} shots")
            chosen = sorted((xy[i] for i in front))
            ax.plot([p[0] for p in chosen], [p[1] for p in chosen], color=scatter.get_facecolor()[0], lw=1)
            for i in front:
                ax.annotate(members[i]["strategy"], xy[i], fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"{xlabel} (log scale; lines join the Pareto front)")
        ax.set_ylabel(f"validation {_what(points)} (0 to 1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False, title="data, budget",
                  title_fontsize=7)
        figures[name] = fig
    return figures


def _plots(summary: list[dict[str, Any]], out: Path) -> list[Path]:
    from visiontl.analyse.plots import save_figure

    return [save_figure(fig, out / f"{name}.png") for name, fig in _figures(summary).items()]


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def write_report(rows: list[dict[str, Any]], out: str | os.PathLike[str],
                 transferability: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Write ``summary.csv``, ``report.md`` and the PNGs into ``out``; return their paths."""
    import io

    out = Path(out)
    summary = summarise(rows)
    if not summary:
        raise ValueError("no finished cells to report on")
    columns = list(summary[0])
    buf = io.StringIO()
    writer = files.csv_dict_writer(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in line.items()} for line in summary)
    paths = {"summary": files.write_text(out / "summary.csv", buf.getvalue())}
    pngs = _plots(summary, out)
    md = [f"# Bench report\n\n{len(rows)} runs, {len(summary)} (data, backbone, strategy, shots) lines: validation "
          "score of every line over its seeds (mean, std and 95 % interval; the score is the accuracy, or the macro "
          "mean average precision for multi-label data), all measured by one grid on "
          f"{os.cpu_count()} CPU cores; the recommendation names the best line per data set and label budget and "
          "the cheapest by wall time whose mean lies inside the best one's interval.\n",
          "## Recommendation\n", "| data | shots | best | mean score [95 % CI] | cheapest within its interval | "
          "its score | its wall s vs best's |", "|---|---|---|---|---|---|---|"]
    for rec in recommend(summary):
        low, high = rec["best_ci95"]
        ci = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
        ratio = (f"{rec['cheapest_wall_s']:.0f} vs {rec['best_wall_s']:.0f}"
                 if rec["cheapest_wall_s"] is not None and rec["best_wall_s"] is not None else "")
        md.append(f"| {rec['data']} | {rec['shots']} | {rec['best']} | {rec['best_acc']:.3f}{ci} | "
                  f"{rec['cheapest_within']} | {rec['cheapest_acc']:.3f} | {ratio} |")
    warnings = flags(summary)
    md += ["\n## Flags\n", *(f"- {w}" for w in warnings)] if warnings else ["\n## Flags\n", "None."]
    if transferability:
        md += ["\n## Transferability before fine-tuning\n", _ranking_table(transferability, summary)]
    md += ["\n## Summary\n", "| data | backbone | strategy | shots | seeds | score | ± std | 95 % CI | train score | "
           "trainable | wall s | peak RSS MB | ckpt MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for line in summary:
        ci = (f"[{line['ci95_low']:.3f}, {line['ci95_high']:.3f}]" if line["ci95_low"] is not None else "")
        md.append(f"| {line['data']} | {line['backbone']} | {line['strategy']} | {line['shots']} | {line['seeds']} | "
                  f"{_fmt(line['score'])} | {_fmt(line['score_std'])} | {ci} | {_fmt(line['train_score'])} | "
                  f"{_fmt(line['trainable_params'], ',.0f')} | {_fmt(line['wall_s'], '.1f')} | "
                  f"{_fmt(line['peak_rss_mb'], '.0f')} | {_fmt(line['checkpoint_mb'], '.2f')} |")
    md += ["\n## Plots\n", *(f"![{p.stem}]({p.name})" for p in pngs)]
    paths["report"] = files.write_text(out / "report.md", "\n".join(md) + "\n")
    paths.update({p.stem: p for p in pngs})
    return paths


def _ranking_table(transferability: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
    lines = ["| data | backbone | LogME | H-score (shrinkage) | best fine-tuned score |", "|---|---|---|---|---|"]
    taus = []
    for data in sorted({t["data"] for t in transferability}):
        scored = [t for t in transferability if t["data"] == data]
        best = {}
        for t in scored:
            accs = [r["score"] for r in summary if r["data"] == data and r["backbone"] == t["backbone"]
                    and r["score"] is not None]
            best[t["backbone"]] = max(accs) if accs else None
            lines.append(f"| {data} | {t['backbone']} | {float(t['logme']):.4f} | {_fmt(_num(t['hscore']), '.4f') or 'n/a (multi-label)'} | "
                         f"{_fmt(best[t['backbone']])} |")
        pairs = [(float(t["logme"]), best[t["backbone"]]) for t in scored if best[t["backbone"]] is not None]
        tau = kendall_tau([p[0] for p in pairs], [p[1] for p in pairs])
        taus.append(f"{data}: Kendall tau (LogME vs best fine-tuned score) = "
                    f"{'n/a (fewer than two backbones)' if tau is None else f'{tau:.2f}'}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {t}" for t in taus)
