"""One-call fine-tuning in the spirit of fastai's ``fine_tune``.

>>> from visiontl import fine_tune
>>> result = fine_tune("data/xrays", backbone="resnet18", strategy="gradual")  # doctest: +SKIP
>>> result.metrics["val_acc"], result.run_dir  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from visiontl.data import ClassificationDataModule, auto_batch_size
from visiontl.data.datamodules import labelled_datamodule
from visiontl.core.quiet import StepProgress, quiet
from visiontl.train.resume import RunLogger, resolve_last
from visiontl.tasks.checkpoints import checkpoint_record
from visiontl.core.devices import resolve_precision
from visiontl.train.run import RunReport, attach_run_callbacks, discard_if_empty, log_interval
from visiontl.strategies import Strategy
from visiontl.tasks import ClassificationTask
from visiontl.tasks.link import link
from visiontl.tasks.protocols import PredictsTags

__all__ = ["FitResult", "auto_steps", "fine_tune", "fit_task", "make_datamodule", "prepare_task"]


@dataclass
class FitResult:
    """What :func:`fine_tune` returns.

    Attributes:
        metrics: validation metrics of the best checkpoint (``val_acc``, ``val_f1``...).
        run_dir: the run directory (checkpoints, metrics, plots).
        task: the trained task, with the best checkpoint's weights loaded.
        trainer: the Lightning trainer.
        datamodule: the datamodule.
        wall_s: training wall time in seconds.
    """

    metrics: dict[str, float]
    run_dir: Path
    task: ClassificationTask = field(repr=False)
    trainer: pl.Trainer = field(repr=False)
    datamodule: ClassificationDataModule = field(repr=False)
    wall_s: float = 0.0


def auto_steps(n_train: int, batch_size: int) -> int:
    """Optimisation steps for a dataset size: enough to converge on 100 images, a few epochs on 100k.

    About 20 epochs on small sets with a floor of 200 steps, never fewer than 3 epochs, and
    capped near 3,000 steps unless 3 epochs need more.
    """
    per_epoch = max(1, math.ceil(n_train / max(1, batch_size)))
    return int(max(200, min(20 * per_epoch, max(3000, 3 * per_epoch))))


def make_datamodule(data: str | os.PathLike[str] | ClassificationDataModule, **kwargs: Any) -> ClassificationDataModule:
    """A datamodule from a folder path, a CSV path or an existing datamodule
    (:func:`visiontl.data.datamodules.labelled_datamodule`)."""
    if isinstance(data, ClassificationDataModule):
        return data
    return labelled_datamodule(data, **kwargs)


def prepare_task(data: str | os.PathLike[str] | ClassificationDataModule, backbone: str = "resnet18",
                 strategy: Strategy | str | dict[str, Any] = "gradual", *, pretrained: bool = True,
                 weights: str | None = None, image_size: int | None = None, seed: int = 0,
                 data_kwargs: dict[str, Any] | None = None, task_kwargs: dict[str, Any] | None = None,
                 ) -> tuple[ClassificationDataModule, ClassificationTask]:
    """The datamodule and the task of a run, built as :func:`fine_tune` builds them (everything
    seeded with ``seed`` first, the datamodule at ``image_size``, the task with its classes), for
    the doors that train or probe them: :func:`fine_tune`, :func:`visiontl.train.lrfinder.lr_find`."""
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = make_datamodule(data, seed=seed, **(data_kwargs or {}))
    if image_size is not None:
        dm.image_size = image_size
    task = ClassificationTask(backbone=backbone, num_classes=dm.num_classes, class_names=dm.class_names,
                              strategy=strategy, pretrained=pretrained, weights=weights,
                              **{"task": dm.task, **(task_kwargs or {})})
    return dm, task


def fine_tune(
    data: str | os.PathLike[str] | ClassificationDataModule,
    backbone: str = "resnet18",
    strategy: Strategy | str | dict[str, Any] = "gradual",
    *,
    pretrained: bool = True,
    weights: str | None = None,
    image_size: int | None = None,
    steps: int | None = None,
    out: str | os.PathLike[str] = "runs",
    name: str | None = None,
    seed: int = 0,
    data_kwargs: dict[str, Any] | None = None,
    task_kwargs: dict[str, Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    ckpt_path: str | os.PathLike[str] | None = None,
    retain: str | os.PathLike[str] | None = None,
    compare_scratch: bool | int = False,
    early_stopping: int | None = None,
    also_log_to: Sequence[str] = (),
    verbose: bool = False,
) -> FitResult:
    """Fine-tune ``backbone`` on ``data`` with ``strategy`` and return the best checkpoint's metrics.

    Training is budgeted in optimisation steps (:func:`auto_steps` when ``steps`` is None), so
    defaults are sound on 100 images and on 100,000.

    Args:
        data: a class-per-folder directory, a CSV (path,label) file or a datamodule.
        backbone: timm model name.
        strategy: ``probe``, ``partial``, ``full``, ``gradual``, ``scratch`` or a strategy.
        pretrained: use timm's pretrained weights (hub or cache) when ``weights`` is None.
        weights: a local weights file or named source (offline).
        image_size: input size (default: the backbone's).
        steps: optimisation steps (default: chosen from the dataset size).
        out: parent folder of the run directory.
        name: run name (default ``<backbone>-<strategy>``).
        seed: seed for weights of the new head, data order and the validation split.
        data_kwargs: more :class:`~visiontl.data.ClassificationDataModule` arguments.
        task_kwargs: more :class:`~visiontl.tasks.ClassificationTask` arguments.
        trainer_kwargs: more ``pytorch_lightning.Trainer`` arguments.
        ckpt_path: resume: ``"last"`` continues the newest ``version_N`` of ``out/name`` from its
            ``last.ckpt``, in that same directory (an error if there is none); or a checkpoint path.
        retain: a labelled folder or CSV of a task to keep: ``metrics.json`` gets
            ``retain_acc_before``, ``retain_acc_after`` and ``forgetting`` (:mod:`visiontl.analyse.forgetting`).
        compare_scratch: also train ``scratch`` on the same data, budget and preprocessing (``True``:
            one run with ``seed``; a number n: n seeds from ``seed``) and report the gap in the run's
            headline (``val_acc``; ``val_map`` for multi-label data) in ``metrics.json``'s ``scratch``
            and ``metrics["transfer_gap"]``, with a warning when pretraining did not help.
        early_stopping: stop when the monitored validation score (``val_acc``; ``val_map`` for
            multi-label data) has not improved for
            this many validations (``None``: train the whole budget); the best checkpoint is kept
            either way. Shorthand for ``task_kwargs={"early_stopping": n}``.
        also_log_to: trackers beside ``metrics.csv``: ``"tensorboard"``, ``"mlflow"``
            (:mod:`visiontl.train.loggers`; the ``tracking`` extra).
        verbose: ``True``: Lightning's progress bars and information lines (device lines, the
            strategy table, where features were cached). ``False`` (the default): none of them, and
            one progress bar over the run's steps instead, drawn on a terminal only, so a notebook
            cell shows what it prints and nothing else (:mod:`visiontl.core.quiet`,
            :mod:`visiontl.core.progress`). Warnings the user must act on (the data check, negative
            transfer, the divergence guard) are shown either way; Lightning's tips and
            dependencies' deprecation warnings never are.
    """
    for arg, value in (("steps", steps), ("image_size", image_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"fine_tune: {arg} must be a whole number >= 1 (or None for automatic), got {value!r}.")
    if isinstance(compare_scratch, bool):
        scratch_seeds = int(compare_scratch)
    elif isinstance(compare_scratch, int) and compare_scratch >= 1:
        scratch_seeds = compare_scratch
    else:
        raise ValueError(f"fine_tune: compare_scratch must be True, False or a number of seeds >= 1, got "
                         f"{compare_scratch!r}.")
    pristine = copy.deepcopy(data) if scratch_seeds and isinstance(data, ClassificationDataModule) else data
    dm, task = prepare_task(data, backbone, strategy, pretrained=pretrained, weights=weights, image_size=image_size,
                            seed=seed, data_kwargs=data_kwargs,
                            task_kwargs={**({"early_stopping": early_stopping} if early_stopping is not None else {}),
                                         **(task_kwargs or {})})
    if retain is not None:
        dm.retain = str(retain)
    run_name = name or f"{backbone}-{task.strategy.name}"
    result = fit_task(task, dm, steps=steps, out=out, name=run_name, ckpt_path=ckpt_path, trainer_kwargs=trainer_kwargs,
                      also_log_to=also_log_to, verbose=verbose)
    if scratch_seeds:
        with quiet(verbose):
            _compare_scratch(result, pristine, scratch_seeds, backbone=backbone, image_size=image_size,
                             steps=result.trainer.max_steps, out=out, name=f"{run_name}-scratch", seed=seed,
                             data_kwargs=data_kwargs, task_kwargs=task_kwargs, trainer_kwargs=trainer_kwargs,
                             verbose=verbose)
    return result


def _progress_kwargs(trainer_kwargs: dict[str, Any] | None, verbose: bool, desc: str) -> dict[str, Any]:
    """Trainer arguments with Lightning's bars (verbose) or one :class:`~visiontl.core.quiet.StepProgress` bar."""
    kwargs = dict(trainer_kwargs or {})
    if verbose:
        return kwargs
    kwargs.setdefault("enable_model_summary", False)
    if kwargs.get("enable_progress_bar", True):  # the caller's False means no bar at all
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), StepProgress(desc)]
    kwargs["enable_progress_bar"] = False
    return kwargs


