"""The fitted temperature is part of the kept model: its checkpoint, its predictions, its PEFT
checkpoint and its ONNX export give the calibrated probabilities; a multi-label model's decisions
do not change; checkpoints from before calibration still load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from visiontl import fine_tune
from visiontl.tasks import ClassificationTask
from visiontl.tasks.checkpoints import read_checkpoint, save_checkpoint
from visiontl.tasks.multilabel import decisions

QUIET = {"enable_progress_bar": False}


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory: pytest.TempPathFactory):
    from helpers.shapes import make_folder

    data = make_folder(tmp_path_factory.mktemp("shapes40"), per_class=40)  # 24 validation images: enough to fit T
    return fine_tune(str(data), backbone="test_resnet", pretrained=False, strategy="full", steps=30,
                     image_size=32, out=tmp_path_factory.mktemp("cal") / "runs", name="cal",
                     data_kwargs={"num_workers": 0}, trainer_kwargs=QUIET)


def test_the_kept_checkpoint_and_the_returned_task_carry_the_temperature(calibrated_run) -> None:
    record = json.loads((calibrated_run.run_dir / "metrics.json").read_text())["calibration"]
    assert record["applied"] is True
    t = torch.tensor(record["temperature"])
    ckpt = read_checkpoint(calibrated_run.run_dir / "checkpoints" / "best.ckpt")
    assert torch.allclose(ckpt["state_dict"]["temperature"], t)
    assert ckpt["visiontl"]["calibration"]["temperature"] == record["temperature"] and record["images"] >= 20
    assert torch.allclose(calibrated_run.task.temperature, t)
    loaded = ClassificationTask.from_checkpoint(calibrated_run.run_dir / "checkpoints" / "best.ckpt")
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        out = loaded.predict_step({"image": x, "index": torch.arange(5)}, 0)
        raw = loaded(x)
    assert torch.allclose(out["probs"], (raw / t).softmax(1), atol=1e-6)
    assert torch.equal(out["label"], raw.argmax(1))  # the same classes: only the probabilities move


def test_the_export_computes_the_calibrated_probabilities(calibrated_run, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from visiontl.deploy.export import export_onnx

    path = tmp_path / "model.onnx"
    export_onnx(calibrated_run.run_dir, path)
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    t = json.loads(meta["temperature"])
    assert t == pytest.approx(calibrated_run.task.temperature.tolist(), abs=1e-6)
    assert not [n for n in proto.graph.node if n.op_type == "Mul" and "logits" in n.output]  # folded into the head
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    logits, probs = ort.InferenceSession(str(path)).run(["logits", "probabilities"], {"input": x})
    task = ClassificationTask.from_checkpoint(calibrated_run.run_dir / "checkpoints" / "best.ckpt")
    with torch.no_grad():
        mean, std = torch.tensor(task.preprocessing.mean).view(1, -1, 1, 1), torch.tensor(task.preprocessing.std).view(1, -1, 1, 1)
        raw = task((torch.from_numpy(x) - mean) / std)
    assert np.allclose(logits, (raw / torch.tensor(t)).numpy(), atol=1e-4)
    assert np.allclose(probs, (raw / torch.tensor(t)).softmax(1).numpy(), atol=1e-5)


def test_a_checkpoint_from_before_calibration_loads_with_temperature_one(calibrated_run, tmp_path: Path) -> None:
    ckpt = read_checkpoint(calibrated_run.run_dir / "checkpoints" / "best.ckpt")
    del ckpt["state_dict"]["temperature"]
    old = save_checkpoint(ckpt, tmp_path / "old.ckpt")
    assert ClassificationTask.from_checkpoint(old).temperature.tolist() == [1.0]
    lightning = ClassificationTask.load_from_checkpoint(old, weights_only=True, map_location="cpu")
    assert lightning.temperature.tolist() == [1.0]


def test_multi_label_decisions_do_not_move_when_the_temperature_is_applied() -> None:
    task = ClassificationTask("test_resnet", num_classes=3, pretrained=False, task="multilabel")
    task.thresholds.copy_(torch.tensor([0.3, 0.5, 0.8]))
    logits = torch.randn(500, 3, generator=torch.Generator().manual_seed(0)) * 3
    before = decisions(task.calibrated(logits).sigmoid(), task.thresholds)
    task.set_temperature([2.0, 0.5, 1.5])
    after = decisions(task.calibrated(logits).sigmoid(), task.thresholds)
    assert torch.equal(before, after)
    assert task.thresholds[1] == pytest.approx(0.5) and task.thresholds[0] > 0.3 and task.thresholds[2] < 0.8
    task.set_temperature([1.0, 1.0, 1.0])  # back: the thresholds as they were
    assert torch.allclose(task.thresholds, torch.tensor([0.3, 0.5, 0.8]), atol=1e-5)
    with pytest.raises(ValueError, match="must be positive"):
        task.set_temperature([1.0, 0.0, 1.0])


def test_a_multi_label_run_keeps_its_decisions_and_the_peft_checkpoint_carries_the_temperature(
        tmp_path: Path, base_weights: Path) -> None:
    from helpers.shapes import make_multilabel_csv
    from visiontl.tasks.trained import load_task

    data = make_multilabel_csv(tmp_path / "tags", n=120, seed=0)
    run = fine_tune(str(data), backbone="test_resnet", pretrained=False, weights=str(base_weights),
                    strategy={"name": "lora", "r": 4, "lr": 0.05}, steps=30, image_size=32, out=tmp_path / "runs",
                    name="tags", data_kwargs={"num_workers": 0}, trainer_kwargs=QUIET)
    record = json.loads((run.run_dir / "metrics.json").read_text())
    t = torch.tensor(record["calibration"]["temperature"])
    ckpt = read_checkpoint(run.run_dir / "checkpoints" / "best.ckpt")
    assert t.shape == (3,) and torch.allclose(ckpt["state_dict"]["temperature"], t)
    # the per-tag table in metrics.json states the thresholds the kept model applies
    assert [row["threshold"] for row in record["tags"]] == pytest.approx(ckpt["state_dict"]["thresholds"].tolist())
    delta = load_task(run.run_dir / "checkpoints" / "best.peft.safetensors")
    assert torch.allclose(delta.temperature, t) and torch.allclose(delta.thresholds, ckpt["state_dict"]["thresholds"])
