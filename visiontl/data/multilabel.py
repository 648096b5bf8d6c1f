"""Multi-label data: several tags per image (chest-film findings, land-cover tags).

Inside the data layer a multi-label sample keeps the ``(path, label string)`` shape of a
single-label one, so splits, label budgets, frames, the data check and ``splits.csv`` handle both
alike. The label string is the image's tag set in one canonical form, :func:`encode_tags`:

- the positive tags, sorted, joined by ``|`` (``"effusion|nodule"``);
- an uncertain tag (CheXpert's ``-1``, kept under the ``ignore`` policy) as ``?tag``
  (``"effusion|?nodule"``): the loss and the metrics leave that (image, tag) pair out;
- an image with no tag at all is ``"|"`` (``""`` keeps meaning "no label": unlabelled and
  prediction images).

CSV input comes in two shapes, both read by :func:`row_tags`:

- one column of tags joined by a separator (``tag_sep``, ``|`` by default; an empty cell is an image
  with no tag);
- one column per tag (``tag_columns``: the ChestX-ray14 / CheXpert shape) holding ``1`` (present),
  ``0`` or an empty cell (absent; CheXpert leaves findings not mentioned empty) and ``-1``
  (uncertain), which the ``uncertain`` policy resolves: ``ignore`` (the default: left out of the
  loss and the metrics for that tag, CheXpert's U-Ignore), ``positive`` (U-Ones) or ``negative``
  (U-Zeros).

Validation splits drawn from the training data are iteratively stratified over the tags
(:func:`iterative_split`, Sechidis et al. 2011), so a rare tag is not left out of validation by
chance; a tag with too few images to appear on both sides is named (:func:`split_gaps`).

Torch-free (numpy only), like the rest of the data layout code.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

from visiontl.data.images import DataError

__all__ = ["NO_TAGS", "TAG_SEP", "UNCERTAIN", "UNCERTAIN_POLICIES", "decode_tags", "encode_tags", "is_multilabel_label",
           "iterative_split", "row_tags", "split_gaps", "tag_counts", "tag_targets", "tag_vocabulary"]

TAG_SEP = "|"
"""Joins the tags of one image in the canonical label string (and is the CSV default)."""
NO_TAGS = TAG_SEP
"""The canonical label string of an image with no tag."""
UNCERTAIN = "?"
"""Prefix of an uncertain tag in the canonical string (kept under the ``ignore`` policy)."""
UNCERTAIN_POLICIES = ("ignore", "positive", "negative")
Policy = Literal["ignore", "positive", "negative"]

_TRUE = {"1", "1.0", "true", "yes"}
_FALSE = {"", "0", "0.0", "false", "no"}
_UNSURE = {"-1", "-1.0"}


def check_tag(tag: str, where: str) -> str:
    """``tag`` stripped, or a :class:`DataError` when it cannot be a tag name (empty, holding the
    separator or starting with the uncertain marker)."""
    tag = tag.strip()
    if not tag or TAG_SEP in tag or tag.startswith(UNCERTAIN):
        raise DataError(f"{where}: {tag!r} is not a usable tag name (it must be non-empty, must not contain "
                        f"{TAG_SEP!r} and must not start with {UNCERTAIN!r}); rename it.")
    return tag


def encode_tags(positive: Iterable[str], uncertain: Iterable[str] = ()) -> str:
    """The canonical label string of an image's tags (see the module docstring)."""
    pos = set(positive)
    unsure = set(uncertain) - pos
    parts = sorted(pos) + sorted(UNCERTAIN + t for t in unsure)
    return TAG_SEP.join(parts) if parts else NO_TAGS


def decode_tags(label: str) -> tuple[frozenset[str], frozenset[str]]:
    """``(positive tags, uncertain tags)`` of a canonical label string (both empty for ``"|"``)."""
    parts = [p for p in label.split(TAG_SEP) if p]
    return (frozenset(p for p in parts if not p.startswith(UNCERTAIN)),
            frozenset(p[1:] for p in parts if p.startswith(UNCERTAIN)))


def is_multilabel_label(label: str) -> bool:
    """Whether a label string is a canonical tag set rather than one class name."""
    return TAG_SEP in label


def tag_targets(label: str, tags: Sequence[str]) -> np.ndarray:
    """The training target of one image: ``float32[len(tags)]`` with 1 (tag present), 0 (absent)
    and -1 (uncertain, or no label at all: left out of the loss and the metrics)."""
    if not label:  # unlabelled / prediction images
        return np.full(len(tags), -1.0, dtype=np.float32)
    pos, unsure = decode_tags(label)
    return np.array([1.0 if t in pos else -1.0 if t in unsure else 0.0 for t in tags], dtype=np.float32)


