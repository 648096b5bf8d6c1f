"""Reading images into float arrays, and scanning file lists for unreadable images.

Every image becomes ``float32`` HWC whatever its format and bit depth, then is converted to the
channel count the model wants. Integer pixels are scaled by their type's range (8-bit / 255,
16-bit / 65535, 32-bit / 2**31 - 1) into ``[0, 1]`` by :func:`visiontl.data.pixels.to_unit`, the
one scaling rule: :func:`read_image` is :func:`read_raw` scaled by it (Pillow's colour modes
converted to RGB or grey first); DICOM goes through its rescale and window (see
:mod:`visiontl.data.formats`); multiband (Geo)TIFFs keep every band, and float images (e.g.
reflectances) keep their values, for the dataset statistics to normalise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError
from visiontl.core.progress import progress_bar as tqdm  # drawn on a terminal only

from visiontl.core.errors import UserError
from visiontl.core.extras import MissingExtraError
from visiontl.data.formats import (
    DICOM_EXTENSIONS,
    FRAMES,
    TIFF_EXTENSIONS,
    FormatError,
    Frame,
    dicom_frames,
    is_dicom,
    read_dicom,
    read_dicom_raw,
    read_tiff_raw,
)
from visiontl.data.pixels import to_unit

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageReadError",
    "bad_image_line",
    "check_frames",
    "expand_frames",
    "scan_frame",
    "is_image_file",
    "check_pixels",
    "pixel_limit",
    "read_image",
    "read_raw",
    "scan_images",
    "to_channels",
]

IMAGE_EXTENSIONS = (
    frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm"}) | TIFF_EXTENSIONS | DICOM_EXTENSIONS
)

T = TypeVar("T")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class DataError(UserError):
    """A dataset that cannot be used as given; the message names the path and the fix."""


class ImageReadError(DataError):
    """One image file that cannot be decoded."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason.rstrip(".")
        head = self.reason if str(self.path) in self.reason else f"Cannot read image {self.path}: {self.reason}"
        super().__init__(
            f"{head}. Replace or delete the file, or set "
            f"on_bad_image='skip' (--data.init_args.on_bad_image skip) to train without it."
        )


def bad_image_line(path: str | os.PathLike[str], reason: str) -> str:
    """``path: reason`` for listings of bad files; just the reason when it names the file already."""
    return reason if str(path) in reason else f"{path}: {reason}"


def pixel_limit(max_pixels: int | None = None) -> int | None:
    """The largest image (height x width) visiontl decodes: ``max_pixels`` if given, else the
    ``VISIONTL_MAX_PIXELS`` environment variable, else Pillow's decompression-bomb limit (twice
    ``PIL.Image.MAX_IMAGE_PIXELS``, about 179 Mpx). Larger files are bad images: named, skipped
    under ``on_bad_image: skip``, reported by check-data and listed by predict-onnx."""
    if max_pixels is not None:
        return int(max_pixels)
    env = os.environ.get("VISIONTL_MAX_PIXELS", "").strip()
    if env:
        try:
            return int(float(env))
        except ValueError as err:
            raise DataError(f"VISIONTL_MAX_PIXELS={env!r} is not a number of pixels (e.g. 200000000).") from err
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


