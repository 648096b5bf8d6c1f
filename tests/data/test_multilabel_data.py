"""Multi-label data: the two CSV shapes, the uncertain policy, stratified splits, counts, targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers.shapes import make_multilabel_csv
from visiontl.data import CsvDataModule
from visiontl.data.images import DataError
from visiontl.data.multilabel import decode_tags, encode_tags, iterative_split, row_tags, tag_targets


def test_canonical_tag_strings_round_trip_and_targets() -> None:
    assert encode_tags(["b", "a"]) == "a|b" and encode_tags([]) == "|"
    assert encode_tags(["a"], ["c", "a"]) == "a|?c"  # positive wins over uncertain
    assert decode_tags("a|?c") == (frozenset({"a"}), frozenset({"c"})) and decode_tags("|") == (frozenset(), frozenset())
    assert tag_targets("a|?c", ["a", "b", "c"]).tolist() == [1.0, 0.0, -1.0]
    assert tag_targets("", ["a", "b"]).tolist() == [-1.0, -1.0]  # no label at all: left out everywhere


@pytest.mark.parametrize(("policy", "expected"), [("ignore", "a|?c"), ("positive", "a|c"), ("negative", "a")])
def test_uncertain_policy_resolves_minus_one(policy: str, expected: str) -> None:
    row = {"a": "1", "b": "", "c": "-1.0"}
    assert row_tags(row, "x.csv, line 2", tag_columns=["a", "b", "c"], uncertain=policy) == expected


def test_a_tag_column_with_another_value_and_a_bad_tag_name_are_one_line_errors() -> None:
    with pytest.raises(DataError, match=r"x.csv, line 3: column 'b' holds '2'; a tag column holds 1"):
        row_tags({"a": "1", "b": "2"}, "x.csv, line 3", tag_columns=["a", "b"])
    with pytest.raises(DataError, match=r"'\?a' is not a usable tag name"):
        row_tags({"label": "?a|b"}, "x.csv, line 4")


def test_joined_and_column_csvs_read_the_same_tags_and_draw_the_same_split(tmp_path: Path) -> None:
    joined = make_multilabel_csv(tmp_path / "j", n=40, seed=3)
    columns = make_multilabel_csv(tmp_path / "c", n=40, seed=3, shape="columns")
    a = CsvDataModule(str(joined), num_workers=0, image_size=32)
    b = CsvDataModule(str(columns), tag_columns=["bars", "discs", "squares"], num_workers=0, image_size=32)
    assert a.task == b.task == "multilabel" and a.class_names == b.class_names == ["bars", "discs", "squares"]
    names = lambda dm, split: [(p.name, y) for p, y in dm.splits[split]]  # noqa: E731
    assert names(a, "train") == names(b, "train") and names(a, "val") == names(b, "val")
    assert a.class_counts == b.class_counts and sum(a.class_counts) > 0
    assert "|" in {y for _, y in a.splits["train"] + a.splits["val"]}  # images with no shape at all


def test_the_validation_split_is_stratified_over_every_tag(tmp_path: Path) -> None:
    """A tag on 6 of 60 images: a plain random 20 % split misses it in validation often; the
    iterative split puts about a fifth of every tag's images there, whatever the seed."""
    csv = make_multilabel_csv(tmp_path, n=60, seed=0, rates={"bars": 0.5, "discs": 0.3, "squares": 0.1})
    for seed in range(5):
        dm = CsvDataModule(str(csv), num_workers=0, seed=seed)
        train = dm.class_counts
        val = [sum(t in decode_tags(y)[0] for _, y in dm.splits["val"]) for t in dm.class_names]
        for tag, n_train, n_val in zip(dm.class_names, train, val):
            assert n_val >= 1 and abs(n_val - 0.2 * (n_train + n_val)) <= 1.5, (seed, tag, n_train, n_val)
        assert abs(len(dm.splits["val"]) - 12) <= 2


