"""How stored pixel values become the ``[0, 1]`` floats a model sees: the one scaling rule.

An integer image is divided by its type's maximum (8-bit / 255, 16-bit / 65535, 32-bit integers /
2**31 - 1...), never by its own maximum: two images of one bit depth share a scale, whatever
their brightness, so a dark image stays dark. Floating-point images keep their values (the
dataset statistics normalise them). The bit depth a :class:`~visiontl.data.preprocessing.Preprocessing`
records is the width of that type. DICOM is the exception, as its header says how to scale it
(:mod:`visiontl.data.formats`).

Numpy only: the ONNX predictor reads images through it without torch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bit_depth", "drop_alpha", "to_unit"]


def bit_depth(dtype: np.dtype) -> int:
    """Bits per stored sample of an image of ``dtype``: the integer width (8, 16, 32, 64), or 32
    for any floating-point type (values kept as they are, not scaled by a range)."""
    dtype = np.dtype(dtype)
    return 32 if dtype.kind == "f" else 8 * dtype.itemsize


def drop_alpha(image: np.ndarray) -> np.ndarray:
    """An 8-bit HWC image without its alpha channel (grey + alpha, RGBA); other images as they are.

    Only 8-bit images carry alpha here (PNG, WebP); two or four bands of a 16-bit or float TIFF
    are data (e.g. RGB + near infrared) and are kept."""
    if image.dtype == np.uint8 and image.shape[2] in (2, 4):
        return image[:, :, : image.shape[2] - 1]
    return image


def to_unit(image: np.ndarray) -> np.ndarray:
    """A stored HWC image as contiguous ``float32``: integers divided by their type's maximum and
    clipped to ``[0, 1]`` (negative values of signed types become 0), floats unchanged, 8-bit
    alpha dropped (:func:`drop_alpha`)."""
    image = drop_alpha(image)
    out = image.astype(np.float32)
    if image.dtype.kind in "ui":
        out = np.clip(out / float(np.iinfo(image.dtype).max), 0.0, 1.0)
    return np.ascontiguousarray(out)
