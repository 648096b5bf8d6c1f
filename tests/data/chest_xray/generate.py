"""Tiny stand-in for the Kermany pediatric chest X-ray pneumonia set (Kaggle "chest_xray").

Real dataset: "Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images for
Classification" (Kermany et al., 2018, Mendeley Data, doi:10.17632/rscbjbr9sj), as repackaged on
Kaggle ("Chest X-Ray Images (Pneumonia)"): 5,856 anterior-posterior chest radiographs of children,
JPEG of varying size (~1000-2000 px), laid out as::

    root/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg

NORMAL files are named like ``IM-0115-0001.jpeg`` or ``NORMAL2-IM-1427-0001.jpeg``; PNEUMONIA files
like ``person1_bacteria_1.jpeg`` or ``person3_virus_15.jpeg`` (one patient may have several). Most
are 8-bit grayscale (mode L) but a few hundred are stored as RGB. The split is imbalanced (train
1,341 NORMAL / 3,875 PNEUMONIA) and the val split is tiny (8 / 8). Licence: CC BY 4.0.

This fixture: 64x64 grayscale JPEGs with a chest-like pattern (dark background, soft-tissue body,
two dark lung fields crossed by bright ribs, bright spine and heart shadow), train 6 NORMAL /
12 PNEUMONIA, val 2 / 2, test 3 / 3. Pneumonia lungs are hazier: diffuse bilateral haze for
"virus" files, a denser focal consolidation for "bacteria" files. Exactly one training PNEUMONIA
image is saved in RGB mode (grey content, as in the real set). Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fixtures import smooth
from PIL import Image, ImageFilter

SPLITS = {"train": (6, 12), "val": (2, 2), "test": (3, 3)}  # (NORMAL, PNEUMONIA)


def make_image(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One radiograph; ``kind`` is ``"normal"``, ``"bacteria"`` or ``"virus"``."""
    s = size / 64
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cx = size / 2 + rng.uniform(-2, 2) * s
    scale = rng.uniform(0.9, 1.1)
    body = ((xx - cx) / (28 * s * scale)) ** 2 + ((yy - 38 * s) / (34 * s * scale)) ** 2 < 1
    img = np.where(body, 0.55, 0.06).astype(np.float32)
    lungs = np.zeros((size, size), bool)
    for side in (-1, 1):
        lx = cx + side * 12 * s * scale
        lungs |= ((xx - lx) / (8.5 * s * scale)) ** 2 + ((yy - 32 * s) / (19 * s * scale)) ** 2 < 1
    img[lungs] = 0.2
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (yy + 0.02 * (xx - cx) ** 2 / s) / (7 * s * scale) + rng.uniform(0, 6))
    img += np.where(lungs, 0.13 * (ribs > 0.55), 0.0)
    img[np.abs(xx - cx) < 3 * s] += 0.2  # spine / mediastinum
    heart = ((xx - cx - 4 * s) / (9 * s)) ** 2 + ((yy - 42 * s) / (8 * s)) ** 2 < 1
    img[heart] = np.maximum(img[heart], 0.62)
    if kind == "virus":  # diffuse, bilateral interstitial haze
        img += lungs * (0.12 + 0.18 * smooth(rng, size, 6))
    elif kind == "bacteria":  # lobar consolidation in one lower lobe
        side = rng.choice((-1, 1))
        by, bx = (38 + rng.uniform(-4, 6)) * s, cx + side * 12 * s * scale
        blob = np.exp(-(((xx - bx) / (6 * s)) ** 2 + ((yy - by) / (7 * s)) ** 2))
        img += lungs * (0.32 * blob + 0.07 * smooth(rng, size, 6))
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05) + rng.normal(0, 0.025, img.shape)
    im = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))
    return im.filter(ImageFilter.GaussianBlur(0.7 * s))


def _names(rng: np.random.Generator, n_normal: int, n_pneu: int, counters: dict) -> tuple[list[str], list[str]]:
    normal = []
    for i in range(n_normal):
        key, prefix = ("im2", "NORMAL2-") if i % 2 else ("im", "")  # two numbering ranges, as in the real set
        counters[key] += int(rng.integers(1, 9))
        normal.append(f"{prefix}IM-{counters[key]:04d}-0001.jpeg")
    pneu = []
    while len(pneu) < n_pneu:
        counters["person"] += int(rng.integers(1, 4))
        kind = "bacteria" if rng.random() < 0.65 else "virus"
        for _ in range(min(int(rng.integers(1, 3)), n_pneu - len(pneu))):  # 1-2 images per patient
            counters[kind] += int(rng.integers(1, 5))
            pneu.append(f"person{counters['person']}_{kind}_{counters[kind]}.jpeg")
    return normal, pneu


def make(root: Path, seed: int = 0, size: int = 64) -> Path:
    """Write ``root/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` and return
    ``root/chest_xray``."""
    top = Path(root) / "chest_xray"
    rng = np.random.default_rng(seed)
    counters = {"im": 100, "im2": 1400, "person": 0, "bacteria": 0, "virus": 0}
    for split, (n_normal, n_pneu) in SPLITS.items():
        normal, pneu = _names(rng, n_normal, n_pneu, counters)
        for label, names in (("NORMAL", normal), ("PNEUMONIA", pneu)):
            (top / split / label).mkdir(parents=True, exist_ok=True)
            for j, name in enumerate(names):
                kind = "normal" if label == "NORMAL" else name.split("_")[1]
                im = make_image(kind, rng, size)
                if split == "train" and label == "PNEUMONIA" and j == 1:
                    im = im.convert("RGB")  # the real set has a few RGB-mode JPEGs
                im.save(top / split / label / name, quality=90)
    return top
