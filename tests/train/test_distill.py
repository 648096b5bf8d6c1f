"""Knowledge distillation: the loss by value, the frozen online teacher on the student's crop, the
unlabelled pairing, the student's run directory (export), the CLI and its errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers.shapes import make_folder
from visiontl import fine_tune
from visiontl.cli.commands import main
from visiontl.data import FolderDataModule
from visiontl.data.images import DataError
from visiontl.data.preprocessing import Preprocessing
from visiontl.train.distill import distill
from visiontl.strategies import StrategyError
from visiontl.tasks import ClassificationTask, DistillationTask
from visiontl.tasks.distill import distillation_loss, teacher_view

QUIET = {"enable_progress_bar": False}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory, shapes_root: Path) -> Path:
    """Trained on a path relative to its working directory: the run's listings must still find the
    images from anywhere else (they are written absolute)."""
    out = tmp_path_factory.mktemp("teacher")
    here = os.getcwd()
    os.chdir(shapes_root.parent)
    try:
        result = fine_tune(shapes_root.name, backbone="test_resnet", strategy="full", pretrained=False, image_size=48,
                           steps=6, out=out, trainer_kwargs=QUIET)
    finally:
        os.chdir(here)
    listed = [line.split(",")[1] for line in (result.run_dir / "splits.csv").read_text().splitlines()[1:]]
    assert listed and all(Path(p).is_absolute() and Path(p).is_file() for p in listed)
    return result.run_dir


@pytest.fixture(scope="module")
def unlabelled_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("unlabelled"), per_class=4, seed=7)


# -- the loss -------------------------------------------------------------------------------------
def test_distillation_loss_matches_a_hand_computation() -> None:
    student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3], [1.5, -0.2, 0.1]])
    teacher = torch.tensor([[3.0, 0.0, -2.0], [-1.0, 2.5, 0.0], [0.2, 0.1, 1.9]])
    labels = torch.tensor([0, 1, -1])  # the third image is unlabelled
    t, alpha = 2.0, 0.3

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max())
        return e / e.sum()

    kl = [float(np.sum(softmax(b / t) * (np.log(softmax(b / t)) - np.log(softmax(a / t)))))
          for a, b in zip(student.numpy(), teacher.numpy())]
    kd = t * t * sum(kl) / 3  # every image, labelled or not
    ce = -(math.log(softmax(student[0].numpy())[0]) + math.log(softmax(student[1].numpy())[1])) / 2  # labelled only
    parts = distillation_loss(student, teacher, labels, temperature=t, alpha=alpha)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-5)
    # alpha 0 is plain cross-entropy; alpha 1 and unlabelled-only batches are the KL term alone
    assert distillation_loss(student[:2], teacher[:2], labels[:2], alpha=0.0)["loss"].item() == pytest.approx(
        F.cross_entropy(student[:2], labels[:2]).item(), rel=1e-6)
    only = distillation_loss(student, teacher, None, temperature=t, alpha=1.0)
    assert only["ce"].item() == 0.0 and only["loss"].item() == pytest.approx(kd, rel=1e-5)
    # no gradient reaches the teacher's logits
    s, tt = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    distillation_loss(s, tt, labels)["loss"].backward()
    assert s.grad is not None and tt.grad is None
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(student, teacher, labels, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, labels, temperature=0)


def test_loss_agrees_with_timm_logit_distillation_task() -> None:
    """timm's LogitDistillationTask (complementary weights) computes the same loss on the same logits."""
    timm_task = pytest.importorskip("timm.task").LogitDistillationTask
    import timm

    torch.manual_seed(0)
    student = timm.create_model("test_resnet", num_classes=4).eval()
    teacher = timm.create_model("test_resnet", num_classes=4).eval()
    x, y = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 3, 1])
    t, alpha = 4.0, 0.6
    theirs = timm_task(student, teacher, criterion=torch.nn.CrossEntropyLoss(), task_loss_weight=1 - alpha,
                       temperature=t, verbose=False)
    theirs.eval()
    with torch.no_grad():
        ref = theirs(x, y)
        ours = distillation_loss(student(x), teacher(x), y, temperature=t, alpha=alpha)
    assert ours["kd"].item() == pytest.approx(ref["kd_loss"].item(), rel=1e-5)
    assert ours["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-5)


def test_teacher_view_renormalises_and_resizes_the_same_crop() -> None:
    student = Preprocessing(size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    teacher = Preprocessing(size=64)  # ImageNet mean / std
    pixels = torch.rand(2, 3, 32, 32)
    x = (pixels - 0.5) / 0.5
    view = teacher_view(x, student, teacher)
    assert view.shape == (2, 3, 64, 64)
    mean, std = torch.tensor(teacher.mean).view(1, 3, 1, 1), torch.tensor(teacher.std).view(1, 3, 1, 1)
    expected = (F.interpolate(pixels, size=(64, 64), mode="bilinear", align_corners=False) - mean) / std
    assert torch.allclose(view, expected, atol=1e-5)
    flat = teacher_view(torch.zeros(1, 3, 32, 32), student, teacher)  # mid-grey: 0.5 in pixels
    assert torch.allclose(flat[0, :, 0, 0], (0.5 - torch.tensor(teacher.mean)) / torch.tensor(teacher.std), atol=1e-6)
    assert teacher_view(x, student, student) is x  # the same convention: untouched


# -- the task -------------------------------------------------------------------------------------
def test_teacher_is_frozen_in_eval_mode_and_sees_the_students_crop(teacher_run: Path, shapes_root: Path,
                                                                     tmp_path: Path) -> None:
    import pytorch_lightning as pl

    dm = FolderDataModule(str(shapes_root), image_size=32, num_workers=0, batch_size=8, augment="satellite")
    task = DistillationTask(backbone="test_efficientnet", class_names=dm.class_names, strategy="full",
                            pretrained=False, teacher=str(teacher_run), temperature=3.0, alpha=0.7)
    teacher = task.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    task.model.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0].detach().clone())
                                         if m.training else None)
    teacher.register_forward_pre_hook(lambda m, a: seen["teacher"].append(a[0].detach().clone()))
    pl.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
               num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path)).fit(task, dm)
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert not any(k.startswith(("teacher", "_teacher")) for k in task.state_dict())
    # the teacher saw each training batch the student saw: the same augmented crop, in its own convention
    assert len(seen["student"]) == 3 and len(seen["teacher"]) == 3
    for xs, xt in zip(seen["student"], seen["teacher"]):
        expected = teacher_view(xs, task.preprocessing, task.teacher_preprocessing)
        assert xt.shape[-1] == 48 and xs.shape[-1] == 32
        assert torch.allclose(xt, expected.contiguous(memory_format=torch.channels_last), atol=1e-5)
    # validation: the frozen teacher's logits on the fixed validation batches are computed once
    seen["teacher"].clear()
    for _ in range(2):
        pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False,
                   default_root_dir=str(tmp_path)).validate(task, dm, verbose=False)
    assert len(seen["teacher"]) == len(dm.val_dataloader()) > 0


