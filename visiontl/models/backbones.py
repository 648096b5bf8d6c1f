"""Backbones: timm models by name, their layer groups (stem -> head) and their data config.

Every strategy in :mod:`visiontl.strategies` works on the :class:`LayerGroup` list returned by
:func:`layer_groups`, so none of them needs to know an architecture's layer names.
"""

from __future__ import annotations

import difflib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from visiontl.core.errors import UserError
from visiontl.models.weights import classifier_names

__all__ = [
    "BackboneError",
    "LayerGroup",
    "classifier_names",
    "create_backbone",
    "data_config",
    "head_parameter_names",
    "head_prefixes",
    "layer_groups",
]


class BackboneError(UserError):
    """A backbone name, pretrained source or layer grouping that cannot be used."""


@dataclass
class LayerGroup:
    """A contiguous block of a backbone's parameters, in stem -> head order.

    Attributes:
        name: readable name (``stem``, ``layer3``, ``blocks.5``, ``neck``, ``head``).
        param_names: names of the parameters in ``model.named_parameters()``.
        params: the parameters themselves.
        norm_modules: names of modules with running statistics (BatchNorm and friends) that
            belong to this group.
    """

    name: str
    param_names: list[str]
    params: list[nn.Parameter] = field(repr=False)
    norm_modules: list[str] = field(default_factory=list)

    @property
    def numel(self) -> int:
        """Number of scalar parameters in the group."""
        return sum(p.numel() for p in self.params)


def check_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise BackboneError(
        f"Unknown backbone {name!r}.{hint} See timm.list_models() for all names "
        f"(e.g. timm.list_models('*{name.split('_')[0]}*'))."
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_pretrained_available(name: str) -> None:
    """Fail within seconds when pretrained weights can be neither found in a cache nor downloaded."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise BackboneError(f"timm has no pretrained weights for {name!r}; use pretrained=False.")
    hf_id = cfg.hf_hub_id
    if hf_id:
        from huggingface_hub import try_to_load_from_cache

        repo = hf_id.split("@")[0]  # "org/name@revision" -> "org/name"
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, filename), str):
                return
    elif cfg.url:
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if hub_dir.exists():
            return
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not _hub_reachable():
        raise BackboneError(
            f"Pretrained weights for {name!r} are not cached and the Hugging Face hub cannot be "
            f"reached{' (HF_HUB_OFFLINE is set)' if offline else ''}. Pass a local checkpoint "
            f"instead: weights='path/to/{name}.safetensors' (Python) or `--model.init_args.weights "
            f"path/to/file` (CLI), or pretrained=False to start from random weights; `visiontl doctor` lists "
            f"the weights this machine has offline."
        )


def create_backbone(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    weights: str | os.PathLike[str] | None = None,
    in_chans: int = 3,
    converter: str | None = "auto",
    **kwargs: Any,
) -> nn.Module:
    """Create a timm classification model with a fresh head for ``num_classes``.

    Args:
        name: any timm model name (``resnet50``, ``convnext_tiny``, ``vit_small_patch16_224``...).
        num_classes: classes of the new head (the head is always re-initialised); 0 builds the
            backbone alone (pooled features out, as for self-supervised pretraining).
        pretrained: download / use cached ImageNet weights from timm's hub. Ignored when
            ``weights`` is given.
        weights: a local checkpoint (``.safetensors`` or a weights-only ``.pth``) or a named
            source from :func:`visiontl.models.weights.list_sources`; loaded without the network.
        in_chans: input channels; the pretrained stem is adapted by summing / repeating weights.
        converter: key converter for foreign checkpoints (``"auto"`` detects one, ``None`` none).
        **kwargs: passed to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``...).

    Returns:
        The model, with ``model.visiontl_weights`` describing where its weights came from.
    """
    check_name(name)
    if num_classes < 0:
        raise BackboneError(f"num_classes must be >= 0 (0: no classifier), got {num_classes}.")
    use_hub = pretrained and weights is None
    if use_hub:
        check_pretrained_available(name)
    model = timm.create_model(
        name, pretrained=use_hub, num_classes=num_classes, in_chans=in_chans, **kwargs
    )
    report: dict[str, Any] = {"source": "hub" if use_hub else "random"}
    if weights is not None:
        from visiontl.models.weights import load_weights

        report = {"source": "file", **load_weights(model, weights, converter=converter)}
    model.visiontl_weights = report  # type: ignore[assignment]
    return model


def data_config(model: nn.Module) -> dict[str, Any]:
    """The model's preprocessing: ``input_size`` (C, H, W), ``mean``, ``std``, ``interpolation``,
    ``crop_pct``, from timm's pretrained config; mean/std follow the model's input channels."""
    cfg = dict(timm.data.resolve_model_data_config(model))
    chans = _in_chans(model)
    mean, std = list(cfg["mean"]), list(cfg["std"])
    if chans != len(mean):
        # Same rule timm uses for the stem: average the RGB statistics and repeat them.
        mean = [sum(mean) / len(mean)] * chans
        std = [sum(std) / len(std)] * chans
    cfg.update(mean=tuple(mean), std=tuple(std), input_size=(chans, *cfg["input_size"][1:]))
    return cfg


def _in_chans(model: nn.Module) -> int:
    first = getattr(model, "pretrained_cfg", {}).get("first_conv")
    if first:
        try:
            return int(model.get_submodule(first).weight.shape[1])
        except AttributeError:
            pass
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return int(module.weight.shape[1])
    return 3


head_prefixes = classifier_names  # the earlier name


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the classifier parameters (the part re-initialised for new classes)."""
    prefixes = classifier_names(model)
    if not prefixes and hasattr(model, "get_classifier"):
        head = model.get_classifier()
        ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
        return [n for n, p in model.named_parameters() if id(p) in ids]
    return [n for n, _ in model.named_parameters() if any(n == p or n.startswith(p + ".") for p in prefixes)]


