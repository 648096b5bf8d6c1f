"""A bench directory: ``grid.json`` (what the grid is) and ``results.csv`` (one row per finished cell).

Rows are appended under an exclusive lock (``fcntl``), each in one ``write`` of a whole line that
is flushed and synced before the lock is released: shards running at the same time on one
directory (several processes, or machines sharing a file system that honours locks) never
interleave or tear a row, and a killed bench leaves whole rows only. A row whose key is already
there is not written twice. ``grid.json`` is written once; a bench with another grid refuses to
add rows to the directory and says which settings differ.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from visiontl.core import files
from visiontl.benchmark.config import BenchError

__all__ = ["COLUMNS", "BenchStore"]

COLUMNS = [
    "key", "data", "backbone", "weights", "weights_sha256", "strategy", "strategy_config", "shots", "seed",
    "classes", "train_images", "steps", "val_acc", "val_balanced_acc", "val_f1", "val_auroc", "train_acc",
    "trainable_params", "total_params", "wall_s", "peak_rss_mb", "checkpoint_mb", "run_dir",
    "visiontl_version", "torch_version", "timm_version", "metric", "score", "val_map", "train_score",
]
"""The columns of ``results.csv``, in order."""

SCORE_COLUMNS = ["data", "backbone", "weights", "images", "logme", "hscore", "seconds"]
"""The columns of ``transferability.csv``."""


class BenchStore:
    """The files of one bench directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.results = self.root / "results.csv"
        self.grid = self.root / "grid.json"

    # -- the grid ------------------------------------------------------------------------------
    def claim(self, grid: dict[str, Any]) -> None:
        """Record ``grid`` (plain data) as this directory's, or check that it is the one recorded."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if self.grid.exists():
                try:
                    recorded = json.loads(self.grid.read_text())
                except (OSError, ValueError) as err:
                    raise BenchError(f"{self.grid} cannot be read ({err}); move it away to start a new bench "
                                     f"here.") from err
                if recorded != grid:
                    differ = sorted(k for k in set(recorded) | set(grid) if recorded.get(k) != grid.get(k))
                    raise BenchError(
                        f"{self.root} holds the results of another grid (its {', '.join(differ)} differ: "
                        + "; ".join(f"{k}: {json.dumps(recorded.get(k))} there, {json.dumps(grid.get(k))} now"
                                    for k in differ)
                        + "). Rows of two grids are never mixed: use another --out, or the same settings.")
                return
            files.write_json(self.grid, grid)

    def recorded_grid(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.grid.read_text())
        except (OSError, ValueError):
            return None

    # -- rows ------------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, str]]:
        """The rows written so far (a torn last line, from a machine crash mid-write, is skipped)."""
        if not self.results.exists():
            return []
        text = self.results.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines = lines[:-1]
        return [row for row in files.csv_dict_rows(io.StringIO("".join(lines))) if row.get("key")]

    def done(self) -> set[str]:
        """Keys of the finished cells."""
        return {row["key"] for row in self.rows()}

    def append(self, row: dict[str, Any]) -> bool:
        """Append one row (whole, synced, under the lock); ``False`` when its key is already there."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if row["key"] in self.done():
                return False
            buf = io.StringIO()
            writer = files.csv_dict_writer(buf, COLUMNS, extrasaction="ignore", lineterminator="\n")
            new = not self.results.exists() or self.results.stat().st_size == 0
            if new:
                writer.writeheader()
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
            fd = os.open(self.results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, buf.getvalue().encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        return True

    # -- transferability scores -----------------------------------------------------------------
    @property
    def scores_path(self) -> Path:
        return self.root / "transferability.csv"

    def scores(self) -> list[dict[str, str]]:
        """LogME / H-score per (data, backbone) measured by this bench."""
        if not self.scores_path.exists():
            return []
        return files.csv_dict_rows(io.StringIO(self.scores_path.read_text(encoding="utf-8")))

    def add_score(self, row: dict[str, Any]) -> None:
        """Record one (data, backbone) score, replacing an earlier one of the same pair."""
        with self._lock():
            rows = [r for r in self.scores() if (r["data"], r["backbone"]) != (row["data"], row["backbone"])]
            rows.append({k: row.get(k) for k in SCORE_COLUMNS})
            buf = io.StringIO()
            writer = files.csv_dict_writer(buf, SCORE_COLUMNS, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            files.write_text(self.scores_path, buf.getvalue())

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
