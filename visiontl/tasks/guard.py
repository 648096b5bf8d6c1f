"""A divergence guard for every strategy that trains by gradient descent.

Small datasets make fine-tuning fragile: an exploding head, a learning rate too high for the data
or a batch of outliers can wreck the pretrained features in a few steps, after which the network
predicts one class and the loss sits at ``ln(num_classes)`` for the rest of the run (seen on 8 px
digits: 19 epochs at exactly ln 10). :class:`DivergenceGuard` notices and repairs it:

- **non-finite loss** at any step;
- **loss far above its start**: after the warm-up, the loss's moving average exceeds both
  ``loss_factor`` times its starting value (the median over the warm-up steps) and ``ln(K)``, the
  loss of a uniform guess;
- **collapse**: over a whole epoch after the warm-up (training batches), or on the validation set
  at an epoch's end, one class takes at least ``collapse_share`` of the predictions while it is
  at most half of the labels, and the loss is no better than a uniform guess (``0.9 ln K``).
  Validation matters: with BatchNorm statistics drifting, training batches can look fine while
  the model in inference mode predicts one class. A collapse is only repaired when the last good
  state was known to be good: a fitted head (LP-FT), or an epoch whose validation balanced
  accuracy was clearly above chance (``1/K + (1 - 1/K) / 4``). A network trained from a random
  head passes through near-uniform predictions on its way (seen: 3 easy classes at chance for 3
  epochs, then 1.0), and that is no divergence.

It then restores the last good state (model and optimizer, kept in memory at the start and at
every healthy epoch end), multiplies every learning rate by ``lr_factor``, says so on the console
and records the event (``metrics.json``, ``divergence_guard``), and training continues. After
``max_retries`` repairs it gives up: the last good state is restored, training stops with a
message, and the run's best checkpoint stays what it was.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_warn

from visiontl.tasks.base import BaseTask
from visiontl.tasks.protocols import ReportsConfusion

__all__ = ["DivergenceGuard"]


class DivergenceGuard(Callback):
    """Restore the last good state and lower the learning rates when training diverges.

    Args:
        loss_factor: the moving-average loss may reach this multiple of its starting value.
        collapse_share: share of one epoch's predictions that one class may not reach.
        lr_factor: learning rates are multiplied by this at each repair.
        max_retries: repairs before giving up.
        warmup_steps: steps before the loss and collapse checks start (``None``: the task's
            warm-up, at least 5 steps).
    """

    def __init__(self, loss_factor: float = 4.0, collapse_share: float = 0.9, lr_factor: float = 0.1,
                 max_retries: int = 3, warmup_steps: int | None = None) -> None:
        if loss_factor <= 1 or not 0 < collapse_share <= 1 or not 0 < lr_factor < 1 or max_retries < 0:
            raise ValueError(f"DivergenceGuard: need loss_factor > 1, 0 < collapse_share <= 1, 0 < lr_factor < 1 "
                             f"and max_retries >= 0; got {loss_factor}, {collapse_share}, {lr_factor}, {max_retries}.")
        self.loss_factor, self.collapse_share, self.lr_factor = loss_factor, collapse_share, lr_factor
        self.max_retries, self.warmup_steps = int(max_retries), warmup_steps
        self.events: list[dict[str, Any]] = []
        self.gave_up = False
        self.lr_scale = 1.0
        self._start: list[float] = []
        self._ema: float | None = None
        self._good: dict[str, Any] | None = None
        self._reset_epoch()

    # -- bookkeeping ------------------------------------------------------------------------------
    def _reset_epoch(self) -> None:
        self._val: tuple[torch.Tensor, torch.Tensor, float, float] | None = None
        self._pred_counts: torch.Tensor | None = None
        self._label_counts: torch.Tensor | None = None
        self._loss_sum, self._loss_n = 0.0, 0

    def _warmup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        total = trainer.estimated_stepping_batches
        warm = pl_module.hparams.get("warmup", 0.05)
        return max(5, round(total * warm)) if math.isfinite(total) else 5

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, healthy: bool) -> None:
        self._good = {
            "healthy": healthy,
            "step": trainer.global_step,
            "lr_scale": self.lr_scale,
            "model": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizers": [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
        }

    def report(self) -> dict[str, Any]:
        """What the guard did: events (step, epoch, reason, learning-rate scale) and whether it gave up."""
        return {"events": list(self.events), "gave_up": self.gave_up, "lr_scale": self.lr_scale}

    def state_dict(self) -> dict[str, Any]:
        return {"events": self.events, "gave_up": self.gave_up, "start": self._start, "lr_scale": self.lr_scale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = list(state_dict.get("events", []))
        self.gave_up = bool(state_dict.get("gave_up", False))
        self._start = list(state_dict.get("start", []))
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))

    # -- hooks --------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fitted = bool(pl_module.strategy.fits_head) if isinstance(pl_module, BaseTask) else False
        self._snapshot(trainer, pl_module, healthy=fitted)  # after a fitted head (LP-FT): known good

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_epoch()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        value = float(loss.detach())
        step = trainer.global_step
        if not math.isfinite(value):
            self._repair(trainer, pl_module, f"non-finite loss ({value})")
            return
        warm = self._warmup(trainer, pl_module)
        num_classes = int(pl_module.hparams.get("num_classes") or 2)
        if step <= warm:
            self._start.append(value)
            return
        start = sorted(self._start)[len(self._start) // 2] if self._start else value
        # the average starts from the start value: one noisy batch moves it by a tenth, not all the way
        self._ema = 0.9 * (start if self._ema is None else self._ema) + 0.1 * value
        self._loss_sum, self._loss_n = self._loss_sum + value, self._loss_n + 1
        limit = max(self.loss_factor * start, math.log(num_classes))
        if self._ema > limit:
            self._repair(trainer, pl_module, f"loss {self._ema:.3g} (moving average) is above {limit:.3g} "
                                             f"({self.loss_factor:g} x its start {start:.3g}, and ln {num_classes})")
            return
        preds = outputs.get("preds") if isinstance(outputs, dict) else None
        labels = batch.get("label") if isinstance(batch, dict) else None
        if isinstance(preds, torch.Tensor) and isinstance(labels, torch.Tensor):
            p = torch.bincount(preds.detach().cpu().flatten(), minlength=num_classes)[:num_classes]
            y = torch.bincount(labels.detach().cpu().flatten().clamp(min=0), minlength=num_classes)[:num_classes]
            self._pred_counts = p if self._pred_counts is None else self._pred_counts + p
            self._label_counts = y if self._label_counts is None else self._label_counts + y

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        confusion = pl_module.last_confusion.get("val") if isinstance(pl_module, ReportsConfusion) else None
        loss = trainer.callback_metrics.get("val_loss")
        if trainer.sanity_checking or confusion is None or loss is None or trainer.global_step == 0:
            return
        confusion = confusion.double()
        recall = confusion.diagonal() / confusion.sum(1).clamp(min=1)
        present = confusion.sum(1) > 0
        balanced = float(recall[present].mean()) if bool(present.any()) else 0.0
        # predicted / true counts per class, the loss, and the balanced accuracy
        self._val = (confusion.sum(0), confusion.sum(1), float(loss), balanced)

    def _collapsed(self, counts: torch.Tensor | None, labels: torch.Tensor | None, loss: float,
                   num_classes: int, where: str) -> str | None:
        if counts is None or labels is None or num_classes < 2 or int(counts.sum()) < 2 * num_classes:
            return None
        top = int(counts.argmax())
        share = float(counts[top]) / float(counts.sum())
        label_share = float(labels[top]) / max(1.0, float(labels.sum()))
        if share >= self.collapse_share and label_share <= 0.5 and loss >= 0.9 * math.log(num_classes):
            return (f"collapse: class {top} took {share:.0%} of the {where} predictions ({label_share:.0%} of its "
                    f"labels), loss {loss:.3g}")
        return None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.gave_up:
            return
        num_classes = int(pl_module.hparams.get("num_classes") or 2)
        mean_loss = self._loss_sum / max(1, self._loss_n)
        reason = self._collapsed(self._pred_counts, self._label_counts, mean_loss, num_classes, "epoch's training")
        if reason is None and self._val is not None:
            reason = self._collapsed(*self._val[:3], num_classes, "validation")
        if reason is not None:
            if self._good is not None and self._good["healthy"]:
                self._repair(trainer, pl_module, reason)
            return  # from a state never shown good (a random head), near-uniform predictions are a phase
        chance = 1.0 / max(2, num_classes)
        good = self._val is not None and self._val[3] >= chance + (1 - chance) / 4
        if good or self._good is None or not self._good["healthy"]:
            self._snapshot(trainer, pl_module, healthy=good)  # the new last good state

    # -- the repair ------------------------------------------------------------------------------------
    def _repair(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        good = self._good
        event = {"step": trainer.global_step, "epoch": trainer.current_epoch, "reason": reason,
                 "restored_step": good["step"] if good else None}
        if good is not None:
            pl_module.load_state_dict(good["model"])
            for optimizer, state in zip(trainer.optimizers, good["optimizers"]):
                optimizer.load_state_dict(copy.deepcopy(state))
        repairs = len([e for e in self.events if e["action"] == "restored"])
        if repairs >= self.max_retries or good is None:
            self.gave_up = True
            trainer.should_stop = True
            self.events.append({**event, "action": "gave up"})
            rank_zero_warn(
                f"[visiontl] divergence guard: {reason} at step {event['step']}; training diverged {repairs + 1} "
                f"times, so it stops here with the state of step {event['restored_step']} (the best checkpoint is "
                f"kept). Lower the learning rate (strategy lr), use a smaller batch of steps, or try the 'logreg' "
                f"strategy, which cannot diverge."
            )
            return
        scale = self.lr_scale * self.lr_factor
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= scale / good["lr_scale"]  # the restored groups carry the snapshot's rates
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if hasattr(scheduler, "base_lrs"):  # the schedule sets lr = base_lr * factor(step) from here on
                scheduler.base_lrs = [lr * self.lr_factor for lr in scheduler.base_lrs]
        self.lr_scale = scale
        self.events.append({**event, "action": "restored", "lr_scale": scale})
        self._ema = None
        self._reset_epoch()
        rank_zero_warn(
            f"[visiontl] divergence guard: {reason} at step {event['step']}; restored the state of step "
            f"{event['restored_step']} and scaled the learning rates to {scale:g} x their plan (repair {repairs + 1} of "
            f"{self.max_retries})."
        )
