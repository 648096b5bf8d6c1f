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


# -- abstention: the out-of-distribution detector is part of the kept model too ---------------------
def _noise(folder: Path, n: int = 24) -> list[Path]:
    """Images of no class at all: uniform noise."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        paths.append(folder / f"noise{i:02d}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _val_images(run) -> list[Path]:
    return [Path(p) for p in (run.run_dir / "val_images.txt").read_text().split()]


def test_the_kept_checkpoint_carries_the_detector_and_its_threshold(calibrated_run) -> None:
    from visiontl.models.ood import DEFAULT_SCORE, OODDetector

    record = json.loads((calibrated_run.run_dir / "metrics.json").read_text())["abstention"]
    assert record["applied"] is True and record["score"] == DEFAULT_SCORE
    assert record["val_accepted"] >= 0.95 and record["fitted_on"] > 0
    ckpt = read_checkpoint(calibrated_run.run_dir / "checkpoints" / "best.ckpt")
    stored = OODDetector.from_record(ckpt["visiontl"]["ood"])
    assert stored.threshold == pytest.approx(record["threshold"], abs=1e-6)
    loaded = ClassificationTask.from_checkpoint(calibrated_run.run_dir / "checkpoints" / "best.ckpt")
    assert loaded.ood is not None and loaded.ood.threshold == stored.threshold
    assert calibrated_run.task.ood is not None and calibrated_run.task.ood.threshold == stored.threshold
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        out = loaded.predict_step({"image": x, "index": torch.arange(6)}, 0)
        features = loaded.model.forward_head(loaded.model.forward_features(x), pre_logits=True)
        expected = stored(features, loaded.calibrated(loaded.model.get_classifier()(features)))
    assert torch.allclose(out["ood_score"], expected, atol=1e-6)
    assert torch.equal(out["abstain"], expected > stored.threshold)


def test_unfamiliar_images_score_above_the_validation_images_and_abstain(calibrated_run, tmp_path: Path) -> None:
    from visiontl.analyse.ood import auroc
    from visiontl.deploy.export import export_onnx
    from visiontl.deploy.predict import Predictor

    path = tmp_path / "model.onnx"
    report = export_onnx(calibrated_run.run_dir, path)
    assert report["abstain_mismatches"] == 0 and report["max_abs_ood_diff"] <= report["ood_tolerance"]
    predictor = Predictor(path)
    assert predictor.ood["score"] == calibrated_run.task.ood.score
    familiar = predictor.predict(_val_images(calibrated_run))
    unfamiliar = predictor.predict(_noise(tmp_path / "noise"))
    assert auroc(torch.tensor([p.ood_score for p in familiar]), torch.tensor([p.ood_score for p in unfamiliar])) > 0.9
    assert np.mean([p.abstain for p in familiar]) <= 0.1 and np.mean([p.abstain for p in unfamiliar]) >= 0.9
    assert all(p.label is not None for p in unfamiliar)  # flagged, still answered: the caller decides
    quiet = Predictor(path, abstain=False).predict(_noise(tmp_path / "noise"))
    assert all(p.abstain is None and p.ood_score is not None for p in quiet)


def test_predict_onnx_writes_the_score_and_the_flag_and_no_abstain_drops_the_flag(
        calibrated_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from visiontl.deploy.export import export_onnx
    from visiontl.deploy.predict import main

    path = tmp_path / "model.onnx"
    export_onnx(calibrated_run.run_dir, path)
    noise = _noise(tmp_path / "noise", n=3)
    assert main([str(path), *map(str, noise)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "path,label,probability,ood_score,abstain,error"
    assert all(line.split(",")[4] == "true" for line in lines[1:])
    assert main([str(path), *map(str, noise), "--no-abstain"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "path,label,probability,ood_score,error"


def test_the_int8_export_keeps_the_detector_float_and_reports_its_agreement(calibrated_run, tmp_path: Path) -> None:
    from visiontl.deploy.export import export_onnx

    report = export_onnx(calibrated_run.run_dir, tmp_path / "model.onnx", quantize="int8")["int8"]
    assert report["accepted"] and any(name.startswith("/ood/") for name in report["excluded_nodes"])
    assert 0.0 <= report["abstain_agreement"] <= 1.0


def test_a_damaged_detector_record_is_one_line_naming_the_checkpoint(calibrated_run, tmp_path: Path) -> None:
    from visiontl.tasks.checkpoints import CheckpointError

    ckpt = read_checkpoint(calibrated_run.run_dir / "checkpoints" / "best.ckpt")
    ckpt["visiontl"]["ood"]["tensors"]["bank"] = torch.full((2, 2), float("nan"))
    bad = save_checkpoint(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"bad\.ckpt: its ood tensor bank") as err:
        ClassificationTask.from_checkpoint(bad)
    assert "\n" not in str(err.value)


def test_a_checkpoint_from_before_abstention_exports_and_predicts_without_it(calibrated_run, tmp_path: Path) -> None:
    from visiontl.deploy.export import export_onnx
    from visiontl.deploy.predict import Predictor

    ckpt = read_checkpoint(calibrated_run.run_dir / "checkpoints" / "best.ckpt")
    del ckpt["visiontl"]["ood"]
    old = save_checkpoint(ckpt, tmp_path / "old.ckpt")
    assert ClassificationTask.from_checkpoint(old).ood is None
    export_onnx(old, tmp_path / "old.onnx")
    predictor = Predictor(tmp_path / "old.onnx")
    assert predictor.ood is None
    assert predictor.predict(_noise(tmp_path / "noise", n=2))[0].ood_score is None


def test_ood_score_none_fits_no_detector(tmp_path: Path) -> None:
    from helpers.shapes import make_folder

    data = make_folder(tmp_path / "shapes", per_class=12)
    run = fine_tune(str(data), backbone="test_resnet", pretrained=False, strategy="probe", steps=2, image_size=32,
                    out=tmp_path / "runs", name="none", task_kwargs={"ood_score": None},
                    data_kwargs={"num_workers": 0}, trainer_kwargs=QUIET)
    assert "abstention" not in json.loads((run.run_dir / "metrics.json").read_text()) and run.task.ood is None
    with pytest.raises(ValueError, match="ood_score must be one of"):
        ClassificationTask("test_resnet", num_classes=3, pretrained=False, ood_score="entropy")


def test_visiontl_predict_writes_the_score_and_the_flag_of_each_image(calibrated_run, tmp_path: Path) -> None:
    import csv

    from visiontl.cli.commands import main

    recipe = Path(__file__).parents[2] / "recipes" / "folder.yaml"
    root = _val_images(calibrated_run)[0].parents[1]  # <root>/<class>/<image>
    _noise(tmp_path / "noise", n=6)
    assert main(["predict", "--config", str(recipe), "--model.init_args.backbone", "test_resnet",
                 "--model.init_args.strategy", "full", "--model.init_args.pretrained", "false", "--model.init_args.weights", "null",
                 "--data.init_args.root", str(root), "--data.init_args.predict_root", str(tmp_path / "noise"),
                 "--data.init_args.image_size", "32",
                 "--data.init_args.num_workers", "0", "--trainer.enable_progress_bar", "false",
                 "--trainer.logger.init_args.save_dir", str(tmp_path),
                 "--ckpt_path", str(calibrated_run.run_dir / "checkpoints" / "best.ckpt")]) == 0
    with next(tmp_path.rglob("predictions.csv")).open() as fh:
        rows = list(csv.DictReader(fh))
    threshold = calibrated_run.task.ood.threshold
    assert len(rows) == 6 and all((r["abstain"] == "true") == (float(r["ood_score"]) > threshold) for r in rows)
    assert all(r["abstain"] == "true" for r in rows)  # noise is nothing like the training images


def test_visiontl_export_prints_the_abstention_check(calibrated_run, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from visiontl.cli.commands import main

    assert main(["export", str(calibrated_run.run_dir), "--out", str(tmp_path / "model.onnx")]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("abstention:"))
    assert "0 image(s) abstaining on one side only" in line
