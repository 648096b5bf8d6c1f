"""Tiny stand-in for EuroSAT multispectral (all 13 Sentinel-2 bands), as ``EuroSATallBands.zip``
extracts.

Real dataset: EuroSAT (Helber et al., 2019), 27,000 Sentinel-2 L1C patches, 64x64 px, 13 bands,
uint16 top-of-atmosphere reflectance x 10000 (most values 0..4000), one GeoTIFF per patch (UTM
projection, 10 m pixels; the 20 m and 60 m bands are resampled, so they look blocky). The
official zip extracts to::

    root/ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<Class>/<Class>_<n>.tif   # n from 1

Band order in the files: B01, B02, B03, B04, B05, B06, B07, B08, B09, B10, B11, B12, B8A.
Classes: AnnualCrop, Forest, HerbaceousVegetation, Highway, Industrial, Pasture, PermanentCrop,
Residential, River, SeaLake. Licence of the real dataset: MIT (github.com/phelber/EuroSAT);
contains modified Copernicus Sentinel data.

This fixture: ``per_class`` (default 8) 64x64x13 uint16 GeoTIFFs per class (default AnnualCrop,
Forest, SeaLake) with class-dependent spectra (water: dark in NIR / SWIR; vegetation: bright red
edge / NIR; crops: bright SWIR) times a class texture, the 20 m / 60 m bands blocky as in the real
files. Minimal GeoTIFF tags (ModelPixelScale 10 m, ModelTiepoint, GeoKeyDirectory for
EPSG:32632). Classes alternate between band-interleaved storage (``planarconfig=separate``,
written as (13, 64, 64)) and pixel-interleaved (``contig``, written as (64, 64, 13), 12 extra
samples); ``tifffile.imread`` gives back 13 bands for both (as (13, H, W) and (H, W, 13)).
``odd_bands=k`` adds ``<first class>/<Class>_999.tif`` with k bands (same interleaving as that
class), for a "band count differs from in_chans" test.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from fixtures import pick_classes, smooth

BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A")
_RESOLUTION = (60, 10, 10, 10, 20, 20, 20, 10, 60, 60, 20, 20, 20)  # metres, per band above
ALL_CLASSES = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)
DEFAULT_CLASSES = ("AnnualCrop", "Forest", "SeaLake")
SUBDIR = Path("ds/images/remote_sensing/otherDatasets/sentinel_2/tif")

# Mean digital numbers per class, in BANDS order (rough Sentinel-2 L1C spectra).
_SPECTRA = {
    "AnnualCrop":           (1400, 1200, 1150, 1200, 1450, 1900, 2150, 2100, 700, 14, 2300, 1650, 2350),
    "Forest":               (1150, 850, 700, 450, 850, 2000, 2500, 2400, 800, 12, 1300, 600, 2700),
    "HerbaceousVegetation": (1300, 1050, 1000, 900, 1250, 2050, 2400, 2350, 780, 13, 2000, 1200, 2600),
    "Highway":              (1450, 1300, 1250, 1250, 1450, 1800, 2000, 1950, 650, 12, 2100, 1600, 2200),
    "Industrial":           (1600, 1500, 1500, 1550, 1650, 1800, 1950, 1900, 600, 14, 2200, 1800, 2050),
    "Pasture":              (1250, 950, 900, 700, 1100, 2300, 2800, 2750, 850, 12, 1900, 1100, 3000),
    "PermanentCrop":        (1350, 1100, 1050, 1000, 1300, 2000, 2300, 2250, 750, 13, 2100, 1400, 2450),
    "Residential":          (1500, 1350, 1300, 1300, 1500, 1900, 2150, 2100, 700, 13, 2150, 1650, 2300),
    "River":                (1300, 1050, 950, 800, 900, 1200, 1350, 1300, 450, 10, 1100, 750, 1450),
    "SeaLake":              (1300, 1000, 800, 550, 450, 380, 350, 300, 120, 8, 150, 100, 280),
}
_TEXTURE = {"AnnualCrop": "stripes", "PermanentCrop": "dots", "Residential": "grid", "Industrial": "blocks",
            "Highway": "line", "River": "line", "SeaLake": "smooth", "Pasture": "smooth"}


def _texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Spatial modulation in [-1, 1]."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    a = rng.uniform(0, np.pi)
    u, v = xx * np.cos(a) + yy * np.sin(a), -xx * np.sin(a) + yy * np.cos(a)
    if kind == "stripes":
        return np.where((u / rng.uniform(7, 14) + rng.random()) % 1.0 < 0.5, 1.0, -1.0).astype(np.float32)
    if kind in ("dots", "grid"):
        p = rng.uniform(5, 8)
        return np.where(((u / p) % 1 < 0.5) & ((v / p) % 1 < 0.5), 1.0, -0.5).astype(np.float32)
    if kind == "blocks":
        m = -np.ones((size, size), np.float32)
        for _ in range(rng.integers(4, 8)):
            y, x = rng.integers(0, size - 8, 2)
            h, w = rng.integers(5, 16, 2)
            m[y:y + h, x:x + w] = 1.0
        return m
    if kind == "line":
        centre = (v.min() + v.max()) / 2 + 5 * np.sin(u / rng.uniform(8, 14))
        return np.where(np.abs(v - centre) < rng.uniform(2, 5), 1.0, -0.3).astype(np.float32)
    if kind == "smooth":
        return 0.3 * (2 * smooth(rng, size, 3) - 1)
    return 2 * smooth(rng, size, 8) - 1  # blotches


def make_array(cls: str, rng: np.random.Generator, size: int = 64, bands: int = 13) -> np.ndarray:
    """One (size, size, bands) uint16 patch of class ``cls``."""
    spectrum = np.asarray(_SPECTRA[cls], np.float32) * rng.uniform(0.85, 1.15)
    # the texture swaps in a second "material": darker in the visible bands, brighter in NIR for
    # vegetation-like textures, and vice versa for built-up ones
    contrast = np.where(np.arange(13) >= 4, 0.15, -0.12).astype(np.float32)
    if cls in ("Highway", "Industrial", "Residential", "River"):
        contrast = -contrast
    tex = _texture(_TEXTURE.get(cls, "blotches"), rng, size)
    light = 0.9 + 0.2 * smooth(rng, size, 4)
    out = np.empty((size, size, bands), np.float32)
    for b in range(bands):
        j = b % 13
        band = spectrum[j] * (1 + contrast[j] * tex) * light
        band += rng.normal(0, 0.02 * spectrum[j] + 2, (size, size))
        step = _RESOLUTION[j] // 10
        if step > 1:  # coarse bands are resampled to 10 m: blocks of step x step pixels
            idx = (np.arange(size) // step) * step
            band = band[idx][:, idx]
        out[:, :, b] = band
    return np.clip(out, 0, 10000).astype(np.uint16)


def _geotags(rng: np.random.Generator) -> list[tuple]:
    """ModelPixelScale, ModelTiepoint and a GeoKeyDirectory for WGS 84 / UTM zone 32N (EPSG:32632)."""
    easting = 300000.0 + 640.0 * float(rng.integers(0, 600))
    northing = 5000000.0 + 640.0 * float(rng.integers(0, 1000))
    geokeys = (
        1, 1, 0, 3,        # directory version 1.1.0, 3 keys
        1024, 0, 1, 1,     # GTModelTypeGeoKey = ModelTypeProjected
        1025, 0, 1, 1,     # GTRasterTypeGeoKey = RasterPixelIsArea
        3072, 0, 1, 32632,  # ProjectedCSTypeGeoKey = EPSG:32632
    )
    return [
        (33550, "d", 3, (10.0, 10.0, 0.0), False),
        (33922, "d", 6, (0.0, 0.0, 0.0, easting, northing, 0.0), False),
        (34735, "H", len(geokeys), geokeys, False),
    ]


def _write(path: Path, arr: np.ndarray, separate: bool, rng: np.random.Generator) -> None:
    """``arr`` is HWC; band-interleaved files are written band-first, as GDAL does."""
    tags = _geotags(rng)
    if arr.shape[2] == 1:
        tifffile.imwrite(path, arr[:, :, 0], photometric="minisblack", extratags=tags, metadata=None)
    elif separate:
        tifffile.imwrite(path, np.ascontiguousarray(np.moveaxis(arr, 2, 0)), photometric="minisblack",
                         planarconfig="separate", extratags=tags, metadata=None)
    else:
        tifffile.imwrite(path, arr, photometric="minisblack", planarconfig="contig",
                         extrasamples=(0,) * (arr.shape[2] - 1), extratags=tags, metadata=None)


def make(root: Path, seed: int = 0, classes: int | Sequence[str] = DEFAULT_CLASSES, per_class: int = 8,
         odd_bands: int | None = None, size: int = 64) -> Path:
    """Write ``root/ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<Class>/<Class>_<n>.tif``
    (13 bands; classes 0, 2, ... band-interleaved, 1, 3, ... pixel-interleaved) and return ``root``.

    ``classes``: class names, or a count (the default three first, then the other real ones).
    ``odd_bands``: also write ``<first class>/<Class>_999.tif`` with that many bands.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = pick_classes(classes, DEFAULT_CLASSES, ALL_CLASSES, "EuroSAT")
    for i, cls in enumerate(names):
        folder = root / SUBDIR / cls
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(1, per_class + 1):
            _write(folder / f"{cls}_{n}.tif", make_array(cls, rng, size), i % 2 == 0, rng)
    if odd_bands is not None:
        if odd_bands < 1:
            raise ValueError("odd_bands must be >= 1")
        cls = names[0]
        _write(root / SUBDIR / cls / f"{cls}_999.tif", make_array(cls, rng, size, odd_bands), True, rng)
    return root
