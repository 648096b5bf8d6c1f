"""Losses the strategies' fitted heads and the tasks share (torch only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE", "multilabel_loss"]

IGNORE = -1
"""The target of an (image, tag) pair without a label: left out of the loss and every metric."""


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None,
                    smoothing: float = 0.0) -> torch.Tensor:
    """Mean binary cross-entropy over the labelled (image, tag) pairs (targets 1 / 0; -1 left out).
    ``targets`` may be soft (between 0 and 1); ``smoothing`` moves them towards 0.5."""
    known = targets >= 0
    y = targets.clamp(min=0).to(logits.dtype)
    if smoothing:
        y = y * (1 - smoothing) + 0.5 * smoothing
    per_pair = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight, reduction="none")
    return (per_pair * known).sum() / known.sum().clamp(min=1)