def fit_task(task: ClassificationTask, dm: ClassificationDataModule, *, steps: int | None = None,
             out: str | os.PathLike[str] = "runs", name: str, ckpt_path: str | os.PathLike[str] | None = None,
             trainer_kwargs: dict[str, Any] | None = None, also_log_to: Sequence[str] = (),
             verbose: bool = False) -> FitResult:
    """The run driver of the Python doors (:func:`fine_tune`, :func:`~visiontl.train.distill.distill`,
    a bench cell): train a built task on a datamodule (step budget, run directory
    ``out/name/version_N``, precision by rule, the run's callbacks, resume with ``ckpt_path="last"``,
    what is shown by ``verbose``) and return the best checkpoint's metrics, with its weights loaded
    into ``task``. Its settings are those of ``visiontl fit`` given the same inputs (``settings.json``)."""
    n_train = dm.train_size
    batch_size = dm.batch_size or auto_batch_size(n_train)
    batches = math.ceil(n_train / batch_size)
    steps = steps if steps is not None else auto_steps(n_train, batch_size)
    version = None
    if ckpt_path is not None and str(ckpt_path) == "last":
        ckpt_path, version = resolve_last(Path(out) / name)
    kwargs: dict[str, Any] = {
        "max_steps": steps,
        "max_epochs": -1,
        "logger": RunLogger(str(out), name=name, version=version, also_log_to=list(also_log_to)),
        "log_every_n_steps": log_interval(batches),
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    kwargs.update(trainer_kwargs or {})
    # the run directory is decided here, once: processes started for the fit (ddp_spawn) take this one,
    # and this process reads the same one afterwards (left unpinned, it would count theirs and pick the next)
    getattr(kwargs.get("logger"), "version", None)
    # by rule, as the command line: float32 on a CPU, the device's mixed precision on a GPU (never a timing)
    kwargs["precision"] = resolve_precision(kwargs.get("precision"), kwargs.get("accelerator", "auto"))
    kwargs = _progress_kwargs(kwargs, verbose, name)
    started = time.perf_counter()
    with quiet(verbose):
        trainer = attach_run_callbacks(pl.Trainer(**kwargs))
        try:
            trainer.fit(task, dm, ckpt_path=str(ckpt_path) if ckpt_path is not None else None)
        except BaseException:
            discard_if_empty(trainer)  # bad input found in set-up: no empty version_N left behind
            raise
    if str(kwargs.get("strategy", "")).endswith("_spawn"):  # set up in the spawned ranks: link this copy too
        link(dm, task)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    record = checkpoint_record(best, state_dict=True)
    if record is not None:  # the best checkpoint's weights and the metrics it was saved with
        task.load_state_dict(record["state_dict"])
        metrics = dict(record["val_metrics"])
    else:
        with quiet(verbose):
            results = trainer.validate(task, dm, ckpt_path=best or None, verbose=False)
        metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    # the fit's own wall time, from its run report; a fit in spawned processes (ddp_spawn) reports
    # there, so the caller's clock stands in
    report = next(c for c in trainer.callbacks if isinstance(c, RunReport))
    wall = report.summary.get("wall_s") or round(time.perf_counter() - started, 2)
    return FitResult(metrics, Path(trainer.log_dir), task, trainer, dm, float(wall))


def _compare_scratch(result: FitResult, data: Any, seeds: int, *, seed: int, **kwargs: Any) -> None:
    """Train ``scratch`` ``seeds`` times at the run's budget and record the pretrained - scratch
    gap in ``result.metrics`` and the run's ``metrics.json`` (``scratch``)."""
    import statistics
    import warnings

    from visiontl.train.run import add_to_metrics

    runs = []
    for i in range(seeds):
        source = copy.deepcopy(data) if isinstance(data, ClassificationDataModule) else data
        runs.append(fine_tune(source, strategy="scratch", pretrained=False, seed=seed + i, **kwargs))
    score = "val_map" if isinstance(result.task, PredictsTags) and result.task.multilabel else "val_acc"  # headline
    accs = [float(r.metrics[score]) for r in runs]
    mean = statistics.fmean(accs)
    std = statistics.stdev(accs) if len(accs) > 1 else None
    gap = float(result.metrics[score]) - mean
    record = {score: accs, f"{score}_mean": round(mean, 6), f"{score}_std": round(std, 6) if std is not None
              else None, "gap": round(gap, 6), "seeds": [seed + i for i in range(seeds)],
              "runs": [str(r.run_dir) for r in runs]}
    result.metrics.update({f"scratch_{score}": mean, "transfer_gap": gap})
    add_to_metrics(result.run_dir, "scratch", record)
    spread = f" ± {std:.3f} over {seeds} seeds" if std is not None else ""
    if gap <= 0:
        warnings.warn(f"[visiontl] negative transfer: the pretrained run's {score} {result.metrics[score]:.3f} is "
                      f"not above scratch's {mean:.3f}{spread} at the same budget. Try another backbone "
                      f"(visiontl rank), a gentler strategy (gradual, lora) or more steps for scratch.", stacklevel=3)
    else:
        rank_zero_info(f"[visiontl] pretrained - scratch: {gap:+.3f} {score} (scratch {mean:.3f}{spread})")
