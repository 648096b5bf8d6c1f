"""LogME and the shrinkage H-score against the reference implementations' values on fixed input."""

from __future__ import annotations

import numpy as np
import pytest

from visiontl.analyse.transferability import ledoit_wolf, logme, shrinkage_hscore

# (N, D, classes, seed) -> (LogME, shrinkage H-score), computed with the reference code: thuml/LogME's
# LogME.py (fixed-point solver, commit 56551ca) and thuml/Transfer-Learning-Library's
# regularized_h_score (scikit-learn's LedoitWolf), on the features built by _case below
REFERENCE = {
    (60, 16, 3, 0): (-0.775855913750963, 0.4058459835464029),
    (20, 50, 4, 1): (6.82288734964813, 1.3175425293185685),  # fewer samples than dimensions
    (200, 32, 5, 2): (-0.5850377698172569, 0.6089178157028547),
}


def _case(n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    features = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 2.0 * np.eye(classes, d)[labels]
    return features, labels


@pytest.mark.parametrize("case", list(REFERENCE), ids=[f"N{n}-D{d}-C{c}" for n, d, c, _ in REFERENCE])
def test_scores_match_the_reference_implementations(case: tuple[int, int, int, int]) -> None:
    features, labels = _case(*case)
    want_logme, want_hscore = REFERENCE[case]
    assert logme(features, labels) == pytest.approx(want_logme, rel=1e-9)
    assert shrinkage_hscore(features, labels) == pytest.approx(want_hscore, rel=1e-9)


def test_ledoit_wolf_matches_scikit_learn() -> None:
    covariance = pytest.importorskip("sklearn.covariance")
    x = np.random.default_rng(3).normal(size=(40, 12)) @ np.diag(np.linspace(0.5, 3, 12))
    cov, shrinkage = ledoit_wolf(x)
    reference = covariance.LedoitWolf().fit(x)
    assert shrinkage == pytest.approx(reference.shrinkage_, rel=1e-9)
    np.testing.assert_allclose(cov, reference.covariance_, rtol=1e-9, atol=1e-12)


def test_features_that_separate_the_classes_score_higher() -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 3
    noise = rng.normal(size=(300, 20))
    scores = [(logme(noise + s * np.eye(3, 20)[labels], labels), shrinkage_hscore(noise + s * np.eye(3, 20)[labels],
                                                                                 labels)) for s in (0.0, 1.0, 3.0)]
    assert scores[0][0] < scores[1][0] < scores[2][0]
    assert scores[0][1] < scores[1][1] < scores[2][1]


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="N x D"):
        logme(np.zeros((4, 3)), np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="two classes"):
        logme(np.random.rand(4, 3), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="NaN"):
        shrinkage_hscore(np.full((4, 3), np.nan), np.array([0, 1, 0, 1]))


def test_logme_of_multi_label_targets_is_the_per_target_evidence_and_h_score_refuses() -> None:
    from visiontl.analyse.transferability import MultiLabelScoreError

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    features = rng.normal(size=(60, 12)) + 2 * np.eye(3, 12)[labels]
    onehot = np.eye(3)[labels]
    # LogME is defined per target: a single-label problem written as one 0/1 column per class scores the same
    assert logme(features, onehot) == pytest.approx(logme(features, labels), rel=1e-12)
    tags = (rng.random((60, 2)) < 0.4).astype(float)
    tags[:, 0] = onehot[:, 0]  # tag 0 is carried by the features; tag 1 is noise
    holes = tags.copy()
    holes[:15, 1] = -1  # unlabelled pairs are left out of that tag's target
    by_tag = [logme(features, tags[:, [0]]), logme(features[15:], tags[15:, [1]])]
    assert logme(features, holes) == pytest.approx(np.mean(by_tag), rel=1e-12)
    assert by_tag[0] > by_tag[1]  # the tag the features carry has the higher evidence
    constant = np.concatenate([tags, np.ones((60, 1))], axis=1)  # a tag on every image: nothing to score
    assert logme(features, constant) == pytest.approx(logme(features, tags), rel=1e-12)
    with pytest.raises(MultiLabelScoreError, match="one class per image"):
        shrinkage_hscore(features, tags)
