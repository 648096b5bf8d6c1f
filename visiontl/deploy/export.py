"""ONNX export that carries its normalisation and labels, verified against PyTorch before it lands.

Input convention of every exported graph: ``input`` is float32 NCHW, ``C`` = the model's channels,
values in ``[0, 1]`` (8-bit pixels / 255, 16-bit / 65535), already brought to the model's input
size by :func:`visiontl.data.geometry.eval_resize` with the ``crop_pct`` in the metadata (:class:`visiontl.deploy.predict.Predictor` does this). Mean / std
normalisation is inside the graph. Outputs: ``logits`` (divided by the run's calibration
temperature, :mod:`visiontl.analyse.calibration`) and ``probabilities`` (their softmax, or a sigmoid
per tag: the calibrated probabilities), batch dimension dynamic. Metadata (``metadata_props``) states all of it, plus class names, backbone,
strategy, visiontl version, the run's validation metrics, a SHA-256 of the weights and the
verification result.

The file is written to a temporary sibling, checked with ``onnx.checker``, run with ONNX Runtime
against PyTorch on real images, and only then renamed onto the target: a failed export never
leaves a half-written or unverified model at the target path.

Verification (:func:`compare_outputs`) passes when, on every verification image:

- the logits agree within ``atol + rtol * max|logit|`` (default ``1e-4 + 1e-3 * scale``): float32
  kernels differ by rounding that grows with the logits' magnitude, so a fixed absolute bound
  refused real models over noise (1.1e-4 on logits of magnitude ~10);
- the probabilities agree within ``prob_atol`` (1e-4);
- the top-1 class is the same, except where PyTorch's two best logits are themselves closer than
  the logit tolerance (a tie that rounding may break either way).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visiontl.core.errors import UserError
from visiontl import __version__
from visiontl.core.files import atomic_path
from visiontl.models.features import classify_features, pooled_features, supports_features, weights_fingerprint
from visiontl.models.weights import classifier_names
from visiontl.deploy.predict import compare_outputs
from visiontl.tasks.protocols import Calibrated, PredictsTags

__all__ = ["INPUT_CONVENTION", "ExportError", "compare_outputs", "export_onnx", "preprocess_for_export"]

INPUT_CONVENTION = ("float32 NCHW in [0,1], at input_size by visiontl.data.geometry.eval_resize (crop_pct centre "
                    "crop for images not smaller than the input); normalisation inside the graph")


class ExportError(UserError):
    """An export that cannot be produced or did not verify."""


class _Deployable(nn.Module):
    """Normalise, classify, divide by the calibration temperature, softmax (a sigmoid per tag for
    multi-label models): the graph a service runs. Its ``logits`` are the calibrated ones, so every
    reader of the file (probabilities, thresholds, int8 agreement) sees the same numbers. With an
    out-of-distribution detector (:mod:`visiontl.models.ood`), a third output: its score of each
    image, from the pooled features and the calibrated logits."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], multilabel: bool = False,
                 temperature: torch.Tensor | None = None, ood: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.ood = ood
        self.multilabel = multilabel
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        t = torch.ones(1) if temperature is None else temperature.detach().float().cpu().reshape(-1)
        self.register_buffer("inverse_temperature", (1.0 / t).view(1, -1))
        self.calibrated = bool((t != 1).any())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (x - self.mean) / self.std
        features = pooled_features(self.model, x) if self.ood is not None else None
        logits = self.model(x) if features is None else classify_features(self.model, features)
        if self.calibrated:  # a multiplication in the graph only where there is a temperature to apply
            logits = logits * self.inverse_temperature
        probs = logits.sigmoid() if self.multilabel else logits.softmax(dim=1)
        return (logits, probs) if self.ood is None else (logits, probs, self.ood(features, logits))


def fold_temperature(network: nn.Module, temperature: torch.Tensor) -> bool:
    """Divide the classifier's weights and bias by the calibration temperature (per output for a
    per-tag temperature), in place: the network then computes the calibrated logits with no extra
    operation, and int8 quantisation sees the classifier ``Gemm`` it corrects. False (nothing changed)
    when the classifier is not a plain linear layer; the graph then multiplies by ``1 / T``."""
    heads = [network.get_submodule(name) for name in classifier_names(network)]
    if not heads or not all(isinstance(h, nn.Linear) for h in heads):
        return False
    t = temperature.detach().float().reshape(-1)
    with torch.no_grad():
        for head in heads:
            head.weight.div_(t.view(-1, 1).to(head.weight))
            if head.bias is not None:
                head.bias.div_(t.to(head.bias))
    return True


