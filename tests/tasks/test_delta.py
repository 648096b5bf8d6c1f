"""PEFT checkpoints: only what trained plus the base weights' SHA-256, reloaded onto the same base,
refused on another; and LoRA on the query and value projections alone."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors import safe_open

pytest.importorskip("peft")  # the peft extra (in dev)

from helpers.training import weights_file  # noqa: E402
from visiontl import fine_tune  # noqa: E402
from visiontl.data import FolderDataModule  # noqa: E402
from visiontl.tasks.delta import read_delta_metadata, save_delta
from visiontl.tasks.trained import load_delta  # noqa: E402
from visiontl.deploy.export import export_onnx  # noqa: E402
from visiontl.strategies import StrategyError  # noqa: E402
from visiontl.tasks import ClassificationTask  # noqa: E402
from visiontl.models.weights import WeightsError, WeightsMismatchError  # noqa: E402


@pytest.fixture(scope="module")
def lora_run(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("delta")
    weights = weights_file(work / "base.safetensors")
    run = fine_tune(shapes_root, backbone="test_resnet", strategy={"name": "lora", "r": 4, "lr": 0.05},
                    pretrained=False, weights=str(weights), image_size=32, steps=6, out=work / "runs",
                    data_kwargs={"num_workers": 0},
                    trainer_kwargs={"enable_progress_bar": False})
    return run, weights, work


def test_peft_checkpoint_holds_what_trained_and_reloads_on_the_same_base(lora_run, tmp_path: Path) -> None:
    run, weights, _ = lora_run
    delta = run.run_dir / "checkpoints" / "best.peft.safetensors"
    with safe_open(str(delta), framework="pt") as f:
        names = list(f.keys())
    assert names and all(".lora_" in n or n.startswith("fc.") for n in names)  # LoRA factors and the head only
    assert any(n.startswith("fc.") for n in names) and any(".lora_B" in n for n in names)
    full_bytes = sum(t.numel() * t.element_size() for t in run.task.model.state_dict().values())
    assert delta.stat().st_size < 0.15 * full_bytes
    meta = read_delta_metadata(delta)
    assert re.fullmatch(r"[0-9a-f]{64}", meta["base_sha256"]) and meta["base_source"] == str(weights)

    task = load_delta(delta)
    best = ClassificationTask.from_checkpoint(run.run_dir / "checkpoints" / "best.ckpt")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(task(x), best(x))  # the same model as the full checkpoint
    assert task.base_weights["sha256"] == best.base_weights["sha256"] == meta["base_sha256"]
    assert any(v.abs().sum() > 0 for k, v in task.model.state_dict().items() if ".lora_B" in k)  # it trained
    report = export_onnx(delta, tmp_path / "from_delta.onnx")  # merged into a plain graph, verified
    assert report["max_abs_logit_diff"] <= report["logit_tolerance"]


def test_peft_checkpoint_is_refused_on_other_base_weights(lora_run, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run, weights, work = lora_run
    delta = run.run_dir / "checkpoints" / "best.peft.safetensors"
    other = weights_file(work / "other.safetensors", seed=1)
    recorded = read_delta_metadata(delta)["base_sha256"]
    with pytest.raises(WeightsMismatchError) as err:
        load_delta(delta, weights=str(other))
    hashes = re.findall(r"sha256 ([0-9a-f]{64})", str(err.value))
    assert len(set(hashes)) == 2 and recorded in hashes and str(other) in str(err.value)
    from visiontl.cli.commands import main

    assert main(["export", str(delta), "--out", str(tmp_path / "m.onnx"), "--weights", str(other)]) == 2
    assert recorded in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
    moved = work / "moved.safetensors"
    weights.rename(moved)
    try:
        with pytest.raises(WeightsError, match=r"cannot be loaded here.*weights="):
            load_delta(delta)  # the recorded base is gone: say which it was and how to point to it
        assert load_delta(delta, weights=str(moved)).base_weights["sha256"] == recorded
        assert main(["export", str(delta), "--out", str(tmp_path / "m.onnx"), "--weights", str(moved)]) == 0
    finally:
        moved.rename(weights)


@pytest.mark.parametrize("strategy,allowed", [("bitfit", (".bias", ".weight")), ("adapter", (".adapter.",))])
def test_peft_checkpoint_of_bitfit_and_adapters(strategy: str, allowed: tuple[str, ...], tmp_path: Path) -> None:
    weights = weights_file(tmp_path / "base.safetensors")
    task = ClassificationTask("test_resnet", num_classes=3, weights=str(weights), strategy=strategy)
    path = save_delta(task, tmp_path / "delta.safetensors")
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
    body = [n for n in names if not n.startswith("fc.")]
    assert body and all(any(a in n for a in allowed) for n in body)
    if strategy == "bitfit":  # no convolution kernel, nothing but 1-D tensors below the head
        with safe_open(str(path), framework="pt") as f:
            assert all(f.get_tensor(n).ndim == 1 for n in body)
    with torch.no_grad():
        for p in task.model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    save_delta(task, path)
    again = load_delta(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), task.eval()(x))


def test_what_is_not_a_peft_checkpoint_is_named(tmp_path: Path) -> None:
    plain = weights_file(tmp_path / "plain.safetensors")
    with pytest.raises(WeightsError, match=r"plain\.safetensors is not a visiontl PEFT checkpoint"):
        load_delta(plain)
    task = ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy="full")
    with pytest.raises(WeightsError, match="parameter-efficient strategy"):
        save_delta(task, tmp_path / "full.safetensors")
    assert not (tmp_path / "full.safetensors").exists()


def test_lora_on_query_and_value_only(shapes_root: Path, tmp_path: Path) -> None:
    task = ClassificationTask("test_vit", num_classes=3, pretrained=False, preprocessing={"size": 32},
                              strategy={"name": "lora", "r": 4, "qkv": "qv", "lr": 0.05})
    full = ClassificationTask("test_vit", num_classes=3, pretrained=False, preprocessing={"size": 32},
                              strategy={"name": "lora", "r": 4})
    dim = task.model.embed_dim
    blocks = len(task.model.blocks)
    assert full.strategy_report()["trainable_params"] - task.strategy_report()["trainable_params"] == blocks * dim * 4
    assert task.strategy_report()["trainable_now"] == task.strategy_report()["trainable_params"]
    base_qkv = task.model.blocks[0].attn.qkv.base_layer.weight.detach().clone()
    dm = FolderDataModule(str(shapes_root), image_size=32, num_workers=0, batch_size=8)
    pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
               num_sanity_val_steps=0, default_root_dir=str(tmp_path)).fit(task, dm)
    for block in task.model.blocks:
        b = block.attn.qkv.lora_B["default"].weight
        assert b[dim:2 * dim].abs().max() == 0 and b[:dim].abs().max() > 0 and b[2 * dim:].abs().max() > 0
    merged = task.strategy.merge(copy.deepcopy(task.model))
    weight = merged.blocks[0].attn.qkv.weight
    assert torch.equal(weight[dim:2 * dim], base_qkv[dim:2 * dim])  # the key projection is the pretrained one
    assert not torch.equal(weight[:dim], base_qkv[:dim])
    with pytest.raises(StrategyError, match="qkv='qv' needs fused qkv layers"):
        ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy={"name": "lora", "qkv": "qv"})
