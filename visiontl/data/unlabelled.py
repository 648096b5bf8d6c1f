"""Unlabelled images as pairs of augmented views, for continued self-supervised pretraining.

Views come from the same albumentations pipeline family as training (OpenCV decoding, any band
count), with SimCLR-style strength: large random crops, flips (plus 90-degree rotations for
overhead imagery and histology, never for X-rays), colour jitter and random grayscale on RGB, and
blur. Normalisation follows the backbone (or per-channel statistics of the images when the
backbone's do not apply, as in :class:`~visiontl.data.ClassificationDataModule`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import numpy as np
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset

from visiontl.data.base import ImageDataModule
from visiontl.data.formats import Frame
from visiontl.data.images import (
    DataError,
    expand_frames,
    read_image,
    to_channels,
)
from visiontl.data.layout import list_images
from visiontl.data.preprocessing import Preprocessing
from visiontl.data.sampling import sample_seed

__all__ = ["UnlabelledDataModule", "ViewsDataset", "ssl_transform"]

_ROTATING = ("satellite", "histology", "dermoscopy")


def ssl_transform(preset: str, size: int, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """One random view: crop 0.2-1 of the image, flips (rotations where orientation is arbitrary),
    colour jitter / grayscale (3-channel images only) and blur."""
    steps: list[A.BasicTransform] = [A.RandomResizedCrop(size=(size, size), scale=(0.2, 1.0))]
    if preset != "xray":
        steps.append(A.HorizontalFlip())
    if preset in _ROTATING:
        steps += [A.VerticalFlip(), A.RandomRotate90()]
    if len(mean) == 3 and preset != "xray":
        steps += [A.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), A.ToGray(p=0.2)]
    elif preset == "xray":
        steps.append(A.RandomBrightnessContrast(0.3, 0.3, p=0.8))
    steps.append(A.GaussianBlur(blur_limit=(3, 7), p=0.5))
    return A.Compose([*steps, A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0), ToTensorV2()])


class ViewsDataset(Dataset):
    """Items ``{"view1", "view2", "index"}``: two independent random views of each image (``frames``:
    each path's frame of a multi-frame DICOM, see :func:`visiontl.data.images.expand_frames`).

    Indices may carry the epoch (``epoch * len + index``, as the training loader's
    :class:`~visiontl.data.sampling.EpochSampler` sends them); with ``seed``, the views are drawn
    from a generator seeded per (seed, epoch, image), so a resumed run draws the same views."""

    def __init__(self, paths: Sequence[Path], transform: Any, in_chans: int,
                 frames: Sequence[Frame] | None = None, seed: int | None = None) -> None:
        self.paths, self.transform, self.in_chans, self.seed = list(paths), transform, in_chans, seed
        self.frames: list[Frame] = list(frames) if frames is not None else ["error"] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, index = divmod(int(index), len(self.paths))
        if self.seed is not None:
            self.transform.set_random_seed(sample_seed(self.seed, epoch, index))
        path = self.paths[index]
        image = to_channels(read_image(path, frame=self.frames[index]), self.in_chans, path)
        if image.dtype != np.float32:
            image = image.astype(np.float32)
        return {"view1": self.transform(image=image)["image"], "view2": self.transform(image=image)["image"],
                "index": index}


class UnlabelledDataModule(ImageDataModule):
    """Every image under ``root`` (recursively; folder names are ignored), as pairs of views.

    Args:
        root: folder of unlabelled domain images.
        image_size: view size (default: the backbone's).
        augment: ``natural``, ``satellite``, ``xray``, ``histology`` or ``dermoscopy`` (which
            geometric and colour changes leave the content intact).
        batch_size: images per batch (pairs of views; contrastive losses like large batches).
        num_workers: loader processes (``None``: chosen for the machine).
        in_chans: channels fed to the model (``None``: the model's).
        normalize: ``auto`` / ``backbone`` / ``dataset``, as for the labelled datamodules.
        on_bad_image: ``error`` or ``skip`` unreadable files (listed in ``skipped``).
        frames: multi-frame DICOMs: ``error``, their ``middle`` frame, or ``all`` frames as images.
        seed: seed of the order (per epoch: a run resumed mid-epoch goes on with the rest of it) and
            of the views.
    """

    def __init__(self, root: str, image_size: int | None = None, augment: str = "natural",
                 batch_size: int | None = None, num_workers: int | None = None, in_chans: int | None = None,
                 normalize: Literal["auto", "backbone", "dataset"] = "auto",
                 on_bad_image: Literal["error", "skip"] = "error",
                 frames: Literal["error", "middle", "all"] = "error", seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, image_size=image_size, augment=augment,
                         on_bad_image=on_bad_image, normalize=normalize, in_chans=in_chans, frames=frames)
        self.root = root
        self.seed = seed
        self._files: list[Path] | None = None
        self.dataset: ViewsDataset | None = None

    num_classes = None  # no labels: the command line links these into any task; SSL ignores them
    class_names = None

    def paths(self) -> list[Path]:
        """Every image file under ``root`` (recursively)."""
        return list_images(self.root, "Unlabelled image folder")

    def train_paths(self) -> list[Path]:
        if self._files is None:
            self._files = self.paths()
        return self._files

    def drop_bad(self, bad: set[Path]) -> None:
        self._files = [p for p in self.train_paths() if p not in bad]
        if not self._files:
            raise DataError(f"Every image under {self.root} was unreadable; nothing left to train on.")

    def build_datasets(self, pre: Preprocessing) -> None:
        refs = expand_frames([(p, None) for p in self.train_paths()], self.frames)
        self.dataset = ViewsDataset([p for p, _, _ in refs], ssl_transform(self.augment, pre.size, pre.mean, pre.std),
                                    pre.in_chans, frames=[f for _, _, f in refs], seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        """List the images (a missing or empty folder fails here); called on its own (no Trainer),
        also resolve preprocessing and check every image (in a run, the task's
        :class:`~visiontl.tasks.link.DataLink` does that next)."""
        self.train_paths()
        if self.trainer is None:
            self.resolve_preprocessing()

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            pre = self.preprocessing  # resolving it for the first time builds the dataset
            if self.dataset is None:
                self.build_datasets(pre)
        assert self.dataset is not None
        loader = self.train_loader(self.dataset, self.loader_batch_size(len(self.dataset), len(self.dataset), cap=64))
        self.skip_resumed(loader)
        return loader


class BlueMarbleUnlabelledDataModule(UnlabelledDataModule):
    """Unlabelled Blue Marble or shaded-relief tiles (built once, offline), for continued
    pretraining on a rendering before few-label fine-tuning on it.

    Args:
        per_class: tiles per class drawn (their labels are not used).
        source: ``shadedrelief`` or ``bmng``.
        tile_px: tile side in the mosaic's pixels.
        seed: which tiles are drawn.
        **kwargs: see :class:`UnlabelledDataModule` (``root`` is built here).
    """

    def __init__(self, per_class: int = 200, source: str = "shadedrelief", tile_px: int = 32, seed: int = 0,
                 **kwargs: Any) -> None:
        kwargs.setdefault("augment", "satellite")
        super().__init__(root="", **kwargs)
        self.per_class, self.source, self.tile_px, self.seed = per_class, source, tile_px, seed

    def paths(self) -> list[Path]:
        from visiontl.core.files import default_cache_dir
        from visiontl.data.bluemarble import build_tiles

        name = f"bluemarble-unlabelled-{self.source}-{self.tile_px}px-{self.per_class}-{self.seed}"
        folder = default_cache_dir() / name
        self.root = str(build_tiles(folder, splits={"images": self.per_class}, source=self.source,
                                    tile_px=self.tile_px, seed=self.seed))
        return super().paths()
