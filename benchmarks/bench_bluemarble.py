"""The offline `visiontl bench` proof: recipes/bench/bluemarble.yaml, its wall time, and what the
shared feature pass saves.

1. Runs the grid of ``recipes/bench/bluemarble.yaml`` (Blue Marble and shaded relief; probe,
   logreg, knn, partial, full, gradual, scratch; 1 / 5 / 10 / 30 labels per class; 3 seeds; real
   Lite0 weights) with ``run_bench`` and times it (finished cells are skipped on a rerun, so time
   a fresh ``--work``).
2. Runs the frozen-backbone cells again one by one through ``fine_tune``, each with an empty
   feature cache (as a loop of separate runs would), and compares their total wall time with the
   bench's (its feature passes included): the saving of the shared feature pass.

Writes ``benchmarks/results/bench_bluemarble.{csv,md,png}``: the bench's summary, its report
(recommendation, flags, transferability) with the timing lines, and accuracy against labels for
both data sets (``python benchmarks/replot.py bench_bluemarble``: the plot again from the CSV).

    python benchmarks/bench_bluemarble.py                     # the grid (28 min on 2 cores) + ~8 min of timing runs
    python benchmarks/bench_bluemarble.py --quick --out /tmp/b  # a smoke run: one data set, one budget, one seed
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from visiontl.core.recipes import find_recipe  # noqa: E402 - after the offline switch

RECIPE = find_recipe("bench/bluemarble").path
RESULTS = Path(__file__).parent / "results"


def cold_frozen_cells(cells: list[Any], work: Path) -> float:
    """Seconds to run the frozen-backbone ``cells`` one by one, each with an empty feature cache."""
    import dataclasses

    from visiontl.benchmark.grid import build_datamodule
    from visiontl.benchmark.runner import run_cell
    from visiontl.core.quiet import quiet
    from visiontl.strategies import get_strategy

    roots: dict[str, str] = {}  # the tiles stay where they are: only the features are computed again
    for cell in cells:
        if cell.data.name not in roots:
            roots[cell.data.name] = str(build_datamodule(cell.data, num_workers=0).root)
    total = 0.0
    previous = os.environ.get("VISIONTL_CACHE")
    try:
        for cell in cells:
            strategy = get_strategy(cell.strategy)
            if strategy.sgd and not strategy.cache_features:
                continue
            data = dataclasses.replace(cell.data, init_args={**cell.data.init_args, "root": roots[cell.data.name]})
            with tempfile.TemporaryDirectory(dir=work) as cache:
                os.environ["VISIONTL_CACHE"] = cache
                start = time.perf_counter()
                with quiet(verbose=False):
                    run_cell(dataclasses.replace(cell, data=data), work / "cold")
                total += time.perf_counter() - start
    finally:
        if previous is None:
            os.environ.pop("VISIONTL_CACHE", None)
        else:
            os.environ["VISIONTL_CACHE"] = previous
    return total


def plot(summary: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy against labels per class, one panel per data set (the bench report's figure)."""
    from visiontl.analyse.plots import save_figure
    from visiontl.benchmark.report import labels_figure

    seeds = max(int(r["seeds"]) for r in summary)
    n_seeds = f"{seeds} seed" + "s" * (seeds != 1)
    return save_figure(labels_figure(summary, title=f"recipe:bench/bluemarble: validation accuracy against labels "
                                                    f"per class (mean ± std of {n_seeds})"), path)


def replot(results: Path, out: Path) -> list[Path]:
    """``bench_bluemarble.png`` again from ``results/bench_bluemarble.csv``, without training
    (``bench_bluemarble.md`` stays as the run wrote it: the report and timing are not in the CSV)."""
    from visiontl.analyse.plots import read_rows

    return [plot(read_rows(results / "bench_bluemarble.csv"), out / "bench_bluemarble.png")]


