"""Merging the shards of one grid: their rows, checked against the grid they were run from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visiontl.benchmark.config import BenchError, load_config
from visiontl.benchmark.grid import expand_grid
from visiontl.benchmark.store import BenchStore

__all__ = ["merge_shards"]


def merge_shards(dirs: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Rows of every bench directory in ``dirs`` (the shards of one grid; a key found twice is kept
    once), their transferability scores, and a description of each grid cell without a row.

    Raises:
        BenchError: a directory without ``grid.json``, or directories of different grids.
    """
    grids = []
    for folder in dirs:
        grid = BenchStore(folder).recorded_grid()
        if grid is None:
            raise BenchError(f"{folder} is not a bench directory (no readable grid.json).")
        grids.append(grid)
    for folder, grid in zip(dirs[1:], grids[1:]):
        if grid != grids[0]:
            differ = sorted(k for k in set(grid) | set(grids[0]) if grid.get(k) != grids[0].get(k))
            raise BenchError(f"{folder} holds another grid than {dirs[0]} (its {', '.join(differ)} differ); only the "
                             f"shards of one grid merge.")
    rows: dict[str, dict[str, Any]] = {}
    scores: dict[tuple[str, str], dict[str, Any]] = {}
    for folder in dirs:
        store = BenchStore(folder)
        for row in store.rows():
            rows.setdefault(row["key"], row)
        for score in store.scores():
            scores.setdefault((score["data"], score["backbone"]), score)
    cells = expand_grid(load_config(grids[0]))
    missing = [f"{c.data.name} / {c.backbone.label} / {c.strategy_label} / shots {c.shots_label} / seed {c.seed}"
               for c in cells if c.key() not in rows]
    return list(rows.values()), list(scores.values()), missing
