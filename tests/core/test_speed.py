"""Speed settings: allocator, memory format and precision are decided by rule or measurement."""

from __future__ import annotations

import platform

import pytest
import torch

from visiontl.core import speed
from visiontl.tasks import ClassificationTask


def test_allocator_is_tuned_once_and_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    speed.tune_allocator.cache_clear()
    assert speed.tune_allocator() is (platform.libc_ver()[0] == "glibc")  # a no-op elsewhere (musl, macOS)
    speed.tune_allocator.cache_clear()
    monkeypatch.setenv("VISIONTL_TUNE_MALLOC", "0")
    assert speed.tune_allocator() is False
    speed.tune_allocator.cache_clear()


def test_channels_last_for_cnns_only() -> None:
    cnn = ClassificationTask("test_resnet", num_classes=2, pretrained=False)
    vit = ClassificationTask("test_vit", num_classes=2, pretrained=False)
    assert cnn.channels_last and not vit.channels_last
    assert cnn.model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    off = ClassificationTask("test_resnet", num_classes=2, pretrained=False, channels_last=False)
    x = torch.randn(2, 3, 32, 32)
    off.model.load_state_dict(cnn.model.state_dict())
    assert torch.allclose(cnn.eval()(x), off.eval()(x), atol=1e-5)  # same numbers, other layout


def test_bf16_needs_native_support_and_a_measured_gain(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    shape = (2, 3, 8, 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU rules, on any host
    monkeypatch.setattr(speed, "has_native_bf16", lambda: False)
    assert speed.auto_precision(model, shape) == "32-true"
    monkeypatch.setattr(speed, "has_native_bf16", lambda: True)
    monkeypatch.setattr(speed, "measure_bf16_speedup", lambda *a, **k: 0.8)
    assert speed.auto_precision(model, shape) == "32-true"
    monkeypatch.setattr(speed, "measure_bf16_speedup", lambda *a, **k: 1.7)
    assert speed.auto_precision(model, shape) == "bf16-mixed"
    assert speed.auto_precision() == "32-true"  # nothing to measure: never assume
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert speed.auto_precision(model, shape) == "16-mixed"  # a CUDA GPU without bf16


def test_building_a_task_leaves_the_process_alone(shapes_root, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The allocator is a process-wide setting: a task built (a checkpoint loaded in a service)
    must not change it; only training does, in the process that trains."""
    from visiontl import fine_tune
    from visiontl.train import run

    calls = []
    monkeypatch.setattr(run, "tune_allocator", lambda: calls.append(1))
    ClassificationTask("test_resnet", num_classes=2, pretrained=False)
    assert calls == []
    fine_tune(shapes_root, backbone="test_resnet", strategy="probe", pretrained=False, image_size=32, steps=2,
              out=tmp_path, data_kwargs={"num_workers": 0}, trainer_kwargs={"enable_progress_bar": False})
    assert calls


def test_measurement_leaves_the_model_untouched() -> None:
    task = ClassificationTask("test_resnet", num_classes=2, pretrained=False)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    ratio = speed.measure_bf16_speedup(task.model, (4, 3, 32, 32), channels_last=True, steps=1)
    assert ratio > 0
    assert all(torch.equal(before[k], v) for k, v in task.model.state_dict().items())
    assert all(p.grad is None for p in task.model.parameters())


def test_compile_keeps_the_state_dict_names() -> None:
    task = ClassificationTask("test_resnet", num_classes=2, pretrained=False, compile=True)
    plain = ClassificationTask("test_resnet", num_classes=2, pretrained=False)
    assert task.state_dict().keys() == plain.state_dict().keys()
