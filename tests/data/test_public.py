"""Public dataset modules: local files verified, downloads through the real source (faked locally)."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from helpers.fixtures import load_fixture
from visiontl.data import EuroSATDataModule, MedMNISTDataModule
from visiontl.data.images import DataError


def test_eurosat_rgb_and_all_bands_from_local_files(tmp_path: Path) -> None:
    rgb = EuroSATDataModule(str(load_fixture("eurosat").make(tmp_path / "rgb")), val_fraction=0.25)
    assert rgb.class_names == ["AnnualCrop", "Forest", "SeaLake"]
    assert len(rgb.splits["train"]) == 18 and len(rgb.splits["val"]) == 6
    assert rgb.augment == "satellite"
    ms = EuroSATDataModule(str(load_fixture("eurosat_ms").make(tmp_path / "ms")), bands="all", in_chans=13)
    pre = ms.preprocessing
    assert pre.in_chans == 13 and len(pre.mean) == 13  # measured per band
    assert max(pre.mean) < 0.2 and min(pre.std) > 0  # 16-bit reflectances, not ImageNet's 0.45
    with pytest.raises(DataError, match="in_chans: 13"):
        EuroSATDataModule(str(tmp_path / "ms"), bands="all", in_chans=3).preprocessing
    # RGB JPEGs placed where the 13-band release belongs
    wrong = tmp_path / "wrong" / "ds" / "images" / "remote_sensing" / "otherDatasets" / "sentinel_2" / "tif"
    shutil.copytree(tmp_path / "rgb" / "eurosat" / "2750", wrong)
    with pytest.raises(DataError, match="has 3 bands where EuroSAT 'all' has 13"):
        _ = EuroSATDataModule(str(tmp_path / "wrong"), bands="all").splits


def test_eurosat_missing_or_foreign_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"(?s)not found.*eurosat/2750.*download: true.*EuroSAT\.zip"):
        _ = EuroSATDataModule(str(tmp_path / "nowhere")).splits
    root = load_fixture("eurosat").make(tmp_path / "d")
    (root / "eurosat" / "2750" / "Glacier").mkdir()
    shutil.copy(next((root / "eurosat" / "2750" / "Forest").glob("*.jpg")), root / "eurosat" / "2750" / "Glacier")
    with pytest.raises(DataError, match="not EuroSAT classes: Glacier"):
        _ = EuroSATDataModule(str(root)).splits


def test_eurosat_download_goes_through_the_public_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = load_fixture("eurosat_ms").make(tmp_path / "src")
    archive = tmp_path / "EuroSATallBands.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in (source / "ds").rglob("*.tif"):
            zf.write(f, f.relative_to(source))
    calls = []

    def fake_download(url: str, download_root: str, md5: str | None = None, **_: object) -> None:
        calls.append((url, md5))
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(download_root)

    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    dm = EuroSATDataModule(str(tmp_path / "dl"), bands="all", download=True)
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 24
    ((url, md5),) = calls
    assert url.startswith("https://hf.co/datasets/torchgeo/eurosat/") and url.endswith("EuroSATallBands.zip")
    assert md5 == "5ac12b3b2557aa56e1826e981e8e200e"
    _ = EuroSATDataModule(str(tmp_path / "dl"), bands="all", download=True).splits
    assert len(calls) == 1  # found locally the second time: nothing fetched


def test_medmnist_from_npz_official_splits_and_class_names(tmp_path: Path) -> None:
    import medmnist

    root = load_fixture("medmnist").make(tmp_path / "mm")
    dm = MedMNISTDataModule("pathmnist", root=str(root))
    splits = dm.splits
    assert {k: len(v) for k, v in splits.items()} == {"train": 36, "val": 18, "test": 18}
    names = sorted(medmnist.INFO["pathmnist"]["label"].values())
    assert dm.class_names == names
    # the PNGs hold the npz pixels exactly, in the class the label says
    data = np.load(root / "pathmnist.npz")
    path, label = splits["train"][0]
    index = int(path.stem.split("_")[1])
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(path)), data["train_images"][index])
    assert label == medmnist.INFO["pathmnist"]["label"][str(int(data["train_labels"][index, 0]))]
    again = MedMNISTDataModule("pathmnist", root=str(root))
    assert again.splits["train"][0][0] == path  # written once, reused


def test_chestmnist_loads_as_multi_label_with_its_14_findings(tmp_path: Path) -> None:
    """MedMNIST's multi-label set: 0/1 per finding; the tags are the findings in MedMNIST's order, and
    an X-ray without a finding is an image with no tag."""
    import medmnist

    from visiontl.data.multilabel import decode_tags

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 30), ("val", 12), ("test", 12)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        labels = (rng.random((n, 14)) < 0.3).astype(np.uint8)
        labels[0] = 0  # no finding
        labels[1, :] = 1 if split == "train" else labels[1, :]  # every finding once in training
        arrays[f"{split}_labels"] = labels
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    dm = MedMNISTDataModule("chestmnist", root=str(tmp_path))
    findings = [medmnist.INFO["chestmnist"]["label"][str(i)] for i in range(14)]
    assert dm.task == "multilabel" and dm.class_names == findings
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 30, "val": 12, "test": 12}
    path, tags = dm.splits["train"][0]
    assert tags == "|" and decode_tags(dm.splits["train"][1][1])[0] == set(findings)
    index = int(path.stem.split("_")[1])
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(path)), arrays["train_images"][index])
    assert dm.class_counts == arrays["train_labels"].sum(0).tolist()
    (tmp_path / "bad").mkdir()
    np.savez(tmp_path / "bad" / "chestmnist.npz", **{**arrays, "val_labels": arrays["val_labels"] * 2})
    with pytest.raises(DataError, match="expected 0 / 1 per finding"):
        _ = MedMNISTDataModule("chestmnist", root=str(tmp_path / "bad")).splits


def test_medmnist_errors_and_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medmnist
    import torchvision.datasets.utils as tv_utils

    with pytest.raises(DataError, match=r"(?s)pathmnist not found at .*pathmnist\.npz.*zenodo"):
        _ = MedMNISTDataModule("pathmnist", root=str(tmp_path / "none")).splits
    with pytest.raises(DataError, match="Unknown MedMNIST flag 'pathmnst'"):
        _ = MedMNISTDataModule("pathmnst", root=str(tmp_path)).splits
    with pytest.raises(DataError, match=r"chestmnist not found at .*chestmnist\.npz"):  # a multi-label set now
        _ = MedMNISTDataModule("chestmnist", root=str(tmp_path)).splits
    source = load_fixture("medmnist").make(tmp_path / "src") / "pathmnist.npz"
    calls = []

    def fake_download(url: str, root: str, filename: str | None = None, md5: str | None = None) -> None:
        calls.append((url, md5))
        Path(root).mkdir(parents=True, exist_ok=True)  # as torchvision does
        shutil.copy(source, Path(root) / filename)

    monkeypatch.setattr(tv_utils, "download_url", fake_download)
    dm = MedMNISTDataModule("pathmnist", root=str(tmp_path / "dl"), download=True)
    assert len(dm.splits["test"]) == 18
    assert calls == [(medmnist.INFO["pathmnist"]["url"], medmnist.INFO["pathmnist"]["MD5"])]
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "pathmnist.npz", train_images=np.zeros((2, 28, 28, 3), np.uint8))
    with pytest.raises(DataError, match="is not a MedMNIST file"):
        _ = MedMNISTDataModule("pathmnist", root=str(bad)).splits
    np.savez(bad / "pathmnist_64.npz", **{f"{s}_{k}": np.zeros((2, 28, 28, 3) if k == "images" else (2, 1), np.uint8)
                                          for s in ("train", "val", "test") for k in ("images", "labels")})
    with pytest.raises(DataError, match="expected uint8 images of 64x64"):
        _ = MedMNISTDataModule("pathmnist", root=str(bad), size=64).splits
