"""Domain adaptation (DANN, CORAL, source-only) and continued self-supervised pretraining."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import tifffile
import torch

from helpers.shapes import make_folder
from helpers.fixtures import load_fixture
from visiontl.data import AdaptationDataModule, DataError, UnlabelledDataModule
from visiontl.tasks import AdaptationTask, ClassificationTask, ContinuedPretraining
from visiontl.tasks.adaptation import (
    DomainDiscriminator,
    coral_loss,
    dann_coefficient,
    gradient_reversal,
    target_signals,
)
from visiontl.train.run import attach_run_callbacks

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}


def test_gradient_reversal_flips_and_scales_the_gradient_by_value() -> None:
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = gradient_reversal(x, 0.25)
    assert torch.equal(y, x)  # identity forward
    (y * torch.tensor([1.0, 2.0, 4.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-0.25, -0.5, -1.0]))


def test_dann_coefficient_follows_ganins_schedule() -> None:
    assert dann_coefficient(0.0) == 0.0
    assert dann_coefficient(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert dann_coefficient(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1) and dann_coefficient(2.0) < 1
    values = [dann_coefficient(p / 10) for p in range(11)]
    assert values == sorted(values)


def test_coral_loss_by_value() -> None:
    rng = torch.Generator().manual_seed(0)
    source = torch.randn(256, 4, generator=rng)
    assert coral_loss(source, source.clone()).item() == pytest.approx(0.0, abs=1e-7)
    target = source * torch.tensor([1.0, 1.0, 1.0, 3.0])  # variance x9 on one feature
    cs = torch.cov(source.T)
    ct = torch.cov(target.T)
    assert coral_loss(source, target).item() == pytest.approx(((cs - ct) ** 2).sum().item() / (4 * 16), rel=1e-5)


def test_discriminator_learns_to_separate_two_obvious_domains() -> None:
    torch.manual_seed(0)
    source, target = torch.randn(128, 32), torch.randn(128, 32) + 1.5
    disc = DomainDiscriminator(32, hidden=64)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    x, truth = torch.cat([source, target]), torch.cat([torch.ones(128), torch.zeros(128)])
    for _ in range(60):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(disc(x).squeeze(1), truth)
        opt.zero_grad()
        loss.backward()
        opt.step()
    disc.eval()
    accuracy = ((disc(x).squeeze(1) > 0).float() == truth).float().mean().item()
    assert accuracy > 0.95
    signals = target_signals({"source_domain": [disc(source).squeeze(1)], "target_domain": [disc(target).squeeze(1)]})
    assert signals["target_pad"] > 1.8  # proxy A-distance near 2: fully separable


def test_label_free_signals_by_value() -> None:
    uniform = target_signals({"probs": [torch.full((10, 4), 0.25)]})
    assert uniform["target_entropy"] == pytest.approx(math.log(4)) and uniform["target_im"] == pytest.approx(0.0)
    confident = target_signals({"probs": [torch.eye(4).repeat(3, 1)]})  # sure and diverse: the best case
    assert confident["target_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert confident["target_im"] == pytest.approx(math.log(4), rel=1e-4)
    collapsed = target_signals({"probs": [torch.tensor([[1.0, 0, 0, 0]]).repeat(12, 1)]})
    assert collapsed["target_im"] == pytest.approx(0.0, abs=1e-6)  # sure but one class: no credit


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("domains")
    source = make_folder(base / "source", per_class=6)
    target = make_folder(base / "target", per_class=10, seed=5)
    for png in target.rglob("*.png"):  # another "scanner": inverted contrast
        from PIL import Image

        img = np.asarray(Image.open(png).convert("RGB"))
        Image.fromarray(255 - img).save(png)
    target_val = make_folder(base / "target_val", per_class=3, seed=9)
    return {"source": source, "target": target, "target_val": target_val}


def test_pairing_covers_both_sides_whatever_their_sizes(domains: dict[str, Path]) -> None:
    dm = AdaptationDataModule(str(domains["source"]), str(domains["target"]), image_size=32, num_workers=0,
                              batch_size=4, val_fraction=0.25)
    dm.setup()
    seen: dict[str, set[int]] = {"source": set(), "target": set()}
    loader = dm.train_dataloader()
    iter(loader)
    for batch, *_ in loader:
        for side in seen:
            seen[side].update(batch[side]["index"].tolist())
            assert batch[side]["image"].shape[1:] == (3, 32, 32)
    assert seen["source"] == set(range(len(dm.datasets["train"])))  # 12 source images, cycled
    assert seen["target"] == set(range(len(dm.datasets["target"])))  # 30 target images, once
    assert (dm.datasets["target"].items[0][1]) == -1  # unlabelled
    assert dm.target_split == "target_eval" and len(dm.val_dataloader()) == 2


def test_adaptation_errors_name_the_problem(domains: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=r"target folder .*empty has no images"):
        _ = AdaptationDataModule(str(domains["source"]), str(tmp_path / "empty")).splits
    with pytest.raises(DataError, match="does not exist"):
        _ = AdaptationDataModule(str(domains["source"]), str(tmp_path / "nowhere")).splits
    extra = tmp_path / "target_val"
    shutil.copytree(domains["target_val"], extra)
    (extra / "stars").mkdir()
    shutil.copy(next((extra / "bars").glob("*.png")), extra / "stars" / "s.png")
    with pytest.raises(DataError, match="target validation set .* has classes the source lacks: stars"):
        _ = AdaptationDataModule(str(domains["source"]), str(domains["target"]), target_val_root=str(extra)).splits
    bands = tmp_path / "bands"
    bands.mkdir()
    tifffile.imwrite(bands / "t.tif", np.zeros((13, 32, 32), np.uint16), photometric="minisblack",
                     planarconfig="separate")
    dm = AdaptationDataModule(str(domains["source"]), str(bands), in_chans=3, num_workers=0)
    with pytest.raises(DataError, match=r"(?s)t\.tif: has 13 channels, the model expects 3"):
        dm.setup()


def _fit(task: pl.LightningModule, dm: pl.LightningDataModule, tmp_path: Path, steps: int) -> pl.Trainer:
    trainer = attach_run_callbacks(pl.Trainer(max_steps=steps, logger=pl.loggers.CSVLogger(str(tmp_path)), **QUIET))
    trainer.fit(task, dm)
    return trainer


@pytest.mark.parametrize(("method", "backbone"), [("dann", "test_resnet"), ("coral", "test_resnet"),
                                                  ("source_only", "test_resnet"), ("dann", "test_vit"),
                                                  ("mcc", "test_resnet"), ("cdan_e", "test_resnet")])
def test_adaptation_trains_with_a_ladder_strategy_and_logs_target_signals(
    method: str, backbone: str, domains: dict[str, Path], tmp_path: Path
) -> None:
    dm = AdaptationDataModule(str(domains["source"]), str(domains["target"]),
                              target_val_root=str(domains["target_val"]), image_size=32, num_workers=0, batch_size=4)
    task = AdaptationTask(backbone, num_classes=3, class_names=["bars", "discs", "squares"], pretrained=False,
                          method=method, strategy={"name": "partial", "k": 1, "lr": 0.01}, target_bn=False)
    plan = {g.name: g.lr for g in task.strategy.plan(task.groups)}
    frozen = {n: p.detach().clone() for g in task.groups if plan[g.name] == 0 for n, p in zip(g.param_names, g.params)}
    assert frozen and len(frozen) < len(list(task.model.parameters()))
    trainer = _fit(task, dm, tmp_path, steps=8)
    names = [g.get("name") for g in trainer.optimizers[0].param_groups]
    assert ("discriminator" in names) == (method in ("dann", "cdan_e"))
    for g in task.groups:
        for n, p in zip(g.param_names, g.params):
            if n in frozen and p.shape == frozen[n].shape:  # (a ViT's position embedding is resampled to 32 px)
                assert torch.equal(p, frozen[n]), n  # the strategy's frozen groups stay put
    logged = set(trainer.callback_metrics)
    assert {"val_acc", "target_acc", "target_entropy", "target_im", "target_snd", "target_dev"} <= logged
    assert ("target_pad" in logged) == (method == "dann")
    # the run exports like any classification run: the classifier network only
    restored = ClassificationTask.from_checkpoint(Path(trainer.log_dir) / "checkpoints" / "last.ckpt")
    x = torch.rand(2, 3, 32, 32)
    task.eval()
    restored.eval()
    assert torch.allclose(restored(x), task(x), atol=1e-5)


@pytest.mark.parametrize("domain_bn", [True, False])
def test_domain_bn_normalises_each_domain_by_its_own_batch_statistics(domain_bn: bool) -> None:
    """With ``domain_bn`` the source features of a training step are exactly those of the source
    batch alone (its own BatchNorm statistics); without, the target batch shifts them."""
    torch.manual_seed(0)
    task = AdaptationTask("test_resnet", num_classes=3, pretrained=False, method="coral", domain_bn=domain_bn,
                          channels_last=False)
    task.train()
    source = {"image": torch.rand(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0])}
    target = {"image": 1.0 - torch.rand(6, 3, 32, 32) * 0.3, "label": torch.full((6,), -1)}  # another look
    seen: list[torch.Tensor] = []
    original = task._features
    task._features = lambda x: seen.append(out := original(x)) or out  # type: ignore[method-assign]
    task.log = lambda *a, **k: None  # type: ignore[method-assign]  # no trainer here
    task.training_step({"source": source, "target": target}, 0)
    with torch.no_grad():
        alone = original(source["image"])
    assert [len(x) for x in seen] == ([4, 6] if domain_bn else [10])
    assert torch.allclose(seen[0][:4].detach(), alone, atol=1e-5) == domain_bn


def test_domain_bn_defaults_keep_batchnorm_training_and_a_frozen_strategy_is_named() -> None:
    """``full`` freezes BatchNorm statistics for plain fine-tuning; adaptation (``domain_bn``) and
    continued pretraining default to ``bn_stats="update"``; a frozen strategy with ``domain_bn``
    would make it a silent no-op, so it is named."""
    from visiontl.tasks import ContinuedPretraining

    assert AdaptationTask("test_resnet", num_classes=3, pretrained=False).strategy.bn_stats == "update"
    assert ContinuedPretraining("test_resnet", pretrained=False).strategy.bn_stats == "update"
    with pytest.warns(UserWarning, match="domain_bn has no effect: strategy 'full' keeps the BatchNorm"):
        AdaptationTask("test_resnet", num_classes=3, pretrained=False, strategy="full")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaptationTask("test_resnet", num_classes=3, pretrained=False, strategy="full", domain_bn=False)
        AdaptationTask("test_vit", num_classes=3, pretrained=False, strategy="full")  # no BatchNorm: nothing to say


def test_adaptation_refuses_fitted_heads_and_unknown_methods() -> None:
    with pytest.raises(ValueError, match="trains by gradient"):
        AdaptationTask("test_resnet", num_classes=3, pretrained=False, strategy="prototype")
    with pytest.raises(ValueError, match="Unknown adaptation method 'mmdd'"):
        AdaptationTask("test_resnet", num_classes=3, pretrained=False, method="mmdd")
    with pytest.raises(ValueError, match="target_dev .target labels never pick checkpoints"):
        AdaptationTask("test_resnet", num_classes=3, pretrained=False, monitor="target_acc")


@pytest.mark.parametrize(("method", "lr"), [("simclr", 3e-3), ("byol", 3e-4)])
def test_continued_pretraining_lowers_its_loss_and_saves_a_loadable_backbone(
    method: str, lr: float, domains: dict[str, Path], tmp_path: Path
) -> None:
    pl.seed_everything(0, verbose=False)  # the views are drawn by numpy / random too, not only torch
    dm = UnlabelledDataModule(str(domains["target"]), image_size=32, num_workers=0, batch_size=10)
    task = ContinuedPretraining("test_resnet", method=method, pretrained=False,
                                strategy={"name": "full", "lr": lr, "decay": 1.0})
    trainer = _fit(task, dm, tmp_path, steps=30)
    import pandas as pd

    losses = pd.read_csv(Path(trainer.log_dir) / "metrics.csv")["train_loss_epoch"].dropna().tolist()
    assert len(losses) == 10 and np.mean(losses[-3:]) < np.mean(losses[:3])  # 10 epochs of 3 steps
    saved = Path(trainer.log_dir) / "backbone.safetensors"
    fine = ClassificationTask("test_resnet", num_classes=3, pretrained=False, weights=str(saved))
    adapted = task.model.state_dict()
    for name, value in fine.model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(value, adapted[name]), name  # every backbone tensor, by value
    assert fine.model.visiontl_weights["reinitialized"] == ["fc.weight", "fc.bias"]


def test_mae_continues_a_vit_from_its_weights_lowers_its_loss_and_saves_a_loadable_backbone(
    domains: dict[str, Path], tmp_path: Path
) -> None:
    from visiontl.models.backbones import create_backbone
    from visiontl.tasks.pretrain import save_backbone

    pl.seed_everything(0, verbose=False)  # the start weights too: unseeded, they depended on what earlier
    # tests drew from the global generator (the loss fell by 0.72x instead of < 0.7x after another order)
    start = save_backbone(create_backbone("test_vit", num_classes=0), tmp_path / "start.safetensors")
    task = ContinuedPretraining("test_vit", method="mae", pretrained=False, weights=str(start),
                                strategy={"name": "full", "lr": 1e-3, "decay": 1.0})
    from safetensors.torch import load_file

    for name, value in load_file(str(start)).items():  # lightly's wrapper re-initialises unless told not to
        assert torch.equal(task.model.state_dict()[name], value), name
    dm = UnlabelledDataModule(str(domains["target"]), num_workers=0, batch_size=10)  # the ViT's own 160 px
    trainer = _fit(task, dm, tmp_path, steps=30)
    import pandas as pd

    losses = pd.read_csv(Path(trainer.log_dir) / "metrics.csv")["train_loss_epoch"].dropna().tolist()
    assert len(losses) == 10 and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    names = [g.get("name") for g in trainer.optimizers[0].param_groups]
    assert "ssl_heads" in names  # the decoder trains (at the heads' rate)
    fine = ClassificationTask("test_vit", num_classes=3, pretrained=False,
                              weights=str(Path(trainer.log_dir) / "backbone.safetensors"))
    adapted = task.model.state_dict()
    assert not torch.equal(adapted["blocks.0.attn.qkv.weight"], load_file(str(start))["blocks.0.attn.qkv.weight"])
    for name, value in fine.model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, adapted[name]), name


def test_mae_errors_name_the_problem(domains: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a timm Vision Transformer.*simclr"):
        ContinuedPretraining("test_resnet", method="mae", pretrained=False)
    with pytest.raises(ValueError, match="mask_ratio must be between 0 and 1"):
        ContinuedPretraining("test_vit", method="mae", pretrained=False, mask_ratio=1.0)
    # extreme ratios still hide at least one patch and show at least one; any decoder width works
    for ratio, width in ((0.001, 100), (0.999, 48)):
        edge = ContinuedPretraining("test_vit", method="mae", pretrained=False, mask_ratio=ratio, decoder_dim=width)
        assert torch.isfinite(edge.mae_loss(torch.rand(2, 3, 160, 160)))
    task = ContinuedPretraining("test_vit", method="mae", pretrained=False)
    dm = UnlabelledDataModule(str(domains["target"]), image_size=32, num_workers=0, batch_size=10)
    with pytest.raises(ValueError, match="takes 160 px images.*image_size to 160"):
        _fit(task, dm, tmp_path, steps=1)


def test_unlabelled_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        UnlabelledDataModule(str(tmp_path / "nowhere")).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        UnlabelledDataModule(str(tmp_path / "empty")).setup()
    gen = load_fixture("eurosat_ms")
    root = gen.make(tmp_path / "ms", per_class=2)
    dm = UnlabelledDataModule(str(root), in_chans=13, image_size=32, num_workers=0)
    dm.setup()
    assert len(dm.preprocessing.mean) == 13  # 16-bit, 13 bands: statistics of the images
    dm.train_dataloader()
    item = dm.dataset[0]
    assert item["view1"].shape == (13, 32, 32) and not torch.equal(item["view1"], item["view2"])


def test_dann_validation_runs_the_backbone_once_per_batch(domains: dict[str, Path], tmp_path: Path) -> None:
    dm = AdaptationDataModule(str(domains["source"]), str(domains["target"]),
                              target_val_root=str(domains["target_val"]), image_size=32, num_workers=0, batch_size=4)
    task = AdaptationTask("test_resnet", num_classes=3, class_names=["bars", "discs", "squares"], pretrained=False,
                          method="dann", strategy={"name": "partial", "k": 1, "lr": 0.01})
    calls = []
    original = task.model.forward_features
    task.model.forward_features = lambda x: (calls.append(1), original(x))[1]  # noqa: E731
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=0, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.validate(task, datamodule=dm, verbose=False)
    batches = sum(len(loader) for loader in trainer.val_dataloaders)
    assert len(calls) == batches  # source batches feed the classifier and the discriminator from one pass
    assert "target_pad" in trainer.callback_metrics


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_projection_heads_fit_models_with_a_pre_logits_layer(method: str) -> None:
    """MobileNetV3's pooled features are its head_hidden_size (1024), not num_features (288)."""
    task = ContinuedPretraining("mobilenetv3_small_050", method=method, pretrained=False)
    assert task.model.num_features != task.model.head_hidden_size
    x = torch.rand(4, 3, 32, 32)
    assert task(x).shape == (4, task.hparams["projection_dim"])


