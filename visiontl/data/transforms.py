"""Albumentations pipelines built from the backbone's data config, one preset per domain.

Presets only differ in the training augmentations; evaluation is always
:func:`visiontl.data.geometry.eval_resize` (resize, plus a centre crop for natural images that
are not smaller than the input), normalise, to tensor: the same geometry as the feature cache,
export verification and the predictor. Images arrive as float32 HWC in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from visiontl.data.geometry import INTERPOLATION, eval_resize

__all__ = ["PRESETS", "EvalResize", "build_transforms"]

PRESETS = ("natural", "satellite", "xray", "histology", "dermoscopy", "none")


class EvalResize(A.ImageOnlyTransform):
    """:func:`~visiontl.data.geometry.eval_resize` as an albumentations step (evaluation only)."""

    def __init__(self, height: int, width: int, crop_pct: float = 1.0, interpolation: str = "bilinear",
                 p: float = 1.0) -> None:
        super().__init__(p=p)
        self.height, self.width, self.crop_pct, self.interpolation = int(height), int(width), float(crop_pct), \
            interpolation

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return eval_resize(img, (self.height, self.width), self.crop_pct, self.interpolation)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "crop_pct", "interpolation")


def _train_augment(preset: str, size: tuple[int, int], interp: int) -> list[A.BasicTransform]:
    if preset == "natural":
        return [A.RandomResizedCrop(size=size, scale=(0.35, 1.0), interpolation=interp), A.HorizontalFlip()]
    if preset == "satellite":  # overhead imagery: any rotation by 90 degrees and both flips
        return [
            A.RandomResizedCrop(size=size, scale=(0.6, 1.0), ratio=(1.0, 1.0), interpolation=interp),
            A.RandomRotate90(),
            A.HorizontalFlip(),
            A.VerticalFlip(),
        ]
    if preset == "xray":  # anatomy has an up and a left: no vertical flip, small rotations only
        return [
            A.RandomResizedCrop(size=size, scale=(0.7, 1.0), interpolation=interp),
            A.Affine(rotate=(-10, 10), p=0.5),
            A.RandomBrightnessContrast(0.1, 0.1),
        ]
    if preset == "histology":  # no orientation; H&E stain varies between labs and scanners
        return [
            A.RandomResizedCrop(size=size, scale=(0.6, 1.0), ratio=(1.0, 1.0), interpolation=interp),
            A.RandomRotate90(),
            A.HorizontalFlip(),
            A.VerticalFlip(),
            A.HEStain(method="random_preset", intensity_scale_range=(0.85, 1.15),
                      intensity_shift_range=(-0.1, 0.1), p=0.5),
            A.HueSaturationValue(8, 12, 8),
        ]
    if preset == "dermoscopy":  # lesions have no orientation; lighting and camera colour vary
        return [
            A.RandomResizedCrop(size=size, scale=(0.5, 1.0), interpolation=interp),
            A.RandomRotate90(),
            A.HorizontalFlip(),
            A.VerticalFlip(),
            A.RandomBrightnessContrast(0.15, 0.15),
            A.HueSaturationValue(8, 15, 10),
        ]
    if preset == "none":
        return [A.Resize(*size, interpolation=interp)]
    raise ValueError(f"Unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}.")


def build_transforms(
    preset: str,
    train: bool,
    size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
) -> A.Compose:
    """Build a pipeline for training (``train=True``) or evaluation.

    Args:
        preset: ``natural``, ``satellite`` (90-degree rotations, flips; any band count), ``xray``
            (no flips: anatomy has an up and a left), ``histology`` (rotations, flips, H&E stain and
            colour jitter), ``dermoscopy`` (rotations, flips, lighting / colour) or ``none``.
        train: training augmentations when true, deterministic resize otherwise.
        size: output size (int or ``(height, width)``).
        mean: per-channel mean on the ``[0, 1]`` scale.
        std: per-channel standard deviation on the ``[0, 1]`` scale.
        crop_pct: evaluation centre crop fraction (timm's ``crop_pct``) for images not smaller
            than the input; smaller images are upsampled and never cropped.
        interpolation: ``nearest``, ``bilinear`` or ``bicubic``.
    """
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    interp = INTERPOLATION.get(interpolation, cv2.INTER_LINEAR)
    if train:
        steps = _train_augment(preset, hw, interp)
    else:
        _train_augment(preset, hw, interp)  # validates the preset name
        steps = [EvalResize(*hw, crop_pct=crop_pct, interpolation=interpolation)]
    norm = A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0)
    return A.Compose([*steps, norm, ToTensorV2()])
