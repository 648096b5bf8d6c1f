"""Multi-label through the task: loss, thresholds, checkpoints, class weights and refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.shapes import make_multilabel_csv
from visiontl.core.errors import UserError
from visiontl.data import CsvDataModule
from visiontl.strategies import StrategyError, get_strategy
from visiontl.tasks import ClassificationTask
from visiontl.tasks.multilabel import multilabel_loss, per_tag_rates, tune_thresholds


def test_loss_leaves_unlabelled_pairs_out_and_weighs_positives() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, -1.0], [0.0, -1.0, 1.0]])
    pairs = [(0, 0, 1.0), (0, 1, 0.0), (1, 0, 0.0), (1, 2, 1.0)]
    expected = sum(-math.log(torch.sigmoid(torch.tensor(logits[i, j] if y else -logits[i, j])).item())
                   for i, j, y in pairs) / 4
    assert float(multilabel_loss(logits, targets)) == pytest.approx(expected, rel=1e-6)
    weighted = multilabel_loss(logits, targets, pos_weight=torch.tensor([3.0, 1.0, 1.0]))
    extra = 2 * -math.log(torch.sigmoid(torch.tensor(2.0)).item()) / 4  # tag 0's one positive counts 3 times
    assert float(weighted) == pytest.approx(expected + extra, rel=1e-6)


def test_thresholds_maximise_each_tag_s_f1_and_stay_at_half_without_positives() -> None:
    probs = torch.tensor([[0.9, 0.2, 0.3], [0.6, 0.4, 0.1], [0.55, 0.45, 0.2], [0.1, 0.35, 0.4]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    thresholds, f1 = tune_thresholds(probs, targets)
    assert 0.55 < float(thresholds[0]) <= 0.6 and float(f1[0]) == pytest.approx(1.0)  # 0.6 in, 0.55 out
    assert 0.2 < float(thresholds[1]) <= 0.4 and float(f1[1]) == pytest.approx(1.0)  # the -1 row does not count
    assert float(thresholds[2]) == 0.5 and math.isnan(float(f1[2]))  # no positive: default, unscored
    rates = per_tag_rates(probs, targets, thresholds)
    assert rates["support"].tolist() == [2.0, 2.0, 0.0] and rates["sensitivity"][:2].tolist() == [1.0, 1.0]
    # a tag the scores do not rank (its positives lowest): flagging every image would be its best F1; it keeps 0.5
    useless = torch.tensor([[0.1], [0.2], [0.3], [0.4], [0.6], [0.7]])
    truth = torch.tensor([[1.0], [0.0], [0.0], [0.0], [0.0], [0.0]])
    kept, f1 = tune_thresholds(useless, truth)
    assert float(kept[0]) == 0.5 and float(f1[0]) == 0.0  # not 0.1 (F1 2/7, every image flagged)


@pytest.fixture(scope="module")
def tags_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_multilabel_csv(tmp_path_factory.mktemp("tags"), n=60, seed=0, size=32)


def _fit(csv: Path, tmp_path: Path, strategy="full", steps: int = 12, **task_kwargs):
    from visiontl import fine_tune

    return fine_tune(str(csv), backbone="test_resnet", strategy=strategy, pretrained=False, image_size=32,
                     steps=steps, out=tmp_path, name="ml", data_kwargs={"num_workers": 0}, task_kwargs=task_kwargs)


def test_a_multi_label_run_tunes_thresholds_keeps_them_in_its_checkpoint_and_predicts_with_them(
        tags_csv: Path, tmp_path: Path) -> None:
    result = _fit(tags_csv, tmp_path, strategy="scratch", steps=24)
    task = result.task
    assert task.multilabel and task.monitor == "val_map" and task.class_names == ["bars", "discs", "squares"]
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert {"val_map", "val_map_micro", "val_auroc", "val_f1"} <= set(result.metrics)
    assert all(f"val_threshold/{t}" in result.metrics and f"val_ap/{t}" in result.metrics for t in task.class_names)
    import csv as csvlib

    rows = list(csvlib.DictReader((result.run_dir / "tag_metrics.csv").open()))
    assert [r["tag"] for r in rows] == task.class_names and (result.run_dir / "pr_curves.png").is_file()
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    for row, tag in zip(rows, task.class_names):  # the table is the best checkpoint's, as metrics.json says
        assert float(row["threshold"]) == pytest.approx(summary["best"][f"val_threshold/{tag}"], abs=1e-4)
        assert int(row["support"]) == next(r["support"] for r in summary["tags"] if r["tag"] == tag) > 0
    restored = ClassificationTask.from_checkpoint(result.run_dir / "checkpoints" / "best.ckpt")
    assert restored.multilabel and restored.class_names == task.class_names
    best = [result.metrics[f"val_threshold/{t}"] for t in task.class_names]
    assert restored.thresholds.tolist() == pytest.approx(best)  # the thresholds of the kept weights
    assert any(abs(t - 0.5) > 1e-6 for t in best)  # tuned, not the default
    dm = CsvDataModule(str(tags_csv), num_workers=0, image_size=32)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    out = restored.predict_step({"image": batch["image"], "index": batch["index"]}, 0)
    assert out["label"].dtype == torch.bool and out["label"].shape == (len(batch["image"]), 3)
    assert torch.equal(out["label"], out["probs"] >= restored.thresholds[None, :])


def test_balanced_weights_are_negatives_over_positives_per_tag(tags_csv: Path) -> None:
    from visiontl.tasks.link import link

    dm = CsvDataModule(str(tags_csv), num_workers=0, image_size=32)
    task = ClassificationTask("test_resnet", class_names=dm.class_names, pretrained=False, task="multilabel",
                              class_weights="balanced", strategy="full")
    link(dm, task)
    pos = torch.tensor(dm.class_counts, dtype=torch.float32)
    assert task.class_weight.tolist() == pytest.approx(((dm.train_size - pos) / pos).tolist())


def test_the_data_and_the_model_must_agree_and_one_class_heads_refuse(tags_csv: Path) -> None:
    from visiontl.tasks.link import link

    dm = CsvDataModule(str(tags_csv), num_workers=0, image_size=32)
    single = ClassificationTask("test_resnet", class_names=dm.class_names, pretrained=False, strategy="full")
    with pytest.raises(UserError, match="several tags per image .multi-label. but the model was built for one class"):
        link(dm, single)
    for name in ("knn", "prototype"):
        with pytest.raises(StrategyError, match=f"Strategy '{name}' scores one class per image"):
            ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy=name, task="multilabel")
    with pytest.raises(ValueError, match="mixup / cutmix mix one class per image"):
        ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy="full", task="multilabel", mixup=0.2)
    with pytest.raises(ValueError, match="thresholds are for multi-label tasks: one per tag"):
        ClassificationTask("test_resnet", num_classes=3, pretrained=False, task="multilabel", thresholds=[0.5, 1.2, 0.1])


def test_logreg_fits_one_versus_rest_and_chooses_its_penalty_by_map() -> None:
    torch.manual_seed(0)
    x = torch.randn(80, 6)
    y = torch.stack([(x[:, 0] > 0), (x[:, 1] + x[:, 2] > 0.5), (x[:, 3] < -0.8)], 1).float()
    y[0, 1] = -1.0  # an uncertain pair: left out
    head = torch.nn.Linear(6, 3)
    strategy = get_strategy("logreg")
    strategy.fit(head, x, y, 3)
    assert strategy.fit_report["train_map"] > 0.95 and "cv_map" in strategy.fit_report
    with torch.no_grad():
        decided = head(x).sigmoid() >= 0.5
    assert float((decided == (y > 0.5))[y >= 0].float().mean()) > 0.9


def test_export_verifies_tag_decisions_and_predict_onnx_writes_tags_and_one_column_per_tag(
        tags_csv: Path, tmp_path: Path) -> None:
    import csv as csvlib

    import onnx

    from visiontl.deploy.export import export_onnx
    from visiontl.deploy.predict import Predictor, main

    result = _fit(tags_csv, tmp_path, strategy="scratch", steps=24)
    report = export_onnx(result.run_dir, tmp_path / "tags.onnx")
    assert report["top1_mismatches"] == 0 and report["max_prob_diff"] <= 1e-4
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "tags.onnx")).metadata_props}
    thresholds = json.loads(meta["thresholds"])
    assert meta["task"] == "multilabel" and thresholds == pytest.approx(result.task.thresholds.tolist(), abs=1e-6)
    import cv2  # albumentations' OpenCV: its DNN module reads the file and gives the same per-tag sigmoids
    import onnxruntime as ort

    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    session = ort.InferenceSession(str(tmp_path / "tags.onnx"), providers=["CPUExecutionProvider"])
    want = session.run(["probabilities"], {session.get_inputs()[0].name: x})[0]
    net = cv2.dnn.readNetFromONNX(str(tmp_path / "tags.onnx"))
    net.setInput(x)
    got = net.forward("probabilities")
    assert got.shape == (2, 3) and np.abs(got - want).max() < 1e-4 and ((want > 0) & (want < 1)).all()
    images = sorted((tags_csv.parent / "images").glob("*.png"))[:6]
    predictions = Predictor(tmp_path / "tags.onnx").predict(images)
    task = result.task.eval()
    from visiontl.deploy.predict import preprocess

    pre = task.preprocessing
    x = torch.from_numpy(np.stack([preprocess(p, (pre.size, pre.size), 3, pre.crop_pct) for p in images]))
    x = (x - torch.tensor(pre.mean).view(1, -1, 1, 1)) / torch.tensor(pre.std).view(1, -1, 1, 1)  # in the graph
    with torch.no_grad():
        probs = task(x).sigmoid()
    for p, row in zip(predictions, probs):
        want = [t for t, v, c in zip(task.class_names, row.tolist(), thresholds) if v >= c]
        assert p.tags == want and p.label == "|".join(want) and p.probability is None
        assert [p.probabilities[t] for t in task.class_names] == pytest.approx(row.tolist(), abs=1e-4)
    assert main([str(tmp_path / "tags.onnx"), *map(str, images), "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csvlib.DictReader((tmp_path / "p.csv").open()))
    assert list(rows[0]) == ["path", "tags", "p_bars", "p_discs", "p_squares", "error"]
    assert [r["tags"] for r in rows] == [p.label for p in predictions]


def test_the_command_line_takes_the_task_from_the_data(tags_csv: Path, tmp_path: Path) -> None:
    """``visiontl fit`` with a multi-label CSV: the datamodule's task reaches the model (a link, as the
    classes do), the balanced weights and the fitted LP-FT head are per tag, ``val_map`` picks the
    checkpoint and the thresholds are in metrics.json's best record."""
    from helpers.hostile import run_cli

    result = run_cli("fit", "--config", "recipe:folder", "--data", "visiontl.data.CsvDataModule",
                     "--data.init_args.train_csv", tags_csv, "--data.init_args.root", tags_csv.parent,
                     "--model.init_args.backbone", "test_resnet", "--model.init_args.pretrained", "false",
                     "--data.init_args.image_size", "32", "--data.init_args.num_workers", "0",
                     "--trainer.max_steps", "6", "--trainer.enable_progress_bar", "false",
                     "--trainer.logger.init_args.save_dir", tmp_path, "--trainer.logger.init_args.name", "cli")
    assert result.rc == 0, result.err
    run = tmp_path / "cli" / "version_0"
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["monitor"] == "val_map" and {"val_map", "val_f1", "val_threshold/squares"} <= set(summary["best"])
    assert "train_map" in summary["strategy"]["head_fit"] and "val_map" in summary["strategy"]["head_fit"]
    restored = ClassificationTask.from_checkpoint(run / "checkpoints" / "best.ckpt")
    assert restored.multilabel and restored.hparams["class_weights"] == "balanced"


