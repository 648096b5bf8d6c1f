"""Tiny stand-in for the UC Merced Land Use dataset.

Real dataset: UC Merced Land Use (Yang & Newsam, 2010), 2,100 aerial RGB orthophotos (USGS
National Map, 1 ft/px), 100 per class in 21 classes, distributed as ``UCMerced_LandUse.zip``,
which extracts to::

    root/UCMerced_LandUse/Images/<class>/<class>NN.tif     # NN = 00..99, RGB uint8 TIFF

Images are 256x256 (a few are a couple of pixels smaller). Classes: agricultural, airplane,
baseballdiamond, beach, buildings, chaparral, denseresidential, forest, freeway, golfcourse,
harbor, intersection, mediumresidential, mobilehomepark, overpass, parkinglot, river, runway,
sparseresidential, storagetanks, tenniscourt. Licence: the imagery is USGS public domain; the
dataset is offered for research use without an explicit licence.

This fixture: ``per_class`` (default 8) synthetic 64x64 RGB uint8 TIFFs per class (default
agricultural, airplane, beach): field patchwork, a bright plane shape on grey tarmac, sand meeting
water; other real class names get a generic class-coloured texture. Deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from fixtures import pick_classes, smooth
from PIL import Image

ALL_CLASSES = (
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral", "denseresidential",
    "forest", "freeway", "golfcourse", "harbor", "intersection", "mediumresidential", "mobilehomepark",
    "overpass", "parkinglot", "river", "runway", "sparseresidential", "storagetanks", "tenniscourt",
)
DEFAULT_CLASSES = ("agricultural", "airplane", "beach")


def _rotated(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size].astype(np.float32) - (size - 1) / 2
    a = rng.uniform(0, 2 * np.pi)
    return xx * np.cos(a) + yy * np.sin(a), -xx * np.sin(a) + yy * np.cos(a)


def make_image(cls: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One synthetic aerial RGB image of class ``cls``."""
    u, v = _rotated(rng, size)
    jitter = rng.uniform(0.85, 1.15)
    if cls == "agricultural":  # patchwork of rectangular fields with row texture
        cell = rng.uniform(14, 26)
        fid = (np.floor(u / cell) * 7 + np.floor(v / cell) * 13) % 4
        palette = np.array([(120, 140, 70), (160, 140, 100), (90, 120, 60), (175, 160, 120)], np.float32)
        img = palette[fid.astype(int)] * (0.9 + 0.1 * np.sin(u * rng.uniform(1.2, 2.0)))[:, :, None]
    elif cls == "airplane":  # light grey tarmac, white fuselage + wings, dark markings
        img = np.full((size, size, 3), (150, 150, 148), np.float32) + 25 * smooth(rng, size, 4)[:, :, None]
        s = size / 64 * rng.uniform(0.8, 1.1)
        body = (np.abs(v) < 2.5 * s) & (np.abs(u) < 22 * s)
        wings = (np.abs(u + 2 * s) < 4 * s + np.abs(v) * 0.25) & (np.abs(v) < 20 * s)
        tail = (np.abs(u - 18 * s) < 2.5 * s) & (np.abs(v) < 8 * s)
        img[body | wings | tail] = (235, 235, 232)
        img[(np.abs(u + 30 * s) < 1) | (np.abs(v - 26 * s) < 1)] = (240, 220, 80)  # taxiway lines
    elif cls == "beach":  # sand | surf | water across a wavy shoreline
        shore = u + 4 * np.sin(v / rng.uniform(6, 12)) + rng.uniform(-10, 10)
        sand = np.array((215, 200, 165), np.float32)
        water = np.array((40, 95, 120), np.float32)
        t = np.clip((shore + 3) / 6, 0, 1)[:, :, None]
        img = sand * (1 - t) + water * t
        img[np.abs(shore - 3) < 1.5] = (240, 245, 245)  # surf
    else:  # generic: class-specific colour pair and blotch scale
        crng = np.random.default_rng(ALL_CLASSES.index(cls))
        a, b = crng.uniform(40, 220, 3), crng.uniform(40, 220, 3)
        m = smooth(rng, size, int(crng.integers(3, 12)))[:, :, None]
        img = a * (1 - m) + b * m
    img = img * jitter * (0.9 + 0.2 * smooth(rng, size, 3)[:, :, None]) + rng.normal(0, 7, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make(root: Path, seed: int = 0, classes: int | Sequence[str] = DEFAULT_CLASSES, per_class: int = 8,
         size: int = 64) -> Path:
    """Write ``root/UCMerced_LandUse/Images/<class>/<class>NN.tif`` (NN from 00) and return
    ``root/UCMerced_LandUse/Images``.

    ``classes``: class names, or a count (the default three first, then the other real ones).
    """
    images = Path(root) / "UCMerced_LandUse" / "Images"
    rng = np.random.default_rng(seed)
    for cls in pick_classes(classes, DEFAULT_CLASSES, ALL_CLASSES, "UC Merced"):
        (images / cls).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            make_image(cls, rng, size).save(images / cls / f"{cls}{n:02d}.tif", format="TIFF")
    return images
