"""The fine-tuning ladder, checked by value: what trains, what stays put, at which LR."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from visiontl.data import FolderDataModule
from visiontl.strategies import Full, Gradual, Partial, StrategyError, discriminative_lrs, get_strategy
from visiontl.tasks import ClassificationTask


def _snapshot(task: ClassificationTask) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.model.state_dict().items()}


def _fit(task: ClassificationTask, root: Path, tmp_path: Path, epochs: int = 2) -> pl.Trainer:
    dm = FolderDataModule(str(root), image_size=32, num_workers=0, batch_size=8)
    trainer = pl.Trainer(max_epochs=epochs, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(task, dm)
    return trainer


def _changed(before: dict[str, torch.Tensor], task: ClassificationTask) -> set[str]:
    after = task.model.state_dict()
    return {k for k, v in before.items() if v.dtype.is_floating_point and not torch.equal(v, after[k])}


def _task(strategy, backbone: str = "test_resnet", **kwargs) -> ClassificationTask:
    return ClassificationTask(backbone, num_classes=3, strategy=strategy, pretrained=False, **kwargs)


def _group_keys(task: ClassificationTask, names: set[str]) -> set[str]:
    """State-dict keys (parameters and BN buffers) of the named groups."""
    keys = set()
    for g in task.groups:
        if g.name in names:
            keys.update(g.param_names)
            for m in g.norm_modules:
                keys.update({f"{m}.running_mean", f"{m}.running_var"})
    return keys


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet"])
def test_probe_freezes_backbone_weights_and_batchnorm_statistics(backbone, shapes_root, tmp_path) -> None:
    task = _task("probe", backbone)
    before = _snapshot(task)
    _fit(task, shapes_root, tmp_path)
    changed = _changed(before, task)
    head = _group_keys(task, {"head"})
    assert changed == head, f"unexpected changes: {sorted(changed - head)[:5]}"
    running = [k for k in before if k.endswith("running_mean")]
    assert running and not any(k in changed for k in running)


def test_batchnorm_statistics_would_move_without_the_policy(shapes_root, tmp_path) -> None:
    """The probe test above can fail: with train_bn the frozen backbone's statistics do move."""
    task = _task(get_strategy({"name": "probe", "train_bn": True}))
    before = _snapshot(task)
    _fit(task, shapes_root, tmp_path)
    changed = _changed(before, task)
    assert any(k.endswith("running_mean") for k in changed)
    assert any(k.startswith("layer1") and k.endswith("bn1.weight") for k in changed)
    assert not any(k.endswith("conv1.weight") and k.startswith("layer1") for k in changed)


def test_partial_trains_exactly_the_last_k_groups(shapes_root, tmp_path) -> None:
    task = _task(Partial(k=2))
    names = [g.name for g in task.groups]
    before = _snapshot(task)
    _fit(task, shapes_root, tmp_path)
    trained = set(names[-3:])  # two stages + head
    assert _changed(before, task) == _group_keys(task, trained)


def test_partial_rejects_k_larger_than_the_backbone() -> None:
    with pytest.raises(StrategyError, match=r"k=9.*only 5 groups.*stem, stage1"):
        _task(Partial(k=9))
    with pytest.raises(StrategyError, match="k must be >= 1"):
        Partial(k=0)


