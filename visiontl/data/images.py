"""Reading images into float arrays, and scanning file lists for unreadable images.

Every image becomes ``float32`` HWC in ``[0, 1]`` whatever its bit depth (8-bit, 16-bit, float)
and mode (grayscale, RGB, RGBA, palette), then is converted to the channel count the model wants.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageReadError",
    "is_image_file",
    "read_image",
    "scan_images",
    "to_channels",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class DataError(ValueError):
    """A dataset that cannot be used as given; the message names the path and the fix."""


class ImageReadError(DataError):
    """One image file that cannot be decoded."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"Cannot read image {self.path}: {reason}. Replace or delete the file, or set "
            f"on_bad_image='skip' (--data.init_args.on_bad_image skip) to train without it."
        )


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image extension and is not a hidden file."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image to ``float32`` HWC in ``[0, 1]`` (1 or 3 channels; alpha is dropped).

    Raises:
        ImageReadError: missing, unrecognised, truncated or corrupt file.
    """
    try:
        with Image.open(path) as im:
            im.load()  # full decode: truncated files fail here, not later in a worker
            return _to_array(im)
    except FileNotFoundError as err:
        raise ImageReadError(path, "file not found") from err
    except UnidentifiedImageError as err:
        raise ImageReadError(path, "not a recognised image format") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(path, f"corrupt or truncated ({err})") from err


def _to_array(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im, dtype=np.float32) / 65535.0
    elif im.mode == "I":
        raw = np.asarray(im)
        arr = raw.astype(np.float32) / (65535.0 if raw.max() > 255 else 255.0)
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        top = float(arr.max()) if arr.size else 1.0
        arr = arr / top if top > 1.0 else arr
    elif im.mode in ("L", "1"):
        arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    else:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(np.clip(arr, 0.0, 1.0))


def to_channels(image: np.ndarray, channels: int, path: str | os.PathLike[str] = "") -> np.ndarray:
    """Convert an HWC image to ``channels`` channels (gray -> RGB repeats, RGB -> gray is luma)."""
    have = image.shape[2]
    if have == channels:
        return image
    if have == 1:
        return np.repeat(image, channels, axis=2)
    if have == 3 and channels == 1:
        return (image @ _LUMA)[:, :, None].astype(np.float32)
    raise DataError(
        f"Image {path} has {have} channels but the model expects {channels}; set the model's "
        f"in_chans to {have} or convert the images."
    )


def scan_images(
    paths: Sequence[Path], desc: str = "Checking images", min_for_progress: int = 300
) -> list[tuple[Path, str]]:
    """Decode every file once and return ``(path, reason)`` for those that fail.

    A progress bar is shown for lists of ``min_for_progress`` files or more.
    """
    bad: list[tuple[Path, str]] = []
    for path in tqdm(paths, desc=desc, unit="img", disable=len(paths) < min_for_progress, leave=False):
        try:
            read_image(path)
        except ImageReadError as err:
            bad.append((Path(path), err.reason))
    return bad
