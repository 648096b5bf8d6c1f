"""The probe's defaults as the optimizer sees them: a zero head, lr 3e-3, weight decay 0.01 on the
weight only, warm-up then cosine (benchmarks/results/probe_budget.md measured why)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from visiontl.data import FolderDataModule
from visiontl.strategies import StrategyError, get_strategy
from visiontl.tasks import ClassificationTask


class _Seen(pl.Callback):
    """The classifier and the optimizer's groups before the first step, and the lr of every step."""

    def __init__(self) -> None:
        self.head: dict[str, torch.Tensor] = {}
        self.groups: list[dict] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        optimizer = trainer.optimizers[0]
        if not self.groups:
            self.head = {k: v.detach().clone() for k, v in pl_module.model.get_classifier().state_dict().items()}
            self.groups = [{k: v for k, v in g.items() if k != "params"} | {"shapes": [tuple(p.shape) for p in g["params"]]}
                           for g in optimizer.param_groups]
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _fit(strategy, root: Path, tmp_path: Path, steps: int = 20) -> tuple[ClassificationTask, _Seen]:
    task = ClassificationTask("test_efficientnet", num_classes=3, strategy=strategy, pretrained=False)
    seen = _Seen()
    dm = FolderDataModule(str(root), image_size=32, num_workers=0, batch_size=4)
    trainer = pl.Trainer(max_steps=steps, max_epochs=-1, default_root_dir=tmp_path, logger=False, callbacks=[seen],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(task, dm)
    return task, seen


def test_probe_defaults_as_the_optimizer_sees_them(shapes_root: Path, tmp_path: Path) -> None:
    task, seen = _fit("probe", shapes_root, tmp_path)
    assert task.uses_feature_cache
    assert task.strategy.lr == 3e-3 and task.strategy.head_init == "zero"
    assert seen.head and all(torch.count_nonzero(v) == 0 for v in seen.head.values())  # starts at zero
    assert [(g["name"], g["initial_lr"], g["weight_decay"], g["shapes"]) for g in seen.groups] == [
        ("head", 3e-3, 0.01, [(3, task.model.get_classifier().in_features)]), ("head/no_decay", 3e-3, 0.0, [(3,)])]
    # 20 steps: one warm-up step at the full rate, then cosine down to 1 % of it
    assert len(seen.lrs) == 20 and seen.lrs[0] == pytest.approx(3e-3)
    expected = [3e-3 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 19))) for s in range(1, 20)]
    assert seen.lrs[1:] == pytest.approx(expected)
    assert all(torch.count_nonzero(v) > 0 for v in task.model.get_classifier().state_dict().values())  # it trained


def test_probe_head_init_model_keeps_the_backbone_s_classifier() -> None:
    torch.manual_seed(0)
    zero = ClassificationTask("test_efficientnet", num_classes=3, strategy="probe", pretrained=False)
    torch.manual_seed(0)
    kept = ClassificationTask("test_efficientnet", num_classes=3, pretrained=False,
                              strategy={"name": "probe", "head_init": "model", "lr": 0.01})
    assert kept.strategy.lr == 0.01 and kept.strategy.to_config()["init_args"]["head_init"] == "model"
    weight = kept.model.get_classifier().weight
    bound = 1 / math.sqrt(3)  # timm's EfficientNet rule: uniform in +-1/sqrt(classes), whatever the width
    assert weight.abs().max() <= bound and weight.abs().max() > 0.5 * bound
    assert torch.count_nonzero(zero.model.get_classifier().weight) == 0
    with pytest.raises(StrategyError, match="head_init"):
        get_strategy({"name": "probe", "head_init": "random"})
