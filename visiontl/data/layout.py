"""Dataset layouts on disk: class-per-folder trees and ``train`` / ``val`` / ``test`` split folders.

Torch-free (numpy and PIL only), so ``visiontl check-data`` starts without loading torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from visiontl.data.images import DataError, is_image_file

__all__ = ["SPLIT_DIRS", "Sample", "index_folder", "list_images", "split_folders"]

Sample = tuple[Path, str]
SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
"""Split name -> the folder names accepted for it."""


def split_folders(root: Path) -> dict[str, Path | None]:
    """The ``train`` / ``val`` / ``test`` folders found directly under ``root`` (None where absent)."""
    return {split: next((root / n for n in names if (root / n).is_dir()), None) for split, names in SPLIT_DIRS.items()}


def list_images(folder: str | os.PathLike[str], what: str = "Image folder", fix: str = "") -> list[Path]:
    """Every image file under ``folder``, recursively, sorted; a :class:`DataError` naming the
    folder (as ``what``) and ``fix`` when it does not exist or holds no image."""
    folder = Path(folder).expanduser()
    tail = f"; {fix}" if fix else ""
    if not folder.is_dir():
        raise DataError(f"{what} {folder} does not exist{tail}.")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise DataError(f"{what} {folder} has no images (searched recursively for .png .jpg .jpeg .tif .tiff .bmp "
                        f".webp .dcm){tail}.")
    return files


def index_folder(root: str | os.PathLike[str]) -> list[Sample]:
    """List ``(image path, class name)`` under ``root/<class>/**``; clear errors for bad trees."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"Data folder {root} does not exist. Point 'root' at a folder with one sub-folder per class.")
    if not root.is_dir():
        raise DataError(
            f"{root} is not a folder. Use a folder with one sub-folder per class, or CsvDataModule for a CSV."
        )
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"Data folder {root} has no class sub-folders; put the images of each class in root/<class name>/."
        )
    samples: list[Sample] = []
    for folder in classes:
        files = list_images(folder, "Class folder", "add images or remove the folder")
        samples.extend((f, folder.name) for f in files)
    return samples
