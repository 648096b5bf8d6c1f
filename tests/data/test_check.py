"""``visiontl check-data`` / :func:`check_data`: every check on tiny seeded datasets, exit codes, JSON."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visiontl.data.check as checkdata
from visiontl.data.check import DataReport, Finding, check_data, dhash, near_duplicate_pairs
from visiontl.cli.commands import main
from visiontl.data.neardup import near_duplicate_clusters
from visiontl.data.images import DataError


def _random_png(path: Path, rng: np.random.Generator, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _dataset(root: Path, per_split: dict[str, int] | None = None, classes: tuple[str, ...] = ("a", "b"),
             seed: int = 0) -> Path:
    """``root/<split>/<class>/<i>.png``: random 40x40 RGB images (default 6 train + 2 val per class)."""
    rng = np.random.default_rng(seed)
    for split, n in (per_split or {"train": 6, "val": 2}).items():
        for cls in classes:
            for i in range(n):
                _random_png(root / split / cls / f"{i}.png", rng)
    return root


def _codes(report: DataReport, severity: str | None = None) -> list[str]:
    return [f.code for f in report.findings if severity is None or f.severity == severity]


def _finding(report: DataReport, code: str) -> Finding:
    return next(f for f in report.findings if f.code == code)


def test_clean_dataset_exit_0_and_json_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "ds")
    out = tmp_path / "report.json"
    assert main(["check-data", str(root), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["counts"] == {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}}
    assert report["n_files"] == 16 and report["n_errors"] == 0 and report["ok"] is True
    assert report["findings"] == []  # 16 different random images: no duplicate, near or not
    assert report["channels"] == {"3": 16} and report["dtypes"] == {"uint8": 16} and report["imbalance"] == 1.0
    printed = capsys.readouterr().out
    assert "No errors" in printed and "train" in printed and str(out) in printed
    # without --json the report goes into the dataset folder (and is not mistaken for data next time)
    assert main(["check-data", str(root)]) == 0
    assert json.loads((root / "check-data.json").read_text())["counts"] == report["counts"]


def test_truncated_png_is_an_error_naming_the_file(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    good = (root / "train" / "a" / "0.png").read_bytes()
    (root / "train" / "a" / "broken.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "report.json"
    assert main(["check-data", str(root), "--json", str(out)]) == 1
    findings = json.loads(out.read_text())["findings"]
    assert [(f["severity"], f["code"]) for f in findings] == [("error", "unreadable")]
    assert len(findings[0]["items"]) == 1 and "broken.png" in findings[0]["items"][0]
    assert "truncated" in findings[0]["items"][0]


def test_exact_duplicate_across_splits_is_leakage(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    shutil.copy(root / "train" / "a" / "3.png", root / "val" / "a" / "copy.png")
    report = check_data(root, progress=False)
    assert _codes(report, "error") == ["leakage"]
    leak = _finding(report, "leakage")
    assert leak.items == ["train: train/a/3.png <-> val: val/a/copy.png (identical pixels)"]
    assert _finding(report, "exact_duplicates").items == ["train/a/3.png (train) = val/a/copy.png (val)"]
    assert "near_duplicates" not in _codes(report)  # an exact duplicate is not reported twice


def test_near_duplicates_across_splits_are_leakage(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    brighter = np.asarray(Image.open(root / "train" / "a" / "1.png")).astype(np.int16) + 3
    Image.fromarray(np.clip(brighter, 0, 255).astype(np.uint8)).save(root / "val" / "a" / "brighter.png")
    (root / "test" / "b").mkdir(parents=True)
    Image.open(root / "train" / "b" / "2.png").save(root / "test" / "b" / "recoded.jpg", quality=95)
    report = check_data(root, progress=False)
    leak = _finding(report, "leakage")
    assert len(leak.items) == 2  # the 16 unrelated random images pair with nothing
    assert leak.items[0].startswith("train: train/a/1.png <-> val: val/a/brighter.png (near duplicate")
    assert leak.items[1].startswith("train: train/b/2.png <-> test: test/b/recoded.jpg (near duplicate")
    assert len(_finding(report, "near_duplicates").items) == 2
    assert "exact_duplicates" not in _codes(report)
    distances = [int(item.rsplit(" ", 1)[1]) for item in _finding(report, "near_duplicates").items]
    assert all(d <= 4 for d in distances)
    # the threshold is honoured: below the smallest distance nothing is a near duplicate
    if min(distances) > 0:
        assert "leakage" not in _codes(check_data(root, near_threshold=min(distances) - 1, progress=False))


def test_a_cluster_of_near_duplicates_is_one_line_and_each_leak_names_its_closest_partner(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    source = np.asarray(Image.open(root / "train" / "a" / "1.png")).astype(np.int16)
    for i, shift in enumerate((2, 4)):  # two more near copies in train, one in val, one in test
        Image.fromarray(np.clip(source + shift, 0, 255).astype(np.uint8)).save(root / "train" / "a" / f"copy{i}.png")
    Image.fromarray(np.clip(source - 2, 0, 255).astype(np.uint8)).save(root / "val" / "a" / "copy.png")
    (root / "test" / "a").mkdir(parents=True)
    Image.fromarray(np.clip(source + 6, 0, 255).astype(np.uint8)).save(root / "test" / "a" / "copy.png")
    report = check_data(root, progress=False)
    near = _finding(report, "near_duplicates")
    assert len(near.items) == 1 and ": 5 images, distances 0 to " in near.items[0]
    assert near.items[0].startswith("train/a/1.png (train) ~ train/a/copy0.png (train) ~ train/a/copy1.png (train)")
    assert "5 images" in near.message
    # one leakage line per val / test image, its partner from an earlier split (val's copy may be the test's)
    leaks = _finding(report, "leakage").items
    assert len(leaks) == 2
    assert leaks[0].startswith("train: train/a/") and "<-> test: test/a/copy.png (near duplicate" in leaks[0]
    assert leaks[1].startswith("train: train/a/") and "<-> val: val/a/copy.png (near duplicate" in leaks[1]


def test_near_duplicate_clusters_match_brute_force() -> None:
    """Clusters, their distance ranges and each image's closest earlier-split partner, against a
    pairwise search, on random hashes with copies (shared groups), ranks and unlabelled images."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(2, 30))
        seeds = rng.integers(0, 2**63, 3)
        group = np.arange(n)
        for i in range(1, n):
            if rng.random() < 0.2:  # a copy: same pixels, same hash
                group[i] = group[int(rng.integers(0, i))]
        hashes = [0] * n
        for i in range(n):
            flips = rng.choice(64, int(rng.integers(0, 6)), replace=False)
            fresh = int(seeds[rng.integers(0, 3)]) ^ sum(1 << int(b) for b in flips)
            hashes[i] = hashes[group[i]] if group[i] != i else fresh
        rank, order, threshold = rng.integers(-1, 3, n), rng.permutation(n), int(rng.integers(0, 6))
        found = near_duplicate_clusters(hashes, threshold, rank, group, order)

        def dist(a: int, b: int) -> int:
            return bin(hashes[a] ^ hashes[b]).count("1")

        for q in range(n):
            candidates = [(dist(p, q), rank[p], order[p], p) for p in range(n) if 0 <= rank[p] < rank[q]
                          and group[p] != group[q] and dist(p, q) <= threshold]
            best = min(candidates, default=None)
            assert found.partner[q] == (-1 if best is None else best[3])
            assert found.partner_distance[q] == (-1 if best is None else best[0])
        linked = [(a, b) for a in range(n) for b in range(a + 1, n) if group[a] == group[b] or dist(a, b) <= threshold]
        component = list(range(n))

        def root(x: int) -> int:
            while component[x] != x:
                x = component[x]
            return x

        for a, b in linked:
            component[root(a)] = root(b)
        for i in range(n):
            same = [j for j in range(n) if root(j) == root(i)]
            groups = {group[j] for j in same}
            if len(groups) < 2:
                assert found.cluster[i] == -1
                continue
            assert {j for j in range(n) if found.cluster[j] == found.cluster[i]} == set(same)
            assert found.sizes[found.cluster[i]] == len(groups)
            d = [dist(a, b) for a, b in linked if a in same and group[a] != group[b]]
            assert tuple(found.distances[found.cluster[i]]) == (min(d), max(d))


