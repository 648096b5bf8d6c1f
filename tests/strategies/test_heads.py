"""Heads fitted on cached features: prototypes, kNN and logistic regression, checked by value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from visiontl import fine_tune
from visiontl.strategies import KNN, KNNHead, LogisticRegression, Prototype, StrategyError, get_strategy
from visiontl.tasks import ClassificationTask

# two well-separated clusters in 2-D plus a third off to the side
FEATURES = torch.tensor([[0.0, 0.0], [0.2, 0.1], [0.1, 0.3], [4.0, 4.0], [4.2, 3.9], [3.8, 4.1],
                         [0.0, 5.0], [0.3, 5.2], [-0.2, 4.9]])
LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
QUERIES = torch.tensor([[0.1, 0.0], [4.1, 4.0], [0.0, 5.1], [2.3, 2.0]])


def test_prototype_head_is_nearest_class_mean() -> None:
    head = nn.Linear(2, 3)
    Prototype().fit(head, FEATURES, LABELS, 3)
    means = torch.stack([FEATURES[LABELS == c].mean(0) for c in range(3)])
    nearest = torch.cdist(QUERIES, means).argmin(1)
    assert torch.equal(head(QUERIES).argmax(1), nearest)
    assert head(QUERIES).argmax(1)[:3].tolist() == [0, 1, 2]
    # logits are -||x - m||^2 / 2, up to a per-row constant and the temperature
    logits = head(QUERIES) * float(((FEATURES - means[LABELS]) ** 2).sum(1).mean())
    expected = -(torch.cdist(QUERIES, means) ** 2) / 2
    assert torch.allclose(logits - logits[:, :1], expected - expected[:, :1], atol=1e-4)


def test_knn_votes_by_value() -> None:
    head = KNNHead(num_classes=3, k=3, temperature=0.1)
    head.fit(FEATURES, LABELS)
    probs = head(QUERIES[:3]).softmax(1)
    assert probs.argmax(1).tolist() == [0, 1, 2]
    # one neighbour per class: the vote shares follow exp((cos - 1) / T)
    single = KNNHead(num_classes=3, k=1)
    single.fit(FEATURES, LABELS)
    assert single(torch.tensor([[4.0, 4.0]])).softmax(1)[0, 1] > 0.99
    with pytest.raises(RuntimeError, match="empty"):
        KNNHead(3)(QUERIES)


def test_knn_bank_survives_a_state_dict_round_trip() -> None:
    head = KNNHead(num_classes=3, k=3)
    head.fit(FEATURES, LABELS)
    fresh = KNNHead(num_classes=3, k=3)
    fresh.load_state_dict(head.state_dict())
    assert torch.allclose(fresh(QUERIES), head(QUERIES))


def test_logistic_regression_converges_and_separates() -> None:
    head = nn.Linear(2, 3)
    LogisticRegression(l2=1e-4).fit(head, FEATURES, LABELS, 3)
    assert head(FEATURES).argmax(1).tolist() == LABELS.tolist()
    assert torch.nn.functional.cross_entropy(head(FEATURES), LABELS) < 0.05


def test_missing_class_is_an_error() -> None:
    with pytest.raises(StrategyError, match=r"class index\(es\) \[2\]"):
        Prototype().fit(nn.Linear(2, 3), FEATURES[:6], LABELS[:6], 3)


@pytest.mark.parametrize("strategy", ["prototype", "knn", "logreg"])
def test_fitted_heads_run_end_to_end_and_reload(strategy: str, shapes_root: Path, tmp_path: Path) -> None:
    result = fine_tune(shapes_root, backbone="test_resnet", strategy=strategy, pretrained=False, image_size=32,
                       steps=50, out=tmp_path, data_kwargs={"num_workers": 0},
                       trainer_kwargs={"enable_progress_bar": False})
    assert result.trainer.current_epoch == 1  # one pass, no gradient descent
    assert result.metrics["val_acc"] >= 0.5  # easy classes; even random conv features separate colour
    task = ClassificationTask.from_checkpoint(result.run_dir / "checkpoints" / "best.ckpt")
    x = torch.randn(3, 3, 32, 32)
    result.task.eval()
    assert torch.allclose(task(x), result.task(x), atol=1e-5)
    assert isinstance(get_strategy(strategy), type(task.strategy))


def test_knn_rejects_bad_k() -> None:
    with pytest.raises(StrategyError, match="k must be >= 1"):
        KNN(k=0)


def test_logreg_chooses_its_penalty_by_stratified_cross_validation() -> None:
    from visiontl.strategies.heads import LogisticRegression, stratified_folds

    labels = torch.arange(4).repeat_interleave(10)
    folds = stratified_folds(labels, 5, seed=0)
    assert sorted(torch.cat(folds).tolist()) == list(range(40))
    assert all(torch.bincount(labels[f], minlength=4).tolist() == [2, 2, 2, 2] for f in folds)

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 64, generator=gen) * 0.6
    features = centres[labels] + torch.randn(40, 64, generator=gen)  # noisy: needs regularisation
    strategy = LogisticRegression()
    head = torch.nn.Linear(64, 4)
    strategy.fit(head, features * 1e3, labels, 4)  # the feature scale does not change the choice
    report = strategy.fit_report
    assert report["folds"] == 5 and len(report["cv_acc"]) == len(strategy.grid)
    best = max(report["cv_acc"])
    chosen = strategy.grid.index(report["l2"])
    assert report["cv_acc"][chosen] == best
    assert all(report["cv_nll"][chosen] <= n for a, n in zip(report["cv_acc"], report["cv_nll"]) if a == best)
    again = LogisticRegression()
    again.fit(torch.nn.Linear(64, 4), features, labels, 4)
    assert again.fit_report["l2"] == report["l2"]
    fixed = LogisticRegression(l2=0.5)
    fixed.fit(torch.nn.Linear(64, 4), features, labels, 4)
    assert fixed.fit_report["l2"] == 0.5 and "cv_acc" not in fixed.fit_report
    with pytest.raises(StrategyError, match="folds"):
        LogisticRegression(folds=1)


def test_knn_compares_the_bank_in_chunks_with_the_same_votes() -> None:
    """A bank far larger than a query batch is compared chunk by chunk (memory: batch x CHUNK, not
    batch x bank); the running top-k gives exactly the one-block result, ties and all."""
    torch.manual_seed(0)
    bank, labels = torch.randn(103, 16), torch.randint(0, 4, (103,))
    queries = torch.cat([torch.randn(9, 16), bank[:3]])  # exact matches too
    whole = KNNHead(num_classes=4, k=5)
    whole.fit(bank, labels)
    chunked = KNNHead(num_classes=4, k=5)
    chunked.fit(bank, labels)
    chunked.CHUNK = 7  # 15 chunks, the last one shorter than k... and one of 103 - 98 = 5 rows
    assert torch.allclose(chunked(queries), whole(queries), atol=1e-6)
    chunked.CHUNK = 2  # chunks smaller than k
    assert torch.allclose(chunked(queries), whole(queries), atol=1e-6)
