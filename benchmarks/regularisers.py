"""Do Mixup, CutMix or an EMA of the weights help the default on small data? Measured before any default changes.

Every cell is the defaults benchmark's ``fine_tune`` run (``benchmarks/defaults.py``: the default
strategy ``gradual``, its default steps, batch size and preprocessing, the real ImageNet
EfficientNet-Lite0 weights at 64 px, the same sets drawn the same way) with one training option
added through ``task_kwargs``:

- ``default``: no option (the baseline, measured in the same run);
- ``mixup``: ``mixup=0.2`` (timm's ``Mixup``, Beta(0.2, 0.2) blending of image pairs and labels);
- ``cutmix``: ``cutmix=1.0`` (a box of one image pasted into another, labels by area);
- ``ema``: ``ema=0.99`` (timm's ``ModelEmaV3``; validation and the checkpoint use the average).
  The small sets train for a few hundred steps, so the usual 0.999 (an average over about a
  thousand steps) would keep mostly the starting weights; 0.99 averages about the last hundred.

3 seeds per set (they draw the digits / Fashion-MNIST training images and seed training).
Reported per set and option: best validation accuracy (mean, std, worst seed) and its ratio to
``default`` of the same set and seeds. A default changes only where an option is better on
every set. Cells go to ``<work>/cells.jsonl`` and are skipped when present (an interrupted run
resumes). Results: ``benchmarks/results/regularisers.{csv,md,png}``.

    python benchmarks/regularisers.py                        # everything
    python benchmarks/regularisers.py --sets digits-8px --seeds 1 --options default ema
    python benchmarks/regularisers.py --summarise-only          # the page from the cells already run
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import statistics
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).parent
RESULTS = HERE / "results"
OPTIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "mixup": {"mixup": 0.2},
    "cutmix": {"cutmix": 1.0},
    "ema": {"ema": 0.99},
}
COLUMNS = ["cell", "seeds", "val_acc", "val_acc_std", "vs_default", "min_acc"]


def _defaults() -> Any:
    """``benchmarks/defaults.py`` (the sets and the cell), loaded by path: the scripts are not a package."""
    spec = importlib.util.spec_from_file_location("benchmarks.defaults", HERE / "defaults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summarise(cells: list[dict[str, Any]], sets: list[str], options: list[str]) -> list[dict[str, Any]]:
    """Mean / std / worst seed per set and option, and the ratio to ``default`` over the same seeds."""
    rows = []
    for name in sets:
        base = {c["seed"]: c["val_acc"] for c in cells if c["set"] == name and c["option"] == "default"}
        for option in options:
            done = [c for c in cells if c["set"] == name and c["option"] == option]
            if not done:
                continue
            accs = [c["val_acc"] for c in done]
            paired = [c["seed"] for c in done if c["seed"] in base]
            ratio = (statistics.mean(next(c["val_acc"] for c in done if c["seed"] == s) for s in paired)
                     / statistics.mean(base[s] for s in paired)) if paired else None
            rows.append({"cell": f"{name} / {option}", "set": name, "option": option, "seeds": len(done),
                         "val_acc": statistics.mean(accs),
                         "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         "vs_default": ratio, "min_acc": min(accs)})
    return rows


def publish(rows: list[dict[str, Any]], out: Path, *, machine: str) -> list[Path]:
    """``regularisers.md`` and ``regularisers.png`` from the summary rows (or ``regularisers.csv``'s)."""
    from visiontl.analyse.plots import comparison_figure, comparison_table, markdown_page, save_figure
    from visiontl.core.files import write_text

    rows = [{**r, "set": r["cell"].split(" / ")[0], "option": r["cell"].split(" / ")[1]} for r in rows]
    sets = list(dict.fromkeys(r["set"] for r in rows))
    seeds = max(r["seeds"] for r in rows)
    n_seeds = f"{seeds} seed" + "s" * (seeds != 1)
    intro = ("Best validation accuracy (mean and std over up to " + n_seeds + ", as the `seeds` column says, and "
             "the worst seed) of the default "
             "`fine_tune` (`gradual`, its default steps and preprocessing, real ImageNet EfficientNet-Lite0 weights "
             f"at 64 px) on {len(sets)} small offline sets ({', '.join(sets)}), with one training option added: "
             "`mixup=0.2`, `cutmix=1.0` or `ema=0.99`; `vs_default` is the ratio to the run without the option "
             f"on the same set and seeds, measured in the same run, so below 1 means the option hurt; {machine}.")
    md = markdown_page("Mixup, CutMix and weight EMA against the default on small data", intro,
                       "![regularisers](regularisers.png)", comparison_table(rows, COLUMNS))
    fig = comparison_figure(rows, "val_acc", baseline="default", label_key="option", keys=["val_acc"],
                            group_key="set", title=f"Training options on the default fine_tune: validation "
                                                   f"accuracy per set (mean of up to {n_seeds})")
    return [write_text(out / "regularisers.md", md), save_figure(fig, out / "regularisers.png")]


def replot(results: Path, out: Path, *, machine: str = "2 CPU cores") -> list[Path]:
    """``regularisers.md`` and ``.png`` again from ``results/regularisers.csv``, without training."""
    from visiontl.analyse.plots import read_rows

    return publish(read_rows(results / "regularisers.csv"), out, machine=machine)


def main() -> None:
    defaults = _defaults()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(defaults.SETS), choices=defaults.SETS)
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-regularisers"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--summarise-only", action="store_true", help="tabulate the cells already in --work")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from visiontl.analyse.plots import format_console_table, write_rows
    from visiontl.benchmark.celllog import CellLog
    from visiontl.data.lowres import FASHION_MNIST_DIR

    sets = [s for s in args.sets if s != "fashion-12px" or FASHION_MNIST_DIR.is_dir()]
    args.work.mkdir(parents=True, exist_ok=True)
    log = CellLog(args.work / "cells.jsonl")
    for seed in range(0 if args.summarise_only else args.seeds):
        for name in sets:
            for option in args.options:
                if not log.has(set=name, option=option, seed=seed):
                    log.add({**defaults.cell(name, "gradual", seed, args.work, task_kwargs=OPTIONS[option],
                                             label=option), "option": option})
    rows = summarise(log.cells, sets, args.options)
    print(format_console_table(rows, COLUMNS))
    paths = [write_rows(rows, args.out / "regularisers.csv", COLUMNS),
             *publish(rows, args.out, machine=f"{os.cpu_count()} CPU cores")]
    print("wrote", ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
