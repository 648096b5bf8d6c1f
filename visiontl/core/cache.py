"""A content-addressed cache of named numpy arrays on disk (:class:`ArrayCache`).

Used for the frozen backbone's features (``features`` + ``labels``, :mod:`visiontl.models.features`)
and for pre-resized images (``images``, :mod:`visiontl.data.presize`). An entry lives in
``<root>/<key>/``: one ``.npy`` file per array and a ``meta.json`` with their shapes and SHA-256
checksums. The key is a hash of everything the arrays depend on (:meth:`ArrayCache.key`), so an
entry never changes once written:

- entries appear only by an atomic rename of a finished folder, and a published entry is never
  replaced, so two processes building the same key both succeed (the first to publish wins);
- every load checks the checksums and shapes: a damaged entry (bit rot, an edited or foreign
  file, unreadable metadata) is moved aside atomically, deleted, and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visiontl.core.files import atomic_dir

__all__ = ["ArrayCache", "CacheEntry", "FORMAT_VERSION", "data_fingerprint"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # 1: features.npy + labels.npy only


@dataclass
class CacheEntry:
    """A loaded entry: its arrays (memory-mapped, read-only), key and folder."""

    arrays: dict[str, np.ndarray]
    key: str
    path: Path

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(paths: Sequence[str | os.PathLike[str]], content: bool = False) -> str:
    """SHA-256 of a file list: path, size and mtime of each (or the bytes, with ``content``)."""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(str(Path(path).resolve()).encode())
        if content:
            digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


class ArrayCache:
    """Named arrays on disk under content keys (see the module docstring).

    Args:
        root: the cache folder (e.g. ``default_cache_dir() / "features"``).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @staticmethod
    def key(parts: Mapping[str, Any]) -> str:
        """A stable key from JSON-able parts (everything the arrays depend on)."""
        blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def load(self, key: str) -> CacheEntry | None:
        """The entry for ``key`` if it is complete and intact; a damaged one is removed (``None``)."""
        folder = self.root / key
        if not folder.exists():
            return None
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict) or not meta["sha256"]:
                raise ValueError(f"unreadable meta.json ({type(meta).__name__})")
            shapes = meta.get("shapes")
            if not isinstance(shapes, dict):
                raise ValueError("no shapes in meta.json")
            arrays = {}
            for name, checksum in meta["sha256"].items():
                path = folder / f"{name}.npy"
                if _sha256(path) != checksum:
                    raise ValueError(f"{name}.npy checksum mismatch")
                arrays[name] = np.load(path, mmap_mode="r")
                if arrays[name].shape != tuple(shapes.get(name) or ()):
                    raise ValueError(f"{name}.npy shape mismatch")
        except FileNotFoundError:
            if not folder.exists():  # another process replaced or removed it meanwhile
                return None
            self._discard(folder, "a file is missing")
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            self._discard(folder, str(err))
            return None
        return CacheEntry(arrays, key, folder)

    def _discard(self, folder: Path, reason: str) -> None:
        """Move a damaged entry aside (atomic: readers see it or nothing), then delete it."""
        log.warning("Cache entry %s is damaged (%s); rebuilding it.", folder, reason)
        trash = self.root / f".{folder.name}.trash-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.replace(folder, trash)
        except OSError:
            return  # already moved or replaced by another process
        shutil.rmtree(trash, ignore_errors=True)

    def save(self, key: str, arrays: Mapping[str, np.ndarray], info: Mapping[str, Any] | None = None) -> CacheEntry:
        """Write an entry atomically and return it memory-mapped.

        Safe under concurrent processes: when another process has published the same key first,
        this one discards its copy and returns the winner's entry (same key, same content).
        """
        if not arrays:
            raise ValueError("An ArrayCache entry needs at least one array.")
        for _attempt in range(5):
            # published only where the key is free: another process may have won the race (or a
            # damaged entry sits there); load decides
            with atomic_dir(self.root / key, replace=False) as tmp:
                for name, array in arrays.items():
                    np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
                meta = {
                    "format": FORMAT_VERSION,
                    "shapes": {name: list(np.shape(array)) for name, array in arrays.items()},
                    "sha256": {name: _sha256(tmp / f"{name}.npy") for name in arrays},
                    "info": dict(info or {}),
                }
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
            loaded = self.load(key)  # ours or the winner's; None only if it was damaged and discarded
            if loaded is not None:
                return loaded
        raise OSError(f"Could not publish cache entry {self.root / key} (another process keeps replacing it, or "
                      f"the cache folder is not writable).")

    def get_or_compute(self, key: str, compute: Callable[[], Mapping[str, np.ndarray]],
                       info: Mapping[str, Any] | None = None) -> tuple[CacheEntry, bool]:
        """Return ``(entry, hit)``: the cached entry, or compute, store and return it."""
        found = self.load(key)
        if found is not None:
            return found, True
        return self.save(key, compute(), info), False
