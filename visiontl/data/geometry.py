"""The evaluation geometry: how an image becomes the model's input size, the same on every path.

Training-time evaluation, the feature cache, export verification and the torch-free predictor all
call :func:`eval_resize`, so a model sees the same pixels in each of them. The rule:

- an image at least as large as the input (height and width) is resized to
  ``input / crop_pct`` and centre-cropped to the input (timm's ``crop_pct``; ``1.0`` = no crop);
- an image **smaller** than the input is upsampled to the input size and **never cropped**:
  cropping after upsampling cuts off the borders of digits, glyphs and cells that tiny images
  (MNIST-like sets, 28 px patches) have no margin to lose;
- shrinking uses area averaging (no aliasing), enlarging bilinear interpolation: bicubic overshoots
  at the large factors tiny images need (8 px digits to 64 px: a logistic-regression probe on
  EfficientNet-Lite0 features scored 0.858 with bilinear against 0.842 with bicubic).

Torch-free (numpy + OpenCV), so :mod:`visiontl.deploy.predict` can use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = ["INTERPOLATION", "eval_resize", "is_small"]

INTERPOLATION = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


def is_small(shape: Sequence[int], size: tuple[int, int]) -> bool:
    """Whether an image of ``shape`` (H, W, ...) is smaller than the input ``size`` in either side."""
    return int(shape[0]) < size[0] or int(shape[1]) < size[1]


def cv2_resize(image: np.ndarray, height: int, width: int, interpolation: int) -> np.ndarray:
    """``cv2.resize`` to ``height x width`` for any number of channels, the channel axis kept.

    OpenCV drops a single channel axis, and with some interpolations (``INTER_AREA`` at a
    non-integer scale) refuses more than 4 channels; multispectral images go 4 bands at a time.
    """
    channels = image.shape[2] if image.ndim == 3 else None
    if channels is not None and channels > 4:
        return np.concatenate([cv2_resize(image[:, :, c:c + 4], height, width, interpolation)
                               for c in range(0, channels, 4)], axis=2)
    out = cv2.resize(image, (width, height), interpolation=interpolation)
    return out.reshape(height, width, channels) if channels is not None else out


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[0] == height and image.shape[1] == width:
        return image
    shrink = image.shape[0] >= height and image.shape[1] >= width
    return cv2_resize(image, height, width, cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def eval_resize(image: np.ndarray, size: tuple[int, int] | int, crop_pct: float = 1.0) -> np.ndarray:
    """Resize (and centre-crop, for images at least as large as the input) to ``size``.

    Args:
        image: H x W or H x W x C array (any dtype OpenCV resizes: uint8, uint16, float32).
        size: ``(height, width)`` or one side.
        crop_pct: the fraction of the resized image kept by the centre crop (1.0: none).

    Returns:
        The image at ``size`` with its channel axis kept.
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    if crop_pct >= 1 or is_small(image.shape, (height, width)):
        return _resize(image, height, width)
    big_h, big_w = round(height / crop_pct), round(width / crop_pct)
    resized = _resize(image, big_h, big_w)
    top, left = (big_h - height) // 2, (big_w - width) // 2
    return resized[top:top + height, left:left + width]
