"""Tests for visiontl.analyse.plots: files are valid, numbers round-trip, failures leave nothing behind."""

from __future__ import annotations

import csv
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from visiontl.analyse import plots as report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def _is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC


def _leftovers(folder) -> list:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_confusion_matrix_png_and_csv_round_trip(tmp_path):
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 9]])
    names = ["cat", "dog", "a very long class name"]
    out = report.save_confusion_matrix(cm, names, tmp_path / "cm.png", tmp_path / "cm.csv",
                                       title="test")
    assert _is_png(out["png"])
    with open(out["csv"], newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["true\\pred", *names]
    assert [r[0] for r in table[1:]] == names
    assert np.array_equal(np.array([[int(v) for v in r[1:]] for r in table[1:]]), cm)
    assert _leftovers(tmp_path) == []


def test_confusion_matrix_accepts_tensor_and_many_classes(tmp_path):
    torch = pytest.importorskip("torch")
    n = 50
    cm = torch.randint(0, 20, (n, n)) + torch.eye(n, dtype=torch.int64) * 100
    out = report.save_confusion_matrix(cm, [f"class_{i:02d}" for i in range(n)],
                                       tmp_path / "big.png", normalize=False)
    assert set(out) == {"png"} and _is_png(out["png"])


def test_confusion_matrix_shape_mismatch(tmp_path):
    with pytest.raises(ValueError):
        report.save_confusion_matrix(np.eye(3), ["a", "b"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def _lightning_csv(path, epochs: int = 3) -> None:
    """A CSVLogger-style metrics.csv: one sparse row per logging call."""
    rows, step = [], 0
    for e in range(epochs):
        for _ in range(4):
            rows.append({"epoch": e, "step": step, "train_loss_step": 2.0 / (step + 1),
                         "lr-AdamW/head": 1e-3 * 0.9 ** step,
                         "lr-AdamW/backbone": 1e-4 * 0.9 ** step})
            step += 1
        rows.append({"epoch": e, "step": step - 1, "val_loss": 1.0 / (e + 1),
                     "val_acc": 0.5 + 0.1 * e, "val_f1": 0.4 + 0.1 * e, "val_acc/cat": 0.9})
        rows.append({"epoch": e, "step": step - 1, "train_loss_epoch": 1.5 / (e + 1)})
    pd.DataFrame(rows).to_csv(path, index=False)


def test_learning_curves_from_sparse_lightning_csv(tmp_path):
    _lightning_csv(tmp_path / "metrics.csv")
    df = pd.read_csv(tmp_path / "metrics.csv")
    assert df.isna().any().any()  # the NaN holes really are there
    out = report.save_learning_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    assert out == tmp_path / "curves.png" and _is_png(out)


def test_learning_curves_single_epoch_and_missing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("epoch,step,val_loss\n0,3,0.7\n")
    assert _is_png(report.save_learning_curves(tmp_path / "m.csv", tmp_path / "one.png"))
    (tmp_path / "s.csv").write_text("epoch,step,train_loss_step\n0,0,1.0\n,,\n0,1,0.8\n")
    assert _is_png(report.save_learning_curves(tmp_path / "s.csv", tmp_path / "steps.png"))


@pytest.mark.parametrize("content", ["", "epoch,step,val_loss\n", "epoch,step,foo\n0,1,2\n"])
def test_learning_curves_nothing_to_plot_returns_none(tmp_path, content):
    (tmp_path / "metrics.csv").write_text(content)
    assert report.save_learning_curves(tmp_path / "metrics.csv", tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()
    assert report.save_learning_curves(tmp_path / "missing.csv", tmp_path / "c.png") is None


def test_comparison_table_markdown():
    rows = [{"strategy": "probe", "val_acc": 0.5, "params": 1234567, "note": "a|b"},
            {"strategy": "full", "val_acc": NAN, "params": 12, "extra": True}]
    md = report.comparison_table(rows, thousands=True)
    lines = md.strip().splitlines()
    assert lines[0] == "| strategy | val_acc | params | note | extra |"
    assert lines[1] == "|---|---:|---:|---|---|"
    assert "| probe | 0.500 | 1,234,567 | a\\|b |  |" == lines[2]
    assert "| full |  | 12 |  | True |" == lines[3]
    one_col = report.comparison_table(rows, columns=["val_acc"], floatfmt=".1f")
    assert one_col.splitlines()[2] == "| 0.5 |"
    assert report.comparison_table([]) == ""


def test_console_table_alignment():
    rows = [{"name": "a", "acc": 0.5}, {"name": "longer", "acc": 12.25}]
    text = report.format_console_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["name", "acc"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].endswith(" 0.500") and lines[3].endswith("12.250")
    assert len({len(line) for line in lines}) == 1


def test_save_comparison_writes_files_and_ratio(tmp_path):
    rows = [{"strategy": "linear_probe", "val_acc": 0.5, "wall_s": 10.0},
            {"strategy": "full_finetune", "val_acc": 0.75, "wall_s": 40.0},
            {"strategy": "broken", "val_acc": None}]
    out = report.save_comparison(rows, tmp_path / "cmp", metric="val_acc", baseline="linear_probe")
    assert set(out) == {"csv", "md", "png"}
    assert _is_png(out["png"])
    md = out["md"].read_text().splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    assert header == ["strategy", "val_acc", "val_acc/baseline", "wall_s"]
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in md[2:]}
    assert cells["full_finetune"][2] == "1.50"
    assert cells["linear_probe"][2] == "1.00"
    assert cells["broken"][2] == ""
    df = pd.read_csv(out["csv"])
    assert list(df.columns) == header
    assert math.isclose(df.loc[1, "val_acc/baseline"], 1.5)
    assert _leftovers(tmp_path / "cmp") == []


def test_save_comparison_errors(tmp_path):
    with pytest.raises(ValueError):
        report.save_comparison([], tmp_path)
    with pytest.raises(ValueError):
        report.save_comparison([{"strategy": "a", "val_acc": 1.0}], tmp_path, baseline="zzz")


def test_failed_savefig_leaves_no_file(tmp_path, monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError):
        report.save_confusion_matrix(np.eye(2), ["a", "b"], tmp_path / "cm.png")
    _lightning_csv(tmp_path / "metrics.csv", epochs=1)
    with pytest.raises(RuntimeError):
        report.save_learning_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    assert not (tmp_path / "cm.png").exists() and not (tmp_path / "curves.png").exists()
    assert _leftovers(tmp_path) == []


def test_failure_does_not_clobber_existing_file(tmp_path, monkeypatch):
    target = tmp_path / "cm.png"
    report.save_confusion_matrix(np.eye(2), ["a", "b"], target)
    before = target.read_bytes()

    def half_write_then_fail(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(PNG_MAGIC)  # partial output, then a crash
        raise OSError("interrupted")

    monkeypatch.setattr(Figure, "savefig", half_write_then_fail)
    with pytest.raises(OSError):
        report.save_confusion_matrix(np.eye(2), ["a", "b"], target)
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_save_comparison_draws_error_bars_from_std_columns(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    bars = []
    original = Axes.barh

    def spy(self, *args, **kwargs):
        bars.append(kwargs.get("xerr"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "barh", spy)
    rows = [{"run": "source_only", "target_acc": 0.6, "target_acc_std": 0.05},
            {"run": "dann", "target_acc": 0.7, "target_acc_std": 0.02}]
    out = report.save_comparison(rows, tmp_path, name="adapt", metric="target_acc", label_key="run")
    assert _is_png(out["png"])
    assert list(bars[0]) == [0.05, 0.02]
    report.save_comparison([{"run": "a", "target_acc": 0.6}], tmp_path, name="plain", metric="target_acc",
                           label_key="run")
    assert bars[-1] is None  # no spread given: no error bars
