"""Visual prompt tuning (Jia et al., ECCV 2022) for timm Vision Transformers.

Learnable prompt tokens join the token sequence right after the class / register / distillation
tokens (timm's ``num_prefix_tokens``); the backbone stays frozen and only the prompts and the head
train.

- ``depth="shallow"``: one set of prompts, inserted before the first block; every block attends to
  them and carries them forward.
- ``depth="deep"``: a fresh set per block, which replaces the previous block's prompt outputs.

Prompts are dropped before the final norm, so pooling sees the model's own tokens only: class-token
(``global_pool="token"``) and average pooling (``"avg"``) both work unchanged. Each block's prompts
live on the block as the parameter ``vpt_prompt`` (its layer group and checkpoint name follow the
block) and run from forward pre-hooks, so every original parameter keeps its name and ONNX export
traces the prompts like any layer: VPT models deploy as they are.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from visiontl.models.backbones import LayerGroup
from visiontl.strategies.base import StrategyError
from visiontl.strategies.full import Full

__all__ = ["Vpt"]

PROMPT = "vpt_prompt"


def _insert(block: nn.Module, args: tuple[Any, ...], *, start: int) -> tuple[Any, ...]:
    x = args[0]
    prompt = getattr(block, PROMPT).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    return (torch.cat([x[:, :start], prompt, x[:, start:]], dim=1), *args[1:])


def _replace(block: nn.Module, args: tuple[Any, ...], *, start: int) -> tuple[Any, ...]:
    x = args[0]
    prompt = getattr(block, PROMPT)
    tokens = prompt.shape[0]
    prompt = prompt.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    return (torch.cat([x[:, :start], prompt, x[:, start + tokens:]], dim=1), *args[1:])


def _drop(norm: nn.Module, args: tuple[Any, ...], *, start: int, tokens: int) -> tuple[Any, ...]:
    x = args[0]
    return (torch.cat([x[:, :start], x[:, start + tokens:]], dim=1), *args[1:])


def _is_vit(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(model, VisionTransformer) and isinstance(getattr(model, "blocks", None), nn.Sequential)


class Vpt(Full):
    """Prompt tokens in a frozen Vision Transformer; prompts and head train.

    Args:
        tokens: prompt tokens per set (default 10).
        depth: ``shallow`` (one set at the input) or ``deep`` (a new set for every block).
        init: ``xavier`` (uniform, scaled to the patch size as in the VPT paper) or ``normal``
            (std 0.02, like timm's class token).
        dropout: dropout on the prompts (the paper's 0.1 for deep prompts helps on small sets).
        lr: learning rate of the head and the prompts.
        decay: per-group decay going down from the head (default 1: one learning rate).
        lr_range: fastai-style ``(lr_min, lr_max)`` instead of ``decay``.
        train_bn: let the normalisation layers' affine parameters train too.
        bn_stats: ``frozen`` or ``update`` (ViTs have no running statistics).
    """

    name = "vpt"
    peft = True
    default_lr = 1e-2

    def __init__(self, tokens: int = 10, depth: str = "shallow", init: str = "xavier", dropout: float = 0.0,
                 lr: float | None = None, decay: float = 1.0, lr_range: tuple[float, float] | None = None,
                 train_bn: bool = False, bn_stats: str | None = None) -> None:
        super().__init__(lr=lr, decay=decay, lr_range=lr_range, train_bn=train_bn, bn_stats=bn_stats,
                         head_init="model")  # its own prepare(); a zero-started head is measured for full only
        if int(tokens) < 1:
            raise StrategyError(f"vpt: tokens must be >= 1, got {tokens}.")
        if depth not in ("shallow", "deep"):
            raise StrategyError(f"vpt: depth must be 'shallow' or 'deep', got {depth!r}.")
        if init not in ("xavier", "normal"):
            raise StrategyError(f"vpt: init must be 'xavier' or 'normal', got {init!r}.")
        if not 0 <= float(dropout) < 1:
            raise StrategyError(f"vpt: dropout must be in [0, 1), got {dropout}.")
        self.tokens, self.depth, self.init, self.dropout = int(tokens), depth, init, float(dropout)

    def prepare(self, model: nn.Module) -> nn.Module:
        if not _is_vit(model):
            raise StrategyError(
                f"vpt: visual prompt tuning needs a timm Vision Transformer (vit_*, deit_*, test_vit...); "
                f"{type(model).__name__} has no token sequence to add prompts to. For CNNs use 'lora', "
                f"'adapter' or 'bitfit'.")
        dim = model.embed_dim
        start = int(model.num_prefix_tokens)
        patch = getattr(model.patch_embed, "patch_size", (16, 16))
        bound = math.sqrt(6.0 / float(3 * int(patch[0]) * int(patch[1]) + dim))
        blocks = list(model.blocks) if self.depth == "deep" else [model.blocks[0]]
        for i, block in enumerate(blocks):
            prompt = torch.empty(self.tokens, dim)
            if self.init == "xavier":
                nn.init.uniform_(prompt, -bound, bound)
            else:
                nn.init.trunc_normal_(prompt, std=0.02)
            block.register_parameter(PROMPT, nn.Parameter(prompt))
            hook = _insert if i == 0 else _replace
            block.register_forward_pre_hook(functools.partial(hook, start=start))
        if self.dropout:
            for block in blocks:
                block.vpt_dropout = nn.Dropout(self.dropout)
                block.register_forward_pre_hook(functools.partial(_prompt_dropout, start=start, tokens=self.tokens))
        model.norm.register_forward_pre_hook(functools.partial(_drop, start=start, tokens=self.tokens))
        return model

    def trains(self, group: LayerGroup, name: str, param: nn.Parameter) -> bool:
        return group.name == "head" or name.rsplit(".", 1)[-1] == PROMPT

    def describe(self, groups: list[LayerGroup]) -> dict[str, Any]:
        report = super().describe(groups)
        sets = sum(1 for g in groups for n in g.param_names if n.rsplit(".", 1)[-1] == PROMPT)
        report["vpt"] = {"tokens": self.tokens, "depth": self.depth, "prompt_sets": sets, "init": self.init}
        return report


def _prompt_dropout(block: nn.Module, args: tuple[Any, ...], *, start: int, tokens: int) -> tuple[Any, ...]:
    x = args[0]
    prompts = block.vpt_dropout(x[:, start:start + tokens])
    return (torch.cat([x[:, :start], prompts, x[:, start + tokens:]], dim=1), *args[1:])
