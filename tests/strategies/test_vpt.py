"""Visual prompt tuning on timm Vision Transformers: prompts join after the prefix tokens and leave
before pooling, only prompts and head train, the prompted model exports and reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from visiontl import fine_tune
from visiontl.data import FolderDataModule
from visiontl.deploy.export import export_onnx
from visiontl.strategies import StrategyError
from visiontl.strategies.vpt import PROMPT
from visiontl.tasks import ClassificationTask


def _task(backbone: str = "test_vit", **vpt: object) -> ClassificationTask:
    return ClassificationTask(backbone, num_classes=3, pretrained=False, preprocessing={"size": 32},
                              strategy={"name": "vpt", **vpt}).eval()


@pytest.mark.parametrize("backbone", ["test_vit", "test_vit2"])  # class-token pooling; average pooling
@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_prompts_join_after_the_prefix_tokens_and_leave_before_pooling(backbone: str, depth: str) -> None:
    task = _task(backbone, depth=depth, tokens=5)
    model = task.model
    prompts = [n for n, _ in model.named_parameters() if n.endswith(PROMPT)]
    assert len(prompts) == (len(model.blocks) if depth == "deep" else 1)
    x = torch.rand(2, 3, 32, 32)
    seen: list[int] = []
    model.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        tokens = model.forward_features(x).shape[1]
        logits = model(x)
    patches = (32 // 16) ** 2
    assert seen[-1] == model.num_prefix_tokens + 5 + patches  # the blocks see the prompts...
    assert tokens == model.num_prefix_tokens + patches  # ...pooling does not
    assert logits.shape == (2, 3)
    # the prompts are read: other prompt values give other logits
    with torch.no_grad():
        getattr(model.blocks[0], PROMPT).mul_(-3.0).add_(1.0)
        assert not torch.equal(model(x), logits)


def test_only_the_prompts_and_the_head_train(shapes_root: Path, tmp_path: Path) -> None:
    task = ClassificationTask("test_vit", num_classes=3, pretrained=False, preprocessing={"size": 32},
                              strategy={"name": "vpt", "depth": "deep", "tokens": 4})
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    dm = FolderDataModule(str(shapes_root), image_size=32, num_workers=0, batch_size=8)
    pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
               num_sanity_val_steps=0, default_root_dir=str(tmp_path)).fit(task, dm)
    after = task.model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed == {k for k in before if k.endswith(PROMPT) or k.startswith("head.")}
    report = task.strategy_report()
    prompts = len(task.model.blocks) * 4 * task.model.embed_dim
    assert report["trainable_params"] == prompts + sum(p.numel() for p in task.model.head.parameters())
    assert report["vpt"] == {"tokens": 4, "depth": "deep", "prompt_sets": len(task.model.blocks), "init": "xavier"}


def test_prompted_model_exports_verified_and_reloads(shapes_root: Path, tmp_path: Path) -> None:
    run = fine_tune(shapes_root, backbone="test_vit", strategy={"name": "vpt", "depth": "deep", "dropout": 0.1},
                    pretrained=False, image_size=32, steps=4, out=tmp_path / "runs", data_kwargs={"num_workers": 0},
                    trainer_kwargs={"enable_progress_bar": False})
    report = export_onnx(run.run_dir, tmp_path / "vpt.onnx")
    assert report["max_abs_logit_diff"] <= report["logit_tolerance"] and "images" in report["verified_on"]
    reloaded = ClassificationTask.from_checkpoint(run.run_dir / "checkpoints" / "best.ckpt")
    x = torch.rand(3, 3, 32, 32)
    best = torch.load(run.run_dir / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(reloaded.state_dict()["model.blocks.1." + PROMPT], best["model.blocks.1." + PROMPT])
    with torch.no_grad():
        assert reloaded(x).shape == (3, 3)
    assert json.loads((run.run_dir / "strategy.json").read_text())["vpt"]["depth"] == "deep"


def test_vpt_errors_name_the_problem() -> None:
    with pytest.raises(StrategyError, match=r"needs a timm Vision Transformer.*ResNet.*'lora'"):
        ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy="vpt")
    with pytest.raises(StrategyError, match="depth must be 'shallow' or 'deep'"):
        ClassificationTask("test_vit", num_classes=3, pretrained=False, strategy={"name": "vpt", "depth": "middle"})
    with pytest.raises(StrategyError, match="tokens must be >= 1"):
        ClassificationTask("test_vit", num_classes=3, pretrained=False, strategy={"name": "vpt", "tokens": 0})
