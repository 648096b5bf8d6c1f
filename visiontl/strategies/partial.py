"""Partial unfreezing: the last ``k`` backbone groups and the head train, the rest stays frozen."""

from __future__ import annotations

from visiontl.models.backbones import LayerGroup
from visiontl.strategies.base import Discriminative, GroupPlan, StrategyError

__all__ = ["Partial"]


class Partial(Discriminative):
    """Fine-tune the top of the network.

    Args:
        k: number of backbone groups (counted back from the head, the head not included) that
            train; must be between 1 and the number of backbone groups.
        lr: learning rate of the head.
        decay: per-group learning-rate decay going down from the head (1 = one learning rate).
        lr_range: fastai-style ``(lr_min, lr_max)`` over the trainable groups instead of ``decay``.
        train_bn: let BatchNorm layers of the frozen groups train.
        bn_stats: ``update`` or ``frozen`` running statistics in the training groups.
        regularizer: ``"l2sp"`` (with ``alpha``, ``beta``): see :class:`~visiontl.strategies.base.Discriminative`.
    """

    name = "partial"
    default_lr = 1e-3

    def __init__(
        self,
        k: int = 2,
        lr: float | None = None,
        decay: float = 1.0,
        lr_range: tuple[float, float] | None = None,
        train_bn: bool = False,
        bn_stats: str = "update",
        regularizer: str | None = None,
        alpha: float = 0.1,
        beta: float = 0.01,
    ) -> None:
        super().__init__(lr=lr, decay=decay, lr_range=lr_range, train_bn=train_bn, bn_stats=bn_stats,
                         regularizer=regularizer, alpha=alpha, beta=beta)
        self.k = int(k)
        if self.k < 1:
            raise StrategyError(f"partial: k must be >= 1 (k=0 is the 'probe' strategy), got {k}.")

    def plan(self, groups: list[LayerGroup]) -> list[GroupPlan]:
        body = len(groups) - 1
        if self.k > body:
            names = ", ".join(g.name for g in groups[:-1])
            raise StrategyError(
                f"partial: k={self.k} but this backbone has only {body} groups below the head "
                f"({names}); use k between 1 and {body}, or the 'full' strategy."
            )
        first = body - self.k
        lrs = self.lrs(self.k + 1)
        return [
            GroupPlan(g.name, g.numel, lrs[i - first] if i >= first else 0.0, i >= first)
            for i, g in enumerate(groups)
        ]
