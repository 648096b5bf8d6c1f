"""Streaming data: ``visiontl prepare-data`` writes LitData shards, StreamingDataModule trains from
them, with a local folder standing in for object storage (LitData's ``local:`` prefix copies the
shards into a cache as it would download them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("litdata", reason="the stream extra (litdata) is part of the dev install")

from visiontl.data import FolderDataModule, StreamingDataModule, prepare_data  # noqa: E402
from visiontl.data.images import DataError, read_image  # noqa: E402
from visiontl.data.streamcodec import decode_image, encode_image  # noqa: E402
from visiontl.data.streaming import META  # noqa: E402


@pytest.fixture(scope="module")
def prepared(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("streamed") / "set"
    prepare_data(shapes_root, str(out), num_workers=1)
    return out


def test_codec_round_trip_by_value() -> None:
    rng = np.random.default_rng(0)
    eight = (rng.integers(0, 256, (5, 7, 3)).astype(np.float32) / 255)
    data, codec, bits = encode_image(eight)
    assert (codec, bits) == ("png", 8)
    np.testing.assert_array_equal(decode_image(data, codec), eight)  # 8-bit sources: exact
    deep = rng.random((6, 4, 1)).astype(np.float32)  # 16-bit / DICOM values: to 1/65535
    data, codec, bits = encode_image(deep)
    assert (codec, bits) == ("png", 16)
    assert np.abs(decode_image(data, codec) - deep).max() <= 0.5 / 65535 + 1e-7
    dark = (rng.integers(0, 4096, (5, 5, 1)) / (2**31 - 1)).astype(np.float32)  # int32 holding 12-bit values
    data, codec, bits = encode_image(dark)
    assert (codec, bits) == ("npy", 32)  # 16 bits would round every value to 0 or 1 / 65535
    np.testing.assert_array_equal(decode_image(data, codec), dark)
    bands = rng.random((4, 4, 13)).astype(np.float32)  # multispectral: .npy
    data, codec, bits = encode_image(bands)
    assert codec == "npy" and decode_image(data, codec).shape == (4, 4, 13)
    with pytest.raises(DataError, match="codec 'webp'"):
        decode_image(b"", "webp")


def test_prepare_writes_splits_counts_and_statistics(shapes_root: Path, prepared: Path) -> None:
    meta = json.loads((prepared / META).read_text())
    folder = FolderDataModule(str(shapes_root))
    assert meta["classes"] == folder.class_names
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert info["n"] == len(folder.splits[split])
        assert info["class_counts"] == [sum(c == name for _, c in folder.splits[split]) for name in folder.class_names]
        assert (prepared / split / "index.json").is_file()
    # per-channel statistics of the training pixels, as numpy computes them on the files
    pixels = np.concatenate([read_image(p).reshape(-1, 3) for p, _ in folder.splits["train"]]).astype(np.float64)
    stats = meta["stats"]["3"]
    np.testing.assert_allclose(stats["mean"], pixels.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats["std"], pixels.std(0), atol=1e-5)
    assert meta["bit_depth"] == 8 and meta["skipped"] == []


def test_streamed_validation_images_equal_the_folder_ones(shapes_root: Path, prepared: Path, tmp_path: Path) -> None:
    stream = StreamingDataModule(f"local:{prepared}", cache_dir=str(tmp_path / "cache"), num_workers=0,
                                 image_size=32)
    folder = FolderDataModule(str(shapes_root), num_workers=0, image_size=32)
    assert stream.class_names == folder.class_names and stream.train_size == 30
    assert stream.resolve_preprocessing() == folder.resolve_preprocessing()
    names = stream.names("val")
    by_name = {Path(p).relative_to(shapes_root).as_posix(): i for i, p in enumerate(folder.paths("val"))}
    seen = []
    for batch in stream.val_dataloader():
        for image, label, index in zip(batch["image"], batch["label"], batch["index"]):
            item = folder.datasets["val"][by_name[names[int(index)]]]
            torch.testing.assert_close(image, item["image"])  # the same pixels through the same transform
            assert int(label) == item["label"]
            seen.append(int(index))
    assert sorted(seen) == list(range(6))  # every validation image once
    assert any((tmp_path / "cache").rglob("*.bin"))  # the shards came through the cache, as from a remote


@pytest.mark.slow  # an end-to-end run: the default tier keeps the by-value tests
@pytest.mark.parametrize("kind", ["gray16", "bands13"])
def test_16_bit_gray_and_multiband_sources_stream_as_the_folder_reads_them(kind: str, tmp_path: Path) -> None:
    """16-bit grey PNGs (stored as 16-bit PNG) and 13-band uint16 TIFFs (stored as .npy) through
    prepare-data: bit depth, channels and statistics recorded, and every streamed validation image
    equal to what the folder datamodule gives for the same file (same transform, same in_chans)."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            (src / split / c).mkdir(parents=True)
            for i in range(n):
                if kind == "gray16":
                    Image.fromarray(rng.integers(0, 65536, (20, 24), dtype=np.uint16)).save(src / split / c / f"{i}.png")
                else:
                    tifffile.imwrite(src / split / c / f"{i}.tif", rng.integers(0, 10000, (13, 20, 24), dtype=np.uint16),
                                     photometric="minisblack", planarconfig="separate")
    meta = prepare_data(src, str(tmp_path / "out"), num_workers=1)
    channels = 1 if kind == "gray16" else 13
    assert meta["bit_depth"] == 16 and meta["channels"] == channels and len(meta["stats"][str(channels)]["mean"]) == channels
    kwargs = {"num_workers": 0, "image_size": 16, "augment": "none"}
    if kind == "bands13":
        kwargs.update(in_chans=13, normalize="dataset")
    stream = StreamingDataModule(str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), **kwargs)
    folder = FolderDataModule(str(src), **kwargs)
    assert stream.resolve_preprocessing().in_chans == folder.resolve_preprocessing().in_chans
    np.testing.assert_allclose(stream.resolve_preprocessing().mean, folder.resolve_preprocessing().mean, atol=1e-4)
    by_name = {Path(p).relative_to(src).as_posix(): i for i, p in enumerate(folder.paths("val"))}
    names, seen = stream.names("val"), 0
    for batch in stream.val_dataloader():
        for image, index in zip(batch["image"], batch["index"]):
            expected = folder.datasets["val"][by_name[names[int(index)]]]["image"]
            assert image.shape == expected.shape and image.shape[0] == (3 if kind == "gray16" else 13)
            # 16-bit values survive storage exactly (PNG 16-bit or .npy): up to float rounding
            torch.testing.assert_close(image, expected, atol=1e-4, rtol=1e-4)
            seen += 1
    assert seen == 4


