"""Label budgets: seeded, stratified, nested few-shot subsets; the validation split stays whole;
features cached for the whole training split serve every budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from visiontl.data import FolderDataModule
from visiontl.data.images import DataError
from visiontl.data.shots import nested_shots, parse_shots


def _samples(per_class: dict[str, int]) -> list[tuple[Path, str]]:
    return [(Path(f"/data/{c}/{i:03d}.png"), c) for c, n in per_class.items() for i in range(n)]


def test_shots_parse() -> None:
    assert parse_shots("10,1,all,5") == [1, 5, 10, None]
    assert parse_shots([5, "all", 5]) == [5, None] and parse_shots(None) == [None] and parse_shots(3) == [3]
    with pytest.raises(DataError, match="'ten' is neither"):
        parse_shots("1,ten")
    with pytest.raises(DataError, match="at least 1"):
        parse_shots("0")


def test_subsets_are_stratified_nested_and_seeded() -> None:
    samples = _samples({"a": 30, "b": 12, "c": 40})
    for seed in range(3):
        previous: set[Path] = set()
        for k in (1, 5, 10):
            subset = nested_shots(samples, k, seed)
            counts = {c: sum(1 for _, label in subset if label == c) for c in "abc"}
            assert counts == {"a": k, "b": k, "c": k}  # stratified: k of every class
            paths = {p for p, _ in subset}
            assert previous <= paths  # nested: the smaller budget's images are all in the larger one
            previous = paths
            assert subset == [s for s in samples if s[0] in paths]  # in the original order
    assert {p for p, _ in nested_shots(samples, 5, 0)} != {p for p, _ in nested_shots(samples, 5, 1)}
    assert nested_shots(samples, None, 0) == samples
    # another class added does not change the draw of the others
    more = samples + _samples({"d": 9})
    assert [s for s in nested_shots(more, 5, 0) if s[1] != "d"] == nested_shots(samples, 5, 0)


def test_more_shots_than_a_class_has_names_the_class() -> None:
    with pytest.raises(DataError, match=r"20 shots per class.*'b' has 12 image\(s\); use at most 12"):
        nested_shots(_samples({"a": 30, "b": 12}), 20, 0)


def test_datamodule_budget_keeps_the_whole_validation_split(shapes_root: Path) -> None:
    whole = FolderDataModule(str(shapes_root), image_size=32, num_workers=0)
    few = FolderDataModule(str(shapes_root), image_size=32, num_workers=0, shots=2, shots_seed=4)
    assert few.splits["val"] == whole.splits["val"]
    assert few.class_counts == [2] * whole.num_classes and few.class_names == whole.class_names
    assert {p for p, _ in few.splits["train"]} < {p for p, _ in whole.splits["train"]}
    with pytest.raises(DataError, match="shots per class asked"):
        FolderDataModule(str(shapes_root), image_size=32, num_workers=0, shots=50).splits


def test_every_budget_reads_the_whole_splits_cached_features(shapes_root: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    from visiontl.models.features import split_features

    monkeypatch.setenv("VISIONTL_CACHE", str(tmp_path / "cache"))
    model = timm.create_model("test_resnet", num_classes=3).eval()
    whole = FolderDataModule(str(shapes_root), image_size=32, num_workers=0)
    features, labels = split_features(model, "test_resnet", whole, "train")
    entries = sorted((tmp_path / "cache" / "features").iterdir())
    few = FolderDataModule(str(shapes_root), image_size=32, num_workers=0, shots=3, shots_seed=1)
    few_features, few_labels = split_features(model, "test_resnet", few, "train")
    assert sorted((tmp_path / "cache" / "features").iterdir()) == entries  # nothing extracted again
    rows = [whole.paths("train").index(p) for p in few.paths("train")]
    assert torch.equal(torch.from_numpy(few_features), torch.from_numpy(features[rows]))
    assert few_labels.tolist() == labels[rows].tolist() and len(rows) == 3 * whole.num_classes


def test_a_moved_data_set_draws_the_same_subsets() -> None:
    here = _samples({"a": 20, "b": 20})
    moved = [(Path("/elsewhere/copy") / p.relative_to("/data"), c) for p, c in here]
    assert [p.name for p, _ in nested_shots(here, 5, 3)] == [p.name for p, _ in nested_shots(moved, 5, 3)]
