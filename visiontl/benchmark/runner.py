"""Running the cells of a bench: one ``fine_tune`` each, one row each, resumable.

Cells that share a frozen backbone (``probe``, ``logreg``, ``knn``, ``prototype``) read pooled
features from the feature cache. Before the first of them on a data set and backbone, one feature
pass over the *whole* training and validation splits fills the cache; every label budget and seed
then takes its rows from it (:func:`visiontl.models.features.split_features`), so a grid of fitted heads
costs about one pass over the images.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from visiontl.benchmark.config import BenchConfig, BenchError
from visiontl.benchmark.grid import (
    Cell,
    build_datamodule,
    cell_steps,
    check_budgets,
    check_weights,
    expand_grid,
    shard_cells,
    step_budget,
    weights_hash,
)
from visiontl.benchmark.store import BenchStore

__all__ = ["PeakRSS", "frozen_features", "run_bench", "run_cell", "score_transferability"]

QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
VALIDATIONS = 20
"""About how many times a cell is validated (and can save its best checkpoint) during its steps."""


class PeakRSS:
    """The largest resident set size of this process while the ``with`` block runs (MB), sampled
    every 20 ms from ``/proc/self/statm`` (elsewhere: the process's peak so far, from ``getrusage``)."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.every_s = every_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _now(self) -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page / 1e6
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_mb = max(self.peak_mb, self._now())

    def __enter__(self) -> PeakRSS:
        self.peak_mb = self._now()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._now())


def _weights_args(cell: Cell) -> dict[str, Any]:
    weights = cell.backbone.weights
    if weights == "random":
        return {"pretrained": False, "weights": None}
    if weights == "hub":
        return {"pretrained": True, "weights": None}
    return {"pretrained": False, "weights": weights}


def _data_args(cell: Cell, shots: Any = "cell") -> dict[str, Any]:
    # the cell's seed drives the training randomness (data order, augmentation, the head's init) and
    # the label subset; the validation split and a built-in set's draw stay the data spec's (seed 0)
    given = cell.data.init_args
    args: dict[str, Any] = {"seed": cell.seed, "split_seed": int(given.get("split_seed", given.get("seed", 0))),
                            "num_workers": int(given.get("num_workers", 0))}
    if shots == "cell":
        args.update(shots=cell.shots, shots_seed=cell.seed)
    if cell.image_size is not None:
        args["image_size"] = cell.image_size
    if cell.batch_size is not None:
        args["batch_size"] = cell.batch_size
    return args


def _run_name(cell: Cell) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in cell.strategy_label)
    return f"{cell.data.name}/{cell.backbone.name}/{safe}/shots-{cell.shots_label}/seed-{cell.seed}"


def _train_score(task: Any, dm: Any, limit: int = 1000) -> float | None:
    """The trained model's score on (up to ``limit``) training images, evaluation transform: accuracy,
    or for a multi-label task macro mean average precision (the measure of its ``score`` column)."""
    import torch
    from torchmetrics.functional.classification import multilabel_average_precision

    from visiontl.tasks.protocols import PredictsTags

    source = dm.feature_source("train")
    n = min(len(source), limit)
    if n == 0:
        return None
    outputs, labels = [], []
    task.eval()
    with torch.no_grad():
        for start in range(0, n, 64):
            batch = [source[i] for i in range(start, min(n, start + 64))]
            outputs.append(task(torch.stack([b["image"] for b in batch])).float())
            labels.append(torch.stack([torch.as_tensor(b["label"]) for b in batch]))
    logits, y = torch.cat(outputs), torch.cat(labels)
    if isinstance(task, PredictsTags) and task.multilabel:
        return float(multilabel_average_precision(logits.sigmoid(), y.long(), y.shape[1], average="macro",
                                                  ignore_index=-1))
    return float((logits.argmax(1) == y).float().mean())


