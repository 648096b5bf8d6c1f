"""Full fine-tuning with discriminative learning rates (layer-wise decay from the head down)."""

from __future__ import annotations

from torch import nn

from visiontl.models.backbones import LayerGroup
from visiontl.strategies.base import Discriminative, GroupPlan, check_head_init, init_head

__all__ = ["Full"]


class Full(Discriminative):
    """Every group trains; group ``i`` gets ``lr * decay ** distance_from_head``.

    One stage: the new head and every backbone group train together from the first step. The
    normalisation layers stay in inference mode by default (``bn_stats="frozen"``): they keep
    normalising with the pretrained running statistics while their affine parameters train, so the
    small batches of a small data set neither replace those statistics with noisy per-batch ones
    nor make training and evaluation see different features. The new classifier starts at zero
    (``head_init="zero"``): at the first step no gradient reaches the pretrained layers, and they
    start moving only as the head learns, instead of being torn by a random head's errors (the
    benchmark and its numbers: ``benchmarks/results/defaults.md``).

    Args:
        lr: learning rate of the head.
        decay: per-group decay (default 0.7; 1 = one learning rate for the whole network).
        lr_range: fastai-style ``(lr_min, lr_max)``: geometric from the stem to the head.
        train_bn: unused (every group trains, so all BatchNorm affine parameters do).
        bn_stats: ``frozen`` (default): normalisation layers in inference mode, running statistics
            kept from pretraining; ``update``: they follow each training batch (PyTorch's default).
        regularizer: ``"l2sp"`` (with ``alpha``, ``beta``): see :class:`~visiontl.strategies.base.Discriminative`.
        head_init: ``"zero"`` (default) or ``"model"`` (the backbone's own random initialisation of
            its new classifier): :func:`~visiontl.strategies.base.init_head`.
    """

    name = "full"
    default_lr = 1e-3

    def __init__(
        self,
        lr: float | None = None,
        decay: float = 0.7,
        lr_range: tuple[float, float] | None = None,
        train_bn: bool = False,
        bn_stats: str = "frozen",
        regularizer: str | None = None,
        alpha: float = 0.1,
        beta: float = 0.01,
        head_init: str = "zero",
    ) -> None:
        super().__init__(lr=lr, decay=decay, lr_range=lr_range, train_bn=train_bn, bn_stats=bn_stats,
                         regularizer=regularizer, alpha=alpha, beta=beta)
        self.head_init = check_head_init(head_init, self.name)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Start the new classifier as ``head_init`` says."""
        return init_head(model, self.head_init, self.name)

    def plan(self, groups: list[LayerGroup]) -> list[GroupPlan]:
        return [GroupPlan(g.name, g.numel, lr, True) for g, lr in zip(groups, self.lrs(len(groups)))]
