"""Feature extraction: the backbone is frozen (BatchNorm statistics included), the head trains."""

from __future__ import annotations

from visiontl.models.backbones import LayerGroup
from visiontl.strategies.base import GroupPlan, Strategy, StrategyError

__all__ = ["Probe"]


class Probe(Strategy):
    """Linear probe / feature extraction.

    With ``cache_features`` (default) the frozen backbone runs once over the data, its pooled
    features are cached on disk (:mod:`visiontl.models.features`) and the head trains on them: every
    epoch after the first costs a few milliseconds instead of a backbone pass.

    Args:
        lr: learning rate of the head.
        train_bn: let BatchNorm layers of the frozen backbone train (off: they stay frozen;
            on: features change while training, so nothing is cached).
        cache_features: train the head on cached features.
        views: augmented views per training image in the cache (1: no augmentation, the
            evaluation transform; more: that many passes with the training augmentations).
    """

    name = "probe"
    default_lr = 1e-2

    def __init__(self, lr: float | None = None, train_bn: bool = False, cache_features: bool = True,
                 views: int = 1) -> None:
        super().__init__(lr=lr, train_bn=train_bn)
        if views < 1:
            raise StrategyError(f"probe: views must be >= 1, got {views}.")
        self.cache_features = cache_features and not train_bn
        self.views = int(views)

    def plan(self, groups: list[LayerGroup]) -> list[GroupPlan]:
        last = len(groups) - 1
        return [GroupPlan(g.name, g.numel, self.lr if i == last else 0.0, i == last) for i, g in enumerate(groups)]