def test_parameter_efficient_runs_train_tags_and_their_delta_carries_the_thresholds(tags_csv: Path,
                                                                                  tmp_path: Path) -> None:
    """LoRA on multi-label data: it trains, exports, and its PEFT checkpoint (the trained tensors alone)
    loads back with the best checkpoint's thresholds, not 0.5."""
    from visiontl.tasks.trained import load_delta

    import timm
    from safetensors.torch import save_file

    from visiontl import fine_tune

    base = tmp_path / "base.safetensors"  # a delta loads on the base weights it was trained on: a file of them
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(base))
    result = fine_tune(str(tags_csv), backbone="test_resnet", strategy="lora", pretrained=False, weights=str(base),
                       image_size=32, steps=12, out=tmp_path, name="lora", data_kwargs={"num_workers": 0})
    best = ClassificationTask.from_checkpoint(result.run_dir / "checkpoints" / "best.ckpt")
    delta = load_delta(result.run_dir / "checkpoints" / "best.peft.safetensors")
    assert delta.multilabel and delta.thresholds.tolist() == pytest.approx(best.thresholds.tolist())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(delta(x).sigmoid(), best(x).sigmoid(), atol=1e-5)


def test_wise_ft_mixes_a_multi_label_run_scores_it_by_map_and_keeps_thresholds_tuned_for_the_mixture(
        tags_csv: Path, base_weights: Path, tmp_path: Path) -> None:
    from visiontl.models.features import split_features
    from visiontl.strategies.linear_probe import fit_probe, probe_score
    from visiontl.train.wiseft import _run_data, wise_ft

    from visiontl import fine_tune

    run = fine_tune(str(tags_csv), backbone="test_resnet", strategy="gradual", pretrained=False,
                    weights=str(base_weights), image_size=32, steps=10, out=tmp_path, data_kwargs={"num_workers": 0},
                    trainer_kwargs={"enable_progress_bar": False})
    report = wise_ft(run.run_dir, tmp_path / "mix", alphas=[0, 0.5, 1], alpha=1.0, log=lambda line: None)
    rows = {r["alpha"]: r for r in report["alphas"]}
    assert report["score"] == "val_map" and set(rows) == {0.0, 0.5, 1.0}
    assert all({"val_map", "val_map_micro", "val_f1"} <= set(r) and "val_acc" not in r for r in rows.values())
    # alpha 1 is the run's best checkpoint, scored as the run scored it; its thresholds are the run's
    assert rows[1.0]["val_map"] == pytest.approx(run.metrics["val_map"], abs=1e-6)
    assert rows[1.0]["val_f1"] == pytest.approx(run.metrics["val_f1"], abs=1e-6)
    mixed = ClassificationTask.from_checkpoint(tmp_path / "mix" / "wise-ft.ckpt")
    assert mixed.multilabel and mixed.thresholds.tolist() == pytest.approx(run.task.thresholds.tolist(), abs=1e-6)
    assert list(report["thresholds"].values()) == pytest.approx(mixed.thresholds.tolist())
    # alpha 0 is the pretrained backbone with the one-vs-rest probe fitted on the run's training images
    start = ClassificationTask.start_of(run.run_dir / "checkpoints" / "best.ckpt").model.eval()
    dm = _run_data(run.run_dir / "checkpoints" / "best.ckpt", run.task)
    head = fit_probe(*split_features(start, "test_resnet", dm, "train"), 3)
    assert probe_score(head, *split_features(start, "test_resnet", dm, "val")) == (
        "val_map", pytest.approx(rows[0.0]["val_map"], abs=1e-5))
    assert (tmp_path / "mix" / "wise_ft.png").stat().st_size > 0


