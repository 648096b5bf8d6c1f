"""Check a dataset before training on it: ``visiontl check-data PATH`` and :func:`check_data`.

The source is a class-per-folder tree (``PATH/<class>/**``), a tree with split folders
(``PATH/train|val|valid|validation|test/<class>/**``), a CSV of (path, label[, split]) rows, or a
``{split: [(path, label), ...]}`` dict (a datamodule's ``splits``). Every finding is an ``error``
(training on the data as it is gives wrong or misleading results) or a ``warning`` (worth a look):

* ``unreadable`` (error): missing, truncated or corrupt files, each with its reason;
* ``not_taken`` (warning): entries of a dataset folder named like images that its layout leaves
  out (a dangling symlink, a folder or FIFO named ``x.png``, an image outside the class folders);
* ``mixed_channels`` / ``mixed_dtypes`` (warning): several channel counts or several dtypes / bit
  depths (``uint8`` next to ``uint16``), with the number of images of each;
* ``tiny_images`` (warning): images whose shorter side is below ``min_size``;
* class counts per split; ``imbalance`` (warning): largest / smallest training class above
  ``max_imbalance``; ``missing_in_train`` (error): classes in val / test without training images;
  ``few_images`` (warning): classes with fewer than 2 training images;
* for multi-label data (several tags per image, :mod:`visiontl.data.multilabel`) the same per tag:
  images with each tag per split, plus ``(no tag)``; ``missing_in_train``, ``few_images``,
  ``imbalance`` (the most common over the rarest tag); ``absent_in_split`` (warning): a tag with
  training images but none in validation or test, where it cannot be scored; ``rare_tags``
  (warning): tags on under 5 % of the training images; and the strongest co-occurrences
  (``cooccurrence``: pairs of tags by how often they appear together, with their Jaccard index);
* ``exact_duplicates`` (warning): identical decoded pixels (BLAKE2b of the array bytes, shape and
  dtype), or one file listed twice;
* ``near_duplicates`` (warning): difference hashes (dHash) within ``near_threshold`` bits, see
  :func:`dhash` and :mod:`visiontl.data.neardup`; one line per cluster of
  near-identical images;
* ``leakage`` (error): exact or near duplicates shared between train, val and test: the model is
  scored on images it was trained on, which inflates every validation and test metric;
* ``conflicting_labels`` (error): one file, or identical pixels, under two different labels.

``deep=False`` (what training runs first) reads only image headers where the format allows it and
skips pixel hashing: counts, imbalance, modes and tiny images, plus files listed twice, but no
duplicate search; files whose header cannot be read are a warning (``unreadable_header``), since
the datamodule decodes every file itself and applies its ``on_bad_image`` policy.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image, ImageMode
from visiontl.core.progress import progress_bar as tqdm  # drawn on a terminal only

from visiontl.data.formats import TIFF_EXTENSIONS, Frame, is_dicom
from visiontl.data.images import DataError, ImageReadError, check_pixels, read_raw, scan_frame
from visiontl.data.layout import folder_splits, not_taken, read_csv_rows, source_kind
from visiontl.data.multilabel import TAG_SEP, decode_tags, row_tags
from visiontl.data.pixels import to_unit
from visiontl.data.streamcodec import named_bomb
from visiontl.data.neardup import near_duplicate_clusters, near_duplicate_pairs

__all__ = [
    "DataReport",
    "Finding",
    "check_data",
    "default_report_path",
    "dhash",
    "image_digest",
    "near_duplicate_pairs",
]

ERROR, WARNING = "error", "warning"
Source = str | os.PathLike[str] | Mapping[str, Sequence[tuple[Any, str]]]

_PROGRESS_FROM = 200  # files; fewer are checked without a progress bar
_FLAT = 1.0 / 255.0  # thumbnails with a smaller range have no reliable dHash
_CLUSTER_SHOWN = 6  # members named in a near-duplicate cluster's line
_SPLIT_ORDER = ("train", "val", "test")
_UNLABELLED = frozenset({"predict", "target", "target_eval", "unlabelled"})  # no labels: no class or leakage checks
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Finding:
    """One problem found in a dataset.

    Attributes:
        severity: ``"error"`` or ``"warning"``.
        code: stable identifier (``"leakage"``, ``"unreadable"``...; see the module docstring).
        message: one sentence saying what is wrong and what to do.
        items: the files, pairs, groups or classes concerned, one readable line each.
    """

    severity: str
    code: str
    message: str
    items: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the number of items."""
        return {"severity": self.severity, "code": self.code, "message": self.message,
                "count": len(self.items), "items": list(self.items)}


