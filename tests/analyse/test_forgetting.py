"""Forgetting and drift (visiontl.analyse.forgetting), L2-SP, the scratch comparison: by value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from visiontl import fine_tune
from visiontl.analyse.forgetting import linear_cka, weight_drift
from visiontl.strategies import get_strategy
from visiontl.strategies.base import StrategyError
from visiontl.strategies.regularizers import l2sp_penalty

QUIET = {"enable_progress_bar": False}


def test_linear_cka_is_one_for_the_same_features_and_ignores_rotations_and_scale() -> None:
    rng = np.random.default_rng(0)
    for n, width in ((50, 20), (12, 40)):  # the feature-space form and the Gram form
        x = rng.normal(size=(n, width))
        q, _ = np.linalg.qr(rng.normal(size=(width, width)))
        assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
        assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-12)  # rotated, scaled, shifted
        other = rng.normal(size=(n, 7))
        value = linear_cka(x, other)
        assert 0.0 < value < 0.9
        xc, oc = x - x.mean(0), other - other.mean(0)  # the definition, written out
        expected = np.linalg.norm(oc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(oc.T @ oc))
        assert value == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="same n"):
        linear_cka(np.zeros((4, 2)), np.zeros((5, 2)))


def test_l2sp_is_zero_at_the_start_and_a_hand_computation_after_a_step() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    start = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
    assert float(l2sp_penalty(model, start, alpha=0.1, beta=0.01).detach()) == 0.0
    with torch.no_grad():
        model.conv1[0].weight.add_(0.5)  # every weight of the stem's first conv moves by 0.5
        model.fc.bias.fill_(2.0)
    n = model.conv1[0].weight.numel()
    expected = 0.1 / 2 * n * 0.25 + 0.01 / 2 * 3 * 4.0
    assert float(l2sp_penalty(model, start, alpha=0.1, beta=0.01).detach()) == pytest.approx(expected, rel=1e-6)
    model.conv1[0].weight.requires_grad_(False)  # frozen parameters add nothing
    assert float(l2sp_penalty(model, start, alpha=0.1, beta=0.01).detach()) == pytest.approx(0.01 / 2 * 3 * 4.0)


def test_l2sp_options_and_errors() -> None:
    full = get_strategy({"name": "full", "regularizer": "l2sp", "alpha": 0.2})
    assert (full.regularizer, full.alpha, full.beta) == ("l2sp", 0.2, 0.01)
    assert get_strategy(full.to_config()).alpha == 0.2  # recorded in checkpoints, restored
    model = timm.create_model("test_resnet", num_classes=3)
    from visiontl.models.backbones import layer_groups

    groups = full.param_groups(layer_groups(model), weight_decay=0.05)
    assert {g["weight_decay"] for g in groups} == {0.0}  # L2-SP replaces decay towards zero
    with pytest.raises(StrategyError, match="regularizer must be 'l2sp'"):
        get_strategy({"name": "gradual", "regularizer": "l2"})
    with pytest.raises(StrategyError, match="alpha and beta"):
        get_strategy({"name": "partial", "regularizer": "l2sp", "beta": -1})


def test_weight_drift_per_group() -> None:
    model = timm.create_model("test_resnet", num_classes=3)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.conv1[0].weight.mul_(2.0)
    drift = {g["group"]: g for g in weight_drift(start, model)}
    stem = drift[next(iter(drift))]
    assert stem["l2"] == pytest.approx(float(start["conv1.0.weight"].norm()), rel=1e-6)
    assert all(g["l2"] == 0.0 for name, g in drift.items() if name != stem["group"])


def test_a_run_reports_forgetting_and_drift(shapes_root: Path, shapes_splits: Path, base_weights: Path,
                                            tmp_path: Path) -> None:
    """partial (k=1) with L2-SP on weights that carry a 1000-class head, keeping another set:
    retention before / after, CKA, ImageNet agreement, per-group distance (zero where frozen), the
    L2-SP term logged."""
    run = fine_tune(shapes_root, backbone="test_resnet", strategy={"name": "partial", "k": 1, "regularizer": "l2sp"},
                    pretrained=False, weights=str(base_weights), image_size=32, steps=6, out=tmp_path,
                    retain=shapes_splits, data_kwargs={"num_workers": 0, "batch_size": 8}, trainer_kwargs=QUIET)
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    for key in ("retain_acc_before", "retain_acc_after", "forgetting"):
        assert 0.0 <= abs(metrics[key]) <= 1.0, key
    assert metrics["forgetting"] == pytest.approx(metrics["retain_acc_before"] - metrics["retain_acc_after"], abs=1e-5)
    drift = metrics["drift"]
    assert 0.0 < drift["cka_val"] <= 1.0 + 1e-9 and 0.0 <= drift["imagenet_agreement"] <= 1.0
    groups = {g["group"]: g for g in drift["groups"]}
    plan = {g["name"]: g for g in json.loads((run.run_dir / "strategy.json").read_text())["groups"]}
    for name, group in groups.items():
        if name == "head":
            continue  # a new head: no pretrained values
        assert (group["l2"] > 0) == (plan[name]["lr"] > 0), name  # only the unfrozen group moved
        assert plan[name]["l2_from_pretrained"] == group["l2"]
    assert (run.run_dir / "drift.png").stat().st_size > 0
    logged = (run.run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "train_l2sp_step" in logged


def test_frozen_backbones_report_no_drift(shapes_root: Path, base_weights: Path, tmp_path: Path) -> None:
    run = fine_tune(shapes_root, backbone="test_resnet", strategy="logreg", pretrained=False,
                    weights=str(base_weights), image_size=32, out=tmp_path, data_kwargs={"num_workers": 0},
                    trainer_kwargs=QUIET)
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert "drift" not in metrics and run.task.start_state is None


def test_compare_scratch_records_the_gap(shapes_root: Path, tmp_path: Path) -> None:
    run = fine_tune(shapes_root, backbone="test_resnet", strategy="full", pretrained=False, image_size=32, steps=3,
                    out=tmp_path, compare_scratch=2, data_kwargs={"num_workers": 0, "batch_size": 8},
                    trainer_kwargs=QUIET)
    scratch = json.loads((run.run_dir / "metrics.json").read_text())["scratch"]
    assert len(scratch["val_acc"]) == 2 and scratch["seeds"] == [0, 1]
    assert scratch["gap"] == pytest.approx(run.metrics["val_acc"] - np.mean(scratch["val_acc"]), abs=1e-5)
    assert run.metrics["transfer_gap"] == pytest.approx(scratch["gap"], abs=1e-5)
    assert all(Path(p, "metrics.json").is_file() for p in scratch["runs"])
    with pytest.raises(ValueError, match="compare_scratch"):
        fine_tune(shapes_root, backbone="test_resnet", compare_scratch=0.5, out=tmp_path)  # type: ignore[arg-type]


@pytest.mark.slow  # three wise-ft commands end to end, an export (about 45 s here)
def test_wise_ft_ends_are_the_pretrained_and_the_fine_tuned_model(shapes_root: Path, shapes_splits: Path,
                                                                   base_weights: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI end to end: alpha 0 is the pretrained backbone (with the fitted linear head), alpha 1
    the fine-tuned model, tensor for tensor, its retention the run's ``retain_acc_after`` (one
    probe); the chosen alpha's checkpoint exports. A ``full`` run (head from a random start) is
    mixed with a warning that names ``gradual``. ``--bn recompute`` gives the statistics of
    :func:`~visiontl.tasks.da.reestimate_batchnorm` (AdaBN's rule) on the training images."""
    from visiontl.cli.commands import main
    from visiontl.deploy.export import export_onnx
    from visiontl.tasks import ClassificationTask
    from visiontl.train.wiseft import interpolate

    run = fine_tune(shapes_root, backbone="test_resnet", strategy="full", pretrained=False, weights=str(base_weights),
                    image_size=32, steps=8, out=tmp_path / "runs", data_kwargs={"num_workers": 0, "batch_size": 8},
                    retain=shapes_splits, trainer_kwargs=QUIET)
    retain_after = json.loads((run.run_dir / "metrics.json").read_text())["retain_acc_after"]
    tuned = ClassificationTask.from_checkpoint(run.run_dir / "checkpoints" / "best.ckpt").model.state_dict()
    from safetensors.torch import load_file

    pretrained = load_file(str(base_weights))
    for alpha in ("0", "1"):
        out = tmp_path / f"alpha{alpha}"
        assert main(["wise-ft", str(run.run_dir), "--out", str(out), "--alphas", "0,0.5,1", "--alpha", alpha,
                     "--retain", str(shapes_splits)]) == 0
        mixed = ClassificationTask.from_checkpoint(out / "wise-ft.ckpt").model.state_dict()
        reference = tuned if alpha == "1" else pretrained
        for key, value in mixed.items():
            if not key.startswith("fc."):
                assert torch.equal(value, reference[key]), key
        if alpha == "1":
            assert torch.equal(mixed["fc.weight"], tuned["fc.weight"])
        assert "use strategy 'gradual'" in capsys.readouterr().out
        rows = json.loads((out / "wise_ft.json").read_text())["alphas"]
        assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0] and all(0 <= r["retain_acc"] <= 1 for r in rows)
        assert rows[-1]["retain_acc"] == pytest.approx(retain_after, abs=1e-6)
        # alpha 1 is scored as the run's validation scored its best checkpoint: the same door
        assert rows[-1]["val_acc"] == pytest.approx(run.metrics["val_acc"], abs=1e-6)
        assert rows[-1]["val_balanced_acc"] == pytest.approx(run.metrics["val_balanced_acc"], abs=1e-6)
        assert (out / "wise_ft.png").stat().st_size > 0 and (out / "wise_ft.csv").read_text().count("\n") == 4
    _check_bn_recompute(run.run_dir, tmp_path / "recompute")
    half = interpolate({"w": torch.zeros(2)}, {"w": torch.ones(2)}, 0.25)["w"]
    assert torch.allclose(half, torch.full((2,), 0.25))
    report = export_onnx(tmp_path / "alpha1" / "wise-ft.ckpt", tmp_path / "model.onnx")
    assert report["top1_agreement"] == 1.0


