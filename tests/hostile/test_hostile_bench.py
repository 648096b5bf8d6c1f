"""Hostile input to `visiontl bench` (issue 31, sections 6 and 8): the bench checks before it
spends. Weights that do not load, data entries that do not fit their datamodule and grids too big
to run by accident stop in the dry run, with one line naming the entry and the value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers.hostile import assert_one_line_failure, run_cli

TINY = ["--strategies", "logreg", "--image-size", "32", "--steps", "2"]


def _bench(tmp_path: Path, *args: object) -> list[object]:
    return ["bench", "--out", tmp_path / "bench", *args]


def _config(tmp_path: Path, data: object, backbones: object = ("test_resnet=random",)) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({"data": [data], "backbones": list(backbones), "strategies": ["logreg"],
                                    "image_size": 32, "steps": 2}))
    return path


def test_the_dry_run_loads_the_weights_and_refuses_etc_passwd(shapes_root: Path, tmp_path: Path) -> None:
    result = run_cli(*_bench(tmp_path, "--data", shapes_root, "--backbones", "test_resnet=/etc/passwd", *TINY,
                             "--dry-run"))
    message = assert_one_line_failure(result, "/etc/passwd", "backbones[0]", "test_resnet", rc=2)
    assert "weight file" in message
    assert not (tmp_path / "bench").exists()
    # the same entry in a bench file, run for real: refused before the first cell
    config = _config(tmp_path, str(shapes_root), ["test_resnet=random", "test_resnet=/etc/passwd"])
    assert_one_line_failure(run_cli(*_bench(tmp_path, "--config", config)), "/etc/passwd", "backbones[1]", rc=2)
    assert not (tmp_path / "bench" / "results.csv").exists()


def test_hub_weights_that_are_not_there_stop_the_dry_run(shapes_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch"))
    result = run_cli(*_bench(tmp_path, "--data", shapes_root, "--backbones", "test_resnet", *TINY, "--dry-run"))
    assert_one_line_failure(result, "backbones[0]", "test_resnet=random", rc=2)


@pytest.mark.parametrize("entry, names", [
    ({"path": "{src}", "init_args": {"root": "/etc"}}, ["data[0]", "init_args.root", "path:"]),
    ({"path": "{src}", "init_args": {"roots": "/etc"}}, ["data[0]", "init_args.roots", "FolderDataModule", "root"]),
    ({"path": "{src}", "init_args": {"shots": 3}}, ["data[0]", "init_args.shots"]),
    ({"path": "{src}", "class_path": "visiontl.data.FolderDataModule"}, ["data[0]", "class_path"]),
    ({"class_path": "visiontl.data.FolderDataModule", "init_args": {"root": "/etc"}},
     ["FolderDataModule", "init_args.root: /etc"]),
    ({"name": "typo", "class_path": "visiontl.data.FolderDataModule", "init_args": {"root": "{src}",
                                                                                    "val_fraction": "half"}},
     ["'typo'", "val_fraction"]),
], ids=["path-and-root", "unknown-key", "set-by-the-grid", "path-and-class_path", "root-not-a-dataset",
        "wrong-type"])
def test_data_entries_that_do_not_fit_their_datamodule(shapes_root: Path, tmp_path: Path, entry: dict,
                                                       names: list[str]) -> None:
    def fill(value: object) -> object:
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return str(shapes_root) if value == "{src}" else value

    result = run_cli(*_bench(tmp_path, "--config", _config(tmp_path, fill(entry)), "--dry-run"))
    assert_one_line_failure(result, *names, rc=2)
    assert "TypeError" not in result.err


def test_a_grid_above_the_limits_asks_for_yes(shapes_root: Path, tmp_path: Path) -> None:
    base = _bench(tmp_path, "--data", shapes_root, "--backbones", "test_resnet=random", *TINY)
    # 4,000,000 cells: the dry run estimates it without building it, and warns
    dry = run_cli(*base, "--seeds", "4000000", "--dry-run")
    assert dry.rc == 0, dry.err
    assert "4,000,000 cells in shard 0/1" in dry.out
    assert len(dry.err_lines) == 1 and "--max-cells 10,000" in dry.err and "--yes" in dry.err
    # a real run refuses it, before anything is written
    assert_one_line_failure(run_cli(*base, "--seeds", "4000000"), "4,000,000 cells", "--yes", rc=2)
    assert not (tmp_path / "bench").exists()
    # the limits are options: the estimated time too
    assert_one_line_failure(run_cli(*base, "--seeds", "3", "--max-cells", "2"), "3 cells", "--max-cells 2", rc=2)
    assert_one_line_failure(run_cli(*base, "--seeds", "2", "--max-hours", "0.000001"), "--max-hours", "--yes", rc=2)
    assert not (tmp_path / "bench").exists()
    small = run_cli(*base, "--seeds", "2", "--dry-run")
    assert small.rc == 0 and small.err_lines == [], small.err
    ran = run_cli(*base, "--shots", "2", "--seeds", "3", "--max-cells", "2", "--yes")
    assert ran.rc == 0, ran.err
    assert (tmp_path / "bench" / "results.csv").read_text().count("\n") == 4  # the header and three cells
