"""Per-channel normalisation statistics of a training set, for data ImageNet's do not describe.

A backbone's mean / std describe 8-bit RGB photographs. Thirteen Sentinel-2 bands scaled from
16-bit, or a 12-bit radiograph, sit elsewhere entirely; normalising them with ImageNet's numbers
leaves the inputs far from what the first layer expects. :func:`channel_stats` measures mean and
standard deviation per channel on (up to ``max_images`` of) the training images as the model will
read them, and keeps the result in the visiontl cache keyed by the files (path, size, mtime), so
the scan happens once per dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from visiontl.core.progress import progress_bar as tqdm  # drawn on a terminal only

from visiontl.core.files import default_cache_dir, write_json
from visiontl.data.formats import Frame
from visiontl.data.images import DataError, ImageReadError, read_image, read_raw, to_channels
from visiontl.data.pixels import bit_depth

__all__ = ["channel_stats", "needs_dataset_stats", "stats_from_sums", "stored_bit_depth"]


def stored_bit_depth(paths: Sequence[Path], probe: int = 4, frame: Frame = "error") -> int:
    """Bits per stored sample of the first ``probe`` readable images (:func:`visiontl.data.pixels.bit_depth`):
    8, the integer width above that (16 for 16-bit PNG / TIFF and DICOM), or 32 for floating-point images."""
    depth = 8
    for path in list(paths)[:probe]:
        try:
            raw = read_raw(path, frame=frame)
        except ImageReadError:
            continue  # reported by the image check
        depth = max(depth, bit_depth(raw.dtype))
    return depth


def needs_dataset_stats(channels: int, depth: int) -> bool:
    """Whether ImageNet-style statistics do not apply to images of ``channels`` channels stored with
    ``depth`` bits (:func:`stored_bit_depth`): more than 3 channels, or more than 8 bits (16-bit PNG /
    TIFF, DICOM, 32-bit integers) or floats. What ``normalize='auto'`` decides by, for every datamodule."""
    return channels > 3 or depth > 8


def stats_from_sums(total: Sequence[float], squares: Sequence[float],
                    count: float | Sequence[float]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation from the sums of values and of squared values over
    ``count`` pixels (per channel, or one count for all).

    A channel without spread gets std 1, so normalising never divides by zero: one whose std is at
    most a millionth of its mean's magnitude (the rounding left by ``E[x^2] - E[x]^2`` on a constant
    channel is far below that). The test is relative, not absolute: 32-bit integer images scaled by
    their type's range hold values near 1e-5 and keep their real spread."""
    count = np.asarray(count, dtype=np.float64)
    mean = np.asarray(total, dtype=np.float64) / count
    std = np.sqrt(np.maximum(np.asarray(squares, dtype=np.float64) / count - np.square(mean), 0.0))
    std = np.where(std > 1e-6 * np.abs(mean), std, 1.0)
    return [float(v) for v in mean], [float(v) for v in std]


def _key(paths: Sequence[Path], channels: int, max_images: int, frame: Frame) -> str:
    tag = f"v1:{channels}:{max_images}" + (f":frame-{frame}" if frame != "error" else "")
    digest = hashlib.sha256(tag.encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def channel_stats(
    paths: Sequence[Path], channels: int, max_images: int = 1000, cache: bool = True, frame: Frame = "error"
) -> tuple[list[float], list[float]]:
    """Mean and standard deviation per channel over the pixels of ``paths`` (evenly sampled down to
    ``max_images``), read with :func:`read_image` and converted to ``channels`` (``frame``: which
    frame of a multi-frame DICOM stands for it).

    Unreadable files are skipped (the datamodule's image check reports them). A channel with no
    spread gets std 1 so normalising never divides by zero.
    """
    paths = [Path(p) for p in paths]
    if len(paths) > max_images:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max_images).round().astype(int)]
    target = default_cache_dir() / "stats" / f"{_key(paths, channels, max_images, frame)}.json" if cache else None
    if target is not None and target.is_file():
        try:
            saved = json.loads(target.read_text())
            return [float(v) for v in saved["mean"]], [float(v) for v in saved["std"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # damaged: measured again and rewritten
    total = np.zeros(channels)
    squares = np.zeros(channels)
    count = 0
    last_error: Exception | None = None
    for path in tqdm(paths, desc="Dataset statistics", unit="img", disable=len(paths) < 200, leave=False):
        try:
            image = to_channels(read_image(path, frame=frame), channels, path).astype(np.float64)
        except (ImageReadError, ValueError) as err:
            last_error = err
            continue
        flat = image.reshape(-1, channels)
        total += flat.sum(axis=0)
        squares += np.square(flat).sum(axis=0)
        count += flat.shape[0]
    if count == 0:
        raise DataError(f"No training image could be measured for normalisation statistics; the last one "
                        f"failed with: {last_error}")
    result = stats_from_sums(total, squares, count)
    if target is not None:
        write_json(target, {"mean": result[0], "std": result[1], "images": len(paths), "channels": channels})
    return result
