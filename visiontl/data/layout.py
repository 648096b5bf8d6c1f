"""Dataset layouts on disk: class-per-folder trees, ``train`` / ``val`` / ``test`` split folders and
CSV files of (path, label) rows; the one implementation behind the datamodules and ``check-data``.

Torch-free (numpy and PIL only), so ``visiontl check-data`` starts without loading torch.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from visiontl.core.files import csv_unescape
from visiontl.data.images import IMAGE_EXTENSIONS, DataError, is_image_file
from visiontl.data.multilabel import row_tags

__all__ = ["SPLIT_DIRS", "CsvRow", "Sample", "canonical_split", "folder_splits", "index_folder", "list_images",
           "not_taken", "read_csv_rows", "source_kind", "split_folders"]

Sample = tuple[Path, str]
SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
"""Split name -> the folder names accepted for it."""


def split_folders(root: Path) -> dict[str, Path | None]:
    """The ``train`` / ``val`` / ``test`` folders found directly under ``root`` (None where absent)."""
    return {split: next((root / n for n in names if (root / n).is_dir()), None) for split, names in SPLIT_DIRS.items()}


def list_images(folder: str | os.PathLike[str], what: str = "Image folder", fix: str = "") -> list[Path]:
    """Every image file under ``folder``, recursively, sorted; a :class:`DataError` naming the
    folder (as ``what``) and ``fix`` when it does not exist or holds no image."""
    folder = Path(folder).expanduser()
    tail = f"; {fix}" if fix else ""
    if not folder.is_dir():
        raise DataError(f"{what} {folder} does not exist{tail}.")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise DataError(f"{what} {folder} has no images (searched recursively for .png .jpg .jpeg .tif .tiff .bmp "
                        f".webp .dcm){tail}.")
    return files


def index_folder(root: str | os.PathLike[str]) -> list[Sample]:
    """List ``(image path, class name)`` under ``root/<class>/**``; clear errors for bad trees."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"Data folder {root} does not exist. Point 'root' at a folder with one sub-folder per class.")
    if not root.is_dir():
        raise DataError(
            f"{root} is not a folder. Use a folder with one sub-folder per class, or CsvDataModule for a CSV."
        )
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"Data folder {root} has no class sub-folders; put the images of each class in root/<class name>/."
        )
    samples: list[Sample] = []
    for folder in classes:
        files = list_images(folder, "Class folder", "add images or remove the folder")
        samples.extend((f, folder.name) for f in files)
    return samples


def canonical_split(name: str) -> str:
    """``valid`` / ``validation`` -> ``val`` (the split folder names); empty -> ``train``."""
    name = name.strip().lower()
    if not name:
        return "train"
    return next((split for split, names in SPLIT_DIRS.items() if name in names), name)


def folder_splits(root: str | os.PathLike[str]) -> dict[str, list[Sample]]:
    """The samples of a dataset folder: ``root/<class>/**`` (all training images), or
    ``root/train|val|test/<class>/**``. A root with ``val/`` or ``test/`` but no ``train/`` is an
    error (those names would otherwise become classes)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        index_folder(root)  # the errors for a missing path or a file
    found = split_folders(root)
    if found["train"] is None:
        others = [p.name for p in found.values() if p is not None]
        if others:
            raise DataError(
                f"{root} has {' and '.join(others)} folder(s) but no train/ folder; add "
                f"{root / 'train'}/<class>/ with the training images, or point at a single split folder."
            )
        return {"train": index_folder(root)}
    return {split: index_folder(folder) for split, folder in found.items() if folder is not None}


def source_kind(source: str | os.PathLike[str]) -> Literal["folder", "csv"]:
    """Which layout a labelled data set path has: ``folder`` (a class-per-folder tree, or one with
    split folders) or ``csv`` (a CSV of path, label rows): the one switch behind the datamodules,
    ``prepare-data`` and ``check-data``. A folder is a folder whatever its name.

    Raises:
        DataError: the path does not exist, or is a file but not a ``.csv``.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise DataError(
            f"{path} does not exist. Give a class-per-folder dataset (PATH/<class>/*.png), a folder with "
            f"train/ val/ test/ sub-folders of that form, or a CSV file of image paths and labels."
        )
    if path.suffix.lower() != ".csv":
        raise DataError(f"{path} is a file but not a CSV; give a dataset folder or a CSV of image paths and labels.")
    return "csv"


@dataclass(frozen=True)
class CsvRow:
    """One data row of a dataset CSV: its line number, resolved image path (None when the path
    value is empty), class name ("" when empty), split (``split_column``, else ``train``) and
    group (``group_column``, else "")."""

    line: int
    path: Path | None
    label: str
    split: str
    group: str


def read_csv_rows(
    csv_path: str | os.PathLike[str],
    path_column: str = "path",
    label_column: str = "label",
    root: str | os.PathLike[str] | None = None,
    suffix: str = "",
    image_dirs: Sequence[str] = (),
    group_column: str | None = None,
    columns_hint: str = "set path_column / label_column / group_column",
    split_column: str = "split",
    tag_columns: Sequence[str] | None = None,
    uncertain: str = "ignore",
) -> list[CsvRow]:
    """Read a dataset CSV (the datamodules' and ``check-data``'s one reader).

    Path values are resolved against ``root`` (default: the CSV's folder), with ``suffix``
    appended (for id columns such as HAM10000's ``image_id``) and searched in ``image_dirs`` in
    order (data shipped in several parts); absolute paths stay as they are. With ``tag_columns``
    (multi-label data, one 0/1 column per tag) a row's label is its canonical tag set
    (:func:`visiontl.data.multilabel.row_tags`, ``uncertain`` resolving ``-1``) and ``label_column``
    is not read.

    Raises:
        DataError: the file is missing or not a readable CSV, a named column is absent, or it has
            no rows (``columns_hint`` says how to name the columns).
    """
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise DataError(f"CSV file {path} does not exist.")
    base = Path(root).expanduser() if root else path.parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            # cells visiontl escaped against spreadsheet formulas (a run's splits.csv) read back as written
            rows = [{k: csv_unescape(v) for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path} is not a readable CSV file ({err}).") from err
    required = (path_column, None if tag_columns else label_column, *(tag_columns or ()), group_column,
                None if split_column == "split" else split_column)
    missing = [c for c in required if c is not None and c not in columns]
    if missing:
        raise DataError(f"{path} has no column {', '.join(map(repr, missing))} (columns: "
                        f"{', '.join(columns) or 'none'}); {columns_hint}.")
    if not rows:
        raise DataError(f"CSV file {path} has no rows.")
    out = []
    for line, row in enumerate(rows, start=2):
        value = (row.get(path_column) or "").strip()
        file = _locate(base, value + suffix, image_dirs) if value else None
        group = (row.get(group_column) or "").strip() if group_column else ""
        label = (row_tags(row, f"{path}, line {line}", tag_columns=tag_columns, uncertain=uncertain)  # type: ignore[arg-type]
                 if tag_columns else (row.get(label_column) or "").strip())
        out.append(CsvRow(line, file, label, canonical_split(row.get(split_column) or ""), group))
    return out


def _locate(base: Path, name: str, image_dirs: Sequence[str]) -> Path:
    given = Path(name).expanduser()
    if given.is_absolute():
        return given
    for folder in image_dirs:
        candidate = base / folder / name
        if candidate.is_file():
            return candidate
    return base / (image_dirs[0] if image_dirs else "") / name


def _odd_entry(path: Path) -> str | None:
    """Why an entry named like an image is not a file a data set can take (None: a regular file)."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return f"a dangling symlink (to {os.readlink(path)}, which does not exist)"
        return "vanished while the folder was listed"
    except OSError as err:  # a symlink loop, a permission denied on the way
        return f"cannot be opened ({err.strerror or type(err).__name__})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file")
    return f"{kind}, not an image file"


def not_taken(root: str | os.PathLike[str], taken: Iterable[str | os.PathLike[str]]) -> list[tuple[Path, str]]:
    """Entries under the folder data set ``root`` named like images that are not among ``taken``
    (the files its splits list), each with why: a dangling symlink, a folder, a FIFO, a socket or
    device named ``*.png``, an image directly in ``root`` or a split folder (not in a class folder),
    or one in a folder the layout ignores. Hidden names (``.x.png``, ``.cache/``) are ignored, as
    the layout ignores them. What ``check-data`` (warning ``not_taken``) and ``prepare-data``
    (``skipped``) name, so no file is dropped silently."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    kept = {os.path.abspath(p) for p in taken}
    splits = {p for p in split_folders(root).values() if p is not None}
    parents = splits or {root}  # the folders whose sub-folders are classes
    out: list[tuple[Path, str]] = []
    for folder, dirs, files in os.walk(root):  # a symlinked folder is not walked into: nothing in it is named
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(folder)
        odd_dirs = [] if here in parents else [d for d in dirs if Path(d).suffix.lower() in IMAGE_EXTENSIONS]
        for name in sorted([*files, *odd_dirs]):
            path = here / name
            if name.startswith(".") or os.path.abspath(path) in kept:
                continue
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                odd = _odd_entry(path)
                if odd is not None:
                    out.append((path, odd))
                    continue
            elif not is_image_file(path):  # extension-less: a DICOM only (never opened unless a regular file)
                continue
            if here in parents:
                out.append((path, f"not in a class folder: move it to {here}/<class>/"))
            else:
                out.append((path, "outside train/, val/ and test/ (the only folders read when train/ exists)"))
    return out