class _StaticSame(nn.Module):
    """A timm TensorFlow-"SAME" layer (``Conv2dSame``, ``MaxPool2dSame``, ``AvgPool2dSame``) with its
    padding fixed for one input size: one ``Pad`` with constant amounts in the ONNX graph.

    timm computes "SAME" padding from the input's shape at every call, which ONNX records as float
    arithmetic on ``Shape`` outputs (Ceil, Sub, Mul, Clip...). A float graph runs it exactly, but int8
    quantisation puts those values through QuantizeLinear like activations: the padding amounts are
    rounded, the feature maps shift by a pixel, and EfficientNet-Lite's int8 agreement collapsed.
    The exported graph has a fixed height and width, so fixing the padding loses nothing.
    """

    def __init__(self, layer: nn.Module, pad: list[int], value: float) -> None:
        super().__init__()
        self.layer, self.pad, self.value = layer, [int(p) for p in pad], value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        layer = self.layer
        x = F.pad(x, self.pad, value=self.value)
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(x, layer.weight, layer.bias, layer.stride, 0, layer.dilation, layer.groups)
        if isinstance(layer, nn.MaxPool2d):
            return F.max_pool2d(x, layer.kernel_size, layer.stride, 0, layer.dilation, layer.ceil_mode)
        return F.avg_pool2d(x, layer.kernel_size, layer.stride, 0, layer.ceil_mode, layer.count_include_pad)


def static_same_padding(model: nn.Module, input_shape: tuple[int, int, int]) -> nn.Module:
    """Replace, in place, every timm dynamic "SAME" layer of ``model`` by :class:`_StaticSame` with
    the padding that an input of ``input_shape`` (C, H, W) gets; other models are returned unchanged."""
    from timm.layers import Conv2dSame
    from timm.layers.padding import pad_same_arg
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

    kinds = (Conv2dSame, MaxPool2dSame, AvgPool2dSame)
    sizes: dict[nn.Module, tuple[int, int]] = {}
    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        sizes.setdefault(module, tuple(args[0].shape[-2:]))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, kinds)]
    if not hooks:
        return model
    try:
        was_training = model.training
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    for name, module in list(model.named_modules()):
        if module in sizes:
            if isinstance(module, nn.Conv2d):
                kernel, stride, dilation, value = module.weight.shape[-2:], module.stride, module.dilation, 0.0
            else:
                as2 = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v))
                kernel, stride = as2(module.kernel_size), as2(module.stride)
                dilation = as2(getattr(module, "dilation", 1))
                value = float("-inf") if isinstance(module, nn.MaxPool2d) else 0.0
            pad = pad_same_arg(list(sizes[module]), list(kernel), list(stride), list(dilation))
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], _StaticSame(module, pad, value))
    return model


def preprocess_for_export(paths: list[Path], size: tuple[int, int], channels: int, crop_pct: float = 1.0
                          ) -> np.ndarray:
    """Images to the graph's input convention (same code path as the predictor); a multi-frame
    DICOM by its middle frame."""
    from visiontl.deploy.predict import preprocess

    return np.stack([preprocess(p, size, channels, crop_pct, frame="middle") for p in paths])


def _run_images(source: str | os.PathLike[str] | None, limit: int, split: str = "val") -> list[Path]:
    """Images of a run's ``split``, from its ``<split>_images.txt`` (plain paths, nothing else).

    A run directory is data, possibly someone else's: nothing in it is imported, instantiated or
    executed. Its ``config.yaml`` is never read here (it may name any class).
    """
    if source is None:
        return []
    run = Path(source) if Path(source).is_dir() else Path(source).parent.parent
    listing = run / f"{split}_images.txt"
    try:
        lines = listing.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    files = [Path(line) for line in dict.fromkeys(lines) if line.strip()]
    return [f for f in files if f.is_file()][:limit]


