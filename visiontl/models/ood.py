"""Abstention on unfamiliar inputs: an out-of-distribution score per prediction and a threshold.

A classifier answers every image with one of its classes, a photo of a cat sent to an X-ray model
included. :class:`OODDetector` gives each prediction a score of how unlike the training images the
input is (higher: less familiar), and a threshold above which the prediction is flagged
``abstain``. Four scores are measured (``benchmarks/ood.py``):

- ``msp``: the maximum softmax probability, negated (Hendrycks and Gimpel 2017); for multi-label
  models, the mean confidence of the per-tag decisions, negated;
- ``energy``: the free energy ``-logsumexp(logits)`` (Liu et al. 2020); for multi-label models the
  joint energy ``-sum softplus(logits)`` (Wang et al. 2021);
- ``mahalanobis``: the smallest Mahalanobis distance of the pooled features to a class mean, under
  one covariance shared by the classes (Lee et al. 2018), estimated with scikit-learn's Ledoit-Wolf
  shrinkage (a few hundred images in 1,000+ feature dimensions give a singular sample covariance);
  multi-label models: one mean;
- ``knn``: the cosine distance of the L2-normalised pooled features to their ``k``-th nearest
  training image (Sun et al. 2022): label-free, so it is the same for single- and multi-label
  models.

The logits the scores read are the calibrated ones (:mod:`visiontl.analyse.calibration`), as the
deployed model computes them. Feature statistics (class means and covariance, the neighbour bank)
come from the training images read with the evaluation transform; the threshold from the
validation images, which fitted none of them: the score of the ``accept`` quantile (95 %) of the
validation images, so about 95 % of images like the validation images are accepted.

The after-fit step that fits it for every run is :class:`visiontl.analyse.ood.Abstention`. The
detector is a small :class:`torch.nn.Module` on (pooled features, logits): it travels in the
checkpoint (its ``visiontl`` record, under ``ood``: tensors and settings, loaded with ``weights_only``) and into the
ONNX graph as a third output, ``ood_score``, with the threshold in the metadata, so the deployed
model abstains exactly as the measured one did. pytorch-ood implements the same scores, but as
detectors that fit from data loaders and are not built for export (and its Mahalanobis inverts an
unshrunk covariance), so the deployed form is this module; the covariance is scikit-learn's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACCEPT", "DEFAULT_SCORE", "SCORES", "OODDetector", "cut", "fit_detector", "with_threshold"]

SCORES = ("msp", "energy", "mahalanobis", "knn")
DEFAULT_SCORE = "knn"  # the best measured by benchmarks/ood.py
ACCEPT = 0.95  # share of in-distribution validation images accepted at the threshold
KNN_K = 1
BANK_LIMIT = 4096  # neighbours kept: a bank of 4,096 x 1,280 float32 adds 21 MB to a model
MIN_IMAGES = 20  # validation images needed to set a threshold
_TENSORS = {"msp": (), "energy": (), "mahalanobis": ("means", "whitening"), "knn": ("bank",)}


class OODDetector(nn.Module):
    """An out-of-distribution score on (pooled features, logits): higher is less familiar.

    Args:
        score: one of :data:`SCORES`.
        tensors: the fitted statistics (``mahalanobis``: ``means`` (C, D) and ``whitening`` (D, D),
            with ``precision = whitening @ whitening.T``; ``knn``: ``bank`` (N, D), L2-normalised).
        threshold: scores above it abstain (None: no abstention, the score only).
        accept: the share of validation images the threshold accepts (recorded).
        multilabel: the model decides each tag on its own (``msp`` and ``energy`` differ).
        k: the neighbour ``knn`` measures the distance to.
    """

    def __init__(self, score: str, tensors: dict[str, torch.Tensor] | None = None, threshold: float | None = None,
                 accept: float = ACCEPT, multilabel: bool = False, k: int = KNN_K) -> None:
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"unknown out-of-distribution score {score!r}; choose from {', '.join(SCORES)}.")
        self.score, self.threshold, self.accept = score, threshold, float(accept)
        self.multilabel, self.k = bool(multilabel), int(k)
        tensors = tensors or {}
        missing = [n for n in _TENSORS[score] if n not in tensors]
        if missing:
            raise ValueError(f"the {score} score needs fitted {', '.join(missing)}.")
        for name in _TENSORS[score]:
            self.register_buffer(name, tensors[name].detach().float().cpu().contiguous())
        if score == "knn" and not 1 <= self.k <= len(self.bank):
            raise ValueError(f"knn needs 1 <= k <= {len(self.bank)} (the bank's images), got k={self.k}.")

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The score of each image, shape (B,)."""
        if self.score == "msp":
            if self.multilabel:
                p = logits.sigmoid()
                return -torch.maximum(p, 1 - p).mean(dim=1)
            return -logits.softmax(dim=1).amax(dim=1)
        if self.score == "energy":
            return -F.softplus(logits).sum(dim=1) if self.multilabel else -torch.logsumexp(logits, dim=1)
        f = features.float()
        if self.score == "mahalanobis":  # whitened differences: no cancellation between large terms
            z = f @ self.whitening
            centres = self.means @ self.whitening
            return (z.unsqueeze(1) - centres.unsqueeze(0)).pow(2).sum(dim=2).amin(dim=1)
        similarity = F.normalize(f, dim=1) @ self.bank.t()  # cosine to every training image
        return 1 - similarity.topk(self.k, dim=1).values[:, -1]

    def abstains(self, scores: torch.Tensor) -> torch.Tensor:
        """Which scores are over the threshold (all False without one)."""
        if self.threshold is None:
            return torch.zeros_like(scores, dtype=torch.bool)
        return scores > self.threshold

    def settings(self) -> dict[str, Any]:
        """What a reader needs besides the tensors (the ONNX metadata's ``ood``)."""
        return {"score": self.score, "threshold": self.threshold, "accept": self.accept, "k": self.k,
                "multilabel": self.multilabel}

    def record(self) -> dict[str, Any]:
        """The checkpoint's record (under ``ood`` in its ``visiontl`` entry): settings and tensors (plain types and tensors only)."""
        return {**self.settings(), "tensors": {name: getattr(self, name).clone() for name in _TENSORS[self.score]}}

    @classmethod
    def from_record(cls, record: Any, features: int | None = None) -> OODDetector:
        """A detector from a checkpoint's record, checked (the file is someone else's data).

        Raises:
            ValueError: a field of the wrong type or range, or tensors of the wrong shape (the
                message names it).
        """
        if not isinstance(record, dict):
            raise ValueError("its ood record is not a mapping")
        score, threshold, accept, k = (record.get(n) for n in ("score", "threshold", "accept", "k"))
        if score not in SCORES:
            raise ValueError(f"its ood score {str(score)[:40]!r} is none of {', '.join(SCORES)}")
        if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                                      or not math.isfinite(threshold)):
            raise ValueError(f"its ood threshold {str(threshold)[:40]!r} is not a finite number")
        if not isinstance(accept, (int, float)) or not 0 < float(accept) <= 1:
            raise ValueError(f"its ood accept {str(accept)[:40]!r} is not a share in (0, 1]")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"its ood k {str(k)[:40]!r} is not a whole number >= 1")
        tensors = record.get("tensors") or {}
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ValueError("its ood tensors are not a mapping of tensors")
        for name in _TENSORS[score]:
            value = tensors.get(name)
            if value is None or value.ndim != 2 or not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise ValueError(f"its ood tensor {name} is missing, not a finite matrix, or damaged")
            if features is not None and value.shape[1] != features:
                raise ValueError(f"its ood tensor {name} has {value.shape[1]} feature columns, the model {features}")
        if score == "mahalanobis" and tensors["whitening"].shape[0] != tensors["whitening"].shape[1]:
            raise ValueError("its ood whitening matrix is not square")
        try:
            return cls(score, tensors, None if threshold is None else float(threshold), float(accept),
                       bool(record.get("multilabel", False)), k)
        except ValueError as err:
            raise ValueError(f"its ood record does not build a detector ({err})") from err


