"""Tiny stand-in for EuroSAT RGB, laid out as torchvision's ``EuroSAT`` extracts it.

Real dataset: EuroSAT (Helber et al., 2019), 27,000 Sentinel-2 RGB patches of 64x64 px in ten
land-use classes, distributed as ``EuroSAT.zip`` / ``EuroSAT_RGB.zip``. torchvision's
``datasets.EuroSAT(root)`` extracts it to::

    root/eurosat/2750/<Class>/<Class>_<n>.jpg      # n = 1, 2, ... ; 64x64 RGB JPEG

with classes AnnualCrop, Forest, HerbaceousVegetation, Highway, Industrial, Pasture,
PermanentCrop, Residential, River, SeaLake. Licence of the real dataset: MIT (github.com/phelber/
EuroSAT); contains modified Copernicus Sentinel data.

This fixture: ``per_class`` (default 8) synthetic 64x64 RGB JPEGs for each of the chosen classes
(default AnnualCrop, Forest, SeaLake), each class with its own mean colour and texture (field
stripes, blotchy canopy, smooth water, a road, blocks...) plus noise, so a tiny model can learn
something without it being trivial. Deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from fixtures import pick_classes, smooth
from PIL import Image

ALL_CLASSES = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)
DEFAULT_CLASSES = ("AnnualCrop", "Forest", "SeaLake")
# class -> (texture, base RGB, second RGB)
_STYLE = {
    "AnnualCrop": ("stripes", (150, 135, 105), (105, 130, 80)),
    "Forest": ("blotches", (35, 65, 45), (55, 85, 55)),
    "HerbaceousVegetation": ("blotches", (95, 110, 75), (130, 125, 90)),
    "Highway": ("road", (95, 110, 85), (175, 170, 165)),
    "Industrial": ("blocks", (120, 118, 115), (190, 185, 180)),
    "Pasture": ("smooth", (105, 135, 80), (120, 145, 90)),
    "PermanentCrop": ("dots", (125, 120, 85), (80, 100, 60)),
    "Residential": ("grid", (135, 125, 115), (175, 150, 135)),
    "River": ("river", (90, 110, 75), (45, 65, 85)),
    "SeaLake": ("smooth", (30, 50, 75), (25, 45, 65)),
}


def _mask(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Where the class's second colour shows, in [0, 1]."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    if kind == "stripes":  # parallel fields of alternating crops
        period = rng.uniform(7, 14)
        return ((u / period + rng.random()) % 1.0 < 0.5).astype(np.float32)
    if kind == "blotches":
        return smooth(rng, size, 8)
    if kind == "road":
        off = rng.uniform(-size / 4, size / 4)
        return (np.abs(v - (v.min() + v.max()) / 2 - off) < rng.uniform(1.5, 3)).astype(np.float32)
    if kind == "blocks":
        m = np.zeros((size, size), np.float32)
        for _ in range(rng.integers(4, 8)):
            y, x = rng.integers(0, size - 8, 2)
            h, w = rng.integers(5, 16, 2)
            m[y:y + h, x:x + w] = 1.0
        return m
    if kind == "dots":  # orchard / vineyard rows
        period = rng.uniform(5, 7)
        return (((u / period) % 1.0 < 0.4) & ((v / period) % 1.0 < 0.4)).astype(np.float32)
    if kind == "grid":  # houses between streets
        period = rng.uniform(6, 9)
        return (((u / period) % 1.0 < 0.6) & ((v / period) % 1.0 < 0.6)).astype(np.float32)
    if kind == "river":
        centre = (v.min() + v.max()) / 2 + 6 * np.sin(u / rng.uniform(8, 14) + rng.uniform(0, 6))
        return (np.abs(v - centre) < rng.uniform(3, 6)).astype(np.float32)
    return 0.3 * smooth(rng, size, 3)  # smooth


def make_image(cls: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One synthetic RGB patch of class ``cls``."""
    kind, base, second = _STYLE[cls]
    m = _mask(kind, rng, size)[:, :, None]
    base_c = np.array(base, np.float32) * rng.uniform(0.85, 1.15)
    second_c = np.array(second, np.float32) * rng.uniform(0.85, 1.15)
    img = base_c * (1 - m) + second_c * m
    img *= 0.85 + 0.3 * smooth(rng, size, 4)[:, :, None]  # illumination / soil variation
    img += rng.normal(0, 9, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make(root: Path, seed: int = 0, classes: int | Sequence[str] = DEFAULT_CLASSES, per_class: int = 8,
         size: int = 64) -> Path:
    """Write ``root/eurosat/2750/<Class>/<Class>_<n>.jpg`` (n from 1) and return ``root``.

    ``classes``: class names, or a count (the default three first, then the other real ones).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for cls in pick_classes(classes, DEFAULT_CLASSES, ALL_CLASSES, "EuroSAT"):
        folder = root / "eurosat" / "2750" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(1, per_class + 1):
            make_image(cls, rng, size).save(folder / f"{cls}_{n}.jpg", quality=90)
    return root
