"""Loss terms that keep fine-tuning near what the pretrained model knew (``regularizer=`` of the
:class:`~visiontl.strategies.base.Discriminative` strategies)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from visiontl.models.weights import classifier_names

__all__ = ["l2sp_penalty"]


def l2sp_penalty(model: nn.Module, start: Mapping[str, torch.Tensor], alpha: float, beta: float) -> torch.Tensor:
    """L2-SP (Li, Grandvalet & Davoine, ICML 2018): ``alpha / 2 * sum ||w - w0||^2`` over the trainable
    parameters that have a pretrained value ``w0`` in ``start``, plus ``beta / 2 * sum ||w||^2`` over
    the trainable parameters of the new classifier. Frozen parameters add nothing (they sit at
    ``w0``); parameters with neither (prompts, adapters) are left alone."""
    heads = tuple(f"{name}." for name in classifier_names(model))
    near = far = None
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(heads):
            term = param.pow(2).sum()
            far = term if far is None else far + term
        elif name in start and start[name].shape == param.shape:
            term = (param - start[name]).pow(2).sum()
            near = term if near is None else near + term
    zero = next(model.parameters()).new_zeros(())
    return alpha / 2 * (near if near is not None else zero) + beta / 2 * (far if far is not None else zero)