def test_full_uses_discriminative_learning_rates(shapes_root, tmp_path) -> None:
    task = _task(Full(lr=1e-2, decay=0.5))
    trainer = _fit(task, shapes_root, tmp_path, epochs=1)
    groups = trainer.optimizers[0].param_groups
    layer = [g["name"].split("/")[0] for g in groups]
    assert list(dict.fromkeys(layer)) == [g.name for g in task.groups]
    n = len(task.groups)
    for g, name in zip(groups, layer):
        i = [lg.name for lg in task.groups].index(name)
        assert g["initial_lr"] == pytest.approx(1e-2 * 0.5 ** (n - 1 - i))
    before = _snapshot(task)
    _fit(task, shapes_root, tmp_path, epochs=1)
    assert _changed(before, task) >= {n for n, _ in task.model.named_parameters()}


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet"])
def test_full_defaults_train_everything_on_the_pretrained_batchnorm_statistics(backbone, shapes_root,
                                                                                tmp_path) -> None:
    """Full's defaults: one stage, head at 1e-3 and each group below it x0.7, every weight and
    BatchNorm affine parameter trains from the first step, and the BatchNorm layers stay in
    inference mode (the running statistics are the pretrained ones after training); partial's
    training groups keep updating theirs, and ``bn_stats="update"`` gives full the same."""
    task = _task("full", backbone)
    assert task.strategy.bn_stats == "frozen" and task.strategy.lr == 1e-3 and task.strategy.decay == 0.7
    n = len(task.groups)
    assert [p.lr for p in task.strategy.plan(task.groups)] == pytest.approx([1e-3 * 0.7 ** (n - 1 - i)
                                                                            for i in range(n)])
    assert task.frozen_norms == {m for g in task.groups for m in g.norm_modules} != set()
    before = _snapshot(task)
    _fit(task, shapes_root, tmp_path, epochs=1)
    changed = _changed(before, task)
    running = {k for k in before if k.endswith(("running_mean", "running_var"))}
    assert running and not changed & running
    assert {n for n, _ in task.model.named_parameters()} <= changed

    updating = _task(Full(bn_stats="update"), backbone)
    assert not updating.frozen_norms
    before = _snapshot(updating)
    _fit(updating, shapes_root, tmp_path, epochs=1)
    assert running <= _changed(before, updating)

    partial = _task("partial", backbone)
    assert partial.strategy.bn_stats == "update" and partial.strategy.k == 2
    before = _snapshot(partial)
    _fit(partial, shapes_root, tmp_path, epochs=1)
    top = _group_keys(partial, {g.name for g in partial.groups[-3:]})
    assert running & top and _changed(before, partial) & running == running & top


def test_full_starts_its_head_at_zero_so_no_random_gradient_reaches_the_backbone() -> None:
    """``full`` zeroes the new classifier: the first step's gradient on every pretrained weight is
    exactly zero (the head's is not), so a random head cannot tear the features before it has learned;
    ``head_init="model"`` keeps the backbone's own random head, whose gradient reaches every layer.
    The parameter-efficient strategies built on ``full`` keep their measured random head."""
    torch.manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])

    def grads(task: ClassificationTask) -> tuple[float, float]:
        task.train()
        torch.nn.functional.cross_entropy(task(x), y).backward()
        head = {id(p) for p in task.model.get_classifier().parameters()}
        body = [p.grad for p in task.model.parameters() if id(p) not in head and p.grad is not None]
        return (max(float(g.abs().max()) for g in body),
                max(float(p.grad.abs().max()) for p in task.model.get_classifier().parameters()))

    zero = _task("full")
    assert zero.strategy.head_init == "zero" and zero.strategy.to_config()["init_args"]["head_init"] == "zero"
    assert all(torch.count_nonzero(p) == 0 for p in zero.model.get_classifier().parameters())
    body, head = grads(zero)
    assert body == 0.0 and head > 0.0
    body, head = grads(_task({"name": "full", "head_init": "model"}))
    assert body > 0.0 and head > 0.0
    for peft in ("bitfit", "lora", "adapter"):
        assert torch.count_nonzero(_task(peft).model.get_classifier().weight) > 0, peft
    with pytest.raises(StrategyError, match="full: head_init must be one of zero, model"):
        get_strategy({"name": "full", "head_init": "random"})


def test_decay_one_is_a_single_learning_rate_and_lr_range_is_geometric() -> None:
    assert discriminative_lrs(4, 1e-3, 1.0) == [1e-3] * 4
    lrs = discriminative_lrs(3, 0.0, lr_range=(1e-5, 1e-3))
    assert lrs == pytest.approx([1e-5, 1e-4, 1e-3])
    task = _task(Full(lr_range=(1e-6, 1e-3)))
    plans = task.strategy.plan(task.groups)
    assert plans[0].lr == pytest.approx(1e-6) and plans[-1].lr == pytest.approx(1e-3)
    assert all(a.lr < b.lr for a, b in zip(plans, plans[1:]))
    with pytest.raises(StrategyError, match="decay"):
        discriminative_lrs(3, 1e-3, decay=1.5)


