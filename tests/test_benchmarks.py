"""The benchmark scripts still run (tiny sizes; their numbers are measured in benchmarks/results/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_speed_benchmark_quick_run(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(BENCHMARKS / "speed.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    for run in ("probe/plain", "probe/visiontl", "probe/floor", "full/plain", "full/visiontl"):
        assert run in out.stdout
    assert "logreg" in out.stdout and "knn" in out.stdout


def test_export_benchmark_quick_run(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(BENCHMARKS / "export.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    for engine in ("eager", "ort_fp32", "ort_int8"):
        assert engine in out.stdout
