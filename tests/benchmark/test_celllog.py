"""The benchmark scripts' resumable cell log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visiontl.benchmark.celllog import CellLog


def test_cells_are_appended_as_they_finish_and_read_back_by_a_resumed_run(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    log = CellLog(tmp_path / "work" / "cells.jsonl")
    assert log.cells == [] and not log.has(set="a", seed=0)
    log.add({"set": "a", "seed": 0, "val_acc": 0.5, "tags": {"x": 1}}, shown={"set": "a"})
    assert json.loads(capsys.readouterr().out) == {"set": "a"}  # what the caller shows, not the whole row
    log.add({"set": "b", "seed": 0}, {"set": "b", "seed": 1})
    assert len(json.loads(capsys.readouterr().out)) == 2
    again = CellLog(tmp_path / "work" / "cells.jsonl")  # an interrupted run, started again
    assert again.cells == log.cells and len(again.cells) == 3
    assert again.has(set="a", seed=0) and again.has(set="b") and not again.has(set="a", seed=1)
    assert not again.has(set="a", seed=0, val_acc=0.4)  # every key must match
