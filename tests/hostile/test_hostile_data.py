"""Hostile input to `visiontl prepare-data` and to visiontl's cache folder (issue 31, sections 6 and 7).

prepare-data names every file it does not take (as check-data does, from the same scan), stops at a
decompression bomb with one line naming it and the pixel limit (no flattened worker tracebacks), and
a failed run leaves nothing in OUT, so the rerun needs no --overwrite. An unusable VISIONTL_CACHE
(a file, a folder that cannot be written) is one line saying so.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers.hostile import assert_one_line_failure, run_cli
from helpers.shapes import write_bomb

pytest.importorskip("litdata", reason="the stream extra (litdata) is part of the dev install")


def _odd_entries(cls: Path) -> list[str]:
    """A dangling symlink, a folder and (where the OS has them) a FIFO, all named like images, and
    an image outside the class folders: none of them is an image the data set takes."""
    os.symlink(cls / "gone.png", cls / "dangling.png")
    (cls / "x.png").mkdir()
    names = ["dangling.png", "x.png"]
    if hasattr(os, "mkfifo"):
        os.mkfifo(cls / "y.png")
        names.append("y.png")
    shutil.copy(next(cls.glob("*.png")), cls.parent / "stray.png")
    return [*names, "stray.png"]


def test_prepare_data_names_a_bomb_leaves_nothing_and_lists_every_file_it_does_not_take(
        shapes_root: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(shapes_root, src)
    cls = sorted(p for p in src.iterdir() if p.is_dir())[0]
    bomb = write_bomb(cls / "bomb.png")
    odd = _odd_entries(cls)
    out = tmp_path / "out"

    stopped = run_cli("prepare-data", src, out, "--workers", "1")
    message = assert_one_line_failure(stopped, "bomb.png", "179 Mpx limit", "decompression bomb", "--on-bad-image skip",
                                      rc=2)
    assert "Traceback" not in message and len(stopped.err) < 1500, stopped.err
    assert not out.exists(), sorted(out.rglob("*"))  # no OUT/train left behind, nor OUT at all
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # nor the staging folder

    skipped = run_cli("prepare-data", src, tmp_path / "skipped", "--workers", "1", "--on-bad-image", "skip")
    assert skipped.rc == 0, skipped.err
    meta = json.loads((tmp_path / "skipped" / "visiontl.json").read_text())
    listed = {Path(p).name: why for p, why in meta["skipped"]}
    assert set(listed) == {"bomb.png", *odd}
    assert "179 Mpx limit" in listed["bomb.png"]
    assert "dangling symlink" in listed["dangling.png"] and "folder" in listed["x.png"]
    assert "not in a class folder" in listed["stray.png"]
    if "y.png" in listed:
        assert "FIFO" in listed["y.png"]
    for name in listed:  # named in the output too
        assert name in skipped.out
    assert sum(info["n"] for info in meta["splits"].values()) == 36

    report = run_cli("check-data", src, "--json", tmp_path / "check.json")  # the same scan names the same entries
    findings = {f["code"]: f for f in json.loads((tmp_path / "check.json").read_text())["findings"]}
    assert {Path(item.split(":")[0]).name for item in findings["not_taken"]["items"]} == set(odd), report.out
    assert "179 Mpx limit" in " ".join(findings["unreadable"]["items"])

    bomb.unlink()  # the rerun needs no --overwrite: the failed run left OUT as it was
    rerun = run_cli("prepare-data", src, out, "--workers", "1")
    assert rerun.rc == 0, rerun.err
    assert (out / "train" / "index.json").is_file() and (out / "visiontl.json").is_file()
    assert {Path(p).name for p, _ in json.loads((out / "visiontl.json").read_text())["skipped"]} == set(odd)


def test_a_worker_failure_is_its_first_error_line() -> None:
    from visiontl.data.streaming import _worker_error

    flattened = RuntimeError(
        "We found the following error Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise OSError(28, "No space left on device")\n'
        "OSError: [Errno 28] No space left on device\n\nThe above exception was the direct cause of the following "
        "exception:\n\nTraceback (most recent call last):\n  File \"y.py\", line 2, in g\n"
        "RuntimeError: Failed processing item=(2, '/data/a.png', 0, 'error'); index=2\n")
    assert _worker_error(flattened) == "OSError: [Errno 28] No space left on device"
    assert _worker_error(ValueError("plain")) == "ValueError: plain"


# -- VISIONTL_CACHE ---------------------------------------------------------------------------
def _fit(src: Path, tmp_path: Path) -> list[object]:
    """A fit whose first use of the cache is the feature cache (a probe)."""
    return ["fit", "--config", "recipe:folder", "--data.init_args.root", src, "--model.init_args.backbone",
            "test_resnet", "--model.init_args.pretrained", "false", "--model.init_args.strategy", "probe",
            "--trainer.max_steps", "2", "--trainer.default_root_dir", tmp_path / "runs"]


def test_a_cache_that_is_a_file_is_one_line(shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache-file"
    cache.write_text("not a folder")
    monkeypatch.setenv("VISIONTL_CACHE", str(cache))
    message = assert_one_line_failure(run_cli(*_fit(shapes_root, tmp_path)), f"VISIONTL_CACHE={cache}", rc=2)
    assert "is a file" in message and "point it at a writable folder" in message
    doctor = run_cli("doctor")  # reports it, never fails
    assert doctor.rc == 0 and f"VISIONTL_CACHE={cache} is a file" in doctor.out


def test_a_read_only_cache_is_one_line(shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache-ro"
    cache.mkdir()
    cache.chmod(0o500)
    real_access = os.access

    def access(path: object, mode: int, *args: object, **kwargs: object) -> bool:  # root writes through 0o500
        if Path(os.fspath(path)) == cache and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setenv("VISIONTL_CACHE", str(cache))
    monkeypatch.setattr(os, "access", access)
    try:
        message = assert_one_line_failure(run_cli(*_fit(shapes_root, tmp_path)), f"VISIONTL_CACHE={cache}", rc=2)
        assert "is not writable" in message and "point it at a writable folder" in message
        assert "PermissionError" not in message
    finally:
        cache.chmod(0o700)


def test_a_cache_whose_writes_fail_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What os.access cannot tell (a read-only mount seen as root): the first write says it."""
    import tempfile

    from visiontl.core.files import default_cache_dir
    from visiontl.core.errors import UserError

    cache = tmp_path / "cache-rofs"
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args: object, **kwargs: object) -> object:
        if Path(str(kwargs.get("dir", ""))) == cache:
            raise PermissionError(13, "Permission denied", str(cache))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setenv("VISIONTL_CACHE", str(cache))
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(UserError, match=f"VISIONTL_CACHE={cache} is not writable .permission denied.: point it"):
        default_cache_dir()
    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)
    assert default_cache_dir() == cache and cache.is_dir()  # checked once it works
