"""A killed run loses nothing: ``last.ckpt`` is always the latest state, and a resume continues it.

- :class:`LastCheckpoint` writes ``checkpoints/last.ckpt`` atomically (temporary file, then
  rename) every ``every_n_steps`` steps and every ``every_minutes`` minutes, and when training
  ends (not at each epoch's end: a tiny data set's epoch is one step, and writing the full training
  state after each cost more than training); it flushes the metrics log first, so ``metrics.csv`` holds every row up
  to the checkpoint, and records how many rows that was.
- :class:`RunLogger` is Lightning's ``CSVLogger`` made resumable: resuming into the same version
  directory keeps ``metrics.csv`` (Lightning's deletes it), cut back to the rows that existed when
  the checkpoint was written (the rows after it are trained again), and every rewrite is atomic.
- :func:`resolve_last` turns ``ckpt_path="last"`` into the newest ``version_N/checkpoints/last.ckpt``
  of a run name, so the resumed run writes into that same directory; with none, it is an error.
- Data order and augmentation are pure functions of (seed, epoch, image)
  (:class:`visiontl.data.sampling.EpochSampler`), and a resumed epoch skips the batches it already
  trained on, so a resumed run sees exactly the batches the uninterrupted run would have.

What a kill loses: the steps since the last ``last.ckpt`` (at most ``every_n_steps`` steps or
``every_minutes`` minutes), which the resumed run trains again.
"""

from __future__ import annotations

import csv
import io
import os
import re
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.loggers.csv_logs import _ExperimentWriter
from pytorch_lightning import Callback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from visiontl.core import files
from visiontl.core.errors import UserError

__all__ = ["LastCheckpoint", "ResumeError", "RunLogger", "resolve_last"]


class ResumeError(UserError):
    """Nothing to resume, or a checkpoint that does not belong to the run."""