def test_iterative_split_keeps_groups_whole_and_says_which_tags_cannot_be_divided(tmp_path: Path, caplog) -> None:
    units = [("p1", frozenset({"a"}), 3), ("p2", frozenset({"a", "b"}), 2), ("p3", frozenset(), 5),
             ("p4", frozenset({"b"}), 1), ("p5", frozenset({"a"}), 2), ("p6", frozenset(), 2)]
    train, val = iterative_split(units, 0.3, seed=0)
    assert train | val == {u[0] for u in units} and not train & val
    assert iterative_split(units, 0.3, seed=0) == (train, val)  # seeded
    rare = tmp_path / "rare.csv"
    (tmp_path / "i").mkdir()
    from PIL import Image

    lines = ["path,label"]
    for i in range(10):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / "i" / f"{i}.png")
        lines.append(f"i/{i}.png,{'a|rare' if i == 0 else 'a' if i % 2 else 'b'}")
    rare.write_text("\n".join(lines) + "\n")
    dm = CsvDataModule(str(rare), num_workers=0, check_images=False)
    with caplog.at_level("WARNING"):
        dm.splits  # noqa: B018
    assert "no validation image has the tag(s) rare" in caplog.text


def test_targets_reach_the_datasets_and_an_empty_cell_is_no_tag(tmp_path: Path) -> None:
    csv = make_multilabel_csv(tmp_path, n=24, seed=1, shape="columns", uncertain=5)
    dm = CsvDataModule(str(csv), tag_columns=["bars", "discs", "squares"], num_workers=0, image_size=32)
    dm.setup()
    item = dm.datasets["train"][0]
    label = dict(zip([p for p, _ in dm.splits["train"]], [y for _, y in dm.splits["train"]]))[dm.paths("train")[0]]
    assert isinstance(item["label"], np.ndarray) and item["label"].dtype == np.float32
    assert item["label"].tolist() == tag_targets(label, dm.class_names).tolist()
    everything = np.stack([dm.datasets[s][i]["label"] for s in ("train", "val") for i in range(len(dm.datasets[s]))])
    assert (everything == -1).sum() == 5  # the uncertain cells, left out under the default policy
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].shape == (len(batch["image"]), 3)


def test_the_task_follows_the_data_and_can_be_said(tmp_path: Path) -> None:
    csv = make_multilabel_csv(tmp_path, n=20, seed=2, rates={"bars": 0.9, "discs": 0.0, "squares": 0.0})
    # every row has at most one tag: auto reads one class per image and refuses the empty cells
    with pytest.raises(DataError, match="empty label in column 'label'; for multi-label data"):
        CsvDataModule(str(csv), num_workers=0).splits  # noqa: B018
    dm = CsvDataModule(str(csv), task="multilabel", num_workers=0)
    assert dm.task == "multilabel" and dm.class_names == ["bars"]
    with pytest.raises(DataError, match="shots counts training images per class"):
        CsvDataModule(str(csv), task="multilabel", num_workers=0, shots=2).splits  # noqa: B018
    with pytest.raises(DataError, match="tag_columns is a list of column names"):
        CsvDataModule(str(csv), tag_columns="bars")


