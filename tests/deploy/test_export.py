"""ONNX export (verified, atomic, self-describing) and the torch-free predictor."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from visiontl import fine_tune
from visiontl.cli.commands import main
from visiontl.deploy.export import ExportError, export_onnx
from visiontl.tasks.checkpoints import CheckpointError
from visiontl.deploy.predict import Predictor, PredictorError


@pytest.mark.parametrize("backbone,in_chans,size", [("test_resnet", 1, 32), ("test_vit", 3, None),
                                                     ("test_vit", 3, 32), ("test_efficientnet", 13, 32)])
def test_export_matches_pytorch_for_cnns_vits_and_channels(backbone: str, in_chans: int, size, tmp_path: Path) -> None:
    from visiontl.tasks import ClassificationTask

    task = ClassificationTask(backbone, num_classes=4, class_names=list("abcd"), pretrained=False,
                              in_chans=in_chans, preprocessing={"size": size} if size else None).eval()
    report = export_onnx(task, tmp_path / "m.onnx")
    assert report["max_abs_logit_diff"] < 1e-4 and report["top1_agreement"] == 1.0
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["class_names"]) == list("abcd") and meta["channels"] == str(in_chans)
    assert meta["backbone"] == backbone and "weights_sha256" in meta and "visiontl_version" in meta
    # dynamic batch and the stated input convention: normalisation happens inside the graph
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    height, width = json.loads(meta["input_size"])
    x = np.random.default_rng(0).random((3, in_chans, height, width), dtype=np.float32)
    logits, probs = session.run(None, {"input": x})
    cfg = task.data_config
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = task.model((torch.from_numpy(x) - mean) / std).numpy()
    assert np.allclose(logits, expected, rtol=1e-3, atol=1e-5) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_cli_export_verifies_on_the_runs_images_and_predictor_agrees(run, shapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    report = export_onnx(run.run_dir, out, images=sorted(shapes_root.rglob("*.png"))[:12])
    assert report["verified_on"] == "12 images" and report["max_abs_logit_diff"] < 1e-4
    predictor = Predictor(out)
    files = sorted((shapes_root / "discs").glob("*.png"))[:4]
    preds = predictor.predict(files)
    assert [p.path for p in preds] == [str(f) for f in files]
    task = run.task.eval()
    from visiontl.deploy.export import preprocess_for_export

    cfg = task.data_config
    assert predictor.crop_pct == cfg["crop_pct"]  # the geometry it was trained with
    x = torch.from_numpy(preprocess_for_export(files, (32, 32), 3, predictor.crop_pct))
    with torch.no_grad():
        expected = task.model((x - torch.tensor(cfg["mean"]).view(1, -1, 1, 1))
                              / torch.tensor(cfg["std"]).view(1, -1, 1, 1)).softmax(1)
    assert [p.label for p in preds] == [task.class_names[i] for i in expected.argmax(1).tolist()]
    assert np.allclose([p.probability for p in preds], expected.max(1).values.numpy(), atol=1e-4)


def test_failed_verification_leaves_nothing_at_the_target(run, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous model")
    with pytest.raises(ExportError, match="nothing was written"):
        export_onnx(run.run_dir, out, atol=-1.0, rtol=0.0)
    assert out.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp file left


def test_export_errors(tmp_path: Path) -> None:
    assert main(["export", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "m.onnx")]) == 2
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints"):
        export_onnx(tmp_path / "empty_run", tmp_path / "m.onnx")
    from visiontl.tasks import ClassificationTask

    task = ClassificationTask("test_resnet", num_classes=2, pretrained=False)
    with pytest.raises(ExportError, match="Unsupported opset 5"):
        export_onnx(task, tmp_path / "m.onnx", opset=5)


def test_predictor_rejects_foreign_models_and_skips_bad_files(run, shapes_root: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    bare = tmp_path / "bare.onnx"
    torch.onnx.export(torch.nn.Linear(2, 2), torch.randn(1, 2), str(bare), dynamo=False)
    with pytest.raises(PredictorError, match="no visiontl metadata"):
        Predictor(bare)
    model = tmp_path / "m.onnx"
    export_onnx(run.run_dir, model)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    good = sorted((shapes_root / "bars").glob("*.png"))[0]
    csv_out = tmp_path / "preds.csv"
    code = main(["predict-onnx", str(model), str(good), str(broken), "--out", str(csv_out)])
    assert code == 1  # some files failed
    rows = csv_out.read_text().splitlines()
    assert len(rows) == 3 and rows[2].endswith("not a recognised image format")
    assert "skipped" in capsys.readouterr().err


def test_predictor_does_not_import_torch(run, shapes_root: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    export_onnx(run.run_dir, model)
    image = sorted(shapes_root.rglob("*.png"))[0]
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch.") or name.startswith("pytorch_lightning"):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        from visiontl.deploy.predict import Predictor
        preds = Predictor({str(model)!r}).predict([{str(image)!r}])
        assert preds[0].label is not None
        assert "torch" not in sys.modules
        print("ok", preds[0].label)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


@pytest.mark.parametrize("backbone,method", [("test_resnet", "static QDQ"), ("test_vit", "dynamic, MatMul only")])
def test_int8_is_kept_only_when_it_agrees(backbone: str, method: str, shapes_root: Path, tmp_path: Path) -> None:
    from visiontl.tasks import ClassificationTask

    task = ClassificationTask(backbone, num_classes=3, pretrained=False,
                              preprocessing={"size": 32} if backbone != "test_vit" else None).eval()
    images = sorted(shapes_root.rglob("*.png"))
    out = tmp_path / "m.onnx"
    report = export_onnx(task, out, images=images[:12], quantize="int8", calibration_images=images[12:],
                         min_agreement=0.0)
    q8 = report["int8"]
    assert q8["method"].startswith(method) and q8["accepted"] and Path(q8["path"]).exists()
    assert q8["int8_bytes"] < q8["float_bytes"]
    meta = {p.key: p.value for p in onnx.load(q8["path"]).metadata_props}
    assert json.loads(meta["quantization"])["top1_agreement"] == q8["top1_agreement"]
    assert Predictor(q8["path"]).predict(images[:2])[0].label is not None
    # an impossible bar: refused, the float model stays, no int8 file
    (tmp_path / "m.int8.onnx").unlink()
    refused = export_onnx(task, out, images=images[:12], quantize="int8", calibration_images=images[12:],
                          min_agreement=1.01)["int8"]
    assert not refused["accepted"] and refused["path"] is None and 0.0 <= refused["top1_agreement"] <= 1.0
    assert out.exists() and not (tmp_path / "m.int8.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_vit_trained_at_another_size_exports_and_reloads(shapes_root: Path, tmp_path: Path) -> None:
    from visiontl.tasks import ClassificationTask

    result = fine_tune(shapes_root, backbone="test_vit", strategy="full", pretrained=False, image_size=32, steps=4,
                       out=tmp_path, data_kwargs={"num_workers": 0}, trainer_kwargs={"enable_progress_bar": False})
    assert tuple(result.task.model.patch_embed.img_size) == (32, 32)
    task = ClassificationTask.from_checkpoint(result.run_dir / "checkpoints" / "last.ckpt")
    assert task.data_config["input_size"] == (3, 32, 32)
    report = export_onnx(result.run_dir, tmp_path / "vit.onnx", images=sorted(shapes_root.rglob("*.png"))[:6])
    assert report["max_abs_logit_diff"] < 1e-4


def test_predictor_reads_16_bit_grayscale_and_any_size(run, tmp_path: Path) -> None:
    from PIL import Image

    model = tmp_path / "m.onnx"
    export_onnx(run.run_dir, model)
    deep = tmp_path / "deep.png"
    Image.fromarray((np.arange(80 * 50).reshape(80, 50) * 13 % 65535).astype(np.uint16)).save(deep)
    wide = tmp_path / "wide.jpg"
    Image.fromarray(np.full((20, 90, 3), 200, dtype=np.uint8)).save(wide)
    preds = Predictor(model).predict([deep, wide])
    assert all(p.error is None and p.label in run.task.class_names for p in preds)
    assert all(abs(sum(p.probabilities.values()) - 1) < 1e-4 for p in preds)


def test_export_finds_the_runs_own_images(run, tmp_path: Path) -> None:
    val = (run.run_dir / "val_images.txt").read_text().split()
    assert val and (run.run_dir / "train_images.txt").exists()
    report = export_onnx(run.run_dir / "checkpoints" / "best.ckpt", tmp_path / "m.onnx", quantize="int8",
                         min_agreement=0.0)
    assert report["verified_on"] == f"{len(val)} images"
    train = (run.run_dir / "train_images.txt").read_text().split()
    assert f"calibrated on {len(train) // 8 * 8 or len(train)} images" in report["int8"]["method"]


def _scaled_task(scale: float):
    from visiontl.tasks import ClassificationTask

    torch.manual_seed(0)
    task = ClassificationTask("test_resnet", num_classes=4, class_names=list("abcd"), pretrained=False,
                              preprocessing={"size": 32}).eval()
    with torch.no_grad():
        head = task.model.get_classifier()
        head.reset_parameters()  # the default strategy (probe) starts its head at zero: random logits here
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    return task


def test_export_tolerance_is_relative_to_the_logit_scale(tmp_path: Path) -> None:
    """Float32 rounding grows with the logits: large logits differ by more than 1e-4 in absolute
    terms, yet the model is right and exports; the report gives all three numbers."""
    report = export_onnx(_scaled_task(3e4), tmp_path / "big.onnx")
    assert report["max_abs_logit_diff"] > 1e-4  # would have been refused by a fixed 1e-4
    assert report["max_abs_logit_diff"] <= report["logit_tolerance"] == pytest.approx(1e-4 + 1e-3 * report["logit_scale"])
    assert report["logit_scale"] > 100 and report["max_prob_diff"] <= 1e-4 and report["top1_mismatches"] == 0
    assert (tmp_path / "big.onnx").exists()


def test_export_refuses_a_wrong_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One perturbed weight in the ONNX file is a real error, not noise: refused, nothing written."""
    real_export = torch.onnx.export

    def export_then_perturb(model, args, f, **kwargs):
        real_export(model, args, f, **kwargs)
        proto = onnx.load(str(f))
        gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")  # the classifier
        init = next(t for t in proto.graph.initializer if t.name == gemm.input[2])  # its bias
        values = onnx.numpy_helper.to_array(init).copy()
        values.flat[0] += 0.5  # one weight of one class
        init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
        onnx.save(proto, str(f))

    monkeypatch.setattr(torch.onnx, "export", export_then_perturb)
    with pytest.raises(ExportError, match="does not reproduce PyTorch"):
        export_onnx(_scaled_task(1.0), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_compare_outputs_counts_top1_flips_only_outside_ties() -> None:
    from visiontl.deploy.export import compare_outputs

    ref = np.array([[5.0, 1.0, 0.0], [2.0, 2.0 + 1e-6, 0.0]])
    tie_flip = ref + np.array([[0.0, 0.0, 0.0], [2e-6, 0.0, 0.0]])  # the near tie flips: rounding
    ok = compare_outputs(ref, tie_flip)
    assert ok["passed"] and ok["top1_agreement"] == 0.5 and ok["top1_mismatches"] == 0
    wrong = ref.copy()
    wrong[0] = [1.0, 5.0, 0.0]
    bad = compare_outputs(ref, wrong)
    assert not bad["passed"] and bad["top1_mismatches"] == 1 and bad["max_abs_logit_diff"] == 4.0
    probs_off = compare_outputs(np.array([[0.0, 0.0]]), np.array([[0.0, 1e-3]]), atol=1e-2)
    assert probs_off["max_abs_logit_diff"] <= probs_off["logit_tolerance"] and not probs_off["passed"]


def test_export_never_executes_what_a_run_directory_names(run, tmp_path: Path) -> None:
    """A run directory is someone else's data: a config.yaml naming os.system must not run."""
    import shutil

    evil = tmp_path / "evil_run"
    shutil.copytree(run.run_dir, evil)
    (evil / "val_images.txt").unlink()
    marker = tmp_path / "pwned"
    (evil / "config.yaml").write_text(
        f"data:\n  class_path: os.system\n  init_args:\n    command: touch {marker}\n"
        f"model:\n  class_path: subprocess.call\n  init_args:\n    args: [touch, {marker}]\n"
    )
    report = export_onnx(evil, tmp_path / "m.onnx")
    assert not marker.exists()
    assert report["verified_on"].startswith("8 random inputs")
    assert main(["export", str(evil), "--out", str(tmp_path / "m2.onnx")]) == 0 and not marker.exists()


def test_a_checkpoint_naming_a_foreign_strategy_class_imports_nothing(run, tmp_path: Path) -> None:
    """from_checkpoint reads the strategy's class_path as data: only registered strategies load."""
    from visiontl.tasks import ClassificationTask
    from visiontl.models.weights import WeightsError

    ckpt = torch.load(run.run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    module = tmp_path / "evil_strategy_module.py"
    marker = tmp_path / "imported"
    module.write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        ckpt["hyper_parameters"]["strategy"] = {"class_path": "evil_strategy_module.Evil", "init_args": {}}
        torch.save(ckpt, tmp_path / "evil.ckpt")
        with pytest.raises(WeightsError, match="not a registered visiontl strategy"):
            ClassificationTask.from_checkpoint(tmp_path / "evil.ckpt")
        assert not marker.exists()
    finally:
        sys.path.remove(str(tmp_path))
    assert ClassificationTask.from_checkpoint(run.run_dir / "checkpoints" / "best.ckpt").strategy.name == "full"


def test_predict_onnx_lists_a_bomb_and_writes_the_rest(run, shapes_root: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from helpers.shapes import write_bomb

    model = tmp_path / "m.onnx"
    export_onnx(run.run_dir, model)
    folder = tmp_path / "scans"
    folder.mkdir()
    for image in sorted((shapes_root / "bars").glob("*.png"))[:3]:
        (folder / image.name).write_bytes(image.read_bytes())
    write_bomb(folder / "a_bomb.png")
    out = tmp_path / "preds.csv"
    assert main(["predict-onnx", str(model), str(folder), "--out", str(out)]) == 1
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == 4 and sum(r.endswith(",") for r in rows) == 3  # three predictions, no error field
    assert any("a_bomb.png" in r and "decompression bomb" in r for r in rows)
    assert "a_bomb.png" in capsys.readouterr().err


def test_predict_onnx_bad_inputs_are_one_line_errors(run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m.onnx"
    export_onnx(run.run_dir, model)
    (tmp_path / "empty").mkdir()
    assert main(["predict-onnx", str(model), str(tmp_path / "empty")]) == 2
    assert "no image files" in capsys.readouterr().err
    fake = tmp_path / "fake.onnx"
    proto = onnx.load(str(model))
    onnx.helper.set_model_props(proto, {"class_names": "not json", "input_size": "[32, 32]", "channels": "3"})
    onnx.save(proto, str(fake))
    with pytest.raises(PredictorError, match="unreadable visiontl metadata"):
        Predictor(fake)
    onnx.helper.set_model_props(proto, {"class_names": '["a"]', "input_size": "[32, 32]", "channels": "13"})
    onnx.save(proto, str(fake))
    with pytest.raises(PredictorError, match="3 channels, the metadata says 13"):
        Predictor(fake)
    image = next(Path(run.run_dir).parent.parent.glob("**/*.png"), None) or model
    assert main(["predict-onnx", str(fake), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1


def test_predictor_frames_option_on_a_multi_frame_dicom(run, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import RLELossless, generate_uid

    model = tmp_path / "m.onnx"
    export_onnx(run.run_dir, model)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds = FileDataset("cine.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "US"
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = 40, 40, 3, 3, "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.PlanarConfiguration = 8, 8, 7, 0, 0
    rng = np.random.default_rng(0)
    ds.PixelData = rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8).tobytes()
    ds.compress(RLELossless)
    cine = tmp_path / "cine.dcm"
    ds.save_as(cine, enforce_file_format=True)
    (refused,) = Predictor(model).predict([cine])
    assert refused.error is not None and "3 frames" in refused.error and "frames: middle" in refused.error
    every = Predictor(model, frames="all").predict([cine])
    assert [p.frame for p in every] == [0, 1, 2] and all(p.error is None for p in every)
    (middle,) = Predictor(model, frames="middle").predict([cine])
    assert middle.probabilities == every[1].probabilities  # the middle of three frames is frame 1
    assert main(["predict-onnx", str(model), str(cine), "--frames", "all", "--out", str(tmp_path / "p.csv")]) == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0].startswith("path,frame,label") and [r.split(",")[1] for r in rows[1:]] == ["0", "1", "2"]
    with pytest.raises(PredictorError, match="frames must be one of"):
        Predictor(model, frames="first")


def test_export_leaves_the_callers_task_as_it_was(run, tmp_path: Path) -> None:
    task = run.task.train()
    assert task.channels_last
    export_onnx(task, tmp_path / "m.onnx")
    assert task.training and task.model.training
    conv = next(m for m in task.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_the_predictor_reads_the_preprocessing_training_resolved(run, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    export_onnx(run.run_dir, model)
    predictor = Predictor(model)
    assert predictor.preprocessing == run.task.preprocessing == run.datamodule.preprocessing
    assert predictor.size == (predictor.preprocessing.size,) * 2 and predictor.channels == predictor.preprocessing.in_chans


def test_export_keeps_the_exporters_folding_note_out_of_the_output(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.onnx's note that a strided Slice was left unfolded is not the user's to act on (the file
    is verified against PyTorch): it is filtered around the export call; other warnings still show."""
    import warnings

    real_export = torch.onnx.export
    note = ("Constant folding - Only steps=1 can be constant folded for opset >= 10 onnx::Slice op. Constant folding "
            "not applied.")

    def export_with_notes(model, args, f, **kwargs):
        warnings.warn(note, UserWarning, stacklevel=1)
        warnings.warn("something the user should see", UserWarning, stacklevel=1)
        real_export(model, args, f, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_with_notes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(_scaled_task(1.0), tmp_path / "m.onnx")
    shown = [str(w.message) for w in caught]
    assert note not in shown and "something the user should see" in shown
