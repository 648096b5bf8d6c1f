"""Full fine-tuning with discriminative learning rates (layer-wise decay from the head down)."""

from __future__ import annotations

from visiontl.models.backbones import LayerGroup
from visiontl.strategies.base import Discriminative, GroupPlan

__all__ = ["Full"]


class Full(Discriminative):
    """Every group trains; group ``i`` gets ``lr * decay ** distance_from_head``.

    Args:
        lr: learning rate of the head.
        decay: per-group decay (default 0.7; 1 = one learning rate for the whole network).
        lr_range: fastai-style ``(lr_min, lr_max)``: geometric from the stem to the head.
        train_bn: unused (every group trains, so all BatchNorm layers do).
        bn_stats: ``update`` (default) or ``frozen``: normalisation layers in inference mode.
        regularizer: ``"l2sp"`` (with ``alpha``, ``beta``): see :class:`~visiontl.strategies.base.Discriminative`.
    """

    name = "full"
    default_lr = 1e-3

    def plan(self, groups: list[LayerGroup]) -> list[GroupPlan]:
        return [GroupPlan(g.name, g.numel, lr, True) for g, lr in zip(groups, self.lrs(len(groups)))]
