"""Readers for multiband TIFF and DICOM, dataset statistics, and the inputs the recipes need."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from visiontl.data import CsvDataModule, FolderDataModule, stratified_split
from visiontl.data.images import (
    DataError,
    ImageReadError,
    read_image,
    read_raw,
    scan_images,
)
from visiontl.data.stats import channel_stats, needs_dataset_stats, stored_bit_depth


def _dicom(path: Path, pixels: np.ndarray, **attrs: object) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", pixels.shape[0], pixels.shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


RAMP = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (4, 1))  # 4 x 64, 0..4032


def test_dicom_rescale_window_and_monochrome1_by_value(tmp_path: Path) -> None:
    plain = read_image(_dicom(tmp_path / "plain.dcm", RAMP))
    assert plain.shape == (4, 64, 1) and plain.dtype == np.float32
    assert plain[0, 0, 0] == 0.0 and plain[0, -1, 0] == 1.0  # no window: the image's own range
    # window centre 1000 width 1000 on HU = stored - 1024: [500, 1500] HU -> [0, 1]
    windowed = read_image(_dicom(tmp_path / "w.dcm", RAMP, RescaleSlope=1, RescaleIntercept=-1024,
                                 WindowCenter=1000, WindowWidth=1000))
    hu = RAMP.astype(float) - 1024
    expected = np.clip((hu - 999.5) / 999 + 0.5, 0, 1)
    assert np.allclose(windowed[:, :, 0], expected, atol=1e-6)
    inverted = read_image(_dicom(tmp_path / "m1.dcm", RAMP, PhotometricInterpretation="MONOCHROME1"))
    assert np.allclose(inverted, 1.0 - plain)
    raw = read_raw(tmp_path / "plain.dcm")
    assert raw.dtype == np.uint16 and raw.shape == (4, 64, 1) and int(raw.max()) == 4032


def test_bad_dicoms_name_the_file_and_the_fix(tmp_path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report = FileDataset(str(tmp_path / "sr.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    report.Modality = "SR"
    report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"sr\.dcm.*no pixel data.*SR"):
        read_image(tmp_path / "sr.dcm")
    frames = np.stack([RAMP] * 3)
    multi = _dicom(tmp_path / "multi.dcm", frames.reshape(12, 64), NumberOfFrames=3, Rows=4, Columns=64)
    with pytest.raises(ImageReadError, match=r"multi\.dcm.*3 frames.*frames: middle"):
        read_image(multi)
    # extension-less DICOM files are found by their preamble
    plain = _dicom(tmp_path / "IM0001", RAMP)
    from visiontl.data.images import is_image_file

    assert is_image_file(plain) and not is_image_file(tmp_path / "sr.txt")


@pytest.mark.parametrize("planar", ["separate", "contig"])
def test_multiband_tiff_reads_every_band_in_either_interleave(tmp_path: Path, planar: str) -> None:
    bands = (np.arange(13, dtype=np.uint16)[:, None, None] * 1000 + np.zeros((13, 8, 8), np.uint16))
    data = bands if planar == "separate" else np.moveaxis(bands, 0, 2)
    tifffile.imwrite(tmp_path / "t.tif", data, photometric="minisblack", planarconfig=planar)
    raw = read_raw(tmp_path / "t.tif")
    assert raw.shape == (8, 8, 13) and raw.dtype == np.uint16
    assert [int(raw[0, 0, b]) for b in range(13)] == [1000 * b for b in range(13)]
    image = read_image(tmp_path / "t.tif")
    assert image.dtype == np.float32 and np.isclose(image[0, 0, 12], 12000 / 65535)


def test_band_count_mismatch_is_reported_with_in_chans(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "four.tif", np.zeros((4, 8, 8), np.uint16), photometric="minisblack",
                     planarconfig="separate")
    ((path, reason),) = scan_images([tmp_path / "four.tif"], channels=13)
    assert path.name == "four.tif" and "4 channels" in reason and "13" in reason


def test_dataset_statistics_by_value_and_when_they_apply(tmp_path: Path) -> None:
    from PIL import Image

    paths = []
    for i, value in enumerate((1000, 3000)):
        arr = np.full((4, 4), value, np.uint16)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    mean, std = channel_stats(paths, 1, cache=False)
    assert np.isclose(mean[0], 2000 / 65535) and np.isclose(std[0], 1000 / 65535)
    assert stored_bit_depth(paths) == 16 and needs_dataset_stats(1, stored_bit_depth(paths))  # 16-bit
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    assert stored_bit_depth([tmp_path / "rgb.png"]) == 8 and not needs_dataset_stats(3, 8)
    assert needs_dataset_stats(13, 8) and needs_dataset_stats(1, 32)  # multiband; floats or 32-bit integers
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(flat)
    assert channel_stats([flat], 1, cache=False)[1] == [1.0]  # no spread: never divide by zero


def test_datamodule_uses_dataset_statistics_for_16_bit(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 4096, (8, 8), dtype=np.uint16)).save(tmp_path / c / f"{i}.png")
    dm = FolderDataModule(str(tmp_path), in_chans=1, image_size=8)
    pre = dm.preprocessing
    assert pre.mean[0] == pytest.approx(2048 / 65535, rel=0.1)  # 12-bit values in 16-bit files
    assert pre.normalization == "dataset" and pre.bit_depth == 16 and pre.size == 8
    backbone = FolderDataModule(str(tmp_path), in_chans=1, normalize="backbone").preprocessing
    assert backbone.mean[0] > 0.4 and backbone.normalization == "backbone"
    with pytest.raises(DataError, match="normalize must be"):
        FolderDataModule(str(tmp_path), normalize="imagenet")


def test_group_split_keeps_each_group_on_one_side() -> None:
    samples = [(Path(f"/d/{c}{i}.jpg"), c) for c in "ab" for i in range(12)]
    groups = {p: f"{label}-lesion{int(p.stem[1:]) // 3}" for p, label in samples}
    train, val = stratified_split(samples, 0.25, seed=1, groups=groups)
    assert len(train) + len(val) == 24 and {lbl for _, lbl in val} == {"a", "b"}
    assert not {groups[p] for p, _ in train} & {groups[p] for p, _ in val}
    plain_train, plain_val = stratified_split(samples, 0.25, seed=1)
    assert len(plain_val) == 6 and len(plain_train) == 18


def _ham(tmp_path: Path, missing: int = 0) -> Path:
    from PIL import Image

    rows = []
    for i in range(12):
        image_id = f"ISIC_{i:07d}"
        part = tmp_path / f"part_{1 + i % 2}"
        part.mkdir(exist_ok=True)
        if i >= missing:
            Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(part / f"{image_id}.jpg")
        rows.append({"lesion_id": f"HAM_{i // 2:07d}", "image_id": image_id, "dx": "nv" if i % 4 else "mel"})
    csv_path = tmp_path / "meta.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["lesion_id", "image_id", "dx"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def test_csv_ids_in_several_folders_groups_and_missing_files(tmp_path: Path) -> None:
    csv_path = _ham(tmp_path, missing=2)
    kwargs = {"path_column": "image_id", "label_column": "dx", "suffix": ".jpg", "image_dirs": ["part_1", "part_2"],
              "group_column": "lesion_id"}
    with pytest.raises(DataError, match=r"(?s)2 file\(s\) that do not exist.*ISIC_0000000\.jpg.*line 2.*skip"):
        _ = CsvDataModule(str(csv_path), **kwargs).splits
    dm = CsvDataModule(str(csv_path), on_bad_image="skip", val_fraction=0.3, **kwargs)
    splits = dm.splits
    assert len(splits["train"]) + len(splits["val"]) == 10
    assert [p.name for p, _ in dm.skipped] == ["ISIC_0000000.jpg", "ISIC_0000001.jpg"]
    lesion = dm.groups()
    assert not {lesion[p] for p, _ in splits["train"]} & {lesion[p] for p, _ in splits["val"]}
    with pytest.raises(DataError, match="no column 'patient'"):
        _ = CsvDataModule(str(csv_path), **{**kwargs, "group_column": "patient"}).splits


def test_dicom_folder_with_bad_files_errors_or_skips_and_lists_them(tmp_path: Path) -> None:
    from helpers.fixtures import load_fixture

    gen = load_fixture("dicom")
    root = gen.make(tmp_path)
    bad = gen.make_bad(tmp_path)
    for name, path in bad.items():
        path.rename(root / "abnormal" / f"bad_{name}.dcm")
    with pytest.raises(DataError, match=r"(?s)2 image\(s\) cannot be used.*bad_multiframe\.dcm.*frames: middle"):
        FolderDataModule(str(root), in_chans=1).setup()
    dm = FolderDataModule(str(root), in_chans=1, on_bad_image="skip")
    dm.setup()
    reasons = {p.name: r for p, r in dm.skipped}
    assert set(reasons) == {"bad_no_pixels.dcm", "bad_multiframe.dcm"}  # the JPEG-LS one decodes (dicom extra)
    assert "no pixel data" in reasons["bad_no_pixels.dcm"] and "3 frames" in reasons["bad_multiframe.dcm"]
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 13
    middle = FolderDataModule(str(root), in_chans=1, on_bad_image="skip", frames="middle")
    middle.setup()
    assert {p.name for p, _ in middle.skipped} == {"bad_no_pixels.dcm"}
    assert len(middle.splits["train"]) + len(middle.splits["val"]) == 14
    mean = dm.preprocessing.mean
    assert len(mean) == 1 and 0.05 < mean[0] < 0.95  # measured on the windowed radiographs (16-bit)


def test_setup_runs_the_cheap_data_check_and_stops_on_leakage(tmp_path: Path) -> None:
    csv_path = _ham(tmp_path)
    rows = csv_path.read_text().splitlines()
    val = tmp_path / "val.csv"
    val.write_text("\n".join([rows[0], rows[1], rows[2]]) + "\n")  # two training images again
    kwargs = {"path_column": "image_id", "label_column": "dx", "suffix": ".jpg", "image_dirs": ["part_1", "part_2"]}
    dm = CsvDataModule(str(csv_path), val_csv=str(val), **kwargs)
    with pytest.raises(DataError, match=r"(?s)leakage.*ISIC_0000000.*visiontl check-data"):
        dm.setup()
    ok = CsvDataModule(str(csv_path), **kwargs)
    ok.setup()
    assert ok.data_report is not None and not ok.data_report.errors
    assert ok.data_report.counts["train"] == {"mel": 2, "nv": 7} and sum(ok.data_report.counts["val"].values()) == 3


def test_check_data_reads_a_csv_and_a_folder_exactly_as_the_datamodules_do(tmp_path: Path) -> None:
    """One reader: check-data resolves HAM10000's id column (suffix, several image folders) like
    CsvDataModule, and a root with val/ but no train/ is the same error for both."""
    from visiontl.data.check import check_data
    from visiontl.cli.commands import main

    csv_path = _ham(tmp_path, missing=2)
    kwargs = {"path_column": "image_id", "label_column": "dx", "suffix": ".jpg", "image_dirs": ["part_1", "part_2"]}
    report = check_data(str(csv_path), progress=False, **kwargs)
    unreadable = [f for f in report.errors if f.code == "unreadable"]
    assert report.n_files == 12 and len(unreadable) == 1 and len(unreadable[0].items) == 2  # the 2 missing files
    dm = CsvDataModule(str(csv_path), on_bad_image="skip", **kwargs)
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 10  # the same 10 resolved files
    assert main(["check-data", str(csv_path), "--path-column", "image_id", "--label-column", "dx", "--suffix", ".jpg",
                 "--image-dirs", "part_1", "part_2", "--no-progress", "--json", str(tmp_path / "r.json")]) == 1

    odd = tmp_path / "odd"
    for split in ("val", "test"):
        for label in ("a", "b"):
            (odd / split / label).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(odd / split / label / "x.png")
    with pytest.raises(DataError, match=r"val and test folder\(s\) but no train/ folder"):
        check_data(str(odd), progress=False)
    with pytest.raises(DataError, match=r"val and test folder\(s\) but no train/ folder"):
        FolderDataModule(str(odd)).splits
