"""Error analysis in every run directory: the per-class table, the confused pairs and the top-losses
gallery, by value and through a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers.figures import figure_problems
from visiontl.analyse.interpretation import confused_pairs, gallery_figure, per_class_table, top_losses

NAMES = ["a", "b", "c"]


def _logits(pred: list[int], confidence: list[float]) -> torch.Tensor:
    logits = torch.zeros(len(pred), 3)
    for i, (p, c) in enumerate(zip(pred, confidence)):
        logits[i, p] = c
    return logits


def test_per_class_table_and_confused_pairs_by_value() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    pred = [0, 0, 1, 1, 1, 0, 1, 2]
    probs = _logits(pred, [3.0] * 8).softmax(1)
    rows = {r["class"]: r for r in per_class_table(probs, labels, NAMES)}
    assert rows["a"]["support"] == 4 and rows["a"]["recall"] == pytest.approx(0.5)
    assert rows["a"]["precision"] == pytest.approx(2 / 3) and rows["b"]["precision"] == pytest.approx(1 / 4)
    assert rows["c"]["recall"] == pytest.approx(0.5) and rows["c"]["precision"] == pytest.approx(1.0)
    assert rows["b"]["f1"] == pytest.approx(2 * 0.25 * 0.5 / 0.75)
    pairs = confused_pairs(probs, labels, NAMES)
    assert pairs[0] == {"true": "a", "predicted": "b", "count": 2, "share": 0.5}
    assert {(p["true"], p["predicted"]) for p in pairs} == {("a", "b"), ("b", "a"), ("c", "b")}
    never = per_class_table(_logits([0, 0], [1.0, 1.0]).softmax(1), torch.tensor([0, 1]), NAMES)
    assert math.isnan(never[2]["precision"]) and math.isnan(never[2]["recall"])  # c: neither predicted nor present


def test_top_losses_are_the_wrong_ones_highest_loss_first() -> None:
    labels = torch.tensor([0, 1, 2, 0])
    logits = _logits([1, 1, 0, 2], [5.0, 5.0, 1.0, 9.0])  # image 1 right; 3 confidently wrong, 2 barely
    rows = top_losses(logits, labels, [f"img{i}.png" for i in range(4)], NAMES)
    assert [r["path"] for r in rows] == ["img3.png", "img0.png", "img2.png"]
    assert rows[0]["true"] == "a" and rows[0]["predicted"] == "c" and rows[0]["p_predicted"] > 0.99
    assert rows[0]["loss"] > rows[1]["loss"] > rows[2]["loss"]
    tags = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    tag_logits = torch.tensor([[3.0, 2.0, 5.0], [-3.0, 3.0, -3.0], [-4.0, 3.0, -3.0]])
    rows = top_losses(tag_logits, tags, ["x", "y", "z"], NAMES, thresholds=torch.full((3,), 0.5))
    assert [r["path"] for r in rows] == ["z", "x"]  # y is right; c on x is unlabelled, so not a mistake
    assert rows[0]["true"] == "a|b" and rows[0]["predicted"] == "b" and rows[0]["wrong"].startswith("a 0.02")
    assert rows[1]["wrong"].startswith("b 0.88")


def test_the_gallery_shows_each_image_with_its_caption(shapes_root: Path) -> None:
    files = sorted(shapes_root.rglob("*.png"))[:5]
    rows = [{"path": str(f), "true": "a", "predicted": "b", "p_predicted": 0.9, "p_true": 0.05, "loss": 3.0}
            for f in files] + [{"path": str(shapes_root / "gone.png"), "true": "a", "predicted": "c",
                                "p_predicted": 0.6, "p_true": 0.2, "loss": 1.6}]
    fig = gallery_figure(rows, "top losses")
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 5 and files[0].name in shown[0].get_title(loc="left")
    assert "cannot read" in fig.axes[5].texts[0].get_text()
    assert figure_problems(fig) == []


@pytest.mark.parametrize("multilabel", [False, True])
def test_every_run_writes_its_error_analysis(multilabel: bool, shapes_root: Path, tmp_path: Path) -> None:
    from helpers.shapes import make_multilabel_csv
    from visiontl import fine_tune

    data = make_multilabel_csv(tmp_path / "tags", n=40, seed=0) if multilabel else shapes_root
    result = fine_tune(str(data), backbone="test_resnet", pretrained=False, strategy="full", steps=4, image_size=32,
                       out=tmp_path / "runs", name="err", data_kwargs={"num_workers": 0},
                       trainer_kwargs={"enable_progress_bar": False})
    record = json.loads((result.run_dir / "metrics.json").read_text())["errors"]
    expected = {"top_losses.csv", "top_losses.png"} | (set() if multilabel else {"per_class.csv", "confused_pairs.csv"})
    assert set(record["files"]) == expected and all((result.run_dir / f).is_file() for f in expected)
    assert 0 <= record["wrong"] <= record["images"]
    if not multilabel:
        per_class = (result.run_dir / "per_class.csv").read_text().splitlines()
        assert per_class[0] == "class,precision,recall,f1,support" and len(per_class) == 4
        listed = (result.run_dir / "top_losses.csv").read_text().splitlines()
        assert len(listed) == record["wrong"] + 1 and listed[0].startswith("path,true,predicted,p_predicted")