def test_streamed_training_order_is_seeded_and_labels_follow_the_index(prepared: Path, tmp_path: Path) -> None:
    meta = json.loads((prepared / META).read_text())

    def epoch(seed: int) -> list[int]:
        dm = StreamingDataModule(str(prepared), cache_dir=str(tmp_path / f"c{seed}"), num_workers=0,
                                 image_size=32, batch_size=4, seed=seed)
        dm.resolve_preprocessing()
        order = []
        for batch in dm.train_dataloader():
            assert batch["image"].shape[1:] == (3, 32, 32)
            for label, index in zip(batch["label"].tolist(), batch["index"].tolist()):
                assert label == meta["splits"]["train"]["labels"][index]
                order.append(index)
        return order

    first = epoch(0)
    assert first == epoch(0) and len(set(first)) == len(first) >= 24  # seeded; no image twice
    assert first != sorted(first)  # shuffled


def test_prepare_refuses_to_overwrite_and_stops_on_bad_images(shapes_root: Path, prepared: Path,
                                                              tmp_path: Path) -> None:
    before = sorted(p.relative_to(prepared) for p in prepared.rglob("*"))
    with pytest.raises(DataError, match="already holds a prepared data set"):
        prepare_data(shapes_root, str(prepared))
    assert sorted(p.relative_to(prepared) for p in prepared.rglob("*")) == before
    src = tmp_path / "src"
    shutil.copytree(shapes_root, src)
    bad = src / "discs" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png") as stopped:
        prepare_data(src, str(tmp_path / "out"), num_workers=1)
    assert "worker process stopped" not in str(stopped.value)  # the reader's own reason, not just "missing"
    assert not (tmp_path / "out" / META).exists()  # no finished data set
    meta = prepare_data(src, str(tmp_path / "skip"), num_workers=1, on_bad_image="skip", image_size=16)
    assert [Path(p).name for p, _ in meta["skipped"]] == ["broken.png"]
    assert sum(meta["splits"][s]["n"] for s in meta["splits"]) == 36
    assert meta["stored_short_side"] == 19  # ceil(1.15 * 16): stored smaller than the 32 px sources
    dm = StreamingDataModule(str(tmp_path / "skip"), num_workers=0, image_size=16)
    dm.resolve_preprocessing()
    assert next(iter(dm.val_dataloader()))["image"].shape[-1] == 16
    with pytest.raises(DataError, match="not a data set prepared by `visiontl prepare-data`"):
        StreamingDataModule(str(tmp_path / "out")).class_names