def run_cell(cell: Cell, out: str | os.PathLike[str], devices: int = 1, accelerator: str = "auto") -> dict[str, Any]:
    """Train one cell with ``fine_tune`` and return its results row.

    ``devices`` > 1 trains the cell with Lightning's ``ddp_spawn``: one process per device, started
    for this cell, which hand the trained weights and metrics back to this one (the launched ``ddp``
    would start every rank at the top of the whole bench); ``batch_size`` is then per device, so the
    global batch and the step budget stay the cell's.
    """
    import timm
    import torch

    from visiontl import __version__, fine_tune
    from visiontl.data.base import auto_batch_size
    from visiontl.data.protocols import TaggedData

    dm = build_datamodule(cell.data, **_data_args(cell))
    multilabel = isinstance(dm, TaggedData) and dm.multilabel
    n_train = len(dm.splits["train"])
    batch = dm.batch_size or auto_batch_size(n_train)
    steps = cell_steps(cell, n_train, batch)
    # a 1-shot cell has a one-batch epoch: validating after each of its hundreds of epochs would cost
    # far more than training, so every cell validates about VALIDATIONS times, whatever its budget
    epochs = steps / max(1, math.ceil(n_train / batch))
    every = max(1, math.floor(epochs / VALIDATIONS))
    trainer_kwargs: dict[str, Any] = {**QUIET, "check_val_every_n_epoch": every}
    if devices > 1:
        if batch % devices:
            raise BenchError(f"cell {cell.key()}: batch size {batch} does not split over {devices} devices; give "
                             f"--batch-size a multiple of {devices}.")
        dm.batch_size = batch // devices
        trainer_kwargs.update(devices=devices, strategy="ddp_spawn", accelerator=accelerator)
    start = time.perf_counter()
    with PeakRSS() as rss:
        result = fine_tune(dm, backbone=cell.backbone.name, strategy=cell.strategy, steps=steps, seed=cell.seed,
                           out=Path(out) / "runs", name=_run_name(cell), image_size=cell.image_size,
                           trainer_kwargs=trainer_kwargs,
                           task_kwargs={"measure_drift": False},  # the grid compares accuracy; drift costs passes
                           verbose=True,  # what shows is decided by run_bench's quiet(verbose) around the cell
                           **_weights_args(cell))
        train_score = _train_score(result.task, result.datamodule)
    wall = time.perf_counter() - start
    report = result.task.strategy_report()
    delta = result.run_dir / "checkpoints" / "best.peft.safetensors"
    weights_bytes = sum(t.numel() * t.element_size() for t in result.task.model.state_dict().values())
    metrics = result.metrics
    return {
        "key": cell.key(), "data": cell.data.name, "backbone": cell.backbone.label, "weights": cell.backbone.weights,
        "weights_sha256": weights_hash(cell.backbone.weights), "strategy": cell.strategy_label,
        "strategy_config": json.dumps(report["strategy"], sort_keys=True), "shots": cell.shots_label,
        "seed": cell.seed, "classes": dm.num_classes, "train_images": n_train, "steps": steps,
        **{k: metrics.get(k) for k in ("val_acc", "val_balanced_acc", "val_f1", "val_auroc", "val_map")},
        "metric": "val_map" if multilabel else "val_acc",  # the headline the report ranks by
        "score": metrics.get("val_map" if multilabel else "val_acc"),
        "train_acc": None if multilabel else train_score, "train_score": train_score,
        "trainable_params": report["trainable_params"],
        "total_params": report["total_params"], "wall_s": round(wall, 2), "peak_rss_mb": round(rss.peak_mb, 1),
        "checkpoint_mb": round((delta.stat().st_size if delta.exists() else weights_bytes) / 1e6, 3),
        "run_dir": str(result.run_dir), "visiontl_version": __version__, "torch_version": torch.__version__,
        "timm_version": timm.__version__,
    }


def frozen_features(cell: Cell, out: str | os.PathLike[str]) -> tuple[Any, Any]:
    """The frozen backbone's pooled features of the whole training split (and labels), through the
    feature cache, which then also holds the validation split's: every frozen-backbone cell of this
    data set and backbone reads its rows from there. (The ``prototype`` head is fitted on them in
    passing: it costs nothing more.)"""
    from visiontl import fine_tune
    from visiontl.data.protocols import TaggedData

    dm = build_datamodule(cell.data, **_data_args(cell, shots=None))
    # prototype scores one class per image; multi-label data gets the one-vs-rest logreg head instead
    head = "logreg" if isinstance(dm, TaggedData) and dm.multilabel else "prototype"
    result = fine_tune(dm, backbone=cell.backbone.name, strategy=head, steps=1, seed=0, out=Path(out) / "runs",
                       name=f"{cell.data.name}/{cell.backbone.name}/_features", image_size=cell.image_size,
                       trainer_kwargs={**QUIET, "enable_checkpointing": False},  # a run dir under out/runs
                       verbose=True,  # run_bench's quiet(verbose) decides what shows
                       **_weights_args(cell))
    train = result.datamodule.datasets["train"]
    return train.features, train.labels


