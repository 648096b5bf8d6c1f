"""``visiontl bench``: benchmark strategies, backbones and label budgets on your own data.

A grid (``bench.yaml``, :func:`load_config`) of data sets x backbones x strategies x label budgets
x seeds runs cell by cell (:func:`run_bench`); each finished cell appends one row to
``results.csv`` in the bench directory, so a killed bench continues where it stopped and shards
(``--shard i/n``) can run anywhere. See :mod:`visiontl.benchmark.grid` for cell keys and shards.
"""

from __future__ import annotations

from visiontl.benchmark.config import BackboneSpec, BenchConfig, BenchError, DataSpec, load_config
from visiontl.benchmark.grid import STEP_RULE, Cell, expand_grid, parse_shard, shard_cells
from visiontl.benchmark.runner import PeakRSS, run_bench, run_cell
from visiontl.benchmark.store import COLUMNS, BenchStore

__all__ = ["COLUMNS", "STEP_RULE", "BackboneSpec", "BenchConfig", "BenchError", "BenchStore", "Cell", "DataSpec",
           "PeakRSS", "expand_grid", "load_config", "parse_shard", "run_bench", "run_cell", "shard_cells"]