@pytest.mark.slow  # an end-to-end run: the default tier keeps the by-value tests
def test_target_bn_makes_the_kept_checkpoint_the_target_model_and_export_carries_it(
    domains: dict[str, Path], tmp_path: Path
) -> None:
    """AdaBN at fit end: best.ckpt's BatchNorm buffers are the target images' statistics (the same
    as re-estimating the trained checkpoint by hand), nothing else moved, the trained checkpoint stays
    beside it, metrics.json says so, and the exported ONNX model computes the target model."""
    import json

    from visiontl.deploy.export import export_onnx
    from visiontl.deploy.predict import ort_session
    from visiontl.core.speed import channels_last_input
    from visiontl.tasks.da import reestimate_batchnorm
    from visiontl.models.features import pooled_features

    dm = AdaptationDataModule(str(domains["source"]), str(domains["target"]),
                              target_val_root=str(domains["target_val"]), image_size=32, num_workers=0, batch_size=4)
    task = AdaptationTask("test_resnet", num_classes=3, class_names=["bars", "discs", "squares"], pretrained=False,
                          method="coral", target_bn=True, strategy={"name": "full", "lr": 0.01})
    from visiontl.train.finetune import fit_task

    result = fit_task(task, dm, steps=16, out=tmp_path / "runs", name="tbn",
                      trainer_kwargs={"enable_progress_bar": False, "accelerator": "cpu"})
    run = result.run_dir
    best, source = run / "checkpoints" / "best.ckpt", run / "checkpoints" / "best_source_bn.ckpt"
    adapted = torch.load(best, weights_only=True)["state_dict"]
    trained = torch.load(source, weights_only=True)["state_dict"]
    changed = {k for k in trained if not torch.equal(trained[k], adapted[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    # by hand: the trained model re-estimated on the target images (evaluation transform)
    by_hand = ClassificationTask.from_checkpoint(source).eval()
    report = json.loads((run / "metrics.json").read_text())["target_bn"]
    images, size = dm.feature_source("target"), report["batch_size"]  # the cumulative average follows the batches
    batches = [torch.stack([images[i]["image"] for i in range(s, min(s + size, len(images)))])
               for s in range(0, len(images), size)]
    reestimate_batchnorm(by_hand.model, (channels_last_input(b, by_hand.channels_last) for b in batches),
                         forward=lambda x: pooled_features(by_hand.model, x))
    for k, v in by_hand.model.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(adapted[f"model.{k}"], v, rtol=1e-4, atol=1e-5)
    assert report["layers"] > 0 and report["images"] == len(images)
    assert {"target_im", "target_acc"} <= set(report["before"]) and {"target_im", "target_acc"} <= set(report["after"])
    # export: the deployed graph is the target model (not the source-statistics one)
    export_onnx(ClassificationTask.from_checkpoint(best).eval(), tmp_path / "m.onnx")
    x = torch.rand(3, 3, 32, 32)  # the graph takes images in [0, 1] and normalises them itself
    got = ort_session(tmp_path / "m.onnx").run(["logits"], {"input": x.numpy()})[0]
    target_task, source_task = (ClassificationTask.from_checkpoint(p).eval() for p in (best, source))
    pre = target_task.preprocessing
    normalised = (x - torch.tensor(pre.mean)[:, None, None]) / torch.tensor(pre.std)[:, None, None]
    with torch.no_grad():
        target_logits, source_logits = target_task(normalised).numpy(), source_task(normalised).numpy()
    assert np.allclose(got, target_logits, atol=1e-4) and not np.allclose(got, source_logits, atol=1e-4)


def _adapted_run(domains: dict[str, Path], tmp_path: Path, name: str, **task_args):
    from visiontl.train.finetune import fit_task

    dm = AdaptationDataModule(str(domains["source"]), str(domains["target"]),
                              target_val_root=str(domains["target_val"]), image_size=32, num_workers=0, batch_size=4)
    task = AdaptationTask("test_resnet", num_classes=3, class_names=["bars", "discs", "squares"], pretrained=False,
                          **{"method": "coral", "strategy": {"name": "full", "lr": 0.01}, **task_args})
    result = fit_task(task, dm, steps=8, out=tmp_path / "runs", name=name,
                      trainer_kwargs={"enable_progress_bar": False, "accelerator": "cpu"})
    import json

    return task, json.loads((result.run_dir / "metrics.json").read_text())


def test_negative_transfer_warning_names_the_fallback(domains: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The check compares the run's validator with the frozen probe's: a probe that scores higher
    warns and names strategy logreg; one that scores lower does not; the report is in metrics.json."""
    from visiontl.analyse import negative_transfer as fallback

    monkeypatch.setattr(fallback, "frozen_probe_scores", lambda *a: {"target_snd": 1e9, "target_im": -1e9})
    with pytest.warns(fallback.NegativeTransferWarning, match=r"target_snd .* worse .* strategy: logreg"):
        _, metrics = _adapted_run(domains, tmp_path, "worse", monitor="target_snd")
    report = metrics["negative_transfer"]
    assert report["validator"] == "target_snd" and report["warned"] is True and "logreg" in report["fallback"]
    assert report["frozen_probe"]["target_snd"] == 1e9 and "target_snd" in report["model"]
    _, metrics = _adapted_run(domains, tmp_path, "better", monitor="val_acc")  # compared by target_im
    assert metrics["negative_transfer"]["validator"] == "target_im" and metrics["negative_transfer"]["warned"] is False


@pytest.mark.slow  # end-to-end: the frozen probe is built and scored for real
def test_negative_transfer_check_scores_a_real_frozen_probe(domains: dict[str, Path], tmp_path: Path) -> None:
    task, metrics = _adapted_run(domains, tmp_path, "real", monitor="target_dev")
    report = metrics["negative_transfer"]
    probe, model = report["frozen_probe"], report["model"]
    assert {"target_im", "target_snd", "target_dev", "target_acc", "target_balanced_acc"} <= set(probe)
    assert report["warned"] == (model["target_dev"] < probe["target_dev"])
    # the probe is the backbone as the run started: its source accuracy is what a fitted head gives there
    assert 0.0 <= probe["source_val_acc"] <= 1.0 and probe != model
    _, metrics = _adapted_run(domains, tmp_path, "probe", strategy={"name": "probe", "lr": 0.01})
    assert "does not change a pretrained backbone" in metrics["negative_transfer"]["note"]
    _, metrics = _adapted_run(domains, tmp_path, "off", negative_transfer_check=False)
    assert "negative_transfer" not in metrics


def test_bluemarble_adaptation_runs_either_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontl.data import BlueMarbleAdaptationDataModule

    monkeypatch.setenv("VISIONTL_CACHE", str(tmp_path / "cache"))
    forward = BlueMarbleAdaptationDataModule(train_per_class=2, val_per_class=2)
    reverse = BlueMarbleAdaptationDataModule(train_per_class=2, val_per_class=2, source="shadedrelief", target="bmng")
    _, _ = forward.splits, reverse.splits
    assert "bmng" in Path(forward.root).name and "shadedrelief" in Path(forward.target_root).parent.name
    assert "shadedrelief" in Path(reverse.root).name and "bmng" in Path(reverse.target_val_root).parent.name
    assert Path(reverse.target_root).parent == Path(forward.root)  # the same places, the roles swapped
    with pytest.raises(ValueError, match="adaptation needs two renderings"):
        BlueMarbleAdaptationDataModule(source="bmng", target="bmng")
    with pytest.raises(ValueError, match=r"target must be one of \['bmng', 'shadedrelief'\], got 'sentinel'"):
        BlueMarbleAdaptationDataModule(target="sentinel")


def test_adaptation_defaults_are_the_benchmarks_choice() -> None:
    """The defaults (method, checkpoint validator, target BN) are the configuration with the best mean
    rank over the three pairs of benchmarks/adaptation.py, as its committed results say."""
    import inspect
    import re

    md = (Path(__file__).parents[2] / "benchmarks" / "results" / "adaptation.md").read_text()
    method, bn, validator = re.search(r"\*\*Default \(best mean rank over the pairs\): (\w+) / (target|source) BN / "
                                      r"(\w+)\.\*\*", md).groups()
    from visiontl.tasks.adaptation import adaptation_defaults

    defaults = {k: v.default for k, v in inspect.signature(AdaptationTask.__init__).parameters.items()}
    assert defaults["method"] is None and defaults["monitor"] is None  # resolved by the task: one class or tags
    assert (*adaptation_defaults(None, None, multilabel=False), defaults["target_bn"]) == (method, validator, bn == "target")
    # several tags per image: the best DANN configuration there (MCC reads a softmax)
    dann = re.search(r"^\| dann / target BN / (\w+) \| [\d.]+ \|", md, re.M).group(1)  # its best-ranked row
    assert adaptation_defaults(None, None, multilabel=True) == ("dann", dann.replace("val_acc", "val_map"))
