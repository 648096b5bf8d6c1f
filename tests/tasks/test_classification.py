"""ClassificationTask end to end: run directory, metrics, class weights, safe checkpoint loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.shapes import make_folder
from visiontl import fine_tune
from visiontl.data import FolderDataModule
from visiontl.tasks import ClassificationTask
from visiontl.models.weights import WeightsError

QUIET = {"enable_progress_bar": False}


@pytest.fixture(scope="module")
def trained(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("runs")
    return fine_tune(shapes_root, backbone="test_resnet", strategy="full", pretrained=False, image_size=32,
                     steps=40, out=out, data_kwargs={"num_workers": 0}, trainer_kwargs=QUIET)


def test_fine_tune_learns_and_fills_the_run_directory(trained) -> None:
    assert trained.metrics["val_acc"] >= 0.6  # three easy classes; chance is 0.33
    run = trained.run_dir
    for name in ("hparams.yaml", "metrics.csv", "metrics.json", "strategy.json", "confusion_matrix.png",
                 "confusion_matrix.csv", "learning_curves.png", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run / name).exists(), name
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["steps"] == 40 and summary["monitor"] == "val_acc"
    assert {"val_auroc", "val_f1", "val_balanced_acc"} <= set(summary["final"])
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "lr-AdamW/stem" in header and "lr-AdamW/head" in header  # every group's LR is logged
    confusion = (run / "confusion_matrix.csv").read_text().splitlines()
    assert len(confusion) == 4 and confusion[0].endswith("bars,discs,squares")
    # the reports describe the best checkpoint: its metrics, and per-class sensitivity /
    # specificity that agree with its confusion matrix by value
    assert summary["best"]["val_acc"] == pytest.approx(trained.metrics["val_acc"]) == summary["best_score"]
    cm = torch.tensor([[int(v) for v in row.split(",")[1:]] for row in confusion[1:]], dtype=torch.float64)
    for i, name in enumerate(("bars", "discs", "squares")):
        tp, fn, fp = cm[i, i], cm[i].sum() - cm[i, i], cm[:, i].sum() - cm[i, i]
        tn = cm.sum() - tp - fn - fp
        assert summary["best"][f"val_sensitivity/{name}"] == pytest.approx(float(tp / (tp + fn)))
        assert summary["best"][f"val_specificity/{name}"] == pytest.approx(float(tn / (tn + fp)))
    assert summary["best"]["val_acc"] == pytest.approx(float(cm.trace() / cm.sum()))


def test_checkpoint_loads_safely_and_predicts_the_same(trained) -> None:
    best = trained.run_dir / "checkpoints" / "best.ckpt"
    torch.load(best, weights_only=True)  # no pickled objects inside
    task = ClassificationTask.from_checkpoint(best)
    assert task.class_names == ["bars", "discs", "squares"]
    x = torch.randn(4, 3, 32, 32)
    trained.task.eval()
    assert torch.allclose(task(x), trained.task(x), atol=1e-6)


def test_from_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        ClassificationTask.from_checkpoint(tmp_path / "missing.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(WeightsError, match="not a visiontl ClassificationTask checkpoint"):
        ClassificationTask.from_checkpoint(tmp_path / "other.ckpt")


def test_balanced_class_weights_follow_inverse_frequency(tmp_path: Path) -> None:
    root = tmp_path / "imbalanced"
    make_folder(root, per_class=12, classes=("bars",))
    make_folder(root, per_class=4, classes=("discs",), seed=1)
    dm = FolderDataModule(str(root), image_size=32, num_workers=0, val_fraction=0.25)
    task = ClassificationTask("test_resnet", num_classes=2, strategy="probe", pretrained=False,
                              class_weights="balanced")
    result = fine_tune(dm, backbone="test_resnet", strategy="probe", pretrained=False, steps=2, out=tmp_path,
                       task_kwargs={"class_weights": "balanced"}, trainer_kwargs=QUIET)
    counts = torch.tensor(dm.class_counts, dtype=torch.float32)
    assert counts.tolist() == [9.0, 3.0]
    assert torch.allclose(result.task.class_weight, counts.sum() / (2 * counts))
    assert torch.equal(task.class_weight, torch.ones(2))  # before setup: neutral


def test_skipped_images_are_listed_in_the_run_directory(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=6, classes=("a", "b"))
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    result = fine_tune(root, backbone="test_resnet", strategy="probe", pretrained=False, image_size=32, steps=2,
                       out=tmp_path / "runs", data_kwargs={"num_workers": 0, "on_bad_image": "skip"},
                       trainer_kwargs=QUIET)
    listed = (result.run_dir / "skipped_files.txt").read_text()
    assert "broken.png" in listed and len(listed.splitlines()) == 1


def test_task_needs_classes() -> None:
    with pytest.raises(ValueError, match="num_classes or class_names"):
        ClassificationTask("test_resnet", pretrained=False)
    with pytest.raises(ValueError, match="class_names has 2 names but num_classes is 3"):
        ClassificationTask("test_resnet", num_classes=3, class_names=["a", "b"], pretrained=False)


def test_from_checkpoint_passes_back_every_init_argument_and_nothing_else(tmp_path: Path) -> None:
    task = ClassificationTask("test_resnet", num_classes=3, pretrained=False, label_smoothing=0.2, drop_rate=0.1,
                              last_every_minutes=None, grad_clip=0.5)
    hparams = {**dict(task.hparams), "not_an_argument": 1}  # e.g. written by a newer or foreign version
    path = tmp_path / "task.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": task.state_dict()}, path)
    restored = ClassificationTask.from_checkpoint(path)
    for key in ("label_smoothing", "drop_rate", "last_every_minutes", "grad_clip", "num_classes"):
        assert restored.hparams[key] == task.hparams[key], key
    assert "not_an_argument" not in restored.hparams


def test_the_task_trains_from_plain_dataloaders_without_a_datamodule(shapes_root: Path, tmp_path: Path) -> None:
    """Nothing in the task reaches into a datamodule: plain DataLoaders of image batches train it,
    and gradual's LP-FT, with no pooled features to fit a head on, falls back to an SGD head epoch."""
    from torch.utils.data import DataLoader

    dm = FolderDataModule(str(shapes_root), image_size=32, num_workers=0)
    dm.setup()
    train = DataLoader(dm.datasets["train"], batch_size=8, shuffle=True)
    val = DataLoader(dm.datasets["val"], batch_size=8)
    task = ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy="gradual")
    import pytorch_lightning as pl

    pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               num_sanity_val_steps=0, default_root_dir=str(tmp_path)).fit(task, train, val)
    assert task.strategy.head == "sgd" and task.strategy.head_epochs == 1  # the documented fallback
    assert task.preprocessing == task.backbone_preprocessing()  # nothing resolved it: the backbone's


def test_preprocessing_is_resolved_once_recorded_and_read_back(shapes_root: Path, tmp_path: Path) -> None:
    run = fine_tune(shapes_root, backbone="test_resnet", strategy="probe", pretrained=False, image_size=40,
                    steps=2, out=tmp_path, data_kwargs={"num_workers": 0, "augment": "satellite"},
                    trainer_kwargs={"enable_progress_bar": False})
    pre = run.task.preprocessing
    assert pre == run.datamodule.preprocessing  # the datamodule's resolution, recorded by the task
    assert pre.size == 40 and pre.crop_pct == 1.0 and pre.normalization == "backbone" and pre.bit_depth == 8
    restored = ClassificationTask.from_checkpoint(run.run_dir / "checkpoints" / "last.ckpt")
    assert restored.preprocessing == pre and restored.data_config["input_size"] == (3, 40, 40)
