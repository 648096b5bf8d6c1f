"""The hostile suite, command line: a checkpoint never steers a command, a full disk loses nothing,
a bad configuration is one line with the closest valid key, ``--debug`` shows the traceback.

Every case drives the real ``visiontl`` command (``hostile.run_cli``) and asserts the exit code,
the length of stderr and that the message names the file, field or value.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.hostile import assert_one_line_failure, run_cli

TINY = ["--model.init_args.backbone", "test_resnet", "--model.init_args.pretrained", "false",
        "--data.init_args.image_size", "32", "--data.init_args.num_workers", "0",
        "--trainer.enable_progress_bar", "false"]


def _fit_args(root: Path, save_dir: Path, steps: int = 2) -> list[str]:
    return ["fit", "--config", "recipe:folder", "--data.init_args.root", str(root), *TINY,
            "--trainer.max_steps", str(steps), "--trainer.logger.init_args.save_dir", str(save_dir)]


def _eval_args(command: str, root: Path, save_dir: Path, ckpt: Path, *extra: str) -> list[str]:
    return [command, "--config", "recipe:folder", "--data.init_args.root", str(root), *TINY,
            "--trainer.logger.init_args.save_dir", str(save_dir), *extra, "--ckpt_path", str(ckpt)]


@pytest.fixture(scope="module")
def trained(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run's ``last.ckpt`` (test_resnet, 32 px, 2 steps) trained through the command line."""
    out = tmp_path_factory.mktemp("hostile-run")
    result = run_cli(*_fit_args(shapes_root, out))
    assert result.rc == 0, result.err
    return out / "folder" / "version_0" / "checkpoints" / "last.ckpt"


def _with_hparams(src: Path, dst: Path, **changes: object) -> Path:
    ckpt = torch.load(src, weights_only=True)
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], **changes}
    torch.save(ckpt, dst)
    return dst


@pytest.fixture
def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module ``visiontl_evil`` whose import creates a file; returns that file."""
    sentinel = tmp_path / "IMPORTED"
    (tmp_path / "visiontl_evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\nclass Foo:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("visiontl_evil", None)
    return sentinel


# -- 1. a checkpoint is data, never configuration ---------------------------------------------
@pytest.mark.parametrize("command", ["validate", "test", "predict"])
@pytest.mark.parametrize("payload", [
    {"_class_path": "visiontl_evil.Foo"},
    {"strategy": {"class_path": "visiontl_evil.Foo", "init_args": {}}},
    {"_class_path": "this.Foo"},
])
def test_nothing_a_checkpoint_names_is_imported(command: str, payload: dict, trained: Path, shapes_splits: Path,
                                                tmp_path: Path, evil_module: Path) -> None:
    had_this = "this" in sys.modules
    ckpt = _with_hparams(trained, tmp_path / "evil.ckpt", **payload)
    result = run_cli(*_eval_args(command, shapes_splits, tmp_path / "runs", ckpt))
    assert_one_line_failure(result, ckpt, rc=2)
    assert not evil_module.exists(), "the checkpoint made visiontl import a module"
    assert "Beautiful is better than ugly" not in result.out + result.err
    assert had_this or "this" not in sys.modules


def test_load_from_checkpoint_imports_nothing_and_reads_no_weights(trained: Path, tmp_path: Path,
                                                                   evil_module: Path) -> None:
    """The Python door: Lightning's ``load_from_checkpoint`` on a visiontl task."""
    from visiontl.tasks.checkpoints import CheckpointError
    from visiontl.tasks import ClassificationTask

    evil = _with_hparams(trained, tmp_path / "evil.ckpt", strategy={"class_path": "visiontl_evil.Foo", "init_args": {}})
    with pytest.raises(CheckpointError, match="not a registered visiontl strategy"):
        ClassificationTask.load_from_checkpoint(evil)
    with pytest.raises(ValueError, match="blocked"):  # Lightning's own guard for the task's class path
        ClassificationTask.load_from_checkpoint(_with_hparams(trained, tmp_path / "cls.ckpt",
                                                              _class_path="visiontl_evil.Foo"))
    assert not evil_module.exists()
    task = ClassificationTask.load_from_checkpoint(_with_hparams(trained, tmp_path / "ok.ckpt", weights="/etc/passwd",
                                                                 pretrained=True))
    reference = torch.load(trained, weights_only=True)["state_dict"]
    assert all(torch.equal(v, reference[k]) for k, v in task.state_dict().items() if k in reference)


