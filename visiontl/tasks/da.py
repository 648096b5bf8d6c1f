"""Domain-adaptation objectives and label-free validators, as plain functions of tensors.

Objectives (what :class:`~visiontl.tasks.AdaptationTask` adds to the source cross-entropy):

- :func:`mcc_loss`: Minimum Class Confusion (Jin et al., ECCV 2020). On the target predictions
  ``Y = softmax(Z / T)``, samples weighted by certainty ``1 + exp(-H(y_i))`` (normalised to the
  batch size), the class-confusion matrix ``C = Y^T W Y`` is normalised per class (column sums
  1) and its off-diagonal mass, divided by the number of classes, is the loss: confident,
  non-confused target predictions. No extra network.
- :func:`multilinear_map` and :func:`cdan_entropy_weights`: CDAN+E (Long et al., NeurIPS 2018).
  The domain discriminator sees the outer product of the features and the (detached) class
  predictions, so it aligns the joint distribution, not only the features; above ``max_dim``
  entries a fixed randomised map stands in for the outer product. With entropy conditioning (+E),
  each sample's domain loss is weighted by ``1 + exp(-H(g))``, normalised within its domain, so
  uncertain (hard to transfer) samples count less.

Target BatchNorm: :func:`reestimate_batchnorm` (AdaBN) replaces the running statistics by the
target images'.

Validators (model selection without target labels; higher is better for both):

- :func:`information_maximisation`: entropy of the mean prediction minus the mean entropy.
- :func:`soft_neighbourhood_density`: SND (Saito et al., ICCV 2021): the mean entropy of each
  target sample's softmax similarity (temperature 0.05) to the other target samples, computed on
  L2-normalised predictions: high when the target forms dense, well-populated neighbourhoods.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["cdan_entropy_weights", "entropy", "information_maximisation", "mcc_loss", "multilinear_map",
           "reestimate_batchnorm", "soft_neighbourhood_density"]


def entropy(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Shannon entropy (nats) of each row of a probability matrix."""
    return -(probs * probs.clamp_min(eps).log()).sum(dim=1)


def mcc_loss(logits: torch.Tensor, temperature: float = 2.5) -> torch.Tensor:
    """Minimum Class Confusion loss of a batch of target logits (see the module docstring)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    n, k = logits.shape
    probs = F.softmax(logits / temperature, dim=1)
    weights = 1.0 + torch.exp(-entropy(probs).detach())
    weights = n * weights / weights.sum()
    confusion = (probs * weights[:, None]).T @ probs  # K x K, symmetric
    confusion = confusion / confusion.sum(dim=0, keepdim=True)  # each class's column sums to 1
    return (confusion.sum() - confusion.trace()) / k


def multilinear_map(features: torch.Tensor, probs: torch.Tensor, projection: tuple[torch.Tensor, torch.Tensor] | None
                    = None) -> torch.Tensor:
    """CDAN's conditioning: ``features (B, d)`` x ``probs (B, K)`` -> ``(B, d * K)`` outer products,
    or with ``projection = (R_f (d, m), R_g (K, m))`` the randomised map ``(f R_f) * (g R_g) / sqrt(m)``
    of width ``m``. ``probs`` is detached (as in CDAN): the discriminator's gradient reaches the
    classifier only through the features."""
    probs = probs.detach()
    if projection is None:
        return torch.bmm(probs.unsqueeze(2), features.unsqueeze(1)).flatten(1)
    r_f, r_g = projection
    return (features @ r_f) * (probs @ r_g) / math.sqrt(r_f.shape[1])


def cdan_entropy_weights(probs: torch.Tensor, n_source: int) -> torch.Tensor:
    """CDAN+E sample weights: ``1 + exp(-H(g))``, normalised to sum to 1 within the source rows
    (the first ``n_source``) and within the target rows, then scaled by the number of rows, so an
    unweighted mean would give each domain the same total weight."""
    w = 1.0 + torch.exp(-entropy(probs.detach()))
    source, target = w[:n_source], w[n_source:]
    return torch.cat([source / source.sum(), target / target.sum()]) * len(w) / 2


def information_maximisation(probs: torch.Tensor) -> float:
    """IM: entropy of the mean prediction minus the mean entropy (``log K`` at best: confident
    and balanced; 0 for uniform predictions or a single predicted class)."""
    return float(entropy(probs.mean(dim=0, keepdim=True))[0] - entropy(probs).mean())


def soft_neighbourhood_density(probs: torch.Tensor, temperature: float = 0.05) -> float:
    """SND of target predictions (see the module docstring); ``probs`` is ``(N, K)``, ``N >= 2``."""
    if len(probs) < 2:
        raise ValueError("soft neighbourhood density needs at least 2 target samples.")
    unit = F.normalize(probs.float(), dim=1)
    total = 0.0
    for start in range(0, len(unit), 2048):  # rows in blocks: N x N at once would not fit for large N
        similarity = unit[start:start + 2048] @ unit.T
        rows = torch.arange(len(similarity))
        similarity[rows, rows + start] = float("-inf")  # a sample is not its own neighbour
        total += float(entropy(F.softmax(similarity / temperature, dim=1)).sum())
    return total / len(unit)


@torch.no_grad()
def reestimate_batchnorm(model: torch.nn.Module, batches: Iterable[torch.Tensor],
                         forward: Callable[[torch.Tensor], Any] | None = None) -> int:
    """AdaBN (Li et al. 2016): replace every BatchNorm layer's running statistics by those of
    ``batches`` (target images), weights untouched.

    The statistics are reset and re-accumulated as a cumulative average (``momentum=None``) while
    every other module stays in eval mode (no dropout, no drop-path); each layer's momentum and
    the model's train / eval modes are put back afterwards. With one batch, the running mean and
    variance equal that batch's mean and unbiased variance.

    Args:
        model: the network (changed in place).
        batches: image tensors, already on the model's device.
        forward: how to run the model on a batch (default ``model(x)``).

    Returns:
        The number of BatchNorm layers re-estimated (0: the model has none, nothing changed).
    """
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats]
    if not layers:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        seen = 0
        for x in batches:
            (forward or model)(x)
            seen += 1
        if not seen:
            raise ValueError("reestimate_batchnorm: no target batches were given.")
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.train(training)
    return len(layers)
