"""Output that leads with the answer: what visiontl's commands and ``fine_tune()`` (quiet by default) show.

:func:`quiet` is a context manager (nothing changes outside it, and what it changed is put back):

- always: Lightning's advertising tips (``💡 Tip: ... litlogger``), its device lines (``GPU
  available: False``: ``visiontl doctor`` reports the devices), its notice that the task's own
  callbacks replace the Trainer's (visiontl's tasks do that on purpose), deprecation warnings raised
  by dependencies (``DeprecationWarning`` / ``PendingDeprecationWarning`` / ``FutureWarning`` from
  any module outside visiontl) and Lightning's warnings about choices visiontl makes on purpose
  (loader workers, logging interval, a run directory reused on resume) are dropped;
- with ``verbose=False`` (the default of :func:`visiontl.fine_tune`, ``distill``, ``fit_task``,
  ``find_lr``, the bench): Lightning's and visiontl's INFO lines (``Trainer.fit stopped``, strategy
  tables, where features were cached) are hidden too, and :class:`StepProgress` stands in for
  Lightning's progress bars: one bar over the run's optimisation steps, with the latest validation
  accuracy, drawn on a terminal only (:mod:`visiontl.core.progress`: a notebook's output keeps the
  answer and nothing else).

Warnings about the user's data (visiontl's data check, class imbalance, bad images, negative
transfer...) are never filtered: they are visiontl's own warnings and log records at WARNING.

This is the package's one quieting rule: the commands, ``fine_tune()`` (``verbose=False``), the bench's
cells and feature passes (:func:`visiontl.benchmark.run_bench`) and ``visiontl rank`` all run under
it, so a quiet bench hides exactly what a quiet command hides.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl

__all__ = ["NOISE", "StepProgress", "quiet"]

NOISE = (  # Lightning's warnings about settings visiontl chooses deliberately
    r".*does not have many workers.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*The dirpath has changed from.*",
    r".*LightningCLI's args parameter is intended.*",
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*Your `IterableDataset` has `__len__` defined.*",
    r".*returned in `LightningModule.configure_callbacks` will override.*",
    r".*module\(s\) in eval mode.*",
    r".*IProgress not found.*",
    r".*`LightningModule.configure_optimizers` returned `None`.*",  # fitted heads: no optimiser on purpose
    r".*`training_step` returned `None`.*",
    r".*resuming from a checkpoint that ended before the epoch ended.*",  # visiontl's samplers resume exactly
    # a fit (a short or resumed one) that saves before its first validation: no val_ metric exists yet, and the
    # best checkpoint is chosen at the next validation; a monitor that names no logged metric still warns
    r".*could not find the monitored key in the returned metrics: \[(?:(?!'val_)[^\]])*\]",
)
_LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")


_DROPPED_PREFIXES = (
    "\N{ELECTRIC LIGHT BULB} Tip:",  # advertising
    "GPU available:", "TPU available:", "HPU available:", "IPU available:",  # `visiontl doctor` reports devices
    "The following callbacks returned in `LightningModule.configure_callbacks`",  # visiontl's own callbacks, on purpose
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_DROPPED_PREFIXES)


@contextmanager
def quiet(verbose: bool = True) -> Iterator[None]:
    """Filter the noise described in the module docstring while the block runs (see there)."""
    tips = _DropTips()
    loggers = [logging.getLogger(name) for name in (*_LIGHTNING_LOGGERS, "pytorch_lightning.utilities.rank_zero")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=r"(?!visiontl)")
        for message in NOISE:
            warnings.filterwarnings("ignore", message=message)
        for lg in loggers:
            lg.addFilter(tips)
            if not verbose:
                lg.setLevel(max(lg.level, logging.WARNING))
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.removeFilter(tips)
                lg.setLevel(level)


class StepProgress(pl.Callback):
    """One tqdm bar over a fit's optimisation steps (``desc``: what is training), with the training
    loss and the latest validation accuracy; it closes when the fit ends (``leave``: keep its line).
    Drawn where :func:`visiontl.core.progress.show_progress` says (a terminal, not a notebook)."""

    def __init__(self, desc: str = "training", leave: bool = False) -> None:
        self.desc, self.leave = desc, leave
        self._bar: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from visiontl.core.progress import progress_bar

        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._bar = progress_bar(total=total, initial=trainer.global_step, desc=self.desc, unit="step", leave=self.leave,
                         dynamic_ncols=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._bar is not None:
            self._bar.update(max(0, trainer.global_step - self._bar.n))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None and not trainer.sanity_checking:
            shown = {k: f"{float(v):.3f}" for k, v in trainer.callback_metrics.items() if k in ("val_acc", "val_loss")}
            if shown:
                self._bar.set_postfix(shown, refresh=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
