"""The resumable cell log of a benchmark script: ``<work>/cells.jsonl``, one JSON object per
finished cell, appended as each cell finishes, so an interrupted run resumes where it stopped.

The scripts in ``benchmarks/`` loop over their cells as::

    log = CellLog(work / "cells.jsonl")
    for seed in range(seeds):
        for name in sets:
            if not log.has(set=name, seed=seed):
                log.add(run_the_cell(name, seed))
    rows = summarise(log.cells)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["CellLog"]


class CellLog:
    """The cells of ``path`` (a missing file: none yet); :meth:`add` appends and prints."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        self.cells: list[dict[str, Any]] = [json.loads(line) for line in text.splitlines() if line.strip()]

    def has(self, **key: Any) -> bool:
        """Whether a finished cell has every ``key`` value (``has(set="digits", seed=0)``)."""
        return any(all(cell.get(k) == v for k, v in key.items()) for cell in self.cells)

    def add(self, *rows: dict[str, Any], shown: Any = None) -> None:
        """Append finished cells (one line each, written before the next cell starts) and print
        ``shown`` as JSON (default: the one row, or the list of rows)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        self.cells.extend(rows)
        print(json.dumps(shown if shown is not None else rows[0] if len(rows) == 1 else list(rows)), flush=True)
