"""Shared by the strategy and checkpoint tests: train a task briefly and say which model tensors moved;
stand-in pretrained weights."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import timm
import torch
from safetensors.torch import save_file

from visiontl.data import FolderDataModule


def changed_after_training(task, root: Path, tmp_path: Path, epochs: int = 1) -> set[str]:
    """Names of the floating-point model tensors (parameters and BatchNorm statistics) that
    ``epochs`` epochs of training on ``root`` (32 px, batches of 8) changed."""
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    dm = FolderDataModule(str(root), image_size=32, num_workers=0, batch_size=8)
    pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_checkpointing=False,
               num_sanity_val_steps=0, default_root_dir=str(tmp_path)).fit(task, dm)
    after = task.model.state_dict()
    return {k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])}


def weights_file(path: Path, backbone: str = "test_resnet", seed: int = 0) -> Path:
    """A stand-in for pretrained weights: a timm model's state dict in a safetensors file."""
    torch.manual_seed(seed)
    model = timm.create_model(backbone, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
