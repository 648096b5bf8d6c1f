"""A killed run loses nothing: last.ckpt is the latest state and a resume continues it exactly."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visiontl import fine_tune
from visiontl.train.resume import ResumeError, resolve_last

_FIT = """
import json, os, signal, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import pytorch_lightning as pl
from visiontl import fine_tune

root, out, name, kill_at, resume = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
strategy, when, every = json.loads(sys.argv[6]), sys.argv[7], int(sys.argv[8])

def kill(trainer, hook):
    if hook == when and trainer.global_step == kill_at and not trainer.sanity_checking:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind

class Kill(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        kill(trainer, "batch_end")

    def on_before_backward(self, trainer, *args):  # the step after a batch's start, where last.ckpt is written
        kill(trainer, "after_save")

    def on_validation_batch_end(self, trainer, *args):
        kill(trainer, "validation")

fine_tune(root, backbone="test_resnet", strategy=strategy, pretrained=False, image_size=32, steps=24, out=out,
          name=name, seed=3, data_kwargs={"num_workers": 0, "batch_size": 8},
          task_kwargs={"last_every_n_steps": every},
          trainer_kwargs={"enable_progress_bar": False, "precision": "32-true", "log_every_n_steps": 1,
                          "callbacks": [Kill()] if kill_at >= 0 else []},
          ckpt_path="last" if resume else None)
"""


def _fit(script: Path, root: Path, out: Path, name: str, kill_at: int = -1, resume: bool = False,
         strategy: object = "full", when: str = "batch_end", every: int = 5) -> int:
    done = subprocess.run([sys.executable, str(script), str(root), str(out), name, str(kill_at), str(int(resume)),
                           json.dumps(strategy), when, str(every)], capture_output=True, text=True, check=False)
    if kill_at < 0:
        assert done.returncode == 0, done.stderr[-3000:]
    return done.returncode


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
@pytest.mark.parametrize(("kill_at", "saved_at", "strategy"), [
    (13, 10, "full"), (9, 5, "full"),
    # gradual, one more group each epoch: the kill lands in epoch 2, whose trainable set the resumed
    # run must recompute (the unfreezing callback keeps no state)
    (11, 10, {"name": "gradual", "head": "sgd", "unfreeze": "progressive", "bn_stats": "update"}),
], ids=["after-an-epoch-end", "mid-epoch", "mid-gradual-schedule"])
def test_a_killed_run_resumes_where_it_was_and_ends_like_an_uninterrupted_one(
        shapes_root: Path, tmp_path: Path, kill_at: int, saved_at: int, strategy: object) -> None:
    """last.ckpt is written every 5 steps, not at an epoch's end (4 batches an epoch): a SIGKILL at
    step 13 resumes from step 10 (the epoch end at 12 wrote nothing), one at 9 from step 5, both in
    the middle of an epoch."""
    script = tmp_path / "fit.py"
    script.write_text(_FIT)
    out = tmp_path / "runs"
    _fit(script, shapes_root, out, "whole", strategy=strategy)
    assert _fit(script, shapes_root, out, "killed", kill_at=kill_at, strategy=strategy) == -9  # SIGKILLed
    killed_ckpt, version = resolve_last(out / "killed")
    assert version == 0 and torch.load(killed_ckpt, weights_only=True)["global_step"] == saved_at
    assert not [p for p in killed_ckpt.parent.iterdir() if p.name.startswith(".")]  # no half-written file
    _fit(script, shapes_root, out, "killed", resume=True, strategy=strategy)
    assert sorted(p.name for p in (out / "killed").iterdir()) == ["version_0"]  # continued in place

    whole = torch.load(out / "whole" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(out / "killed" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == whole["global_step"] == 24 and resumed["epoch"] == whole["epoch"]
    for key, value in whole["state_dict"].items():
        if value.is_floating_point():  # documented tolerance: CPU float32 kernels, same order of operations
            assert torch.allclose(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6), key
    moments = [s["exp_avg"] for s in whole["optimizer_states"][0]["state"].values()]
    resumed_moments = [s["exp_avg"] for s in resumed["optimizer_states"][0]["state"].values()]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(moments, resumed_moments))

    steps = [int(r["step"]) for r in _rows(out / "killed" / "version_0") if r.get("train_loss_step")]
    assert steps == [int(r["step"]) for r in _rows(out / "whole" / "version_0") if r.get("train_loss_step")]
    val = [float(r["val_acc"]) for r in _rows(out / "killed" / "version_0") if r.get("val_acc")]
    val_whole = [float(r["val_acc"]) for r in _rows(out / "whole" / "version_0") if r.get("val_acc")]
    assert val == pytest.approx(val_whole)  # every epoch logged once, no gap and no duplicate


def _logged(run: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """Every row of ``metrics.csv``: its epoch, step and which columns it filled, in order."""
    return [(r["epoch"], r["step"], tuple(sorted(k for k, v in r.items() if v and k not in ("epoch", "step"))))
            for r in _rows(run)]


@pytest.mark.slow
@pytest.mark.parametrize(("when", "kill_at", "saved_at"), [
    ("after_save", 12, 12),  # just after last.ckpt was written at the end of epoch 2 (4 batches an epoch)
    ("batch_end", 14, 12),  # in the middle of epoch 3
    ("validation", 12, 8),  # during epoch 2's validation, before last.ckpt of step 12
], ids=["epoch-boundary", "mid-epoch", "during-validation"])
def test_a_resumed_runs_metrics_have_no_gaps(shapes_root: Path, tmp_path: Path, when: str, kill_at: int,
                                             saved_at: int) -> None:
    """A resumed run's ``metrics.csv`` has the rows of an uninterrupted run, in the same order:
    every step's training loss, every epoch's validation and epoch-level rows, the learning rates
    (issue 31: a kill just after an epoch-end ``last.ckpt`` lost step 59's loss and the epoch's
    validation). last.ckpt is decided at a batch's end and written at the next batch's start."""
    script = tmp_path / "fit.py"
    script.write_text(_FIT)
    out = tmp_path / "runs"
    _fit(script, shapes_root, out, "whole", every=4)
    assert _fit(script, shapes_root, out, "killed", kill_at=kill_at, when=when, every=4) == -9
    killed_ckpt, _ = resolve_last(out / "killed")
    assert torch.load(killed_ckpt, weights_only=True)["global_step"] == saved_at
    _fit(script, shapes_root, out, "killed", resume=True, every=4)
    whole, resumed = _logged(out / "whole" / "version_0"), _logged(out / "killed" / "version_0")
    assert any("val_acc" in cols for _, _, cols in whole) and len(whole) > 40
    assert resumed == whole
    end = torch.load(out / "whole" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    end_resumed = torch.load(out / "killed" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in end.items():
        if value.is_floating_point():
            assert torch.allclose(end_resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6), key


def test_last_checkpoint_is_the_latest_state(shapes_root: Path, tmp_path: Path) -> None:
    run = fine_tune(shapes_root, backbone="test_resnet", strategy="full", pretrained=False, image_size=32, steps=14,
                    out=tmp_path, data_kwargs={"num_workers": 0, "batch_size": 8},
                    task_kwargs={"last_every_n_steps": None, "last_every_minutes": None},
                    trainer_kwargs={"enable_progress_bar": False})
    assert torch.load(run.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 14


def test_resume_last_without_a_run_is_an_error(shapes_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match="Nothing to resume"):
        fine_tune(shapes_root, backbone="test_resnet", pretrained=False, out=tmp_path, name="nothing",
                  ckpt_path="last")
    from visiontl.cli.commands import main

    recipe = Path(__file__).parents[2] / "recipes" / "folder.yaml"
    code = main(["fit", "--config", str(recipe), "--data.init_args.root", str(shapes_root),
                 "--model.init_args.backbone", "test_resnet", "--model.init_args.pretrained", "false",
                 "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path", "last"])
    assert code == 2