def test_multi_label_distillation_is_each_tag_s_bernoulli_kl_scaled_by_t_squared() -> None:
    from visiontl.tasks.distill import distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(4, 3), torch.randn(4, 3) * 2
    labels = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [1.0, 1.0, 0.0]])
    t = 3.0
    p, r = torch.sigmoid(teacher / t), torch.sigmoid(student / t)
    kl = (p * (p / r).log() + (1 - p) * ((1 - p) / (1 - r)).log()).mean() * t * t
    parts = distillation_loss(student, teacher, labels, temperature=t, alpha=0.3, multilabel=True)
    assert float(parts["kd"]) == pytest.approx(float(kl), rel=1e-5)
    assert float(parts["ce"]) == pytest.approx(float(multilabel_loss(student, labels)), rel=1e-6)
    assert float(parts["loss"]) == pytest.approx(0.3 * float(kl) + 0.7 * float(parts["ce"]), rel=1e-6)
    same = distillation_loss(teacher, teacher, None, temperature=t, alpha=1.0, multilabel=True)
    assert abs(float(same["kd"])) < 1e-6 and float(same["ce"]) == 0.0  # agreeing models: no KL; no labels: no BCE
    student.requires_grad_(True)
    distillation_loss(student, teacher, None, temperature=t, alpha=1.0, multilabel=True)["loss"].backward()
    assert torch.allclose(student.grad, (torch.sigmoid(student / t) - p) * t / student.numel(), atol=1e-6)


