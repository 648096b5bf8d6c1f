"""LP-FT (a fitted head, then the whole network) or fastai ``fine_tune`` (an SGD head epoch first).

Unfreezing is a plain Lightning callback (:class:`GradualUnfreezing`) that applies
:meth:`Gradual.trainable_at` at the start of every training epoch. Every group that will ever train
is in the optimizer from the first step with its final (discriminative) learning rate; frozen
parameters simply have no gradient, so the optimizer skips them. Unfreezing therefore never
reshapes the optimizer or the LR scheduler, and the trainable set is a function of the epoch alone:
a run resumed at any epoch, or in the middle of one, recomputes it and has no callback state to
restore.
"""

from __future__ import annotations

from typing import Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from visiontl.models.backbones import LayerGroup
from visiontl.strategies.base import Discriminative, GroupPlan, StrategyError
from visiontl.strategies.heads import LogisticRegression

__all__ = ["Gradual", "GradualUnfreezing"]


class Gradual(Discriminative):
    """LP-FT by default: a head fitted to convergence on cached features, then the whole network.

    With ``head="fit"`` (the default) the frozen backbone's features of the training images are
    computed once (and cached), a logistic-regression head is fitted on them to convergence with its
    penalty chosen by cross-validation (:class:`~visiontl.strategies.LogisticRegression`), and
    fine-tuning with discriminative learning rates starts from that head at the first step: linear
    probing then fine-tuning (LP-FT; Kumar et al., ICLR 2022, "Fine-Tuning can Distort Pretrained
    Features and Underperform Out-of-Distribution"). A converged head sends small, sensible
    gradients into the backbone; a fresh one trained for an epoch by SGD can still be far off (its
    logits exploding on a 1,280-wide feature vector) and its gradients wreck the pretrained
    features as soon as they unfreeze. The fitted head's accuracy is reported (``head_fit`` in
    ``strategy.json`` / ``metrics.json``), so what fine-tuning added is visible.

    With ``head="sgd"`` the head trains alone by SGD for ``head_epochs`` epochs first (fastai's
    ``fine_tune``).

    Args:
        head: ``"fit"`` (LP-FT) or ``"sgd"``.
        head_epochs: epochs during which only the head trains (``head="sgd"`` only; default 1).
        unfreeze: ``"all"`` unfreezes the whole backbone at once; ``"progressive"`` unfreezes one
            more group per epoch, from the head down (ULMFiT).
        lr: learning rate of the head.
        decay: per-group decay once unfrozen (``lr * decay ** distance_from_head``).
        lr_range: fastai-style ``(lr_min, lr_max)`` instead of ``decay``.
        train_bn: let BatchNorm layers of still-frozen groups train.
        bn_stats: ``frozen`` (default): normalisation layers stay in inference mode while their
            affine parameters train, so fine-tuning starts from exactly the features the head was
            fitted on, and small batches cannot drag the running statistics away (on 8 px digits,
            batch statistics took the fitted head's training loss from ~0 to 8.5 at the first
            step); ``update``: PyTorch's default.
        regularizer: ``"l2sp"`` (with ``alpha``, ``beta``): see :class:`~visiontl.strategies.base.Discriminative`.
    """

    name = "gradual"
    default_lr = 1e-3

    def __init__(
        self,
        head: Literal["fit", "sgd"] = "fit",
        head_epochs: int | None = None,
        unfreeze: Literal["all", "progressive"] = "all",
        lr: float | None = None,
        decay: float = 0.7,
        lr_range: tuple[float, float] | None = None,
        train_bn: bool = False,
        bn_stats: str = "frozen",
        regularizer: str | None = None,
        alpha: float = 0.1,
        beta: float = 0.01,
    ) -> None:
        super().__init__(lr=lr, decay=decay, lr_range=lr_range, train_bn=train_bn, bn_stats=bn_stats,
                         regularizer=regularizer, alpha=alpha, beta=beta)
        if head not in ("fit", "sgd"):
            raise StrategyError(f"gradual: head must be 'fit' (LP-FT) or 'sgd', got {head!r}.")
        if head_epochs is not None and head == "fit":
            raise StrategyError(f"gradual: head_epochs={head_epochs} only applies to head='sgd'; with head='fit' "
                                f"(LP-FT, the default) the head is fitted on cached features before the first step.")
        if head == "sgd":
            head_epochs = 1 if head_epochs is None else int(head_epochs)
        if head_epochs is not None and head_epochs < 0:
            raise StrategyError(f"gradual: head_epochs must be >= 0, got {head_epochs}.")
        if unfreeze not in ("all", "progressive"):
            raise StrategyError(f"gradual: unfreeze must be 'all' or 'progressive', got {unfreeze!r}.")
        self.head = head
        self.head_epochs = head_epochs
        self.unfreeze = unfreeze
        self._fitter = LogisticRegression()

    @property
    def fits_head(self) -> bool:
        return self.head == "fit"

    def fit_head(self, head: nn.Module, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 class_weight: torch.Tensor | None = None) -> None:
        """LP: the logistic-regression head, fitted to convergence (penalty by cross-validation)."""
        self._fitter.fit(head, features, labels, num_classes, class_weight)
        self.fit_report = self._fitter.fit_report

    def head_fit_unavailable(self, reason: str, distributed: bool = False) -> None:
        """No pooled features (a model without one classifier, plain or streamed data): the head
        trains alone by SGD for the first epoch instead (fastai's ``fine_tune``); under DDP, which
        cannot follow a trainable set that changes mid-run, every group trains from the first step."""
        if distributed:
            rank_zero_warn(f"[visiontl] {reason}; under DDP the trainable groups cannot change mid-run, so every "
                           f"group trains from the first step with the new head (no head-only epoch).")
            self.head, self.head_epochs = "sgd", 0
            return
        rank_zero_warn(f"[visiontl] {reason}; the head trains alone by SGD for the first epoch instead of being "
                       f"fitted.")
        self.head, self.head_epochs = "sgd", 1

    def plan(self, groups: list[LayerGroup]) -> list[GroupPlan]:
        lrs = self.lrs(len(groups))
        start = set(self.trainable_at(groups, 0))
        return [GroupPlan(g.name, g.numel, lr, g.name in start) for g, lr in zip(groups, lrs)]

    def trainable_at(self, groups: list[LayerGroup], epoch: int) -> list[str]:
        """Names of the groups that train during ``epoch`` (0-based)."""
        names = [g.name for g in groups]
        head_epochs = self.head_epochs if self.head == "sgd" and self.head_epochs else 0
        if epoch < head_epochs:
            return names[-1:]
        if self.unfreeze == "all":
            return names
        return names[-(epoch - head_epochs + 2):]

    def callbacks(self) -> list[pl.Callback]:
        return [GradualUnfreezing(self)]


