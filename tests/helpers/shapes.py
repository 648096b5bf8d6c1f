"""Seeded generator of a tiny, learnable image-classification folder.

Three classes that differ in colour and shape (red squares, green discs, blue bars) on noisy
backgrounds, so that even a small network separates them in a few steps. Run it directly to
write the default fixture: ``python tests/fixtures/shapes/data.py OUT_DIR``.
"""

from __future__ import annotations

import zlib

import struct

import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("bars", "discs", "squares")


def make_image(cls: str, rng: np.random.Generator, size: int = 32, mode: str = "RGB") -> Image.Image:
    """One image of class ``cls``."""
    img = rng.uniform(0, 60, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    c = rng.integers(size // 3, 2 * size // 3, 2)
    r = rng.integers(size // 6, size // 3)
    if cls == "squares":
        mask = (abs(yy - c[0]) < r) & (abs(xx - c[1]) < r)
        colour = (220, 40, 40)
    elif cls == "discs":
        mask = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r**2
        colour = (40, 220, 40)
    else:
        mask = abs(xx - c[1]) < max(2, r // 3)
        colour = (40, 40, 220)
    img[mask] = colour
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img).convert(mode)


def make_folder(
    root: str | Path, per_class: int = 8, size: int = 32, seed: int = 0, mode: str = "RGB",
    classes: tuple[str, ...] = CLASSES, ext: str = ".png",
) -> Path:
    """Write ``root/<class>/<i>.png`` for every class; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(cls, rng, size, mode).save(root / cls / f"{i:03d}{ext}")
    return root


def make_splits(root: str | Path, per_class: dict[str, int] | None = None, **kwargs) -> Path:
    """Write ``root/train``, ``root/val`` (and ``root/test``) folders with disjoint seeds."""
    root = Path(root)
    per_class = per_class or {"train": 8, "val": 4}
    seed = kwargs.pop("seed", 0)
    for i, (split, n) in enumerate(per_class.items()):
        make_folder(root / split, per_class=n, seed=seed + 100 * i, **kwargs)
    return root


def _draw(img: np.ndarray, cls: str, rng: np.random.Generator) -> None:
    """Draw one shape of class ``cls`` into ``img`` (H x W x 3 float) at a random place."""
    size = img.shape[0]
    yy, xx = np.mgrid[:size, :size]
    c = rng.integers(size // 4, 3 * size // 4, 2)
    r = rng.integers(size // 8, size // 5)
    if cls == "squares":
        img[(abs(yy - c[0]) < r) & (abs(xx - c[1]) < r)] = (220, 40, 40)
    elif cls == "discs":
        img[(yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r**2] = (40, 220, 40)
    else:
        img[abs(xx - c[1]) < max(2, r // 3)] = (40, 40, 220)


def make_multilabel_csv(
    root: str | Path, n: int = 36, size: int = 32, seed: int = 0, rates: dict[str, float] | None = None,
    shape: str = "joined", uncertain: int = 0,
) -> Path:
    """Write ``n`` images holding any subset of the three shapes (each present with its rate in
    ``rates``) and ``root/labels.csv``: ``shape="joined"`` (path, tags joined by ``|``; empty for
    none) or ``"columns"`` (path and one 0/1 column per shape; ``uncertain`` of the absent cells
    written as -1, CheXpert style). Returns the CSV's path."""
    root = Path(root)
    rates = rates or {"bars": 0.5, "discs": 0.4, "squares": 0.3}
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        tags = [t for t in rates if rng.random() < rates[t]]
        img = rng.uniform(0, 60, (size, size, 3))
        for t in tags:
            _draw(img, t, rng)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        rows.append((f"images/{i:03d}.png", tags))
    csv = root / "labels.csv"
    if shape == "joined":
        csv.write_text("path,label\n" + "".join(f"{p},{'|'.join(t)}\n" for p, t in rows))
    else:
        cells = [["1" if t in tags else "0" for t in rates] for _, tags in rows]
        absent = [(i, j) for i, row in enumerate(cells) for j, v in enumerate(row) if v == "0"]
        for k in rng.permutation(len(absent))[:uncertain]:  # that many absent cells written as uncertain
            i, j = absent[k]
            cells[i][j] = "-1"
        csv.write_text("path," + ",".join(rates) + "\n" + "".join(f"{p},{','.join(c)}\n" for (p, _), c in zip(rows, cells)))
    return csv


if __name__ == "__main__":
    print(make_folder(sys.argv[1] if len(sys.argv) > 1 else "shapes"))


def write_bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A ~70-byte PNG whose header claims width x height pixels (Pillow refuses > ~179 Mpx)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
                     + chunk(b"IEND", b""))
    return path
