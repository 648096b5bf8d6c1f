"""``visiontl bench``, ``visiontl bench report`` and ``visiontl rank``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from visiontl.core.errors import CommandParser

__all__ = ["bench_main", "rank_main"]


def _grid_table(cells: list, estimate: dict) -> str:
    from collections import Counter

    from visiontl.analyse.plots import format_console_table

    counts = Counter((c.data.name, c.backbone.label, c.strategy_label) for c in cells)
    rows = [{"data": d, "backbone": b, "strategy": s, "cells": n,
             "est_s": round(estimate.get((d, b, s), 0.0))} for (d, b, s), n in counts.items()]
    return format_console_table(rows, ["data", "backbone", "strategy", "cells", "est_s"])


def bench_main(argv: Sequence[str]) -> int:
    """Run (or resume) a bench; ``report`` as the first argument writes the report of one or more
    bench directories (the shards of one grid)."""
    args = list(argv)
    if args and args[0] == "report":
        return _report_main(args[1:])
    parser = CommandParser(
        prog="visiontl bench", description="Benchmark strategies x backbones x label budgets x seeds on your data; "
        "`visiontl bench report DIR [DIR ...]` merges shards and writes the report.")
    parser.add_argument("--config", help="bench.yaml (data, backbones, strategies, shots, seeds, image_size, steps)")
    parser.add_argument("--out", required=True, help="bench directory: results.csv, summary.csv, report.md, PNGs")
    parser.add_argument("--shard", help="i/n: run the i-th (from 0) of n slices of the grid")
    parser.add_argument("--launcher", choices=["local", "ray"], default="local")
    parser.add_argument("--data", nargs="+", help="folders or CSVs (override the file's data:)")
    parser.add_argument("--backbones", nargs="+", help="NAME or NAME=WEIGHTS (a file, named source, hub or random)")
    parser.add_argument("--strategies", nargs="+", help="strategy names")
    parser.add_argument("--shots", help="images per class, e.g. 1,5,10,all")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--steps", type=int, help="steps of every cell (default: the step rule)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--devices", type=int, default=1,
                        help="devices (processes) per cell: above 1, each cell trains under DDP (ddp_spawn) with "
                             "its batch split over the devices (the global batch and steps stay the cell's)")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator of the cells: auto, cpu, gpu")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the grid (data, weights, budgets), show it and its estimate, run nothing")
    parser.add_argument("--max-cells", type=int, default=None,
                        help="cells (of this shard) above which the run asks for --yes (default: 10000)")
    parser.add_argument("--max-hours", type=float, default=None,
                        help="estimated hours (of this shard, on this machine) above which the run asks for --yes "
                             "(default: 24)")
    parser.add_argument("--yes", action="store_true", help="run a grid above --max-cells or --max-hours")
    parser.add_argument("--verbose", action="store_true",
                        help="Lightning's information lines for every cell (default: one line per cell)")
    ns = parser.parse_args(args)
    from visiontl.benchmark.config import BenchError, load_config
    from visiontl.benchmark.grid import (
        MAX_CELLS,
        MAX_HOURS,
        check_budgets,
        check_weights,
        expand_grid,
        grid_size,
        over_limit,
        parse_shard,
        shard_cells,
        step_budget,
    )
    from visiontl.benchmark.runner import estimate_seconds, run_bench

    max_cells = MAX_CELLS if ns.max_cells is None else ns.max_cells
    max_hours = MAX_HOURS if ns.max_hours is None else ns.max_hours
    if max_cells < 1 or not max_hours > 0:
        raise BenchError(f"--max-cells must be >= 1 and --max-hours > 0 (got {max_cells}, {max_hours:g}).")
    config = load_config(ns.config, data=ns.data, backbones=ns.backbones, strategies=ns.strategies,
                         shots=ns.shots, seeds=ns.seeds, image_size=ns.image_size, steps=ns.steps,
                         batch_size=ns.batch_size)
    shard = parse_shard(ns.shard)
    check_weights(config)  # a weights file that does not load fails here, not at its first cell
    check_budgets(config)
    n_cells = grid_size(config, shard)
    if n_cells > max_cells and not ns.yes:  # not built cell by cell: estimated from one seed of it
        one_seed = expand_grid(replace(config, seeds=1))
        total = sum(estimate_seconds(one_seed).values()) * n_cells / max(1, len(one_seed))
    else:
        cells = shard_cells(expand_grid(config), shard)
        estimate = estimate_seconds(cells)
        print(_grid_table(cells, estimate))
        total = sum(estimate.values())
    print(f"{n_cells:,} cells in shard {shard[0]}/{shard[1]}; step budget: {step_budget(config)}; estimated "
          f"{total / 60:.0f} min on this machine (finished cells are skipped)")
    too_big = over_limit(n_cells, total, max_cells, max_hours)
    if too_big and ns.dry_run:
        print(f"warning: this grid has {too_big}; a run asks for --yes (or shard it with --shard i/n, or give "
              f"fewer shots, seeds, strategies or backbones)", file=sys.stderr)
    if ns.dry_run:
        return 0
    if too_big and not ns.yes:
        raise BenchError(f"this grid has {too_big}; nothing was run. Pass --yes to run it anyway, or shard it "
                         f"with --shard i/n, or give fewer shots, seeds, strategies or backbones.")
    rows = run_bench(config, ns.out, shard=shard, launcher=ns.launcher, devices=ns.devices,
                     accelerator=ns.accelerator, verbose=ns.verbose)  # one line per cell; data warnings still show
    if shard[1] == 1:
        from visiontl.benchmark.report import write_report
        from visiontl.benchmark.store import BenchStore

        paths = write_report(rows, ns.out, BenchStore(ns.out).scores())
        print(f"report: {paths['report']}")
    else:
        print(f"shard done; when every shard is: visiontl bench report {ns.out}")
    return 0


def _report_main(argv: Sequence[str]) -> int:
    parser = CommandParser(prog="visiontl bench report",
                           description="Merge the results of bench directories (shards of one grid) and "
                                       "write summary.csv, report.md and the plots.")
    parser.add_argument("dirs", nargs="+", help="bench directories of one grid")
    parser.add_argument("--out", help="where the report goes (default: the first directory)")
    parser.add_argument("--partial", action="store_true", help="report even when cells of the grid are missing")
    ns = parser.parse_args(list(argv))
    from visiontl.benchmark.config import BenchError
    from visiontl.benchmark.merge import merge_shards
    from visiontl.benchmark.report import write_report

    rows, scores, missing = merge_shards([Path(d) for d in ns.dirs])
    if missing and not ns.partial:
        raise BenchError(f"{len(missing)} cell(s) of the grid have no result yet (e.g. {missing[0]}); run the "
                         f"missing shards, or pass --partial to report on what is there.")
    paths = write_report(rows, ns.out or ns.dirs[0], scores)
    print(f"{len(rows)} runs; report: {paths['report']}")
    return 0


def rank_main(argv: Sequence[str]) -> int:
    """Rank backbones by the transferability of their frozen features to the labels of ``DATA``."""
    parser = CommandParser(
        prog="visiontl rank", description="Rank backbones for your data before any fine-tuning: LogME (and a "
        "shrinkage H-score) of each one's frozen features on your training labels.")
    parser.add_argument("data", help="a class-per-folder directory or a CSV")
    parser.add_argument("--backbone", action="append", required=True, help="NAME[=WEIGHTS|random] (repeatable)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--out", default="runs/rank", help="folder for rank.csv and the feature runs")
    ns = parser.parse_args(list(argv))
    from visiontl.benchmark.rank import rank_backbones
    from visiontl.analyse.plots import format_console_table

    rows, path = rank_backbones(ns.data, ns.backbone, image_size=ns.image_size, out=ns.out)
    print(format_console_table(rows, ["rank", "backbone", "logme", "hscore", "images"]))
    print(f"wrote {path}")
    return 0