def test_unlabelled_images_pair_with_the_labelled_batch(shapes_root: Path, unlabelled_root: Path) -> None:
    dm = FolderDataModule(str(shapes_root), image_size=32, num_workers=0, batch_size=4,
                          unlabelled=str(unlabelled_root))
    dm.setup("fit")
    assert len(dm.splits["unlabelled"]) == 12
    batch, *_ = next(iter(dm.train_dataloader()))
    assert set(batch) == {"source", "target"}
    assert (batch["target"]["label"] == -1).all() and (batch["source"]["label"] >= 0).all()
    assert batch["target"]["image"].shape == batch["source"]["image"].shape
    with pytest.raises(DataError, match="also a labelled"):
        FolderDataModule(str(shapes_root), unlabelled=str(shapes_root)).splits  # noqa: B018
    # set after the splits were read (distill(data=datamodule, unlabelled=...)): still used
    late = FolderDataModule(str(shapes_root), image_size=32, num_workers=0, batch_size=4)
    assert "unlabelled" not in late.splits
    late.unlabelled = str(unlabelled_root)
    assert len(late.splits["unlabelled"]) == 12 and set(next(iter(late.train_dataloader()))[0]) == {"source", "target"}


def test_a_resumed_half_epoch_skips_the_pairs_it_trained_on(shapes_root: Path, unlabelled_root: Path) -> None:
    """A distill run killed mid-epoch resumes with the rest of that epoch's labelled and unlabelled
    batches, the cycled (shorter) unlabelled loader included: no batch twice, none left out."""
    dm = FolderDataModule(str(shapes_root), image_size=32, num_workers=0, batch_size=4,
                          unlabelled=str(unlabelled_root))
    dm.setup("fit")

    def pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(b["source"]["image"], b["target"]["image"]) for b, *_ in dm.train_dataloader()]

    whole = pairs()
    cycle = -(-len(dm.splits["unlabelled"]) // 4)
    assert len(whole) > cycle + 1  # the unlabelled loader cycles within the epoch
    assert 2 * cycle < len(whole) - 1
    for done in (1, cycle + 1, 2 * cycle, len(whole) - 1):
        dm._batches_done_in_resumed_epoch = lambda per_epoch, done=done: done
        resumed = pairs()
        assert len(resumed) == len(whole) - done
        for (source, target), (source2, target2) in zip(whole[done:], resumed):
            assert torch.equal(source, source2) and torch.equal(target, target2)


def test_student_run_exports_and_records_its_teacher(teacher_run: Path, unlabelled_root: Path,
                                                      tmp_path: Path) -> None:
    from visiontl.deploy.export import export_onnx

    result = distill(teacher_run, "test_efficientnet", pretrained=False, image_size=32, steps=4,
                     unlabelled=unlabelled_root, strategy="full", out=tmp_path, trainer_kwargs=QUIET)
    assert result.run_dir.parent.name == "test_efficientnet-distilled"
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    assert summary["distillation"]["teacher"] == str(teacher_run)
    assert summary["distillation"]["temperature"] == 4.0 and summary["distillation"]["alpha"] == 0.5
    assert 0.0 <= summary["best"]["val_teacher_agreement"] <= 1.0
    loaded = ClassificationTask.from_checkpoint(result.run_dir / "checkpoints" / "best.ckpt")
    assert loaded.hparams["backbone"] == "test_efficientnet" and loaded.preprocessing.size == 32
    report = export_onnx(result.run_dir, tmp_path / "student.onnx")
    assert report["top1_agreement"] == 1.0 and (tmp_path / "student.onnx").is_file()
    # the student trained on the teacher's images and split (its splits.csv)
    assert (result.run_dir / "val_images.txt").read_text() == (teacher_run / "val_images.txt").read_text()


def test_cli_distills_and_reports(teacher_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["distill", str(teacher_run), "--student", "test_efficientnet", "--no-pretrained", "--image-size",
                 "32", "--steps", "3", "--temperature", "2", "--alpha", "0.8", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "agreement with the teacher" in printed and "visiontl export" in printed
    run = next((tmp_path / "test_efficientnet-distilled").glob("version_*"))
    record = json.loads((run / "metrics.json").read_text())["distillation"]
    assert (record["temperature"], record["alpha"]) == (2.0, 0.8)
    # a student from random weights trains by scratch (gradual would freeze its random BatchNorm statistics)
    assert ClassificationTask.from_checkpoint(run / "checkpoints" / "last.ckpt").strategy.name == "scratch"
    # a killed (here: finished) run continues where its last checkpoint is, in the same run directory
    assert main(["distill", str(teacher_run), "--student", "test_efficientnet", "--no-pretrained", "--image-size",
                 "32", "--steps", "5", "--temperature", "2", "--alpha", "0.8", "--out", str(tmp_path),
                 "--ckpt-path", "last"]) == 0
    assert [p.name for p in (tmp_path / "test_efficientnet-distilled").iterdir()] == [run.name]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


# -- errors ---------------------------------------------------------------------------------------
def test_teacher_with_other_classes_is_refused(teacher_run: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    other = make_folder(tmp_path / "other", per_class=4, classes=("bars", "discs"))
    with pytest.raises(DataError, match=r"predicts the classes \['bars', 'discs', 'squares'\].*\['bars', 'discs'\]"):
        distill(teacher_run, "test_efficientnet", data=other, pretrained=False, out=tmp_path)
    assert main(["distill", str(teacher_run), "--student", "test_efficientnet", "--data", str(other),
                 "--out", str(tmp_path)]) == 2
    assert "predicts the classes" in capsys.readouterr().err


def test_student_that_cannot_take_the_channels_is_refused(tmp_path: Path, shapes_root: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    gray = fine_tune(shapes_root, backbone="test_resnet", strategy="full", pretrained=False, image_size=32, steps=2,
                     out=tmp_path, task_kwargs={"in_chans": 1}, trainer_kwargs=QUIET)
    import timm

    real = timm.create_model

    def three_channels_only(name: str, *args, in_chans: int = 3, **kwargs):
        if in_chans != 3 and name == "test_efficientnet":  # the student; the teacher still loads
            raise RuntimeError(f"{name} has a fixed RGB stem")
        return real(name, *args, in_chans=in_chans, **kwargs)

    monkeypatch.setattr(timm, "create_model", three_channels_only)
    with pytest.raises(StrategyError, match="cannot take the teacher's 1 input channels.*in_chans=1"):
        distill(gray.run_dir, "test_efficientnet", pretrained=False, out=tmp_path)


def test_closed_form_strategies_and_a_missing_teacher_are_refused(teacher_run: Path, tmp_path: Path) -> None:
    with pytest.raises(StrategyError, match="distillation trains by gradient"):
        DistillationTask(backbone="test_efficientnet", class_names=["bars", "discs", "squares"], strategy="logreg",
                         pretrained=False, teacher=str(teacher_run))
    with pytest.raises(ValueError, match="needs teacher"):
        DistillationTask(backbone="test_efficientnet", num_classes=3, pretrained=False)
    from visiontl.tasks.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="no checkpoints"):
        distill(tmp_path, "test_efficientnet", pretrained=False, out=tmp_path)
