"""Mixup / CutMix and an EMA of the weights (timm's), as options of the classification task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from visiontl.data import FolderDataModule
from visiontl.strategies import StrategyError
from visiontl.tasks import AdaptationTask, ClassificationTask
from visiontl.tasks.regularisers import BatchMixer, WeightEMA
from visiontl.train import attach_run_callbacks


def test_the_mixer_mixes_pairs_and_keeps_an_odd_image_whole() -> None:
    np.random.seed(0)
    images = torch.rand(5, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1])
    mixer = BatchMixer(mixup=0.4, cutmix=0.0, num_classes=3, label_smoothing=0.1)
    mixed, soft = mixer(images, labels)
    assert mixed.shape == images.shape and soft.shape == (5, 3)
    assert torch.allclose(soft.sum(1), torch.ones(5))
    assert not torch.equal(mixed[:4], images[:4])  # pairs mixed
    assert torch.equal(mixed[4], images[4])  # the odd one out unmixed, with its smoothed one-hot target
    assert torch.allclose(soft[4], torch.tensor([0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3]))
    lam = soft[0, 0] - 0.1 / 3  # mixup's lambda on the first image's own class (before smoothing)
    assert 0 < float(lam) < 0.9 + 1e-6
    cut, _ = BatchMixer(mixup=0.0, cutmix=1.0, num_classes=3)(images[:4], labels[:4])
    changed = (cut != images[:4]).any(1)  # CutMix pastes a box: some pixels keep their own value exactly
    assert changed.any() and not changed.all()
    with pytest.raises(ValueError, match="alpha"):
        BatchMixer(mixup=-1.0, cutmix=0.0, num_classes=3)


def test_a_mixing_task_trains_on_soft_targets(shapes_root: Path, tmp_path: Path) -> None:
    task = ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy="full", mixup=0.4, cutmix=1.0)
    assert task.mixer is not None
    dm = FolderDataModule(str(shapes_root), image_size=32, num_workers=0, batch_size=8)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(task, dm)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train_loss_step"])
    with pytest.raises(StrategyError, match="cached features"):
        ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy="probe", mixup=0.2)
    with pytest.raises(ValueError, match="own objective"):
        AdaptationTask("test_resnet", num_classes=3, pretrained=False, mixup=0.2)


def test_ema_validates_and_checkpoints_the_average(shapes_root: Path, tmp_path: Path) -> None:
    """One epoch, one validation at its end: best.ckpt holds the average of the weights (what was
    validated), the model trains on with its own weights."""
    pl.seed_everything(0)
    task = ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy={"name": "full", "lr": 0.05},
                              ema=0.5)
    dm = FolderDataModule(str(shapes_root), image_size=32, num_workers=0, batch_size=8)
    dm.setup("fit")
    steps = len(dm.train_dataloader())
    trainer = attach_run_callbacks(pl.Trainer(max_steps=steps, enable_progress_bar=False, num_sanity_val_steps=0,
                                              default_root_dir=tmp_path, logger=False))
    trainer.fit(task, dm)
    ema = next(c for c in trainer.callbacks if isinstance(c, WeightEMA))
    average = ema._ema.module.state_dict()
    best = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)["state_dict"]
    trained = task.model.state_dict()
    floats = [k for k, v in average.items() if v.is_floating_point() and "running" not in k]
    assert all(torch.allclose(best[f"model.{k}"], average[k]) for k in floats)
    assert not all(torch.allclose(trained[k], average[k]) for k in floats)  # the training weights carry on
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(1.5)


def test_ema_state_resumes_the_training_weights() -> None:
    """last.ckpt written while the average is in the model: the callback's state carries the training
    weights, and a resumed fit trains on them (with the average restored)."""
    model = torch.nn.Linear(3, 2)
    training = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = {k: v + 1.0 for k, v in training.items()}
    saved = {"ema": averaged, "held": training}

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Linear(3, 2)

    module = Module()
    module.model.load_state_dict(averaged)  # what the checkpoint's state_dict held
    callback = WeightEMA(0.9)
    callback.load_state_dict(saved)
    callback.on_fit_start(None, module)  # type: ignore[arg-type]
    assert all(torch.equal(module.model.state_dict()[k], training[k]) for k in training)
    assert all(torch.equal(callback._ema.module.state_dict()[k], averaged[k]) for k in averaged)
