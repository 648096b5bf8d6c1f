"""Albumentations pipelines built from the backbone's data config, one preset per domain.

Presets only differ in the training augmentations; evaluation is always resize (+ centre crop
for natural images), normalise, to tensor. Images arrive as float32 HWC in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

__all__ = ["PRESETS", "build_transforms"]

PRESETS = ("natural", "satellite", "xray", "histology", "dermoscopy", "none")

_INTERPOLATION = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


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
        crop_pct: evaluation centre crop fraction (timm's ``crop_pct``); natural preset only.
        interpolation: ``nearest``, ``bilinear`` or ``bicubic``.
    """
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    interp = _INTERPOLATION.get(interpolation, cv2.INTER_LINEAR)
    if train:
        steps = _train_augment(preset, hw, interp)
    elif preset == "natural" and crop_pct < 1.0:
        steps = [
            A.Resize(round(hw[0] / crop_pct), round(hw[1] / crop_pct), interpolation=interp),
            A.CenterCrop(*hw),
        ]
    else:
        _train_augment(preset, hw, interp)  # validates the preset name
        steps = [A.Resize(*hw, interpolation=interp)]
    norm = A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0)
    return A.Compose([*steps, norm, ToTensorV2()])