def _check_bn_recompute(run_dir: Path, out: Path) -> None:
    """Alpha 0.5 with ``--bn recompute``: every BatchNorm's running statistics are what
    reestimate_batchnorm gives on the run's training images in batches of 32 (not the
    interpolated ones), every other tensor is the mixture's."""
    from visiontl.cli.commands import main
    from visiontl.tasks import ClassificationTask
    from visiontl.tasks.da import reestimate_batchnorm
    from visiontl.train.wiseft import _run_data

    assert main(["wise-ft", str(run_dir), "--out", str(out), "--alphas", "0.5", "--bn", "recompute"]) == 0
    interpolated = ClassificationTask.from_checkpoint(run_dir / "checkpoints" / "best.ckpt")  # the run's task
    mixed = ClassificationTask.from_checkpoint(out / "wise-ft.ckpt").model.eval()
    stats = {k: v.clone() for k, v in mixed.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    train = _run_data(run_dir / "checkpoints" / "best.ckpt", interpolated).feature_source("train")
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=False)
    assert reestimate_batchnorm(mixed, (batch["image"] for batch in loader)) > 0
    again = mixed.state_dict()
    assert stats and all(torch.equal(again[k], v) for k, v in stats.items())
    tuned = interpolated.model.state_dict()
    assert not all(torch.allclose(tuned[k], v) for k, v in stats.items())  # re-estimated, not carried over


def test_wise_ft_refuses_what_it_cannot_mix(shapes_root: Path, base_weights: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from visiontl.cli.commands import main

    run = fine_tune(shapes_root, backbone="test_resnet", strategy="logreg", pretrained=False,
                    weights=str(base_weights), image_size=32, out=tmp_path, data_kwargs={"num_workers": 0},
                    trainer_kwargs=QUIET)
    assert main(["wise-ft", str(run.run_dir), "--out", str(tmp_path / "w")]) == 2
    assert "nothing to interpolate" in capsys.readouterr().err
    assert main(["wise-ft", str(run.run_dir), "--out", str(tmp_path / "w"), "--alphas", "0,1.5"]) == 2
    assert "alphas must be numbers in [0, 1]" in capsys.readouterr().err
