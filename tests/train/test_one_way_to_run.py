"""One way to run: ``visiontl fit`` and ``fine_tune`` resolve the same inputs to the same run.

Both doors write ``settings.json`` (what the fit was resolved to: steps, precision, batch size,
logging interval, seed, the task's hyper-parameters...); given the same configuration and seed
they write the same file and the same best-checkpoint metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.hostile import run_cli
from visiontl import fine_tune


def test_the_command_line_and_fine_tune_resolve_one_run(shapes_root: Path, tmp_path: Path) -> None:
    api = fine_tune(shapes_root, backbone="test_resnet", strategy="gradual", pretrained=False, image_size=32,
                    steps=8, out=tmp_path, name="api", seed=0, data_kwargs={"num_workers": 0, "augment": "natural"},
                    task_kwargs={"class_weights": "balanced"}, verbose=False)
    result = run_cli("fit", "--config", "recipe:folder", "--data.init_args.root", shapes_root,
                     "--model.init_args.backbone", "test_resnet", "--model.init_args.pretrained", "false",
                     "--data.init_args.image_size", "32", "--data.init_args.num_workers", "0",
                     "--trainer.max_steps", "8", "--trainer.enable_progress_bar", "false",
                     "--trainer.logger.init_args.save_dir", tmp_path, "--trainer.logger.init_args.name", "cli")
    assert result.rc == 0, result.err
    cli_dir = tmp_path / "cli" / "version_0"
    settings = [json.loads((d / "settings.json").read_text()) for d in (api.run_dir, cli_dir)]
    assert settings[0] == settings[1]
    assert settings[0]["precision"] == "32-true" and settings[0]["num_sanity_val_steps"] == 0
    assert settings[0]["max_steps"] == 8 and settings[0]["seed"] == 0 and settings[0]["batch_size"] >= 1
    best = [json.loads((d / "metrics.json").read_text())["best"] for d in (api.run_dir, cli_dir)]
    assert best[0].keys() == best[1].keys() and "val_acc" in best[0]
    for key, value in best[0].items():
        assert best[1][key] == pytest.approx(value, abs=1e-6), key
    assert api.metrics["val_loss"] == pytest.approx(best[1]["val_loss"], abs=1e-6)


def test_the_logging_interval_is_one_rule() -> None:
    from visiontl.train.run import log_interval

    assert [log_interval(n) for n in (0, 1, 4, 49, 50, 5000)] == [1, 1, 4, 49, 50, 50]
    assert log_interval(float("inf")) == 50  # an iterable without a length