def score_transferability(cell: Cell, out: str | os.PathLike[str]) -> dict[str, Any]:
    """LogME and the shrinkage H-score of the frozen backbone's features on the whole training split
    (multi-label data: LogME per tag; the H-score, defined for one class per image, is ``None``)."""
    from visiontl.analyse.transferability import MultiLabelScoreError, logme, shrinkage_hscore

    start = time.perf_counter()
    features, labels = frozen_features(cell, out)
    try:
        hscore = shrinkage_hscore(features, labels)
    except MultiLabelScoreError:
        hscore = None
    scores = {"logme": logme(features, labels), "hscore": hscore}
    return {"data": cell.data.name, "backbone": cell.backbone.label, "weights": cell.backbone.weights,
            "images": len(labels), **scores, "seconds": round(time.perf_counter() - start, 2)}


def run_bench(config: BenchConfig, out: str | os.PathLike[str], shard: tuple[int, int] = (0, 1),
              launcher: str = "local", log: Any = print, devices: int = 1,
              accelerator: str = "auto", verbose: bool = False) -> list[dict[str, Any]]:
    """Run every unfinished cell of ``config``'s grid in ``shard`` and return all rows of ``out``.

    Args:
        config: the grid.
        out: the bench directory (``results.csv``, ``grid.json``, ``runs/``).
        shard: ``(i, n)``: run the i-th of n slices of the grid (:func:`~visiontl.benchmark.grid.shard_cells`).
        launcher: ``local`` (one cell after another in this process) or ``ray`` (cells as Ray tasks,
            on a running Ray cluster or a local one; ``pip install ray``).
        log: where progress lines go.
        devices: processes (devices) per cell, under DDP when more than one (see :func:`run_cell`).
        accelerator: Lightning's accelerator for the cells (``auto``, ``cpu``, ``gpu``).
        verbose: Lightning's information lines for every cell; by default the cells (and the
            feature passes) run under :func:`visiontl.core.quiet.quiet` with ``verbose=False``, which
            filters what every quiet command filters: warnings about the data still show.
    """
    from visiontl.core.quiet import quiet  # here: the bench's --help imports this module, and must not import Lightning

    out = Path(out)
    if devices < 1 or (devices > 1 and launcher != "local"):
        raise BenchError(f"devices must be >= 1 and, above 1, run with the local launcher (got {devices} with "
                         f"{launcher!r}): each cell then spawns its own DDP processes.")
    check_weights(config)
    check_budgets(config)
    store = BenchStore(out)
    store.claim(config.to_dict())
    cells = shard_cells(expand_grid(config), shard)
    keys = {id(c): c.key() for c in cells}
    done = store.done()
    todo = [c for c in cells if keys[id(c)] not in done]
    log(f"[visiontl bench] shard {shard[0]}/{shard[1]}: {len(cells)} cells, {len(cells) - len(todo)} already done, "
        f"{len(todo)} to run; step budget: {step_budget(config)}")
    if launcher not in ("local", "ray"):
        raise BenchError(f"launcher must be 'local' or 'ray', got {launcher!r}.")
    scored = {(s["data"], s["backbone"]) for s in store.scores()}

    def feature_pass(cell: Cell) -> None:
        pair = (cell.data.name, cell.backbone.label)
        if pair not in scored:
            log(f"[visiontl bench] one feature pass for {pair[0]} / {pair[1]}: transferability scores, and the "
                f"features every frozen-backbone cell reads")
            with quiet(verbose):
                store.add_score(score_transferability(cell, out))
            scored.add(pair)

    def done(n: int, row: dict[str, Any]) -> None:
        metric = row.get("metric") or "val_acc"
        log(f"[visiontl bench] {n}/{len(todo)} {row['data']} / {row['backbone']} / {row['strategy']} / "
            f"shots {row['shots']} / seed {row['seed']}: {metric} {float(row.get('score', row.get(metric))):.3f} "
            f"({float(row['wall_s']):.0f} s)")

    if launcher == "ray" and todo:
        for cell in todo:  # here, before any task starts: the tasks then read the cached features
            feature_pass(cell)
        _run_ray(todo, out, done, verbose)
        return store.rows()
    for n, cell in enumerate(todo, 1):
        feature_pass(cell)
        with quiet(verbose):
            row = run_cell(cell, out, devices=devices, accelerator=accelerator)
        store.append(row)
        done(n, row)
    return store.rows()


