"""Pre-resized image cache: decode and resize every image once, to uint8 at training resolution.

For datasets of large files (full-resolution X-rays, big tiles), decoding dominates each epoch.
With ``presize=True`` on a datamodule, every image is decoded once, resized to a square of
``ceil(1.15 * image_size)`` pixels (room for random crops), stored as one memory-mapped uint8
array per split under ``<cache>/presized/`` (keyed by the files' paths, sizes and mtimes, the
size and the channels; :mod:`visiontl.core.cache`: checksummed and written atomically) and read from
there by every later epoch and run. Values are stored on 8 bits: use it for 8-bit images.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from visiontl.core.progress import progress_bar as tqdm  # drawn on a terminal only

from visiontl.core.files import default_cache_dir
from visiontl.data.formats import Frame
from visiontl.data.geometry import cv2_resize
from visiontl.data.images import read_image, to_channels

__all__ = ["presize", "presized_side"]


def presized_side(image_size: int) -> int:
    """Side of the stored square for a training size (15 % margin for random crops)."""
    return int(math.ceil(image_size * 1.15))


def _decode_all(paths: Sequence[Path], side: int, in_chans: int, frames: Sequence[Frame]) -> np.ndarray:
    out = np.empty((len(paths), side, side, in_chans), dtype=np.uint8)
    for i, path in enumerate(tqdm(paths, desc="Pre-resizing images", unit="img", disable=len(paths) < 300,
                                  leave=False)):
        image = to_channels(read_image(path, frame=frames[i]), in_chans, path)
        resized = cv2_resize(image, side, side, cv2.INTER_AREA)
        out[i] = np.round(np.clip(resized, 0, 1) * 255).astype(np.uint8)
    return out


def presize(paths: Sequence[Path], image_size: int, in_chans: int, frames: Sequence[Frame] | None = None,
            cache_root: Path | None = None) -> np.ndarray:
    """Return the pre-resized images of ``paths`` (uint8, N x S x S x C, memory-mapped); ``frames``:
    each path's frame of a multi-frame DICOM (see :func:`visiontl.data.images.expand_frames`)."""
    from visiontl.core.cache import ArrayCache, data_fingerprint

    cache = ArrayCache(cache_root or default_cache_dir() / "presized")
    side = presized_side(image_size)
    frames = list(frames) if frames is not None else ["error"] * len(paths)
    spec = {"kind": "presize", "side": side, "in_chans": in_chans, "data": data_fingerprint(paths)}
    if any(f != "error" for f in frames):
        spec["frames"] = hashlib.sha256(repr(frames).encode()).hexdigest()
    key = cache.key(spec)
    entry, _ = cache.get_or_compute(key, lambda: {"images": _decode_all(paths, side, in_chans, frames)},
                                    info={"images": len(paths), "side": side})
    return entry["images"]
