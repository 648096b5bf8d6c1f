"""What a model sees, resolved once: one frozen :class:`Preprocessing` that training, the
checkpoint, export and the ONNX predictor all read.

The direction of flow (``docs/concepts/architecture.md``)::

    backbone (timm's pretrained config: input size, mean / std, crop_pct, interpolation)
        |  Preprocessing.from_timm(...)                      task.backbone_preprocessing()
        v
    datamodule.resolve_preprocessing(backbone)   refines it from the data and the user's settings:
        |                                        image_size, in_chans, normalize (statistics of
        |                                        16-bit / multiband training images), augment preset
        v
    task.set_preprocessing(resolved)             recorded in the hyper-parameters, so the checkpoint
        |                                        carries it (plain data, weights_only-safe)
        v
    export (ONNX metadata "preprocessing")  -->  Predictor (torch-free) reads the same fields

The datamodule never looks at the model or the trainer, and the task never looks at the
datamodule's datasets: :class:`visiontl.tasks.link.DataLink`, a callback the task adds, makes the
two calls at set-up (after the datamodule's ``setup``, before the task's). This module imports
nothing but the standard library, so the predictor can use it without torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["BIT_DEPTHS", "IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "NORMALIZATIONS", "Preprocessing"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("backbone", "dataset", "given")
"""Where ``mean`` / ``std`` come from: the backbone's pretraining, the training images, the user."""
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area", "box", "hamming", "lanczos")
"""Resize interpolations a preprocessing record may name (timm's, plus OpenCV's ``area``)."""
BIT_DEPTHS = (8, 16, 32, 64)
"""Bits per stored sample a preprocessing record may name (8- and 16-bit integers, 32 for floats
and 32-bit integers, 64 for 64-bit integer images)."""


@dataclass(frozen=True)
class Preprocessing:
    """The input convention of a model.

    Attributes:
        in_chans: channels fed to the model.
        size: square input side in pixels.
        mean: per-channel normalisation mean, on the ``[0, 1]`` scale.
        std: per-channel normalisation standard deviation, on the ``[0, 1]`` scale.
        crop_pct: evaluation centre-crop fraction (1 = no crop; images smaller than the input are
            never cropped, see :mod:`visiontl.data.geometry`).
        interpolation: resize interpolation (``bilinear``, ``bicubic``...).
        bit_depth: bits per stored sample of the training images
            (:func:`visiontl.data.pixels.bit_depth`): an integer width, whose type's maximum the
            pixels were divided by to reach ``[0, 1]`` (8: 255, 16: 65535, 32: 2**31 - 1), or 32 for
            floats, kept as they are. Training, export and the predictor read images through the
            same rule (:func:`visiontl.data.pixels.to_unit`); it decides ``normalize='auto'``.
        normalization: where ``mean`` / ``std`` come from (:data:`NORMALIZATIONS`).
    """

    in_chans: int = 3
    size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    bit_depth: int = 8
    normalization: str = "backbone"

    def __post_init__(self) -> None:
        mean = tuple(float(v) for v in self.mean)
        std = tuple(float(v) for v in self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        problems = []
        if int(self.in_chans) < 1 or int(self.size) < 1:
            problems.append(f"in_chans {self.in_chans} and size {self.size} must be >= 1")
        if len(mean) != int(self.in_chans) or len(std) != int(self.in_chans):
            problems.append(f"mean ({len(mean)} values) and std ({len(std)}) need one value per channel "
                            f"({self.in_chans})")
        if any(s <= 0 for s in std):
            problems.append(f"std {list(std)} must be > 0")
        if not 0 < float(self.crop_pct) <= 1:
            problems.append(f"crop_pct {self.crop_pct} must be in (0, 1]")
        if self.normalization not in NORMALIZATIONS:
            problems.append(f"normalization {self.normalization!r} must be one of {', '.join(NORMALIZATIONS)}")
        # bounded here, where a checkpoint's or an ONNX file's record is read back (from_dict):
        # a record is someone else's data
        if not all(math.isfinite(v) for v in (*mean, *std)):
            problems.append(f"mean {list(mean)} and std {list(std)} must be finite")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation {self.interpolation!r} must be one of {', '.join(INTERPOLATIONS)}")
        if isinstance(self.bit_depth, bool) or self.bit_depth not in BIT_DEPTHS:
            problems.append(f"bit_depth {self.bit_depth!r} must be one of {', '.join(map(str, BIT_DEPTHS))}")
        if problems:
            raise ValueError(f"Invalid preprocessing: {'; '.join(problems)}.")
        object.__setattr__(self, "in_chans", int(self.in_chans))
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        object.__setattr__(self, "bit_depth", int(self.bit_depth))

    @classmethod
    def from_timm(cls, config: Mapping[str, Any]) -> Preprocessing:
        """From a timm data config (``input_size`` (C, H, W), ``mean``, ``std``, ``crop_pct``,
        ``interpolation``), as :func:`visiontl.models.backbones.data_config` returns it."""
        chans, height, width = (int(v) for v in config.get("input_size", (3, 224, 224)))
        mean = list(config.get("mean", IMAGENET_MEAN))
        std = list(config.get("std", IMAGENET_STD))
        if len(mean) != chans:  # a stem adapted to in_chans: the average over the pretrained channels
            mean, std = [sum(mean) / len(mean)] * chans, [sum(std) / len(std)] * chans
        return cls(in_chans=chans, size=max(height, width), mean=tuple(mean), std=tuple(std),
                   crop_pct=float(config.get("crop_pct") or 1.0),
                   interpolation=str(config.get("interpolation") or "bilinear"))

    def replace(self, **changes: Any) -> Preprocessing:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def with_channels(self, in_chans: int) -> Preprocessing:
        """The same convention for ``in_chans`` channels (mean / std averaged when the count changes)."""
        if in_chans == self.in_chans:
            return self
        mean, std = sum(self.mean) / len(self.mean), sum(self.std) / len(self.std)
        return self.replace(in_chans=in_chans, mean=(mean,) * in_chans, std=(std,) * in_chans)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (checkpoint hyper-parameters, ONNX metadata)."""
        return {"in_chans": self.in_chans, "size": self.size, "mean": list(self.mean), "std": list(self.std),
                "crop_pct": self.crop_pct, "interpolation": self.interpolation, "bit_depth": self.bit_depth,
                "normalization": self.normalization}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Back from :meth:`to_dict` (unknown keys are ignored; ``ValueError`` on invalid values)."""
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: (tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v)
                          for k, v in dict(data).items() if k in known})
        except TypeError as err:
            raise ValueError(f"Invalid preprocessing {dict(data)!r}: {err}") from err

    def timm_config(self) -> dict[str, Any]:
        """The same as a timm data config (``input_size`` (C, H, W)...)."""
        return {"input_size": (self.in_chans, self.size, self.size), "mean": self.mean, "std": self.std,
                "crop_pct": self.crop_pct, "interpolation": self.interpolation}
