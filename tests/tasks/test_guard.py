"""The divergence guard and the defaults that keep fine-tuning from diverging, checked by value."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from visiontl import fine_tune
from visiontl.tasks.guard import DivergenceGuard


def _run(root: Path, tmp_path: Path, name: str, strategy, steps: int = 60, **task_kwargs):
    return fine_tune(root, backbone="test_resnet", strategy=strategy, pretrained=False, image_size=32, steps=steps,
                     out=tmp_path, name=name, seed=0, data_kwargs={"num_workers": 0, "augment": "none"},
                     task_kwargs=task_kwargs, trainer_kwargs={"enable_progress_bar": False})


def _finite(task) -> bool:
    return all(torch.isfinite(p).all() for p in task.model.state_dict().values() if p.is_floating_point())


def _poison_at(step: int):
    """A forward pre-hook on the classifier that turns its input into NaN at training ``step``."""

    def hook(module, args):
        task = module.visiontl_task
        if task._trainer is not None and task.training and task.trainer.global_step == step:
            return (args[0] * float("nan"),)
        return None

    return hook


def test_guard_repairs_a_non_finite_loss(shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN at step 12 poisons every weight through AdamW; the guard restores the last good state,
    scales the learning rates down, records it, and the run ends finite."""
    from visiontl.tasks import ClassificationTask

    real = ClassificationTask.configure_models

    def poisoned(self) -> None:
        real(self)
        head = self.model.get_classifier()
        head.__dict__["visiontl_task"] = self
        head.register_forward_pre_hook(_poison_at(12))

    monkeypatch.setattr(ClassificationTask, "configure_models", poisoned)
    bare = _run(shapes_root, tmp_path, "bare", "full", divergence_guard=False)
    final = json.loads((bare.run_dir / "metrics.json").read_text())["final"]
    assert math.isnan(final["val_loss"])  # the failure is real without the guard

    guarded = _run(shapes_root, tmp_path, "guarded", "full")
    summary = json.loads((guarded.run_dir / "metrics.json").read_text())
    report = summary["divergence_guard"]
    assert [e["action"] for e in report["events"]] == ["restored"] and report["events"][0]["step"] == 13
    assert report["events"][0]["reason"].startswith("non-finite loss") and report["lr_scale"] == pytest.approx(0.1)
    assert math.isfinite(summary["final"]["val_loss"]) and summary["steps"] == 60
    planned = [g["lr"] for g in guarded.task.optimizer_groups()]
    scheduler = guarded.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == pytest.approx([0.1 * p for p in planned])  # the schedule goes on at 0.1 x
    assert all(g["lr"] < p for g, p in zip(guarded.trainer.optimizers[0].param_groups, planned))


def test_guard_repairs_a_collapse_after_lp_ft(shapes_root: Path, tmp_path: Path) -> None:
    """lr=30 after a fitted head wrecks the features: validation collapses to one class; the guard
    goes back to the fitted head with smaller learning rates."""
    run = _run(shapes_root, tmp_path, "wild", {"name": "gradual", "lr": 30.0}, grad_clip=None)
    report = json.loads((run.run_dir / "metrics.json").read_text())["divergence_guard"]
    assert report["events"] and report["events"][0]["restored_step"] == 0
    assert any(e["reason"].startswith(("collapse", "loss")) for e in report["events"])
    assert report["lr_scale"] < 1 and _finite(run.task)


def test_guard_leaves_a_healthy_run_alone(shapes_root: Path, tmp_path: Path) -> None:
    run = _run(shapes_root, tmp_path, "healthy", "full")
    report = json.loads((run.run_dir / "metrics.json").read_text())["divergence_guard"]
    assert report == {"events": [], "gave_up": False, "lr_scale": 1.0}


def test_huge_feature_scale_does_not_diverge_with_the_defaults(shapes_root: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Features 10,000x larger than usual: a fresh SGD head explodes on them; LP-FT fits the head in
    closed form (scale-free), and clipping + the guard keep fine-tuning finite and accurate."""
    from visiontl.tasks import ClassificationTask

    real = ClassificationTask.configure_models

    def huge_features(self) -> None:
        real(self)
        self.model.global_pool.register_forward_hook(lambda module, args, out: out * 1e4)  # pooled features

    monkeypatch.setattr(ClassificationTask, "configure_models", huge_features)
    run = _run(shapes_root, tmp_path, "huge", "gradual")
    assert _finite(run.task)
    assert run.metrics["val_acc"] >= 0.8, run.metrics  # 3 easy classes: chance is 0.33
    head = json.loads((run.run_dir / "strategy.json").read_text())["head_fit"]
    assert head["val_acc"] >= 0.8


def test_guard_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="lr_factor"):
        DivergenceGuard(lr_factor=2.0)
