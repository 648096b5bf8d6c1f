"""How well a frozen backbone's features fit your labels, before any fine-tuning.

Two label-aware scores of pooled features, higher is better; both take seconds on cached features:

- :func:`logme`: the log marginal evidence of a Bayesian linear model from features to one-hot
  labels, per sample and averaged over classes (You et al., "LogME: Practical Assessment of
  Pre-trained Models for Transfer Learning", ICML 2021; the fixed-point solver of "Ranking and
  Tuning Pre-trained Models", JMLR 2022). Its scale depends on the feature width, so compare
  backbones on the same data, not scores across data sets.
- :func:`shrinkage_hscore`: the H-score ``tr(cov(f)^-1 cov(E[f | y]))`` (Bao et al., ICIP 2019)
  with the Ledoit-Wolf shrinkage covariance that makes it stable when features are wide and
  samples few (Ibrahim et al., "Newer is not always better", NeurIPS 2021).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["ledoit_wolf", "logme", "shrinkage_hscore"]


def _inputs(features: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or y.ndim != 1 or len(f) != len(y):
        raise ValueError(f"features must be N x D and labels N long; got {f.shape} and {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise ValueError("labels must be class indices 0..C-1.")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinite values.")
    if len(np.unique(y)) < 2:
        raise ValueError("at least two classes are needed to score transferability.")
    return f, y.astype(np.int64)


def logme(features: Any, labels: Any, max_iter: int = 11, tol: float = 1e-3) -> float:
    """LogME of ``features`` (N x D) for integer ``labels`` (N), averaged over the classes.

    For each class the one-vs-rest target ``t`` is modelled as ``t = f w + noise`` with a Gaussian
    prior of precision ``alpha`` on ``w`` and noise precision ``beta``; ``alpha`` and ``beta`` are
    the evidence-maximising fixed point (found in the SVD basis of ``f``, a few iterations), and the
    score is that maximum log evidence divided by N.
    """
    f, y = _inputs(features, labels)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > 1e-10
    u, sigma = u[:, keep], s[keep] ** 2
    evidences = []
    for c in range(int(y.max()) + 1):
        t = (y == c).astype(np.float64)
        x2 = (u.T @ t) ** 2
        rest = float(t @ t - x2.sum())  # the part of t outside the span of f
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            ratio = alpha / beta
            gamma = float((sigma / (sigma + ratio)).sum())
            m2 = float((sigma * x2 / (ratio + sigma) ** 2).sum())
            res2 = float((x2 / (1 + sigma / ratio) ** 2).sum()) + rest
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - ratio) / ratio <= tol:
                break
        evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - 0.5 * float(np.log(alpha + beta * sigma).sum())
                    - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def ledoit_wolf(x: Any) -> tuple[np.ndarray, float]:
    """The Ledoit-Wolf shrinkage covariance of ``x`` (N x D) and its shrinkage in [0, 1]:
    ``(1 - a) * S + a * mu * I`` with ``S`` the (1/N) empirical covariance and ``mu`` its mean
    eigenvalue (Ledoit & Wolf, J. Multivariate Analysis 2004)."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    n, d = x.shape
    cov = x.T @ x / n
    mu = float(np.trace(cov)) / d
    x2 = x**2
    spread = (float(np.sum(x2.T @ x2)) / n - float(np.sum(cov**2))) / (d * n)
    distance = (float(np.sum(cov**2)) - 2 * mu * float(np.trace(cov)) + d * mu**2) / d
    shrinkage = 0.0 if distance == 0 else min(spread, distance) / distance
    return (1 - shrinkage) * cov + shrinkage * mu * np.eye(d), shrinkage


def shrinkage_hscore(features: Any, labels: Any) -> float:
    """H-score with a Ledoit-Wolf covariance: ``tr(cov_a(f)^-1 (1 - a) cov(E[f | y]))``."""
    f, y = _inputs(features, labels)
    f = f - f.mean(axis=0, keepdims=True)
    cov, shrinkage = ledoit_wolf(f)
    means = np.zeros_like(f)
    for c in np.unique(y):
        means[y == c] = f[y == c].mean(axis=0)
    between = np.cov(means, rowvar=False)
    return float(np.trace(np.linalg.pinv(cov, rcond=1e-15) @ ((1 - shrinkage) * between)))