def yaml_data() -> list[dict[str, Any]]:
    """The recipe's data entries."""
    import yaml

    return yaml.safe_load(RECIPE.read_text())["data"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-bluemarble"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="smoke run: bluemarble, 1 shot, 1 seed, 3 strategies")
    parser.add_argument("--reuse-size", type=int, default=224,
                        help="also time the frozen-backbone cells of one data set at this image size, shared pass "
                             "against one by one (0: skip; skipped with --quick)")
    args = parser.parse_args()
    from visiontl.benchmark import BenchStore, expand_grid, load_config, run_bench
    from visiontl.benchmark.report import summarise, write_report
    from visiontl.analyse.plots import format_console_table, write_rows

    overrides: dict[str, Any] = {}
    if args.quick:
        overrides = {"data": yaml_data()[:1], "shots": "1", "seeds": 1, "strategies": ["logreg", "knn", "full"],
                     "steps": 5, "image_size": 32}
    config = load_config(RECIPE, **overrides)
    start = time.perf_counter()
    rows = run_bench(config, args.work)
    bench_s = time.perf_counter() - start
    frozen_keys = {c.key() for c in expand_grid(config)
                   if c.strategy in ("probe", "logreg", "knn", "prototype")}
    passes_s = sum(float(s.get("seconds") or 0) for s in BenchStore(args.work).scores())
    frozen_s = sum(float(r["wall_s"]) for r in rows if r["key"] in frozen_keys) + passes_s
    cold_s = cold_frozen_cells(expand_grid(config), args.work)
    summary = summarise(rows)
    report = write_report(rows, args.work, BenchStore(args.work).scores())
    columns = ["data", "strategy", "shots", "seeds", "val_acc", "val_acc_std", "ci95_low", "ci95_high", "train_acc",
               "trainable_params", "wall_s"]
    print(format_console_table(summary, columns))
    paths = {"csv": write_rows(summary, args.out / "bench_bluemarble.csv", columns),
             "md": args.out / "bench_bluemarble.md", "png": plot(summary, args.out / "bench_bluemarble.png")}
    timing = [f"- the whole grid: {len(rows)} cells in {bench_s / 60:.1f} min of wall time in this run "
              f"(cells already in {args.work} are skipped; time a fresh --work).",
              f"- frozen-backbone cells (probe, logreg, knn): {frozen_s:.0f} s in the bench (their rows read one "
              f"shared feature pass per data set, {passes_s:.0f} s of it) against {cold_s:.0f} s run one by one through fine_tune with an "
              f"empty feature cache each: {cold_s / max(frozen_s, 1e-9):.1f}x."]
    if args.reuse_size and not args.quick:  # where extraction costs more than the fits: larger images
        raw = yaml_data()
        reuse = load_config(RECIPE, data=raw[:1], strategies=["probe", "logreg", "knn"], image_size=args.reuse_size)
        work = args.work.with_name(f"{args.work.name}-reuse{args.reuse_size}")
        begin = time.perf_counter()
        shared = run_bench(reuse, work, log=lambda *_: None)
        shared_s = time.perf_counter() - begin
        cold_reuse = cold_frozen_cells(expand_grid(reuse), work)
        timing.append(f"- the same frozen-backbone cells of {raw[0]['name']} at {args.reuse_size} px ({len(shared)} "
                      f"cells): {shared_s:.0f} s with the shared feature pass (this run; finished cells skipped) "
                      f"against {cold_reuse:.0f} s one by one: {cold_reuse / max(shared_s, 1e-9):.1f}x.")
    md = report["report"].read_text().replace("# Bench report", "# Bench: recipe:bench/bluemarble", 1)
    # the report's own plots stay in the bench directory; the committed page shows the committed plot
    md = md.split("\n## Plots")[0].rstrip() + f"\n\n## Plot\n\n![{paths['png'].stem}]({paths['png'].name})\n"
    paths["md"].write_text(md.replace("## Recommendation", "## Timing\n\n" + "\n".join(timing) + "\n\n## Recommendation",
                                      1))
    print("\n".join(timing))
    print("wrote", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