def tag_vocabulary(labels: Iterable[str]) -> list[str]:
    """The tags that occur (as positive or uncertain) in canonical label strings, sorted."""
    found: set[str] = set()
    for label in labels:
        pos, unsure = decode_tags(label)
        found |= pos | unsure
    return sorted(found)


def tag_counts(labels: Iterable[str], tags: Sequence[str]) -> list[int]:
    """Images with each tag present (uncertain ones not counted), in ``tags`` order."""
    counts: Counter[str] = Counter()
    for label in labels:
        counts.update(decode_tags(label)[0])
    return [counts[t] for t in tags]


def row_tags(row: Mapping[str, str | None], where: str, *, label_column: str = "label",
             tag_columns: Sequence[str] | None = None, tag_sep: str = TAG_SEP, uncertain: Policy = "ignore",
             no_tag: str | None = None) -> str:
    """The canonical label string of one CSV row, from its tag columns or its joined tag column
    (where an empty cell, or one that reads ``no_tag`` such as ChestX-ray14's ``No Finding``, is an
    image with no tag).

    ``where`` names the row in errors (``file, line N``). Raises :class:`DataError` for a value a tag
    column cannot hold (anything but 1, 0, empty and -1) or a tag name that is not usable.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(f"uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, got {uncertain!r}.")
    if tag_columns:
        pos, unsure = [], []
        for column in tag_columns:
            value = (row.get(column) or "").strip().lower()
            if value in _TRUE:
                pos.append(column)
            elif value in _UNSURE:
                {"ignore": unsure, "positive": pos, "negative": []}[uncertain].append(column)
            elif value not in _FALSE:
                raise DataError(f"{where}: column {column!r} holds {row.get(column)!r}; a tag column holds 1 (present), "
                                f"0 or empty (absent) or -1 (uncertain).")
        return encode_tags(pos, unsure)
    cell = (row.get(label_column) or "").strip()
    if no_tag is not None and cell == no_tag:
        return NO_TAGS
    tags = {check_tag(t, f"{where}, column {label_column!r}") for t in cell.split(tag_sep) if t.strip()}
    return encode_tags(tags)


def iterative_split(units: Sequence[tuple[Hashable, frozenset[str], int]], fraction: float, seed: int
                    ) -> tuple[set[Hashable], set[Hashable]]:
    """Iterative stratification (Sechidis, Tsoumakas and Vlahavas 2011) of ``units`` into
    ``(train ids, val ids)`` with about ``fraction`` of the images and of each tag's positives in
    validation.

    A unit is ``(id, its tags, its number of images)``: one image, or a group of images (a patient)
    that must stay on one side. The rarest tag still to place goes first: its units are spread one by
    one to the side that most lacks that tag (ties: the side that lacks most images, then a seeded
    coin), so rare tags are divided before common ones use up the room. Units without a tag are
    divided by image count at the end. Deterministic for a ``seed``.
    """
    if not 0 < fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {fraction}.")
    rng = random.Random(seed)
    order = list(units)
    rng.shuffle(order)
    total = sum(n for _, _, n in order)
    want_images = {"val": fraction * total, "train": (1 - fraction) * total}
    need: dict[str, dict[str, float]] = {"val": Counter(), "train": Counter()}
    for _, tags, n in order:
        for t in tags:
            need["val"][t] += fraction * n
            need["train"][t] += (1 - fraction) * n
    side_of: dict[Hashable, str] = {}
    remaining = [u for u in order if u[1]]
    while remaining:
        left: Counter[str] = Counter()
        for _, tags, n in remaining:
            for t in tags:
                left[t] += n
        tag = min(left, key=lambda t: (left[t], t))  # the rarest tag still to place
        for unit in [u for u in remaining if tag in u[1]]:
            uid, tags, n = unit
            side = max(("val", "train"), key=lambda s: (need[s][tag], want_images[s], rng.random()))
            side_of[uid] = side
            want_images[side] -= n
            for t in tags:
                need[side][t] -= n
        remaining = [u for u in remaining if u[0] not in side_of]
    for uid, _, n in (u for u in order if not u[1]):
        side = max(("val", "train"), key=lambda s: (want_images[s], rng.random()))
        side_of[uid] = side
        want_images[side] -= n
    train = {uid for uid, side in side_of.items() if side == "train"}
    return train, set(side_of) - train


def split_gaps(train_labels: Iterable[str], val_labels: Iterable[str], tags: Sequence[str]) -> dict[str, list[str]]:
    """Tags missing from one side of a split: ``{"train": [...], "val": [...]}`` (positives only)."""
    have_train = set(t for label in train_labels for t in decode_tags(label)[0])
    have_val = set(t for label in val_labels for t in decode_tags(label)[0])
    return {"train": [t for t in tags if t not in have_train], "val": [t for t in tags if t not in have_val]}
