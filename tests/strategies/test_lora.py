"""LoRA through HF peft on any timm backbone: identity at start, only the updates and the head
train, merged for export into a plain graph, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")  # the peft extra (in dev); the base install works without it

from helpers.training import changed_after_training  # noqa: E402
from visiontl import fine_tune  # noqa: E402
from visiontl.deploy.export import export_onnx  # noqa: E402
from visiontl.strategies import StrategyError  # noqa: E402
from visiontl.tasks import ClassificationTask  # noqa: E402


def _pair(backbone: str, **lora: object) -> tuple[ClassificationTask, ClassificationTask]:
    """A plain task and a LoRA task with the same base weights."""
    base = ClassificationTask(backbone, num_classes=3, pretrained=False, strategy="full")
    task = ClassificationTask(backbone, num_classes=3, pretrained=False, strategy={"name": "lora", **lora})
    plain = {k.replace(".base_layer", ""): v for k, v in task.model.state_dict().items() if ".lora_" not in k}
    base.model.load_state_dict(plain)
    return base.eval(), task.eval()


@pytest.mark.parametrize("backbone,size", [("test_resnet", 32), ("test_vit", 160), ("test_convnext", 32),
                                           ("test_efficientnet", 32)])
def test_untrained_lora_is_exactly_the_base_model(backbone: str, size: int) -> None:
    base, task = _pair(backbone, r=2)
    x = torch.randn(3, 3, size, size)
    assert torch.equal(base(x), task(x))  # lora_B starts at zero: the very same logits
    report = task.strategy_report()["lora"]
    from visiontl.models.weights import classifier_names

    heads = classifier_names(task.model)
    assert report["wrapped"] > 0 and not any(m == h or m.startswith(h + ".") for m in report["wrapped_modules"]
                                             for h in heads)  # the classifier trains in full, unwrapped
    if backbone == "test_efficientnet":
        assert report["left_out"] and all("depthwise" in why for why in report["left_out"])


def test_tf_same_convolutions_take_lora_and_merge_back_to_the_plain_layer() -> None:
    """timm's TF ports pad "SAME" dynamically (``Conv2dSame``, the stem of tf_efficientnet_lite0); peft >= 0.22
    builds ``lora_A`` with the base layer's class and a ``padding_mode`` keyword that class does not take."""
    from timm.layers import Conv2dSame

    base, task = _pair("tf_efficientnet_lite0", r=4)
    assert type(base.model.conv_stem) is Conv2dSame and "conv_stem" in task.strategy_report()["lora"]["wrapped_modules"]
    x = torch.randn(2, 3, 37, 45)  # odd sizes: the padding differs per side
    with torch.no_grad():
        assert torch.equal(base(x), task(x))
        for name, p in task.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        tuned = task(x)
        merged = task.strategy.merge(task.model).eval()
        assert (tuned - base(x)).abs().max() > 1e-2  # the updates act, stem included
        assert (merged(x) - tuned).abs().max() <= 1e-4 * tuned.abs().max()
    assert type(merged.conv_stem) is Conv2dSame  # the plain timm class again, as export expects


def test_only_the_updates_and_the_head_train_and_batchnorm_stays(shapes_root: Path, tmp_path: Path) -> None:
    task = ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy={"name": "lora", "r": 4,
                                                                                        "lr": 0.01})
    changed = changed_after_training(task, shapes_root, tmp_path)
    assert changed and all(".lora_" in k or k.startswith("fc.") for k in changed)  # no base weight moved
    assert any(".lora_B" in k for k in changed) and any(".lora_A" in k for k in changed)
    assert not [k for k in changed if k.endswith(("running_mean", "running_var"))]
    report = task.strategy_report()
    assert report["trainable_params"] < 0.1 * report["total_params"]


def test_merge_folds_the_updates_into_a_plain_model_with_the_same_logits(shapes_root: Path, tmp_path: Path) -> None:
    run = fine_tune(shapes_root, backbone="test_resnet", strategy={"name": "lora", "r": 4, "lr": 0.05},
                    pretrained=False, image_size=32, steps=8, out=tmp_path / "lora", data_kwargs={"num_workers": 0},
                    trainer_kwargs={"enable_progress_bar": False})
    task = run.task.eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before = task(x)
        merged = task.strategy.merge(__import__("copy").deepcopy(task.model)).eval()
        after = merged(x)
    assert any(".lora_B" in k and v.abs().sum() > 0 for k, v in task.model.state_dict().items())  # it trained
    assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())  # a plain timm model
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    with pytest.raises(StrategyError, match="no LoRA layers to merge"):
        task.strategy.merge(merged)  # twice
    # the deployed graph is the plain one: the same size as a full fine-tune's
    full = fine_tune(shapes_root, backbone="test_resnet", strategy="full", pretrained=False, image_size=32, steps=2,
                     out=tmp_path / "full", data_kwargs={"num_workers": 0},
                     trainer_kwargs={"enable_progress_bar": False})
    lora_onnx, full_onnx = tmp_path / "lora.onnx", tmp_path / "full.onnx"
    report = export_onnx(run.run_dir, lora_onnx, quantize="int8", min_agreement=0.0)
    export_onnx(full.run_dir, full_onnx)
    assert report["max_abs_logit_diff"] <= report["logit_tolerance"]
    assert report["int8"]["method"].startswith("static QDQ") and Path(report["int8"]["path"]).is_file()  # int8 too
    assert abs(lora_onnx.stat().st_size - full_onnx.stat().st_size) < 0.02 * full_onnx.stat().st_size
    assert json.loads((run.run_dir / "strategy.json").read_text())["lora"]["r"] == 4


def test_lora_errors_name_the_problem() -> None:
    with pytest.raises(StrategyError, match=r"match no module.*layer1\.0\.conv1"):
        ClassificationTask("test_resnet", num_classes=3, pretrained=False,
                           strategy={"name": "lora", "targets": ["attn.qkv"]})
    with pytest.raises(StrategyError, match=r"r=64 is larger than.*rank"):
        ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy={"name": "lora", "r": 64})
    with pytest.raises(StrategyError, match="r must be >= 1"):
        ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy={"name": "lora", "r": 0})


def test_without_peft_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # as if the peft extra were not installed
    with pytest.raises(StrategyError, match=r"pip install 'visiontl\[peft\]'"):
        ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy="lora")


def test_train_bn_lets_the_batchnorm_layers_train_and_update(shapes_root: Path, tmp_path: Path) -> None:
    task = ClassificationTask("test_resnet", num_classes=3, pretrained=False,
                              strategy={"name": "lora", "r": 2, "lr": 0.01, "train_bn": True})
    assert task.strategy.bn_stats == "update" and not task.frozen_norms
    changed = changed_after_training(task, shapes_root, tmp_path)
    assert "bn1.weight" in changed and "bn1.running_mean" in changed  # affine parameters and statistics
    assert not [k for k in changed if k.endswith("conv1.base_layer.weight")]  # the convolutions stay
    norms = sum(p.numel() for m in task.model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    plain = ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy={"name": "lora", "r": 2})
    assert task.strategy_report()["trainable_params"] == plain.strategy_report()["trainable_params"] + norms