def test_a_checkpoint_never_overrides_the_configuration(trained: Path, shapes_splits: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import visiontl.models.weights

    read: list[str] = []
    original = visiontl.models.weights.load_state_dict_file
    monkeypatch.setattr(visiontl.models.weights, "load_state_dict_file",
                        lambda path, *a, **k: read.append(str(path)) or original(path, *a, **k))
    ckpt = _with_hparams(trained, tmp_path / "passwd.ckpt", weights="/etc/passwd", pretrained=True)
    result = run_cli(*_eval_args("validate", shapes_splits, tmp_path / "runs", ckpt))
    assert result.rc == 0, result.err
    assert "/etc/passwd" not in read and read == []  # a checkpoint being evaluated brings its own weights
    # and the user's own pretrained: true reads nothing either (no hub access offline)
    result = run_cli(*_eval_args("test", shapes_splits, tmp_path / "runs", trained, "--model.init_args.pretrained",
                                 "true"))
    assert result.rc == 0, result.err


@pytest.mark.parametrize("extra,named", [
    (["--model.init_args.backbone", "test_efficientnet"], ["test_resnet", "test_efficientnet", "backbone"]),
    (["--model.init_args.strategy", "lora"], ["Gradual", "Lora", "strategy"]),
])
def test_a_conflicting_configuration_names_both_values(extra: list[str], named: list[str], trained: Path,
                                                       shapes_splits: Path, tmp_path: Path) -> None:
    result = run_cli(*_eval_args("validate", shapes_splits, tmp_path / "runs", trained, *extra))
    assert_one_line_failure(result, trained, *named, rc=2)


def test_another_number_of_classes_names_both(trained: Path, shapes_splits: Path, tmp_path: Path) -> None:
    two = tmp_path / "two"
    for split in ("train", "val", "test"):
        for cls in ("bars", "discs"):
            shutil.copytree(shapes_splits / split / cls, two / split / cls)
    result = run_cli(*_eval_args("validate", two, tmp_path / "runs", trained))
    message = assert_one_line_failure(result, trained, "num_classes", rc=2)
    assert "3" in message and "2" in message


def test_class_names_in_another_order_are_refused(trained: Path, shapes_splits: Path, tmp_path: Path) -> None:
    ckpt = _with_hparams(trained, tmp_path / "order.ckpt", class_names=["discs", "bars", "squares"])
    result = run_cli(*_eval_args("validate", shapes_splits, tmp_path / "runs", ckpt))
    assert_one_line_failure(result, "class_names", "discs", rc=2)


def test_a_pickled_checkpoint_is_one_line_and_runs_nothing(shapes_splits: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "RAN"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    bad = tmp_path / "payload.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": "test_resnet"}, "x": Payload()}, bad)
    for command in ("validate", "fit"):
        args = _eval_args(command, shapes_splits, tmp_path / "runs", bad)
        if command == "fit":
            args += ["--trainer.max_steps", "1"]
        message = assert_one_line_failure(run_cli(*args), bad, rc=2)
        assert "pickled" in message
    assert not sentinel.exists()


# -- 2. a full disk leaves the last good checkpoint intact -----------------------------------
def _mount_small(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if not shutil.which("mount") or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 7 MB filesystem (one 4.6 MB test_resnet checkpoint fits, a second does not)."""
    mount = tmp_path / "small"
    if not _mount_small(mount, "7000k"):
        pytest.skip("cannot mount a tmpfs here (not root or no CAP_SYS_ADMIN); the injected-ENOSPC test covers it")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def _readable(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])


def test_a_full_disk_keeps_the_last_good_checkpoint(shapes_root: Path, small_disk: Path) -> None:
    result = run_cli(*_fit_args(shapes_root, small_disk, steps=4))
    checkpoints = small_disk / "folder" / "version_0" / "checkpoints"
    message = assert_one_line_failure(result, "no space left on the device", "last.ckpt", rc=2)
    assert f"the last good checkpoint is {checkpoints / 'best.ckpt'}" in message
    assert _readable(checkpoints / "best.ckpt") == 4  # whole, at its final name
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt"]  # no partial file, no temporary


def test_an_injected_enospc_keeps_the_previous_checkpoint(shapes_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no filesystem can be mounted: the disk fills while ``last.ckpt`` is rewritten at the
    end of training; the one written at step 2 stays whole and is named as the last good one."""
    from visiontl.core import files

    real = files.fsync_file
    writes: list[str] = []

    def fsync_file(path: str | os.PathLike[str]) -> None:
        name = Path(path).name
        if name.startswith(".last.ckpt.tmp-"):
            writes.append(name)
            if len(writes) >= 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path)

    monkeypatch.setattr(files, "fsync_file", fsync_file)
    args = _fit_args(shapes_root, tmp_path, steps=4) + ["--model.init_args.last_every_n_steps", "2"]
    result = run_cli(*args)
    checkpoints = tmp_path / "folder" / "version_0" / "checkpoints"
    message = assert_one_line_failure(result, checkpoints / "last.ckpt", "no space left on the device", rc=2)
    assert "the previous one is kept as it was" in message
    assert _readable(checkpoints / "last.ckpt") == 2
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]