class GradualUnfreezing(pl.Callback):
    """Applies :meth:`Gradual.trainable_at` when training starts and at the start of every epoch
    (the epoch is all it needs, so it keeps no state). Lightning does not call
    ``on_train_epoch_start`` for an epoch resumed in its middle, hence ``on_train_start`` too."""

    def __init__(self, strategy: Gradual) -> None:
        super().__init__()
        self.strategy = strategy

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.world_size <= 1:
            return
        groups = pl_module.groups
        if self.strategy.trainable_at(groups, 0) != self.strategy.trainable_at(groups, 10 ** 6):
            # DDP registers the parameters that train when it wraps the model; groups unfrozen later
            # would train on each rank's own gradients, silently apart (Lightning #20340)
            raise StrategyError(
                f"gradual with unfreeze={self.strategy.unfreeze!r} and head={self.strategy.head!r} changes which "
                f"groups train during the run, which DDP ({trainer.world_size} processes) cannot follow. Use "
                f"unfreeze='all' with the fitted head (the default), or train on one device.")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = int(trainer.current_epoch)
        names = self.strategy.trainable_at(pl_module.groups, epoch)
        if names != pl_module.trainable_groups:
            if trainer.world_size > 1 and trainer.global_step > 0:
                raise StrategyError(f"gradual: the trainable groups change at epoch {epoch}, which DDP cannot follow "
                                    f"(a head fitted by SGD first?); use unfreeze='all' with a fitted head, or one "
                                    f"device.")
            pl_module.set_trainable_groups(names)
            rank_zero_info(f"[visiontl] epoch {epoch}: training groups {', '.join(names)}")
