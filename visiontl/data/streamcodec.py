"""The samples of ``visiontl prepare-data``: an image stored losslessly, and the function LitData's
``optimize`` runs on each listing entry. Kept apart from :mod:`visiontl.data.streaming` so that
its worker processes import numpy, OpenCV and the image readers only (not torch or Lightning).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from visiontl.data.images import DataError, ImageReadError, read_image

__all__ = ["decode_image", "encode_image", "encode_sample", "named_bomb", "read_log"]


# -- the stored image -------------------------------------------------------------------------
def encode_image(image: np.ndarray) -> tuple[bytes, str, int]:
    """A decoded ``float32`` HWC image in [0, 1] as ``(bytes, codec, bits)``: PNG of 8 bits when
    every value is a multiple of 1/255 (8-bit sources: exact), else 16 bits (the value rounded to
    1/65535); 1, 3 or 4 channels as PNG, other band counts as ``.npy``. An image too dark for 16
    bits to hold (its brightest value under 256/65535: a 32-bit integer image holding 16-bit
    values, scaled by its type's range, :mod:`visiontl.data.pixels`) is kept as ``float32``
    ``.npy`` (``bits`` 32), so a streamed set reads what a folder run reads."""
    import cv2

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[:, :, None]
    eight = np.round(np.clip(image, 0, 1) * 255)
    brightest = float(image.max(initial=0))
    if np.abs(eight / 255 - image).max(initial=0) < 1e-6:
        bits, stored = 8, eight.astype(np.uint8)
    elif 0 < brightest < 256 / 65535:
        bits, stored = 32, np.clip(image, 0, 1)
    else:
        bits, stored = 16, np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16)
    if bits != 32 and stored.shape[2] in (1, 3, 4):
        ok, data = cv2.imencode(".png", stored)  # channel order in = channel order out (no BGR swap either way)
        if ok:
            return data.tobytes(), "png", bits
    buf = io.BytesIO()
    np.save(buf, stored, allow_pickle=False)
    return buf.getvalue(), "npy", bits


def decode_image(data: bytes, codec: str) -> np.ndarray:
    """The ``float32`` HWC image in [0, 1] stored by :func:`encode_image`."""
    import cv2

    if codec == "png":
        stored = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if stored is None:
            raise DataError("A streamed sample's PNG bytes do not decode; prepare the data again.")
    elif codec == "npy":
        stored = np.load(io.BytesIO(data), allow_pickle=False)
    else:
        raise DataError(f"A streamed sample has codec {codec!r}, which this visiontl does not read; prepare the data "
                        f"again with this version.")
    if stored.ndim == 2:
        stored = stored[:, :, None]
    if stored.dtype == np.float32:
        return stored
    scale = 255.0 if stored.dtype == np.uint8 else 65535.0
    return stored.astype(np.float32) / scale


def _resize(image: np.ndarray, short_side: int | None) -> np.ndarray:
    import cv2

    from visiontl.data.geometry import cv2_resize

    height, width = image.shape[:2]
    if short_side is None or min(height, width) <= short_side:
        return image
    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2_resize(image, size[1], size[0], cv2.INTER_AREA)


def _stop_flag(log_dir: str) -> Path:
    return Path(log_dir) / "stop"


def named_bomb(err: ImageReadError, max_pixels: int | None) -> ImageReadError:
    """``err`` in :func:`~visiontl.data.images.check_pixels`' words (the size and the pixel limit)
    when Pillow refused the file as a decompression bomb; ``err`` itself otherwise. The header is
    read with Pillow's own limit lifted for that one ``open`` (nothing is decoded)."""
    from PIL import Image

    from visiontl.data.images import check_pixels, pixel_limit

    if not isinstance(err.__cause__, Image.DecompressionBombError):
        return err
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(err.path) as im:
            width, height = im.size
    except Exception:  # noqa: BLE001 - the original reason stands
        return err
    finally:
        Image.MAX_IMAGE_PIXELS = old
    try:
        check_pixels(err.path, height, width, pixel_limit(max_pixels))
    except ImageReadError as named:
        return named
    return err  # allowed by max_pixels, refused by Pillow's own limit: its reason says so


def encode_sample(item: tuple[int, str, int, Any], short_side: int | None, max_pixels: int | None, log_dir: str,
                   skip_bad: bool) -> dict[str, Any] | None:
    """LitData's ``fn``: one listing entry ``(index, path, label, frame)`` -> a stored sample; the
    per-channel sums and anything left out go to this process's log (``log_dir/<pid>.jsonl``).

    It never raises (LitData would print its worker's traceback chain and stop with all of it as
    the message): an unreadable image is logged as ``bad``, any other failure as ``error``, and
    :func:`~visiontl.data.streaming.prepare_data` decides. Without ``skip_bad`` the first of either
    also leaves a stop flag in ``log_dir``, so the remaining entries of every worker pass without
    being decoded (an ``error`` stops it in either mode)."""
    index, path, label, frame = item
    record: dict[str, Any] = {"index": index}
    sample = None
    if _stop_flag(log_dir).exists():
        return None  # the preparation already failed: no work left to do
    try:
        image = read_image(path, max_pixels, frame)
        image = _resize(image if image.ndim == 3 else image[:, :, None], short_side)
        data, codec, bits = encode_image(image)
        pixels = image.reshape(-1, image.shape[-1]).astype(np.float64)
        record.update(channels=int(image.shape[-1]), bits=bits, sum=pixels.sum(0).tolist(),
                      sumsq=(pixels**2).sum(0).tolist(), pixels=len(pixels))
        sample = {"image": data, "codec": codec, "label": int(label), "index": int(index)}
    except ImageReadError as err:
        record["bad"] = named_bomb(err, max_pixels).reason
    except Exception as err:  # noqa: BLE001 - reported by the main process as one line
        record["error"] = f"{path}: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
    if "error" in record or ("bad" in record and not skip_bad):
        _stop_flag(log_dir).touch()
    with open(Path(log_dir) / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    return sample


def read_log(log_dir: Path) -> dict[int, dict[str, Any]]:
    records: dict[int, dict[str, Any]] = {}
    for part in sorted(log_dir.glob("*.jsonl")):
        for line in part.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                records[int(record["index"])] = record
    return records