def _run_metrics(source: str | os.PathLike[str] | None) -> dict[str, Any]:
    if source is None:
        return {}
    path = Path(source)
    run = path if path.is_dir() else path.parent.parent
    try:
        final = json.loads((run / "metrics.json").read_text()).get("final", {})
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object: no metrics
        return {}
    if not isinstance(final, dict):
        return {}
    return {k: v for k, v in final.items() if k.startswith("val_") and isinstance(v, (int, float))}


def export_onnx(
    source: Any,
    out: str | os.PathLike[str],
    *,
    opset: int = 17,
    images: list[str | os.PathLike[str]] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    prob_atol: float = 1e-4,
    max_images: int = 64,
    quantize: str | None = None,
    calibration_images: list[str | os.PathLike[str]] | None = None,
    min_agreement: float = 0.99,
    weights: str | os.PathLike[str] | None = None,
    int8_exclude: list[str] | None = None,
) -> dict[str, Any]:
    """Export a trained classifier to ONNX, verify it, and write it atomically to ``out``.

    Args:
        source: a run directory, a ``.ckpt`` file, a PEFT checkpoint (``.peft.safetensors``,
            loaded onto the base weights it records, checked by SHA-256) or a
            :class:`ClassificationTask`.
        out: target ``.onnx`` path.
        opset: ONNX opset (13-20).
        images: images to verify on (default: the run's validation images listed in its
            ``val_images.txt``; else random inputs, which the report says).
        atol: absolute part of the logit tolerance ``atol + rtol * max|logit|``.
        rtol: relative part of the logit tolerance (relative to the largest PyTorch logit).
        prob_atol: largest allowed probability difference.
        max_images: at most this many images are used for verification (and calibration).
        quantize: ``"int8"`` also writes ``<out>.int8.onnx`` when it agrees with the float model
            (:mod:`visiontl.deploy.quantize`); the float model stays the default artefact.
        calibration_images: training images for static int8 calibration (default: the run's).
        min_agreement: minimum top-1 agreement of the int8 model with the float one.
        weights: the base weights of a PEFT checkpoint ``source`` when not at its recorded source
            (a file or named source; their SHA-256 must match the recorded one).
        int8_exclude: ONNX node names that int8 keeps float (the report's ``excluded_nodes``).

    Returns:
        The report (also stored in the model's metadata): path, size, max difference, top-1
        agreement, images used.
    """
    if not 13 <= opset <= 20:
        raise ExportError(f"Unsupported opset {opset}; use 13 to 20 (17 is well supported everywhere).")
    if not isinstance(source, nn.Module):
        from visiontl.tasks.trained import load_task
    task = source if isinstance(source, nn.Module) else load_task(source, weights)
    pre = task.preprocessing  # what training resolved, read back from the checkpoint
    cfg = pre.timm_config()
    channels, height, width = cfg["input_size"]
    crop_pct = pre.crop_pct
    # a copy: the caller's task keeps its mode (train / eval) and memory format; a strategy that
    # changed the model (LoRA) folds it back into a plain one
    try:
        network = task.strategy.merge(copy.deepcopy(task.model) if task is source else task.model)
    except ValueError as err:  # peft's safe merge: NaN in the merged weights
        raise ExportError(f"{source if not isinstance(source, nn.Module) else 'the model'}: folding its "
                          f"{task.strategy.name} update into the weights fails ({' '.join(str(err).split())[:200]}); "
                          f"nothing was written to {out}.") from err
    with torch.no_grad():
        bad = next((k for k, v in network.named_parameters() if v.is_floating_point() and not torch.isfinite(v).all()),
                   None)
    if bad is not None:
        raise ExportError(f"{source if not isinstance(source, nn.Module) else 'the model'}: weight {bad} holds NaN or "
                          f"infinite values (a diverged run or a damaged checkpoint); nothing was written to {out}.")
    network = static_same_padding(network, (channels, height, width))
    multilabel = isinstance(task, PredictsTags) and task.multilabel
    temperature = task.temperature if isinstance(task, Calibrated) else None
    if temperature is not None and bool((temperature != 1).any()):
        network = copy.deepcopy(network)  # the task's own weights (and their fingerprint) stay as trained
        if fold_temperature(network, temperature):
            temperature = None  # in the classifier's weights now: the graph is the plain one
    ood = getattr(task, "ood", None) if supports_features(network) else None
    model = _Deployable(network.to(memory_format=torch.contiguous_format), list(cfg["mean"]),
                        list(cfg["std"]), multilabel, temperature, copy.deepcopy(ood)).eval()
    paths = [Path(p) for p in images] if images else _run_images(None if isinstance(source, nn.Module) else source,
                                                                 max_images)
    if paths:
        inputs = preprocess_for_export(paths[:max_images], (height, width), channels, crop_pct)
        verified_on = f"{len(inputs)} images"
    else:
        inputs = np.random.default_rng(0).random((8, channels, height, width), dtype=np.float32)
        verified_on = "8 random inputs (no images given or found)"
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name, e.g. {out / 'model.onnx'}.")
    try:
        return _export_to(out, model, task, cfg, inputs, verified_on, opset, atol, rtol, prob_atol, source,
                          quantize, calibration_images, max_images,
                          {"min_agreement": min_agreement, "exclude": int8_exclude}, crop_pct)
    except OSError as err:
        raise ExportError(f"Cannot write {out}: {err.strerror or err}; choose another --out.") from err


