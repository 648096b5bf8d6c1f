"""Device defaults by value, with the device faked: precision, pinned memory, workers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from visiontl.core.devices import default_precision, device_kind, resolve_precision
from visiontl.data.base import loader_defaults


class CUDAAccelerator:  # what Lightning passes when an Accelerator object was given: only its name counts
    pass


@pytest.mark.parametrize(("accelerator", "cuda", "mps", "kind"), [
    ("auto", True, False, "cuda"), ("auto", False, True, "mps"), ("auto", False, False, "cpu"),
    ("gpu", True, True, "cuda"), ("gpu", False, False, "cpu"), ("cpu", True, True, "cpu"),
    ("cuda", False, False, "cuda"), (None, True, False, "cuda"), (CUDAAccelerator(), False, False, "cuda"),
])
def test_device_kind_follows_the_accelerator_asked_for(accelerator, cuda: bool, mps: bool, kind: str) -> None:
    assert device_kind(accelerator, cuda_available=cuda, mps_available=mps) == kind


def test_precision_per_device() -> None:
    assert default_precision("cuda", bf16_supported=True) == "bf16-mixed"
    assert default_precision("cuda", bf16_supported=False) == "16-mixed"  # Lightning adds the grad scaler
    assert default_precision("mps") == "32-true"
    assert default_precision("cpu") is None  # measured per model (speed.auto_precision)


def test_unset_precision_resolves_on_a_faked_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision(None) == "16-mixed" and resolve_precision("auto", "gpu") == "16-mixed"
    assert resolve_precision("32-true") == "32-true"  # given: kept
    assert resolve_precision(None, "cpu") is None  # a CPU run on a GPU machine stays float32

    from visiontl.core.speed import auto_precision

    assert auto_precision(accelerator="auto") == "16-mixed"
    assert auto_precision(accelerator="cpu") == "32-true"  # was bf16/16-mixed whenever CUDA existed
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert auto_precision() == "bf16-mixed"


@pytest.mark.parametrize(("kind", "cpus", "expected"), [
    ("cuda", 16, {"pin_memory": True, "num_workers": 8}), ("cuda", 1, {"pin_memory": True, "num_workers": 1}),
    ("cpu", 2, {"pin_memory": False, "num_workers": 1}), ("cpu", 16, {"pin_memory": False, "num_workers": 4}),
    ("mps", 10, {"pin_memory": False, "num_workers": 8}),
])
def test_loader_defaults_per_device(kind: str, cpus: int, expected: dict) -> None:
    assert loader_defaults(kind, cpus) == expected


def test_loaders_pin_memory_only_for_a_cuda_trainer(shapes_root: Path) -> None:
    from visiontl.data import FolderDataModule
    from visiontl.tasks.link import DataLink

    dm = FolderDataModule(str(shapes_root), image_size=32, batch_size=4)
    dm.setup("fit")
    assert dm.train_dataloader().pin_memory is False and dm.val_dataloader().pin_memory is False
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), world_size=1,
                              current_epoch=0, ckpt_path=None, global_rank=0, datamodule=dm)
    dm.trainer = trainer
    DataLink().setup(trainer, SimpleNamespace(set_preprocessing=lambda pre: None, backbone_preprocessing=lambda: None),
                     "fit")  # the task's link tells the datamodule its device
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.pin_memory is True and val.pin_memory is True
    assert train.num_workers == loader_defaults("cuda")["num_workers"]


def test_distributed_epoch_sampler_shares_the_one_process_order() -> None:
    """Rank r takes every world_size-th index of the one-process order (padded to equal shares), so
    batch k of each rank together is batch k of one process; Lightning keeps it (a DistributedSampler)."""
    from torch.utils.data import DistributedSampler

    from visiontl.data.sampling import DistributedEpochSampler, EpochSampler

    one = list(EpochSampler(10, seed=3, encode_epoch=True, epoch_fn=lambda: 2))
    ranks = [list(DistributedEpochSampler(10, seed=3, encode_epoch=True, epoch_fn=lambda: 2, rank=r, world_size=2))
             for r in range(2)]
    assert isinstance(DistributedEpochSampler(10, rank=0, world_size=2), DistributedSampler)
    assert all(len(r) == 5 for r in ranks) and min(one) >= 20  # epoch 2's encoded indices
    for k in range(0, 5, 2):  # per-rank batch 2 = one-process batch 4
        assert sorted(ranks[0][k:k + 2] + ranks[1][k:k + 2]) == sorted(one[2 * k:2 * k + 4])
    uneven = [list(DistributedEpochSampler(7, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert [len(u) for u in uneven] == [4, 4] and len(DistributedEpochSampler(7, rank=1, world_size=2)) == 4
    # a resumed epoch: the skip counts items of the one-process order (batches x batch x world size)
    skipped = DistributedEpochSampler(10, seed=3, epoch_fn=lambda: 0, rank=1, world_size=2)
    skipped.skip_next(4)
    assert list(skipped) == list(EpochSampler(10, seed=3, epoch_fn=lambda: 0))[4:][1::2]


def test_a_batch_of_one_per_device_is_refused_where_batchnorm_trains() -> None:
    from visiontl.data import FolderDataModule
    from visiontl.strategies import StrategyError
    from visiontl.tasks import ClassificationTask

    def trainer(world: int, batch: int | None) -> SimpleNamespace:
        return SimpleNamespace(world_size=world, datamodule=FolderDataModule("unread", batch_size=batch),
                               strategy=SimpleNamespace(_layer_sync=None, root_device=torch.device("cpu")))

    task = ClassificationTask("test_resnet", num_classes=3, pretrained=False,
                              strategy={"name": "full", "bn_stats": "update"})
    task._trainer = trainer(2, 1)
    with pytest.raises(StrategyError, match="batch_size 1 per device across 2 processes"):
        task.setup("fit")
    for world, batch in ((1, 1), (2, 2), (2, None)):  # one process, or two images per device: fine
        task._trainer = trainer(world, batch)
        task.setup("fit")
    for name in ("gradual", "full"):  # BatchNorm statistics frozen (full's default too): nothing normalises by one image
        frozen = ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy=name)
        frozen._trainer = trainer(2, 1)
        frozen.setup("fit")
