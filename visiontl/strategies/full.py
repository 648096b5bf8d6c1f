"""Full fine-tuning with discriminative learning rates (layer-wise decay from the head down)."""

from __future__ import annotations

from visiontl.backbones import LayerGroup
from visiontl.strategies.base import GroupPlan, Strategy, discriminative_lrs

__all__ = ["Full"]


class Full(Strategy):
    """Every group trains; group ``i`` gets ``lr * decay ** distance_from_head``.

    Args:
        lr: learning rate of the head.
        decay: per-group decay (1 = one learning rate for the whole network).
        lr_range: fastai-style ``(lr_min, lr_max)``: geometric from the stem to the head.
        train_bn: unused (every group trains, so all BatchNorm layers do).
    """

    name = "full"
    default_lr = 1e-3

    def __init__(
        self,
        lr: float | None = None,
        decay: float = 0.7,
        lr_range: tuple[float, float] | None = None,
        train_bn: bool = False,
    ) -> None:
        super().__init__(lr=lr, train_bn=train_bn)
        self.decay = decay
        self.lr_range = tuple(lr_range) if lr_range is not None else None
        discriminative_lrs(2, self.lr, decay, self.lr_range)  # validate early

    def plan(self, groups: list[LayerGroup]) -> list[GroupPlan]:
        lrs = discriminative_lrs(len(groups), self.lr, self.decay, self.lr_range)
        return [GroupPlan(g.name, g.numel, lr, True) for g, lr in zip(groups, lrs)]
