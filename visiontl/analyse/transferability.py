"""How well a frozen backbone's features fit your labels, before any fine-tuning.

Two label-aware scores of pooled features, higher is better; both take seconds on cached features:

- :func:`logme`: the log marginal evidence of a Bayesian linear model from features to one-hot
  labels, per sample and averaged over classes (You et al., "LogME: Practical Assessment of
  Pre-trained Models for Transfer Learning", ICML 2021; the fixed-point solver of "Ranking and
  Tuning Pre-trained Models", JMLR 2022). Its scale depends on the feature width, so compare
  backbones on the same data, not scores across data sets. It extends to multi-label data as the
  paper defines it, per target: the evidence of each tag's 0 / 1 column, over the images labelled
  for that tag, averaged over the tags.
- :func:`shrinkage_hscore`: the H-score ``tr(cov(f)^-1 cov(E[f | y]))`` (Bao et al., ICIP 2019)
  with the Ledoit-Wolf shrinkage covariance that makes it stable when features are wide and
  samples few (Ibrahim et al., "Newer is not always better", NeurIPS 2021). It compares the
  features' spread between and within classes, so it needs one class per image: multi-label
  labels are refused (:class:`MultiLabelScoreError`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["MultiLabelScoreError", "ledoit_wolf", "logme", "shrinkage_hscore"]


class MultiLabelScoreError(ValueError):
    """A score defined for one class per image was given multi-label targets."""


def _multilabel_inputs(features: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if f.ndim != 2 or len(f) != len(y):
        raise ValueError(f"features must be N x D and labels N x tags; got {f.shape} and {y.shape}.")
    if not np.isin(y, (-1.0, 0.0, 1.0)).all():
        raise ValueError("multi-label targets must be 1 (tag), 0 (not) or -1 (unlabelled).")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinite values.")
    return f, y


def _inputs(features: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if y.ndim == 2:
        raise MultiLabelScoreError("this score needs one class per image; the labels are multi-label (N x tags).")
    if f.ndim != 2 or y.ndim != 1 or len(f) != len(y):
        raise ValueError(f"features must be N x D and labels N long; got {f.shape} and {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise ValueError("labels must be class indices 0..C-1.")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinite values.")
    if len(np.unique(y)) < 2:
        raise ValueError("at least two classes are needed to score transferability.")
    return f, y.astype(np.int64)


def _basis(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > 1e-10
    return u[:, keep], s[keep] ** 2


def _evidence(u: np.ndarray, sigma: np.ndarray, t: np.ndarray, d: int, max_iter: int, tol: float) -> float:
    """The maximum log evidence per sample of ``t = f w + noise`` (``f = u diag(sqrt(sigma)) v``)."""
    n = len(t)
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
    return evidence / n


def logme(features: Any, labels: Any, max_iter: int = 11, tol: float = 1e-3) -> float:
    """LogME of ``features`` (N x D) for integer ``labels`` (N), averaged over the classes; or for
    multi-label targets (N x tags of 1 / 0 / -1), averaged over the tags.

    For each class the one-vs-rest target ``t`` is modelled as ``t = f w + noise`` with a Gaussian
    prior of precision ``alpha`` on ``w`` and noise precision ``beta``; ``alpha`` and ``beta`` are
    the evidence-maximising fixed point (found in the SVD basis of ``f``, a few iterations), and the
    score is that maximum log evidence divided by N. A tag's target is its 0 / 1 column over the
    images labelled for it (``-1`` left out); a tag that is on every such image or on none is
    skipped (there is nothing to predict).
    """
    if np.ndim(labels) == 2:
        f, y = _multilabel_inputs(features, labels)
        d = f.shape[1]
        shared = _basis(f)
        evidences = []
        for j in range(y.shape[1]):
            known = y[:, j] >= 0
            t = y[known, j]
            if len(t) < 2 or t.min() == t.max():
                continue
            u, sigma = shared if known.all() else _basis(f[known])
            evidences.append(_evidence(u, sigma, t, d, max_iter, tol))
        if not evidences:
            raise ValueError("no tag is both present and absent among the labelled images: nothing to score.")
        return float(np.mean(evidences))
    f, y = _inputs(features, labels)
    u, sigma = _basis(f)
    d = f.shape[1]
    return float(np.mean([_evidence(u, sigma, (y == c).astype(np.float64), d, max_iter, tol)
                          for c in range(int(y.max()) + 1)]))


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
