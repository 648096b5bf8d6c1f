"""int8 ONNX models through ``onnxruntime.quantization``, accepted only if they agree with float.

CNNs get static QDQ quantisation: int8 per-channel weights, uint8 activations (ONNX Runtime's
fast u8s8 kernels; symmetric int8 activations ran 2-5x slower here), MinMax ranges calibrated once
on equal-size batches of real training images after ``quant_pre_process``, and two bias
corrections that cost no speed (the int8 graph is the same, only float biases move):

1. **per-layer bias correction** (Nagel et al. 2019, "Data-Free Quantization Through Weight
   Equalization and Bias Correction"): each layer's int8 weights, read back from ONNX Runtime's
   own quantised model, shift its outputs' mean by ``(W_q - W) E[x]``, with ``E[x]`` measured on
   the calibration images; the shift comes off that layer's bias before the final build;
2. **logit bias correction**: the int8 logits' remaining mean shift from the float logits on the
   calibration images comes off the classifier's bias (a constant shift flips every near-tie the
   same way).

Then, as long as the top-1 agreement with the float model on the validation images is below
``min_agreement``, **mixed precision**: each quantised Conv / Gemm / MatMul is ranked by measured
sensitivity (the logits' relative error on calibration images when that node alone stays float),
and the most sensitive 1, 2, 4, ... nodes stay float (``nodes_to_exclude``, with no bias
correction of their own), up to ``max_excluded``.

The first step that agrees enough is written; if none does, the int8 model is refused and the
float model stays the artefact. Every step's agreement is in the report, with the excluded nodes.

Transformers get dynamic quantisation of MatMul only. Convolutions are never quantised
dynamically: ONNX Runtime's ConvInteger kernels are far slower than float (docs/how-to/export-deploy.md,
``benchmarks/results/export.md``).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from visiontl.core.errors import UserError

__all__ = ["QUANTIZABLE", "QuantizeError", "quantize_int8", "sensitivity"]

QUANTIZABLE = ("Conv", "Gemm", "MatMul")  # the nodes whose weights int8 changes, ranked and excluded
FLOAT_SCOPES = ("/ood/",)
"""Nodes under these scopes always stay float: the out-of-distribution score (:mod:`visiontl.analyse.ood`)
compares distances with a threshold set in float, and its bank or whitening matrix is not a layer
whose rounding the logits' agreement would catch."""
CALIBRATION_BATCH = 8
BIAS_CORRECTION = ("layers", "logits", "none")


class QuantizeError(UserError):
    """Quantisation that cannot run (no calibration images, unsupported model)."""


def _ops(model_path: Path) -> list[Any]:
    import onnx

    return list(onnx.load(str(model_path)).graph.node)


def _latency(session: Any, batch: np.ndarray, repeats: int = 5) -> float:
    session.run(["logits"], {"input": batch})
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(["logits"], {"input": batch})
    return (time.perf_counter() - start) / repeats


