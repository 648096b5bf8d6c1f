"""Bad input never crashes a run or loses work: decompression bombs and friends."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from visiontl import fine_tune
from visiontl.cli import main
from visiontl.data.images import DataError, ImageReadError, read_image


def write_bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A ~70-byte PNG whose header claims width x height pixels (Pillow refuses > ~179 Mpx)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
                     + chunk(b"IEND", b""))
    return path


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
