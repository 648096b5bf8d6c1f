"""Training from random initialisation: the baseline every transfer comparison needs."""

from __future__ import annotations

from visiontl.models.backbones import LayerGroup
from visiontl.strategies.base import GroupPlan, Strategy

__all__ = ["Scratch"]


class Scratch(Strategy):
    """Same architecture, random weights, every group trains at one learning rate.

    Args:
        lr: learning rate.
        train_bn: unused (everything trains).
    """

    name = "scratch"
    default_lr = 3e-3
    uses_pretrained = False

    def plan(self, groups: list[LayerGroup]) -> list[GroupPlan]:
        return [GroupPlan(g.name, g.numel, self.lr, True) for g in groups]
