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

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
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