def test_a_multi_label_teacher_distils_into_a_multi_label_student(tags_csv: Path, shapes_root: Path,
                                                                   tmp_path: Path) -> None:
    from visiontl.data.images import DataError
    from visiontl.train.distill import distill

    teacher = _fit(tags_csv, tmp_path / "teacher", strategy="scratch", steps=24)
    run = distill(teacher.run_dir, student="test_resnet", pretrained=False, strategy="scratch", image_size=32,
                  steps=12, alpha=0.7, out=tmp_path / "student", data_kwargs={"num_workers": 0},
                  trainer_kwargs={"enable_progress_bar": False})
    assert run.task.multilabel and run.task.class_names == teacher.task.class_names
    assert run.task.monitor == "val_map" and 0.0 <= run.metrics["val_teacher_agreement"] <= 1.0
    # the teacher scored on the same validation images (its own split, read back as multi-label) as in its run
    ours = json.loads((run.run_dir / "metrics.json").read_text())
    theirs = json.loads((teacher.run_dir / "metrics.json").read_text())
    assert run.metrics["val_teacher_map"] == pytest.approx(theirs["best"]["val_map"], abs=1e-4)
    assert ours["distillation"]["teacher_task"] == "multilabel"
    assert ours["distillation"]["teacher_val_map_own_run"] == pytest.approx(theirs["best"]["val_map"], abs=1e-6)
    assert (run.run_dir / "tag_metrics.csv").is_file()
    with pytest.raises(DataError, match="multilabel run and the student's data is read as multiclass"):
        distill(teacher.run_dir, student="test_resnet", pretrained=False, strategy="scratch", data=shapes_root,
                image_size=32, steps=1, out=tmp_path / "bad", data_kwargs={"num_workers": 0})