def _run_ray(cells: list[Cell], out: Path, done: Any, verbose: bool = False) -> None:
    """Run ``cells`` as Ray tasks, one CPU each (Ray then gives each task one OpenMP thread), on the
    cluster ``ray.init()`` finds (``RAY_ADDRESS``) or on a local one. Each task appends its own row,
    so ``out`` (and, to share the feature pass, ``VISIONTL_CACHE``) must be on a file system every
    node sees."""
    try:
        import ray
    except ImportError as err:
        raise BenchError("--launcher ray needs Ray: pip install 'visiontl[ray]' (or run shards with --shard i/n "
                         "under any scheduler).") from err
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    def remote(cell: Cell) -> dict[str, Any]:
        from visiontl.core.quiet import quiet

        with quiet(verbose):
            row = run_cell(cell, out)
        BenchStore(out).append(row)
        return row

    pending = [remote.remote(cell) for cell in cells]
    n = 0
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        n += 1
        done(n, ray.get(finished[0]))


def _timings(backbone: str, image_size: int | None, batch_size: int) -> tuple[float, float, float]:
    """Seconds of one training step (batch), of one image's forward pass at the evaluation batch
    size, and of building the model, measured on random input with a randomly initialised copy of
    the backbone."""
    import timm
    import torch

    from visiontl.data.base import EVAL_BATCH

    begin = time.perf_counter()
    model = timm.create_model(backbone, pretrained=False, num_classes=10)
    build = time.perf_counter() - begin
    size = image_size or int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    if hasattr(model, "set_input_size") and image_size:
        with contextlib.suppress(Exception):
            model.set_input_size(img_size=size)
    x = torch.rand(batch_size, 3, size, size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(3):
        begin = time.perf_counter()
        model(x).logsumexp(dim=1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - begin)
    model.eval()
    x = torch.rand(max(batch_size, EVAL_BATCH), 3, size, size)
    with torch.no_grad():
        model(x)
        begin = time.perf_counter()
        model(x)
        forward = (time.perf_counter() - begin) / len(x)
    return min(times[1:]), forward, build


def estimate_seconds(cells: list[Cell]) -> dict[tuple[str, str, str], float]:
    """Rough wall time per (data, backbone, strategy) of ``cells`` on this machine: steps x a measured
    training step, plus the validation passes and the feature passes."""
    from visiontl.data.base import auto_batch_size
    from visiontl.strategies import get_strategy

    counts: dict[str, tuple[dict[str, int], int]] = {}
    timings: dict[tuple[str, int | None, int], tuple[float, float]] = {}
    out: dict[tuple[str, str, str], float] = {}
    for cell in cells:
        if cell.data.name not in counts:
            dm = build_datamodule(cell.data, **_data_args(cell, shots=None))
            per_class: dict[str, int] = {}
            for _, label in dm.splits["train"]:
                per_class[label] = per_class.get(label, 0) + 1
            counts[cell.data.name] = (per_class, len(dm.splits["val"]))
        per_class, n_val = counts[cell.data.name]
        n_train = sum(per_class.values()) if cell.shots is None else cell.shots * len(per_class)
        batch = cell.batch_size or auto_batch_size(n_train)
        timing_key = (cell.backbone.name, cell.image_size, batch)
        if timing_key not in timings:
            timings[timing_key] = _timings(*timing_key)
        step_s, forward_s, build_s = timings[timing_key]
        strategy = get_strategy(cell.strategy)
        if not strategy.sgd or strategy.cache_features:
            seconds = 1.0  # reads cached features: the head's fit or a few thousand steps of a linear layer
        else:
            steps = cell_steps(cell, n_train, batch)
            epochs = steps / max(1, math.ceil(n_train / batch))
            # + the train-accuracy pass and setting the run up (weights, trainer, checkpoints: ~2 model builds)
            seconds = steps * step_s + (min(epochs, VALIDATIONS + 1) * n_val + n_train) * forward_s + 2 * build_s
        key = (cell.data.name, cell.backbone.label, cell.strategy_label)
        out[key] = out.get(key, 0.0) + seconds
    for data, (per_class, n_val) in counts.items():  # one feature pass per data set and backbone
        for backbone in {c.backbone for c in cells if c.data.name == data}:
            timing = next(v for k, v in timings.items() if k[0] == backbone.name)
            first = next(c for c in cells if c.data.name == data and c.backbone == backbone)
            key = (data, backbone.label, first.strategy_label)
            out[key] = out.get(key, 0.0) + (sum(per_class.values()) + n_val) * timing[1]
    return out
