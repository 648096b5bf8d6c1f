"""Bottleneck adapters: small zero-initialised residual branches, the only new weights that train.

- Transformers (timm blocks with an ``mlp``: ViT, DeiT, Swin, ConvNeXt): AdaptFormer (Chen et al.,
  NeurIPS 2022): a parallel branch beside each block's MLP, ``mlp(x) + scale * up(act(down(x)))``.
- CNNs (ResNet, EfficientNet, MobileNet, RegNet...): after each stage that timm's ``feature_info``
  names, ``y + up(act(down(y)))`` with 1x1 convolutions.

``up`` starts at zero, so an untrained adapter model computes exactly the base model. The branches
are attached as submodules of the blocks they extend and run from forward hooks, so every original
parameter keeps its name (weights, layer groups and checkpoints line up) and export traces them
like any layer: adapters deploy as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from visiontl.models.backbones import LayerGroup
from visiontl.strategies.base import StrategyError
from visiontl.strategies.full import Full

__all__ = ["Adapter", "Bottleneck"]


class Bottleneck(nn.Module):
    """``scale * up(act(down(x)))`` over the last dimension (``conv=False``) or channels (1x1 convs)."""

    def __init__(self, dim: int, hidden: int, scale: float = 1.0, conv: bool = False) -> None:
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.down, self.act, self.up = layer(dim, hidden), nn.GELU(), layer(hidden, dim)
        self.scale = float(scale)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.act(self.down(x)))


def _parallel(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    return output + module.adapter(inputs[0])


def _after(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    return output + module.adapter(output)


class Adapter(Full):
    """Bottleneck adapters beside every transformer MLP, or after every CNN stage; head in full.

    Args:
        hidden: bottleneck width (``None``: a quarter of the width, at least 8, at most 64).
        scale: output scale of the parallel branch (AdaptFormer's ``s``; 1 for CNN stages).
        lr: learning rate of the head and the adapters.
        decay: per-group decay going down from the head (default 1: one learning rate).
        lr_range: fastai-style ``(lr_min, lr_max)`` instead of ``decay``.
        train_bn: let the normalisation layers train too (affine parameters, and running
            statistics unless ``bn_stats="frozen"``).
        bn_stats: ``frozen`` (the default without ``train_bn``: BatchNorm statistics do not move)
            or ``update`` (the default with ``train_bn``).
    """

    name = "adapter"
    peft = True
    default_lr = 3e-3

    def __init__(self, hidden: int | None = None, scale: float = 0.1, lr: float | None = None, decay: float = 1.0,
                 lr_range: tuple[float, float] | None = None, train_bn: bool = False,
                 bn_stats: str | None = None) -> None:
        super().__init__(lr=lr, decay=decay, lr_range=lr_range, train_bn=train_bn, bn_stats=bn_stats,
                         head_init="model")  # its own prepare(); a zero-started head is measured for full only
        if hidden is not None and int(hidden) < 1:
            raise StrategyError(f"adapter: hidden must be >= 1, got {hidden}.")
        self.hidden = int(hidden) if hidden is not None else None
        self.scale = float(scale)
        self.attached: list[str] = []

    def _width(self, dim: int) -> int:
        return self.hidden or max(8, min(64, dim // 4))

    def prepare(self, model: nn.Module) -> nn.Module:
        mlps = [(name, module) for name, module in model.named_modules()
                if name.rsplit(".", 1)[-1] == "mlp" and isinstance(getattr(module, "fc1", None), nn.Linear)]
        if mlps:
            for name, mlp in mlps:
                mlp.adapter = Bottleneck(mlp.fc1.in_features, self._width(mlp.fc1.in_features), self.scale)
                mlp.register_forward_hook(_parallel)
                self.attached.append(name)
            return model
        info = getattr(model, "feature_info", None)
        stages = [(f["module"], int(f["num_chs"])) for f in (info or []) if f.get("module")]
        if not stages:
            raise StrategyError(f"adapter: {type(model).__name__} has neither transformer MLPs nor timm feature_info "
                                f"stages to attach adapters to.")
        for name, channels in stages:
            stage = model.get_submodule(name)
            if not any(True for _ in stage.parameters()):
                continue  # a stem activation, not a stage
            # a Sequential's children are its forward: the branch goes on its last block (same output)
            while isinstance(stage, nn.Sequential) and len(stage):
                name, stage = f"{name}.{len(stage) - 1}", stage[-1]
            stage.adapter = Bottleneck(channels, self._width(channels), 1.0, conv=True)
            stage.register_forward_hook(_after)
            self.attached.append(name)
        if not self.attached:
            raise StrategyError(f"adapter: found no stage of {type(model).__name__} to attach adapters to.")
        return model

    def trains(self, group: LayerGroup, name: str, param: nn.Parameter) -> bool:
        return group.name == "head" or ".adapter." in name

    def describe(self, groups: list[LayerGroup]) -> dict[str, Any]:
        report = super().describe(groups)
        report["adapter"] = {"attached": self.attached, "scale": self.scale, "hidden": self.hidden}
        return report
