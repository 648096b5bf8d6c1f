"""Training-free and near-free heads fitted on cached features: prototypes, kNN, logistic regression.

The backbone stays frozen (its features come from :mod:`visiontl.models.features`) and the head is
fitted in closed form or to convergence in one go at the start of ``fit``; no SGD step runs.
Prototypes and logistic regression are plain linear heads (they export like any model); kNN
keeps the training features in a small module that replaces the classifier.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visiontl.core.losses import multilabel_loss
from visiontl.models.backbones import LayerGroup, classifier_names
from visiontl.strategies.base import GroupPlan, Strategy, StrategyError

__all__ = ["L2_GRID", "FittedHead", "KNN", "KNNHead", "LogisticRegression", "Prototype", "replace_classifier",
           "stratified_folds"]


class FittedHead(Strategy):
    """Base: a frozen backbone whose head is fitted on the cached training features."""

    cache_features = True
    views = 1
    sgd = False
    default_lr = 1.0  # unused: nothing trains by gradient descent

    def __init__(self) -> None:
        super().__init__(lr=None, train_bn=False)

    def plan(self, groups: list[LayerGroup]) -> list[GroupPlan]:
        return [GroupPlan(g.name, g.numel, 0.0, False) for g in groups]

    def describe(self, groups: list[LayerGroup]) -> dict[str, Any]:
        report = super().describe(groups)
        report["trainable_params"] = sum(g.numel for g in groups if g.name == "head")  # fitted, not trained
        report["fitted"] = True
        return report

    @property
    def fits_head(self) -> bool:
        return True

    def fit_head(self, head: nn.Module, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 class_weight: torch.Tensor | None = None) -> None:
        self.fit(head, features, labels, num_classes, class_weight)

    def head_fit_unavailable(self, reason: str, distributed: bool = False) -> None:
        raise StrategyError(f"Strategy {self.name!r} fits its head on cached features, which need a visiontl "
                            f"datamodule of image files (not streamed) and a timm backbone with one classifier: "
                            f"{reason}")

    def fit(self, head: nn.Module, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
            class_weight: torch.Tensor | None = None) -> None:
        """Fit ``head`` (the model's classifier) on training features."""
        raise NotImplementedError


def _single_label(strategy: str, labels: torch.Tensor) -> None:
    """Refuse multi-label targets (one row of tags per image) in a head that scores one class."""
    if labels.ndim == 2:
        raise StrategyError(f"Strategy {strategy!r} scores one class per image; for multi-label data (several tags per "
                            f"image) use logreg (one-vs-rest logistic regression), gradual or an SGD strategy.")


def _check(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if labels.ndim == 2:  # multi-label: every tag needs a positive and a negative
        known = labels >= 0
        pos, neg = ((labels > 0.5) & known).sum(0), ((labels < 0.5) & known).sum(0)
        bad = [i for i in range(labels.shape[1]) if pos[i] == 0 or neg[i] == 0]
        if bad:
            raise StrategyError(f"Tag index(es) {bad} have no positive or no negative training image; a yes / no "
                                f"decision needs both.")
        return
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise StrategyError(f"No training features for class index(es) {missing}; every class needs examples.")


class Prototype(FittedHead):
    """Nearest class mean: the head scores ``-||x - mean_c||^2 / 2`` (a linear layer).

    Args:
        temperature: divides the logits, for probabilities (``None``: the mean squared distance
            of the training features to their class mean).
    """

    name = "prototype"

    def __init__(self, temperature: float | None = None) -> None:
        super().__init__()
        self.temperature = temperature

    @torch.no_grad()
    def fit(self, head: nn.Module, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
            class_weight: torch.Tensor | None = None) -> None:
        _single_label(self.name, labels)
        _check(features, labels, num_classes)
        means = torch.stack([features[labels == c].mean(0) for c in range(num_classes)])
        spread = ((features - means[labels]) ** 2).sum(1).mean().clamp(min=1e-6)
        scale = 1.0 / (self.temperature if self.temperature else float(spread))
        head.weight.copy_(means * scale)
        head.bias.copy_(-(means**2).sum(1) / 2 * scale)


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Penalties :class:`LogisticRegression` chooses from by cross-validation (standardised features)."""


def _data_loss(logits: torch.Tensor, labels: torch.Tensor, class_weight: torch.Tensor | None,
               reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy for class indices; for multi-label targets (rows of 1 / 0 / -1) the mean binary
    cross-entropy over the labelled pairs, ``class_weight`` weighing each tag's positives."""
    if labels.ndim == 2:
        loss = multilabel_loss(logits, labels, pos_weight=class_weight)
        return loss * int((labels >= 0).sum()) if reduction == "sum" else loss
    return F.cross_entropy(logits, labels, weight=class_weight, reduction=reduction)


def _score(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy; for multi-label targets the macro average precision over tags with a positive."""
    if labels.ndim == 2:
        from torchmetrics.functional.classification import multilabel_average_precision

        return float(multilabel_average_precision(logits.sigmoid(), labels.long(), labels.shape[1], average="macro",
                                                  ignore_index=-1))
    return float((logits.argmax(1) == labels).float().mean())


def _lbfgs(z: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, class_weight: torch.Tensor | None,
           max_iter: int, init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on ``z`` by full-batch L-BFGS, from ``init`` (a warm start); for
    multi-label targets one-vs-rest (a binary logistic regression per tag, fitted together)."""
    weight = (init[0].clone() if init else torch.zeros(num_classes, z.shape[1])).requires_grad_(True)
    bias = (init[1].clone() if init else torch.zeros(num_classes)).requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10, history_size=20)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _data_loss(z @ weight.T + bias, labels, class_weight) + l2 / 2 * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def _strata(labels: torch.Tensor) -> torch.Tensor:
    """What folds are stratified by: the class; for multi-label rows the rarest tag each image has
    (-1 for none), so every tag's few positives spread over the folds."""
    if labels.ndim == 1:
        return labels
    positive = labels > 0.5
    rarity = positive.sum(0).float().masked_fill(positive.sum(0) == 0, float("inf"))
    ranked = torch.where(positive, rarity[None, :], torch.full(labels.shape, float("inf")))
    rarest = ranked.argmin(1)
    return torch.where(positive.any(1), rarest, torch.full_like(rarest, -1))


def stratified_folds(labels: torch.Tensor, folds: int, seed: int = 0) -> list[torch.Tensor]:
    """Row indices of ``folds`` validation folds, each class spread evenly over them (seeded); for
    multi-label rows, each image's rarest tag."""
    labels = _strata(labels)
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        rows = (labels == c).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        fold_of[rows] = torch.arange(len(rows)) % folds
    return [(fold_of == f).nonzero().flatten() for f in range(folds)]


class LogisticRegression(FittedHead):
    """Multinomial logistic regression fitted to convergence with full-batch L-BFGS.

    With ``l2="auto"`` (the default) the penalty is chosen by stratified k-fold cross-validation on
    the training features over :data:`L2_GRID` (highest fold accuracy, ties to the lower
    cross-entropy), each fold's fits warm-started from the next-stronger penalty; then the head is
    refitted on all training features. The choice and its fold scores are in :attr:`fit_report`
    (``strategy.json``).

    Args:
        l2: L2 penalty on the weights (features centred and divided by their overall standard
            deviation), or ``"auto"``.
        max_iter: L-BFGS iterations of the final fit.
        folds: cross-validation folds (fewer when a class has fewer images; no cross-validation
            below 2 images per class, then ``l2 = 1e-2``).
        grid: penalties tried by ``"auto"``.
    """

    name = "logreg"

    def __init__(self, l2: float | str = "auto", max_iter: int = 300, folds: int = 5,
                 grid: tuple[float, ...] | list[float] = L2_GRID) -> None:
        super().__init__()
        if l2 != "auto" and (isinstance(l2, str) or l2 < 0):
            raise StrategyError(f"logreg: l2 must be 'auto' or a number >= 0, got {l2!r}.")
        if int(folds) < 2:
            raise StrategyError(f"logreg: folds must be >= 2, got {folds}.")
        if not grid or any(float(v) < 0 for v in grid):
            raise StrategyError(f"logreg: grid must be penalties >= 0, got {grid!r}.")
        self.l2 = l2 if l2 == "auto" else float(l2)
        self.max_iter = int(max_iter)
        self.folds = int(folds)
        self.grid = tuple(sorted((float(v) for v in grid), reverse=True))  # strongest first: warm starts

    def choose_l2(self, z: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  class_weight: torch.Tensor | None = None) -> tuple[float, dict[str, Any]]:
        """Cross-validate the penalty on standardised features ``z``; returns it and the fold scores."""
        if labels.ndim == 2:
            least = int(((labels > 0.5) & (labels >= 0)).sum(0).min())
        else:
            least = int(torch.bincount(labels, minlength=num_classes).min())
        folds = min(self.folds, least)
        if folds < 2:
            what = "a tag is on" if labels.ndim == 2 else "a class has"
            return 1e-2, {"cv": f"skipped: {what} fewer than 2 training images"}
        acc = torch.zeros(len(self.grid))
        nll = torch.zeros(len(self.grid))
        for rows in stratified_folds(labels, folds):
            keep = torch.ones(len(labels), dtype=torch.bool)
            keep[rows] = False
            init = None
            for i, l2 in enumerate(self.grid):
                init = _lbfgs(z[keep], labels[keep], num_classes, l2, class_weight, 100, init)
                logits = z[rows] @ init[0].T + init[1]
                acc[i] += _score(logits, labels[rows]) * len(rows) / len(labels)
                nll[i] += _data_loss(logits, labels[rows], None, reduction="sum") / len(labels)
        best = max(range(len(self.grid)), key=lambda i: (round(float(acc[i]), 6), -float(nll[i])))
        score = "cv_map" if labels.ndim == 2 else "cv_acc"  # macro average precision for multi-label targets
        scores = {"folds": folds, "grid": list(self.grid), score: [round(float(a), 4) for a in acc],
                  "cv_nll": [round(float(v), 4) for v in nll]}
        return self.grid[best], scores

    def fit(self, head: nn.Module, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
            class_weight: torch.Tensor | None = None) -> None:
        _check(features, labels, num_classes)
        # centred, and scaled by ONE number (the features' overall spread) so that the penalty grid
        # means the same for every backbone; per-dimension standardisation would blow up the
        # near-constant dimensions (-4 points on 8 px digits with EfficientNet-Lite0)
        mean, std = features.mean(0), features.std().clamp(min=1e-6)
        z = (features - mean) / std
        scores: dict[str, Any] = {}
        l2 = self.l2
        if l2 == "auto":
            l2, scores = self.choose_l2(z, labels, num_classes, class_weight)
        weight, bias = _lbfgs(z, labels, num_classes, float(l2), class_weight, self.max_iter)
        train = _score(z @ weight.T + bias, labels)
        self.fit_report = {"l2": float(l2), "train_map" if labels.ndim == 2 else "train_acc": round(train, 4), **scores}
        with torch.no_grad():  # fold the standardisation into the linear head
            w = weight / std
            head.weight.copy_(w)
            head.bias.copy_(bias - (w * mean).sum(1))


class KNNHead(nn.Module):
    """Cosine k-nearest-neighbour classifier over stored training features.

    Outputs log class scores: ``log(sum of exp(similarity / temperature) over the k neighbours
    of each class / total)``, so ``softmax`` gives vote shares.
    """

    def __init__(self, num_classes: int, k: int = 5, temperature: float = 0.1) -> None:
        super().__init__()
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.register_buffer("bank", torch.zeros(0, 1))
        self.register_buffer("bank_labels", torch.zeros(0, dtype=torch.long))

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Store L2-normalised training features and their labels."""
        self.bank = F.normalize(features.float(), dim=1)
        self.bank_labels = labels.long()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("bank", "bank_labels"):  # the bank's size is only known once fitted
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    CHUNK = 16384  # bank rows compared at a time: a (batch x CHUNK) similarity block, never batch x bank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bank.shape[0] == 0:
            raise RuntimeError("KNNHead is empty: fit it on training features first.")
        query = F.normalize(x, dim=1)
        k = min(self.k, self.bank.shape[0])
        top = idx = None
        for start in range(0, self.bank.shape[0], self.CHUNK):  # a running top-k over the bank's chunks
            sim = query @ self.bank[start:start + self.CHUNK].T
            chunk_top, chunk_idx = sim.topk(min(k, sim.shape[1]), dim=1)
            if top is None:
                top, idx = chunk_top, chunk_idx + start
            else:
                merged = torch.cat([top, chunk_top], 1)
                top, pick = merged.topk(min(k, merged.shape[1]), dim=1)
                idx = torch.cat([idx, chunk_idx + start], 1).gather(1, pick)
        votes = torch.exp((top - 1) / self.temperature)
        scores = torch.zeros(x.shape[0], self.num_classes, dtype=votes.dtype, device=x.device)
        scores.scatter_add_(1, self.bank_labels[idx], votes)
        return torch.log(scores / scores.sum(1, keepdim=True) + 1e-8)


class KNN(FittedHead):
    """k-nearest neighbours on cosine similarity of cached features (few-shot transfer).

    Args:
        k: neighbours that vote.
        temperature: sharpness of the similarity-weighted vote.
    """

    name = "knn"

    def __init__(self, k: int = 5, temperature: float = 0.1) -> None:
        super().__init__()
        if k < 1:
            raise StrategyError(f"knn: k must be >= 1, got {k}.")
        self.k, self.temperature = int(k), temperature

    def make_head(self, in_features: int, num_classes: int) -> nn.Module:
        return KNNHead(num_classes, self.k, self.temperature)

    def fit(self, head: nn.Module, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
            class_weight: torch.Tensor | None = None) -> None:
        _single_label(self.name, labels)
        _check(features, labels, num_classes)
        head.fit(features, labels)


def replace_classifier(model: nn.Module, head: nn.Module) -> None:
    """Put ``head`` where the timm model's classifier is (``pretrained_cfg['classifier']``)."""
    names = classifier_names(model)
    if len(names) != 1:
        raise StrategyError(f"Cannot replace the classifier of {type(model).__name__} (classifiers: {names}).")
    path = names[0]
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, head)