@dataclass
class DataReport:
    """What :func:`check_data` found.

    Attributes:
        counts: ``{split: {class: images}}`` (rows of the listing, readable or not).
        findings: errors first, then warnings.
        root: the dataset folder (or the CSV's folder); item paths are shown relative to it.
        deep: whether pixels were decoded and hashed.
        n_files: distinct files checked.
        channels: ``{channel count: images}`` over readable files.
        dtypes: ``{dtype: images}`` over readable files.
        min_side: shortest image side seen (``None`` without readable files).
        max_side: longest image side seen.
        imbalance: largest / smallest training class (``None`` without training images).
        settings: the thresholds used.
        task: ``multiclass`` or ``multilabel`` (``counts`` are then images per tag).
        cooccurrence: multi-label: the tag pairs seen together most often in training, each
            ``{"tags": [a, b], "images": n, "jaccard": j}``.
    """

    counts: dict[str, dict[str, int]]
    findings: list[Finding]
    root: str | None = None
    deep: bool = True
    n_files: int = 0
    channels: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    min_side: int | None = None
    max_side: int | None = None
    imbalance: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    task: str = "multiclass"
    cooccurrence: list[dict[str, Any]] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        """Findings of severity ``error``."""
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        """Findings of severity ``warning``."""
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form of the whole report."""
        return {
            "root": self.root, "deep": self.deep, "ok": self.ok, "n_files": self.n_files,
            "n_errors": len(self.errors), "n_warnings": len(self.warnings),
            "counts": self.counts, "imbalance": self.imbalance,
            "channels": self.channels, "dtypes": self.dtypes, "min_side": self.min_side, "max_side": self.max_side,
            "settings": self.settings, "findings": [f.to_dict() for f in self.findings],
            "task": self.task, "cooccurrence": self.cooccurrence,
        }

    def summary(self, max_items: int = 10, max_classes: int = 30) -> str:
        """Readable text: counts per split and class, then the findings grouped by severity."""
        mode = "decoded pixels" if self.deep else "headers only"
        lines = [f"Checked {self.n_files} file(s) in {self.root or 'the given lists'} ({mode})"]
        lines += _count_table(self.counts, max_classes, "tags" if self.task == "multilabel" else "classes")
        if self.imbalance is not None:
            what = "most common / rarest tag" if self.task == "multilabel" else "largest / smallest class"
            lines.append(f"train imbalance ({what}): {self.imbalance:.1f}")
        if self.cooccurrence:
            pairs = ", ".join(f"{a} + {b}: {c['images']} (Jaccard {c['jaccard']:.2f})"
                              for c in self.cooccurrence for a, b in [c["tags"]])
            lines.append(f"tags most often together in train: {pairs}")
        if self.channels:
            chans = ", ".join(f"{k} channel(s): {v}" for k, v in self.channels.items())
            dtypes = ", ".join(f"{k}: {v}" for k, v in self.dtypes.items())
            lines.append(f"pixels: {chans}; {dtypes}; sides {self.min_side}..{self.max_side} px")
        for title, group in (("Errors", self.errors), ("Warnings", self.warnings)):
            if group:
                lines.append(f"{title} ({len(group)}):")
                lines += [line for f in group for line in _finding_lines(f, max_items)]
        if self.errors:
            lines.append(f"{len(self.errors)} error(s), {len(self.warnings)} warning(s): "
                         f"fix the errors before training.")
        else:
            lines.append(f"No errors ({len(self.warnings)} warning(s) to review).")
        return "\n".join(lines)


def _count_table(counts: Mapping[str, Mapping[str, int]], max_classes: int, what: str = "classes") -> list[str]:
    splits = [s for s in counts if counts[s]]
    classes = sorted({c for s in splits for c in counts[s]})
    if not classes:
        return []
    width = max(5, *(len(c) for c in classes[:max_classes]))
    cols = [max(5, len(s)) for s in splits]
    lines = ["  " + " " * width + "".join(f"  {s:>{w}}" for s, w in zip(splits, cols))]
    for name in classes[:max_classes]:
        lines.append(f"  {name:<{width}}" + "".join(f"  {counts[s].get(name, 0):>{w}}" for s, w in zip(splits, cols)))
    if len(classes) > max_classes:
        lines.append(f"  ... and {len(classes) - max_classes} more {what} (see the JSON report)")
    if what == "classes":  # images carry several tags: a column's tags do not add up to its images
        lines.append(f"  {'total':<{width}}" + "".join(f"  {sum(counts[s].values()):>{w}}" for s, w in zip(splits, cols)))
    return lines


def _finding_lines(finding: Finding, max_items: int) -> list[str]:
    lines = [f"  [{finding.code}] {finding.message}"]
    lines += [f"    {item}" for item in finding.items[:max_items]]
    if len(finding.items) > max_items:
        lines.append(f"    ... and {len(finding.items) - max_items} more")
    return lines


# -- sources ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One listed image: its split, path, label and file identity (resolved path)."""

    split: str
    path: Path
    label: str
    key: str


