"""What practitioners expect from a Lightning-based tool, through Lightning: TensorBoard and MLflow
beside metrics.csv, early stopping, a learning-rate finder; from the API and from a recipe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from helpers.hostile import assert_one_line_failure, run_cli
from visiontl import fine_tune

TINY = ["--model.init_args.backbone", "test_resnet", "--model.init_args.pretrained", "false",
        "--data.init_args.image_size", "32", "--data.init_args.num_workers", "0",
        "--trainer.enable_progress_bar", "false"]
QUIET = {"enable_progress_bar": False}


def _scalars(events_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_fine_tune_also_logs_to_tensorboard_and_mlflow(shapes_root: Path, tmp_path: Path) -> None:
    import mlflow

    run = fine_tune(shapes_root, backbone="test_resnet", strategy="full", pretrained=False, image_size=32, steps=10,
                    out=tmp_path, name="tracked", data_kwargs={"num_workers": 0}, trainer_kwargs=QUIET,
                    also_log_to=["tensorboard", "mlflow"])
    csv_rows = (run.run_dir / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) > 2  # the CSV log is written as before
    scalars = _scalars(run.run_dir / "tensorboard")
    assert "val_acc" in scalars and "train_loss_step" in scalars
    assert scalars["val_acc"][-1] == pytest.approx(json.loads((run.run_dir / "metrics.json").read_text())
                                                   ["final"]["val_acc"], abs=1e-6)
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'mlflow.db').absolute()}")
    experiment = client.get_experiment_by_name("tracked")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == [run.run_dir.name]
    history = client.get_metric_history(runs[0].info.run_id, "val_acc")
    assert history and history[-1].value == pytest.approx(scalars["val_acc"][-1], abs=1e-6)
    assert runs[0].data.params["backbone"] == "test_resnet"


def test_a_recipe_logs_to_tensorboard(shapes_root: Path, tmp_path: Path) -> None:
    result = run_cli("fit", "--config", "recipe:folder", "--data.init_args.root", str(shapes_root), *TINY,
                     "--trainer.max_steps", "4", "--trainer.logger.init_args.save_dir", str(tmp_path),
                     "--trainer.logger.init_args.also_log_to", "[tensorboard]")
    assert result.rc == 0, result.err
    run = tmp_path / "folder" / "version_0"
    assert (run / "metrics.csv").is_file() and list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert "train_loss_step" in _scalars(run / "tensorboard")


def test_an_unknown_tracker_or_a_missing_extra_is_one_line(shapes_root: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_cli("fit", "--config", "recipe:folder", "--data.init_args.root", str(shapes_root), *TINY,
                     "--trainer.max_steps", "2", "--trainer.logger.init_args.save_dir", str(tmp_path),
                     "--trainer.logger.init_args.also_log_to", "[wandb]")
    assert_one_line_failure(result, "wandb", "tensorboard", rc=2)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(Exception, match=r"visiontl\[tracking\]"):
        fine_tune(shapes_root, backbone="test_resnet", strategy="full", pretrained=False, image_size=32, steps=2,
                  out=tmp_path, data_kwargs={"num_workers": 0}, trainer_kwargs=QUIET, also_log_to=["mlflow"])


def test_early_stopping_ends_a_run_that_stopped_improving(shapes_root: Path, tmp_path: Path) -> None:
    """A learning rate too small to train: val_acc stops improving (only BatchNorm statistics move),
    so with a patience of 2 validations the run stops two epochs after its best one, far inside its
    200-step budget, and keeps its best checkpoint."""
    kwargs = dict(backbone="test_resnet", strategy={"name": "full", "lr": 1e-12}, pretrained=False, image_size=32,
                  steps=200, out=tmp_path, data_kwargs={"num_workers": 0, "batch_size": 8}, trainer_kwargs=QUIET)
    stopped = fine_tune(shapes_root, early_stopping=2, name="stopped", **kwargs)
    from pytorch_lightning.callbacks import EarlyStopping

    batches = len(stopped.datamodule.train_dataloader())
    stop = next(c for c in stopped.trainer.callbacks if isinstance(c, EarlyStopping))
    assert stop.patience == 2 and stop.wait_count == 2 and stop.stopped_epoch > 0
    assert stopped.trainer.global_step == (stop.stopped_epoch + 1) * batches < 200
    assert stopped.task.hparams["early_stopping"] == 2
    assert (stopped.run_dir / "checkpoints" / "best.ckpt").is_file()
    with pytest.raises(ValueError, match="early_stopping"):
        fine_tune(shapes_root, early_stopping=0, **kwargs)


def test_lr_find_suggests_a_rate_and_puts_the_weights_back(shapes_root: Path, tmp_path: Path) -> None:
    from visiontl.train import lr_find
    from visiontl.train.finetune import prepare_task
    from visiontl.train.lrfinder import find_lr

    # a random model: its BatchNorm layers need batch statistics (full's default keeps the pretrained
    # ones, here mean 0 / var 1), else the sweep's loss diverges and Lightning ends it before 20 steps
    full = {"name": "full", "bn_stats": "update"}
    dm, task = prepare_task(shapes_root, "test_resnet", full, pretrained=False, image_size=32,
                            data_kwargs={"num_workers": 0})
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    found = find_lr(task, dm, out=tmp_path, name="probe-lr", steps=20, verbose=False)
    assert all(torch.equal(before[k], v) for k, v in task.model.state_dict().items())  # restored
    assert found.suggestion is not None and 1e-6 <= found.suggestion <= 1.0
    assert len(found.lrs) == len(found.losses) == 20 and found.lrs == sorted(found.lrs)
    assert found.plot.stat().st_size > 0
    assert json.loads(found.record.read_text())["suggestion"] == pytest.approx(found.suggestion)
    again = lr_find(shapes_root, backbone="test_resnet", strategy=full, pretrained=False, image_size=32, steps=20,
                    out=tmp_path, data_kwargs={"num_workers": 0}, verbose=False)
    assert again.lrs == found.lrs and again.suggestion == pytest.approx(found.suggestion)  # same seed, same sweep
    from visiontl.core.errors import UserError

    with pytest.raises(UserError, match="closed form"):
        lr_find(shapes_root, backbone="test_resnet", strategy="logreg", pretrained=False, image_size=32, out=tmp_path)


def test_lr_find_command_takes_a_recipe(shapes_root: Path, tmp_path: Path) -> None:
    result = run_cli("lr-find", "--config", "recipe:folder", "--data.init_args.root", str(shapes_root), *TINY,
                     "--trainer.logger.init_args.save_dir", str(tmp_path), "--steps", "20")
    assert result.rc == 0, result.err
    assert "suggested learning rate" in result.out
    assert (tmp_path / "folder-lr-find" / "lr_find.png").is_file()
    record = json.loads((tmp_path / "folder-lr-find" / "lr_find.json").read_text())
    assert record["strategy"] == "gradual" and record["steps"] == 20
    bad = run_cli("lr-find", "--config", "recipe:folder", "--data.init_args.root", str(shapes_root), *TINY,
                  "--trainer.logger.init_args.save_dir", str(tmp_path), "--steps", "3")
    assert_one_line_failure(bad, "3 steps", rc=2)
