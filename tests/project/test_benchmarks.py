"""The benchmark scripts still run (tiny sizes; their numbers are measured in benchmarks/results/)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def test_speed_benchmark_quick_run(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(BENCHMARKS / "speed.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    for run in ("probe/plain", "probe/visiontl", "probe/floor", "full/plain", "full/visiontl"):
        assert run in out.stdout
    assert "logreg" in out.stdout and "knn" in out.stdout


def test_export_benchmark_quick_run(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(BENCHMARKS / "export.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    for engine in ("eager", "ort_fp32", "ort_int8"):
        assert engine in out.stdout


def test_defaults_benchmark_smoke_run(tmp_path: Path) -> None:
    """One seed of the fitted and cached-feature rows on the 8 px digits (real Lite0 weights)."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "defaults.py"), "--sets", "digits-8px", "--seeds", "1",
                          "--strategies", "logreg", "probe", "--work", str(tmp_path / "work"), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "digits-8px / logreg" in out.stdout and "vs_logreg" in out.stdout
    table = (tmp_path / "out" / "defaults.csv").read_text().splitlines()
    assert len(table) == 3 and table[1].startswith("digits-8px / logreg")
    assert (tmp_path / "out" / "defaults.png").stat().st_size > 1000
    rerun = subprocess.run([sys.executable, str(BENCHMARKS / "defaults.py"), "--sets", "digits-8px", "--seeds", "1",
                            "--strategies", "logreg", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                           capture_output=True, text=True, check=False)
    assert rerun.returncode == 0 and '"strategy": "logreg"' not in rerun.stdout  # finished cells are skipped


def test_bench_bluemarble_quick_run(tmp_path: Path) -> None:
    """The offline `visiontl bench` proof at smoke size: one data set, one budget, one seed."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "bench_bluemarble.py"), "--quick", "--work",
                          str(tmp_path / "work"), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "frozen-backbone cells" in out.stdout and "fine_tune with an empty feature cache" in out.stdout
    md = (tmp_path / "out" / "bench_bluemarble.md").read_text()
    assert "## Timing" in md and "## Recommendation" in md
    assert (tmp_path / "out" / "bench_bluemarble.png").stat().st_size > 1000


def test_forgetting_benchmark_smoke_run(tmp_path: Path) -> None:
    """One seed, one direction, a few steps: full fine-tuning with Blue Marble kept, then WiSE-FT at
    alpha 0 and 1 on it (real Lite0); a run that ended before its first validation (last.ckpt only)."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "forgetting.py"), "--seeds", "1", "--steps", "4",
                          "--methods", "wise-ft", "--directions", "relief, keeping bluemarble", "--alphas", "0,1",
                          "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "out" / "forgetting.csv").read_text()
    assert "relief, keeping bluemarble" in table and "wise-ft" in table and "full" in table
    assert "## Target" in (tmp_path / "out" / "forgetting.md").read_text()
    assert (tmp_path / "out" / "forgetting.png").stat().st_size > 1000
    with (tmp_path / "out" / "forgetting_wise_ft.csv").open() as fh:
        curve = list(csv.DictReader(fh))
    assert [(r["method"], float(r["alpha"])) for r in curve] == [("wise-ft", 0.0), ("wise-ft", 1.0)]
    assert (tmp_path / "out" / "forgetting_wise_ft.png").stat().st_size > 1000


def test_scale_benchmark_quick_run(tmp_path: Path) -> None:
    """Every stage (scan, check, extract, logreg, knn) in its own process, with its wall time and peak RSS."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "scale.py"), "--quick", "--work", str(tmp_path)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["stage"] for r in rows] == ["scan", "check", "extract", "logreg", "knn"]
    assert rows[2]["train"][1] == 1280 and all(0 < r["peak_rss_gb"] < 4 for r in rows)
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 2  # train and val, extracted once


def test_adaptation_benchmark_quick_run(tmp_path: Path) -> None:
    """One pair, two methods, two seeds at smoke size: every validator's pick, the ranking, the default."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "adaptation.py"), "--quick", "--part", "pairs", "--pairs",
                          "relief->bluemarble", "--methods", "source_only", "mcc", "--work", str(tmp_path / "work"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "default (best mean rank):" in out.stdout
    md = (tmp_path / "out" / "adaptation.md").read_text()
    assert "**Default (best mean rank over the pairs):" in md and "Frozen probe" in md
    with (tmp_path / "out" / "adaptation.csv").open() as f:
        configs = list(csv.DictReader(f))
    # 2 methods x 2 target-BN settings x (5 validators + oracle + last)
    assert len(configs) == 2 * 2 * 7 and {"source_only", "mcc"} == {c["method"] for c in configs}
    assert (tmp_path / "out" / "adaptation.png").stat().st_size > 1000
    runs = json.loads((tmp_path / "work" / "rows.json").read_text())
    assert {(r["method"], r["seed"], r["target_bn"]) for r in runs} == {
        (m, s, bn) for m in ("source_only", "mcc") for s in (0, 1) for bn in (False, True)}


def test_by_hand_benchmark_quick_run(tmp_path: Path) -> None:
    """Every part at smoke size: the near-duplicate pairs scored, both logistic regressions, the figure criteria
    and the progress bars' output; the page and plot written from the CSV."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "by_hand.py"), "--quick", "--work", str(tmp_path / "work"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    with (tmp_path / "out" / "by_hand.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["part"] for r in rows} >= {"near-duplicates", "near-duplicate search", "logistic regression", "plots",
                                         "progress"}
    assert all(0 <= float(r["precision"]) <= 1 for r in rows if r["part"] == "near-duplicates")
    assert {r["criteria_met"] for r in rows if r["method"] == "visiontl.analyse.plots"} == {"3"}
    assert (tmp_path / "out" / "by_hand.md").read_text().startswith("# ")


def test_multilabel_benchmark_smoke_run(tmp_path: Path) -> None:
    """One seed of the one-vs-rest probe on the digit mosaics (real Lite0 weights): the table, the
    rare tags on their own lines with their held-out F1 at the tuned threshold and at 0.5."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "multilabel.py"), "--sets", "digits-2x2", "--seeds", "1",
                          "--strategies", "logreg", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "out" / "multilabel.csv").open()))
    assert rows[0]["cell"] == "digits-2x2 / logreg" and 0 < float(rows[0]["val_map"]) <= 1
    assert 0 < float(rows[0]["test_map"]) <= 1 and float(rows[0]["vs_logreg"]) == 1.0
    rare = [r for r in rows if "rare tag" in r["cell"]]
    assert {r["cell"].split("rare tag ")[1][0] for r in rare} == {"8", "9"}
    assert all(r["f1_tuned"] != "" and r["f1_at_half"] != "" for r in rare)
    assert all(r["tuned_wins"] in ("0/1", "1/1") and float(r["test_positives"]) >= 15 for r in rare)  # 800 test mosaics
    assert (tmp_path / "out" / "multilabel.png").stat().st_size > 1000


