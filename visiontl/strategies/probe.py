"""Feature extraction: the backbone is frozen (BatchNorm statistics included), the head trains."""

from __future__ import annotations

from visiontl.backbones import LayerGroup
from visiontl.strategies.base import GroupPlan, Strategy

__all__ = ["Probe"]


class Probe(Strategy):
    """Linear probe / feature extraction.

    Args:
        lr: learning rate of the head.
        train_bn: let BatchNorm layers of the frozen backbone train (off: they stay frozen).
    """

    name = "probe"
    default_lr = 1e-2

    def plan(self, groups: list[LayerGroup]) -> list[GroupPlan]:
        last = len(groups) - 1
        return [GroupPlan(g.name, g.numel, self.lr if i == last else 0.0, i == last) for i, g in enumerate(groups)]