def _load_csv(path: Path, path_column: str, label_column: str, suffix: str = "",
              image_dirs: Sequence[str] = (), root: str | os.PathLike[str] | None = None, tags: TagSettings | None = None,
              ) -> tuple[dict[str, list[tuple[Path, str]]], list[str], bool]:
    """Rows of a CSV as splits (``split`` column, else all ``train``), the unusable rows, and whether
    the labels are tag sets (multi-label: ``tags`` says how they are given, as the datamodule's
    ``task`` / ``tag_columns`` / ``tag_sep`` / ``uncertain`` do)."""
    tags = tags or TagSettings()
    rows = read_csv_rows(path, path_column, label_column, root, suffix, image_dirs,
                         columns_hint="name the columns with --path-column / --label-column / --tag-columns",
                         tag_columns=tags.columns, uncertain=tags.uncertain)
    multilabel = tags.multilabel(row.label for row in rows)
    if multilabel and not tags.columns:  # one column of joined tags: in canonical form (empty: no tag)
        rows = [replace(row, label=row_tags({"label": row.label}, f"{path}, line {row.line}", tag_sep=tags.sep,
                                            no_tag=tags.no_tag))
                for row in rows]
    splits: dict[str, list[tuple[Path, str]]] = {}
    bad: list[str] = []
    for row in rows:
        if row.path is None or not row.label:
            bad.append(f"line {row.line}: empty {path_column if row.path is None else label_column!r} value")
            continue
        splits.setdefault(row.split, []).append((row.path, row.label))
    return splits, bad, multilabel


@dataclass(frozen=True)
class TagSettings:
    """How a CSV gives multi-label data (the datamodule's settings of the same names)."""

    task: str = "auto"
    columns: Sequence[str] | None = None
    sep: str = TAG_SEP
    uncertain: str = "ignore"
    no_tag: str | None = None

    def multilabel(self, labels: Iterable[str]) -> bool:
        """Whether labels read as given are tag sets: said so, tag columns, or (``auto``) a separator in a cell."""
        if self.task != "auto" or self.columns:
            return self.task == "multilabel" or bool(self.columns)
        return any(self.sep in label for label in labels)


def _load(source: Source, path_column: str, label_column: str, suffix: str = "", image_dirs: Sequence[str] = (),
          root: str | os.PathLike[str] | None = None, tags: TagSettings | None = None,
          ) -> tuple[list[_Entry], Path | None, list[str], bool]:
    """Entries of ``source``, the folder to show paths relative to, unusable CSV rows, and whether the
    labels are tag sets (a datamodule's splits say it through ``tags.task``)."""
    bad: list[str] = []
    multilabel = bool(tags and tags.task == "multilabel")
    if isinstance(source, Mapping):
        splits = {str(k): [(Path(p), str(c)) for p, c in v] for k, v in source.items()}
        root = _common_folder(p for items in splits.values() for p, _ in items)
    else:
        path = Path(source).expanduser()
        if source_kind(path) == "folder":
            splits, root = folder_splits(path), path
        else:
            (splits, bad, multilabel) = _load_csv(path, path_column, label_column, suffix, image_dirs, root, tags)
            root = Path(root).expanduser() if root else path.parent
    entries = [_Entry(split, p, label, _file_key(p)) for split, items in splits.items() for p, label in items]
    if not entries:
        raise DataError("The dataset lists no images; nothing to check.")
    return entries, root, bad, multilabel


def _file_key(path: Path) -> str:
    try:
        return str(path.resolve())
    except OSError:
        return os.path.abspath(path)


def _common_folder(paths: Iterable[Path]) -> Path | None:
    try:
        return Path(os.path.commonpath([os.path.abspath(p.parent) for p in paths]))
    except ValueError:  # no paths, or paths on different drives
        return None


def default_report_path(source: str | os.PathLike[str]) -> Path:
    """Where ``check-data`` writes its JSON report without ``--json``.

    ``PATH/check-data.json`` for a writable dataset folder, ``<csv stem>.check-data.json`` next to a
    CSV in a writable folder, else ``check-data.json`` in the current directory.
    """
    path = Path(source).expanduser()
    if path.is_dir() and os.access(path, os.W_OK):
        return path / "check-data.json"
    if path.is_file() and os.access(path.parent, os.W_OK):
        return path.parent / f"{path.stem}.check-data.json"
    return Path.cwd() / "check-data.json"


# -- per-file inspection ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Info:
    """What one readable file holds."""

    height: int
    width: int
    channels: int
    dtype: str
    digest: str | None = None
    dhash: int | None = None