def test_near_duplicate_clusters_stay_linear_on_one_huge_cluster() -> None:
    """20,000 images a few bits from one hash: 2 * 10^8 near pairs, reported as one cluster and
    one partner per val image (the pair list would take gigabytes)."""
    rng = np.random.default_rng(1)
    base = np.uint64(0x0F0F_3C3C_5A5A_A5A5)
    flips = (np.uint64(1) << rng.integers(0, 64, (20_000, 2)).astype(np.uint64))
    hashes = base ^ flips[:, 0] ^ flips[:, 1]
    rank = (np.arange(20_000) % 5 == 4).astype(np.int64)
    found = near_duplicate_clusters(hashes, 4, rank)
    assert found.sizes.tolist() == [20_000] and (found.cluster == 0).all()
    assert (found.partner[rank == 1] >= 0).all() and (found.partner[rank == 0] == -1).all()
    assert (rank[found.partner[rank == 1]] == 0).all() and found.partner_distance.max() <= 4


def test_mixed_bit_depth_is_a_warning(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    deep = np.random.default_rng(5).integers(0, 65536, (40, 40)).astype(np.uint16)
    Image.fromarray(deep).save(root / "train" / "b" / "sixteen.png")
    for thorough in (True, False):  # headers give the same modes as decoded pixels
        report = check_data(root, deep=thorough, progress=False)
        assert report.dtypes == {"uint8": 16, "uint16": 1} and report.channels == {"3": 16, "1": 1}
        assert _codes(report, "error") == []
        mixed = _finding(report, "mixed_dtypes")
        assert mixed.severity == "warning"
        assert mixed.items == ["uint8: 16 image(s), e.g. train/a/0.png",
                               "uint16: 1 image(s), e.g. train/b/sixteen.png"]
        assert "mixed_channels" in _codes(report, "warning")


def test_tiny_image_warning_and_min_size(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    _random_png(root / "train" / "b" / "tiny.png", np.random.default_rng(1), size=10)
    report = check_data(root, progress=False)
    assert _finding(report, "tiny_images").items == ["train/b/tiny.png (10x10)"]
    assert report.min_side == 10 and report.max_side == 40
    assert "tiny_images" not in _codes(check_data(root, min_size=8, progress=False))


def test_imbalance_12_to_1(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    root = tmp_path / "flat"  # class-per-folder, no split folders: everything is train
    for i in range(24):
        _random_png(root / "many" / f"{i}.png", rng, size=32)
    for i in range(2):
        _random_png(root / "few" / f"{i}.png", rng, size=32)
    report = check_data(root, progress=False)
    assert report.counts == {"train": {"few": 2, "many": 24}} and report.imbalance == 12.0
    assert _codes(report) == ["imbalance"]
    assert _finding(report, "imbalance").items == ["few: 2", "many: 24"]
    assert _codes(check_data(root, max_imbalance=15, progress=False)) == []


def test_csv_same_file_under_two_labels(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", per_split={"images": 3})
    table = tmp_path / "ds" / "labels.csv"
    rows = [("images/a/0.png", "a", "train"), ("images/a/1.png", "a", "train"), ("images/b/0.png", "b", "train"),
            ("images/b/1.png", "b", "train"), ("images/a/2.png", "a", "valid"), ("images/b/2.png", "b", "valid"),
            ("images/a/0.png", "b", "train")]  # a's image listed again as b
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows([("file", "cls", "split"), *rows])
    out = tmp_path / "report.json"
    args = ["check-data", str(table), "--path-column", "file", "--label-column", "cls", "--json", str(out)]
    assert main(args) == 1
    report = json.loads(out.read_text())
    assert report["counts"] == {"train": {"a": 2, "b": 3}, "val": {"a": 1, "b": 1}}  # "valid" is val
    conflict = next(f for f in report["findings"] if f["code"] == "conflicting_labels")
    assert conflict["severity"] == "error"
    assert conflict["items"] == ["images/a/0.png: listed as 'a' (train), 'b' (train)"]
    assert [f["code"] for f in report["findings"] if f["severity"] == "error"] == ["conflicting_labels"]
    # a missing file is an error too, and the default report lands next to the CSV
    with table.open("a", newline="") as fh:
        csv.writer(fh).writerow(("images/a/gone.png", "a", "train"))
    assert main(["check-data", str(table), "--path-column", "file", "--label-column", "cls"]) == 1
    default = json.loads((root / "labels.check-data.json").read_text())
    unreadable = next(f for f in default["findings"] if f["code"] == "unreadable")
    assert unreadable["items"] == ["images/a/gone.png: file not found"]


def test_usage_problems_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_such_dataset"
    assert main(["check-data", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["check-data", str(tmp_path / "empty")]) == 2
    assert "class sub-folders" in capsys.readouterr().err
    table = tmp_path / "t.csv"
    table.write_text("image,label\nx.png,a\n")
    assert main(["check-data", str(table)]) == 2
    err = capsys.readouterr().err
    assert "'path'" in err and "--path-column" in err
    with pytest.raises(DataError, match="no train/ folder"):
        check_data(_dataset(tmp_path / "valonly", per_split={"val": 1}), progress=False)


def test_cheap_mode_on_splits_dict_does_no_hashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _dataset(tmp_path / "ds")
    shutil.copy(root / "train" / "a" / "0.png", root / "val" / "a" / "copy.png")
    splits = {split: [(p, p.parent.name) for p in sorted((root / split).rglob("*.png"))]
              for split in ("train", "val")}

    def forbidden(*_args: object) -> None:
        raise AssertionError("deep=False must not decode or hash pixels")

    for name in ("image_digest", "dhash", "read_raw"):
        monkeypatch.setattr(checkdata, name, forbidden)
    report = check_data(splits, deep=False, progress=False)
    assert report.deep is False and report.findings == []
    assert report.counts == {"train": {"a": 6, "b": 6}, "val": {"a": 3, "b": 2}}
    assert report.dtypes == {"uint8": 17} and report.min_side == 40
    # what needs no pixels is still checked: a file in two splits, a class missing from train
    splits["val"].append((root / "train" / "b" / "0.png", "b"))
    splits["test"] = [(_random_png(root / "test" / "c" / "0.png", np.random.default_rng(9)), "c")]
    report = check_data(splits, deep=False, progress=False)
    assert _codes(report, "error") == ["missing_in_train", "leakage"]
    assert _finding(report, "leakage").items == ["train: train/b/0.png <-> val: train/b/0.png (same file)"]
    assert _finding(report, "missing_in_train").items == ["c: 0 in train, 1 in test"]


def test_progress_bar_from_200_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def fake_tqdm(items, **kwargs):  # noqa: ANN001, ANN202
        seen.append(kwargs["disable"])
        return items

    monkeypatch.setattr(checkdata, "tqdm", fake_tqdm)
    rng = np.random.default_rng(3)
    files = [_random_png(tmp_path / f"{i}.png", rng, size=8) for i in range(200)]
    check_data({"train": [(p, "x") for p in files[:199]]}, deep=False)
    check_data({"train": [(p, "x") for p in files]}, deep=False)
    check_data({"train": [(p, "x") for p in files]}, deep=False, progress=False)
    assert seen == [True, False, True]


def test_near_duplicate_search_on_synthetic_hashes() -> None:
    rng = np.random.default_rng(4)
    base = int(rng.integers(0, 2**63)) * 2 + 1
    flip4 = base ^ sum(1 << b for b in (0, 17, 40, 63))  # 4 bits apart, one in each of 4 chunks
    flip5 = base ^ sum(1 << b for b in (3, 16, 29, 42, 55))  # 5 bits apart: one per 13-bit chunk
    others = [int(x) for x in rng.integers(0, 2**63, 50)]  # unrelated: ~32 bits from anything
    hashes = [base, flip4, flip5, *others]
    assert near_duplicate_pairs(hashes, 4) == [(0, 1, 4)]
    assert near_duplicate_pairs(hashes, 5) == [(0, 1, 4), (0, 2, 5)]
    assert near_duplicate_pairs(hashes, 3) == []
    assert near_duplicate_pairs([base, base, flip4], 0) == [(0, 1, 0)]
    assert near_duplicate_pairs([2**64 - 1, 2**64 - 2], 1) == [(0, 1, 1)]  # the full unsigned range
    with pytest.raises(ValueError):
        near_duplicate_pairs(hashes, -1)


@pytest.mark.parametrize("threshold", [0, 2, 4, 7, 9])
def test_near_duplicate_search_matches_brute_force(threshold: int) -> None:
    rng = np.random.default_rng(threshold)
    hashes = [12345, 12345]  # an equal pair, for threshold 0
    for seed in rng.integers(0, 2**63, 40):
        for _ in range(3):  # clusters: copies of one hash with 0..8 bits flipped
            flips = rng.choice(64, int(rng.integers(0, 9)), replace=False)
            hashes.append(int(seed) ^ sum(1 << int(b) for b in flips))
    brute = [(i, j, bin(hashes[i] ^ hashes[j]).count("1")) for i in range(len(hashes))
             for j in range(i + 1, len(hashes)) if bin(hashes[i] ^ hashes[j]).count("1") <= threshold]
    assert brute and near_duplicate_pairs(hashes, threshold) == brute


def test_dhash_tolerates_re_encoding_and_skips_flat_images() -> None:
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    darker = np.clip(image.astype(np.int16) - 10, 0, 255).astype(np.uint8)  # clipped: a few bits flip
    wide = (image.astype(np.uint16) * 257)  # the same picture stored as 16-bit
    h = dhash(image)
    assert h is not None and 0 <= h < 2**64
    assert bin(h ^ dhash(darker)).count("1") <= 4 and dhash(wide) == h
    assert bin(h ^ dhash(other)).count("1") > 10
    assert dhash(np.full((32, 32, 1), 7, dtype=np.uint8)) is None


def test_summary_lists_ten_items_then_the_rest() -> None:
    finding = Finding("warning", "tiny_images", "tiny", [f"img{i}.png (8x8)" for i in range(15)])
    report = DataReport(counts={"train": {"a": 15}}, findings=[finding])
    text = report.summary()
    assert "img9.png" in text and "img10.png" not in text and "... and 5 more" in text
    assert report.ok and report.warnings == [finding] and report.errors == []
    assert report.to_dict()["findings"][0]["count"] == 15


def test_an_unreadable_file_is_named_by_its_place_in_the_set_not_its_machine_path(tmp_path: Path) -> None:
    """The header check's reason repeats the file's path as it was read: the warning names it
    relative to the dataset root instead (issue 33: no machine paths in what a notebook shows)."""
    rng = np.random.default_rng(5)
    root = tmp_path / "set"
    for i in range(3):
        _random_png(root / "a" / f"{i}.png", rng)
    (root / "a" / "broken.png").write_bytes(b"not an image at all")
    report = check_data(root, deep=False, progress=False)
    finding = _finding(report, "unreadable_header")
    assert "a/broken.png" in finding.message
    assert str(tmp_path) not in finding.message + " ".join(finding.items), finding.message
