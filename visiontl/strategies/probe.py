"""Feature extraction: the backbone is frozen (BatchNorm statistics included), the head trains."""

from __future__ import annotations

from torch import nn

from visiontl.models.backbones import LayerGroup
from visiontl.strategies.base import GroupPlan, Strategy, StrategyError, check_head_init, init_head

__all__ = ["Probe"]


class Probe(Strategy):
    """Linear probe / feature extraction.

    With ``cache_features`` (default) the frozen backbone runs once over the data, its pooled
    features are cached on disk (:mod:`visiontl.models.features`) and the head trains on them: every
    epoch after the first costs a few milliseconds instead of a backbone pass.

    The head starts at zero (``head_init="zero"``): the training problem is then logistic
    regression started where L-BFGS starts it, and the first steps go into learning rather than
    into undoing a random head. timm's EfficientNet / MobileNet rule for a new classifier (uniform in
    +-1/sqrt(classes), whatever the feature width) gives large logits on their unnormalised pooled
    features, which a short run does not undo (``benchmarks/results/probe_budget.md``).

    Args:
        lr: learning rate of the head (default ``3e-3``).
        train_bn: let BatchNorm layers of the frozen backbone train (off: they stay frozen;
            on: features change while training, so nothing is cached).
        cache_features: train the head on cached features.
        views: augmented views per training image in the cache (1: no augmentation, the
            evaluation transform; more: that many passes with the training augmentations).
        head_init: ``"zero"``: a linear classifier starts with zero weights and bias (a head of
            several layers keeps its own initialisation: zeroing every layer would stop all
            gradients); ``"model"``: the backbone's own initialisation of its new classifier
            (:func:`~visiontl.strategies.base.init_head`).
    """

    name = "probe"
    default_lr = 3e-3

    def __init__(self, lr: float | None = None, train_bn: bool = False, cache_features: bool = True,
                 views: int = 1, head_init: str = "zero") -> None:
        super().__init__(lr=lr, train_bn=train_bn)
        if views < 1:
            raise StrategyError(f"probe: views must be >= 1, got {views}.")
        self.cache_features = cache_features and not train_bn
        self.views = int(views)
        self.head_init = check_head_init(head_init, self.name)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Start the new classifier as ``head_init`` says (:func:`~visiontl.strategies.base.init_head`)."""
        return init_head(model, self.head_init, self.name)

    def plan(self, groups: list[LayerGroup]) -> list[GroupPlan]:
        last = len(groups) - 1
        return [GroupPlan(g.name, g.numel, self.lr if i == last else 0.0, i == last) for i, g in enumerate(groups)]