def test_check_data_reports_per_tag_counts_gaps_rarity_and_co_occurrence(tmp_path: Path) -> None:
    from visiontl.data.check import check_data

    csv = make_multilabel_csv(tmp_path, n=60, seed=1, rates={"bars": 0.6, "discs": 0.5, "squares": 0.04})
    text = csv.read_text().splitlines()
    csv.write_text("\n".join([text[0] + ",split"] + [f"{line},{'val' if i % 5 == 0 else 'train'}"
                                                      for i, line in enumerate(text[1:])]) + "\n")
    report = check_data(csv, deep=False, progress=False)
    assert report.task == "multilabel"
    train = [line.split(",")[1] for i, line in enumerate(text[1:]) if i % 5]
    assert report.counts["train"]["bars"] == sum("bars" in t for t in train)
    assert report.counts["train"]["(no tag)"] == sum(t == "" for t in train)
    codes = {f.code: f for f in report.findings}
    assert "squares" in " ".join(codes["rare_tags"].items)
    pair = report.cooccurrence[0]
    both = sum("bars" in t and "discs" in t for t in train)
    assert pair["tags"] == ["bars", "discs"] and pair["images"] == both
    assert pair["jaccard"] == round(both / (report.counts["train"]["bars"] + report.counts["train"]["discs"] - both), 3)
    assert "tags most often together in train: bars + discs" in report.summary()
    if not report.counts["val"].get("squares"):
        assert "squares: " in " ".join(codes["absent_in_split"].items)


def test_check_data_and_prepare_data_from_the_command_line(tmp_path: Path, capsys) -> None:
    from visiontl.cli.commands import main

    csv = make_multilabel_csv(tmp_path, n=30, seed=5, shape="columns", uncertain=3)
    code = main(["check-data", str(csv), "--tag-columns", "bars", "discs", "squares", "--fast", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "bars" in out and "(no tag)" in out and "train imbalance (most common / rarest tag)" in out
    code = main(["prepare-data", str(csv), str(tmp_path / "stream"), "--tag-columns", "bars", "discs", "squares"])
    assert code != 0 and "multi-label data (several tags per image) trains from the CSV" in capsys.readouterr().err
    assert not (tmp_path / "stream").exists()


def test_mosaics_of_real_images_are_multi_label_sets_with_the_tags_they_show(tmp_path: Path) -> None:
    from PIL import Image

    from helpers.shapes import make_splits
    from visiontl.data.mosaics import build_mosaics, tag_rates

    source = make_splits(tmp_path / "src", per_class={"train": 6, "val": 4}, size=16)
    weights = {"bars": 1.0, "discs": 1.0, "squares": 0.1}
    csv = build_mosaics(source, tmp_path / "m", grid=2, sizes={"train": 60, "val": 30}, weights=weights, seed=1)
    rows = [line.split(",") for line in csv.read_text().splitlines()[1:]]
    assert len(rows) == 90 and {r[2] for r in rows} == {"train", "val"}
    path, label, _ = rows[0]
    image = np.asarray(Image.open(csv.parent / path))
    assert image.shape == (32, 32, 3)
    rates = tag_rates(csv)
    assert rates["squares"] < rates["bars"] / 3  # the weights make a rare tag
    dm = CsvDataModule(str(csv), split_column="split", num_workers=0, image_size=32)
    assert dm.task == "multilabel" and dm.class_names == ["bars", "discs", "squares"]
    again = build_mosaics(source, tmp_path / "m", grid=2, sizes={"train": 60, "val": 30}, weights=weights, seed=1)
    assert again.read_text() == csv.read_text()  # reused as built


def test_a_test_split_of_mosaics_uses_val_images_that_val_mosaics_never_show(tmp_path: Path) -> None:
    from PIL import Image

    from helpers.shapes import make_splits
    from visiontl.data.mosaics import build_mosaics

    source = make_splits(tmp_path / "src", per_class={"train": 4, "val": 6}, size=16)
    csv = build_mosaics(source, tmp_path / "m", grid=1, sizes={"train": 10, "val": 40, "test": 40}, empty=0.0, seed=0)
    rows = [line.split(",") for line in csv.read_text().splitlines()[1:]]
    shown = {split: {np.asarray(Image.open(csv.parent / p)).tobytes() for p, _, s in rows if s == split}
             for split in ("val", "test")}
    assert shown["val"] and shown["test"] and not shown["val"] & shown["test"]  # disjoint source images
    val_sources = {np.asarray(Image.open(p).convert("RGB")).tobytes() for p in (source / "val").rglob("*.png")}
    assert shown["val"] | shown["test"] <= val_sources