def _whitening(features: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class (group) means and a whitening matrix ``W`` with ``W @ W.T`` the inverse of the
    Ledoit-Wolf estimate of the covariance shared by the groups."""
    from visiontl.core.extras import require

    covariance = require("sklearn.covariance", "lowres", "The Mahalanobis out-of-distribution score")
    x = features.double()
    values = torch.unique(groups)
    means = torch.stack([x[groups == g].mean(0) for g in values])
    centred = x - means[torch.searchsorted(values, groups)]
    shared, _ = covariance.ledoit_wolf(centred.numpy(), assume_centered=True)
    eigenvalues, vectors = torch.linalg.eigh(torch.from_numpy(shared))
    whitening = vectors / eigenvalues.clamp(min=eigenvalues.max() * 1e-9).sqrt()  # precision = W W^T
    return means.float(), whitening.float()


def fit_detector(score: str, features: torch.Tensor, labels: torch.Tensor | None = None, multilabel: bool = False,
                 k: int = KNN_K, limit: int = BANK_LIMIT, seed: int = 0) -> OODDetector:
    """Fit ``score``'s statistics on the training images' pooled ``features`` (and class ``labels``
    for ``mahalanobis`` on a single-label model). No threshold yet: see :func:`with_threshold`."""
    features = features.detach().float().cpu()
    tensors: dict[str, torch.Tensor] = {}
    if score == "mahalanobis":
        groups = (labels.long().cpu() if labels is not None and not multilabel
                  else torch.zeros(len(features), dtype=torch.long))
        tensors["means"], tensors["whitening"] = _whitening(features, groups)
    elif score == "knn":
        if len(features) > limit:  # a seeded subset: the bank's size is the deployed model's
            keep = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:limit]
            features = features[keep.sort().values]
        tensors["bank"] = F.normalize(features, dim=1)
    return OODDetector(score, tensors, multilabel=multilabel, k=min(k, max(1, len(features))))


def cut(scores: torch.Tensor, share: float) -> float:
    """The smallest score that ``share`` of ``scores`` are at or under."""
    ordered = scores.double().flatten().sort().values
    return float(ordered[max(0, math.ceil(share * len(ordered) - 1e-9) - 1)])


def with_threshold(detector: OODDetector, scores: torch.Tensor, accept: float = ACCEPT) -> OODDetector:
    """Set the threshold that accepts the ``accept`` share of ``scores`` (validation images')."""
    detector.threshold = cut(scores, accept)
    detector.accept = float(accept)
    return detector
