"""Each data rule written once (issue 32, section 5): the last training batch, dataset statistics,
the folder-or-CSV switch, image scaling and the exact resume of every training loader, each checked
by value across every place that follows it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from visiontl.train.finetune import make_datamodule
from visiontl.data.check import check_data
from visiontl.data import (
    AdaptationDataModule,
    CsvDataModule,
    DataError,
    FolderDataModule,
    UnlabelledDataModule,
)
from visiontl.data.base import drop_last_batch
from visiontl.data.images import read_image, read_raw
from visiontl.data.layout import source_kind
from visiontl.data.pixels import bit_depth, to_unit
from visiontl.data.stats import channel_stats, stats_from_sums, stored_bit_depth


def _images(folder: Path, n: int, seed: int = 0, size: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def _labelled(root: Path, n_train: int, seed: int = 0) -> Path:
    """``train/`` with ``n_train`` images over two classes, ``val/`` with one per class."""
    _images(root / "train" / "a", -(-n_train // 2), seed)
    _images(root / "train" / "b", n_train // 2, seed + 1)
    _images(root / "val" / "a", 1, seed + 2)
    _images(root / "val" / "b", 1, seed + 3)
    return root


def _trainer(epoch: int, done: int = 0) -> Any:
    """What the datamodules read of a Lightning trainer: a fit resumed from a checkpoint after
    ``done`` batches of ``epoch`` (``done=0``: an uninterrupted fit)."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=done))
    return SimpleNamespace(ckpt_path="last.ckpt" if done else None, current_epoch=epoch, world_size=1,
                           global_rank=0, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


# -- never a lone last batch ------------------------------------------------------------------
def test_the_lone_last_batch_rule_by_value() -> None:
    assert [drop_last_batch(n, 8) for n in (1, 7, 8, 9, 17, 33, 34, 65)] == [False, False, False, True, True,
                                                                            True, False, True]
    assert not drop_last_batch(1, 1) and not drop_last_batch(7, 7)  # the only batch is never dropped
    # under DDP each rank batches its padded share ceil(n / ranks)
    assert [drop_last_batch(n, 8, shares=2) for n in (33, 34, 35, 18)] == [True, True, False, True]


SIZES = {1: [1], 2: [2], 7: [7], 33: [8] * 4, 34: [8] * 4 + [2], 65: [8] * 8}


@pytest.mark.parametrize("n", sorted(SIZES))
def test_every_datamodule_batches_n_images_alike(n: int, tmp_path: Path) -> None:
    """Labelled, paired (adaptation target, unlabelled of a labelled set) and unlabelled datamodules
    give one set of batch sizes: a lone last image dropped, a short batch of two or more kept."""
    images = _images(tmp_path / "images", n)
    loaders = {
        "unlabelled": UnlabelledDataModule(str(images), image_size=8, batch_size=8, num_workers=0),
        "target": AdaptationDataModule(str(_labelled(tmp_path / "source", 4)), str(images), image_size=8,
                                       batch_size=8, num_workers=0),
        "paired": FolderDataModule(str(_labelled(tmp_path / "paired", 4, seed=7)), unlabelled=str(images),
                                   image_size=8, batch_size=8, num_workers=0),
    }
    if n >= 2:  # a labelled training split needs two classes
        loaders["train"] = FolderDataModule(str(_labelled(tmp_path / "labelled", n)), image_size=8, batch_size=8,
                                            num_workers=0)
    sizes = {}
    for name, dm in loaders.items():
        dm.setup("fit")
        if name == "unlabelled":
            loader = dm.train_dataloader()
        else:
            loader = dm._loader({"target": "target", "paired": "unlabelled", "train": "train"}[name], train=True)
        sizes[name] = [len(batch) for batch in loader.batch_sampler]
    assert sizes == {name: SIZES[n] for name in loaders}


@pytest.mark.parametrize("n", [7, 33, 34])
def test_a_streamed_set_batches_like_the_folder(n: int, tmp_path: Path) -> None:
    pytest.importorskip("litdata", reason="the stream extra (litdata) is part of the dev install")
    from visiontl.data import StreamingDataModule, prepare_data

    root = _labelled(tmp_path / "set", n)
    prepare_data(root, str(tmp_path / "streamed"), num_workers=1)
    stream = StreamingDataModule(str(tmp_path / "streamed"), image_size=8, batch_size=8, num_workers=0)
    streamed = [len(batch["label"]) for batch in stream.train_dataloader()]
    folder = FolderDataModule(str(root), image_size=8, batch_size=8, num_workers=0)
    folder.setup("fit")
    assert streamed == [len(batch) for batch in folder.train_dataloader().batch_sampler] == SIZES[n]


# -- dataset statistics -----------------------------------------------------------------------
def test_statistics_from_sums_by_value() -> None:
    values = np.array([[0.2, 0.5, 3e-6], [0.4, 0.5, 5e-6]])  # 2 pixels x 3 channels
    mean, std = stats_from_sums(values.sum(0), np.square(values).sum(0), 2)
    assert mean == pytest.approx([0.3, 0.5, 4e-6])
    # a constant channel gets std 1 (never divide by zero), but a real spread at the scale of a
    # 32-bit integer image (values near 1e-6) is kept: the test is relative to the mean
    assert std == pytest.approx([0.1, 1.0, 1e-6])
    assert stats_from_sums([0.0], [0.0], [5]) == ([0.0], [1.0])


def test_a_folder_and_its_stream_resolve_the_same_statistics(tmp_path: Path) -> None:
    """16-bit grey images: both measure dataset statistics (one rule decides), the same ones, and
    record the files' bit depth."""
    pytest.importorskip("litdata", reason="the stream extra (litdata) is part of the dev install")
    from visiontl.data import StreamingDataModule, prepare_data

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("val", 1)):
        for cls in ("a", "b"):
            (tmp_path / "set" / split / cls).mkdir(parents=True)
            for i in range(per_class):
                image = rng.integers(0, 4096, (8, 8), dtype=np.uint16)  # 12-bit values in 16-bit files
                Image.fromarray(image).save(tmp_path / "set" / split / cls / f"{i}.png")
    prepare_data(tmp_path / "set", str(tmp_path / "streamed"), num_workers=1)
    folder = FolderDataModule(str(tmp_path / "set"), in_chans=1, image_size=8).preprocessing
    stream = StreamingDataModule(str(tmp_path / "streamed"), in_chans=1, image_size=8).preprocessing
    assert folder.normalization == stream.normalization == "dataset"
    assert folder.bit_depth == stream.bit_depth == 16
    assert stream.mean == pytest.approx(folder.mean, rel=1e-6) and stream.std == pytest.approx(folder.std, rel=1e-6)
    paths = sorted((tmp_path / "set" / "train").rglob("*.png"))
    assert list(folder.mean) == pytest.approx(channel_stats(paths, 1, cache=False)[0])


