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

from visiontl.data.geometry import INTERPOLATION, eval_resize, is_small

__all__ = ["PRESETS", "EvalResize", "SizeAwareCrop", "build_transforms"]

PRESETS = ("natural", "satellite", "xray", "histology", "dermoscopy", "none")


class EvalResize(A.ImageOnlyTransform):
    """:func:`~visiontl.data.geometry.eval_resize` as an albumentations step (evaluation only)."""

    def __init__(self, height: int, width: int, crop_pct: float = 1.0, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.height, self.width, self.crop_pct = int(height), int(width), float(crop_pct)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return eval_resize(img, (self.height, self.width), self.crop_pct)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "crop_pct")


class SizeAwareCrop(A.ImageOnlyTransform):
    """The preset's random crop for images at least as large as the input; for smaller ones a mild
    crop (at least ``small_scale`` of the area, near-square, bilinear): a crop of a third of an
    8 px digit keeps almost nothing of it, and on such data it cost 5 points against no crop."""

    def __init__(self, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                 interpolation: int = cv2.INTER_LINEAR, small_scale: float = 0.85, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.height, self.width = int(height), int(width)
        self.scale, self.ratio, self.interpolation, self.small_scale = tuple(scale), tuple(ratio), interpolation, \
            float(small_scale)
        self._large = A.RandomResizedCrop(size=(self.height, self.width), scale=self.scale, ratio=self.ratio,
                                          interpolation=interpolation)
        self._small = A.RandomResizedCrop(size=(self.height, self.width), scale=(self.small_scale, 1.0),
                                          ratio=(0.9, 1.1), interpolation=cv2.INTER_LINEAR)

    def set_random_state(self, random_generator: np.random.Generator, py_random: Any) -> None:
        super().set_random_state(random_generator, py_random)  # Compose seeds its children: pass it on
        for crop in (self._large, self._small):
            crop.set_random_state(random_generator, py_random)

    def set_random_seed(self, seed: int | None) -> None:
        super().set_random_seed(seed)
        for crop in (getattr(self, "_large", None), getattr(self, "_small", None)):
            if crop is not None:
                crop.set_random_seed(seed)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        crop = self._small if is_small(img.shape, (self.height, self.width)) else self._large
        return crop(image=img)["image"]

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "scale", "ratio", "interpolation", "small_scale")


def _crop(size: tuple[int, int], scale: tuple[float, float], interp: int, square: bool = False) -> SizeAwareCrop:
    return SizeAwareCrop(*size, scale=scale, ratio=(1.0, 1.0) if square else (3 / 4, 4 / 3), interpolation=interp)


def _train_augment(preset: str, size: tuple[int, int], interp: int) -> list[A.BasicTransform]:
    if preset == "natural":
        return [_crop(size, (0.35, 1.0), interp), A.HorizontalFlip()]
    if preset == "satellite":  # overhead imagery: any rotation by 90 degrees and both flips
        return [
            _crop(size, (0.6, 1.0), interp, square=True),
            A.RandomRotate90(),
            A.HorizontalFlip(),
            A.VerticalFlip(),
        ]
    if preset == "xray":  # anatomy has an up and a left: no vertical flip, small rotations only
        return [
            _crop(size, (0.7, 1.0), interp),
            A.Affine(rotate=(-10, 10), p=0.5),
            A.RandomBrightnessContrast(0.1, 0.1),
        ]
    if preset == "histology":  # no orientation; H&E stain varies between labs and scanners
        return [
            _crop(size, (0.6, 1.0), interp, square=True),
            A.RandomRotate90(),
            A.HorizontalFlip(),
            A.VerticalFlip(),
            A.HEStain(method="random_preset", intensity_scale_range=(0.85, 1.15),
                      intensity_shift_range=(-0.1, 0.1), p=0.5),
            A.HueSaturationValue(8, 12, 8),
        ]
    if preset == "dermoscopy":  # lesions have no orientation; lighting and camera colour vary
        return [
            _crop(size, (0.5, 1.0), interp),
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
        interpolation: ``nearest``, ``bilinear`` or ``bicubic`` for the training augmentations
            (evaluation follows :mod:`visiontl.data.geometry`).
    """
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    interp = INTERPOLATION.get(interpolation, cv2.INTER_LINEAR)
    if train:
        steps = _train_augment(preset, hw, interp)
    else:
        _train_augment(preset, hw, interp)  # validates the preset name
        steps = [EvalResize(*hw, crop_pct=crop_pct)]
    norm = A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0)
    return A.Compose([*steps, norm, ToTensorV2()])