EXPORTER_NOTES = r".*Constant folding - Only steps=1 can be constant folded"
"""torch.onnx's note that a strided ``Slice`` was left unfolded (the graph is correct, only not folded)."""


def _export_to(out: Path, model: nn.Module, task: Any, cfg: dict[str, Any], inputs: np.ndarray, verified_on: str,
               opset: int, atol: float, rtol: float, prob_atol: float, source: Any, quantize: str | None,
               calibration_images: list | None, max_images: int, int8_options: dict[str, Any],
               crop_pct: float) -> dict[str, Any]:
    import onnx

    from visiontl.deploy.predict import ort_session

    channels, height, width = cfg["input_size"]
    with atomic_path(out) as tmp:
        with warnings.catch_warnings():  # the exporter's notes on its own graph passes, not the user's to act on:
            # the file is verified against PyTorch below, on real images
            warnings.filterwarnings("ignore", message=EXPORTER_NOTES, category=UserWarning)
            # the tracer's notes on Python values in the forward (timm's ViT size checks): taken as constants at
            # this input size, which is the size the file is verified (and deployed) at
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            outputs = ["logits", "probabilities", *(["ood_score"] if model.ood is not None else [])]
            torch.onnx.export(model, torch.from_numpy(inputs[:2]), str(tmp), input_names=["input"],
                              output_names=outputs, opset_version=opset, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, **{name: {0: "batch"} for name in outputs}})
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        session = ort_session(tmp)
        ort_out = session.run(outputs, {"input": inputs})
        with torch.no_grad():
            torch_out = [t.numpy() for t in model(torch.from_numpy(inputs))]
        thresholds = task.thresholds.tolist() if isinstance(task, PredictsTags) and task.multilabel else None
        check = compare_outputs(torch_out[0], ort_out[0], atol, rtol, prob_atol, thresholds=thresholds)
        if model.ood is not None:  # the score, within the logits' kind of tolerance; and the same abstentions
            check.update(_compare_scores(model.ood, torch_out[2], ort_out[2], atol, rtol))
            check["passed"] = check["passed"] and check.pop("ood_passed")
        if not check["passed"]:
            raise ExportError(
                f"ONNX Runtime does not reproduce PyTorch on {verified_on}: max logit difference "
                f"{check['max_abs_logit_diff']:.2e} (allowed {check['logit_tolerance']:.2e} = {atol:g} + {rtol:g} x "
                f"logit scale {check['logit_scale']:.3g}), max probability difference {check['max_prob_diff']:.2e} "
                f"(allowed {prob_atol:g}), {check['top1_mismatches']} image(s) with another top-1 class"
                f"{_score_problem(check)}; nothing was written to {out}. Try another opset (--opset)."
            )
        check.pop("passed")
        report = {"path": str(out), "opset": opset, **check, "verified_on": verified_on}
        meta = {
            "visiontl_version": __version__,
            "input_convention": INPUT_CONVENTION,
            "class_names": json.dumps(task.class_names),
            "input_size": json.dumps([height, width]),
            "channels": str(channels),
            "mean": json.dumps(list(cfg["mean"])),
            "std": json.dumps(list(cfg["std"])),
            "interpolation": "area (shrink) / bilinear (enlarge)",
            "crop_pct": repr(crop_pct),
            "preprocessing": json.dumps(task.preprocessing.to_dict()),  # the whole object, as training resolved it
            "backbone": task.hparams["backbone"],
            "strategy": json.dumps(task.hparams.get("strategy")),
            "metrics": json.dumps(_run_metrics(None if isinstance(source, nn.Module) else source)),
            "weights_sha256": weights_fingerprint(task.model),
            "verification": json.dumps(report),
            "task": "multilabel" if thresholds is not None else "multiclass",
        }
        if thresholds is not None:  # the decision rule travels with the weights it was tuned for
            meta["thresholds"] = json.dumps([round(float(t), 6) for t in thresholds])
        if isinstance(task, Calibrated):  # applied in the graph; stated for readers of the file
            temperature = task.temperature
            meta["temperature"] = json.dumps([round(float(t), 6) for t in temperature])
        if model.ood is not None:  # the graph's ood_score output and the threshold it abstains over
            meta["ood"] = json.dumps(model.ood.settings())
        onnx.helper.set_model_props(proto, meta)
        onnx.save(proto, str(tmp))
    report["size_bytes"] = out.stat().st_size
    if quantize is not None:
        report["int8"] = _int8(out, quantize, source, calibration_images, inputs, (height, width), channels,
                               max_images, {**int8_options, "thresholds": thresholds}, crop_pct,
                               model.ood.threshold if model.ood is not None else None)
    return report


