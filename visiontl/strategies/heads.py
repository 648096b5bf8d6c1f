"""Training-free and near-free heads fitted on cached features: prototypes, kNN, logistic regression.

The backbone stays frozen (its features come from :mod:`visiontl.features`) and the head is
fitted in closed form or to convergence in one go at the start of ``fit``; no SGD step runs.
Prototypes and logistic regression are plain linear heads (they export like any model); kNN
keeps the training features in a small module that replaces the classifier.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visiontl.backbones import LayerGroup
from visiontl.strategies.base import GroupPlan, Strategy, StrategyError

__all__ = ["FittedHead", "KNN", "KNNHead", "LogisticRegression", "Prototype", "replace_classifier"]


class FittedHead(Strategy):
    """Base: a frozen backbone whose head is fitted on the cached training features."""

    cache_features = True
    views = 1
    default_lr = 1.0  # unused: nothing trains by gradient descent

    def __init__(self) -> None:
        super().__init__(lr=None, train_bn=False)

    def plan(self, groups: list[LayerGroup]) -> list[GroupPlan]:
        return [GroupPlan(g.name, g.numel, 0.0, False) for g in groups]

    def param_groups(self, groups: list[LayerGroup], weight_decay: float = 0.0) -> list[dict[str, Any]]:
        return []

    def describe(self, groups: list[LayerGroup]) -> dict[str, Any]:
        report = super().describe(groups)
        report["trainable_params"] = sum(g.numel for g in groups if g.name == "head")  # fitted, not trained
        report["fitted"] = True
        return report

    def make_head(self, in_features: int, num_classes: int) -> nn.Module | None:
        """A replacement classifier, or ``None`` to keep the model's linear one."""
        return None

    def fit(self, head: nn.Module, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
            class_weight: torch.Tensor | None = None) -> None:
        """Fit ``head`` (the model's classifier) on training features."""
        raise NotImplementedError


def _check(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
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
        _check(features, labels, num_classes)
        means = torch.stack([features[labels == c].mean(0) for c in range(num_classes)])
        spread = ((features - means[labels]) ** 2).sum(1).mean().clamp(min=1e-6)
        scale = 1.0 / (self.temperature if self.temperature else float(spread))
        head.weight.copy_(means * scale)
        head.bias.copy_(-(means**2).sum(1) / 2 * scale)


class LogisticRegression(FittedHead):
    """Multinomial logistic regression fitted to convergence with full-batch L-BFGS.

    Args:
        l2: L2 penalty on the weights (per feature dimension, on standardised scale).
        max_iter: L-BFGS iterations.
    """

    name = "logreg"

    def __init__(self, l2: float = 1e-3, max_iter: int = 300) -> None:
        super().__init__()
        if l2 < 0:
            raise StrategyError(f"logreg: l2 must be >= 0, got {l2}.")
        self.l2 = l2
        self.max_iter = int(max_iter)

    def fit(self, head: nn.Module, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
            class_weight: torch.Tensor | None = None) -> None:
        _check(features, labels, num_classes)
        mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
        z = (features - mean) / std
        weight = torch.zeros(num_classes, z.shape[1], requires_grad=True)
        bias = torch.zeros(num_classes, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-7, tolerance_change=1e-10, history_size=20)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z @ weight.T + bias, labels, weight=class_weight)
            loss = loss + self.l2 / 2 * (weight**2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bank.shape[0] == 0:
            raise RuntimeError("KNNHead is empty: fit it on training features first.")
        sim = F.normalize(x, dim=1) @ self.bank.T
        k = min(self.k, self.bank.shape[0])
        top, idx = sim.topk(k, dim=1)
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
        _check(features, labels, num_classes)
        head.fit(features, labels)


def replace_classifier(model: nn.Module, head: nn.Module) -> None:
    """Put ``head`` where the timm model's classifier is (``pretrained_cfg['classifier']``)."""
    path = getattr(model, "pretrained_cfg", {}).get("classifier")
    if not isinstance(path, str):
        raise StrategyError(f"Cannot replace the classifier of {type(model).__name__} (classifier: {path!r}).")
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, head)
