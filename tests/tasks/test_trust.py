"""Bad input never crashes a run or loses work: decompression bombs and friends."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers.shapes import write_bomb
from visiontl import fine_tune
from visiontl.cli.commands import main
from visiontl.data.images import DataError, ImageReadError, read_image


@pytest.fixture()
def bombed(shapes_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "bombed"
    shutil.copytree(shapes_root, root)
    write_bomb(root / "discs" / "bomb.png")
    return root


def test_a_decompression_bomb_is_a_named_bad_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = write_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 400
    with pytest.raises(ImageReadError, match="bomb.png.*decompression bomb"):
        read_image(bomb)
    small = write_bomb(tmp_path / "big.png", 3000, 3000)  # 9 Mpx: under Pillow's limit, over ours
    monkeypatch.setenv("VISIONTL_MAX_PIXELS", "1000000")
    with pytest.raises(ImageReadError, match=r"3000 x 3000 px \(9 Mpx\) is above the 1 Mpx limit"):
        read_image(small)
    with pytest.raises(ImageReadError, match="above the 1 Mpx limit"):
        read_image(small, max_pixels=10**6)


def test_fit_skips_a_bomb_under_skip_and_names_it_otherwise(bombed: Path, tmp_path: Path) -> None:
    kwargs = dict(backbone="test_resnet", strategy="probe", pretrained=False, image_size=32, steps=5,
                  out=tmp_path / "runs", trainer_kwargs={"enable_progress_bar": False})
    with pytest.raises(DataError, match="bomb.png"):
        fine_tune(bombed, data_kwargs={"num_workers": 0}, **kwargs)
    result = fine_tune(bombed, data_kwargs={"num_workers": 0, "on_bad_image": "skip"}, **kwargs)
    skipped = (result.run_dir / "skipped_files.txt").read_text()
    assert "bomb.png" in skipped and "decompression bomb" in skipped


def test_check_data_reports_a_bomb(bombed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.json"
    for fast, code in (([], 1), (["--fast"], 0)):  # headers only: a warning, as for any unreadable header
        assert main(["check-data", str(bombed), "--json", str(report), "--no-progress", *fast]) == code
        text = json.dumps(json.loads(report.read_text()))
        assert "bomb.png" in text and "decompression bomb" in text


def test_check_data_max_pixels(shapes_root: Path, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    assert main(["check-data", str(shapes_root), "--json", str(report), "--no-progress", "--max-pixels", "100"]) == 1
    assert "above the" in report.read_text()


def test_export_bad_targets_are_one_line_errors_and_leave_nothing(shapes_root: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import subprocess
    import sys

    from visiontl.core.files import remove_stale_temps, write_text

    run = fine_tune(shapes_root, backbone="test_resnet", strategy="probe", pretrained=False, image_size=32, steps=4,
                    out=tmp_path / "runs", data_kwargs={"num_workers": 0},
                    trainer_kwargs={"enable_progress_bar": False})
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert main(["export", str(run.run_dir), "--out", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() != 0:  # root writes anywhere: the permission case only exists for other users
            assert main(["export", str(run.run_dir), "--out", str(locked / "m.onnx")]) == 2
            assert capsys.readouterr().err.count("\n") == 1
    finally:
        locked.chmod(0o700)
    assert main(["export", str(run.run_dir), "--out", str(tmp_path / "m.onnx"), "--images",
                 str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert "missing.png" in err and err.count("\n") == 1
    # a killed writer's temporary is cleaned by the next write; a live one's is kept
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".m.onnx.tmp-{int(dead.stdout)}-abc.onnx"
    live = tmp_path / f".m.onnx.tmp-{os.getpid()}-xyz.onnx"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    assert remove_stale_temps(tmp_path / "m.onnx") == [stale] and live.exists()
    live.unlink()
    os.umask(0o022)
    write_text(tmp_path / "report.txt", "x")
    assert (tmp_path / "report.txt").stat().st_mode & 0o777 == 0o644  # the umask, not mkstemp's 0600
    assert main(["export", str(run.run_dir), "--out", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o644


def test_bad_sizes_and_one_class_are_refused_the_same_everywhere(shapes_root: Path, tmp_path: Path) -> None:
    from visiontl.data import FolderDataModule

    for kwargs in ({"image_size": 0}, {"batch_size": 0}, {"image_size": -3}):
        with pytest.raises(DataError, match=next(iter(kwargs))):
            FolderDataModule(str(shapes_root), **kwargs)
    for kwargs in ({"steps": 0}, {"image_size": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            fine_tune(shapes_root, backbone="test_resnet", pretrained=False, **kwargs)
    one = tmp_path / "one"
    shutil.copytree(shapes_root / "discs", one / "discs")
    with pytest.raises(DataError, match="only one class"):
        FolderDataModule(str(one)).splits
    assert main(["check-data", str(one), "--json", str(tmp_path / "r.json"), "--no-progress"]) == 1
    assert "one_class" in (tmp_path / "r.json").read_text()


def test_data_channels_that_do_not_fit_the_model_name_both_numbers(shapes_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"1 channel\(s\) \(in_chans\) but the model takes 3"):
        fine_tune(shapes_root, backbone="test_resnet", pretrained=False, image_size=32, steps=2,
                  out=tmp_path / "runs", data_kwargs={"num_workers": 0, "in_chans": 1},
                  trainer_kwargs={"enable_progress_bar": False})


def test_random_bytes_are_not_called_a_pickle(tmp_path: Path) -> None:
    from visiontl.models.weights import WeightsError, load_state_dict_file

    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 3)
    with pytest.raises(WeightsError, match="is not a torch or safetensors weight file") as err:
        load_state_dict_file(junk)
    assert "pickled" not in str(err.value)


def test_a_fit_stopped_by_bad_input_leaves_no_run_directory(shapes_root: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    with pytest.raises(DataError):
        fine_tune(shapes_root, backbone="test_resnet", pretrained=False, image_size=32, steps=2, out=runs,
                  name="bad", data_kwargs={"num_workers": 0, "in_chans": 1},
                  trainer_kwargs={"enable_progress_bar": False})
    assert not list((runs / "bad").glob("version_*"))
    one = tmp_path / "one"
    shutil.copytree(shapes_root / "discs", one / "discs")
    recipe = Path(__file__).parents[2] / "recipes" / "folder.yaml"
    code = main(["fit", "--config", str(recipe), "--data.init_args.root", str(one), "--model.init_args.backbone",
                 "test_resnet", "--model.init_args.pretrained", "false", "--trainer.logger.init_args.save_dir",
                 str(runs), "--trainer.max_steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and "only one class" in err[-1]
    assert not [p for p in runs.rglob("version_*")]