def test_ood_benchmark_smoke_run(tmp_path: Path) -> None:
    """One short run on the 8 x 8 digits (real Lite0 weights): every score against the three other
    kinds of images, the worst pair per score, and the test-set calibration row."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "ood.py"), "--sets", "digits-8px", "--seeds", "1",
                          "--steps", "20", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "out" / "ood.csv").open()))
    pairs = {(r["pair"], r["score"]) for r in rows}
    from visiontl.data.lowres import FASHION_MNIST_DIR

    kinds = ("tiles", "photos", *(("fashion",) if FASHION_MNIST_DIR.is_dir() else ()))  # Debian's package, if there
    assert {(f"digits -> {k}", s) for k in kinds for s in ("msp", "energy", "mahalanobis", "knn")} <= pairs
    assert all(0 <= float(r["auroc"]) <= 1 and 0 <= float(r["fpr95"]) <= 1 for r in rows)
    assert {r["score"] for r in rows if r["pair"] == "worst pair"} == {"msp", "energy", "mahalanobis", "knn"}
    calibration = list(csv.DictReader((tmp_path / "out" / "calibration.csv").open()))
    assert calibration[0]["set"] == "digits-8px" and float(calibration[0]["test_acc"]) == float(
        calibration[0]["test_acc_calibrated"])  # temperature scaling keeps every argmax
    assert (tmp_path / "out" / "ood.png").stat().st_size > 1000 and (tmp_path / "out" / "calibration.png").exists()
