"""LoRA on any timm backbone, with HF ``peft``'s layers: low-rank updates beside frozen weights.

Targets are resolved from the model itself, per family, never from a hard-coded architecture:

- transformers (ViT, DeiT, Swin, and ConvNeXt's MLPs): the ``Linear`` layers named ``qkv``,
  ``proj``, ``fc1`` and ``fc2``; with ``qkv="qv"`` the fused ``qkv`` layer adapts its query and
  value projections only (the original LoRA paper's choice): the key rows of its ``lora_B`` stay
  at zero (their gradient is masked), so the key projection is exactly the pretrained one;
- CNNs (ResNet, EfficientNet, MobileNet, RegNet...): every 1x1 and k x k convolution. Depthwise
  and grouped convolutions are left out (a rank-r update of a grouped kernel does not keep its
  group structure) and listed in the strategy report.

The classifier is never wrapped (it trains in full, as the head), whatever ``targets`` says.
``lora_B`` starts at zero, so an untrained LoRA model computes exactly the base model. For export,
:meth:`Lora.merge` folds every update into its base weight and puts the plain layer back: the
deployed graph is a plain timm model.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from timm.layers import Conv2dSame
from torch import nn

from visiontl.models.backbones import LayerGroup
from visiontl.strategies.base import StrategyError
from visiontl.strategies.full import Full

__all__ = ["Lora", "lora_targets"]

_TRANSFORMER_NAMES = ("qkv", "proj", "fc1", "fc2")
_PEFT_HINT = "LoRA needs HF peft: pip install 'visiontl[peft]' (or pip install peft)"


class _PeftConv2dSame(Conv2dSame):
    """timm's TensorFlow-"SAME" convolution, accepting the ``padding_mode`` keyword that peft >= 0.22
    passes when it builds ``lora_A`` with the base layer's own class (timm's constructor has no such
    keyword: its padding is always zeros). A wrapped ``Conv2dSame`` takes this class for the time it
    carries LoRA, so ``lora_A`` keeps the base layer's dynamic padding; :meth:`Lora.merge` gives the
    plain class back."""

    def __init__(self, *args: Any, padding_mode: str = "zeros", **kwargs: Any) -> None:
        if padding_mode != "zeros":
            raise ValueError(f"Conv2dSame pads with zeros, not {padding_mode!r}.")
        super().__init__(*args, **kwargs)


def _classifier_prefixes(model: nn.Module) -> list[str]:
    from visiontl.models.weights import classifier_names

    return classifier_names(model)


def lora_targets(model: nn.Module, targets: list[str] | None = None) -> tuple[list[str], list[str]]:
    """The module names LoRA wraps, and the ones it leaves out with why.

    ``targets``: module names or regular expressions (full match) overriding the family rule.
    """
    heads = _classifier_prefixes(model)
    modules = {name: module for name, module in model.named_modules()
               if name and not any(name == h or name.startswith(h + ".") for h in heads)}
    skipped: list[str] = []
    if targets:
        chosen = [n for n in modules if any(n == t or re.fullmatch(t, n) for t in targets)]
        if not chosen:
            layers = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
            raise StrategyError(f"lora: targets {targets} match no module of {type(model).__name__}; its Linear / "
                                f"Conv2d layers are: {', '.join(layers[:40])}{' ...' if len(layers) > 40 else ''}.")
        bad = [n for n in chosen if not isinstance(modules[n], (nn.Linear, nn.Conv2d))]
        if bad:
            raise StrategyError(f"lora: targets must be Linear or Conv2d layers; {', '.join(bad[:10])} are not.")
        return chosen, skipped
    linear = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in _TRANSFORMER_NAMES]
    if linear:
        return linear, skipped
    chosen = []
    for name, module in modules.items():
        if isinstance(module, nn.Conv2d):
            if module.groups > 1:
                skipped.append(f"{name} (grouped / depthwise: {module.groups} groups)")
            else:
                chosen.append(name)
    if not chosen:
        raise StrategyError(f"lora: found no qkv / proj / fc1 / fc2 Linear layer and no convolution in "
                            f"{type(model).__name__}; name the layers with targets=[...].")
    return chosen, skipped


def _layer_rank(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return min(module.in_features, module.out_features)
    assert isinstance(module, nn.Conv2d)
    k = module.kernel_size[0] * module.kernel_size[1]
    return min(module.in_channels * k // module.groups, module.out_channels)


class Lora(Full):
    """Low-rank adaptation: frozen backbone weights, trainable rank-``r`` updates, a full head.

    Args:
        r: rank of the updates.
        alpha: scaling numerator (the update is ``alpha / r * B A``).
        dropout: dropout on the LoRA branch's input.
        targets: module names or regular expressions to wrap instead of the family rule.
        qkv: ``all`` (query, key and value of a fused ``qkv`` layer adapt) or ``qv`` (query and
            value only; the key projection stays the pretrained one).
        lr: learning rate of the head and the updates (``decay`` spreads it down the groups).
        decay: per-group decay going down from the head (default 1: one learning rate).
        lr_range: fastai-style ``(lr_min, lr_max)`` instead of ``decay``.
        train_bn: let the normalisation layers train too (affine parameters, and running
            statistics unless ``bn_stats="frozen"``).
        bn_stats: ``frozen`` (the default without ``train_bn``: BatchNorm statistics do not move)
            or ``update`` (the default with ``train_bn``).
    """

    name = "lora"
    peft = True
    default_lr = 3e-3

    def __init__(self, r: int = 8, alpha: float | None = None, dropout: float = 0.0, targets: list[str] | None = None,
                 qkv: str = "all", lr: float | None = None, decay: float = 1.0,
                 lr_range: tuple[float, float] | None = None, train_bn: bool = False,
                 bn_stats: str | None = None) -> None:
        super().__init__(lr=lr, decay=decay, lr_range=lr_range, train_bn=train_bn, bn_stats=bn_stats,
                         head_init="model")  # its own prepare(); a zero-started head is measured for full only
        if int(r) < 1:
            raise StrategyError(f"lora: r must be >= 1, got {r}.")
        if not 0 <= float(dropout) < 1:
            raise StrategyError(f"lora: dropout must be in [0, 1), got {dropout}.")
        self.r, self.alpha, self.dropout = int(r), float(alpha if alpha is not None else 2 * int(r)), float(dropout)
        self.targets = list(targets) if targets else None
        if qkv not in ("all", "qv"):
            raise StrategyError(f"lora: qkv must be 'all' or 'qv', got {qkv!r}.")
        self.qkv = qkv
        self.pinned = 0
        self.wrapped: list[str] = []
        self.skipped: list[str] = []

    def prepare(self, model: nn.Module) -> nn.Module:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as err:
            raise StrategyError(f"{_PEFT_HINT} ({err}).") from err
        chosen, self.skipped = lora_targets(model, self.targets)
        modules = dict(model.named_modules())
        too_small = [f"{n} (rank {_layer_rank(modules[n])})" for n in chosen if _layer_rank(modules[n]) < self.r]
        if too_small:
            raise StrategyError(f"lora: r={self.r} is larger than what these layers can hold: "
                                f"{', '.join(too_small[:10])}; use r <= {min(_layer_rank(modules[n]) for n in chosen)} "
                                f"or other targets.")
        for name in chosen:
            if type(modules[name]) is Conv2dSame:
                modules[name].__class__ = _PeftConv2dSame
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=chosen,
                            bias="none")
        model = inject_adapter_in_model(config, model)
        self.wrapped = chosen
        if self.qkv == "qv":
            self._pin_keys(model)
        return model

    def _pin_keys(self, model: nn.Module) -> None:
        """Hold the key rows of every fused ``qkv`` layer's ``lora_B`` at zero (masked gradient)."""
        from peft.tuners.lora import LoraLayer

        fused = [(name, module) for name, module in model.named_modules()
                 if isinstance(module, LoraLayer) and name.rsplit(".", 1)[-1] == "qkv"]
        if not fused:
            raise StrategyError("lora: qkv='qv' needs fused qkv layers among the targets (ViT, DeiT, Swin); "
                                "this model has none.")
        self.pinned = 0
        for _, module in fused:
            weight = module.lora_B["default"].weight
            if weight.shape[0] % 3:
                raise StrategyError(f"lora: qkv='qv': a fused qkv layer of {weight.shape[0]} outputs is not three "
                                    f"equal projections.")
            dim = weight.shape[0] // 3
            weight.register_hook(functools.partial(_zero_rows, start=dim, stop=2 * dim))
            self.pinned += dim * weight.shape[1]

    def trains(self, group: LayerGroup, name: str, param: nn.Parameter) -> bool:
        return group.name == "head" or ".lora_" in name

    def describe(self, groups: list[LayerGroup]) -> dict[str, Any]:
        report = super().describe(groups)
        report["trainable_params"] -= self.pinned  # key rows held at zero
        report["lora"] = {"r": self.r, "alpha": self.alpha, "qkv": self.qkv, "wrapped": len(self.wrapped),
                          "wrapped_modules": self.wrapped, "left_out": self.skipped}
        return report

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold every LoRA update into its base weight and put the plain layer back (in place)."""
        from peft.tuners.lora import LoraLayer

        layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
        if not layers:
            raise StrategyError("lora: this model has no LoRA layers to merge (merged already, or never prepared).")
        for name, module in layers:
            module.merge(safe_merge=True)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = module.get_base_layer()
            if type(base) is _PeftConv2dSame:
                base.__class__ = Conv2dSame
            setattr(parent, attr, base)
        return model


def _zero_rows(grad: torch.Tensor, *, start: int, stop: int) -> torch.Tensor:
    grad = grad.clone()
    grad[start:stop] = 0
    return grad
