"""Temperature scaling: fitted by value, judged out of fold, argmax untouched, a readable diagram."""

from __future__ import annotations

import pytest
import torch

from helpers.figures import figure_problems
from visiontl.analyse.calibration import (calibrate, calibration_error, fit_temperature, negative_log_likelihood,
                                          reliability_figure, scaled_probabilities)


def _overconfident(n: int = 4000, k: int = 4, t: float = 2.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose labels are drawn from softmax(logits / t): temperature t calibrates them exactly."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 4
    labels = torch.multinomial((logits / t).softmax(1), 1, generator=g).squeeze(1)
    return logits, labels


def test_fit_temperature_recovers_the_temperature_that_made_the_labels() -> None:
    logits, labels = _overconfident(t=2.5)
    assert float(fit_temperature(logits, labels)) == pytest.approx(2.5, rel=0.08)
    under, labels = _overconfident(t=0.5, seed=1)
    assert float(fit_temperature(under, labels)) == pytest.approx(0.5, rel=0.08)


def test_multi_label_temperatures_are_per_tag_and_a_tag_without_both_outcomes_keeps_one() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6000, 3, generator=g) * 3
    temps = torch.tensor([0.7, 1.0, 3.0])
    targets = torch.bernoulli((logits / temps).sigmoid(), generator=g)
    targets[:, 1] = 0.0  # no positive of tag 1
    targets[::7, 0] = -1.0  # uncertain pairs are left out
    fitted = fit_temperature(logits, targets, multilabel=True)
    assert fitted.shape == (3,) and float(fitted[1]) == 1.0
    assert float(fitted[0]) == pytest.approx(0.7, rel=0.1) and float(fitted[2]) == pytest.approx(3.0, rel=0.1)


def test_calibrate_halves_the_error_out_of_fold_and_keeps_every_argmax() -> None:
    logits, labels = _overconfident(n=2000, t=3.0)
    result, out_of_fold = calibrate(logits, labels)
    assert result.folds == 2 and result.images == 2000 and result.temperature[0] == pytest.approx(3.0, rel=0.1)
    assert result.ece_after <= result.ece_before / 2 and result.nll_after < result.nll_before
    assert torch.equal(out_of_fold.argmax(1), logits.argmax(1))  # accuracy cannot move
    raw = calibration_error(scaled_probabilities(logits, 1.0), labels)
    assert result.ece_before == pytest.approx(raw, abs=1e-6)
    assert negative_log_likelihood(logits, labels, 3.0) < negative_log_likelihood(logits, labels, 1.0)


def test_out_of_fold_means_each_image_is_scored_by_a_temperature_fitted_without_it() -> None:
    logits, labels = _overconfident(n=400, t=2.0)
    _, out_of_fold = calibrate(logits, labels, folds=2, seed=3)
    fitted_on_all = scaled_probabilities(logits, fit_temperature(logits, labels))
    assert not torch.allclose(out_of_fold, fitted_on_all, atol=1e-4)  # not the in-sample temperature
    # every image got one of two temperatures (one per fold), and both folds hold every class
    ratios = (logits[:, 0] - logits[:, 1]) / (out_of_fold[:, 0].log() - out_of_fold[:, 1].log())
    assert len(torch.unique(ratios.round(decimals=3))) == 2
    with pytest.raises(ValueError, match="at least 4 images"):
        calibrate(logits[:3], labels[:3])


def test_the_reliability_diagram_is_readable() -> None:
    logits, labels = _overconfident(n=600, t=2.0)
    result, out_of_fold = calibrate(logits, labels)
    fig = reliability_figure(scaled_probabilities(logits, 1.0), out_of_fold, labels, result)
    assert figure_problems(fig) == []
    assert "T = 2" in fig.get_suptitle()
    g = torch.Generator().manual_seed(0)
    tags = torch.bernoulli(torch.full((300, 3), 0.3), generator=g)
    tag_logits = torch.randn(300, 3, generator=g) * 3 + (tags - 0.5) * 4
    tag_result, tag_oof = calibrate(tag_logits, tags, multilabel=True)
    fig = reliability_figure(tag_logits.sigmoid(), tag_oof, tags, tag_result, multilabel=True)
    assert figure_problems(fig) == [] and "over 3 tags" in fig.get_suptitle()


@pytest.mark.parametrize("multilabel", [False, True])
def test_every_run_measures_its_calibration(multilabel: bool, tmp_path) -> None:
    """A fine_tune run (either task) ends with the kept model's calibration in metrics.json, measured
    out of fold on its validation images, and the reliability diagram beside it; a run with too few
    validation images says so and keeps its probabilities."""
    import json

    from helpers.shapes import make_folder, make_multilabel_csv
    from visiontl import fine_tune

    def run(n: int, name: str) -> dict:
        data = make_multilabel_csv(tmp_path / name, n=n, seed=0) if multilabel else make_folder(tmp_path / name, per_class=n // 3)
        result = fine_tune(str(data), backbone="test_resnet", pretrained=False, strategy="full", steps=4, image_size=32,
                           out=tmp_path / "runs", name=name, data_kwargs={"num_workers": 0},
                           trainer_kwargs={"enable_progress_bar": False})
        record = json.loads((result.run_dir / "metrics.json").read_text())["calibration"]
        assert (result.run_dir / "reliability.png").is_file() == ("plot" in record)
        return record

    record = run(120, "enough")
    assert record["plot"] == "reliability.png" and record["applied"] is True and record["folds"] == 2
    assert len(record["temperature"]) == (3 if multilabel else 1) and all(0.05 <= t <= 20 for t in record["temperature"])
    assert 0 <= record["ece_after"] <= 1 and 0 <= record["ece_before"] <= 1 and record["images"] >= 20
    few = run(36, "few")
    assert few["applied"] is False and "too few to fit" in few["note"] and "temperature" not in few


def test_the_calibration_floor_is_what_a_perfectly_calibrated_model_shows_and_shrinks_with_images() -> None:
    from visiontl.analyse.calibration import calibration_error, calibration_floor

    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(200, 4, generator=g) * 2).softmax(1)
    floor = calibration_floor(probs)
    top, pred = probs.max(1)  # outcomes drawn exactly as the probabilities say: ECE near the floor
    hit = torch.rand(200, generator=g) < top
    honest = calibration_error(probs, torch.where(hit, pred, (pred + 1) % 4))
    assert 0.01 < floor < 0.2 and abs(honest - floor) < 0.05
    many = (torch.randn(5000, 4, generator=g) * 2).softmax(1)
    assert calibration_floor(many, draws=50) < floor / 2  # the bias falls with the number of images
    tags = torch.rand(300, 3, generator=g)
    assert 0 < calibration_floor(tags, multilabel=True, draws=50) < 0.1