def check_pixels(path: str | os.PathLike[str], height: int, width: int, max_pixels: int | None = None) -> None:
    """Raise :class:`ImageReadError` for an image of more pixels than :func:`pixel_limit` allows,
    from its header, before anything is decoded."""
    limit = pixel_limit(max_pixels)
    if limit and int(height) * int(width) > limit:
        raise ImageReadError(
            path, f"{width} x {height} px ({int(height) * int(width) / 1e6:,.0f} Mpx) is above the "
            f"{limit / 1e6:,.0f} Mpx limit: a decompression bomb, or far more pixels than a model input needs. "
            f"Downscale it, or allow it with max_pixels / VISIONTL_MAX_PIXELS (Pillow formats also need "
            f"PIL.Image.MAX_IMAGE_PIXELS raised)"
        )


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image extension (or is an extension-less DICOM) and is not hidden."""
    if path.name.startswith("."):
        return False
    return path.suffix.lower() in IMAGE_EXTENSIONS or (not path.suffix and is_dicom(path))


def check_frames(frames: str) -> str:
    """Validate a ``frames`` option (:data:`visiontl.data.formats.FRAMES`)."""
    if frames not in FRAMES:
        raise DataError(
            f"frames must be one of {', '.join(FRAMES)} (what to do with multi-frame DICOMs), got {frames!r}."
        )
    return frames


def expand_frames(samples: Sequence[tuple[Path, T]], frames: str) -> list[tuple[Path, T, Frame]]:
    """``(path, x, frame)`` for each sample under the ``frames`` option: ``all`` gives one entry per
    frame of each multi-frame DICOM (frame indices from 0), ``middle`` and ``error`` one entry per
    file. A header that cannot be read counts as one frame: reading the image reports it."""
    check_frames(frames)
    if frames != "all":
        return [(path, x, frames) for path, x in samples]
    out: list[tuple[Path, T, Frame]] = []
    for path, x in samples:
        count = 1
        if is_dicom(path):
            try:
                count = dicom_frames(path)
            except (FormatError, OSError):
                count = 1
        out.extend([(path, x, "middle")] if count == 1 else [(path, x, i) for i in range(count)])
    return out


def scan_frame(frames: str) -> Frame:
    """The frame a file check decodes under a ``frames`` option (``all``: the middle one)."""
    return "middle" if check_frames(frames) == "all" else frames


def _decoded(path: str | os.PathLike[str], read, max_pixels: int | None = None,  # noqa: ANN001, ANN202
             frame: Frame = "error"):
    """Run ``read(path, max_pixels, frame)``, turning every decoding failure into an :class:`ImageReadError`."""
    try:
        return read(path, max_pixels, frame)
    except (ImageReadError, MissingExtraError):  # a missing library is not a bad image: it names the extra
        raise
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"refused by Pillow as a decompression bomb ({err})") from err
    except FileNotFoundError as err:
        raise ImageReadError(path, "file not found") from err
    except UnidentifiedImageError as err:
        raise ImageReadError(path, "not a recognised image format") from err
    except FormatError as err:
        raise ImageReadError(path, str(err)) from err
    except (OSError, SyntaxError, ValueError, KeyError, IndexError) as err:
        raise ImageReadError(path, f"corrupt or truncated ({type(err).__name__}: {err})") from err


def read_raw(path: str | os.PathLike[str], max_pixels: int | None = None, frame: Frame = "error") -> np.ndarray:
    """Decode an image to its native dtype (``uint8``, ``uint16``, ``int32``, ``float32``...) as HWC,
    with every channel it has (alpha included): what :func:`visiontl.data.check` inspects.
    ``frame`` picks a multi-frame DICOM's frame (an index, ``"middle"``; ``"error"`` refuses one).

    Raises:
        ImageReadError: missing, unrecognised, truncated or corrupt file, or more pixels than
            :func:`pixel_limit`.
    """
    if Path(path).suffix.lower() in TIFF_EXTENSIONS:
        return _decoded(path, _tiff, max_pixels)
    if is_dicom(path):
        return _decoded(path, _dicom_raw, max_pixels, frame)
    return _decoded(path, _pil_raw, max_pixels)


def _tiff(path: str | os.PathLike[str], max_pixels: int | None, frame: Frame = "error") -> np.ndarray:
    return read_tiff_raw(path, on_shape=lambda h, w: check_pixels(path, h, w, max_pixels))


def _dicom_raw(path: str | os.PathLike[str], max_pixels: int | None, frame: Frame = "error") -> np.ndarray:
    return read_dicom_raw(path, on_shape=lambda h, w: check_pixels(path, h, w, max_pixels), frame=frame)


def _dicom(path: str | os.PathLike[str], max_pixels: int | None, frame: Frame = "error") -> np.ndarray:
    return read_dicom(path, on_shape=lambda h, w: check_pixels(path, h, w, max_pixels), frame=frame)


_SIXTEEN_BIT = frozenset({"PNG", "PPM"})
"""Pillow formats whose integer samples have at most 16 bits (PNG; Netpbm, whose ``maxval`` is
below 65536 and which Pillow scales to 65535), though Pillow may hold them in 32-bit mode ``I``."""


def _pil_raw(path: str | os.PathLike[str], max_pixels: int | None = None, frame: Frame = "error") -> np.ndarray:
    with Image.open(path) as im:
        check_pixels(path, im.height, im.width, max_pixels)
        im.load()
        if im.mode in ("P", "1"):
            im = im.convert("RGBA" if "transparency" in im.info else "L")
        return _stored(im)


def _stored(im: Image.Image) -> np.ndarray:
    """The samples of a decoded Pillow image as HWC in their stored type: 16-bit samples held in
    mode ``I`` (Netpbm files above 8 bits; PNG on older Pillow) are ``uint16`` again, so they are
    scaled as 16-bit, not 32-bit, integers."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format in _SIXTEEN_BIT):
        arr = arr.astype(np.uint16)
    return arr[:, :, None] if arr.ndim == 2 else arr


