"""Backbone creation and layer groups for every timm family we promise."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from visiontl.models.backbones import BackboneError, create_backbone, data_config, layer_groups

FAMILIES = [
    # name, expected number of groups (stem + stages + [neck] + head), has a neck
    ("test_resnet", 6, False),
    ("test_efficientnet", 7, False),
    ("mobilenetv3_small_050", 9, True),  # conv_head shares the matcher's last group with the classifier
    ("test_vit", 8, False),  # one group per block
    ("convnext_atto", 7, True),  # head.norm sits beside head.fc
    ("regnetx_002", 6, False),  # stages are called s1..s4
    ("levit_128s", 6, True),  # unusual: two classifiers (head and head_dist)
]


@pytest.mark.parametrize("name,n_groups,has_neck", FAMILIES)
def test_layer_groups_cover_every_parameter_once_in_order(name: str, n_groups: int, has_neck: bool) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=4)
    groups = layer_groups(model)
    assert len(groups) == n_groups
    assert groups[0].name == "stem" and groups[-1].name == "head"
    assert ("neck" in [g.name for g in groups]) == has_neck
    names = [n for g in groups for n in g.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))
    # the head is exactly the classifier: resetting it re-creates exactly these parameters
    head = model.get_classifier()
    head_ids = {id(p) for p in (head.parameters() if isinstance(head, nn.Module) else [])}
    if name != "levit_128s":
        assert {id(p) for p in groups[-1].params} == head_ids
    # stem -> head order: the stem's parameters come first in registration order
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    assert min(order[n] for n in groups[0].param_names) == 0


def test_batchnorm_modules_belong_to_their_groups() -> None:
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    groups = layer_groups(model)
    assert groups[0].norm_modules and all(m.startswith("bn1") or m.startswith("conv1") for m in groups[0].norm_modules)
    assert all(m.startswith("layer4") for m in groups[-2].norm_modules)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(len(g.norm_modules) for g in groups) == n_bn


def test_fallback_without_group_matcher() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    groups = layer_groups(model)
    assert [g.name for g in groups] == ["0", "1", "head"]
    assert groups[1].norm_modules == ["1"]
    assert groups[-1].param_names == ["4.weight", "4.bias"]


def test_unknown_backbone_suggests_close_names() -> None:
    with pytest.raises(BackboneError, match="resnet18"):
        create_backbone("resnet181", num_classes=2)


def test_offline_pretrained_without_cache_fails_fast_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    # fails before timm ever tries the hub (timm would retry for ~45 s per file)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("timm.create_model was called"))
    with pytest.raises(BackboneError, match=r"resnet18.*not cached.*weights="):
        create_backbone("resnet18", num_classes=2, pretrained=True)


@pytest.mark.parametrize("in_chans", [1, 13])
def test_in_chans_and_data_config(in_chans: int) -> None:
    model = create_backbone("test_resnet", num_classes=3, in_chans=in_chans)
    out = model(torch.randn(2, in_chans, 32, 32))
    assert out.shape == (2, 3)
    cfg = data_config(model)
    assert cfg["input_size"][0] == in_chans and len(cfg["mean"]) == len(cfg["std"]) == in_chans


def test_new_head_has_requested_classes() -> None:
    model = create_backbone("test_vit", num_classes=7)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert model.visiontl_weights["source"] == "random"