def image_digest(image: np.ndarray) -> str:
    """BLAKE2b of an array's shape, dtype and bytes: equal for identical decoded pixels only."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.shape}|{image.dtype.str}|".encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


def _gray(image: np.ndarray) -> np.ndarray:
    """Float 2-D grey image in ``[0, 1]`` from any HWC array (alpha dropped, bands averaged).

    8 and 16-bit images are scaled by their type's range, as a model sees them
    (:func:`visiontl.data.pixels.to_unit`), so a flat one stays flat; others are stretched to their
    own range: a hash compares neighbours, and 32-bit or float data (a few thousand levels in a
    32-bit type) would otherwise all look flat."""
    if image.dtype in (np.uint8, np.uint16):
        unit = to_unit(image)
        return unit @ _LUMA if unit.shape[2] == 3 else unit.mean(axis=2)
    arr = np.nan_to_num(image.astype(np.float32))
    gray = arr @ _LUMA if arr.shape[2] == 3 else arr.mean(axis=2)
    low, high = float(gray.min()), float(gray.max())
    return (gray - low) / (high - low) if high > low else np.zeros_like(gray)


def dhash(image: np.ndarray) -> int | None:
    """64-bit difference hash of an HWC image, or ``None`` for a (nearly) flat one.

    The image is turned grey and normalised to ``[0, 1]`` (any bit depth or band count, see
    :func:`_gray`), quantised to 8 bits and hashed by imagehash's ``dhash`` (Lanczos-resized to
    9 x 8; each bit says whether a pixel is brighter than its left neighbour). Brightness, contrast,
    compression and resizing barely change it; imagehash's hash found more re-encoded and resized
    copies than the box-filtered one visiontl used to compute, at the same precision
    (``benchmarks/results/by_hand.md``). Flat images (a box thumbnail range below 1/255) would all
    hash to noise or zero, so they get no hash and are left out of the near-duplicate search
    (identical ones are still caught as exact duplicates).
    """
    gray = _gray(image)
    thumb = np.asarray(Image.fromarray(gray.astype(np.float32)).resize((9, 8), Image.Resampling.BOX))
    if float(thumb.max() - thumb.min()) < _FLAT:
        return None
    hashed = imagehash.dhash(Image.fromarray(np.round(gray * 255.0).astype(np.uint8)))
    return int.from_bytes(np.packbits(hashed.hash.ravel()).tobytes(), "big")


def _header(path: Path, max_pixels: int | None = None, frame: Frame = "error") -> _Info:
    """Size, channels and dtype without decoding the pixels (PIL formats); full decode otherwise."""
    if path.suffix.lower() in TIFF_EXTENSIONS or is_dicom(path):
        return _describe(read_raw(path, max_pixels, frame))
    try:
        with Image.open(path) as im:
            mode, (width, height), info = im.mode, im.size, dict(im.info)
    except FileNotFoundError as err:
        raise ImageReadError(path, "file not found") from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"refused by Pillow as a decompression bomb ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(path, f"header unreadable ({type(err).__name__}: {err})") from err
    check_pixels(path, height, width, max_pixels)
    if mode == "P":
        channels, dtype = (4 if "transparency" in info else 1), "uint8"
    elif mode == "1":
        channels, dtype = 1, "uint8"
    elif mode.startswith("I;16"):
        channels, dtype = 1, "uint16"
    else:
        try:
            spec = ImageMode.getmode(mode)
        except KeyError:  # a mode PIL cannot describe: decode it
            return _describe(read_raw(path, max_pixels))
        channels, dtype = len(spec.bands), np.dtype(spec.typestr).name
    return _Info(height, width, channels, dtype)


def _describe(image: np.ndarray, deep: bool = False) -> _Info:
    height, width, channels = image.shape
    if not deep:
        return _Info(height, width, channels, image.dtype.name)
    return _Info(height, width, channels, image.dtype.name, image_digest(image), dhash(image))


def _inspect(paths: Mapping[str, Path], deep: bool, progress: bool, max_pixels: int | None = None,
             frames: str = "error") -> tuple[dict[str, _Info], dict[str, str]]:
    """Read every distinct file once: ``({key: info}, {key: reason it cannot be read})``; a
    multi-frame DICOM is read by its middle frame unless ``frames`` is ``error``."""
    frame = scan_frame(frames)
    infos: dict[str, _Info] = {}
    failed: dict[str, str] = {}
    bar = tqdm(paths.items(), desc="Checking images", unit="img", leave=False,
               disable=not progress or len(paths) < _PROGRESS_FROM)
    for key, path in bar:
        try:
            infos[key] = (_describe(read_raw(path, max_pixels, frame), deep=True) if deep
                          else _header(path, max_pixels, frame))
        except ImageReadError as err:  # a bomb by its size against the pixel limit, as prepare-data names it
            failed[key] = named_bomb(err, max_pixels).reason
    return infos, failed


# -- checks -------------------------------------------------------------------------------------


class _Namer:
    """Shows paths relative to the dataset root when they are under it."""

    def __init__(self, root: Path | None) -> None:
        self.root = os.path.abspath(root) if root is not None else None

    def __call__(self, path: Path) -> str:
        full = os.path.abspath(path)
        if self.root and (full == self.root or full.startswith(self.root.rstrip(os.sep) + os.sep)):
            return os.path.relpath(full, self.root)
        return str(path)


def _split_rank(split: str) -> tuple[int, str]:
    return (_SPLIT_ORDER.index(split) if split in _SPLIT_ORDER else len(_SPLIT_ORDER), split)


def _counts(entries: Sequence[_Entry]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for split in sorted({e.split for e in entries}, key=_split_rank):
        per_class = Counter(e.label for e in entries if e.split == split and e.label)
        counts[split] = dict(sorted(per_class.items()))
    return counts


NO_TAG_ROW = "(no tag)"
RARE_TAG = 0.05  # a tag on fewer training images than this share is rare


def _tag_counts(entries: Sequence[_Entry]) -> dict[str, dict[str, int]]:
    """Multi-label: images with each tag present per split, and ``(no tag)`` images."""
    counts: dict[str, dict[str, int]] = {}
    for split in sorted({e.split for e in entries}, key=_split_rank):
        per_tag: Counter[str] = Counter()
        for e in entries:
            if e.split == split and e.label:
                present = decode_tags(e.label)[0]
                per_tag.update(present or {NO_TAG_ROW})
        counts[split] = dict(sorted(per_tag.items()))
    return counts


def _check_tags(counts: Mapping[str, Mapping[str, int]], entries: Sequence[_Entry], max_imbalance: float
                ) -> tuple[list[Finding], float | None, list[dict[str, Any]]]:
    """Multi-label counterpart of :func:`_check_classes`: per-tag findings, the imbalance ratio and the
    strongest co-occurrences in training."""
    train = {t: n for t, n in counts.get("train", {}).items() if n > 0 and t != NO_TAG_ROW}
    others = {s: c for s, c in counts.items() if s != "train" and s not in _UNLABELLED}
    findings: list[Finding] = []
    absent = sorted({t for per in others.values() for t in per if t != NO_TAG_ROW} - set(train))
    if absent:
        items = [f"{t}: 0 in train, " + ", ".join(f"{others[s][t]} in {s}" for s in others if others[s].get(t))
                 for t in absent]
        findings.append(Finding(ERROR, "missing_in_train", f"{len(absent)} tag(s) have images in val/test but none "
                                f"in train; the model cannot learn them.", items))
    n_train = sum(1 for e in entries if e.split == "train" and e.label)
    if not train:
        findings.append(Finding(ERROR, "no_training_images", "No training image has a tag; there is nothing to learn."))
        return findings, None, []
    few = sorted(t for t, n in train.items() if n < 2)
    if few:
        findings.append(Finding(WARNING, "few_images", f"{len(few)} tag(s) are on fewer than 2 training images; "
                                f"add images or drop the tag.", [f"{t}: {train[t]}" for t in few]))
    gaps = [f"{t}: {train[t]} in train, 0 in {s}" for s in others for t in sorted(train) if not others[s].get(t)]
    if gaps:
        findings.append(Finding(WARNING, "absent_in_split", f"{len(gaps)} tag/split pair(s) have no image: those tags "
                                f"cannot be scored there (their thresholds stay at 0.5 when it is validation).", gaps))
    rare = sorted((t for t, n in train.items() if n < RARE_TAG * n_train), key=lambda t: (train[t], t))
    if rare:
        findings.append(Finding(WARNING, "rare_tags", f"{len(rare)} tag(s) are on under {RARE_TAG:.0%} of the "
                                f"training images; consider class_weights='balanced' (a positive weight per tag) "
                                f"and read their per-tag AP, not only the mean.",
                                [f"{t}: {train[t]} of {n_train} ({train[t] / n_train:.1%})" for t in rare]))
    common, rarest = max(train, key=lambda t: (train[t], t)), min(train, key=lambda t: (train[t], t))
    ratio = train[common] / train[rarest]
    if ratio > max_imbalance:
        findings.append(Finding(WARNING, "imbalance", f"Training tags are imbalanced: {common!r} is on {train[common]} "
                                f"images, {rarest!r} on {train[rarest]} (ratio {ratio:.1f} > {max_imbalance:g}); "
                                f"consider class_weights='balanced' or more images of the rare tags.",
                                [f"{t}: {n}" for t, n in sorted(train.items(), key=lambda kv: (kv[1], kv[0]))]))
    together: Counter[tuple[str, str]] = Counter()
    for e in entries:
        if e.split == "train" and e.label:
            present = sorted(decode_tags(e.label)[0])
            together.update((a, b) for i, a in enumerate(present) for b in present[i + 1:])
    top = sorted(together.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    pairs = [{"tags": [a, b], "images": n, "jaccard": round(n / (train[a] + train[b] - n), 3)} for (a, b), n in top]
    return findings, ratio, pairs


def _check_unreadable(failed: Mapping[str, str], files: Mapping[str, Path], name: _Namer,
                      deep: bool) -> list[Finding]:
    if not failed:
        return []
    # the reason names the file again, by the path it was read from: by its name in the set here (no machine path)
    items = [f"{name(files[k])}: {reason.replace(str(files[k]), name(files[k]))}"
             for k, reason in sorted(failed.items())]
    if deep:
        return [Finding(ERROR, "unreadable", f"{len(items)} file(s) cannot be read; replace or delete them "
                        f"(or train with on_bad_image='skip').", items)]
    return [Finding(WARNING, "unreadable_header", f"{len(items)} file(s) fail the header check (first: {items[0]}); "
                    f"training decodes every file and stops or skips them (on_bad_image).", items)]


def _check_not_taken(source: Source, entries: Sequence[_Entry], name: _Namer) -> list[Finding]:
    """Entries of a dataset folder named like images that its layout leaves out (the same scan as
    ``prepare-data``'s: :func:`visiontl.data.layout.not_taken`)."""
    if isinstance(source, Mapping) or not Path(source).expanduser().is_dir():
        return []
    items = [f"{name(p)}: {why}" for p, why in not_taken(source, (e.path for e in entries))]
    if not items:
        return []
    return [Finding(WARNING, "not_taken", f"{len(items)} entry(ies) named like images are not part of the data "
                    f"set (dangling symlinks, folders or FIFOs named *.png, images outside the class folders); "
                    f"training leaves them out: fix or remove them.", items)]


def _check_modes(infos: Mapping[str, _Info], files: Mapping[str, Path], name: _Namer) -> list[Finding]:
    findings = []
    for attr, code, what in (("channels", "mixed_channels", "channel counts"),
                             ("dtype", "mixed_dtypes", "dtypes / bit depths")):
        values: dict[Any, list[str]] = defaultdict(list)
        for key, info in infos.items():
            values[getattr(info, attr)].append(key)
        if len(values) > 1:
            ranked = sorted(values.items(), key=lambda kv: (-len(kv[1]), str(kv[0])))
            items = [f"{v}: {len(keys)} image(s), e.g. {name(files[min(keys)])}" for v, keys in ranked]
            findings.append(Finding(WARNING, code, f"The images mix {len(values)} {what} "
                                    f"({', '.join(str(v) for v, _ in ranked)}); check that this is intended "
                                    f"(every image is converted to the model's channels and scaled by its type).",
                                    items))
    return findings


def _check_tiny(infos: Mapping[str, _Info], files: Mapping[str, Path], name: _Namer, min_size: int) -> list[Finding]:
    tiny = sorted((k for k, info in infos.items() if min(info.height, info.width) < min_size),
                  key=lambda k: (min(infos[k].height, infos[k].width), k))
    if not tiny:
        return []
    items = [f"{name(files[k])} ({infos[k].width}x{infos[k].height})" for k in tiny]
    return [Finding(WARNING, "tiny_images", f"{len(items)} image(s) have a side below {min_size} px; they are "
                    f"upsampled a lot for the model (check they are not thumbnails or crops by mistake).", items)]


def _check_classes(counts: Mapping[str, Mapping[str, int]], max_imbalance: float) -> tuple[list[Finding], float | None]:
    train = {c: n for c, n in counts.get("train", {}).items() if n > 0}
    findings: list[Finding] = []
    others = {s: c for s, c in counts.items() if s != "train" and s not in _UNLABELLED}
    absent = sorted({c for per in others.values() for c in per} - set(train))
    if absent:
        items = [f"{c}: 0 in train, " + ", ".join(f"{others[s][c]} in {s}" for s in others if others[s].get(c))
                 for c in absent]
        findings.append(Finding(ERROR, "missing_in_train", f"{len(absent)} class(es) have images in val/test but "
                                f"none in train; the model cannot learn them.", items))
    if not train:
        findings.append(Finding(ERROR, "no_training_images", "The training split has no labelled images."))
        return findings, None
    few = sorted(c for c, n in train.items() if n < 2)
    if few:
        findings.append(Finding(WARNING, "few_images", f"{len(few)} class(es) have fewer than 2 training images; "
                                f"add images or merge / drop the class.", [f"{c}: {train[c]}" for c in few]))
    if len(train) == 1:
        findings.append(Finding(ERROR, "one_class", f"Only one class ({next(iter(train))}) has training images; a "
                                f"classifier needs at least two (fit refuses this dataset too)."))
    biggest, smallest = max(train, key=lambda c: (train[c], c)), min(train, key=lambda c: (train[c], c))
    ratio = train[biggest] / train[smallest]
    if ratio > max_imbalance:
        items = [f"{c}: {n}" for c, n in sorted(train.items(), key=lambda kv: (kv[1], kv[0]))]
        findings.append(Finding(WARNING, "imbalance", f"Training classes are imbalanced: {biggest!r} has "
                                f"{train[biggest]} images, {smallest!r} {train[smallest]} (ratio {ratio:.1f} > "
                                f"{max_imbalance:g}); consider class_weights='balanced' "
                                f"(--model.init_args.class_weights balanced), more data, or balanced accuracy / "
                                f"F1 as the metric.", items))
    return findings, ratio


def _groups(entries: Sequence[_Entry], content: Mapping[str, str]) -> dict[str, list[_Entry]]:
    """Entries grouped by content (pixel digest when known, else the file itself)."""
    groups: dict[str, list[_Entry]] = defaultdict(list)
    for e in entries:
        groups[content.get(e.key, f"file:{e.key}")].append(e)
    return groups


def _labelled(split: str) -> bool:
    return split not in _UNLABELLED


def _pair_items(a_entries: Sequence[_Entry], b_entries: Sequence[_Entry], name: _Namer, how: str) -> list[str]:
    """Lines for every pair of entries in two different labelled splits (train side first)."""
    items = []
    for a in a_entries:
        for b in b_entries:
            if a.split == b.split or not (_labelled(a.split) and _labelled(b.split)):
                continue
            first, second = sorted((a, b), key=lambda e: _split_rank(e.split))
            what = "same file" if a.key == b.key else how
            items.append(f"{first.split}: {name(first.path)} <-> {second.split}: {name(second.path)} ({what})")
    return items


def _check_labels(entries: Sequence[_Entry], groups: Mapping[str, list[_Entry]], name: _Namer) -> list[Finding]:
    items = []
    by_file: dict[str, list[_Entry]] = defaultdict(list)
    for e in entries:
        by_file[e.key].append(e)
    for same in by_file.values():
        labels = sorted({e.label for e in same if e.label})
        if len(labels) > 1:
            where = ", ".join(f"{e.label!r} ({e.split})" for e in same if e.label)
            items.append(f"{name(same[0].path)}: listed as {where}")
    for key, same in groups.items():
        labels = {e.label for e in same if e.label}
        if not key.startswith("file:") and len({e.key for e in same}) > 1 and len(labels) > 1:
            items.append("identical pixels: " + ", ".join(f"{name(e.path)} ({e.label!r}, {e.split})" for e in same))
    if not items:
        return []
    return [Finding(ERROR, "conflicting_labels", f"{len(items)} image(s) carry two or more labels; keep the right "
                    f"one and remove the others.", items)]


def _check_exact(groups: Mapping[str, list[_Entry]], name: _Namer, deep: bool) -> tuple[list[Finding], list[str]]:
    """Duplicate groups (warning) and their cross-split pairs (leakage lines)."""
    dupes = [g for g in groups.values() if len(g) > 1]
    leaks: list[str] = []
    items = []
    for group in sorted(dupes, key=lambda g: str(g[0].path)):
        items.append(" = ".join(f"{name(e.path)} ({e.split})" for e in group))
        for i, a in enumerate(group):
            leaks += _pair_items([a], group[i + 1:], name, "identical pixels")
    if not items:
        return [], leaks
    what = "identical pixels (or the same file listed twice)" if deep else "the same file listed more than once"
    return [Finding(WARNING, "exact_duplicates", f"{len(items)} group(s) of {what}; keep one of each (duplicates "
                    f"inside one split also land on both sides of a random validation split).", items)], leaks


def _check_near(groups: Mapping[str, list[_Entry]], hashes: Mapping[str, int], name: _Namer,
                threshold: int) -> tuple[list[Finding], list[str]]:
    """Near-duplicate clusters of distinct content (warning) and the leakage they cause.

    One line per cluster (a pair is shown with its distance, a larger cluster with its first
    members and its range of distances) and one leakage line per val / test image whose closest
    near duplicate in an earlier split it names: both grow with the images, not with the pairs
    (N near-identical images make ~N^2 / 2 pairs), see :func:`visiontl.data.neardup.near_duplicate_clusters`.
    """
    keys = sorted(hashes)
    entries = [(node, e) for node, key in enumerate(keys) for e in groups[key]]
    if len(entries) < 2:
        return [], []
    labelled = sorted({e.split for _, e in entries if _labelled(e.split)}, key=_split_rank)
    by_path = sorted(range(len(entries)), key=lambda i: str(entries[i][1].path))
    order = np.empty(len(entries), dtype=np.int64)
    order[by_path] = np.arange(len(entries))
    found = near_duplicate_clusters(
        np.array([hashes[keys[node]] for node, _ in entries], dtype=np.uint64), threshold,
        rank=[labelled.index(e.split) if e.split in labelled else -1 for _, e in entries],
        group=[node for node, _ in entries], order=order)
    members: dict[int, dict[int, _Entry]] = defaultdict(dict)  # cluster -> node -> first entry
    for i in sorted(np.flatnonzero(found.cluster >= 0), key=lambda i: (_split_rank(entries[i][1].split), order[i])):
        members[int(found.cluster[i])].setdefault(entries[i][0], entries[i][1])
    items = []
    for cluster, nodes in members.items():
        shown = [f"{name(e.path)} ({e.split})" for e in list(nodes.values())[:_CLUSTER_SHOWN]]
        low, high = (int(d) for d in found.distances[cluster])
        if len(nodes) == 2:
            items.append(f"{shown[0]} ~ {shown[1]}: distance {high}")
        else:
            more = f" ~ ... ({len(nodes) - len(shown)} more)" if len(nodes) > len(shown) else ""
            items.append(f"{' ~ '.join(shown)}{more}: {len(nodes)} images, distances {low} to {high}")
    leaks = []
    for i in np.flatnonzero(found.partner >= 0):
        e, p = entries[i][1], entries[int(found.partner[i])][1]
        leaks.append(f"{p.split}: {name(p.path)} <-> {e.split}: {name(e.path)} "
                     f"(near duplicate, dHash distance {int(found.partner_distance[i])})")
    if not items:
        return [], leaks
    items.sort()
    images = sum(len(nodes) for nodes in members.values())
    return [Finding(WARNING, "near_duplicates", f"{len(items)} group(s) of near-duplicate images ({images} images; "
                    f"dHash within {threshold} bits: the same picture re-encoded, resized or re-exposed); check "
                    f"and keep one of each.", items)], leaks


def _leakage(leaks: list[str]) -> list[Finding]:
    if not leaks:
        return []
    leaks = sorted(leaks)
    return [Finding(ERROR, "leakage", f"{len(leaks)} image pair(s) are shared between train, val and test: the "
                    f"model is evaluated on images it trained on and every score is inflated. Remove one image of "
                    f"each pair (or move it to the same split).", leaks)]


def check_data(
    source: Source,
    *,
    path_column: str = "path",
    label_column: str = "label",
    min_size: int = 32,
    max_imbalance: float = 10.0,
    near_threshold: int = 4,
    deep: bool = True,
    progress: bool = True,
    max_pixels: int | None = None,
    frames: str = "error",
    suffix: str = "",
    image_dirs: Sequence[str] = (),
    root: str | os.PathLike[str] | None = None,
    task: str = "auto",
    tag_columns: Sequence[str] | None = None,
    tag_sep: str = TAG_SEP,
    uncertain: str = "ignore",
    no_tag: str | None = None,
) -> DataReport:
    """Check a dataset for unreadable files, mixed modes, tiny images, imbalance, duplicates and
    train / val / test leakage (see the module docstring).

    Args:
        source: a dataset folder (``PATH/<class>/**`` or ``PATH/train|val|test/<class>/**``), a CSV
            file (relative paths resolve against its folder; an optional ``split`` column), or
            ``{split: [(path, label), ...]}`` (a datamodule's ``splits``).
        path_column: CSV column with the image paths.
        label_column: CSV column with the class names.
        min_size: images with a shorter side are reported as tiny.
        max_imbalance: largest / smallest training class above this is reported.
        near_threshold: largest dHash Hamming distance (of 64 bits) counted as a near duplicate.
        deep: decode every image and search exact / near duplicates; ``False`` reads headers only.
        progress: show a progress bar (from 200 files).
        max_pixels: images with more pixels are reported as unreadable (decompression bombs);
            ``None``: :func:`visiontl.data.images.pixel_limit`.
        frames: multi-frame DICOMs: ``error`` reports them as unusable (the datamodules' default),
            ``middle`` / ``all`` check them by their middle frame.
        suffix: appended to every CSV path value (``.jpg`` for an id column such as HAM10000's).
        image_dirs: folders (relative to ``root``) searched in order for each CSV image.
        root: folder CSV paths resolve against (default: the CSV's folder). The CSV is read by the
            same code as :class:`~visiontl.data.CsvDataModule` (:func:`visiontl.data.layout.read_csv_rows`),
            a folder laid out as :class:`~visiontl.data.FolderDataModule` expects.
        task: ``auto`` (tag columns, or a cell holding ``tag_sep``, make a CSV multi-label),
            ``multiclass`` or ``multilabel``, as :class:`~visiontl.data.CsvDataModule` takes it; a
            datamodule's splits pass its ``task``.
        tag_columns: multi-label data with one 0 / 1 column per tag (as ``CsvDataModule``).
        tag_sep: multi-label data in one column: the separator of an image's tags.
        uncertain: what a ``-1`` in a tag column means (``ignore``, ``positive``, ``negative``).
        no_tag: the cell value of an image with no tag, besides an empty cell.

    Returns:
        The report; ``report.errors`` is empty when the data is fit to train on.

    Raises:
        DataError: the source does not exist or is not a dataset (the message says what to give).
    """
    tags = TagSettings(task, tag_columns, tag_sep, uncertain, no_tag)
    entries, root, bad_rows, multilabel = _load(source, path_column, label_column, suffix, image_dirs, root, tags)
    name = _Namer(root)
    files = {e.key: e.path for e in entries}
    infos, failed = _inspect(files, deep, progress, max_pixels, frames)
    counts = _tag_counts(entries) if multilabel else _counts(entries)
    findings: list[Finding] = []
    if bad_rows:
        findings.append(Finding(ERROR, "bad_rows", f"{len(bad_rows)} CSV row(s) have no path or no label.", bad_rows))
    findings += _check_unreadable(failed, files, name, deep) + _check_not_taken(source, entries, name)
    findings += _check_modes(infos, files, name) + _check_tiny(infos, files, name, min_size)
    pairs: list[dict[str, Any]] = []
    if multilabel:
        class_findings, ratio, pairs = _check_tags(counts, entries, max_imbalance)
    else:
        class_findings, ratio = _check_classes(counts, max_imbalance)
    findings += class_findings
    content = {k: i.digest for k, i in infos.items() if i.digest is not None}
    groups = _groups(entries, content)
    findings += _check_labels(entries, groups, name)
    exact, leaks = _check_exact(groups, name, deep)
    findings += exact
    if deep:
        hashes = {content[k]: i.dhash for k, i in infos.items() if i.dhash is not None}
        near, near_leaks = _check_near(groups, hashes, name, near_threshold)
        findings += near
        leaks += near_leaks
    findings += _leakage(leaks)
    findings.sort(key=lambda f: f.severity != ERROR)
    sides = [s for i in infos.values() for s in (i.height, i.width)]
    return DataReport(
        counts=counts, findings=findings, root=str(root) if root is not None else None, deep=deep,
        n_files=len(files), channels=_tally(str(i.channels) for i in infos.values()),
        dtypes=_tally(i.dtype for i in infos.values()), min_side=min(sides, default=None),
        max_side=max(sides, default=None), imbalance=ratio,
        settings={"min_size": min_size, "max_imbalance": max_imbalance, "near_threshold": near_threshold,
                  "near_method": "dHash 64-bit, multi-index (pigeonhole) search"},
        task="multilabel" if multilabel else "multiclass", cooccurrence=pairs,
    )


def _tally(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items(), key=lambda kv: (-kv[1], kv[0])))
