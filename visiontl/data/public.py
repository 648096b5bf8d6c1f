"""Public datasets the bundled recipes train on: found locally, verified, downloaded only when asked.

- :class:`EuroSATDataModule`: EuroSAT (Sentinel-2, 10 land-cover classes, 27,000 64x64 tiles),
  RGB JPEGs (torchvision's ``EuroSAT``) or all 13 bands as GeoTIFFs (the official
  ``EuroSATallBands.zip``).
- :class:`MedMNISTDataModule`: a MedMNIST set (PathMNIST, BloodMNIST...) from its ``.npz`` file
  (the ``medmnist`` package's format), written once to PNG files in the visiontl cache so that
  everything else (checks, run directories, export verification) works on real files.

``download=True`` fetches from the dataset's public source with its published MD5; without it,
a missing dataset is an error that says where to put the files. What is found is checked
(layout, classes, bands / shapes) before any training.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from visiontl.core.progress import progress_bar as tqdm  # drawn on a terminal only

from visiontl.core.files import atomic_dir, default_cache_dir
from visiontl.data.multilabel import encode_tags
from visiontl.data.datamodules import ClassificationDataModule
from visiontl.data.layout import Sample, index_folder
from visiontl.data.images import DataError, read_raw

__all__ = ["EUROSAT_CLASSES", "EuroSATDataModule", "MedMNISTDataModule"]

EUROSAT_CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake")

_EUROSAT = {
    "rgb": {  # what torchvision.datasets.EuroSAT downloads and extracts
        "folder": "eurosat/2750",
        "url": "https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/"
               "EuroSAT.zip",
        "md5": "c8fa014336c82ac7804f0398fcb19387",
        "bands": 3,
    },
    "all": {  # the official 13-band GeoTIFF release, as torchgeo mirrors it
        "folder": "ds/images/remote_sensing/otherDatasets/sentinel_2/tif",
        "url": "https://hf.co/datasets/torchgeo/eurosat/resolve/1ce6f1bfb56db63fd91b6ecc466ea67f2509774c/"
               "EuroSATallBands.zip",
        "md5": "5ac12b3b2557aa56e1826e981e8e200e",
        "bands": 13,
    },
}


class EuroSATDataModule(ClassificationDataModule):
    """EuroSAT land cover (Helber et al. 2019; imagery: Copernicus Sentinel-2, free and open).

    Args:
        root: folder holding the extracted dataset: ``root/eurosat/2750/<class>/*.jpg`` (RGB) or
            ``root/ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<class>/*.tif`` (13 bands).
        bands: ``rgb`` (3 bands, 8-bit JPEG) or ``all`` (13 bands, 16-bit GeoTIFF; the model needs
            ``in_chans: 13``; statistics per band are measured on the training tiles).
        download: fetch the archive from its public mirror (MD5-checked) when it is not in ``root``.
        **kwargs: see :class:`~visiontl.data.ClassificationDataModule` (a stratified validation
            split of ``val_fraction`` is drawn, seeded).
    """

    def __init__(self, root: str = "data/eurosat", bands: Literal["rgb", "all"] = "rgb", download: bool = False,
                 **kwargs: Any) -> None:
        if bands not in _EUROSAT:
            raise DataError(f"EuroSAT bands must be 'rgb' or 'all', got {bands!r}.")
        kwargs.setdefault("augment", "satellite")
        super().__init__(**kwargs)
        self.root, self.bands, self.download = root, bands, download

    @property
    def folder(self) -> Path:
        """Where the class folders are expected."""
        return Path(self.root).expanduser() / _EUROSAT[self.bands]["folder"]

    def _fetch(self) -> None:
        spec = _EUROSAT[self.bands]
        root = Path(self.root).expanduser()
        if self.bands == "rgb":
            from torchvision.datasets import EuroSAT

            EuroSAT(str(root), download=True)  # torchvision's own download and MD5 check
        else:
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(spec["url"], str(root), md5=spec["md5"])

    def load_splits(self) -> dict[str, list[Sample]]:
        spec = _EUROSAT[self.bands]
        if not self.folder.is_dir() and self.download:
            self._fetch()
        if not self.folder.is_dir():
            raise DataError(
                f"EuroSAT ({self.bands}) not found: expected class folders in {self.folder}. Set download: true "
                f"(--data.init_args.download true) to fetch it, or download {spec['url']} and unzip it into "
                f"{Path(self.root).expanduser()}."
            )
        samples = index_folder(self.folder)
        unknown = sorted({label for _, label in samples} - set(EUROSAT_CLASSES))
        if unknown:
            raise DataError(
                f"{self.folder} has folders that are not EuroSAT classes: {', '.join(unknown)}. "
                f"Expected some of {', '.join(EUROSAT_CLASSES)}."
            )
        bands = read_raw(samples[0][0]).shape[2]
        if bands != spec["bands"]:
            raise DataError(
                f"{samples[0][0]} has {bands} bands where EuroSAT {self.bands!r} has {spec['bands']}; "
                f"set bands to {'all' if bands == 13 else 'rgb'} or point root at the other release."
            )
        return {"train": samples}

    def check_channels(self, chans: int) -> None:
        want = _EUROSAT[self.bands]["bands"]
        if self.bands == "all" and chans != want:
            raise DataError(
                f"EuroSAT all bands has {want} bands but the model takes {chans}: set the model's "
                f"in_chans: {want} (--model.init_args.in_chans {want}); the pretrained stem is adapted."
            )


def _safe(name: str) -> str:
    return name.replace(os.sep, "-").replace("/", "-").strip() or "unnamed"


class MedMNISTDataModule(ClassificationDataModule):
    """A MedMNIST v2/v3 dataset (Yang et al. 2023, CC BY 4.0 for most sets; see medmnist.com).

    Args:
        flag: the set, as the ``medmnist`` package names it: ``pathmnist``, ``bloodmnist``,
            ``dermamnist``, ``octmnist``, ``pneumoniamnist``, ``breastmnist``, ``tissuemnist``,
            ``organamnist``... (multi-class and binary ones), or ``chestmnist``: 14 findings per
            chest X-ray, a multi-label set (:mod:`visiontl.data.multilabel`; the tags are the
            findings, in MedMNIST's order).
        root: folder holding ``<flag>.npz`` (``<flag>_<size>.npz`` for sizes 64, 128, 224).
        size: image size of the release: 28 (the original), 64, 128 or 224.
        download: fetch the file from Zenodo through the ``medmnist`` package's URL and MD5.
        **kwargs: see :class:`~visiontl.data.ClassificationDataModule`; the official
            train / val / test splits are used.
    """

    def __init__(self, flag: str = "pathmnist", root: str = "data/medmnist", size: int = 28, download: bool = False,
                 **kwargs: Any) -> None:
        if size not in (28, 64, 128, 224):
            raise DataError(f"MedMNIST size must be 28, 64, 128 or 224, got {size}.")
        kwargs.setdefault("augment", "histology")
        super().__init__(**kwargs)
        self.flag, self.root, self.size, self.download = flag.lower(), root, size, download

    @property
    def info(self) -> dict[str, Any]:
        """The ``medmnist`` package's description of the set (labels, URLs, MD5s, task)."""
        try:
            import medmnist
        except ImportError as err:
            raise DataError(
                "MedMNIST needs the medmnist package for its labels and download: pip install 'visiontl[medical]'."
            ) from err
        if self.flag not in medmnist.INFO:
            names = ", ".join(k for k, v in medmnist.INFO.items() if v.get("task") == "multi-class")
            raise DataError(f"Unknown MedMNIST flag {self.flag!r}; multi-class sets: {names}.")
        info = dict(medmnist.INFO[self.flag])
        task = str(info.get("task", ""))
        if task != "multi-class" and not task.startswith(("binary", "multi-label")):
            raise DataError(f"MedMNIST {self.flag} is a {task} task; visiontl classifies one label per image "
                            "(multi-class or binary sets) or several tags (multi-label sets).")
        return info

    @property
    def npz(self) -> Path:
        """The expected ``.npz`` file."""
        name = f"{self.flag}.npz" if self.size == 28 else f"{self.flag}_{self.size}.npz"
        return Path(self.root).expanduser() / name

    def _fetch(self, info: dict[str, Any]) -> None:
        from torchvision.datasets.utils import download_url

        suffix = "" if self.size == 28 else f"_{self.size}"
        download_url(info[f"url{suffix}"], str(self.npz.parent), filename=self.npz.name, md5=info[f"MD5{suffix}"])

    def _verified_arrays(self, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        try:
            data = np.load(self.npz)
            arrays = {s: (data[f"{s}_images"], np.asarray(data[f"{s}_labels"]))
                      for s in ("train", "val", "test")}
            if not self._multilabel:
                arrays = {s: (images, labels.reshape(-1)) for s, (images, labels) in arrays.items()}
        except (OSError, ValueError, KeyError) as err:
            raise DataError(
                f"{self.npz} is not a MedMNIST file ({err}); expected train/val/test _images and _labels arrays. "
                f"Delete it and set download: true, or fetch it again."
            ) from err
        for split, (images, labels) in arrays.items():
            shape = images.shape[1:3]
            if images.dtype != np.uint8 or shape != (self.size, self.size) or len(images) != len(labels):
                raise DataError(
                    f"{self.npz}: {split}_images is {images.dtype} {images.shape} with {len(labels)} labels; "
                    f"expected uint8 images of {self.size}x{self.size}, one label each (is size right?)."
                )
            if self._multilabel:
                if labels.ndim != 2 or labels.shape[1] != len(names) or (len(labels) and not np.isin(labels, (0, 1)).all()):
                    raise DataError(f"{self.npz}: {split}_labels is {labels.shape} with values "
                                    f"{sorted(np.unique(labels).tolist())[:5]}; expected 0 / 1 per finding "
                                    f"({len(names)} for {self.flag}).")
            elif len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
                raise DataError(f"{self.npz}: {split}_labels go outside 0..{len(names) - 1} ({self.flag} classes).")
        return arrays

    def _materialise(self, names: list[str]) -> Path:
        """PNG files per split / class in the cache (once per npz file); returns their folder."""
        stat = self.npz.stat()
        key = hashlib.sha256(f"{self.npz.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = default_cache_dir() / "medmnist" / f"{self.npz.stem}-{key}"
        if (target / "complete").is_file():
            return target
        arrays = self._verified_arrays(names)
        with atomic_dir(target) as tmp:
            total = sum(len(labels) for _, labels in arrays.values())
            with tqdm(total=total, desc=f"Writing {self.flag} images", unit="img", disable=total < 500,
                      leave=False) as bar:
                for split, (images, labels) in arrays.items():
                    rows = []
                    for i, (image, label) in enumerate(zip(images, labels)):
                        # one folder per class; a multi-label split is flat, its tags in tags.csv
                        folder = tmp / split / ("" if self._multilabel else _safe(names[int(label)]))
                        folder.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(image.squeeze()).save(folder / f"{split}_{i:06d}.png")
                        if self._multilabel:
                            rows.append(f"{split}_{i:06d}.png,{encode_tags(n for n, on in zip(names, label) if on)}\n")
                        bar.update()
                    if self._multilabel:
                        (tmp / split / "tags.csv").write_text("file,tags\n" + "".join(rows))
            (tmp / "complete").write_text(str(self.npz))
        return target

    def load_splits(self) -> dict[str, list[Sample]]:
        info = self.info
        names = [_safe(info["label"][k]) for k in sorted(info["label"], key=int)]
        self._multilabel = str(info.get("task", "")).startswith("multi-label")
        self._tags = names if self._multilabel else None
        if not self.npz.is_file() and self.download:
            self._fetch(info)
        if not self.npz.is_file():
            suffix = "" if self.size == 28 else f"_{self.size}"
            raise DataError(
                f"MedMNIST {self.flag} not found at {self.npz}. Set download: true (--data.init_args.download true) "
                f"to fetch it, or download {info[f'url{suffix}']} and save it as {self.npz}."
            )
        folder = self._materialise(names)
        if self._multilabel:
            return {split: [(folder / split / line.split(",", 1)[0], line.split(",", 1)[1])
                            for line in (folder / split / "tags.csv").read_text().splitlines()[1:]]
                    for split in ("train", "val", "test") if (folder / split / "tags.csv").is_file()}
        return {split: index_folder(folder / split) for split in ("train", "val", "test")
                if (folder / split).is_dir()}
