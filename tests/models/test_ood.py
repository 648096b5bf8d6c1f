"""Out-of-distribution scores: each one against an independent computation of its definition, the
threshold's acceptance rate and the checkpoint record's checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visiontl.models.ood import SCORES, OODDetector, fit_detector, with_threshold


def _clusters(n: int = 60, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.randn(3, d, generator=g) * 3
    return centres[labels] + torch.randn(n, d, generator=g), labels


@pytest.mark.parametrize("k", [1, 3])
def test_knn_is_the_cosine_distance_to_the_kth_nearest_training_image(k: int) -> None:
    from sklearn.neighbors import NearestNeighbors

    train, _ = _clusters()
    query = torch.randn(7, train.shape[1])
    detector = fit_detector("knn", train, k=k)
    ours = detector(query, torch.zeros(7, 3))
    nn = NearestNeighbors(n_neighbors=k, metric="cosine").fit(train.numpy())
    distances, _ = nn.kneighbors(query.numpy())
    assert np.allclose(ours.numpy(), distances[:, -1], atol=1e-5)


def test_mahalanobis_is_the_smallest_distance_to_a_class_mean_under_the_ledoit_wolf_covariance() -> None:
    from sklearn.covariance import LedoitWolf

    train, labels = _clusters(d=40)  # 60 images in 40 dimensions: the sample covariance is near singular
    query = torch.randn(5, 40) * 2
    ours = fit_detector("mahalanobis", train, labels)(query, torch.zeros(5, 3))
    x = train.double().numpy()
    means = np.stack([x[labels.numpy() == c].mean(0) for c in range(3)])
    lw = LedoitWolf(assume_centered=True).fit(x - means[labels.numpy()])
    precision = np.linalg.inv(lw.covariance_)
    q = query.double().numpy()
    expected = np.min([np.einsum("bi,ij,bj->b", q - m, precision, q - m) for m in means], axis=0)
    assert np.allclose(ours.numpy(), expected, rtol=1e-3)


def test_multi_label_mahalanobis_uses_one_mean_and_no_labels() -> None:
    train, _ = _clusters()
    detector = fit_detector("mahalanobis", train, multilabel=True)
    assert detector.means.shape == (1, train.shape[1])


def test_msp_and_energy_score_a_flat_output_as_less_familiar_than_a_confident_one() -> None:
    logits = torch.tensor([[8.0, 0.0, 0.0], [0.3, 0.2, 0.1]])
    for score in ("msp", "energy"):
        for multilabel in (False, True):
            s = OODDetector(score, multilabel=multilabel)(torch.zeros(2, 4), logits)
            assert s[1] > s[0], (score, multilabel)
    assert torch.allclose(OODDetector("msp")(torch.zeros(2, 4), logits), -logits.softmax(1).amax(1))
    assert torch.allclose(OODDetector("energy")(torch.zeros(2, 4), logits), -torch.logsumexp(logits, 1))


def test_the_threshold_accepts_the_share_of_validation_images_it_was_set_for() -> None:
    scores = torch.linspace(0, 1, 200)
    detector = with_threshold(OODDetector("msp"), scores, accept=0.95)
    accepted = (~detector.abstains(scores)).float().mean()
    assert float(accepted) == pytest.approx(0.95)
    assert not OODDetector("msp").abstains(scores).any()  # no threshold: nothing flagged


def test_the_knn_bank_is_capped_with_a_seeded_subset() -> None:
    train, _ = _clusters(n=50)
    a, b = fit_detector("knn", train, limit=20, seed=3), fit_detector("knn", train, limit=20, seed=3)
    assert a.bank.shape == (20, train.shape[1]) and torch.equal(a.bank, b.bank)


@pytest.mark.parametrize("score", SCORES)
def test_a_record_round_trips(score: str) -> None:
    train, labels = _clusters()
    detector = with_threshold(fit_detector(score, train, labels), torch.rand(30))
    back = OODDetector.from_record(detector.record(), features=train.shape[1])
    x = torch.randn(4, train.shape[1])
    z = torch.randn(4, 3)
    assert torch.allclose(back(x, z), detector(x, z)) and back.threshold == detector.threshold


@pytest.mark.parametrize("change, words", [
    (lambda r: r.update(score="os.system"), "ood score"),
    (lambda r: r.update(threshold=True), "threshold"),
    (lambda r: r.update(threshold=float("nan")), "threshold"),
    (lambda r: r.update(k=0), "k"),
    (lambda r: r["tensors"].update(bank=torch.full((3, 16), float("nan"))), "bank"),
    (lambda r: r["tensors"].update(bank=torch.zeros(3, 5)), "feature columns"),
    (lambda r: r.update(tensors={}), "bank"),
])
def test_a_damaged_record_is_refused_with_what_is_wrong(change, words: str) -> None:
    train, _ = _clusters()
    record = with_threshold(fit_detector("knn", train), torch.rand(30)).record()
    change(record)
    with pytest.raises(ValueError, match=words):
        OODDetector.from_record(record, features=16)
