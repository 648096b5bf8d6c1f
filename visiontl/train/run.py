"""The run directory: what every fit / test / predict leaves behind, written atomically.

``RunReport`` and the other callbacks of a run are added to the Trainer by the run driver
(:func:`attach_run_callbacks`: :func:`visiontl.fine_tune`, ``visiontl fit|validate|test|predict``,
``visiontl distill``, a bench cell), so every door leaves the same files in the run directory:

- ``config.yaml`` (CLI) or ``hparams.yaml``: the configuration as resolved;
- ``metrics.csv`` (per step / epoch, from the CSV logger) and ``metrics.json`` (summary);
- ``settings.json``: what the fit was resolved to (steps, precision, batch size, seed, logging...),
  the same whichever door started it;
- ``strategy.json``: trainable / total parameters and every group's learning rate;
- ``checkpoints/best.ckpt`` and ``checkpoints/last.ckpt`` (resume with ``--ckpt_path last``);
- ``confusion_matrix.png`` / ``.csv``, ``learning_curves.png``, ``skipped_files.txt``;
- ``train_images.txt`` / ``val_images.txt``: the images of each split (export verifies on them);
- ``splits.csv``: split, path and label of every image (``visiontl wise-ft`` fits and scores on it;
  ``CsvDataModule(train_csv=..., split_column="split")`` reads it);
- ``data_check.json``: the data check run before training (counts, imbalance, modes, warnings);
- ``data.json``: the datamodule's class and augmentation preset (``visiontl distill`` trains a
  student with the teacher's);
- ``predictions.csv`` after ``predict``.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning import Callback
from pytorch_lightning.trainer.states import TrainerFn

from visiontl.core import files
from visiontl.core.rundir import run_dir
from visiontl.core.speed import tune_allocator
from visiontl.data.protocols import LabelledData, LabelledSplits, Preprocessed
from visiontl.tasks.protocols import PredictsTags, ReportsConfusion, ReportsStrategy, ReportsTags
from visiontl.train.resume import RunLogger
from visiontl.analyse.plots import save_confusion_matrix, save_drift, save_learning_curves, save_tag_report

__all__ = ["LIGHTNING_LOG_EVERY", "add_to_metrics", "attach_run_callbacks", "discard_if_empty", "log_interval",
           "run_settings", "RunReport"]


_SETUP_FILES = {"hparams.yaml", "config.yaml", "data_check.json", "data.json", "strategy.json", "train_images.txt",
                "val_images.txt", "splits.csv", "skipped_files.txt"}


def discard_if_empty(trainer: pl.Trainer | None) -> bool:
    """Remove a failed run's directory when it holds nothing but set-up files (no checkpoint, no
    metrics), so a fit that stopped on bad input leaves no empty ``version_N`` behind."""
    if trainer is None or not trainer.is_global_zero:
        return False
    try:
        path = run_dir(trainer)
    except Exception:  # noqa: BLE001 - no logger / no directory decided yet
        return False
    if not path.is_dir() or not path.name.startswith("version_"):
        return False
    found = [p for p in path.rglob("*") if p.is_file()]
    if any(p.name not in _SETUP_FILES for p in found):
        return False
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    return True


LIGHTNING_LOG_EVERY = 50
"""Lightning's own ``log_every_n_steps``: left at it, a run logs by :func:`log_interval` instead."""


def log_interval(batches_per_epoch: int | float) -> int:
    """Log every this many steps: every epoch on a tiny set (where an epoch is a few steps), at most
    every 50 steps on a large one. One rule for every door (``visiontl fit``, ``fine_tune``)."""
    if not math.isfinite(float(batches_per_epoch)):
        return LIGHTNING_LOG_EVERY
    return int(max(1, min(LIGHTNING_LOG_EVERY, int(batches_per_epoch))))


