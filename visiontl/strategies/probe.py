"""Feature extraction: the backbone is frozen (BatchNorm statistics included), the head trains."""

from __future__ import annotations

import torch
from torch import nn

from visiontl.models.backbones import LayerGroup
from visiontl.strategies.base import GroupPlan, Strategy, StrategyError

__all__ = ["Probe"]

HEAD_INITS = ("zero", "model")


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
            gradients); ``"model"``: the backbone's own initialisation of its new classifier.
    """

    name = "probe"
    default_lr = 3e-3

    def __init__(self, lr: float | None = None, train_bn: bool = False, cache_features: bool = True,
                 views: int = 1, head_init: str = "zero") -> None:
        super().__init__(lr=lr, train_bn=train_bn)
        if views < 1:
            raise StrategyError(f"probe: views must be >= 1, got {views}.")
        if head_init not in HEAD_INITS:
            raise StrategyError(f"probe: head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}.")
        self.cache_features = cache_features and not train_bn
        self.views = int(views)
        self.head_init = head_init

    def prepare(self, model: nn.Module) -> nn.Module:
        """Zero the new linear classifier (``head_init="zero"``); a checkpoint's weights replace it later."""
        head = getattr(model, "get_classifier", lambda: None)()
        if self.head_init == "zero" and isinstance(head, nn.Linear):
            with torch.no_grad():
                head.weight.zero_()
                if head.bias is not None:
                    head.bias.zero_()
        return model

    def plan(self, groups: list[LayerGroup]) -> list[GroupPlan]:
        last = len(groups) - 1
        return [GroupPlan(g.name, g.numel, self.lr if i == last else 0.0, i == last) for i, g in enumerate(groups)]
