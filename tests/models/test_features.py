"""Feature cache: hits, misses, invalidation, corruption recovery, and cached == uncached probe."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from helpers.shapes import make_folder
from visiontl.data import FolderDataModule
from visiontl.core.cache import ArrayCache
from visiontl.models.features import classify_features, pooled_features, supports_features
from visiontl.strategies import Probe
from visiontl.tasks import ClassificationTask


def _fit_probe(root: Path, cache: bool, tmp_path: Path, steps: int = 12, backbone: str = "test_resnet",
               **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    dm = FolderDataModule(str(root), image_size=32, num_workers=0, batch_size=8, augment="none")
    task = ClassificationTask(backbone, num_classes=dm.num_classes, strategy=Probe(cache_features=cache),
                              pretrained=False)
    trainer = pl.Trainer(max_steps=steps, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                         **{"logger": False, **trainer_kwargs})
    trainer.fit(task, dm)
    return task, dm


def test_cached_probe_logs_the_same_epoch_loss_and_steps_only_when_written(shapes_root: Path, tmp_path: Path) -> None:
    """Head steps on features skip Lightning's per-step logging, yet the logged epoch losses equal
    those of the image run, and the step loss appears exactly at the logger's steps."""
    import pandas as pd
    from pytorch_lightning.loggers import CSVLogger

    def logged(cache: bool, every: int) -> pd.DataFrame:
        logger = CSVLogger(tmp_path, name=f"c{cache}{every}")
        _fit_probe(shapes_root, cache, tmp_path, steps=12, logger=logger, log_every_n_steps=every)
        return pd.read_csv(Path(logger.log_dir) / "metrics.csv")

    cached, plain = logged(True, 3), logged(False, 3)
    a, b = cached["train_loss_epoch"].dropna().to_numpy(), plain["train_loss_epoch"].dropna().to_numpy()
    assert len(a) == len(b) >= 2 and np.allclose(a, b, atol=1e-5)
    steps = cached.dropna(subset=["train_loss_step"])["step"].tolist()
    assert steps == [s for s in range(12) if (s + 1) % 3 == 0]


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in (root / "features").iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_pooled_features_then_classifier_equal_the_model(backbone: str) -> None:
    from visiontl.models.backbones import create_backbone

    model = create_backbone(backbone, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    assert supports_features(model)
    assert torch.allclose(classify_features(model, pooled_features(model, x)), model(x), atol=1e-5)


def test_cached_and_uncached_probe_train_the_same_head(shapes_root: Path, tmp_path: Path) -> None:
    cached, dm = _fit_probe(shapes_root, True, tmp_path)
    assert type(dm.datasets["train"]).__name__ == "FeatureDataset"
    plain, dm2 = _fit_probe(shapes_root, False, tmp_path)
    assert type(dm2.datasets["train"]).__name__ == "ImageDataset"
    for a, b in zip(cached.model.get_classifier().parameters(), plain.model.get_classifier().parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    start = ClassificationTask("test_resnet", num_classes=3, pretrained=False)
    assert not torch.allclose(start.model.fc.weight, cached.model.fc.weight)  # it did train


def test_cache_hit_miss_and_invalidation(tmp_path: Path) -> None:
    cache_root = Path(os.environ["VISIONTL_CACHE"])
    root = make_folder(tmp_path / "d", per_class=6, classes=("a", "b"))
    before = set(_entries(cache_root)) if (cache_root / "features").exists() else set()
    _fit_probe(root, True, tmp_path, steps=2)
    first = set(_entries(cache_root)) - before
    assert len(first) == 2  # train + val
    mtimes = {p: (p / "features.npy").stat().st_mtime_ns for p in first}
    _fit_probe(root, True, tmp_path, steps=2)  # hit: nothing new, nothing rewritten
    assert set(_entries(cache_root)) - before == first
    assert all((p / "features.npy").stat().st_mtime_ns == m for p, m in mtimes.items())
    # touching one image invalidates the split that holds it
    image = sorted((root / "a").glob("*.png"))[0]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    _fit_probe(root, True, tmp_path, steps=2)
    assert len(set(_entries(cache_root)) - before - first) == 1
    # another image size is another key
    dm = FolderDataModule(str(root), image_size=48, num_workers=0, augment="none")
    task = ClassificationTask("test_resnet", num_classes=2, strategy="probe", pretrained=False)
    pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               num_sanity_val_steps=0, default_root_dir=tmp_path).fit(task, dm)
    assert len(set(_entries(cache_root)) - before - first) == 3


def test_a_relabelled_csv_over_the_same_images_gets_its_own_labels(tmp_path: Path) -> None:
    """The cache holds labels beside the features: a CSV that changes labels but not images must not
    read the old ones back (the files' sizes and times alone would say 'same data')."""
    from visiontl.data import CsvDataModule
    from visiontl.models.features import split_features

    root = make_folder(tmp_path / "d", per_class=4, classes=("a", "b"))
    images = sorted(root.rglob("*.png"))
    model = ClassificationTask("test_resnet", num_classes=2, strategy="probe", pretrained=False).model

    def cached_and_true_labels(labels: list[str]) -> tuple[list[int], list[int]]:
        csv = tmp_path / "labels.csv"
        splits = ["train", "train", "train", "val"] * 2  # fixed: the training files stay the same
        csv.write_text("path,label,split\n" + "".join(f"{p},{y},{s}\n" for p, y, s in zip(images, labels, splits)))
        dm = CsvDataModule(str(csv), image_size=32, num_workers=0, augment="none", split_column="split")
        dm.setup()
        truth = dict(zip(images, labels))
        _, cached = split_features(model, "test_resnet", dm, "train")
        return cached.tolist(), [dm.class_names.index(truth[p]) for p in dm.paths("train")]

    first = ["a"] * 4 + ["b"] * 4
    cached, truth = cached_and_true_labels(first)
    assert cached == truth
    flipped = ["b" if y == "a" else "a" for y in first]  # the same files, every label flipped
    cached, truth = cached_and_true_labels(flipped)
    assert cached == truth and sorted(truth) == [0] * 3 + [1] * 3


def test_corrupt_or_half_written_entries_are_rebuilt(tmp_path: Path) -> None:
    cache = ArrayCache(tmp_path / "cache")
    feats = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    labels = np.arange(10) % 2
    key = cache.key({"x": 1})
    entry, hit = cache.get_or_compute(key, lambda: {"features": feats, "labels": labels})
    assert not hit and np.array_equal(np.asarray(entry["features"]), feats)
    assert cache.get_or_compute(key, lambda: pytest.fail("should hit"))[1]
    # flip bytes inside the features file: detected by the checksum, rebuilt
    path = entry.path / "features.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    calls = []
    entry, hit = cache.get_or_compute(key, lambda: calls.append(1) or {"features": feats, "labels": labels})
    assert not hit and calls == [1] and np.array_equal(np.asarray(entry["features"]), feats)
    # a half-written entry (no meta.json) is not used either
    (entry.path / "meta.json").unlink()
    assert cache.load(key) is None and not entry.path.exists()


def test_augmented_views_multiply_the_training_rows(shapes_root: Path, tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    dm = FolderDataModule(str(shapes_root), image_size=32, num_workers=0, augment="natural")
    task = ClassificationTask("test_resnet", num_classes=3, strategy=Probe(views=3), pretrained=False)
    pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               num_sanity_val_steps=0, default_root_dir=tmp_path).fit(task, dm)
    n = len(dm.splits["train"])
    assert len(dm.datasets["train"]) == 3 * n and len(dm.datasets["val"]) == len(dm.splits["val"])
    rows = dm.datasets["train"].features
    assert not np.allclose(rows[0], rows[n])  # two different augmented views of image 0


def test_onnxruntime_extraction_matches_pytorch(shapes_root: Path) -> None:
    from visiontl.models.features import choose_engine, extract_features

    dm = FolderDataModule(str(shapes_root), image_size=32, num_workers=0, augment="none")
    task = ClassificationTask("test_resnet", num_classes=3, pretrained=False)
    dm.setup()
    source = dm.feature_source("train")
    torch_feats, labels = extract_features(task.model, source, batch_size=8, engine="torch")
    ort_feats, ort_labels = extract_features(task.model, source, batch_size=8, engine="onnxruntime")
    batch = next(iter(torch.utils.data.DataLoader(source, batch_size=8)))["image"]
    used, _ = choose_engine(task.model, batch, "onnxruntime")
    assert used == "onnxruntime"  # exported, checked and used (not silently PyTorch)
    assert np.array_equal(labels, ort_labels)
    assert np.allclose(ort_feats, torch_feats, rtol=1e-3, atol=1e-4 * np.abs(torch_feats).max())


def test_onnxruntime_is_refused_when_features_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontl.models import features

    task = ClassificationTask("test_resnet", num_classes=3, pretrained=False)
    monkeypatch.setattr(features, "onnx_features",
                        lambda model, x: (lambda b: features.pooled_features(model.eval(), b) + 0.5))
    used, _ = features.choose_engine(task.model.eval(), torch.randn(4, 3, 32, 32), "onnxruntime")
    assert used == "torch"


def test_an_unknown_engine_is_refused_on_any_device() -> None:
    """Checked before the non-CPU shortcut (a model on a GPU, faked by the meta device, once took
    the PyTorch path with any engine name)."""
    from visiontl.models import features

    model = ClassificationTask("test_resnet", num_classes=3, pretrained=False).model
    for device in ("cpu", "meta"):
        with pytest.raises(ValueError, match="engine must be 'auto', 'torch' or 'onnxruntime', got 'tensorrt'"):
            features.choose_engine(model.to(device), torch.randn(2, 3, 32, 32), "tensorrt")
    assert features.choose_engine(model, torch.randn(2, 3, 32, 32), "auto")[0] == "torch"  # meta: no ONNX attempt


def test_onnxruntime_tolerance_is_absolute_plus_relative(monkeypatch: pytest.MonkeyPatch) -> None:
    """Features of scale 1e-3: an absolute difference of 5e-5 is within atol=1e-4 (an atol scaled
    by the features, 1e-7 here, refused it); 5e-4 is not."""
    from visiontl.models import features

    task = ClassificationTask("test_resnet", num_classes=3, pretrained=False).eval()
    tiny = lambda model, x: torch.tanh(model.forward_head(model.forward_features(x), pre_logits=True)) * 1e-3  # noqa: E731
    monkeypatch.setattr(features, "pooled_features", tiny)
    batch = torch.randn(4, 3, 32, 32)
    for offset, expected in ((5e-5, "onnxruntime"), (5e-4, "torch")):
        monkeypatch.setattr(features, "onnx_features", lambda model, x, o=offset: (lambda b: tiny(model, b) + o))
        used, _ = features.choose_engine(task.model, batch, "onnxruntime")
        assert used == expected, offset


_RACE = """
import sys, time, random
import numpy as np
from visiontl.core.cache import ArrayCache
cache = ArrayCache(sys.argv[1])
random.seed(int(sys.argv[2]))
for i in range(int(sys.argv[3])):
    key = f"k{i:03d}"
    def compute():
        time.sleep(random.random() * 0.01)  # widen the window between compute and publish
        return {"features": np.full((50, 8), i, np.float32), "labels": np.arange(50)}
    entry, _ = cache.get_or_compute(key, compute)
    assert float(entry["features"][0, 0]) == i and entry["features"].shape == (50, 8), key
print("ok")
"""


def test_cache_is_safe_when_processes_race_for_the_same_keys(tmp_path: Path) -> None:
    """Four real processes build the same 40 entries at once: no error, no lost or mixed entry."""
    import subprocess
    import sys

    script = tmp_path / "race.py"
    script.write_text(_RACE)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(seed), "40"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(4)]
    results = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    cache = ArrayCache(tmp_path / "cache")
    for i in range(40):
        entry = cache.load(f"k{i:03d}")
        assert entry is not None and float(entry["features"].max()) == float(entry["features"].min()) == i
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp or trash left


@pytest.mark.parametrize("meta", ["null", "[]", '{"sha256": null}', "{", '{"sha256": {}, "shape": "x"}'])
def test_unreadable_metadata_means_rebuild(tmp_path: Path, meta: str) -> None:
    cache = ArrayCache(tmp_path)
    cache.save("k", {"features": np.ones((3, 2), np.float32), "labels": np.arange(3)})
    (tmp_path / "k" / "meta.json").write_text(meta)
    calls = []
    entry, hit = cache.get_or_compute("k", lambda: calls.append(1) or {"features": np.zeros((3, 2), np.float32)})
    assert not hit and calls == [1] and float(entry["features"].sum()) == 0.0
    assert cache.get_or_compute("k", lambda: 1 / 0)[1]  # rebuilt once, then a hit