def run_settings(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """What a fit was resolved to, whichever door started it: written to ``settings.json`` so two
    runs can be compared (the same inputs give the same settings, decided by rule, never by a
    timing)."""
    import os

    dm = trainer.datamodule
    hp = {k: v for k, v in dict(pl_module.hparams).items() if not k.startswith("_")}
    loader = trainer.train_dataloader
    batch_size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None),
                                                                "batch_size", None)
    return {
        "task": type(pl_module).__name__,
        "hyper_parameters": hp,
        "seed": int(os.environ["PL_GLOBAL_SEED"]) if os.environ.get("PL_GLOBAL_SEED", "").isdigit() else None,
        "datamodule": type(dm).__name__ if dm is not None else None,
        "augment": dm.augment if isinstance(dm, Preprocessed) else None,
        "train_images": dm.train_size if isinstance(dm, LabelledData) else None,
        "batch_size": batch_size,
        "batches_per_epoch": trainer.num_training_batches,
        "max_steps": trainer.max_steps,
        "precision": str(trainer.precision),
        "accelerator": type(trainer.accelerator).__name__,
        "world_size": trainer.world_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "gradient_clip_val": trainer.gradient_clip_val,
        "num_sanity_val_steps": trainer.num_sanity_val_steps,
        "log_every_n_steps": trainer.log_every_n_steps,
    }


def add_to_metrics(run: str | Path, key: str, record: Any) -> dict[str, Any]:
    """Add ``record`` as ``key`` to a finished run's ``metrics.json`` (atomically; what follows the
    fit rather than ending it, such as :func:`visiontl.fine_tune`'s scratch comparison). Returns
    the file's new content."""
    import json

    path = Path(run) / "metrics.json"
    try:
        summary = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        summary = {}
    summary = {**(summary if isinstance(summary, dict) else {}), key: record}
    files.write_json(path, summary)
    return summary


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def attach_run_callbacks(trainer: pl.Trainer) -> pl.Trainer:
    """Give ``trainer`` what a visiontl run leaves behind, and return it: ``last.ckpt``, always the
    latest state (:class:`~visiontl.train.resume.LastCheckpoint`, when the Trainer checkpoints), the
    run report with the after-fit analyses (:class:`RunReport`), the learning rates per step
    (Lightning's ``LearningRateMonitor``, when it logs) and the trackers the run's
    :class:`~visiontl.train.resume.RunLogger` asks for (``also_log_to``: TensorBoard, MLflow). The
    one place every door adds them; a Trainer built by hand gets them the same way::

        trainer = attach_run_callbacks(pl.Trainer(max_steps=100))
    """
    from pytorch_lightning.callbacks import LearningRateMonitor

    from visiontl.train.resume import LastCheckpoint

    added: list[Callback] = [RunReport()]
    if trainer.checkpoint_callback is not None:
        added.insert(0, LastCheckpoint())
    if trainer.loggers:
        added.append(LearningRateMonitor("step"))
    kinds = {type(c) for c in trainer.callbacks}
    trainer.callbacks.extend(c for c in added if type(c) not in kinds)  # attached once, whoever calls twice
    first = trainer.loggers[0] if trainer.loggers else None
    if isinstance(first, RunLogger) and first.also_log_to and len(trainer.loggers) == 1:
        from visiontl.train.loggers import tracker_loggers

        trainer.loggers = [first, *tracker_loggers(first.also_log_to, Path(first.log_dir), Path(first.save_dir),
                                                   first.name or "visiontl")]
    return trainer