# -- the folder-or-CSV switch -----------------------------------------------------------------
def test_one_switch_between_a_folder_and_a_csv(tmp_path: Path) -> None:
    folder = _labelled(tmp_path / "looks.csv", 4)  # a folder is a folder whatever its name
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(folder.rglob("*.png"))))
    assert source_kind(folder) == "folder" and source_kind(csv) == "csv"
    assert type(make_datamodule(folder)) is FolderDataModule and type(make_datamodule(csv)) is CsvDataModule
    assert check_data(folder, deep=False).counts["train"] == {"a": 2, "b": 2}
    assert check_data(csv, deep=False).counts["train"] == {"a": 3, "b": 3}
    text = tmp_path / "notes.txt"
    text.write_text("path,label\n")
    for source, said in ((text, "is a file but not a CSV"), (tmp_path / "missing", "does not exist")):
        messages = set()
        for read in (make_datamodule, lambda s: check_data(s, deep=False)):
            with pytest.raises(DataError, match=said) as err:
                read(source)
            messages.add(str(err.value))
        assert len(messages) == 1  # the same words from the library and check-data


def test_prepare_data_takes_the_same_switch(tmp_path: Path) -> None:
    pytest.importorskip("litdata", reason="the stream extra (litdata) is part of the dev install")
    from visiontl.data import prepare_data

    (tmp_path / "notes.txt").write_text("path,label\n")
    with pytest.raises(DataError, match="is a file but not a CSV"):
        prepare_data(tmp_path / "notes.txt", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# -- image scaling ----------------------------------------------------------------------------
def test_integers_scale_by_their_type_dark_or_bright() -> None:
    for dtype in (np.int32, np.uint32, np.uint16, np.uint8):
        top = float(np.iinfo(dtype).max)
        dark = np.array([[[3]], [[200]]], dtype=dtype)
        bright = np.array([[[3]], [[int(top * 0.9)]]], dtype=dtype)
        for image in (dark, bright):  # one factor for both: the type's maximum, not the image's
            np.testing.assert_allclose(to_unit(image), image.astype(np.float64) / top, rtol=1e-6)
    assert to_unit(np.array([[[-5]]], dtype=np.int16)).item() == 0.0  # below the range: clipped
    floats = np.array([[[0.25]], [[7.5]]], dtype=np.float32)
    np.testing.assert_array_equal(to_unit(floats), floats)  # floats keep their values
    rgba = np.full((1, 1, 4), 255, np.uint8)
    assert to_unit(rgba).shape == (1, 1, 3)  # 8-bit alpha dropped
    assert [bit_depth(np.dtype(t)) for t in ("uint8", "uint16", "int32", "uint32", "float64")] == [8, 16, 32, 32, 32]


def test_read_image_is_read_raw_scaled_for_every_kind_of_file(tmp_path: Path) -> None:
    """A dark and a bright file of one bit depth share a scale; Pillow's 32-bit mode for 16-bit
    Netpbm samples stays 16-bit (a dark 16-bit PGM used to be divided by 255, a bright one by 65535)."""
    files = {}
    for name, value in (("dark", 200), ("bright", 60000)):
        image = np.full((4, 4), value, np.uint16)
        image[0, 0] = 7
        Image.fromarray(image).save(tmp_path / f"{name}.pgm")  # opened by Pillow in mode I
        Image.fromarray(image).save(tmp_path / f"{name}16.png")
        tifffile.imwrite(tmp_path / f"{name}32.tif", image.astype(np.int32) * 30000)
        files.update({f"{name}.pgm": 65535, f"{name}16.png": 65535, f"{name}32.tif": 2**31 - 1})
    tifffile.imwrite(tmp_path / "float.tif", np.full((4, 4), 7.5, np.float32))
    Image.fromarray(np.full((4, 4, 4), 128, np.uint8)).save(tmp_path / "rgba.png")
    files.update({"float.tif": 1, "rgba.png": 255})
    for name, top in files.items():
        raw, image = read_raw(tmp_path / name), read_image(tmp_path / name)
        np.testing.assert_array_equal(image, to_unit(raw))
        if name != "rgba.png":
            np.testing.assert_allclose(image, raw.astype(np.float64) / top, rtol=1e-6)
    assert read_raw(tmp_path / "dark.pgm").dtype == np.uint16 and stored_bit_depth([tmp_path / "dark.pgm"]) == 16
    assert stored_bit_depth([tmp_path / "dark32.tif"]) == 32
    from visiontl.deploy import predict

    assert predict.read_image is read_image  # the predictor reads pixels as training does


# -- exact resume -----------------------------------------------------------------------------
def _epoch(dm: Any, epoch: int, done: int = 0) -> list[dict[str, torch.Tensor]]:
    dm.trainer = _trainer(epoch, done)
    loader = dm.train_dataloader()
    if isinstance(loader, torch.utils.data.DataLoader):
        return list(loader)
    iter(loader)
    return [batch for batch, *_ in loader]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_a_resumed_unlabelled_epoch_goes_on_with_the_batches_it_had_left(tmp_path: Path) -> None:
    dm = UnlabelledDataModule(str(_images(tmp_path / "images", 21)), image_size=8, batch_size=4, num_workers=0)
    dm.setup("fit")
    whole = _epoch(dm, epoch=2)
    assert [len(b["index"]) for b in whole] == [4] * 5  # 21 = 5 x 4 + a lone image, dropped
    assert not _same(whole[0], _epoch(dm, epoch=3)[0])  # another epoch, another order
    for done in (1, 3, 4):
        resumed = _epoch(dm, epoch=2, done=done)
        assert len(resumed) == len(whole) - done
        assert all(_same(a, b) for a, b in zip(whole[done:], resumed))  # the same images and views


@pytest.mark.parametrize(("n_source", "n_target"), [(10, 23), (23, 5)])
def test_a_resumed_adaptation_epoch_goes_on_with_the_pairs_it_had_left(n_source: int, n_target: int,
                                                                       tmp_path: Path) -> None:
    """Source and target each skip what they served, the shorter (cycled) one included."""
    dm = AdaptationDataModule(str(_labelled(tmp_path / "source", n_source)),
                              str(_images(tmp_path / "target", n_target, seed=9)), image_size=8, batch_size=4,
                              num_workers=0)
    dm.setup("fit")
    whole = _epoch(dm, epoch=1)
    longest = -(-max(n_source, n_target) // 4)  # the longer side's batches (the shorter's lone last one dropped)
    assert len(whole) == longest
    for done in range(1, longest):
        resumed = _epoch(dm, epoch=1, done=done)
        assert len(resumed) == len(whole) - done
        assert all(_same(a, b) for a, b in zip(whole[done:], resumed))