def read_image(path: str | os.PathLike[str], max_pixels: int | None = None, frame: Frame = "error") -> np.ndarray:
    """Decode an image to ``float32`` HWC (see the module docstring; alpha is dropped).
    ``frame`` picks a multi-frame DICOM's frame (an index, ``"middle"``; ``"error"`` refuses one).

    Raises:
        ImageReadError: missing, unrecognised, truncated or corrupt file, or more pixels than
            :func:`pixel_limit` (checked from the header, before decoding).
    """
    if Path(path).suffix.lower() in TIFF_EXTENSIONS:
        return to_unit(_decoded(path, _tiff, max_pixels))
    if is_dicom(path):
        return _decoded(path, _dicom, max_pixels, frame)
    return _decoded(path, _pil_float, max_pixels)


def _pil_float(path: str | os.PathLike[str], max_pixels: int | None = None, frame: Frame = "error") -> np.ndarray:
    with Image.open(path) as im:
        check_pixels(path, im.height, im.width, max_pixels)
        im.load()  # full decode: truncated files fail here, not later in a worker
        if im.mode.startswith("I") or im.mode == "F":  # one band deeper than 8 bits: scaled by its type
            return to_unit(_stored(im))
        # 8-bit modes through Pillow's own conversions (palette, CMYK, YCbCr; alpha dropped)
        return to_unit(_stored(im.convert("L" if im.mode in ("L", "1") else "RGB")))


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
        f"Image {path} has {have} channels (bands) but the model expects {channels}; set the model's "
        f"in_chans to {have} (--model.init_args.in_chans {have}) if every image has {have}, or remove / "
        f"convert this one (on_bad_image='skip' trains without it)."
    )


def scan_images(
    paths: Sequence[Path], desc: str = "Checking images", min_for_progress: int = 300, channels: int | None = None,
    max_pixels: int | None = None, frames: str = "error",
) -> list[tuple[Path, str]]:
    """Decode every file once and return ``(path, reason)`` for those that fail, or, with
    ``channels``, that cannot be converted to that many channels (a 4-band TIFF for a 13-band model).
    ``frames``: the multi-frame option (:data:`~visiontl.data.formats.FRAMES`); under ``all`` a
    multi-frame DICOM is checked by its header and middle frame.

    A progress bar is shown for lists of ``min_for_progress`` files or more.
    """
    bad: list[tuple[Path, str]] = []
    frame = scan_frame(frames)
    for path in tqdm(paths, desc=desc, unit="img", disable=len(paths) < min_for_progress, leave=False):
        try:
            image = read_image(path, max_pixels, frame)
            if channels is not None:
                to_channels(image, channels, path)
        except ImageReadError as err:
            bad.append((Path(path), err.reason))
        except DataError:
            bad.append((Path(path), f"has {image.shape[2]} channels, the model expects {channels} (in_chans)"))
    return bad