class RunReport(Callback):
    """Writes the run directory's reports and plots, and runs the after-fit analyses.

    Args:
        after_fit: the steps to run when the fit ends (:mod:`visiontl.analyse.after_fit`); None:
            the task's sequence, :func:`visiontl.analyse.sequence.after_fit_steps`.
    """

    def __init__(self, after_fit: list[Any] | None = None) -> None:
        self.after_fit = None if after_fit is None else list(after_fit)
        self._start: float | None = None
        self.summary: dict[str, Any] = {}
        """What the fit wrote to ``metrics.json`` (empty until the fit ends), for the run driver."""
        self._predictions: list[dict[str, torch.Tensor]] = []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The logging interval by :func:`log_interval` where none was asked for (Lightning's
        default), then the resolved settings to ``settings.json``: the loaders exist now."""
        if trainer.log_every_n_steps == LIGHTNING_LOG_EVERY:
            trainer.log_every_n_steps = log_interval(trainer.num_training_batches)
        if trainer.is_global_zero:
            files.write_json(run_dir(trainer) / "settings.json", run_settings(trainer, pl_module))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        # in the process that trains (each rank), not whenever a task is built (from_checkpoint in a
        # service): the allocator setting is process-wide
        tune_allocator()
        if not trainer.is_global_zero:
            return
        out = run_dir(trainer)
        if isinstance(pl_module, ReportsStrategy):
            files.write_json(out / "strategy.json", pl_module.strategy_report())
        dm = trainer.datamodule
        splits = dm.splits if isinstance(dm, LabelledSplits) else {}
        for split in ("train", "val"):  # export verifies / calibrates on these real images later
            if split in splits:
                # absolute: the listings are read later from elsewhere (export, wise-ft, distill)
                listed = dict.fromkeys(Path(p).absolute() for p in dm.paths(split))  # each file once (frames='all')
                files.write_text(out / f"{split}_images.txt", "".join(f"{p}\n" for p in listed))
        if "train" in splits:  # labelled: what wise-ft fits and scores on
            buf = io.StringIO()
            writer = files.csv_writer(buf)
            writer.writerow(["split", "path", "label"])
            for split in ("train", "val", "test"):
                writer.writerows((split, str(Path(p).absolute()), label) for p, label in splits.get(split, []))
            files.write_text(out / "splits.csv", buf.getvalue())
        if isinstance(dm, Preprocessed):
            files.write_json(out / "data.json", {"datamodule": type(dm).__name__, "augment": dm.augment})
        report = dm.data_report if isinstance(dm, LabelledData) else None
        if report is not None:
            files.write_json(out / "data_check.json", report.to_dict())
        skipped = dm.skipped if isinstance(dm, Preprocessed) else None
        if skipped:
            files.write_text(out / "skipped_files.txt", "".join(f"{p}\t{r}\n" for p, r in skipped))

    def _confusion(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        suffix = "" if split == "val" else f"_{split}"
        tags = pl_module.last_tags.get(split) if isinstance(pl_module, ReportsTags) else None
        if tags is not None and trainer.is_global_zero:  # multi-label: a table and PR curves, not a matrix
            out = run_dir(trainer)
            save_tag_report(tags, out / f"pr_curves{suffix}.png", out / f"tag_metrics{suffix}.csv",
                            title=f"precision-recall per tag ({split})")
        cm = pl_module.last_confusion.get(split) if isinstance(pl_module, ReportsConfusion) else None
        if cm is None or not trainer.is_global_zero:
            return
        out = run_dir(trainer)
        save_confusion_matrix(cm, pl_module.class_names, out / f"confusion_matrix{suffix}.png",
                              out / f"confusion_matrix{suffix}.csv", title=f"{split} confusion matrix")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn != TrainerFn.FITTING:
            self._confusion(trainer, pl_module, "val")  # during fit: once, at the end

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._confusion(trainer, pl_module, "test")
        if trainer.is_global_zero:
            metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items() if k.startswith("test_")}
            files.write_json(run_dir(trainer) / "test_metrics.json", metrics)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The analyses that follow the fit, in the task's order (:mod:`visiontl.analyse.after_fit`), then
        ``metrics.json`` with every record, the plots and ``strategy.json``."""
        if not trainer.is_global_zero:
            return
        from visiontl.analyse.after_fit import FitContext, run_steps
        from visiontl.analyse.sequence import after_fit_steps

        steps = after_fit_steps(pl_module) if self.after_fit is None else self.after_fit
        records = run_steps(steps, FitContext(trainer, pl_module, trainer.datamodule))
        out = run_dir(trainer)
        for logger in trainer.loggers:
            logger.save()
        ckpt = trainer.checkpoint_callback
        summary = {
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "wall_s": round(time.perf_counter() - self._start, 2) if self._start else None,
            "best_checkpoint": str(ckpt.best_model_path) if ckpt and ckpt.best_model_path else None,
            "best_score": _scalar(ckpt.best_model_score) if ckpt and ckpt.best_model_score is not None else None,
            "monitor": getattr(ckpt, "monitor", None),
            "final": {k: _scalar(v) for k, v in trainer.callback_metrics.items()},
        }
        from visiontl.tasks.checkpoints import checkpoint_record

        best = checkpoint_record(summary["best_checkpoint"])
        if best is not None:  # the reports describe the model the run keeps: the best checkpoint
            summary["best"] = best["val_metrics"]
            if best.get("val_confusion") is not None:
                pl_module.last_confusion["val"] = torch.tensor(best["val_confusion"])
            if best.get("val_tags") is not None and isinstance(pl_module, ReportsTags):
                pl_module.last_tags["val"] = best["val_tags"]
                summary["tags"] = best["val_tags"]["rows"]
        if isinstance(pl_module, ReportsStrategy):
            summary["strategy"] = pl_module.strategy_report()
            files.write_json(out / "strategy.json", summary["strategy"])  # now with the fitted head's numbers
        for record in records.values():  # in the order the steps ran
            if record.key is None:
                summary.update(record.to_dict())
            else:
                summary[record.key] = record.to_dict()
        forgetting = records.get("forgetting")
        if forgetting is not None:
            if "strategy" in summary:
                moved = {g["group"]: g for g in forgetting.drift["groups"]}
                for group in summary["strategy"]["groups"]:
                    if group["name"] in moved:
                        group["l2_from_pretrained"] = moved[group["name"]]["l2"]
                        group["relative_l2_from_pretrained"] = moved[group["name"]]["relative"]
                files.write_json(out / "strategy.json", summary["strategy"])
            save_drift({**forgetting.drift, "retain_acc_after": forgetting.retain_acc_after}, out / "drift.png")
        summary.update(pl_module.run_summary())  # the task's own record (DistillationTask: its teacher)
        files.write_json(out / "metrics.json", summary)
        self.summary = summary
        self._confusion(trainer, pl_module, "val")
        if (out / "metrics.csv").exists():
            save_learning_curves(out / "metrics.csv", out / "learning_curves.png")

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                             batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(outputs, dict) and "probs" in outputs:
            self._predictions.append({k: v.detach().cpu() for k, v in outputs.items()})

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._predictions = []

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._predictions or not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        labelled = isinstance(dm, LabelledSplits)
        split = "predict" if labelled and "predict" in dm.splits else "test"
        paths = dm.paths(split) if labelled else None
        frames = dm.frame_indices(split) if labelled else None
        framed = frames is not None and any(f is not None for f in frames)  # frames='all': a column for them
        names = pl_module.class_names
        buf = io.StringIO()
        writer = files.csv_writer(buf)
        tagged = isinstance(pl_module, PredictsTags) and pl_module.multilabel  # a row of decisions per image
        head = ["tags"] if tagged else ["label", "probability"]
        ood = ["ood_score", "abstain"] if "ood_score" in self._predictions[0] else []  # a model with a detector
        writer.writerow(["path", *(["frame"] if framed else []), *head, *[f"p_{n}" for n in names], *ood])
        for out in self._predictions:
            for j, (i, probs, label) in enumerate(zip(out["index"].tolist(), out["probs"], out["label"].tolist())):
                path = str(paths[i]) if paths is not None else i
                frame = ["" if frames[i] is None else frames[i]] if framed else []
                decided = ["|".join(n for n, on in zip(names, label) if on)] if tagged else [
                    names[label], f"{probs[label]:.6f}"]
                unfamiliar = [f"{float(out['ood_score'][j]):.6f}", str(bool(out["abstain"][j])).lower()] if ood else []
                writer.writerow([path, *frame, *decided, *[f"{p:.6f}" for p in probs.tolist()], *unfamiliar])
        files.write_text(run_dir(trainer) / "predictions.csv", buf.getvalue())
        self._predictions = []
