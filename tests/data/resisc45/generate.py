"""Tiny stand-in for NWPU-RESISC45.

Real dataset: NWPU-RESISC45 (Cheng, Han & Lu, 2017), 31,500 Google Earth RGB scenes, 256x256 JPEG,
700 per class in 45 classes, distributed as ``NWPU-RESISC45.rar`` / ``.zip``, which extracts to::

    root/NWPU-RESISC45/<class>/<class>_NNN.jpg      # NNN = 001..700

Class folder names are lower case with underscores (airplane, airport, baseball_diamond, ...,
forest, ..., lake, ..., wetland). Licence: none stated by the authors (Northwestern Polytechnical
University) beyond research use; imagery from Google Earth; mirrors label it variously (e.g. CC
BY-NC 4.0, "unknown").

This fixture: ``per_class`` (default 8) synthetic 64x64 RGB JPEGs per class (default airport,
forest, lake): grey apron with runway markings, dark green canopy blotches, a blue lake with a
green shore; other real class names get a generic class-coloured texture. Deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from fixtures import pick_classes, smooth
from PIL import Image

ALL_CLASSES = (
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral", "church",
    "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert", "forest", "freeway",
    "golf_course", "ground_track_field", "harbor", "industrial_area", "intersection", "island", "lake",
    "meadow", "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot",
    "railway", "railway_station", "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship",
    "snowberg", "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace",
    "thermal_power_station", "wetland",
)
DEFAULT_CLASSES = ("airport", "forest", "lake")


def make_image(cls: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One synthetic scene of class ``cls``."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) - (size - 1) / 2
    a = rng.uniform(0, np.pi)
    u, v = xx * np.cos(a) + yy * np.sin(a), -xx * np.sin(a) + yy * np.cos(a)
    if cls == "airport":  # grass around a grey runway + parallel taxiway, white centre dashes
        img = np.full((size, size, 3), (125, 140, 95), np.float32) + 20 * smooth(rng, size, 5)[:, :, None]
        off = rng.uniform(-12, 12)
        runway, taxiway = np.abs(v - off) < 6, np.abs(v - off - 14) < 2.5
        img[runway | taxiway] = (115, 115, 112)
        img[(np.abs(v - off) < 0.8) & ((u / 6) % 1 < 0.5)] = (235, 235, 235)
    elif cls == "forest":
        canopy = smooth(rng, size, 10)
        img = np.array((30, 60, 35), np.float32) + canopy[:, :, None] * np.array((30, 40, 20), np.float32)
        img *= (0.8 + 0.4 * (smooth(rng, size, 20) > 0.5))[:, :, None]  # crowns and shadows
    elif cls == "lake":  # irregular blue body in green / brown land
        r = np.hypot(xx - rng.uniform(-8, 8), yy - rng.uniform(-8, 8))
        edge = size * rng.uniform(0.25, 0.38) * (0.8 + 0.4 * smooth(rng, size, 4))
        water = (r < edge)[:, :, None]
        land = np.array((110, 125, 80), np.float32) + 30 * smooth(rng, size, 6)[:, :, None]
        img = np.where(water, np.array((35, 60, 85), np.float32) + 10 * smooth(rng, size, 3)[:, :, None], land)
    else:  # generic: class-specific colour pair and blotch scale
        crng = np.random.default_rng(ALL_CLASSES.index(cls))
        c1, c2 = crng.uniform(40, 220, 3), crng.uniform(40, 220, 3)
        m = smooth(rng, size, int(crng.integers(3, 12)))[:, :, None]
        img = c1 * (1 - m) + c2 * m
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 7, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make(root: Path, seed: int = 0, classes: int | Sequence[str] = DEFAULT_CLASSES, per_class: int = 8,
         size: int = 64) -> Path:
    """Write ``root/NWPU-RESISC45/<class>/<class>_NNN.jpg`` (NNN from 001) and return
    ``root/NWPU-RESISC45``.

    ``classes``: class names, or a count (the default three first, then the other real ones).
    """
    top = Path(root) / "NWPU-RESISC45"
    rng = np.random.default_rng(seed)
    for cls in pick_classes(classes, DEFAULT_CLASSES, ALL_CLASSES, "RESISC45"):
        (top / cls).mkdir(parents=True, exist_ok=True)
        for n in range(1, per_class + 1):
            make_image(cls, rng, size).save(top / cls / f"{cls}_{n:03d}.jpg", quality=90)
    return top
