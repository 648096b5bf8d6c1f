"""Tiny stand-in for a MedMNIST v2 / v3 ``.npz`` file, as the ``medmnist`` package stores it.

Real dataset: MedMNIST (Yang et al., 2023, Scientific Data 10:41), standardised biomedical image
sets downloaded from Zenodo by the ``medmnist`` package into its root (``~/.medmnist``) as one
NumPy archive per subset and size::

    root/<flag>.npz              # 28x28 (MedMNIST v2)
    root/<flag>_<size>.npz       # size 64, 128 or 224 (MedMNIST+, package v3)

with keys ``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images``,
``test_labels``. Images are uint8, ``(N, H, W, 3)`` for RGB subsets (``(N, H, W)`` for gray
ones); labels are uint8 of shape ``(N, 1)`` for single-label tasks. PathMNIST: 9 tissue classes
(NCT-CRC-HE-100K, H&E histology), 89,996 / 10,004 / 7,180 images; BloodMNIST: 8 blood-cell
classes, 11,959 / 1,712 / 3,421. Licence: CC BY 4.0 (both subsets).

This fixture: ``root/<flag>.npz`` (or ``<flag>_<size>.npz``) with 4 / 2 / 2 images per class in
train / val / test, RGB uint8, shuffled within each split, labels uint8 ``(N, 1)`` (sizes 128 /
224 are written with ``np.savez``, not ``savez_compressed``, to stay fast; ``np.load`` reads both). PathMNIST
classes differ by H&E colour, nucleus density / size, fibres and empty space; BloodMNIST classes
by the central cell's nucleus size, lobes, granules and cytoplasm colour among pink red cells.
Note: ``medmnist.PathMNIST(...)`` opens this file, but its ``__len__`` asserts the real split
sizes, so only direct ``np.load`` (or indexing) works with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZES = (28, 64, 128, 224)
PER_CLASS = {"train": 4, "val": 2, "test": 2}

# PathMNIST: (eosin base RGB, nucleus density, nucleus radius px@28, fibre strength, white fraction)
_PATH = [
    ((245, 225, 235), 0.01, 0.8, 0.0, 0.75),  # 0 adipose: mostly empty fat cells, thin pink membranes
    ((235, 232, 236), 0.00, 0.8, 0.0, 0.00),  # 1 background: flat pale grey
    ((215, 140, 175), 0.06, 0.6, 0.0, 0.10),  # 2 debris: pink with scattered fragments
    ((150, 90, 170), 0.30, 0.9, 0.0, 0.00),   # 3 lymphocytes: dense small dark nuclei
    ((200, 185, 215), 0.02, 0.8, 0.0, 0.05),  # 4 mucus: pale blue-pink, smooth
    ((225, 120, 160), 0.05, 0.7, 0.6, 0.00),  # 5 smooth muscle: pink fibres
    ((210, 150, 195), 0.12, 1.0, 0.0, 0.20),  # 6 normal colon mucosa: glands (nuclei rings)
    ((220, 150, 175), 0.05, 0.7, 0.35, 0.05),  # 7 cancer-associated stroma: wavy pink
    ((170, 100, 170), 0.22, 1.4, 0.0, 0.05),  # 8 adenocarcinoma epithelium: crowded large nuclei
]
# BloodMNIST: (cell radius, cytoplasm RGB, nucleus radius, lobes, granule RGB or None) at 28 px
_BLOOD = [
    (7.0, (200, 170, 200), 4.5, 1, (70, 30, 90)),    # 0 basophil: dark granules
    (7.5, (235, 170, 150), 3.5, 2, (230, 120, 80)),  # 1 eosinophil: bilobed, orange granules
    (5.5, (190, 160, 200), 3.8, 1, None),            # 2 erythroblast: small dense round nucleus
    (8.5, (205, 180, 210), 5.5, 1, (150, 100, 160)),  # 3 immature granulocytes: big, fine granules
    (5.5, (170, 170, 220), 4.6, 1, None),            # 4 lymphocyte: round nucleus, thin rim
    (9.0, (200, 190, 215), 5.0, 2, None),            # 5 monocyte: large, kidney-shaped nucleus
    (7.5, (225, 200, 215), 2.2, 3, None),            # 6 neutrophil: 3-lobed nucleus
    (0.0, (0, 0, 0), 1.5, 4, None),                  # 7 platelet: only small purple fragments
]
FLAGS = {"pathmnist": len(_PATH), "bloodmnist": len(_BLOOD)}


def _blur(img: np.ndarray, passes: int = 1) -> np.ndarray:
    """Cheap 3x3 box blur on an HW(C) float array."""
    for _ in range(passes):
        p = np.pad(img, ((1, 1), (1, 1)) + ((0, 0),) * (img.ndim - 2), mode="edge")
        img = sum(p[dy:dy + img.shape[0], dx:dx + img.shape[1]] for dy in range(3) for dx in range(3)) / 9.0
    return img


def _path_image(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    base, density, radius, fibres, white = _PATH[label]
    s = size / 28
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.array(base, np.float32) * rng.uniform(0.9, 1.08)
    if fibres:
        a = rng.uniform(0, np.pi)
        u = xx * np.cos(a) + yy * np.sin(a)
        v = -xx * np.sin(a) + yy * np.cos(a)
        wave = np.sin(v / (1.3 * s) + 1.5 * np.sin(u / (5 * s) + rng.uniform(0, 6)))
        img *= (1 - fibres * 0.25 * (wave > 0.3))[:, :, None]
    if white:  # empty lumen / fat vacuoles: blobs of near-white
        noise = _blur(rng.random((28, 28)).astype(np.float32), 3)  # at 28 px, then upsampled
        noise = np.asarray(Image.fromarray(noise).resize((size, size), Image.BILINEAR))
        holes = noise > np.quantile(noise, 1 - white)
        img[holes] = (248, 244, 248)
    n = rng.poisson(density * size * size / (radius * s) ** 2 / 3)
    cy, cx = rng.uniform(0, size, (2, n))
    r = radius * s * rng.uniform(0.7, 1.3, n)
    mask = np.zeros((size, size), bool)
    for y, x, rr in zip(cy, cx, r):
        y0, y1 = int(max(0, y - rr - 1)), int(min(size, y + rr + 2))
        x0, x1 = int(max(0, x - rr - 1)), int(min(size, x + rr + 2))
        mask[y0:y1, x0:x1] |= (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2 <= rr**2
    img[mask] = np.array((75, 40, 120), np.float32) * rng.uniform(0.85, 1.15)  # haematoxylin
    img = _blur(img, max(1, int(s / 2))) + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _blood_image(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    cell_r, cyto, nuc_r, lobes, granules = _BLOOD[label]
    s = size / 28
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.array((238, 222, 205), np.float32) * rng.uniform(0.95, 1.03)
    for _ in range(int(rng.integers(3, 7))):  # red cells: pink discs with a paler centre
        y, x, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3.5, 4.5) * s
        d = np.hypot(yy - y, xx - x)
        img[d < r] = (225, 150, 150)
        img[d < r * 0.4] = (232, 180, 175)
    cy, cx = size / 2 + rng.uniform(-1.5, 1.5, 2) * s
    d = np.hypot(yy - cy, xx - cx)
    if cell_r:
        img[d < cell_r * s * rng.uniform(0.9, 1.1)] = cyto
    if granules is not None:
        g = (rng.random((size, size)) < 0.25) & (d < cell_r * s)
        img[g] = granules
    nucleus = np.zeros((size, size), bool)
    a0 = rng.uniform(0, 2 * np.pi)
    for k in range(lobes):
        a = a0 + 2 * np.pi * k / lobes
        off = 0.0 if lobes == 1 else (1.8 if lobes < 4 else 6.0) * s
        if label == 7:  # platelets: scattered fragments, no leukocyte
            off = rng.uniform(2, 8) * s
        ly, lx = cy + off * np.sin(a), cx + off * np.cos(a)
        nucleus |= np.hypot(yy - ly, xx - lx) < nuc_r * s * rng.uniform(0.85, 1.15)
    if label == 5:  # monocyte: bite out of the nucleus (kidney shape)
        nucleus &= np.hypot(yy - cy - 3 * s * np.sin(a0), xx - cx - 3 * s * np.cos(a0)) > 2.5 * s
    img[nucleus] = np.array((95, 50, 130), np.float32) * rng.uniform(0.85, 1.15)
    img = _blur(img, max(1, int(s / 2))) + rng.normal(0, 5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make(root: Path, seed: int = 0, flag: str = "pathmnist", size: int = 28) -> Path:
    """Write ``root/<flag>.npz`` (``root/<flag>_<size>.npz`` for size 64 / 128 / 224) and return
    ``root``. ``flag``: ``"pathmnist"`` (9 classes) or ``"bloodmnist"`` (8 classes), both RGB."""
    if flag not in FLAGS:
        raise ValueError(f"flag must be one of {sorted(FLAGS)}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    render = _path_image if flag == "pathmnist" else _blood_image
    arrays = {}
    for split, per_class in PER_CLASS.items():
        labels = np.repeat(np.arange(FLAGS[flag]), per_class)
        labels = labels[rng.permutation(len(labels))]
        arrays[f"{split}_images"] = np.stack([render(int(k), rng, size) for k in labels])
        arrays[f"{split}_labels"] = labels.astype(np.uint8)[:, None]
    name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    # compressed like the downloaded files; the large sizes uncompressed to stay fast (np.load reads both)
    (np.savez_compressed if size <= 64 else np.savez)(root / name, **arrays)
    return root
