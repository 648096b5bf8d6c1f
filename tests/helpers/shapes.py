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
