"""Tiny stand-in for HAM10000 (the ISIC 2018 task 3 training data).

Real dataset: HAM10000 (Tschandl, Rosendahl & Kittler, 2018, Harvard Dataverse,
doi:10.7910/DVN/DBW86T), 10,015 dermatoscopic 600x450 RGB JPEGs of 7,470 lesions, 7 diagnoses
(nv 6,705, mel 1,113, bkl 1,099, bcc 514, akiec 327, vasc 142, df 115). Laid out as::

    root/HAM10000_metadata.csv           # lesion_id,image_id,dx,dx_type,age,sex,localization
    root/HAM10000_images_part_1/ISIC_0024306.jpg ... ISIC_0029305.jpg
    root/HAM10000_images_part_2/ISIC_0029306.jpg ... ISIC_0034320.jpg

A row reads e.g. ``HAM_0000118,ISIC_0027419,bkl,histo,80.0,male,scalp``. Many lesions have
several images (same ``lesion_id``, different ``image_id``), so a validation split must be drawn
by lesion. Rows are grouped by diagnosis, images of one lesion adjacent. Licence: CC BY-NC 4.0.

This fixture: 64x48 (W x H) RGB JPEGs on skin-coloured background: nv 12 images (10 lesions),
mel 6 (4 lesions), bkl 6 (5 lesions); lesions with 2 images get two shifted / re-lit views of
the same lesion. nv: round, even medium brown; mel: larger, irregular border, dark brown with
black and blue-grey areas; bkl: light tan, waxy speckled surface. Images go to part_1 or part_2
by their id, as in the real set. ``missing=k`` adds k more CSV rows whose images are not written.
Deterministic for a seed.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from fixtures import smooth
from PIL import Image

HEADER = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
# dx -> (lesions, how many of them have two images)  => images: nv 12, mel 6, bkl 6
LESIONS = {"bkl": (5, 1), "mel": (4, 2), "nv": (10, 2)}
DX_TYPES = {"nv": ("follow_up", "histo", "consensus"), "mel": ("histo",), "bkl": ("histo", "consensus")}
SITES = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "scalp", "neck")
PART_1_LAST = 29305  # ISIC_0024306..ISIC_0029305 are in part 1, the rest in part 2


def _lesion(dx: str, rng: np.random.Generator) -> dict:
    """Parameters of one lesion, shared by all its images."""
    return {
        "dx": dx,
        "skin": np.array((225, 175, 160), np.float32) * rng.uniform(0.85, 1.05),
        "radius": {"nv": 11, "mel": 16, "bkl": 13}[dx] * rng.uniform(0.8, 1.2),
        "aspect": rng.uniform(0.8, 1.25),
        "border": rng.normal(0, 1, 8) * {"nv": 0.04, "mel": 0.15, "bkl": 0.08}[dx],  # angular harmonics
        "tone": rng.uniform(0.85, 1.15),
        "seed": int(rng.integers(1 << 31)),
    }


def make_image(lesion: dict, rng: np.random.Generator, w: int = 64, h: int = 48) -> Image.Image:
    """One dermatoscopic view of ``lesion`` (a new shift, lighting and noise each call)."""
    dx = lesion["dx"]
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    cy, cx = h / 2 + rng.uniform(-3, 3), w / 2 + rng.uniform(-4, 4)
    rot = rng.uniform(-0.3, 0.3)
    ang = np.arctan2(yy - cy, xx - cx) + rot
    r = np.hypot(xx - cx, (yy - cy) * lesion["aspect"])
    border = lesion["radius"] * (1 + sum(a * np.sin((k + 2) * ang + k) for k, a in enumerate(lesion["border"])))
    inside = np.clip((border - r) / 1.5, 0, 1)[:, :, None]  # soft edge
    img = lesion["skin"] * (0.92 + 0.16 * smooth(rng, (h, w), 4)[:, :, None])
    own = np.random.default_rng(lesion["seed"])  # lesion texture: identical in both views
    tex = smooth(own, (h, w), 7)[:, :, None]
    if dx == "nv":
        colour = np.array((140, 90, 65), np.float32) * lesion["tone"] * (0.95 + 0.1 * tex)
    elif dx == "mel":
        dark = np.array((70, 40, 35), np.float32) * lesion["tone"]
        blue = np.array((95, 100, 125), np.float32)
        colour = np.where(tex > 0.6, blue, dark * (0.6 + 0.8 * tex))
    else:  # bkl
        colour = np.array((185, 140, 105), np.float32) * lesion["tone"] * (0.85 + 0.3 * tex)
        colour = colour * (1 - 0.25 * (own.random((h, w, 1)) < 0.08))  # waxy speckles
    img = img * (1 - inside) + colour * inside
    if rng.random() < 0.3:  # a hair across the field
        a, b = rng.uniform(-1, 1), rng.uniform(0, h)
        img[np.abs(yy - (a * xx + b)) < 0.6] *= 0.35
    vignette = np.clip(1.25 - np.hypot((xx - w / 2) / w, (yy - h / 2) / h) * 1.1, 0.4, 1.0)[:, :, None]
    img = img * vignette * rng.uniform(0.92, 1.08) + rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make(root: Path, seed: int = 0, missing: int = 0) -> Path:
    """Write ``root/HAM10000_metadata.csv`` and the images under ``root/HAM10000_images_part_{1,2}/``;
    return the CSV path. ``missing``: extra CSV rows whose images are not written."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    n_images = sum(n + two for n, two in LESIONS.values()) + missing
    n_lesions = sum(n for n, _ in LESIONS.values()) + missing
    # half the ids in each part, as in the real set
    image_ids = np.concatenate([
        rng.choice(np.arange(24306, PART_1_LAST + 1), (n_images + 1) // 2, replace=False),
        rng.choice(np.arange(PART_1_LAST + 1, 34321), n_images // 2, replace=False),
    ])
    image_ids = list(image_ids[rng.permutation(n_images)])
    lesion_ids = list(rng.choice(7470, n_lesions, replace=False))
    absent = [("nv", "mel", "bkl")[k % 3] for k in range(missing)]  # dx of the rows without images
    rows, images = [], {}
    for dx, (n, two) in LESIONS.items():
        group = [(False, k < two) for k in range(n)] + [(True, False) for d in absent if d == dx]
        for order in rng.permutation(len(group)):
            skip, pair = group[order]
            lesion = _lesion(dx, rng)
            meta = (
                str(rng.choice(DX_TYPES[dx])),
                f"{5 * int(rng.integers(3, 18)):.1f}",
                str(rng.choice(("male", "female"))),
                str(rng.choice(SITES)),
            )
            lesion_id = f"HAM_{int(lesion_ids.pop()):07d}"
            for _ in range(2 if pair else 1):
                image_id = f"ISIC_{int(image_ids.pop()):07d}"
                rows.append((lesion_id, image_id, dx, *meta))
                if not skip:
                    images[image_id] = make_image(lesion, rng)
    for image_id, im in images.items():
        part = 1 if int(image_id[5:]) <= PART_1_LAST else 2
        folder = root / f"HAM10000_images_part_{part}"
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{image_id}.jpg", quality=92)
    csv_path = root / "HAM10000_metadata.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(rows)
    return csv_path
