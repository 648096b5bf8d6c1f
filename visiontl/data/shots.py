"""Label budgets: seeded, stratified and nested few-shot subsets of a training split.

``k`` shots keep ``k`` images of every class. Each class's images are put in a seeded order that
depends only on (seed, class name, file names: not on where the data lives, so a moved or copied
data set draws the same subsets), and a ``k``-shot subset takes the first ``k``: so
with one seed the 5-shot images contain the 1-shot ones, and the 10-shot images the 5-shot ones
(learning curves compare like with like), and the subset does not change when other classes or
files are added.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from visiontl.data.images import DataError

__all__ = ["Shots", "nested_shots", "parse_shots"]

Shots = int | None
"""A label budget: images per class, or ``None`` for all of them."""


def parse_shots(values: str | int | Sequence[str | int] | None) -> list[Shots]:
    """``"1,5,10,all"`` (or ``[1, 5, "all"]``) -> ``[1, 5, 10, None]``, sorted, ``None`` last."""
    if values is None:
        return [None]
    items = values.split(",") if isinstance(values, str) else [values] if isinstance(values, int) else list(values)
    out: list[Shots] = []
    for item in items:
        text = str(item).strip().lower()
        if text in ("all", "none", ""):
            out.append(None)
            continue
        try:
            k = int(text)
        except ValueError:
            raise DataError(f"shots: {item!r} is neither a number of images per class nor 'all'.") from None
        if k < 1:
            raise DataError(f"shots: {k} images per class; give at least 1 (or 'all').")
        out.append(k)
    return sorted(set(out), key=lambda k: (k is None, k or 0))


def _order_key(seed: int, label: str, path: Path) -> str:
    return hashlib.sha256(f"{seed}\0{label}\0{path.name}".encode()).hexdigest()


def nested_shots(samples: Sequence[tuple[Path, str]], shots: Shots, seed: int = 0,
                 what: str = "the training split") -> list[tuple[Path, str]]:
    """The first ``shots`` images of every class in the seeded order (all for ``None``), in the
    samples' original order.

    Raises:
        DataError: a class has fewer than ``shots`` images (the class and its count are named).
    """
    if shots is None:
        return list(samples)
    by_class: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for sample in samples:
        by_class[sample[1]].append(sample)
    short = {c: len(v) for c, v in by_class.items() if len(v) < shots}
    if short:
        listed = ", ".join(f"{c!r} has {n}" for c, n in sorted(short.items(), key=lambda kv: kv[1]))
        raise DataError(f"{shots} shots per class asked, but in {what}: {listed} image(s); use at most "
                        f"{min(short.values())} shots or add images.")
    keep = {id(s) for v in by_class.values()  # ties (one file name twice in a class): the original order
            for s in sorted(v, key=lambda s: _order_key(seed, s[1], Path(s[0])))[:shots]}
    return [s for s in samples if id(s) in keep]
