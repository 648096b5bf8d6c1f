"""fastai ``fine_tune``-style training: the head alone first, then unfreeze the backbone.

Unfreezing is a Lightning :class:`~pytorch_lightning.callbacks.BaseFinetuning` callback. Every
group that will ever train is in the optimizer from the first step with its final
(discriminative) learning rate; frozen parameters simply have no gradient, so the optimizer skips
them. Unfreezing therefore never reshapes the optimizer or the LR scheduler, and resuming from a
checkpoint at any epoch recomputes the same set of trainable groups.
"""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BaseFinetuning
from pytorch_lightning.utilities import rank_zero_info
from torch.optim import Optimizer

from visiontl.backbones import LayerGroup
from visiontl.strategies.base import Discriminative, GroupPlan, StrategyError

__all__ = ["Gradual", "GradualUnfreezing"]


class Gradual(Discriminative):
    """Head only for ``head_epochs`` epochs, then the backbone with discriminative learning rates.

    Args:
        head_epochs: epochs during which only the head trains.
        unfreeze: ``"all"`` unfreezes the whole backbone at once (fastai's ``fine_tune``);
            ``"progressive"`` unfreezes one more group per epoch, from the head down (ULMFiT).
        lr: learning rate of the head.
        decay: per-group decay once unfrozen (``lr * decay ** distance_from_head``).
        lr_range: fastai-style ``(lr_min, lr_max)`` instead of ``decay``.
        train_bn: let BatchNorm layers of still-frozen groups train.
    """

    name = "gradual"
    default_lr = 1e-3

    def __init__(
        self,
        head_epochs: int = 1,
        unfreeze: Literal["all", "progressive"] = "all",
        lr: float | None = None,
        decay: float = 0.7,
        lr_range: tuple[float, float] | None = None,
        train_bn: bool = False,
    ) -> None:
        super().__init__(lr=lr, decay=decay, lr_range=lr_range, train_bn=train_bn)
        if head_epochs < 0:
            raise StrategyError(f"gradual: head_epochs must be >= 0, got {head_epochs}.")
        if unfreeze not in ("all", "progressive"):
            raise StrategyError(f"gradual: unfreeze must be 'all' or 'progressive', got {unfreeze!r}.")
        self.head_epochs = int(head_epochs)
        self.unfreeze = unfreeze

    def plan(self, groups: list[LayerGroup]) -> list[GroupPlan]:
        lrs = self.lrs(len(groups))
        start = set(self.trainable_at(groups, 0))
        return [GroupPlan(g.name, g.numel, lr, g.name in start) for g, lr in zip(groups, lrs)]

    def trainable_at(self, groups: list[LayerGroup], epoch: int) -> list[str]:
        """Names of the groups that train during ``epoch`` (0-based)."""
        names = [g.name for g in groups]
        if epoch < self.head_epochs:
            return names[-1:]
        if self.unfreeze == "all":
            return names
        return names[-(epoch - self.head_epochs + 2):]

    def callbacks(self) -> list[pl.Callback]:
        return [GradualUnfreezing(self)]


class GradualUnfreezing(BaseFinetuning):
    """Applies :meth:`Gradual.trainable_at` at the start of every training epoch."""

    def __init__(self, strategy: Gradual) -> None:
        super().__init__()
        self.strategy = strategy
        self._current: list[str] | None = None

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        pl_module.set_trainable_groups(self.strategy.trainable_at(pl_module.groups, 0))

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        names = self.strategy.trainable_at(pl_module.groups, epoch)
        if names != self._current:
            pl_module.set_trainable_groups(names)
            if self._current is not None:
                rank_zero_info(f"[visiontl] epoch {epoch}: training groups {', '.join(names)}")
            self._current = names

    def state_dict(self) -> dict[str, Any]:
        return {"current": self._current}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._current = state_dict.get("current")
