"""A feature whose library is an extra, without it: one line naming the extra, not a traceback and
not a "corrupt image"."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from helpers.hostile import assert_one_line_failure, run_cli
from visiontl.core.extras import MissingExtraError, require


def _without(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for name in modules:
        for loaded in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require("json", "none", "JSON").dumps([1]) == "[1]"
    _without(monkeypatch, "tifffile")
    with pytest.raises(MissingExtraError, match=r"pip install 'visiontl\[tiff\]'"):
        require("tifffile", "tiff", "Reading a TIFF")


def test_a_tiff_without_tifffile_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tifffile

    from visiontl.data.images import read_image

    path = tmp_path / "band.tif"
    tifffile.imwrite(path, np.zeros((8, 8, 4), np.uint16))
    _without(monkeypatch, "tifffile")
    with pytest.raises(MissingExtraError, match=r"TIFF .*band\.tif needs tifffile.*visiontl\[tiff\]"):
        read_image(path)


def test_a_dicom_without_pydicom_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontl.data.images import read_image

    path = tmp_path / "scan.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM")
    _without(monkeypatch, "pydicom")
    with pytest.raises(MissingExtraError, match=r"visiontl\[dicom\]"):
        read_image(path)


def test_pretraining_without_lightly_and_digits_without_sklearn_name_their_extras(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontl.data.lowres import build_digits
    from visiontl.tasks import ContinuedPretraining

    _without(monkeypatch, "lightly", "sklearn")
    with pytest.raises(MissingExtraError, match=r"visiontl\[ssl\]"):
        ContinuedPretraining("test_resnet", pretrained=False)
    with pytest.raises(MissingExtraError, match=r"visiontl\[lowres\]"):
        build_digits(tmp_path / "digits")


def test_the_command_says_it_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tifffile

    root = tmp_path / "tiles"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            tifffile.imwrite(root / name / f"{i}.tif", np.full((8, 8, 3), i, np.uint8))
    _without(monkeypatch, "tifffile")
    result = run_cli("check-data", str(root), "--no-progress")
    assert_one_line_failure(result, "visiontl[tiff]", rc=2)
