"""Domain adaptation of multi-label data (several tags per image): DANN, CORAL and source-only from a
CSV source, with the validators that do not read a softmax; MCC and CDAN+E refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from helpers.shapes import make_multilabel_csv
from visiontl.data import CsvAdaptationDataModule, DataError
from visiontl.tasks import AdaptationTask, ClassificationTask
from visiontl.tasks.validators import scores_from_outputs, tag_losses
from visiontl.train.run import attach_run_callbacks

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
TAGS = ["bars", "discs", "squares"]


def _invert(folder: Path) -> None:
    """Another "scanner": inverted contrast."""
    for png in folder.rglob("*.png"):
        Image.fromarray(255 - np.asarray(Image.open(png).convert("RGB"))).save(png)


@pytest.fixture(scope="module")
def tagged_domains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tagged")
    source = make_multilabel_csv(base / "source", n=24, seed=0)
    target = make_multilabel_csv(base / "target", n=20, seed=5).parent / "images"
    target_val = make_multilabel_csv(base / "target_val", n=12, seed=9)
    _invert(target)
    _invert(target_val.parent)
    return {"source": source, "target": target, "target_val": target_val}


def _dm(domains: dict[str, Path], **kwargs) -> CsvAdaptationDataModule:
    return CsvAdaptationDataModule(str(domains["source"]), str(domains["target"]), image_size=32, num_workers=0,
                                   batch_size=4, **{"target_val_csv": str(domains["target_val"]), **kwargs})


def test_a_csv_source_pairs_tagged_images_with_an_unlabelled_target(tagged_domains: dict[str, Path]) -> None:
    dm = _dm(tagged_domains)
    dm.setup()
    assert dm.task == "multilabel" and dm.class_names == TAGS
    assert len(dm.datasets["target"]) == 20 and len(dm.datasets["target_val"]) == 12
    target = dm.datasets["target"][0]["label"]
    assert target.tolist() == [-1.0, -1.0, -1.0]  # unlabelled: every tag left out, not "no tag"
    labelled = torch.stack([torch.as_tensor(dm.datasets["target_val"][i]["label"]) for i in range(12)])
    assert set(labelled.unique().tolist()) <= {0.0, 1.0} and labelled.sum() > 0
    batch, *_ = next(iter(dm.train_dataloader()))
    assert batch["source"]["label"].shape == (4, 3) and batch["target"]["image"].shape == (4, 3, 32, 32)
    assert dm.target_split == "target_val" and len(dm.val_dataloader()) == 2


def test_a_target_validation_csv_with_a_tag_the_source_lacks_is_named(tagged_domains: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    listing = tagged_domains["target_val"].read_text().splitlines()
    extra = tmp_path / "target_val.csv"
    extra.write_text("\n".join([listing[0], *listing[1:4], listing[4].split(",")[0] + ",stars|bars"]) + "\n")
    for row in listing[1:5]:  # the images, beside the CSV
        (tmp_path / "images").mkdir(exist_ok=True)
        name = row.split(",")[0]
        (tmp_path / name).write_bytes((tagged_domains["target_val"].parent / name).read_bytes())
    with pytest.raises(DataError, match=r"target validation set .*target_val\.csv has classes the source lacks: stars"):
        _ = _dm(tagged_domains, target_val_csv=str(extra)).splits


def test_multi_label_defaults_and_what_is_refused() -> None:
    task = AdaptationTask("test_resnet", num_classes=3, class_names=TAGS, pretrained=False, task="multilabel")
    assert (task.hparams["method"], task.hparams["monitor"], task.monitor) == ("dann", "val_map", "val_map")
    single = AdaptationTask("test_resnet", num_classes=3, pretrained=False)
    assert (single.hparams["method"], single.monitor) == ("mcc", "target_im")  # one class per image: unchanged
    assert (single.strategy.name, single.strategy.bn_stats) == ("full", "update")
    given = AdaptationTask("test_resnet", num_classes=3, pretrained=False, strategy={"name": "partial", "k": 1})
    assert given.strategy.name == "partial"
    for method in ("mcc", "cdan_e"):
        with pytest.raises(ValueError, match=r"cannot adapt multi-label data .* MCC and CDAN\+E .*use source_only, "
                                             r"dann, coral"):
            AdaptationTask("test_resnet", num_classes=3, pretrained=False, task="multilabel", method=method)
    with pytest.raises(ValueError, match=r"monitor 'target_im' cannot pick checkpoints of multi-label data.*val_map "
                                         r"or target_dev"):
        AdaptationTask("test_resnet", num_classes=3, pretrained=False, task="multilabel", monitor="target_im")
    with pytest.raises(ValueError, match="monitor must be one of"):
        AdaptationTask("test_resnet", num_classes=3, pretrained=False, monitor="val_map")


def test_tag_losses_and_multi_label_scores_by_value() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    targets = torch.tensor([[1.0, -1.0], [0.0, 1.0]])  # the first image's second tag unknown
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = torch.stack([bce(logits[0, 0], targets[0, 0]), (bce(logits[1], targets[1], reduction="sum")) / 2])
    assert torch.allclose(tag_losses(logits, targets), expected)
    feats = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    source = (feats, torch.tensor([[3.0, -3.0]] * 3 + [[-3.0, 3.0]] * 3), torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3))
    unlabelled = (feats + 0.1, source[1], torch.full((6, 2), -1.0))
    scores = scores_from_outputs(unlabelled, source, multilabel=True)
    assert scores["source_val_map"] == 1.0 and "target_map" not in scores and "target_im" not in scores
    assert scores["target_dev"] < 0  # minus a (weighted) risk
    labelled = (feats, source[1].flip(0), source[2])  # every tag ranked the wrong way round
    assert scores_from_outputs(labelled, source, multilabel=True)["target_map"] == 0.5


@pytest.mark.parametrize("method", ["dann", "coral", "source_only"])
def test_multi_label_adaptation_trains_and_logs_what_applies(method: str, tagged_domains: dict[str, Path],
                                                             tmp_path: Path) -> None:
    dm = _dm(tagged_domains)
    task = AdaptationTask("test_resnet", num_classes=3, class_names=TAGS, pretrained=False, task="multilabel",
                          method=method, strategy={"name": "full", "lr": 0.01, "bn_stats": "update"}, target_bn=False,
                          negative_transfer_check=False)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    trainer = pl.Trainer(max_steps=6, logger=pl.loggers.CSVLogger(str(tmp_path)), **QUIET)
    attach_run_callbacks(trainer).fit(task, dm)
    assert any(not torch.equal(p, before[n]) for n, p in task.model.named_parameters())
    names = [g.get("name") for g in trainer.optimizers[0].param_groups]
    assert ("discriminator" in names) == (method == "dann")
    logged = set(trainer.callback_metrics)
    assert {"val_map", "target_map", "target_dev"} <= logged
    assert not logged & {"target_im", "target_snd", "target_entropy", "target_acc"}
    assert ("target_pad" in logged) == (method == "dann")
    assert 0.0 <= float(trainer.callback_metrics["target_map"]) <= 1.0
    restored = ClassificationTask.from_checkpoint(Path(trainer.log_dir) / "checkpoints" / "last.ckpt")
    assert restored.multilabel and restored.thresholds.shape == (3,)


@pytest.mark.filterwarnings("ignore:Possible negative transfer")  # either way: the record is what is checked
def test_a_multi_label_adaptation_run_records_target_bn_and_the_negative_transfer_check(
        tagged_domains: dict[str, Path], tmp_path: Path) -> None:
    """Through fit_task with the defaults: DANN, checkpoints by val_map, target BatchNorm re-estimated
    and scored (target_dev, target_map), the frozen one-vs-rest probe compared by target_dev."""
    from visiontl.train.finetune import fit_task

    dm = _dm(tagged_domains)
    task = AdaptationTask("test_resnet", num_classes=3, class_names=TAGS, pretrained=False, task="multilabel",
                          strategy={"name": "full", "lr": 0.01, "bn_stats": "update"})
    result = fit_task(task, dm, steps=6, out=tmp_path / "runs", name="tagged",
                      trainer_kwargs={"enable_progress_bar": False, "accelerator": "cpu"})
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    bn = metrics["target_bn"]
    assert bn["layers"] > 0 and {"target_dev", "target_map", "source_val_map"} <= set(bn["after"])
    check = metrics["negative_transfer"]
    assert check["validator"] == "target_dev" and "target_dev" in check["frozen_probe"]
    assert check["warned"] == (check["model"]["target_dev"] < check["frozen_probe"]["target_dev"])
    assert (result.run_dir / "checkpoints" / "best_source_bn.ckpt").is_file()


@pytest.mark.filterwarnings("ignore:Possible negative transfer")
def test_the_command_line_runs_the_same_defaults(tagged_domains: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`visiontl fit` passes every default as given (None here, probe for ClassificationTask's
    strategy): the task resolves them as Python does, so DANN trains the whole network."""
    from visiontl.cli.commands import main
    from visiontl.tasks.checkpoints import read_checkpoint

    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--model", "visiontl.tasks.AdaptationTask", "--model.init_args.backbone", "test_resnet",
                 "--model.init_args.pretrained", "false", "--data", "visiontl.data.CsvAdaptationDataModule",
                 "--data.init_args.train_csv", str(tagged_domains["source"]),
                 "--data.init_args.target_root", str(tagged_domains["target"]), "--data.init_args.image_size", "32",
                 "--data.init_args.num_workers", "0", "--trainer.max_steps", "4",
                 "--trainer.enable_progress_bar", "false"]) == 0
    ckpt = read_checkpoint(next(tmp_path.rglob("last.ckpt")))
    hp = ckpt["hyper_parameters"]
    assert (hp["task"], hp["method"], hp["monitor"]) == ("multilabel", "dann", "val_map")
    assert hp["strategy"]["class_path"].endswith("Full") and hp["strategy"]["init_args"]["bn_stats"] == "update"
    assert any(k.startswith("discriminator.") for k in ckpt["state_dict"])


def test_a_refused_method_is_one_line_from_the_command_line(tagged_domains: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from visiontl.cli.commands import main

    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--model", "visiontl.tasks.AdaptationTask", "--model.init_args.backbone", "test_resnet",
                 "--model.init_args.pretrained", "false", "--model.init_args.method", "mcc",
                 "--data", "visiontl.data.CsvAdaptationDataModule",
                 "--data.init_args.train_csv", str(tagged_domains["source"]),
                 "--data.init_args.target_root", str(tagged_domains["target"]), "--data.init_args.image_size", "32",
                 "--data.init_args.num_workers", "0", "--trainer.max_steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: method 'mcc' cannot adapt multi-label data") and "use source_only" in err[-1]
    assert "Traceback" not in "\n".join(err) and not list(tmp_path.rglob("*.ckpt"))
