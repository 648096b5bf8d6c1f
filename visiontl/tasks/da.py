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
target images'; it is the package's one rule for re-estimating BatchNorm statistics (WiSE-FT's
``--bn recompute`` uses it on the training images).

Validators (model selection without target labels; higher is better for both):

- :func:`information_maximisation`: entropy of the mean prediction minus the mean entropy.
- :func:`soft_neighbourhood_density`: SND (Saito et al., ICCV 2021): the mean entropy of each
  target sample's softmax similarity (temperature 0.05) to the other target samples, computed on
  L2-normalised predictions: high when the target forms dense, well-populated neighbourhoods.
- :func:`deep_embedded_validation`: DEV (You et al., ICML 2019): the source validation loss,
  importance-weighted towards the target by a domain classifier on the features, with a control
  variate that cancels the weights' variance; an estimate of the target risk (lower is better;
  :class:`~visiontl.tasks.AdaptationTask` logs its negation as ``target_dev`` so that higher is
  better for every validator). Needs a labelled source validation split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from visiontl.strategies.linear_probe import fit_probe
from visiontl.strategies.heads import stratified_folds

__all__ = ["cdan_entropy_weights", "deep_embedded_validation", "dev_risk", "entropy", "importance_weights",
           "information_maximisation",
           "mcc_loss", "multilinear_map", "reestimate_batchnorm", "soft_neighbourhood_density", "weighted_dev_risk"]


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


def dev_risk(weights: torch.Tensor, losses: torch.Tensor) -> float:
    """DEV's target-risk estimate from per-sample source validation ``losses`` and importance
    ``weights`` (density ratio target / source): ``mean(w l) + eta mean(w) - eta`` with the control
    variate ``eta = -Cov(w l, w) / Var(w)`` (unbiased, ``ddof=1``); with constant weights, the
    weighted mean loss."""
    w, wl = weights.double().flatten(), (weights.double() * losses.double()).flatten()
    if len(w) < 2:
        raise ValueError("DEV needs at least 2 source validation samples.")
    var = float(w.var())
    eta = -float(((wl - wl.mean()) * (w - w.mean())).sum() / (len(w) - 1)) / var if var > 1e-12 else 0.0
    return float(wl.mean() + eta * w.mean() - eta)


DEV_L2_GRID = (10.0, 1.0, 0.1)
"""Penalties the domain classifier of :func:`importance_weights` chooses from (2-fold cross-validation)."""


def importance_weights(source: torch.Tensor, target: torch.Tensor, folds: int = 2, seed: int = 0) -> torch.Tensor:
    """Density ratios ``p_target(x) / p_source(x)`` of the ``source`` feature rows, from a
    logistic-regression domain classifier (the linear probe, :func:`visiontl.strategies.linear_probe.fit_probe`,
    its penalty by 2-fold cross-validation over :data:`DEV_L2_GRID`, 200 L-BFGS iterations).
    Cross-fitted: each source row's weight comes from a classifier fitted without it (``folds``
    folds of both domains), so the weights are not those of rows the classifier memorised. Scaled
    by the source / target counts it was fitted on, as in DEV."""
    with torch.inference_mode(False):  # validation runs in inference mode; the classifier is fitted by gradient
        return _importance_weights(torch.cat([source, target]).float().clone(), len(source), folds, seed)


def _importance_weights(x: torch.Tensor, n_source: int, folds: int, seed: int) -> torch.Tensor:
    source, target = x[:n_source], x[n_source:]
    domain = torch.cat([torch.zeros(len(source), dtype=torch.long), torch.ones(len(target), dtype=torch.long)])
    if len(source) < folds or len(target) < folds:
        raise ValueError(f"importance weights need at least {folds} source and {folds} target samples.")
    weights = torch.empty(len(source))
    for rows in stratified_folds(domain, folds, seed):
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[rows] = False
        fit_d = domain[keep]
        classifier = fit_probe(x[keep], fit_d, 2, folds=2, grid=DEV_L2_GRID, max_iter=200)
        held = rows[rows < len(source)]
        with torch.no_grad():
            p = F.softmax(classifier(x[held]), dim=1).double().clamp(1e-6, 1 - 1e-6)
        ratio = float((fit_d == 0).sum()) / float((fit_d == 1).sum())
        weights[held] = (p[:, 1] / p[:, 0] * ratio).float()
    return weights


def deep_embedded_validation(source_features: torch.Tensor, source_losses: torch.Tensor,
                             target_features: torch.Tensor, normalization: str | None = "max", folds: int = 2,
                             seed: int = 0) -> float:
    """DEV's estimate of the target risk (lower is better): :func:`dev_risk` of the source
    validation losses under :func:`importance_weights` from the features.

    ``normalization="max"`` (the default) divides the weights by their maximum first (DEVN,
    Musgrave et al. 2022): when the domains are far apart the raw ratios span orders of magnitude,
    the control variate then dominates and the raw estimate can go far below zero, ranking a bad
    model first; ``None``: the weights as estimated (You et al.)."""
    return weighted_dev_risk(importance_weights(source_features, target_features, folds, seed), source_losses,
                             normalization)


def weighted_dev_risk(weights: torch.Tensor, losses: torch.Tensor, normalization: str | None = "max") -> float:
    """:func:`dev_risk` after normalising the importance ``weights`` (``"max"``: divided by their
    maximum; ``None``: as they are)."""
    if normalization == "max":
        weights = weights / weights.max().clamp_min(1e-12)
    elif normalization is not None:
        raise ValueError(f"normalization must be 'max' or None, got {normalization!r}.")
    return dev_risk(weights, losses)


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