def _throughput(session: Any, images: np.ndarray, batch: int = 32, repeats: int = 3) -> float:
    """Images per second at ``batch`` (the images repeated up to it), median of ``repeats``."""
    x = np.concatenate([images] * (batch // len(images) + 1))[:batch]
    session.run(["logits"], {"input": x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(["logits"], {"input": x})
        times.append(time.perf_counter() - start)
    return batch / sorted(times)[len(times) // 2]


def _logits(session: Any, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([session.run(["logits"], {"input": images[i:i + batch]})[0]
                           for i in range(0, len(images), batch)])


def _agreement(a: np.ndarray, b: np.ndarray, thresholds: Sequence[float] | None = None) -> float:
    """Top-1 agreement of two logit arrays; for a multi-label model (``thresholds``, one per tag) the
    share of (image, tag) decisions the two agree on."""
    if thresholds is not None:
        t = np.clip(np.asarray(thresholds, np.float64), 1e-12, 1 - 1e-12)
        cut = np.log(t / (1 - t))[None, :]
        return float(((a >= cut) == (b >= cut)).mean())
    return float((a.argmax(1) == b.argmax(1)).mean())


def _relative_error(q: np.ndarray, f: np.ndarray) -> float:
    return float(np.mean((q - f) ** 2) / max(float(np.mean(f ** 2)), 1e-12))


class _Static:
    """Static QDQ quantisation of one prepared float model: calibrated once, rebuilt per setting."""

    def __init__(self, prepared: Path, calibration: np.ndarray, work: Path) -> None:
        from onnxruntime.quantization import quantize_static

        self.prepared, self.calibration, self.work = prepared, calibration, work
        self.builds = 0
        self.layer_shift: dict[str, np.ndarray] = {}  # node name -> its outputs' mean shift from int8 weights
        # ONNX Runtime >= 1.26 keeps the ranges in a cache: later builds skip the calibration pass
        self.cache = work / "calibration.json" if "calibration_cache_path" in inspect.signature(
            quantize_static).parameters else None
        self.classifier = self._classifier()

    def _reader(self) -> Any:
        from onnxruntime.quantization import CalibrationDataReader

        images = self.calibration
        size = CALIBRATION_BATCH if len(images) >= CALIBRATION_BATCH else len(images)
        batches = [images[i:i + size] for i in range(0, len(images) - size + 1, size)]  # equal sizes

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([{"input": b} for b in batches])

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.batches, None)

        return Reader()

    def _classifier(self) -> tuple[str, float] | None:
        """The Gemm that writes ``logits`` and its bias initializer (None: no bias correction)."""
        import onnx

        graph = onnx.load(str(self.prepared)).graph
        inits = {i.name for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Gemm" and "logits" in node.output and len(node.input) > 2 and node.input[2] in inits:
                beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
                return node.input[2], beta
        return None

    def correct_layers(self) -> dict[str, Any]:
        """Per-layer bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2).

        Rounding a layer's weights to int8 shifts its outputs' mean by ``(W_q - W) E[x]``, and the
        shifts add up through the network (on EfficientNet-Lite0 weight rounding alone moved the
        logits more than activation rounding). ONNX Runtime's own int8 weights are read back from a
        first build, ``E[x]`` is measured per input channel on the calibration images, and each
        shift comes off that layer's float bias. The weights themselves are untouched, so ONNX
        Runtime rounds them exactly as before; later builds recalibrate on the corrected model and
        leave the correction off every node kept float.
        """
        import onnx

        first = self.build([])
        graph = onnx.load(str(self.prepared)).graph
        weights = _dequantized_weights(first)
        layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm") and n.name in weights]
        means = _input_means(self.prepared, [n.input[0] for n in layers], self.calibration)
        inits = {i.name: i for i in graph.initializer}
        from onnx import numpy_helper

        self.layer_shift = {}
        for node in layers:
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            shift = _output_shift(node, weights[node.name] - w, means[node.input[0]])
            if shift is not None:
                self.layer_shift[node.name] = shift.astype(np.float32)
        first.unlink()
        if self.cache is not None:
            self.cache.unlink(missing_ok=True)  # the next build calibrates the corrected model
        top = max((float(np.abs(v).max()) for v in self.layer_shift.values()), default=0.0)
        return {"layers": len(self.layer_shift), "max_abs_shift": top}

    def build(self, exclude: list[str], shift: np.ndarray | None = None) -> Path:
        """The int8 model with ``exclude`` left float, every other layer's bias corrected (after
        :meth:`correct_layers`) and ``shift`` taken off the logits' bias."""
        import onnx
        from onnx import numpy_helper
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        source = self.prepared
        layer_shift = {name: v for name, v in self.layer_shift.items() if name not in exclude}
        logit_shift = shift is not None and self.classifier is not None
        if layer_shift or logit_shift:
            proto = onnx.load(str(self.prepared))
            inits = {init.name: init for init in proto.graph.initializer}

            def subtract(node: Any, delta: np.ndarray) -> None:
                if len(node.input) > 2 and node.input[2]:
                    init = inits[node.input[2]]
                    bias = numpy_helper.to_array(init).astype(np.float32) - delta.astype(np.float32)
                    init.CopyFrom(numpy_helper.from_array(bias, init.name))
                else:  # a layer without a bias gets one
                    init = numpy_helper.from_array(-delta.astype(np.float32), f"{node.name}/bias_correction")
                    proto.graph.initializer.append(init)
                    inits[init.name] = init
                    if len(node.input) == 2:
                        node.input.append(init.name)
                    else:
                        node.input[2] = init.name

            for node in proto.graph.node:
                if node.name in layer_shift:
                    beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
                    subtract(node, layer_shift[node.name] / beta)
            if logit_shift:
                name, beta = self.classifier
                node = next(n for n in proto.graph.node if len(n.input) > 2 and n.input[2] == name)
                subtract(node, shift / beta)
            source = self.work / "corrected.onnx"
            onnx.save(proto, str(source))
        self.builds += 1
        out = self.work / f"int8-{self.builds}.onnx"
        cached = self.cache is not None and self.cache.is_file()
        kwargs = {"calibration_cache_path": str(self.cache)} if self.cache is not None else {}
        quantize_static(str(source), str(out), None if cached else self._reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        nodes_to_exclude=list(exclude), **kwargs)
        return out


def _dequantized_weights(qdq: Path) -> dict[str, np.ndarray]:
    """Node name -> the weights ONNX Runtime's QDQ model really multiplies by (int8 back to float)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(qdq)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    weights = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        q = inits[dq.input[0]].astype(np.float64)
        scale = inits[dq.input[1]].astype(np.float64)
        zero = inits[dq.input[2]].astype(np.float64) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
        if scale.ndim == 1 and scale.size > 1:  # per channel, along ``axis`` (default 1)
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        weights[node.name] = (q - zero) * scale
    return weights


def _input_means(model: Path, names: list[str], images: np.ndarray, batch: int = CALIBRATION_BATCH
                 ) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) means of the tensors ``names`` over ``images``, in batches."""
    import onnx
    from onnx import TensorProto, helper

    from visiontl.deploy.predict import ort_session

    proto = onnx.load(str(model))
    graph_inputs = {i.name for i in proto.graph.input}
    exposed = {o.name for o in proto.graph.output}
    for name in dict.fromkeys(names):
        if name not in exposed and name not in graph_inputs:
            proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
            exposed.add(name)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        onnx.save(proto, str(probe))
        session = ort_session(probe)
        outputs = [o.name for o in session.get_outputs() if o.name in names]
        totals: dict[str, np.ndarray] = {}
        count = 0
        for i in range(0, len(images), batch):
            x = images[i:i + batch]
            values = dict(zip(outputs, session.run(outputs, {"input": x})))
            values.update({name: x for name in names if name in graph_inputs})
            for name in dict.fromkeys(names):
                a = values[name].astype(np.float64)
                mean = a.mean(axis=tuple(k for k in range(a.ndim) if k != 1)) * len(x)
                totals[name] = totals.get(name, 0) + mean
            count += len(x)
    return {name: total / count for name, total in totals.items()}


def _output_shift(node: Any, delta: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """The mean output change per channel of a Conv / Gemm whose weights change by ``delta``, for
    inputs with per-channel mean ``mean`` (padding borders ignored); None: not a case handled."""
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Conv":
        group = attrs["group"].i if "group" in attrs else 1
        kernel = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(axis=2)  # (out, in / group)
        per_in, per_out = delta.shape[1], delta.shape[0] // group
        return np.array([kernel[c] @ mean[(c // per_out) * per_in:(c // per_out + 1) * per_in]
                         for c in range(delta.shape[0])])
    if attrs.get("transA") and attrs["transA"].i:
        return None
    alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
    weights = delta.T if "transB" in attrs and attrs["transB"].i else delta  # (in, out)
    return alpha * (mean @ weights)


def sensitivity(static: _Static, nodes: list[str], images: np.ndarray, reference: np.ndarray,
                base: list[str] | None = None, progress: bool = True) -> list[tuple[str, float]]:
    """Each node's measured sensitivity: the logits' relative error on ``images`` when that node
    (besides ``base``) stays float (lower = keeping it float helps more), most sensitive first."""
    from visiontl.core.progress import progress_bar as tqdm  # drawn on a terminal only

    from visiontl.deploy.predict import ort_session

    scores = []
    for node in tqdm(nodes, desc="int8 sensitivity", unit="node", disable=not progress, leave=False):
        path = static.build([*(base or []), node])
        scores.append((node, _relative_error(_logits(ort_session(path), images), reference)))
        path.unlink()
    return sorted(scores, key=lambda item: item[1])


def quantize_int8(
    float_model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    calibration: np.ndarray | None,
    validation: np.ndarray,
    min_agreement: float = 0.99,
    max_excluded: int | float = 0.1,
    exclude: list[str] | None = None,
    log: Callable[[str], Any] | None = None,
    bias_correction: str = "layers",
    thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Quantise ``float_model`` and keep the result at ``out`` only if it agrees enough.

    Args:
        float_model: a verified float32 export (input ``input``, outputs ``logits``, ...).
        out: where the int8 model goes when accepted.
        calibration: preprocessed training images (N, C, H, W) for static quantisation of CNNs.
        validation: preprocessed validation images for the agreement check.
        min_agreement: minimum top-1 agreement with the float model.
        max_excluded: the most nodes the search leaves float, a count or a share of the quantisable
            nodes (0: no search).
        exclude: node names that always stay float (CNNs), e.g. from an earlier report.
        log: where progress lines go (default: nowhere).
        bias_correction: CNNs: ``"layers"`` (each layer's bias corrected for its int8 weights, then
            the logits' remaining mean shift), ``"logits"`` (the logits' shift only) or ``"none"``.
        thresholds: a multi-label model's per-tag thresholds: agreement is then over the (image,
            tag) decisions, not the top-1 class (the report keeps the key ``top1_agreement``).

    Returns:
        Report: method, accepted, top-1 agreement, ``steps`` (every setting tried, with its
        agreement), ``excluded_nodes``, ``bias_correction``, sizes, batch-1 latencies.
    """
    float_model, out = Path(float_model), Path(out)
    if bias_correction not in BIAS_CORRECTION:
        raise QuantizeError(f"bias_correction={bias_correction!r}: choose one of {', '.join(BIAS_CORRECTION)}.")
    try:
        return _quantize(float_model, out, calibration, validation, min_agreement, max_excluded,
                         list(exclude or []), log or (lambda _line: None), bias_correction, thresholds)
    except _Refused as refused:
        return refused.report


def _quantize(float_model: Path, out: Path, calibration: np.ndarray | None, validation: np.ndarray,
              min_agreement: float, max_excluded: int | float, exclude: list[str],
              log: Callable[[str], Any], bias_correction: str, thresholds: Sequence[float] | None = None
              ) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    from visiontl.core.files import atomic_path
    from visiontl.deploy.predict import ort_session

    nodes = _ops(float_model)
    convs = sum(node.op_type == "Conv" for node in nodes)
    matmuls = sum(node.op_type in ("MatMul", "Gemm") for node in nodes)
    if convs == 0 and matmuls == 0:
        kinds = sorted({node.op_type for node in nodes})
        raise QuantizeError(f"{float_model}: nothing int8 can speed up (no Conv, Gemm or MatMul; ops: "
                            f"{', '.join(kinds)}). Deploy the float model.")
    fp = ort_session(float_model)
    val_ref = _logits(fp, validation)
    started = time.perf_counter()
    steps: list[dict[str, Any]] = []
    excluded = list(exclude)
    shift = None
    layers: dict[str, Any] | None = None
    ranking: list[tuple[str, float]] = []
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        if convs > 2:  # a CNN (a ViT has one Conv: its patch embedding)
            if calibration is None or len(calibration) == 0:
                raise QuantizeError(
                    "Static int8 quantisation of a CNN needs calibration images (--calibration-images or the run's "
                    "own training images)."
                )
            prepared = work / "prepared.onnx"  # shape inference + graph clean-up first
            quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
            static = _Static(prepared, calibration, work)
            if bias_correction == "layers":
                layers = static.correct_layers()
                log(f"[visiontl int8] per-layer bias correction on {layers['layers']} layers "
                    f"(largest shift {layers['max_abs_shift']:.3g})")
            cal_ref = _logits(fp, calibration)

            def attempt(name: str, exclude: list[str]) -> tuple[Path, dict[str, Any], np.ndarray | None]:
                path = static.build(exclude)
                q8 = ort_session(path)
                cal_q = _logits(q8, calibration)
                correct = static.classifier is not None and bias_correction != "none"
                delta = (cal_q - cal_ref).mean(axis=0) if correct else None
                if delta is not None:  # bias correction, measured on the calibration images
                    path = static.build(exclude, delta)
                    q8 = ort_session(path)
                    cal_q = _logits(q8, calibration)
                val_q = _logits(q8, validation)
                step = {"step": name, "excluded": len(exclude), "top1_agreement": _agreement(val_q, val_ref, thresholds),
                        "calibration_agreement": _agreement(cal_q, cal_ref, thresholds),
                        "relative_logit_error": _relative_error(val_q, val_ref)}
                steps.append(step)
                log(f"[visiontl int8] {name}: top-1 agreement {step['top1_agreement']:.3f} "
                    f"(calibration images {step['calibration_agreement']:.3f})")
                return path, step, delta

            candidates = [n.name for n in _ops(prepared) if n.op_type in QUANTIZABLE]
            unknown = [name for name in exclude if name not in candidates]
            exclude = exclude + [n for n in candidates if n.startswith(FLOAT_SCOPES) and n not in exclude]
            excluded = list(exclude)
            if unknown:
                raise QuantizeError(f"Cannot keep {unknown} float: not a Conv, Gemm or MatMul of {float_model}; "
                                    f"its nodes are named like {candidates[:3]}.")
            first = {"layers": "int8 + per-layer bias correction", "none": "int8",
                     "logits": "int8 + logit bias correction" if static.classifier else "int8"}[bias_correction]
            path, step, shift = attempt(first + (f", {len(exclude)} given node(s) float" if exclude else ""), exclude)
            candidates = [name for name in candidates if name not in exclude]
            limit = int(max_excluded if max_excluded >= 1 else round(max_excluded * len(candidates)))
            if step["top1_agreement"] < min_agreement and limit > 0:
                subset = calibration[:64]
                log(f"[visiontl int8] ranking {len(candidates)} nodes by sensitivity on {len(subset)} images")
                ranking = sensitivity(static, candidates, subset, cal_ref[:64], base=exclude)
                k = 1
                while step["top1_agreement"] < min_agreement and k <= limit:
                    trial = exclude + [name for name, _ in ranking[:k]]
                    path, step, shift = attempt(f"{k} most sensitive node(s) float", trial)
                    excluded = trial
                    k = k * 2 if k * 2 <= limit or k == limit else limit
            shutil.copyfile(path, tmp)
            size = min(CALIBRATION_BATCH, len(calibration))
            method = (f"static QDQ (u8 activations, s8 per-channel weights, MinMax), calibrated on "
                      f"{len(calibration) // size * size} images"
                      + (", per-layer bias correction" if static.layer_shift else "")
                      + (", bias-corrected" if shift is not None else "")
                      + (f", {len(excluded)} node(s) float" if excluded else ""))
        else:
            weights = {t.name for t in onnx.load(str(float_model), load_external_data=False).graph.initializer}
            matmul_names = [n.name for n in nodes if n.op_type == "MatMul" and any(i in weights for i in n.input)]
            unknown = [name for name in exclude if name not in matmul_names]
            if unknown:
                raise QuantizeError(f"Cannot keep {unknown} float: dynamic int8 (a transformer) quantises MatMul nodes "
                                    f"with weights only, and {float_model}'s are named like {matmul_names[:3]}.")
            exclude = exclude + [n for n in matmul_names if n.startswith(FLOAT_SCOPES) and n not in exclude]
            excluded = list(exclude)
            quantize_dynamic(str(float_model), str(tmp), op_types_to_quantize=["MatMul"],
                             weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude))
            method = "dynamic, MatMul only" + (f", {len(exclude)} node(s) float" if exclude else "")
            q8 = ort_session(tmp)
            steps.append({"step": "dynamic", "excluded": 0,
                          "top1_agreement": _agreement(_logits(q8, validation), val_ref, thresholds)})
        q8 = ort_session(tmp)
        agree = steps[-1]["top1_agreement"]
        report = {
            "method": method, "top1_agreement": agree, "validated_on": len(validation),
            "min_agreement": min_agreement, "accepted": agree >= min_agreement, "steps": steps,
            "excluded_nodes": excluded, "bias_correction": None if shift is None else [float(x) for x in shift],
            "layer_bias_correction": layers,
            "sensitivity": [{"node": name, "relative_logit_error": score} for name, score in ranking[:10]],
            "quantize_s": round(time.perf_counter() - started, 1),
            "float_bytes": float_model.stat().st_size, "int8_bytes": tmp.stat().st_size,
            "float_latency_ms_bs1": 1000 * _latency(fp, validation[:1]),
            "int8_latency_ms_bs1": 1000 * _latency(q8, validation[:1]),
            "int8_vs_float_throughput_bs32": _throughput(q8, validation) / _throughput(fp, validation),
        }
        if not report["accepted"]:
            # raising inside atomic_path removes the temporary file; nothing lands at ``out``
            raise _Refused(report)
        proto = onnx.load(str(tmp))
        meta = {p.key: p.value for p in onnx.load(str(float_model)).metadata_props}
        meta["quantization"] = json.dumps(report)
        onnx.helper.set_model_props(proto, meta)
        onnx.save(proto, str(tmp))
    return report


class _Refused(Exception):
    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__("int8 refused")
        self.report = report
