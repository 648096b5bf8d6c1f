"""The committed benchmark results read at a glance: every page opens with a title and a sentence, and
``benchmarks/replot.py`` writes every plot (titled, axes labelled, legends off the data) and every page
built from CSV alone again from the committed CSV files, as committed, without training."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from helpers.figures import figure_problems

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
RESULTS = BENCHMARKS / "results"


def _replot_module():
    spec = importlib.util.spec_from_file_location("benchmarks_replot", BENCHMARKS / "replot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_results_page_opens_with_a_title_and_a_sentence() -> None:
    pages = sorted(RESULTS.glob("*.md"))
    assert pages
    for page in pages:
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# ") and len(lines[0]) > 4, page.name
        assert lines[1] == "", page.name
        assert lines[2] and not lines[2].startswith(("|", "#", "!", "-")), f"{page.name}: no sentence under the title"
        assert lines[2].rstrip().endswith("."), page.name


@pytest.mark.parametrize("name", sorted(_replot_module().SCRIPTS))
def test_replot_from_the_committed_csv(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontl.analyse import plots

    figures = []
    save = plots.save_figure

    def spy(fig, path, *args, **kwargs):
        figures.append((Path(path).name, fig))
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(plots, "save_figure", spy)
    written = _replot_module().replot(name, RESULTS, tmp_path)
    assert written and all(p.parent == tmp_path for p in written)
    pngs = [p for p in written if p.suffix == ".png"]
    assert pngs and len(figures) == len(pngs)
    for png, fig in figures:
        assert (RESULTS / png).is_file(), f"{png}: not a committed plot"
        assert fig.get_suptitle(), png
        assert figure_problems(fig) == [], png
        assert fig.get_size_inches()[0] <= 12.0, png
    for page in (p for p in written if p.suffix == ".md"):  # a page built from CSV alone is the committed one
        assert page.read_text() == (RESULTS / page.name).read_text(), page.name


def test_the_tiny_data_table_is_the_defaults_benchmark() -> None:
    """Every number of the table in docs/concepts/tiny-data.md is the committed defaults.csv's, rounded
    as shown: a re-measured cell without the page (or a hand edit) fails here."""
    import csv
    import re

    rows = {r["cell"]: r for r in csv.DictReader((RESULTS / "defaults.csv").open())}
    sets = {"Blue Marble, 10 / class": "bluemarble-10", "Blue Marble, 60 / class": "bluemarble-60",
            "shaded relief, 30 / class": "relief-30", "digits 8 px, 15 / class": "digits-8px",
            "Fashion-MNIST 12 px, 15 / class": "fashion-12px"}
    page = (Path(__file__).parents[2] / "docs" / "concepts" / "tiny-data.md").read_text()
    lines = [line for line in page.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in sets]
    assert len(lines) == len(sets)
    columns = ["gradual", "head", "full", "partial", "probe", "logreg", "scratch"]
    for line in lines:
        cells = [c.strip().replace("**", "") for c in line.strip("|").split("|")]
        name = sets[cells[0]]
        for column, shown in zip(columns, cells[1:]):
            row = rows[f"{name} / {'gradual' if column == 'head' else column}"]
            value = float(row["lp_head_acc" if column == "head" else "val_acc"])
            number = re.match(r"([0-9.]+)(?: \(x([0-9.]+)\))?$", shown)
            assert number, (name, column, shown)
            assert number.group(1) == f"{value:.3f}", (name, column, shown, value)
            if number.group(2):
                assert number.group(2) == f"{float(row['vs_logreg']):.2f}", (name, column, shown)


def test_the_speed_page_quotes_the_committed_speed_run() -> None:
    """docs/concepts/speed.md's numbers are benchmarks/results/speed.csv's, as rounded there."""
    import csv

    rows = {r["run"]: r for r in csv.DictReader((RESULTS / "speed.csv").open())}
    page = " ".join((Path(__file__).parents[2] / "docs" / "concepts" / "speed.md").read_text().split())

    def num(run: str, key: str) -> float:
        return float(rows[run][key])

    quoted = [
        f"10-epoch probe ran x{num('probe/visiontl', 'speedup_vs_plain'):.0f} faster than the plain loop (val acc "
        f"{num('probe/visiontl', 'val_acc'):.3f} vs {num('probe/plain', 'val_acc'):.3f})",
        f"full fine-tuning x{num('full/visiontl', 'speedup_vs_plain'):.1f} faster ({num('full/visiontl', 'val_acc'):.3f} "
        f"vs {num('full/plain', 'val_acc'):.3f} after 3 epochs)",
        f"the probe takes x{num('probe-large/visiontl', 'x_floor'):.2f} on 1,800 images and "
        f"x{num('probe/visiontl', 'x_floor'):.1f} on 210 images",
    ]
    for text in quoted:
        assert text in page, text


def test_the_readme_multi_label_table_is_the_multilabel_benchmark() -> None:
    """Every number of README.md's multi-label table is benchmarks/results/multilabel.csv's mean
    macro mAP, rounded as shown."""
    import csv

    rows = {r["cell"]: r for r in csv.DictReader((RESULTS / "multilabel.csv").open())}
    sets = {"Blue Marble tiles": "tiles-2x2", "handwritten digits": "digits-2x2", "Fashion-MNIST": "fashion-2x2"}
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith("| ")
             and line.split("|")[1].strip().split(" 2 x 2")[0] in sets]
    assert len(lines) == len(sets)
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = sets[cells[0].split(" 2 x 2")[0]]
        for strategy, shown in zip(["gradual", "logreg", "full", "scratch"], cells[1:]):
            assert shown == f"{float(rows[f'{name} / {strategy}']['val_map']):.3f}", (name, strategy, shown)
