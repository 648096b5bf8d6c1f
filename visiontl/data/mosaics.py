"""Multi-label sets of real images, built offline: mosaics of single-label images.

A mosaic is a ``grid`` x ``grid`` arrangement of images drawn from a class-folder set (the 8 px
digits, Blue Marble tiles, Fashion-MNIST...); its tags are the classes it shows. Each cell's class is
drawn with the probabilities ``weights`` (a rare class is a rare tag), or left empty (a blank cell)
with ``empty``; a mosaic of blank cells has no tag. Cells of the training mosaics come from the
source's training images only, validation cells from its validation images, so no source image is
seen on both sides.

Written as ``root/images/<split>_<i>.png`` and ``root/labels.csv`` (``path,label,split``; tags joined
by ``|``), which :class:`~visiontl.data.CsvDataModule` reads as multi-label data
(``split_column="split"``). A finished build carries a ``manifest.json`` and is reused; an
interrupted one never leaves a half-written set (:func:`visiontl.core.files.atomic_dir`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from visiontl.core.files import atomic_dir, read_manifest, write_json
from visiontl.data.images import DataError
from visiontl.data.layout import index_folder

__all__ = ["build_mosaics", "tag_rates"]

_FORMAT = 1


def build_mosaics(source: str | os.PathLike[str], root: str | os.PathLike[str], *, grid: int = 2,
                  sizes: Mapping[str, int] | None = None, weights: Mapping[str, float] | None = None,
                  empty: float = 0.25, seed: int = 0) -> Path:
    """Write mosaics of ``source``'s images (``source/train/<class>/*``, ``source/val/<class>/*``).

    Args:
        source: a class-folder set with ``train`` and ``val`` folders (e.g. from
            :func:`visiontl.data.lowres.build_digits` or :func:`visiontl.data.bluemarble.build_tiles`).
        root: output folder.
        grid: cells per side (the mosaic is ``grid`` times the source's image size).
        sizes: mosaics per split (default ``{"train": 200, "val": 200}``). A ``test`` split of a
            source without a ``test/`` folder is drawn from half of its ``val`` images and the
            ``val`` mosaics from the other half (every class split in two, in file order), so no
            source image is in both: thresholds tuned on ``val`` are judged on unseen images.
        weights: class -> relative probability of a cell showing it (default: equal); small
            weights make rare tags.
        empty: probability of a blank (black) cell.
        seed: draw seed.

    Returns:
        ``root / "labels.csv"``.

    Raises:
        DataError: ``source`` lacks a split or a weighted class.
    """
    source, root = Path(source), Path(root)
    sizes = dict(sizes or {"train": 200, "val": 200})
    if grid < 1 or not 0.0 <= empty < 1.0:
        raise DataError(f"build_mosaics: grid must be >= 1 and empty in [0, 1), got {grid} and {empty}.")
    pools = {}
    halves = "test" in sizes and not (source / "test").is_dir()  # test from half of val
    for split in sizes:
        folder = "val" if halves and split == "test" else split
        if not (source / folder).is_dir():
            raise DataError(f"build_mosaics: {source} has no {folder}/ folder of class folders.")
        by_class: dict[str, list[Path]] = {}
        for path, name in index_folder(source / folder):
            by_class.setdefault(name, []).append(path)
        if halves and folder == "val":
            for name, paths in by_class.items():
                if len(paths) < 2:
                    raise DataError(f"build_mosaics: {source}/val/{name} has {len(paths)} image(s); a test split "
                                    f"drawn from val needs at least 2 per class (or a test/ folder).")
                paths.sort()
                by_class[name] = paths[len(paths) // 2:] if split == "test" else paths[:len(paths) // 2]
        pools[split] = by_class
    classes = sorted(pools[next(iter(sizes))])
    weights = dict(weights or {c: 1.0 for c in classes})
    unknown = sorted(set(weights) - set(classes))
    if unknown:
        raise DataError(f"build_mosaics: weights name class(es) {unknown} that {source} does not have ({classes}).")
    names = [c for c in classes if weights.get(c, 0.0) > 0]
    p = np.array([weights[c] for c in names], dtype=np.float64)
    p = p / p.sum()
    manifest = {"format": _FORMAT, "source": str(source.resolve()), "grid": grid, "sizes": sizes,
                "weights": {c: float(weights[c]) for c in names}, "empty": empty, "seed": seed}
    if read_manifest(root) == manifest:
        return root / "labels.csv"
    rng = np.random.default_rng(seed)
    with atomic_dir(root) as tmp:
        (tmp / "images").mkdir(parents=True)
        rows = ["path,label,split"]
        for split, n in sizes.items():
            for i in range(n):
                cells, tags = [], set()
                for _ in range(grid * grid):
                    if rng.random() < empty:
                        cells.append(None)
                        continue
                    name = names[int(rng.choice(len(names), p=p))]
                    pool = pools[split].get(name)
                    if not pool:
                        raise DataError(f"build_mosaics: {source}/{split} has no image of class {name!r}.")
                    cells.append(np.asarray(Image.open(pool[int(rng.integers(len(pool)))]).convert("RGB")))
                    tags.add(name)
                side = next((c.shape[0] for c in cells if c is not None), None)
                if side is None:  # every cell blank: the size of any source image
                    side = np.asarray(Image.open(pools[split][names[0]][0])).shape[0]
                mosaic = np.zeros((grid * side, grid * side, 3), dtype=np.uint8)
                for k, cell in enumerate(cells):
                    if cell is not None:
                        r, c = divmod(k, grid)
                        mosaic[r * side:(r + 1) * side, c * side:(c + 1) * side] = cell[:side, :side]
                file = f"images/{split}_{i:05d}.png"
                Image.fromarray(mosaic).save(tmp / file)
                rows.append(f"{file},{'|'.join(sorted(tags))},{split}")
        (tmp / "labels.csv").write_text("\n".join(rows) + "\n")
        write_json(tmp / "manifest.json", manifest)
    return root / "labels.csv"


def tag_rates(csv: str | os.PathLike[str], split: str = "train") -> dict[str, float]:
    """Share of ``split``'s mosaics carrying each tag (for picking ``weights``)."""
    lines = Path(csv).read_text().splitlines()[1:]
    labels = [line.split(",")[1] for line in lines if line.rsplit(",", 1)[-1] == split]
    tags: dict[str, int] = {}
    for label in labels:
        for t in filter(None, label.split("|")):
            tags[t] = tags.get(t, 0) + 1
    return {t: n / max(len(labels), 1) for t, n in sorted(tags.items())}
