"""BitFit: only the biases and the normalisation layers' affine parameters train, plus the head.

Ben Zaken et al. (ACL 2022) fine-tune BERT by its bias terms alone; for vision backbones the
normalisation scales and shifts are the natural companions (they re-scale every channel). Well
under 1 % of a ResNet's or ViT's parameters train, every layer of the network adapts a little, and
nothing is added to the model: it exports as it is. BatchNorm running statistics stay frozen
(``bn_stats="frozen"``) while their affine parameters train.
"""

from __future__ import annotations

from torch import nn

from visiontl.models.backbones import LayerGroup
from visiontl.strategies.full import Full

__all__ = ["BitFit", "norm_affine_names"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def norm_affine_names(model: nn.Module) -> set[str]:
    """Names of the affine parameters (weight, bias) of every normalisation layer: BatchNorm (and
    timm's BatchNormAct), LayerNorm (and LayerNorm2d), GroupNorm, and any module whose class name
    ends in ``Norm`` (RMSNorm...)."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _NORMS) or type(module).__name__.endswith("Norm"):
            prefix = f"{module_name}." if module_name else ""
            names.update(f"{prefix}{p}" for p, _ in module.named_parameters(recurse=False))
    return names


class BitFit(Full):
    """Biases and normalisation affine parameters everywhere, plus the whole head.

    Args:
        lr: learning rate of the head (the backbone's biases and norms get ``lr * decay ** distance``).
        decay: per-group decay going down from the head (default 1: one learning rate).
        lr_range: fastai-style ``(lr_min, lr_max)`` instead of ``decay``.
        train_bn: unused (the norms' affine parameters always train; their statistics follow ``bn_stats``).
        bn_stats: ``frozen`` (default: BatchNorm statistics do not move) or ``update``.
    """

    name = "bitfit"
    peft = True
    default_lr = 3e-3

    def __init__(self, lr: float | None = None, decay: float = 1.0, lr_range: tuple[float, float] | None = None,
                 train_bn: bool = False, bn_stats: str = "frozen") -> None:
        super().__init__(lr=lr, decay=decay, lr_range=lr_range, train_bn=train_bn, bn_stats=bn_stats,
                         head_init="model")  # its own prepare(); a zero-started head is measured for full only
        self._norm_params: set[str] = set()

    def prepare(self, model: nn.Module) -> nn.Module:
        self._norm_params = norm_affine_names(model)
        return model

    def trains(self, group: LayerGroup, name: str, param: nn.Parameter) -> bool:
        return group.name == "head" or name.endswith(".bias") or name in self._norm_params