def test_fit_from_a_stream_and_the_cli(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import warnings

    from visiontl.train.finetune import fit_task
    from visiontl.cli.commands import main
    from visiontl.tasks import ClassificationTask

    dm = StreamingDataModule(f"local:{prepared}", cache_dir=str(tmp_path / "cache"), num_workers=0, image_size=32)
    task = ClassificationTask(backbone="test_resnet", num_classes=dm.num_classes, class_names=dm.class_names,
                              pretrained=False, strategy="gradual")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit_task(task, dm, steps=4, out=tmp_path / "runs", name="stream",
                          trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False})
    assert any("no pooled features" in str(w.message) for w in caught)  # LP-FT's fallback is said
    assert 0 <= result.metrics["val_acc"] <= 1 and result.trainer.global_step == 4
    import multiprocessing

    assert multiprocessing.get_start_method(allow_none=True) != "spawn"  # prepare-data put the caller's back
    assert main(["prepare-data", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


_STREAM_FIT = """
import os, signal, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import pytorch_lightning as pl
from visiontl.train.finetune import fit_task
from visiontl.data import StreamingDataModule
from visiontl.tasks import ClassificationTask

prepared, cache, out, name, kill_at, resume = sys.argv[1:6] + [sys.argv[6] == "1"]

class Kill(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind

pl.seed_everything(3)
dm = StreamingDataModule(f"local:{prepared}", cache_dir=cache, num_workers=0, image_size=32, batch_size=8, seed=3)
task = ClassificationTask("test_resnet", num_classes=dm.num_classes, class_names=dm.class_names, pretrained=False,
                          strategy="full", last_every_n_steps=5)
fit_task(task, dm, steps=20, out=out, name=name, ckpt_path="last" if resume else None,
         trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False, "precision": "32-true",
                         "callbacks": [Kill()] if int(kill_at) >= 0 else []})
"""


@pytest.mark.slow
def test_a_killed_streamed_run_resumes_mid_epoch_and_ends_like_an_uninterrupted_one(prepared: Path,
                                                                                      tmp_path: Path) -> None:
    """30 streamed training images, batch 8 (4 batches an epoch, the last of 6): SIGKILL at step 7, in
    epoch 2, resumes from the step-5 last.ckpt (mid-epoch 2), which carries the stream loader's position (LitData's
    state through Lightning's fit loop), with the shards fetched into another cache; the weights end as
    in a run that was never stopped (LitData alone served the resumed epoch's rest twice and refused
    the other cache)."""
    import subprocess
    import sys

    from visiontl.train.resume import resolve_last

    script = tmp_path / "fit.py"
    script.write_text(_STREAM_FIT)

    def fit(name: str, kill_at: int = -1, resume: bool = False) -> int:
        cache = tmp_path / f"cache-{name}-{int(resume)}"  # a resume may fetch the shards into another cache
        done = subprocess.run([sys.executable, str(script), str(prepared), str(cache),
                               str(tmp_path / "runs"), name, str(kill_at), str(int(resume))],
                              capture_output=True, text=True, check=False)
        assert kill_at >= 0 or done.returncode == 0, done.stderr[-3000:]
        return done.returncode

    fit("whole")
    assert fit("killed", kill_at=7) == -9
    ckpt, _ = resolve_last(tmp_path / "runs" / "killed")
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 5
    fit("killed", resume=True)
    whole = torch.load(tmp_path / "runs" / "whole" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "runs" / "killed" / "version_0" / "checkpoints" / "last.ckpt",
                         weights_only=True)
    assert resumed["global_step"] == whole["global_step"] == 20
    for key, value in whole["state_dict"].items():
        if value.is_floating_point():  # CPU float32 kernels, same order of operations
            assert torch.allclose(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6), key


@pytest.mark.slow  # an end-to-end run: the default tier keeps the by-value tests
def test_prepare_data_reads_a_csv_as_check_data_does(shapes_root: Path, tmp_path: Path) -> None:
    """An id column without extension (``--suffix``), resolved against another folder (``--root``):
    the CSV options check-data takes."""
    from visiontl.cli.commands import main

    rows = ["id,diagnosis"] + [f"{p.parent.name}/{p.stem},{p.parent.name}" for p in sorted(shapes_root.rglob("*.png"))]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    args = [str(tmp_path / "labels.csv"), "--path-column", "id", "--label-column", "diagnosis", "--suffix", ".png",
            "--root", str(shapes_root)]
    assert main(["check-data", *args, "--json", str(tmp_path / "report.json")]) == 0
    assert main(["prepare-data", args[0], str(tmp_path / "out"), *args[1:], "--workers", "1"]) == 0
    meta = json.loads((tmp_path / "out" / META).read_text())
    assert meta["classes"] == ["bars", "discs", "squares"]
    assert sum(info["n"] for info in meta["splits"].values()) == 36
