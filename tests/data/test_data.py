"""Datamodules and image reading: layouts, splits, sizes, channels and every bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.shapes import make_folder
from visiontl.data import (
    CsvDataModule,
    DataError,
    FolderDataModule,
    ImageReadError,
    auto_batch_size,
    read_image,
    stratified_split,
)


def _loader_sizes(dm, split="train"):
    dm.setup()
    return [len(b["label"]) for b in getattr(dm, f"{split}_dataloader")()]


def test_folder_with_stratified_split(shapes_root: Path) -> None:
    dm = FolderDataModule(str(shapes_root), image_size=32, num_workers=0, val_fraction=0.25)
    assert dm.class_names == ["bars", "discs", "squares"] and dm.num_classes == 3
    assert dm.class_counts == [9, 9, 9]
    assert len(dm.splits["val"]) == 9
    train = {p for p, _ in dm.splits["train"]}
    assert not train & {p for p, _ in dm.splits["val"]}
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (3, 32, 32) and batch["image"].dtype.is_floating_point
    # the same seed gives the same split, another seed another one
    again = FolderDataModule(str(shapes_root), val_fraction=0.25)
    other = FolderDataModule(str(shapes_root), val_fraction=0.25, seed=1)
    assert again.splits["val"] == dm.splits["val"] and other.splits["val"] != dm.splits["val"]


def test_train_val_test_layout(shapes_splits: Path) -> None:
    dm = FolderDataModule(str(shapes_splits), image_size=32, num_workers=0)
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 24, "val": 12, "test": 12}
    assert sum(_loader_sizes(dm, "test")) == 12


@pytest.mark.parametrize("n,expected", [(1, 1), (40, 8), (60, 8), (150, 16), (180, 16), (100_000, 32)])
def test_auto_batch_size(n: int, expected: int) -> None:
    assert auto_batch_size(n) == expected


def test_loader_never_empty_and_never_a_lone_image(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=11, classes=("a", "b", "c"))  # 33 images
    dm = FolderDataModule(str(root), image_size=32, num_workers=0, batch_size=64, val_fraction=0.1)
    sizes = _loader_sizes(dm)
    assert sizes and sum(sizes) == len(dm.splits["train"])  # batch 64 > 27 images: one batch, not zero
    dm = FolderDataModule(str(root), image_size=32, num_workers=0, batch_size=16, val_fraction=0.1)
    assert len(dm.splits["train"]) == 30
    assert _loader_sizes(dm) == [16, 14]
    dm = FolderDataModule(str(root), image_size=32, num_workers=0, batch_size=29, val_fraction=0.1)
    assert _loader_sizes(dm) == [29]  # 30 = 29 + 1: the lone image is dropped


def test_grayscale_rgb_and_16_bit_images(tmp_path: Path) -> None:
    gray = make_folder(tmp_path / "gray", per_class=4, mode="L", classes=("a", "b"))
    dm = FolderDataModule(str(gray), image_size=32, num_workers=0, in_chans=3, mean=[0.5] * 3, std=[0.5] * 3)
    dm.setup()
    x = next(iter(dm.train_dataloader()))["image"]
    assert x.shape[1] == 3 and torch_equal(x[:, 0], x[:, 1])
    rgb = make_folder(tmp_path / "rgb", per_class=4, classes=("a", "b"))
    dm = FolderDataModule(str(rgb), image_size=32, num_workers=0, in_chans=1, mean=[0.5], std=[0.25])
    dm.setup()
    assert next(iter(dm.train_dataloader()))["image"].shape[1] == 1
    arr = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    img = read_image(path)
    assert img.shape == (64, 64, 1) and img.dtype == np.float32
    assert img.max() == pytest.approx(arr.max() / 65535, rel=1e-4)


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_missing_and_empty_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist"):
        FolderDataModule(str(tmp_path / "nope")).splits
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no class sub-folders"):
        FolderDataModule(str(tmp_path / "empty")).splits
    root = make_folder(tmp_path / "d", per_class=3, classes=("a",))
    (root / "b").mkdir()
    with pytest.raises(DataError, match=r"Class folder .*b has no images"):
        FolderDataModule(str(root)).splits


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_images_error_or_are_skipped_and_listed(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=6, classes=("a", "b"), ext=".jpg")
    bad = root / "a" / "002.jpg"
    _truncate(bad)
    (root / "b" / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"(?s)2 image\(s\) cannot be used.*002\.jpg.*on_bad_image"):
        FolderDataModule(str(root), image_size=32, num_workers=0).setup()
    dm = FolderDataModule(str(root), image_size=32, num_workers=0, on_bad_image="skip")
    dm.setup()
    assert {p.name for p, _ in dm.skipped} == {"002.jpg", "junk.png"}
    assert sum(len(v) for v in dm.splits.values()) == 11  # 12 images + junk - 2 bad
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(bad)


def _write_csv(path: Path, rows: list[tuple[str, str]], header=("path", "label")) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_datamodule_and_its_errors(shapes_root: Path, tmp_path: Path) -> None:
    rows = [(str(p.relative_to(shapes_root)), p.parent.name) for p in sorted(shapes_root.rglob("*.png"))]
    good = _write_csv(shapes_root / "labels.csv", rows)
    dm = CsvDataModule(str(good), image_size=32, num_workers=0)
    assert dm.num_classes == 3 and len(dm.splits["train"]) + len(dm.splits["val"]) == 36
    missing = _write_csv(tmp_path / "missing.csv", rows[:2] + [("nowhere/x.png", "bars")])
    with pytest.raises(DataError, match=r"(?s)missing\.csv lists 1 file.*nowhere/x\.png"):
        CsvDataModule(str(missing), root=str(shapes_root)).splits
    wrong = _write_csv(tmp_path / "wrong.csv", rows, header=("file", "label"))
    with pytest.raises(DataError, match=r"no column 'path' \(columns: file, label\)"):
        CsvDataModule(str(wrong)).splits
    val = _write_csv(tmp_path / "val.csv", [(rows[0][0], "zebras")])
    with pytest.raises(DataError, match=r"val split has classes the training split lacks: zebras"):
        CsvDataModule(str(good), val_csv=str(val), root=str(shapes_root)).splits


def test_stratified_split_keeps_every_class_in_train() -> None:
    samples = [(Path(f"{c}{i}"), c) for c in "ab" for i in range(5)] + [(Path("c0"), "c")]
    train, val = stratified_split(samples, 0.2, seed=0)
    assert {c for _, c in train} == {"a", "b", "c"}
    assert sorted(c for _, c in val) == ["a", "b"]


def test_presized_cache_reads_once_and_matches_the_files(tmp_path: Path) -> None:
    from visiontl.data.presize import presized_side

    root = make_folder(tmp_path / "big", per_class=4, size=96, classes=("a", "b"))
    dm = FolderDataModule(str(root), image_size=32, num_workers=0, presize=True, augment="none",
                          mean=[0.0] * 3, std=[1.0] * 3)
    dm.setup()
    arrays = dm.datasets["train"].presized
    assert arrays.dtype == np.uint8 and arrays.shape[1:] == (presized_side(32), presized_side(32), 3)
    plain = FolderDataModule(str(root), image_size=32, num_workers=0, augment="none", mean=[0.0] * 3, std=[1.0] * 3)
    plain.setup()
    a = dm.datasets["train"][0]["image"]
    b = plain.datasets["train"][0]["image"]
    assert a.shape == b.shape == (3, 32, 32)
    # the same picture: compared at 8x8, since area vs bilinear down-sampling treat pixel noise differently
    coarse = torch.nn.functional.avg_pool2d
    assert (coarse(a[None], 4) - coarse(b[None], 4)).abs().mean() < 0.03
    again = FolderDataModule(str(root), image_size=32, num_workers=0, presize=True)
    again.setup()
    assert again.datasets["train"].presized.filename == arrays.filename  # cache hit: the same file


def test_make_splits_seeds_every_split(tmp_path: Path) -> None:
    from helpers.shapes import make_splits

    def pixels(root: Path) -> list[bytes]:
        return [p.read_bytes() for p in sorted((root / "val").rglob("*.png"))]

    a, b, c = (make_splits(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 7), ("c", 7)))
    assert pixels(b) == pixels(c) and pixels(a) != pixels(b)