def test_gradual_trains_the_head_first_then_everything(shapes_root, tmp_path) -> None:
    task = _task(Gradual(head="sgd", head_epochs=1, decay=0.5))
    before = _snapshot(task)
    trainer = _fit(task, shapes_root, tmp_path, epochs=1)
    assert _changed(before, task) == _group_keys(task, {"head"})
    optimizer_groups = len(trainer.optimizers[0].param_groups)
    layers = {g["name"].split("/")[0] for g in trainer.optimizers[0].param_groups}
    assert layers == {g.name for g in task.groups}  # every group is in the optimizer from the start

    task2 = _task(Gradual(head="sgd", head_epochs=1, decay=0.5, bn_stats="update"))
    before = _snapshot(task2)
    trainer = _fit(task2, shapes_root, tmp_path, epochs=2)
    assert _changed(before, task2) >= {n for n, _ in task2.model.named_parameters()}
    assert len(trainer.optimizers[0].param_groups) == optimizer_groups


def test_gradual_is_lp_ft_a_fitted_head_then_everything_with_frozen_statistics(shapes_root, tmp_path,
                                                                                monkeypatch) -> None:
    """LP-FT: before the first gradient step the head IS the logistic regression fitted on the
    frozen features; then every group trains from epoch 0 while BatchNorm statistics stay put."""
    from visiontl.strategies.heads import LogisticRegression

    fitted: dict[str, torch.Tensor] = {}
    real_fit = LogisticRegression.fit

    def spy(self, head, features, labels, num_classes, class_weight=None):
        real_fit(self, head, features, labels, num_classes, class_weight)
        fitted.update(weight=head.weight.detach().clone(), features=features.clone(), labels=labels.clone())

    monkeypatch.setattr(LogisticRegression, "fit", spy)
    task = _task("gradual")
    before = _snapshot(task)
    trainer = _fit(task, shapes_root, tmp_path, epochs=1)
    assert fitted and fitted["features"].shape == (len(trainer.datamodule.splits["train"]), task.model.num_features)
    reference = torch.nn.Linear(task.model.num_features, 3)
    LogisticRegression().fit(reference, fitted["features"], fitted["labels"], 3)
    assert torch.allclose(fitted["weight"], reference.weight, atol=1e-5)  # the same deterministic fit
    changed = _changed(before, task)
    assert {n for n, _ in task.model.named_parameters()} <= changed  # everything trained in epoch 0
    running = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert running and not any(k in changed for k in running)  # bn_stats="frozen"
    report = task.strategy_report()["head_fit"]
    assert report["l2"] in LogisticRegression().grid and 0 <= report["val_acc"] <= 1


def test_gradual_progressive_unfreezes_one_group_per_epoch() -> None:
    task = _task(Gradual(head="sgd", head_epochs=1, unfreeze="progressive"))
    names = [g.name for g in task.groups]
    strategy = task.strategy
    assert strategy.trainable_at(task.groups, 0) == ["head"]
    assert strategy.trainable_at(task.groups, 1) == names[-2:]
    assert strategy.trainable_at(task.groups, 2) == names[-3:]
    assert strategy.trainable_at(task.groups, 99) == names


def test_scratch_ignores_pretrained_weights(tmp_path) -> None:
    from safetensors.torch import save_file

    source = _task("probe")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = _task("probe", weights=str(path))
    assert torch.equal(loaded.model.conv1[0].weight, source.model.conv1[0].weight)
    scratch = _task("scratch", weights=str(path))
    assert not torch.equal(scratch.model.conv1[0].weight, source.model.conv1[0].weight)
    assert scratch.model.visiontl_weights["source"] == "random"


def test_strategy_report_counts_parameters_and_lrs() -> None:
    task = _task(Partial(k=1, lr=0.01))
    report = task.strategy_report()
    total = sum(p.numel() for p in task.model.parameters())
    trainable = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    assert report["total_params"] == total and report["trainable_params"] == trainable
    lrs = {g["name"]: g["lr"] for g in report["groups"]}
    assert lrs["head"] == 0.01 and lrs["stem"] == 0.0 and lrs["stage4"] == 0.01


