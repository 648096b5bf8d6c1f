"""Backbone features computed once and cached on disk, shared by probe training and benchmarks.

A frozen backbone gives the same features every epoch, so ``probe`` (and the training-free
heads) compute them once, store them in the array cache (:mod:`visiontl.core.cache`) under
``<cache>/features/<key>/`` and train the head on them. The key covers everything the features
depend on: the backbone and a hash of its weights, the transform (image size, normalisation,
augmentation), the number of augmented views, the seed, the frames read and the data (each file's
path, size and modification time). :class:`visiontl.tasks.cached_features.CachedFeatures` is the callback that does this
for a run (and fits heads on the features), so the task never knows where its batches came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Dataset
from visiontl.core.progress import progress_bar as tqdm  # drawn on a terminal only

from visiontl.core.errors import UserError
from visiontl.core.files import default_cache_dir
from visiontl.core.cache import ArrayCache, data_fingerprint
from visiontl.models.weights import classifier_names

__all__ = [
    "choose_engine",
    "classify_features",
    "data_fingerprint",
    "extract_features",
    "FeatureCacheError",
    "feature_width",
    "split_features",
    "onnx_features",
    "pooled_features",
    "supports_features",
    "weights_fingerprint",
]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled pre-logits features of a timm model (what its classifier sees)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def feature_width(model: nn.Module) -> int:
    """Width of :func:`pooled_features`: the classifier's input (``head_hidden_size`` where a timm
    model has a pre-logits layer, as MobileNetV3 / V4 do; else ``num_features``)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def classify_features(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Apply the model's classifier to pooled features: ``model(x) == classify(pooled(x))``."""
    return model.get_classifier()(features)


def supports_features(model: nn.Module) -> bool:
    """Whether the model splits into pooled features + one classifier module (most timm models;
    not distilled models with two heads)."""
    return (
        hasattr(model, "forward_head")
        and hasattr(model, "forward_features")
        and isinstance(getattr(model, "get_classifier", lambda: None)(), nn.Module)
    )


def weights_fingerprint(model: nn.Module, exclude_prefixes: Sequence[str] = ()) -> str:
    """SHA-256 over the model's tensors (names, shapes, values), skipping those under the given
    module paths (the classifier, whose weights do not change the features)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if any(name == p or name.startswith(p + ".") for p in exclude_prefixes):
            continue
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Pooled(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.model, x)


def onnx_features(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Export the pooled-features forward to ONNX (in memory) and return an ONNX Runtime runner,
    or ``None`` where onnxruntime or the export is unavailable."""
    try:
        import io
        import warnings

        from visiontl.core.ort import ort_session

        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Pooled(model).eval(), example[:2].contiguous(), buf, input_names=["x"],
                              output_names=["f"], dynamic_axes={"x": {0: "n"}, "f": {0: "n"}},
                              opset_version=17, dynamo=False)
        session = ort_session(buf.getvalue())
    except Exception as err:  # noqa: BLE001 - any exporter / runtime failure means: use torch
        log.info("ONNX Runtime feature extraction unavailable (%s); using PyTorch.", err)
        return None
    return lambda x: torch.from_numpy(session.run(None, {"x": x.contiguous().numpy()})[0])


def _timed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, float]:
    fn(x)  # warm-up
    start = time.perf_counter()
    out = fn(x)
    return out, time.perf_counter() - start