def test_the_scratch_comparison_and_retention_measure_a_multi_label_run(tags_csv: Path, shapes_splits: Path,
                                                                          base_weights: Path, tmp_path: Path) -> None:
    from visiontl import fine_tune

    run = fine_tune(str(tags_csv), backbone="test_resnet", strategy="gradual", pretrained=False,
                    weights=str(base_weights), image_size=32, steps=6, out=tmp_path, compare_scratch=1,
                    retain=shapes_splits, data_kwargs={"num_workers": 0}, trainer_kwargs={"enable_progress_bar": False})
    record = json.loads((run.run_dir / "metrics.json").read_text())
    scratch = record["scratch"]
    assert "val_acc" not in scratch and len(scratch["val_map"]) == 1
    assert run.metrics["transfer_gap"] == pytest.approx(run.metrics["val_map"] - scratch["val_map_mean"], abs=1e-6)
    assert run.metrics["scratch_val_map"] == pytest.approx(scratch["val_map"][0])
    assert 0.0 <= record["retain_acc_after"] <= 1.0 and 0.0 <= record["retain_acc_before"] <= 1.0  # another task kept


def test_held_out_tags_scores_the_kept_model_at_its_thresholds_and_at_a_half(tags_csv: Path, shapes_root: Path,
                                                                             tmp_path: Path) -> None:
    from visiontl.analyse.tags import held_out_tags

    result = _fit(tags_csv, tmp_path, strategy="scratch", steps=24)
    listing = result.run_dir / "splits.csv"
    scores = held_out_tags(result.task, listing, "val")
    assert scores["map"] == pytest.approx(result.metrics["val_map"], abs=1e-5)  # what the run measured, same images
    summary = {row["tag"]: row for row in json.loads((result.run_dir / "metrics.json").read_text())["tags"]}
    for tag, row in scores["tags"].items():
        assert row["threshold"] == pytest.approx(summary[tag]["threshold"], abs=1e-4)
        assert row["f1_tuned"] == pytest.approx(summary[tag]["f1"], abs=1e-4)
        # tuned on these very images to maximise F1: never below 0.5's F1 here (held-out images are the test)
        assert row["f1_tuned"] >= row["f1_at_half"] - 1e-9 and row["support"] == summary[tag]["support"]
    with pytest.raises(ValueError, match="no 'test' images"):
        held_out_tags(result.task, listing, "test")
    with pytest.raises(ValueError, match="single-label"):
        held_out_tags(_single_run(shapes_root, tmp_path).task, listing)


def _single_run(shapes_root: Path, tmp_path: Path):
    from visiontl import fine_tune

    return fine_tune(shapes_root, backbone="test_resnet", strategy="scratch", pretrained=False, image_size=32, steps=1,
                     out=tmp_path / "single", data_kwargs={"num_workers": 0}, trainer_kwargs={"enable_progress_bar": False})