def test_a_failed_report_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontl.core import files
    from visiontl.core.errors import WriteError

    target = tmp_path / "metrics.json"
    files.write_json(target, {"old": 1})
    monkeypatch.setattr(files, "fsync_file", lambda p: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full", str(p))))
    with pytest.raises(WriteError, match="no space left on the device; the previous file is kept"):
        files.write_json(target, {"new": 2})
    assert target.read_text() == '{\n  "old": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# -- 6. every failure is one line -------------------------------------------------------------
@pytest.mark.parametrize("extra,named", [
    (["--model.init_args.strategy", "gradul"], ["gradul", "gradual"]),
    (["--model.init_args.backbone", "test_resnett"], ["test_resnett", "test_resnet"]),
    (["--trainer.max_stps", "3"], ["--trainer.max_stps", "trainer.max_steps"]),
    (["--trainer.max_steps", "abc"], ["trainer.max_steps", "'abc'", "int"]),
    (["--data.init_args.image_size", "abc"], ["data.init_args.image_size", "'abc'", "int or None"]),
    (["--data.init_args.root", "/nonexistent-visiontl"], ["/nonexistent-visiontl"]),
    (["--trainer.logger.init_args.name", "never_ran", "--ckpt_path", "last"], ["Nothing to resume", "never_ran"]),
])
def test_fit_typos_are_one_line_with_the_closest_name(extra: list[str], named: list[str], shapes_root: Path,
                                                      tmp_path: Path) -> None:
    result = run_cli(*_fit_args(shapes_root, tmp_path), *extra)
    assert_one_line_failure(result, *named, rc=2)
    assert not (tmp_path / "folder").exists() or not any((tmp_path / "folder").iterdir())


@pytest.mark.parametrize("yaml,named", [
    ("model:\n  init_args:\n    backbnoe: x\n", ["model.init_args.backbnoe", "`backbone`"]),
    ("data:\n  init_args:\n    rot: x\n", ["data.init_args.rot", "`root`"]),
    ("trainer:\n  max_stpes: 3\n", ["trainer.max_stpes", "`trainer.max_steps`"]),
    ("modle:\n  x: 1\n", ["modle.x", "`model`"]),
    ("model:\n  class_path: visiontl.tasks.ClassifcationTask\n", ["ClassifcationTask", "`ClassificationTask`"]),
])
def test_an_unknown_yaml_key_is_one_line_with_did_you_mean(yaml: str, named: list[str], shapes_root: Path,
                                                           tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml)
    result = run_cli(*_fit_args(shapes_root, tmp_path), "--config", str(extra))
    assert_one_line_failure(result, *named, rc=2)


@pytest.mark.parametrize("option,value", [("ood_score", "entropy"), ("early_stopping", "0")])
def test_a_task_option_out_of_range_is_one_line_naming_it(option: str, value: str, shapes_root: Path,
                                                           tmp_path: Path) -> None:
    result = run_cli(*_fit_args(shapes_root, tmp_path), f"--model.init_args.{option}", value)
    assert_one_line_failure(result, option, value, rc=2)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_no_hub_access_says_to_pass_local_weights(shapes_root: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # nothing cached
    result = run_cli("fit", "--config", "recipe:folder", "--data.init_args.root", str(shapes_root),
                     "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_steps", "1")
    assert_one_line_failure(result, "resnet18", "--model.init_args.weights", "visiontl doctor", rc=2)


def test_debug_shows_the_traceback(shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontl.cli.commands import main
    from visiontl.strategies import StrategyError

    args = [*_fit_args(shapes_root, tmp_path), "--model.init_args.strategy", "gradul"]
    with pytest.raises(Exception) as raised:
        main(["--debug", *args])
    assert isinstance(raised.value.__cause__, StrategyError) or isinstance(raised.value, StrategyError)
    monkeypatch.setenv("VISIONTL_DEBUG", "1")
    with pytest.raises(Exception):
        main(args)


def test_an_unexpected_error_is_two_lines_pointing_to_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontl.cli import commands as cli

    def broken(argv: list[str]) -> int:
        raise RuntimeError("boom in a place nobody expected")

    monkeypatch.setitem(cli.EXTRA_COMMANDS, "doctor", (broken, "x"))
    result = run_cli("doctor")
    message = assert_one_line_failure(result, "RuntimeError", "boom", rc=1)
    assert "--debug" in message


def test_an_unwritable_output_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = blocker / "report.json"  # a folder that cannot exist: its parent is a file
    assert_one_line_failure(run_cli("doctor", "--json", target), target, rc=2)
    assert blocker.read_text() == "x"


def test_a_bad_option_of_an_argparse_command_is_one_line() -> None:
    result = run_cli("export", "run.ckpt", "--out", "m.onnx", "--nope")
    assert_one_line_failure(result, "--nope", "visiontl export --help", rc=2)


def test_the_console_script_prints_no_traceback(tmp_path: Path) -> None:
    """From outside: the installed entry point, exit code and stderr as a shell sees them."""
    proc = subprocess.run([sys.executable, "-m", "visiontl", "export", str(tmp_path / "missing.ckpt"), "--out",
                           str(tmp_path / "m.onnx")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3
    assert "missing.ckpt" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "visiontl", "export", str(tmp_path / "missing.ckpt"), "--out",
                           str(tmp_path / "m.onnx"), "--debug"], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
