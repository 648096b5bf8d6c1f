"""Every notebook in ``notebooks/`` runs top to bottom, offline, in a scratch directory.

The kernel is the native ``python3`` one, which jupyter_client starts with ``sys.executable``:
the notebooks see the same interpreter (and the same installed visiontl) as the tests, and
inherit the test environment (``HF_HUB_OFFLINE=1`` from conftest, and ``VISIONTL_NOTEBOOK_TEST=1``:
notebooks that train for long read it as ``QUICK`` and train fewer steps, while their committed
outputs come from the documented sizes). Any cell error fails the test. Outputs are not compared.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = None  # no wall-clock limit: a loaded 2-core machine must not fail a notebook


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the kernel inherits this: its tempfile directories land under tmp_path even if a cell fails
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    # slow notebooks read it and train fewer steps here; committed outputs come from the documented sizes
    monkeypatch.setenv("VISIONTL_NOTEBOOK_TEST", "1")
    nb = nbformat.read(path, as_version=4)
    # in memory only: a first cell that reports which interpreter the kernel runs
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable, end='')"))
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,  # the first failing cell raises CellExecutionError with its traceback
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()
    kernel_python = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.output_type == "stream")
    assert Path(kernel_python).resolve() == Path(sys.executable).resolve()


MAX_IMAGE_B64 = 100_000  # characters of one embedded PNG: downscale saved plots (visiontl.analyse.plots.thumbnail_png)
MAX_NOTEBOOK = 400_000  # bytes of a committed notebook


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_executed_with_a_plot_and_small(path: Path) -> None:
    """What a reader on the web sees: every code cell ran (execution counts in order, no errors),
    at least one plot, and nothing too large to review."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    counts = [c.execution_count for c in code]
    assert None not in counts and counts == sorted(counts), f"{path.name}: not executed top to bottom ({counts})"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], path.name
    images = [o.data["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name}: no plot"
    assert max(map(len, images)) <= MAX_IMAGE_B64, f"{path.name}: a {max(map(len, images)):,}-character image"
    assert path.stat().st_size <= MAX_NOTEBOOK, f"{path.name}: {path.stat().st_size:,} bytes"
