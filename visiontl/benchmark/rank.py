"""``visiontl rank``: backbones ranked by how well their frozen features fit your labels."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from visiontl.core import files
from visiontl.benchmark.config import load_config
from visiontl.benchmark.grid import Cell
from visiontl.benchmark.runner import score_transferability
from visiontl.core.quiet import quiet

__all__ = ["rank_backbones"]


def rank_backbones(data: str | os.PathLike[str], backbones: list[str], image_size: int | None = None,
                   out: str | os.PathLike[str] = "runs/rank") -> tuple[list[dict[str, Any]], Path]:
    """LogME and shrinkage H-score of each backbone's frozen features on ``data``'s training
    labels, best LogME first; also written to ``<out>/rank.csv``.

    Args:
        data: a class-per-folder directory or a CSV.
        backbones: ``NAME``, ``NAME=WEIGHTS`` (a file or named source) or ``NAME=random``.
        image_size: input size (default: each backbone's).
        out: folder for ``rank.csv`` (features go to the feature cache, reused by later runs).
    """
    config = load_config({"data": [str(data)], "backbones": list(backbones), "strategies": ["logreg"],
                          "image_size": image_size})
    rows = []
    for backbone in config.backbones:
        cell = Cell(config.data[0], backbone, "logreg", None, 0, image_size, None, None)
        with quiet(verbose=False):
            rows.append(score_transferability(cell, out))
    rows.sort(key=lambda r: -r["logme"])
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    buf = io.StringIO()
    writer = files.csv_dict_writer(buf, ["rank", "backbone", "weights", "data", "images", "logme", "hscore"],
                            extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return rows, files.write_text(Path(out) / "rank.csv", buf.getvalue())