def _compare_scores(detector: Any, reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float
                    ) -> dict[str, Any]:
    """ONNX Runtime's out-of-distribution scores against PyTorch's: within ``atol + rtol * max|score|``,
    and no image on the other side of the threshold unless PyTorch's score is itself that close to it."""
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    tolerance = atol + rtol * float(np.abs(reference).max(initial=0.0))
    flips = 0
    if detector.threshold is not None:
        flipped = (reference > detector.threshold) != (candidate > detector.threshold)
        flips = int((flipped & (np.abs(reference - detector.threshold) > tolerance)).sum())
    worst = float(diff.max(initial=0.0))
    return {"max_abs_ood_diff": worst, "ood_tolerance": tolerance, "abstain_mismatches": flips,
            "ood_passed": worst <= tolerance and flips == 0}


def _score_problem(check: dict[str, Any]) -> str:
    """The out-of-distribution part of a failed verification's message ('' without a detector)."""
    if "max_abs_ood_diff" not in check:
        return ""
    return (f", max out-of-distribution score difference {check['max_abs_ood_diff']:.2e} (allowed "
            f"{check['ood_tolerance']:.2e}), {check['abstain_mismatches']} image(s) abstaining on one side only")


def _int8(out: Path, quantize: str, source: Any, calibration_images: list | None, validation: np.ndarray,
          size: tuple[int, int], channels: int, max_images: int, options: dict[str, Any], crop_pct: float,
          abstain_threshold: float | None = None) -> dict[str, Any]:
    from visiontl.deploy.quantize import quantize_int8

    if quantize != "int8":
        raise ExportError(f"Unsupported quantisation {quantize!r}; the only choice is 'int8'.")
    paths = [Path(p) for p in calibration_images] if calibration_images else _run_images(
        None if isinstance(source, nn.Module) else source, max_images, split="train")
    calibration = (preprocess_for_export(paths[:max_images], size, channels, crop_pct)
                   if paths else validation)
    target = out.with_name(out.stem + ".int8.onnx")
    report = quantize_int8(out, target, calibration, validation, **options)
    report["path"] = str(target) if report["accepted"] else None
    if report["accepted"] and abstain_threshold is not None:  # the int8 features move the score: how far
        report["abstain_agreement"] = _abstain_agreement(out, target, validation, abstain_threshold)
    return report


def _abstain_agreement(float_model: Path, int8_model: Path, images: np.ndarray, threshold: float) -> float:
    """The share of ``images`` that the int8 model abstains on exactly when the float model does."""
    from visiontl.deploy.predict import ort_session

    scores = [np.concatenate([ort_session(path).run(["ood_score"], {"input": images[i:i + 32]})[0]
                              for i in range(0, len(images), 32)]) for path in (float_model, int8_model)]
    return float(((scores[0] > threshold) == (scores[1] > threshold)).mean())
