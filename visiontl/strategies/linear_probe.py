"""The linear probe: a logistic-regression head fitted on frozen features, and its accuracy.

Every module that fits a probe and scores it calls these: forgetting's retention, WiSE-FT's alpha 0,
the negative-transfer check's frozen probe, DEV's domain classifier, the score of a fitted head
before fine-tuning (LP-FT). The fit is :class:`~visiontl.strategies.LogisticRegression`, what
``strategy: logreg`` fits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from visiontl.strategies.heads import LogisticRegression

__all__ = ["fit_probe", "linear_probe_accuracy", "probe_accuracy", "probe_score"]


def _rows(values: Any, dtype: type) -> torch.Tensor:
    """``values`` (an array, a list, a tensor on any device) as a CPU tensor of ``dtype``, copied."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return torch.from_numpy(np.array(values, dtype=dtype))


def fit_probe(features: Any, labels: Any, num_classes: int, head: nn.Module | None = None,
              **options: Any) -> nn.Module:
    """The linear probe: a logistic-regression head fitted on frozen features.

    :class:`~visiontl.strategies.LogisticRegression` (what ``strategy: logreg`` fits: features
    centred and scaled by one spread, penalty by cross-validation, L-BFGS to convergence, the
    standardisation folded into the head). Every probe of the package is this one: forgetting's
    retention, WiSE-FT's alpha 0, the negative-transfer check's frozen probe, DEV's domain
    classifier. Uses no global random state.

    Args:
        features: ``(n, width)`` rows (array, list or tensor).
        labels: ``n`` class indices in ``[0, num_classes)``, every class present; or multi-label
            targets, ``(n, num_classes)`` rows of 1 / 0 / -1 (one-vs-rest: a binary probe per tag).
        num_classes: output width.
        head: the ``nn.Linear`` to fit in place (a model's classifier); ``None``: a new one.
        **options: :class:`~visiontl.strategies.LogisticRegression` arguments (``l2``, ``max_iter``,
            ``folds``, ``grid``).

    Returns:
        The fitted head (on the CPU when new).
    """
    x = _rows(features, np.float32)
    if head is None:  # every weight is overwritten by the fit: no initialisation, no draw from the global RNG
        head = torch.nn.utils.skip_init(nn.Linear, x.shape[1], num_classes)
    y = _rows(labels, np.int64 if np.ndim(labels) == 1 else np.float32)
    LogisticRegression(**options).fit(head, x, y, num_classes)
    return head


def probe_accuracy(head: nn.Module, features: Any, labels: Any) -> float:
    """Top-1 accuracy of ``head`` on feature rows (computed on the head's device)."""
    held = [*head.parameters(), *head.buffers()]
    device = held[0].device if held else torch.device("cpu")
    with torch.no_grad():
        predicted = head(_rows(features, np.float32).to(device)).argmax(1).cpu().numpy()
    return float((predicted == _rows(labels, np.int64).numpy()).mean())


def probe_score(head: nn.Module, features: Any, labels: Any) -> tuple[str, float]:
    """``("val_acc", top-1 accuracy)`` of ``head`` on feature rows, or for multi-label targets (rows
    of 1 / 0 / -1) ``("val_map", macro average precision)``."""
    if np.ndim(labels) == 1:
        return "val_acc", probe_accuracy(head, features, labels)
    from torchmetrics.functional.classification import multilabel_average_precision

    held = [*head.parameters(), *head.buffers()]
    device = held[0].device if held else torch.device("cpu")
    with torch.no_grad():
        probs = head(_rows(features, np.float32).to(device)).sigmoid().cpu()
    targets = torch.from_numpy(np.array(labels, dtype=np.int64))
    return "val_map", float(multilabel_average_precision(probs, targets, targets.shape[1], average="macro",
                                                         ignore_index=-1))


def linear_probe_accuracy(train: tuple[Any, Any], val: tuple[Any, Any], num_classes: int) -> float:
    """:func:`probe_accuracy` on ``val`` (features, labels) of the :func:`fit_probe` head fitted on ``train``."""
    return probe_accuracy(fit_probe(*train, num_classes), *val)
