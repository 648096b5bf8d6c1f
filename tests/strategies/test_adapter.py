"""Bottleneck adapters: identity at the start, only the adapters and the head train, and the
hooked branches are in the exported graph."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.training import changed_after_training
from visiontl import fine_tune
from visiontl.deploy.export import export_onnx
from visiontl.strategies import StrategyError
from visiontl.tasks import ClassificationTask


@pytest.mark.parametrize("backbone,size", [("test_resnet", 32), ("test_vit", 160), ("test_convnext", 32),
                                           ("test_efficientnet", 32)])
def test_untrained_adapters_are_exactly_the_base_model(backbone: str, size: int) -> None:
    base = ClassificationTask(backbone, num_classes=3, pretrained=False, strategy="full").eval()
    task = ClassificationTask(backbone, num_classes=3, pretrained=False, strategy="adapter").eval()
    base.model.load_state_dict({k: v for k, v in task.model.state_dict().items() if ".adapter." not in k})
    x = torch.randn(2, 3, size, size)
    assert torch.equal(base(x), task(x))  # up projections start at zero
    assert task.strategy_report()["adapter"]["attached"]


def test_only_adapters_and_the_head_train_and_they_export(shapes_root: Path, tmp_path: Path) -> None:
    task = ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy={"name": "adapter", "lr": 0.02})
    changed = changed_after_training(task, shapes_root, tmp_path, epochs=2)
    assert any(".adapter.up." in k for k in changed)  # the branches learned something
    assert all(".adapter." in k or k.startswith("fc.") for k in changed)  # nothing else moved, BN statistics included
    report = export_onnx(task, tmp_path / "m.onnx")  # the hooked branches are traced into the graph
    assert report["max_abs_logit_diff"] <= report["logit_tolerance"]


def test_adapter_checkpoints_reload_and_bad_hidden_is_an_error(shapes_root: Path, tmp_path: Path) -> None:
    run = fine_tune(shapes_root, backbone="test_resnet", strategy={"name": "adapter", "hidden": 8}, pretrained=False,
                    image_size=32, steps=4, out=tmp_path, data_kwargs={"num_workers": 0},
                    trainer_kwargs={"enable_progress_bar": False})
    restored = ClassificationTask.from_checkpoint(run.run_dir / "checkpoints" / "last.ckpt")
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(restored.eval()(x), run.task.eval()(x), atol=1e-6)
    with pytest.raises(StrategyError, match="hidden must be >= 1"):
        ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy={"name": "adapter", "hidden": 0})