def test_unknown_strategy_is_a_clear_error() -> None:
    with pytest.raises(StrategyError, match="Did you mean partial"):
        get_strategy("partail")


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    from visiontl.tasks import warmup_cosine

    f = warmup_cosine(100, warmup=0.1, floor=0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(99) == pytest.approx(0.01, abs=1e-3)
    assert all(f(i) >= f(i + 1) for i in range(10, 99))
    assert not math.isnan(f(1000))


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_no_weight_decay_on_norms_biases_and_the_models_own_set(backbone: str) -> None:
    """timm's rule: weight decay on weight matrices and kernels only; never on 1-D parameters or
    on what the model's no_weight_decay() names (a ViT's pos_embed and cls_token)."""
    task = ClassificationTask(backbone, num_classes=3, pretrained=False, strategy=Full(lr=1e-3), weight_decay=0.05)
    groups = task.optimizer_groups()
    names = {id(p): n for n, p in task.model.named_parameters()}
    assert len({g["name"] for g in groups}) == len(groups)  # unique: the LR monitor logs each
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    free = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    shapes = dict(task.model.named_parameters())
    assert decayed and free and not decayed & free
    assert decayed | free == set(shapes)  # every parameter trains, once
    assert all(shapes[n].ndim > 1 for n in decayed) and all(shapes[n].ndim <= 1 or n in
                                                            task.model.no_weight_decay() for n in free)
    if backbone == "test_vit":
        assert {"pos_embed", "cls_token"} <= free
    assert all(g["weight_decay"] == 0.05 for g in groups if g["weight_decay"])
    # each layer group's two halves share its learning rate
    by_layer: dict[str, set[float]] = {}
    for g in groups:
        by_layer.setdefault(g["name"].split("/")[0], set()).add(g["lr"])
    assert all(len(lrs) == 1 for lrs in by_layer.values())


class _Nested(Full):
    """A user's strategy, defined outside visiontl's own packages."""

    name = "nested-test"


def test_to_config_names_the_defining_module_and_round_trips() -> None:
    config = _Nested(lr=0.02).to_config()
    assert config["class_path"] == f"{_Nested.__module__}._Nested"
    rebuilt = get_strategy(config)
    assert type(rebuilt) is _Nested and rebuilt.lr == 0.02
    assert Full().to_config()["class_path"] == "visiontl.strategies.full.Full"
    assert type(get_strategy(Full().to_config(), trusted=False)) is Full  # registered: no import needed


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_bitfit_trains_only_biases_norm_affine_and_the_head(backbone: str, shapes_root, tmp_path) -> None:
    from visiontl.strategies.bitfit import norm_affine_names

    task = _task("bitfit", backbone)
    norms = norm_affine_names(task.model)
    head = {n for g in task.groups if g.name == "head" for n in g.param_names}
    expected = {n for n, _ in task.model.named_parameters() if n.endswith(".bias") or n in norms} | head
    assert {n for n, p in task.model.named_parameters() if p.requires_grad} == expected
    report = task.strategy_report()
    total = sum(p.numel() for p in task.model.parameters())
    trainable = sum(p.numel() for n, p in task.model.named_parameters() if n in expected)
    assert report["trainable_params"] == trainable < total * 0.25  # tiny test models have few weights per bias
    before = _snapshot(task)
    _fit(task, shapes_root, tmp_path, epochs=1)
    changed = _changed(before, task) - {"pos_embed"}  # a ViT's position embedding is resampled to 32 px, not trained
    weights = {n for n, _ in task.model.named_parameters()} - expected
    assert weights and not changed & weights  # convolution / linear weights did not move
    assert changed & (expected - head)  # biases and norms below the head did
    running = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert not any(k in changed for k in running)  # BatchNorm statistics frozen (bn_stats="frozen")
    grouped = {id(p) for g in task.optimizer_groups() for p in g["params"]}
    assert grouped == {id(p) for n, p in task.model.named_parameters() if n in expected}


def test_bitfit_by_name_through_fine_tune_and_export(shapes_root, tmp_path) -> None:
    from visiontl import fine_tune
    from visiontl.deploy.export import export_onnx

    run = fine_tune(shapes_root, backbone="test_resnet", strategy={"name": "bitfit", "lr": 0.01}, pretrained=False,
                    image_size=32, steps=6, out=tmp_path, data_kwargs={"num_workers": 0},
                    trainer_kwargs={"enable_progress_bar": False})
    import json

    report = json.loads((run.run_dir / "strategy.json").read_text())
    assert report["strategy"]["class_path"] == "visiontl.strategies.bitfit.BitFit"
    assert 0 < report["trainable_params"] < report["total_params"]
    assert export_onnx(run.run_dir, tmp_path / "m.onnx")["max_abs_logit_diff"] < 1e-3
