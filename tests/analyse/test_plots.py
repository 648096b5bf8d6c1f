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
    timed = report.comparison_table([{"val_acc": 0.91234, "wall_s": 38.2, "images_per_s": 12.3456}], floatfmt={})
    assert timed.splitlines()[2] == "| 0.912 | 38.2 | 12.346 |"  # seconds to a tenth, not 38.200
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


# -- what every figure shows: titles, labelled axes, legends off the data ------------------------
def _lr_monitor_csv(path, groups=("stem", "stage1", "stage2", "stage3", "head"), steps: int = 6,
                    balanced_equal: bool = True) -> None:
    """A metrics.csv as LearningRateMonitor and a layer-wise decay write it: every group twice
    (``<group>`` and ``<group>/no_decay``, the same rate), sorted by name as CSVLogger does."""
    rows = []
    for step in range(steps):
        lr = {f"lr-AdamW/{g}": 1e-3 * 0.5 ** (len(groups) - 1 - i) * (1 - step / steps) + 1e-7
              for i, g in enumerate(groups)}
        lr.update({f"{k}/no_decay": v for k, v in list(lr.items())})
        rows.append({"step": step, **lr})
        rows.append({"epoch": step, "step": step, "train_loss_epoch": 1.0 / (step + 1)})
        acc = 0.5 + 0.05 * step
        rows.append({"epoch": step, "step": step, "val_loss": 1.2 / (step + 1), "val_acc": acc,
                     "val_balanced_acc": acc if balanced_equal else acc - 0.1, "val_f1": acc - 0.02,
                     "val_auroc": acc + 0.1})
    pd.DataFrame(rows).reindex(columns=sorted({k for r in rows for k in r})).to_csv(path, index=False)


def _fitted_head_csv(path) -> None:
    """What a fitted head (logreg, knn, prototype) logs: one validation row, no training."""
    path.write_text("epoch,step,trainable_params,val_acc,val_auroc,val_balanced_acc,val_f1,val_loss\n"
                    "0,11,,0.925,0.989,0.925,0.925,0.237\n0,11,0.0,,,,,\n")


def _legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def test_learning_curves_follow_the_figure_conventions(tmp_path):
    from helpers.figures import figure_problems

    _lr_monitor_csv(tmp_path / "metrics.csv")
    _lightning_csv(tmp_path / "old.csv")
    _fitted_head_csv(tmp_path / "fitted.csv")
    for name in ("metrics.csv", "old.csv", "fitted.csv"):
        fig = report.learning_curves_figure(tmp_path / name)
        assert fig.get_suptitle(), name
        assert figure_problems(fig) == [], name
        for ax in fig.axes:
            assert ax.get_ylabel() and ax.get_xlabel()


def test_learning_rate_legend_has_one_entry_per_layer_group_in_order(tmp_path):
    groups = ("stem", "stage1", "stage2", "stage3", "stage10", "head")
    _lr_monitor_csv(tmp_path / "metrics.csv", groups=groups)
    fig = report.learning_curves_figure(tmp_path / "metrics.csv")
    lr = next(ax for ax in fig.axes if "learning rate" in ax.get_title())
    entries = _legend_texts(lr)
    assert entries == list(groups)  # stem to head (stage10 after stage3), no /no_decay duplicates
    assert len({tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
                for line in lr.get_lines()}) == len(groups)  # no repeated colours
    assert lr.get_yscale() == "log" and "learning rate" in lr.get_ylabel()
    assert lr.get_xlabel() == "optimisation step"


def test_learning_rate_groups_with_equal_rates_share_a_line(tmp_path):
    df = pd.DataFrame([{"step": s, **{f"lr-AdamW/{g}": 1e-3 for g in ("stem", "stage1", "stage2", "head")},
                        "lr-AdamW/head/no_decay": 1e-3} for s in range(3)])
    lines = report.learning_rate_lines(df)
    assert [label for label, _ in lines] == ["stem to head (4 groups, same rate)"]
    df["lr-AdamW/head/no_decay"] = 5e-4  # a different rate is a curve of its own
    assert [label for label, _ in report.learning_rate_lines(df)][-1] == "head/no_decay"


def test_val_acc_and_balanced_acc_stay_distinguishable_when_equal(tmp_path):
    _lr_monitor_csv(tmp_path / "metrics.csv", balanced_equal=True)
    fig = report.learning_curves_figure(tmp_path / "metrics.csv")
    val = next(ax for ax in fig.axes if ax.get_title() == "validation metrics")
    lines = {line.get_label(): line for line in val.get_lines()}
    acc, balanced = lines["accuracy"], lines["balanced accuracy"]
    assert np.allclose(acc.get_ydata(), balanced.get_ydata())  # the same numbers...
    assert (acc.get_linestyle(), acc.get_marker(), acc.get_color()) != (
        balanced.get_linestyle(), balanced.get_marker(), balanced.get_color())  # ...drawn apart
    assert acc.get_linestyle() != balanced.get_linestyle() and acc.get_marker() != balanced.get_marker()
    assert "accuracy" in val.get_ylabel()