class _ResumableWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` (continuing its header) and rewrites it atomically."""

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        path = Path(self.metrics_file_path)
        if path.is_file():
            try:
                header = next(csv.reader(io.StringIO(path.read_text())), [])
            except (OSError, csv.Error):
                header = []
            self.metrics_keys = sorted(set(header))

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        rows = _read_rows(Path(self.metrics_file_path))
        _write_rows(Path(self.metrics_file_path), fieldnames, rows)

    def truncate(self, keep_rows: int) -> None:
        """Keep the first ``keep_rows`` data rows (those written before the checkpoint)."""
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        rows = _read_rows(path)
        header = self.metrics_keys or sorted({k for r in rows for k in r})
        _write_rows(path, header, rows[:keep_rows])


def _read_rows(path: Path) -> list[dict[str, str]]:
    text = path.read_text()
    if text and not text.endswith("\n"):  # a kill in the middle of an append: drop the partial row
        text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(text)))


def _write_rows(path: Path, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(path, buf.getvalue())


class RunLogger(CSVLogger):
    """``CSVLogger`` that a resumed run continues: ``metrics.csv`` in the run directory
    ``save_dir/name/version_N``.

    Args:
        save_dir, name, version, prefix, flush_logs_every_n_steps: as Lightning's ``CSVLogger``.
        also_log_to: trackers that log the same run too: ``tensorboard`` (event files in the run
            directory) and ``mlflow`` (``save_dir/mlflow.db``, or ``MLFLOW_TRACKING_URI``);
            :mod:`visiontl.train.loggers`. The run driver adds them
            (:func:`visiontl.train.run.attach_run_callbacks`).
    """

    def __init__(self, save_dir: str, name: str | None = "lightning_logs", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100,
                 also_log_to: list[str] | None = None) -> None:
        from visiontl.train.loggers import check_trackers

        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        self.also_log_to = check_trackers(also_log_to)

    @property
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment

    def metrics_rows(self) -> int:
        """Data rows in ``metrics.csv`` now (after flushing what is pending)."""
        self.save()
        path = Path(self.experiment.metrics_file_path)
        return len(_read_rows(path)) if path.is_file() else 0


class LastCheckpoint(Callback):
    """Write ``<run>/checkpoints/last.ckpt`` atomically and often (see the module docstring).

    Args:
        every_n_steps: every this many optimisation steps (``None``: only by time and at the end).
        every_minutes: also when this many minutes have passed since the last write.
    """

    def __init__(self, every_n_steps: int | None = 50, every_minutes: float | None = 5.0) -> None:
        self._set_every(every_n_steps, every_minutes)
        self._last_time = time.monotonic()
        self._last_step = -1
        self._rows = 0
        self._due = False

    def state_dict(self) -> dict[str, Any]:
        return {"metrics_rows": self._rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rows = int(state_dict.get("metrics_rows", 0))

    @staticmethod
    def path(trainer: pl.Trainer) -> Path:
        from visiontl.core.rundir import run_dir

        return run_dir(trainer) / "checkpoints" / "last.ckpt"

    def _set_every(self, every_n_steps: int | None, every_minutes: float | None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}.")
        if every_minutes is not None and every_minutes <= 0:
            raise ValueError(f"every_minutes must be > 0 or None, got {every_minutes}.")
        self.every_n_steps, self.every_minutes = every_n_steps, every_minutes

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The task's intervals where it has them (``last_every_n_steps``, ``last_every_minutes``);
        every checkpoint of the run (``best.ckpt`` too) is written atomically where it lands."""
        from visiontl.tasks.checkpoints import install_atomic_writer

        hp = pl_module.hparams
        self._set_every(hp.get("last_every_n_steps", self.every_n_steps), hp.get("last_every_minutes", self.every_minutes))

        self._atomic = install_atomic_writer(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_time = time.monotonic()
        if trainer.ckpt_path and trainer.is_global_zero:  # resumed: drop the rows logged after the checkpoint
            for logger in trainer.loggers:
                if isinstance(getattr(logger, "experiment", None), _ResumableWriter):
                    logger.experiment.truncate(self._rows)

    def save(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` now (all ranks call this; rank 0 writes)."""
        if trainer.sanity_checking or trainer.global_step == self._last_step:
            return
        rows = 0
        for logger in trainer.loggers:
            if isinstance(logger, RunLogger) and trainer.is_global_zero:
                rows = logger.metrics_rows()  # flushed first: the file holds every row up to here
            elif trainer.is_global_zero:
                logger.save()
        self._rows = rows
        target = self.path(trainer)
        target.parent.mkdir(parents=True, exist_ok=True)
        if getattr(self, "_atomic", False):  # visiontl's writer: temporary file, fsync, rename, one-line errors
            trainer.save_checkpoint(target, weights_only=False)  # the full training state: a resume needs it
            self._last_step, self._last_time = trainer.global_step, time.monotonic()
            return
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")  # a writer of the user's
        files.remove_stale_temps(target)
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # the full training state: a resume needs it
            if trainer.is_global_zero:
                os.chmod(tmp, 0o666 & ~files.current_umask())
                os.replace(tmp, target)
        finally:
            if trainer.is_global_zero and tmp.exists():
                tmp.unlink()
        self._last_step, self._last_time = trainer.global_step, time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Decide here, write at the next batch's start: Lightning logs this step's metrics, and at an
        epoch's end runs validation and logs the epoch's rows, only after this hook. A checkpoint
        written now would count none of those rows (a resume cut them from ``metrics.csv``) and, at
        an epoch's last batch, Lightning would resume past that epoch's validation."""
        steps_due = self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0
        time_due = (self.every_minutes is not None
                    and time.monotonic() - self._last_time >= 60 * self.every_minutes)
        self._due = self._due or steps_due or time_due
        if self._due and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch and _loader_states(trainer, 0) is None:
            # the next batch starts an epoch, and a stateful loader (LitData's) cannot say where that
            # epoch began: write now, at this batch's end, where Lightning's own resume is exact
            self._due = False
            self.save(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """The state after the previous step, its rows and any validation logged: a resume from it
        repeats exactly this batch (Lightning resets the batch it had only made ready)."""
        if self._due:
            self._due = False
            self._at_batch_start = True
            try:
                self.save(trainer)
            finally:
                self._at_batch_start = False

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:
        """Written at a batch's start, the logging step already counts the previous batch; Lightning
        adds one on every resume that is not from a batch's end or the end of training (its loop
        ``reset``), so the checkpoint records one less. Lightning's checkpoint layout (``loops`` /
        ``fit_loop`` / ``epoch_loop.state_dict``) is named by ``tests/hostile/test_hostile_cli.py``."""
        if not getattr(self, "_at_batch_start", False):
            return
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        state = fit_loop.get("epoch_loop.state_dict")
        if isinstance(state, dict) and "_batches_that_stepped" in state:
            state["_batches_that_stepped"] -= 1
        loaders = (fit_loop.get("state_dict") or {}).get("combined_loader")
        trained = int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)  # batches of this epoch
        kept = _loader_states(trainer, trained)
        if isinstance(loaders, list) and kept is not None and len(kept) == len(loaders):
            fit_loop["state_dict"]["combined_loader"] = kept  # the loaders as they were before this batch

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)


def _loader_states(trainer: pl.Trainer, trained: int) -> list[dict[str, Any]] | None:
    """The states of the training loaders that keep one (LitData's) as they were when ``trained``
    batches of the epoch had been served, or None where a loader does not remember that far
    (Lightning's own state is kept then)."""
    from pytorch_lightning.utilities import CombinedLoader

    loader = trainer.train_dataloader
    loaders = loader.flattened if isinstance(loader, CombinedLoader) else [loader]
    stateful = [l for l in loaders if callable(getattr(l, "state_dict", None))
                and callable(getattr(l, "load_state_dict", None))]
    states = [l.state_before(trained) if callable(getattr(l, "state_before", None)) else None for l in stateful]
    return None if any(s is None for s in states) else states


_VERSION = re.compile(r"^version_(\d+)$")


def resolve_last(run_root: str | os.PathLike[str]) -> tuple[Path, int]:
    """The newest ``version_N/checkpoints/last.ckpt`` under a run name's folder, and its ``N``.

    Raises:
        ResumeError: no version directory there has a ``last.ckpt``.
    """
    root = Path(run_root)
    versions = sorted(
        ((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else []) if (m := _VERSION.match(p.name))),
        reverse=True,
    )
    for number, folder in versions:
        ckpt = folder / "checkpoints" / "last.ckpt"
        if ckpt.is_file():
            return ckpt, number
    raise ResumeError(
        f"Nothing to resume: no {root}/version_*/checkpoints/last.ckpt. Start the run without "
        f"--ckpt_path last, or give the checkpoint's path."
    )
