"""AUROC and FPR at 95 % TPR of an out-of-distribution score, against scikit-learn and their definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visiontl.analyse.ood import auroc, fpr_at_tpr


def test_auroc_and_fpr_at_95_tpr_match_their_definitions() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    familiar, unfamiliar = torch.tensor(rng.normal(0, 1, 300)), torch.tensor(rng.normal(1.5, 1, 200))
    expected = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[familiar.numpy(), unfamiliar.numpy()])
    assert auroc(familiar, unfamiliar) == pytest.approx(expected, abs=1e-6)
    cut = np.sort(familiar.numpy())[int(np.ceil(0.95 * 300)) - 1]  # 95 % of the familiar scores at or under it
    assert fpr_at_tpr(familiar, unfamiliar) == pytest.approx(float((unfamiliar.numpy() <= cut).mean()))
    assert auroc(familiar, familiar + 10) == 1.0 and fpr_at_tpr(familiar, familiar + 10) == 0.0


def test_auroc_reads_any_score_scale() -> None:
    familiar = torch.tensor([500.0, 600.0, 700.0])  # Mahalanobis distances: far outside [0, 1]
    assert auroc(familiar, familiar + 1000) == 1.0 and auroc(familiar + 1000, familiar) == 0.0
    assert auroc(familiar, familiar) == 0.5