def test_fitted_head_gets_its_validation_result_not_a_fake_axis(tmp_path):
    _fitted_head_csv(tmp_path / "metrics.csv")
    fig = report.learning_curves_figure(tmp_path / "metrics.csv")
    assert "fitted head" in fig.get_suptitle()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        assert high - low >= 0.5  # the old figure: one point on a -0.045..0.045 epoch axis
        assert ax.get_xlabel() not in ("epoch", "optimisation step")
    bars = fig.axes[0]
    assert [t.get_text() for t in bars.get_yticklabels()] == ["accuracy", "balanced accuracy", "F1", "AUROC"]
    assert "0.237" in bars.get_title()  # the validation loss, said in words
    assert _is_png(report.save_learning_curves(tmp_path / "metrics.csv", tmp_path / "c.png"))


def test_confusion_matrix_and_drift_follow_the_figure_conventions():
    from helpers.figures import figure_problems

    fig = report.confusion_matrix_figure(np.array([[3, 1], [0, 4]]), ["a", "b"])
    assert fig.axes[0].get_title() == "confusion matrix" and figure_problems(fig) == []
    drift = {"groups": [{"group": "stem", "relative": 0.01}, {"group": "head", "relative": 0.4}], "cka_val": 0.9}
    assert figure_problems(report.drift_figure(drift)) == []
    assert report.drift_figure({"groups": []}) is None


def test_comparison_figure_marks_the_baseline_and_follows_the_conventions():
    from helpers.figures import figure_problems

    rows = [{"strategy": "probe", "val_acc": 0.8, "val_acc_std": 0.05, "wall_s": 3.0},
            {"strategy": "scratch", "val_acc": 0.6, "val_acc_std": 0.02, "wall_s": 30.0}]
    fig = report.comparison_figure(rows, "val_acc", baseline="scratch")
    assert figure_problems(fig) == []
    assert fig.get_suptitle()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "baseline: scratch" in legend and any("std" in t for t in legend)
    acc, wall = fig.axes
    assert acc.get_xlabel() == "validation accuracy (0 to 1)" and wall.get_xlabel() == "wall time (s)"
    assert acc.get_ylabel() == "strategy"
    colors = [tuple(p.get_facecolor()) for p in acc.patches]
    assert colors[0] != colors[1]  # the baseline's bar stands out
    for text, row in zip(acc.texts, rows):  # every value's text starts past its error bar
        assert text.xy[0] >= row["val_acc"] + row["val_acc_std"] - 1e-9


def test_comparison_figure_of_ratios_draws_the_baseline_line():
    rows = [{"engine": "eager", "throughput_vs_eager": 1.0}, {"engine": "ort", "throughput_vs_eager": 6.5}]
    fig = report.comparison_figure(rows, "throughput_vs_eager", baseline="eager", label_key="engine")
    (ax,) = fig.axes
    assert any(list(line.get_xdata()) == [1.0, 1.0] for line in ax.get_lines())
    assert "1 = eager" in ax.get_xlabel()
    assert any("same run" in t.get_text() for t in fig.legends[0].get_texts())


def test_comparison_figure_groups_long_lists_into_panels():
    from helpers.figures import figure_problems

    rows = [{"set": s, "strategy": k, "val_acc": 0.5 + 0.01 * i, "val_acc_std": 0.01}
            for s in ("a-10", "a-60", "b-10", "b-60", "vit") for i, k in enumerate(("probe", "lora", "full"))]
    fig = report.comparison_figure(rows, "val_acc", baseline="full", keys=["val_acc"], group_key="set")
    assert [ax.get_title() for ax in fig.axes] == ["a-10", "a-60", "b-10", "b-60", "vit"]
    assert all(len(ax.patches) == 3 for ax in fig.axes)
    assert figure_problems(fig) == []
    assert fig.get_size_inches()[0] <= 12
    # long axis labels side by side are wrapped, not run into each other or off the figure
    long = report.comparison_figure(rows[:9], "val_acc", keys=["val_acc"], group_key="set",
                                    axis_labels={"val_acc": "validation mean average precision, macro (0 to 1)"})
    assert all("\n" in ax.get_xlabel() for ax in long.axes)
    assert figure_problems(long) == []


def test_rows_round_trip_through_csv(tmp_path):
    rows = [{"run": "a", "seeds": 3, "val_acc": 0.9555555555555556, "ok": True, "wall_s": 110.0, "note": None},
            {"run": "b, c", "seeds": 1, "val_acc": None, "ok": False, "wall_s": 2.5, "note": "x"}]
    path = report.write_rows(rows, tmp_path / "rows.csv")
    assert report.read_rows(path) == rows
    assert report.comparison_table(report.read_rows(path)) == report.comparison_table(rows)


def test_save_comparison_page_starts_with_title_and_sentence(tmp_path):
    rows = [{"strategy": "probe", "val_acc": 0.8}, {"strategy": "scratch", "val_acc": 0.6}]
    out = report.save_comparison(rows, tmp_path, baseline="scratch", title="Demo", intro="What was measured.")
    lines = out["md"].read_text().splitlines()
    assert lines[:4] == ["# Demo", "", "What was measured.", ""] and lines[4].startswith("| strategy |")


def test_wise_ft_figure_follows_the_conventions():
    from helpers.figures import figure_problems

    from visiontl.train.wiseft import _figure

    rows = [{"alpha": a, "val_acc": 0.6 + 0.3 * a, "retain_acc": 0.95 - 0.1 * a} for a in (0.0, 0.5, 1.0)]
    assert figure_problems(_figure(rows, 0.5)) == []