def choose_engine(
    model: nn.Module, batch: torch.Tensor, engine: str = "auto", rtol: float = 1e-3, atol: float = 1e-4
) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Pick PyTorch or ONNX Runtime for feature extraction, checked on a real batch.

    ONNX Runtime is used only if its features match PyTorch's within ``atol + rtol * scale``
    (``scale``: the largest feature magnitude) and, for ``engine="auto"``, only if it is faster on
    this batch.
    """
    from visiontl.core.speed import channels_last_input, is_cnn

    channels_last = is_cnn(model)
    device = next(model.parameters()).device

    def eager(x: torch.Tensor) -> torch.Tensor:  # on the model's device (a GPU's when the trainer has one)
        with torch.no_grad():
            return pooled_features(model, channels_last_input(x.to(device, non_blocking=True), channels_last))

    if engine not in ("auto", "torch", "onnxruntime"):
        raise ValueError(f"engine must be 'auto', 'torch' or 'onnxruntime', got {engine!r}.")
    if engine == "torch" or device.type != "cpu":  # ONNX Runtime is the CPU alternative here
        return "torch", eager
    runner = onnx_features(model, batch)
    if runner is None:
        return "torch", eager
    reference, t_torch = _timed(eager, batch)
    candidate, t_ort = _timed(runner, batch)
    scale = float(reference.abs().max()) or 1.0
    diff = float((candidate - reference).abs().max())
    if diff > atol + rtol * scale:
        log.warning("ONNX Runtime features differ from PyTorch by %.2e (scale %.2e); using PyTorch.", diff, scale)
        return "torch", eager
    if engine == "auto" and t_ort >= t_torch:
        return "torch", eager
    log.info("Feature extraction through ONNX Runtime: x%.2f faster, max difference %.1e", t_torch / t_ort, diff)
    return "onnxruntime", runner


ORT_MIN_IMAGES = 2000
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _engine_for(model: nn.Module, batch: torch.Tensor, engine: str) -> tuple[str, Callable]:
    """:func:`choose_engine`, remembered per model, input shape and weights (train / val / test
    splits share one export)."""
    if engine == "torch":  # nothing to export or check: no need to hash the weights
        return choose_engine(model, batch, "torch")
    key = (engine, tuple(batch.shape[1:]), weights_fingerprint(model))
    cached = _ENGINES.setdefault(model, {})
    if key not in cached:
        cached.clear()
        cached[key] = choose_engine(model, batch, engine)
    return cached[key]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 32,  # 64 ran 3x slower than 32 for EfficientNet-Lite0 at 224 px on 2 cores
    num_workers: int = 0,
    views: int = 1,
    desc: str = "Extracting features",
    engine: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Run the frozen model over ``dataset`` (``views`` times) and return ``(features, labels)``.

    Items must be dicts with ``image`` and ``label``. With ``views > 1`` the dataset's transform
    should be random (augmented views); the result has ``views * len(dataset)`` rows.
    ``engine``: ``torch``, ``onnxruntime`` or ``auto`` (ONNX Runtime on sets of ``ORT_MIN_IMAGES``
    images or more, where it is faster on the first batch and gives the same features within
    float tolerance, see :func:`choose_engine`).
    """
    from visiontl.core.speed import tune_allocator

    tune_allocator()
    modes = [(m, m.training) for m in model.modules()]  # restored exactly: frozen norms stay in eval
    model.eval()
    feats: np.ndarray | None = None  # filled in place: no list of batches, no concatenated copy
    labels = np.empty(0, dtype=np.int64)  # class indices, or rows of per-tag targets (multi-label)
    row = 0
    n = len(dataset)
    seeded = getattr(dataset, "seed", None) is not None  # augmentation seeded per (seed, view, image)
    total = views * math.ceil(n / batch_size)
    forward = None
    with tqdm(total=total, desc=desc, unit="batch", disable=total < 5, leave=False) as bar:
        for view in range(views):
            indices = range(view * n, (view + 1) * n) if seeded else range(n)  # view v = "epoch" v
            loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers)
            for batch in loader:
                if forward is None:
                    # exporting and checking costs a few seconds: worth it on larger sets only
                    small = engine == "auto" and views * len(dataset) < ORT_MIN_IMAGES
                    used, forward = _engine_for(model, batch["image"], "torch" if small else engine)
                    bar.set_postfix(engine=used)
                out = forward(batch["image"]).float().cpu().numpy()
                if feats is None:
                    feats = np.empty((views * n, out.shape[1]), dtype=np.float32)
                    first = np.asarray(batch["label"])
                    labels = np.empty((views * n, *first.shape[1:]), dtype=np.int64 if first.ndim == 1 else np.float32)
                # copied out: an ONNX Runtime output held on to its arena block (0.75 GB more at 24,000 images)
                feats[row:row + len(out)] = out
                labels[row:row + len(out)] = np.asarray(batch["label"])
                row += len(out)
                bar.update()
    for module, mode in modes:
        module.training = mode
    if feats is None:
        return np.empty((0, 0), dtype=np.float32), labels
    return feats[:row], labels[:row]


class FeatureCacheError(UserError, RuntimeError):
    """A distributed run whose ranks do not see one feature cache."""


def split_features(model: nn.Module, backbone: str, dm: Any, split: str,
                   views: int = 1, compute: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The frozen ``model``'s pooled features of a datamodule's ``split`` (and labels), from the
    cache or computed into it; ``views > 1`` gives that many augmented views of each training image.
    ``compute=False``: read only (a rank of a distributed run, after rank 0 wrote the entry)."""
    augmented = split == "train" and views > 1
    source = dm.feature_source(split, augmented=augmented)
    cache = ArrayCache(default_cache_dir() / "features")
    weights = weights_fingerprint(model, exclude_prefixes=classifier_names(model))

    def key_of(source: Any) -> str:
        return cache.key({
            "backbone": backbone, "weights": weights,
            "in_chans": source.in_chans, "transform": repr(source.transform), "pixels": source.source_tag,
            "views": views if augmented else 1, "seed": dm.seed if augmented else None,
            "data": data_fingerprint([p for p, _ in source.items]),
            # the labels are cached with the features: a CSV relabelled over the same files is another entry
            "labels": hashlib.sha256(json.dumps([label for _, label in source.items],
                                                 default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)
                                                 ).encode()).hexdigest(),
            **({"frames": source.frame_key} if getattr(source, "frame_key", "") else {}),
        })

    # a label budget (``shots``) reads its rows from the whole split's features when they are cached
    whole = dm.full_feature_source(split) if not augmented and hasattr(dm, "full_feature_source") else None
    if whole is not None:
        entry = cache.load(key_of(whole[0]))
        if entry is not None:
            rank_zero_info(f"[visiontl] {split} features of the {len(whole[1])}-image budget read from the whole "
                           f"split's in {entry.path}")
            return entry["features"][whole[1]], entry["labels"][whole[1]]
    key = key_of(source)

    def extract() -> dict[str, np.ndarray]:
        if not compute:
            raise FeatureCacheError(
                f"The {split} features rank 0 just cached are not in {cache.root} on this rank: the nodes of this "
                f"distributed run do not share the feature cache. Point VISIONTL_CACHE at a folder every node "
                f"sees (a shared filesystem), or train without the cache (a strategy without cache_features).")
        features, labels = extract_features(model, source, batch_size=32, views=views if augmented else 1,
                                            desc=f"Extracting {split} features")
        return {"features": features, "labels": labels}

    entry, hit = cache.get_or_compute(key, extract, info={"backbone": backbone, "split": split, "images": len(source)})
    rank_zero_info(f"[visiontl] {split} features {'loaded from' if hit else 'cached in'} {entry.path}")
    return entry["features"], entry["labels"]