def _timm_groups(model: nn.Module) -> list[list[str]] | None:
    if not hasattr(model, "group_matcher"):
        return None
    from timm.models._manipulate import group_parameters

    try:
        grouped = group_parameters(model, model.group_matcher(coarse=True))
    except (NotImplementedError, AttributeError, TypeError):
        return None
    return [names for _, names in sorted(grouped.items(), key=lambda kv: kv[0])]


def _fallback_groups(model: nn.Module) -> list[list[str]]:
    """One group per top-level child module, in registration order (used without a matcher)."""
    groups: dict[str, list[str]] = {}
    for n, _ in model.named_parameters():
        groups.setdefault(n.split(".")[0], []).append(n)
    return list(groups.values())


def _group_name(names: list[str], index: int, matched: bool) -> str:
    if not matched:
        return names[0].split(".")[0]  # the top-level child's own name
    return "stem" if index == 0 else f"stage{index}"


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """Split a backbone's parameters into ordered groups: stem, stages..., [neck], head.

    Groups come from timm's ``group_matcher(coarse=True)`` and are named ``stem``, ``stage1``...
    ``stageN`` (one per matcher group, so a ViT has one per block); models without a matcher fall
    back to one group per top-level child, named after it. The classifier parameters always form
    the last group, ``head``; anything else that shares the matcher's last group with the
    classifier (MobileNetV3's ``conv_head``, ConvNeXt's ``head.norm``) becomes a ``neck`` group
    just before it (where timm groups a final norm with the last blocks, as in ViT, it stays there).

    Args:
        model: a timm model (or any ``nn.Module``; then the last child is taken as the head).

    Returns:
        Groups in stem -> head order; every trainable parameter is in exactly one group.
    """
    raw = _timm_groups(model)
    matched = raw is not None
    if raw is None:
        raw = _fallback_groups(model)
    head = set(head_parameter_names(model))
    if not head and not matched:
        head = set(raw.pop())  # plain module: its last child is the head
    named = dict(model.named_parameters())
    groups: list[tuple[str, list[str]]] = []
    neck: list[str] = []
    for i, names in enumerate(raw):
        body = [n for n in names if n not in head]
        if not body:
            continue
        if i == len(raw) - 1 and len(body) < len(names):
            neck = body  # shared the matcher's last group with the classifier
        else:
            groups.append((_group_name(body, i, matched), body))
    if neck:
        groups.append(("neck", neck))
    if head:
        groups.append(("head", [n for n in named if n in head]))
    seen: set[str] = set()
    result = []
    for name, names in groups:
        unique = name if name not in seen else f"{name}.{len(result)}"
        seen.add(unique)
        result.append(LayerGroup(unique, names, [named[n] for n in names]))
    _assign_norm_modules(model, result)
    return result


def _assign_norm_modules(model: nn.Module, groups: list[LayerGroup]) -> None:
    owner = {n: g for g in groups for n in g.param_names}
    for mod_name, module in model.named_modules():
        if not isinstance(module, _BatchNorm) and not hasattr(module, "running_mean"):
            continue
        own = [f"{mod_name}.{n}" for n, _ in module.named_parameters(recurse=False)]
        group = next((owner[n] for n in own if n in owner), None)
        if group is None:  # affine=False: the group of the closest parameter by name
            candidates = [n for n in owner if n.startswith(mod_name.rsplit(".", 1)[0])]
            group = owner[candidates[0]] if candidates else groups[0]
        group.norm_modules.append(mod_name)
